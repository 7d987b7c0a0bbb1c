// VHDX parser tests: images made by qemu-img (-f vhdx) and filled by qemu-io at test time, units
// recomputed here from the headers and region table, damage poked at offsets read from them.
#include "store/formats/vhdx.h"

#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "store/formats/crc.h"
#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::OpenLocalImage;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;
using testing::WriteFileAt;

const VhdxParser kParser;
constexpr uint64_t kPiece = 65536;
constexpr uint64_t kHeaders[2] = {64 * 1024, 128 * 1024};
constexpr uint64_t kRegionTables[2] = {192 * 1024, 256 * 1024};
// The first field of the GUIDs the test looks up (MS-VHDX 2.3.2, 2.6.2): BAT region, file
// parameters, virtual disk size.
constexpr uint32_t kBatGuidData1 = 0x2DC27766;
constexpr uint32_t kFileParametersData1 = 0xCAA16737;
constexpr uint32_t kVirtualDiskSizeData1 = 0x2FA54224;

uint64_t Le64(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 8 <= b.size());
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | b[off + i];
  return v;
}
uint32_t Le32(const std::vector<uint8_t>& b, uint64_t off) {
  return static_cast<uint32_t>(Le64(b, off) & 0xFFFFFFFFu);
}
std::vector<uint8_t> LeBytes(uint64_t v, int n) {
  std::vector<uint8_t> out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
  return out;
}

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
  CHECK(parsed.format == "vhdx");
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

void Flip(const std::string& path, uint64_t offset) {
  const std::vector<uint8_t> b = ReadFile(path);
  REQUIRE(offset < b.size());
  WriteFileAt(path, offset, {static_cast<uint8_t>(b[offset] ^ 0x5A)});
}

// What the test reads of an image without the parser (MS-VHDX 2.2, 2.3, 2.6).
struct Layout {
  uint64_t current_header = 0, log_offset = 0, log_length = 0;
  uint64_t bat_offset = 0, bat_length = 0, meta_offset = 0, meta_length = 0;
  uint32_t block_size = 0;
  uint64_t virtual_size = 0;
};

Layout ReadLayout(const std::vector<uint8_t>& b) {
  Layout l;
  l.current_header =
      Le64(b, kHeaders[0] + 8) > Le64(b, kHeaders[1] + 8) ? kHeaders[0] : kHeaders[1];
  l.log_length = Le32(b, l.current_header + 68);
  l.log_offset = Le64(b, l.current_header + 72);
  const uint64_t rt = kRegionTables[0];
  REQUIRE(Le32(b, rt + 8) == 2);
  for (int i = 0; i < 2; ++i) {
    const uint64_t e = rt + 16 + 32 * i;
    (Le32(b, e) == kBatGuidData1 ? l.bat_offset : l.meta_offset) = Le64(b, e + 16);
    (Le32(b, e) == kBatGuidData1 ? l.bat_length : l.meta_length) = Le32(b, e + 24);
  }
  for (uint32_t i = 0; i < Le32(b, l.meta_offset + 8) >> 16; ++i) {
    const uint64_t e = l.meta_offset + 32 + 32 * i;
    const uint64_t item = l.meta_offset + Le32(b, e + 16);
    if (Le32(b, e) == kFileParametersData1) l.block_size = Le32(b, item);
    if (Le32(b, e) == kVirtualDiskSizeData1) l.virtual_size = Le64(b, item);
  }
  REQUIRE(l.block_size != 0);
  REQUIRE(l.virtual_size != 0);
  return l;
}

std::vector<std::string> ExpectedUnits(const Layout& l) {
  std::vector<MetadataUnit> units = {{0, 65536, 0, UnitKind::kFileIdentifier, false}};
  for (uint64_t h : kHeaders) units.push_back({h, 4096, 0, UnitKind::kHeader, true});
  for (uint64_t t : kRegionTables) units.push_back({t, 65536, 0, UnitKind::kRegionTable, true});
  AddPieces(&units, l.log_offset, l.log_length, UnitKind::kLog, false);
  AddPieces(&units, l.bat_offset, l.bat_length, UnitKind::kBat, true);
  AddPieces(&units, l.meta_offset, l.meta_length, UnitKind::kMetadataRegion, true);
  return Describe(units);
}

std::string MakeDynamic(const ScratchDir& dir, const std::string& name = "dyn.vhdx") {
  const std::string path = dir.File(name);
  Run("qemu-img create -q -f vhdx " + path + " 64M");
  Run("qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 20M 3M' -c 'write -P 0xcc 40M 64k' " +
      path);
  return path;
}

// Rewrites header `h` with `log_guid` and a fresh checksum, as a writer that crashed mid-log
// leaves it.
void SetLogGuid(const std::string& path, uint64_t h, const std::vector<uint8_t>& log_guid) {
  std::vector<uint8_t> b = ReadFile(path);
  std::vector<uint8_t> header(b.begin() + h, b.begin() + h + 4096);
  std::copy(log_guid.begin(), log_guid.end(), header.begin() + 48);
  const std::vector<uint8_t> crc = LeBytes(Crc32c(header, 4), 4);
  std::copy(crc.begin(), crc.end(), header.begin() + 4);
  WriteFileAt(path, h, header);
}

TEST_CASE("dynamic and fixed VHDX map their regions and check clean", "[vhdx]") {
  ScratchDir dir;
  const std::string dynamic = MakeDynamic(dir), fixed = dir.File("fixed.vhdx");
  Run("qemu-img create -q -f vhdx -o subformat=fixed " + fixed + " 32M");
  for (const std::string& path : {dynamic, fixed}) {
    INFO(path);
    Run("qemu-img check -q " + path);
    auto file = OpenLocalImage(path);
    CHECK(kParser.Probe(*file));
    REQUIRE(DetectFormat(*file) != nullptr);
    CHECK(DetectFormat(*file)->Name() == "vhdx");
    const std::vector<uint8_t> b = ReadFile(path);
    const Layout l = ReadLayout(b);
    ParsedImage p = ParseFile(path);
    INFO(Joined(p.problems));
    CHECK(p.valid());
    CHECK(Describe(p.map.units()) == ExpectedUnits(l));
    CHECK(p.virtual_size == l.virtual_size);
    CHECK(p.cluster_size == l.block_size);
    CHECK(CheckFile(path).empty());
  }
}

TEST_CASE("VHDX damage is reported, naming the copy", "[vhdx]") {
  ScratchDir dir;
  const std::string path = MakeDynamic(dir);
  const std::vector<uint8_t> b = ReadFile(path);
  const Layout l = ReadLayout(b);
  const std::vector<std::string> expected = ExpectedUnits(l);
  // The first payload block that is present, and one that is not.
  uint64_t present = 0, absent = 0;
  const uint64_t blocks = (l.virtual_size + l.block_size - 1) / l.block_size;
  REQUIRE(blocks < 512);  // no sector bitmap entries among them at this size
  for (uint64_t i = blocks; i-- > 0;) {
    ((Le64(b, l.bat_offset + 8 * i) & 7) == 6 ? present : absent) = i;
  }
  REQUIRE((Le64(b, l.bat_offset + 8 * present) & 7) == 6);
  REQUIRE((Le64(b, l.bat_offset + 8 * absent) & 7) != 6);

  for (int i = 0; i < 2; ++i) {
    SECTION(fmt::format("header {} checksum", i + 1)) {
      Flip(path, kHeaders[i] + 100);
      ParsedImage p = ParseFile(path);
      CHECK(Mentions(p.problems, fmt::format("VHDX header {} at offset {}: CRC-32C mismatch", i + 1,
                                             kHeaders[i])));
      CHECK(Mentions(p.problems, fmt::format("header {} valid", 2 - i)));
      CHECK(Describe(p.map.units()) == expected);
    }
    SECTION(fmt::format("region table {} checksum", i + 1)) {
      Flip(path, kRegionTables[i] + 20);
      ParsedImage p = ParseFile(path);
      CHECK(Mentions(p.problems, fmt::format("VHDX region table {} at offset {}: CRC-32C mismatch",
                                             i + 1, kRegionTables[i])));
      CHECK(Mentions(p.problems, fmt::format("region table {} valid", 2 - i)));
      CHECK(Describe(p.map.units()) == expected);
    }
  }
  SECTION("both region tables") {
    Flip(path, kRegionTables[0] + 20);
    Flip(path, kRegionTables[1] + 20);
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "damaged too"));
    CHECK(p.map.Find(0, kRegionTables[1]) != nullptr);
  }
  SECTION("file type identifier") {
    WriteFileAt(path, 0, {'x'});
    CHECK_FALSE(kParser.Probe(*OpenLocalImage(path)));
    CHECK(Mentions(ParseFile(path).problems, "VHDX file type identifier at offset 0"));
  }
  SECTION("metadata table signature") {
    WriteFileAt(path, l.meta_offset, {'x'});
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VHDX metadata table at offset {}", l.meta_offset)));
  }
  SECTION("BAT entry past the end of the file") {
    WriteFileAt(path, l.bat_offset + 8 * present, LeBytes((1ull << 40) | 6, 8));
    CHECK(Mentions(ParseFile(path).problems, fmt::format("VHDX BAT entry {} at offset {}", present,
                                                         l.bat_offset + 8 * present)));
  }
  SECTION("two payload blocks in one place: Parse is fine, Check is not") {
    WriteFileAt(path, l.bat_offset + 8 * absent, LeBytes(Le64(b, l.bat_offset + 8 * present), 8));
    ParsedImage p = ParseFile(path);
    INFO(Joined(p.problems));
    CHECK(p.valid());
    CHECK(Mentions(CheckFile(path), "overlap"));
  }
  SECTION("a payload block over the metadata region: Check says so") {
    WriteFileAt(path, l.bat_offset + 8 * present, LeBytes(l.meta_offset | 6, 8));
    CHECK(ParseFile(path).valid());
    CHECK(Mentions(CheckFile(path), "overlaps metadata"));
  }
}

TEST_CASE("VHDX log that needs replay is a note; a damaged entry is a problem", "[vhdx]") {
  ScratchDir dir;
  const std::string path = MakeDynamic(dir);
  std::vector<uint8_t> b = ReadFile(path);
  const Layout l = ReadLayout(b);
  // qemu leaves its last log entries behind and clears the headers' log GUID on close; putting
  // the newest entry's GUID back is the state of a writer that died before the log was applied.
  uint64_t newest = 0, newest_seq = 0;
  for (uint64_t pos = l.log_offset; pos < l.log_offset + l.log_length; pos += 4096) {
    if (std::string(b.begin() + pos, b.begin() + pos + 4) == "loge" &&
        Le64(b, pos + 16) >= newest_seq) {
      newest = pos;
      newest_seq = Le64(b, pos + 16);
    }
  }
  REQUIRE(newest != 0);
  const std::vector<uint8_t> guid(b.begin() + newest + 32, b.begin() + newest + 48);
  for (uint64_t h : kHeaders) SetLogGuid(path, h, guid);
  // qemu agrees the log now needs replaying (it refuses a read-only open).
  CHECK(Run("(qemu-img info " + path + " || true)").find("needs to be replayed") !=
        std::string::npos);

  ParsedImage p = ParseFile(path);
  INFO(Joined(p.problems));
  CHECK(p.valid());
  CHECK(Mentions(p.notes, "is not empty (1 valid entries)"));
  CHECK(Describe(p.map.units()) == ExpectedUnits(l));

  SECTION("damaged log entry") {
    Flip(path, newest + 4096 + 100);  // inside its first data sector
    ParsedImage q = ParseFile(path);
    CHECK(
        Mentions(q.problems, fmt::format("VHDX log entry at offset {}: CRC-32C mismatch", newest)));
  }
  SECTION("a damaged entry of a log that is empty is nobody's concern") {
    for (uint64_t h : kHeaders) SetLogGuid(path, h, std::vector<uint8_t>(16, 0));
    Flip(path, newest + 4096 + 100);
    CHECK(ParseFile(path).valid());
  }
}

TEST_CASE("VHDX parser survives short files", "[vhdx]") {
  for (size_t n : {0, 8, 4096, 320 * 1024, 1 << 20}) {
    std::vector<uint8_t> bytes(n, 0);
    if (n >= 8) std::copy_n("vhdxfile", 8, bytes.begin());
    MemoryImageFile f(std::move(bytes));
    ParsedImage p;
    REQUIRE(kParser.Parse(f, ParseLimits{}, &p).ok());
    CHECK(!p.valid());
  }
}

}  // namespace
}  // namespace vmetafs::store
