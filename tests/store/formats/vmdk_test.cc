// VMDK parser tests: images made by qemu-img (-f vmdk: monolithicSparse, streamOptimized,
// monolithicFlat, twoGbMaxExtentSparse) and filled by qemu-io at test time, units recomputed here
// from the sparse header and grain directories, damage poked at offsets read from them.
#include "store/formats/vmdk.h"

#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::OpenLocalImage;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;
using testing::WriteFileAt;

const VmdkParser kParser;
constexpr uint64_t kPiece = 65536;
constexpr uint32_t kRedundantFlag = 2;

uint64_t Le64(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 8 <= b.size());
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | b[off + i];
  return v;
}
uint32_t Le32(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 4 <= b.size());
  return uint32_t{b[off]} | uint32_t{b[off + 1]} << 8 | uint32_t{b[off + 2]} << 16 |
         uint32_t{b[off + 3]} << 24;
}
void PutLe(std::vector<uint8_t>* b, uint64_t off, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) (*b)[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
std::vector<uint8_t> Le32Bytes(uint32_t v) {
  std::vector<uint8_t> out(4);
  PutLe(&out, 0, v, 4);
  return out;
}
uint64_t RoundUp(uint64_t v) { return (v + 511) / 512 * 512; }

std::string Describe(const MetadataUnit& u) {
  return fmt::format("{}@{}+{}{}", UnitKindName(u.kind), u.offset, u.length,
                     u.moves_map ? " moves" : "");
}

std::vector<std::string> Describe(const std::vector<MetadataUnit>& units) {
  std::vector<std::string> out;
  for (const MetadataUnit& u : units) out.push_back(Describe(u));
  std::sort(out.begin(), out.end());
  return out;
}

void AddPieces(std::vector<MetadataUnit>* units, uint64_t offset, uint64_t length, UnitKind kind,
               bool moves) {
  for (uint64_t done = 0; done < length; done += kPiece) {
    units->push_back(
        {offset + done, static_cast<uint32_t>(std::min(kPiece, length - done)), 0, kind, moves});
  }
}

ParsedImage ParseFile(const std::string& path) {
  auto file = OpenLocalImage(path);
  ParsedImage parsed;
  Status st = kParser.Parse(*file, ParseLimits{}, &parsed);
  INFO(st.ToString());
  REQUIRE(st.ok());
  CHECK(parsed.format == "vmdk");
  return parsed;
}

std::vector<std::string> CheckFile(const std::string& path) {
  auto file = OpenLocalImage(path);
  ParsedImage parsed = ParseFile(path);
  std::vector<std::string> problems;
  Status st = kParser.Check(*file, parsed, ParseLimits{}, &problems);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return problems;
}

bool Mentions(const std::vector<std::string>& problems, const std::string& needle) {
  for (const std::string& p : problems) {
    if (p.find(needle) != std::string::npos) return true;
  }
  return false;
}

std::string Joined(const std::vector<std::string>& v) {
  return fmt::format("{}", fmt::join(v, "\n"));
}

// The sparse header's fields (Virtual Disk Format 1.1, "Hosted Sparse Extent Header").
struct Header {
  uint32_t flags, gtes;
  uint64_t capacity, grain, desc, desc_size, rgd, gd;
  uint64_t gd_entries() const { return (capacity + grain * gtes - 1) / (grain * gtes); }
  uint64_t gt_bytes() const { return RoundUp(uint64_t{gtes} * 4); }
};

Header ReadHeader(const std::vector<uint8_t>& b, uint64_t at = 0) {
  REQUIRE(std::string(b.begin() + at, b.begin() + at + 4) == "KDMV");
  return {Le32(b, at + 8),  Le32(b, at + 44), Le64(b, at + 12), Le64(b, at + 20),
          Le64(b, at + 28), Le64(b, at + 36), Le64(b, at + 48), Le64(b, at + 56)};
}

// Header, descriptor, grain directories and their grain tables, from the header's own fields.
std::vector<MetadataUnit> SparseUnits(const std::vector<uint8_t>& b, const Header& h,
                                      bool markers = false) {
  std::vector<MetadataUnit> units = {{0, 512, 0, UnitKind::kHeader, true}};
  if (h.desc != 0) AddPieces(&units, h.desc * 512, h.desc_size * 512, UnitKind::kDescriptor, true);
  std::vector<uint64_t> dirs = {h.gd};
  if ((h.flags & kRedundantFlag) != 0 && h.rgd != 0) dirs.push_back(h.rgd);
  for (uint64_t gd : dirs) {
    AddPieces(&units, gd * 512, RoundUp(h.gd_entries() * 4), UnitKind::kGrainDirectory, true);
    if (markers) units.push_back({gd * 512 - 512, 512, 0, UnitKind::kMarker, false});
    for (uint64_t i = 0; i < h.gd_entries(); ++i) {
      const uint64_t gt = Le32(b, gd * 512 + 4 * i);
      if (gt == 0) continue;
      units.push_back(
          {gt * 512, static_cast<uint32_t>(h.gt_bytes()), 0, UnitKind::kGrainTable, false});
      if (markers) units.push_back({gt * 512 - 512, 512, 0, UnitKind::kMarker, false});
    }
  }
  return units;
}

std::string MakeSparse(const ScratchDir& dir, const std::string& name = "sparse.vmdk") {
  const std::string path = dir.File(name);
  Run("qemu-img create -q -f vmdk " + path + " 64M");
  Run("qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 10M 3M' -c 'write -P 0xcc 40M 64k' " +
      path);
  return path;
}

std::vector<uint8_t> Marker(uint64_t sectors, uint32_t type) {
  std::vector<uint8_t> m(512, 0);
  PutLe(&m, 0, sectors, 8);
  PutLe(&m, 12, type, 4);
  return m;
}

// Rewrites qemu's streamOptimized output (grain directory in front) into the layout the VMware
// spec gives streams: gdOffset = GD_AT_END in the header; grain tables and the grain directory
// after the grains, each behind its marker; then footer marker, footer, end-of-stream marker.
void MakeGdAtEnd(const std::string& src, const std::string& dst) {
  std::vector<uint8_t> b = ReadFile(src);
  const Header h = ReadHeader(b);
  REQUIRE(b.size() >= 1024);
  REQUIRE(std::all_of(b.end() - 512, b.end(), [](uint8_t c) { return c == 0; }));  // EOS
  b.erase(b.end() - 512, b.end());
  std::vector<uint8_t> gd(RoundUp(h.gd_entries() * 4), 0);
  for (uint64_t i = 0; i < h.gd_entries(); ++i) {
    const uint64_t old = Le32(b, h.gd * 512 + 4 * i);
    if (old == 0) continue;
    const std::vector<uint8_t> marker = Marker(h.gt_bytes() / 512, 1);
    b.insert(b.end(), marker.begin(), marker.end());
    PutLe(&gd, 4 * i, b.size() / 512, 4);
    const std::vector<uint8_t> gt(b.begin() + old * 512, b.begin() + old * 512 + h.gt_bytes());
    b.insert(b.end(), gt.begin(), gt.end());
    std::fill_n(b.begin() + old * 512, h.gt_bytes(), 0);  // only the new copy can be read
  }
  for (uint64_t dir : {h.gd, h.rgd}) std::fill_n(b.begin() + dir * 512, gd.size(), 0);
  const std::vector<uint8_t> gd_marker = Marker(gd.size() / 512, 2);
  b.insert(b.end(), gd_marker.begin(), gd_marker.end());
  const uint64_t gd_sector = b.size() / 512;
  b.insert(b.end(), gd.begin(), gd.end());
  std::vector<uint8_t> header(b.begin(), b.begin() + 512);
  PutLe(&header, 8, h.flags & ~kRedundantFlag, 4);
  PutLe(&header, 48, 0, 8);
  PutLe(&header, 56, gd_sector, 8);
  const std::vector<uint8_t> footer_marker = Marker(1, 3), eos(512, 0);
  b.insert(b.end(), footer_marker.begin(), footer_marker.end());
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), eos.begin(), eos.end());
  PutLe(&header, 56, ~0ull, 8);
  std::copy(header.begin(), header.end(), b.begin());
  Run("truncate -s 0 " + dst);
  WriteFileAt(dst, 0, b);
}

TEST_CASE("monolithicSparse VMDK maps header, descriptor, both directories and tables", "[vmdk]") {
  ScratchDir dir;
  const std::string path = MakeSparse(dir);
  Run("qemu-img check -q " + path);
  auto file = OpenLocalImage(path);
  CHECK(kParser.Probe(*file));
  REQUIRE(DetectFormat(*file) != nullptr);
  CHECK(DetectFormat(*file)->Name() == "vmdk");
  const std::vector<uint8_t> b = ReadFile(path);
  const Header h = ReadHeader(b);
  REQUIRE((h.flags & kRedundantFlag) != 0);
  ParsedImage p = ParseFile(path);
  INFO(Joined(p.problems));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == Describe(SparseUnits(b, h)));
  CHECK(p.virtual_size == h.capacity * 512);
  CHECK(p.cluster_size == h.grain * 512);
  CHECK(CheckFile(path).empty());
}

TEST_CASE("streamOptimized VMDK, as qemu writes it and with the directory at the end", "[vmdk]") {
  ScratchDir dir;
  const std::string sparse = MakeSparse(dir), stream = dir.File("stream.vmdk");
  Run("qemu-img convert -O vmdk -o subformat=streamOptimized " + sparse + " " + stream);
  const std::vector<uint8_t> b = ReadFile(stream);
  ParsedImage p = ParseFile(stream);
  INFO(Joined(p.problems));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == Describe(SparseUnits(b, ReadHeader(b))));
  CHECK(CheckFile(stream).empty());

  const std::string at_end = dir.File("at_end.vmdk");
  MakeGdAtEnd(stream, at_end);
  Run("qemu-img compare -q " + sparse + " " + at_end);  // qemu reads the rewritten stream alike
  const std::vector<uint8_t> e = ReadFile(at_end);
  const uint64_t end = e.size();
  REQUIRE(Le64(e, 56) == ~0ull);
  const Header footer = ReadHeader(e, end - 1024);
  std::vector<MetadataUnit> units = SparseUnits(e, footer, true);
  units.push_back({end - 1536, 512, 0, UnitKind::kMarker, false});
  units.push_back({end - 1024, 512, 0, UnitKind::kHeader, true});
  units.push_back({end - 512, 512, 0, UnitKind::kMarker, false});
  ParsedImage q = ParseFile(at_end);
  INFO(Joined(q.problems));
  CHECK(q.valid());
  CHECK(Describe(q.map.units()) == Describe(units));
  CHECK(CheckFile(at_end).empty());

  SECTION("footer marker") {
    WriteFileAt(at_end, end - 1536 + 12, Le32Bytes(7));
    CHECK(Mentions(ParseFile(at_end).problems,
                   fmt::format("VMDK footer at offset {}: no footer marker", end - 1024)));
  }
  SECTION("footer magic") {
    WriteFileAt(at_end, end - 1024, {'x'});
    CHECK(Mentions(ParseFile(at_end).problems, "no \"KDMV\" magic"));
  }
  SECTION("end-of-stream marker") {
    WriteFileAt(at_end, end - 512 + 12, Le32Bytes(2));
    CHECK(Mentions(ParseFile(at_end).problems, "no end-of-stream marker"));
  }
}

TEST_CASE("VMDK descriptor files: one unit, extents in the notes", "[vmdk]") {
  ScratchDir dir;
  const std::string flat = dir.File("flat.vmdk"), split = dir.File("split.vmdk");
  Run("qemu-img create -q -f vmdk -o subformat=monolithicFlat " + flat + " 16M");
  Run("qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse " + split + " 5G");
  Run("qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 3G 1M' " + split);

  ParsedImage f = ParseFile(flat);
  INFO(Joined(f.problems));
  CHECK(f.valid());
  CHECK(Describe(f.map.units()) == Describe({{0, static_cast<uint32_t>(ReadFile(flat).size()), 0,
                                              UnitKind::kDescriptor, true}}));
  CHECK(f.notes == std::vector<std::string>{"extent: flat-flat.vmdk"});
  CHECK(f.virtual_size == 16u << 20);
  CHECK(DetectFormat(*OpenLocalImage(dir.File("flat-flat.vmdk"))) == nullptr);

  ParsedImage s = ParseFile(split);
  CHECK(s.valid());
  CHECK(s.virtual_size == 5ull << 30);
  REQUIRE(s.notes.size() == 3);
  for (const std::string& note : s.notes) {
    REQUIRE(note.rfind("extent: ", 0) == 0);
    const std::string extent = dir.File(note.substr(8));
    INFO(extent);
    const std::vector<uint8_t> b = ReadFile(extent);
    ParsedImage e = ParseFile(extent);
    INFO(Joined(e.problems));
    CHECK(e.valid());
    CHECK(Describe(e.map.units()) == Describe(SparseUnits(b, ReadHeader(b))));
    CHECK(CheckFile(extent).empty());
  }

  SECTION("a descriptor without extents") {
    Run("printf '# Disk DescriptorFile\\nversion=1\\n' > " + flat);
    CHECK(Mentions(ParseFile(flat).problems, "declares no extents"));
  }
}

TEST_CASE("VMDK damage is reported, naming the copy", "[vmdk]") {
  ScratchDir dir;
  const std::string path = MakeSparse(dir);
  const std::vector<uint8_t> b = ReadFile(path);
  const Header h = ReadHeader(b);
  const uint64_t gd = h.gd * 512, rgd = h.rgd * 512;
  const uint64_t gt = uint64_t{Le32(b, gd)} * 512, rgt = uint64_t{Le32(b, rgd)} * 512;
  REQUIRE(Le32(b, gt) != 0);  // the write at 0 allocated grain 0
  REQUIRE(Le32(b, gt + 4) != 0);

  SECTION("magic") {
    WriteFileAt(path, 0, {'x'});
    CHECK_FALSE(kParser.Probe(*OpenLocalImage(path)));
    CHECK(Mentions(ParseFile(path).problems, "KDMV"));
  }
  SECTION("version") {
    WriteFileAt(path, 4, Le32Bytes(4));
    CHECK(Mentions(ParseFile(path).problems, "VMDK sparse header at offset 0: version 4"));
  }
  SECTION("newline test characters") {
    WriteFileAt(path, 75, {'\n'});
    CHECK(Mentions(ParseFile(path).problems, "text mode"));
  }
  SECTION("primary grain directory entry lost") {
    WriteFileAt(path, gd, Le32Bytes(0));
    CHECK(Mentions(ParseFile(path).problems, "the primary copy has lost a grain table"));
  }
  SECTION("redundant grain directory entry lost") {
    WriteFileAt(path, rgd, Le32Bytes(0));
    CHECK(Mentions(ParseFile(path).problems, "the redundant copy has lost a grain table"));
  }
  SECTION("grain directory entry past the end") {
    WriteFileAt(path, gd + 4, Le32Bytes(0x7FFFFFFF));
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VMDK grain directory entry 1 at offset {}", gd + 4)));
  }
  SECTION("primary grain table entry past the end: Check names the primary") {
    WriteFileAt(path, gt, Le32Bytes(0x7FFFFFF0));
    CHECK(ParseFile(path).valid());
    const std::vector<std::string> problems = CheckFile(path);
    INFO(Joined(problems));
    CHECK(Mentions(problems, fmt::format("VMDK grain table 0 at offset {}: entry 0", gt)));
    CHECK(Mentions(problems, "the primary copy has 1 entries pointing outside"));
  }
  SECTION("redundant grain table entry past the end: Check names the redundant copy") {
    WriteFileAt(path, rgt, Le32Bytes(0x7FFFFFF0));
    const std::vector<std::string> problems = CheckFile(path);
    INFO(Joined(problems));
    CHECK(Mentions(problems, "the redundant copy has 1 entries pointing outside"));
  }
  SECTION("two grains in one place, in both copies") {
    for (uint64_t t : {gt, rgt}) WriteFileAt(path, t + 4, Le32Bytes(Le32(b, gt)));
    const std::vector<std::string> problems = CheckFile(path);
    INFO(Joined(problems));
    CHECK(Mentions(problems, "overlap"));
    CHECK_FALSE(Mentions(problems, "differs"));
  }
  SECTION("a grain over the descriptor") {
    for (uint64_t t : {gt, rgt}) WriteFileAt(path, t, Le32Bytes(static_cast<uint32_t>(h.desc)));
    CHECK(Mentions(CheckFile(path), "inside the descriptor"));
  }
  SECTION("truncated to the header") {
    Run("truncate -s 4096 " + path);
    CHECK(!ParseFile(path).valid());
  }
}

TEST_CASE("VMDK parser survives short files", "[vmdk]") {
  for (size_t n : {0, 4, 21, 512, 1024}) {
    std::vector<uint8_t> bytes(n, 0);
    if (n >= 4) std::copy_n("KDMV", 4, bytes.begin());
    MemoryImageFile f(std::move(bytes));
    ParsedImage p;
    REQUIRE(kParser.Parse(f, ParseLimits{}, &p).ok());
    CHECK(!p.valid());
  }
}

}  // namespace
}  // namespace vmetafs::store
