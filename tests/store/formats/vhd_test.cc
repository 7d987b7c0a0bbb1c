// VHD parser tests: images made by qemu-img (-f vpc) and filled by qemu-io at test time, units
// recomputed here from the footer and dynamic header fields, damage poked at offsets read from
// them.
#include "store/formats/vhd.h"

#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::Be32At;
using testing::Be64At;
using testing::OpenLocalImage;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;
using testing::WriteFileAt;

const VhdParser kParser;
constexpr uint64_t kPiece = 65536;

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
  CHECK(parsed.format == "vhd");
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

void Poke32(const std::string& path, uint64_t offset, uint32_t v) {
  WriteFileAt(path, offset,
              {static_cast<uint8_t>(v >> 24), static_cast<uint8_t>(v >> 16),
               static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v)});
}

void Flip(const std::string& path, uint64_t offset) {
  const std::vector<uint8_t> b = ReadFile(path);
  REQUIRE(offset < b.size());
  WriteFileAt(path, offset, {static_cast<uint8_t>(b[offset] ^ 0x5A)});
}

// The units of a dynamic VHD, from its footer copy and dynamic header (VHD spec).
std::vector<std::string> ExpectedDynamicUnits(const std::vector<uint8_t>& b) {
  std::vector<MetadataUnit> units;
  units.push_back({0, 512, 0, UnitKind::kFooter, true});
  units.push_back({b.size() - 512, 512, 0, UnitKind::kFooter, true});
  const uint64_t header = Be64At(b, 16);
  units.push_back({header, 1024, 0, UnitKind::kHeader, true});
  const uint64_t bat = Be64At(b, header + 16);
  const uint32_t entries = Be32At(b, header + 28), block = Be32At(b, header + 32);
  AddPieces(&units, bat, (uint64_t{entries} * 4 + 511) / 512 * 512, UnitKind::kBat, true);
  const uint32_t bitmap = (block / 4096 + 511) / 512 * 512;
  for (uint32_t i = 0; i < entries; ++i) {
    const uint32_t e = Be32At(b, bat + 4 * i);
    if (e != 0xFFFFFFFF)
      units.push_back({uint64_t{e} * 512, bitmap, 0, UnitKind::kSectorBitmap, false});
  }
  return Describe(units);
}

std::string MakeDynamic(const ScratchDir& dir, const std::string& name = "dyn.vhd") {
  const std::string path = dir.File(name);
  Run("qemu-img create -q -f vpc -o subformat=dynamic " + path + " 64M");
  Run("qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 10M 3M' -c 'write -P 0xcc 40M 64k' " +
      path);
  return path;
}

// The index of the first allocated BAT entry, and the BAT's offset.
std::pair<uint32_t, uint64_t> FirstAllocated(const std::vector<uint8_t>& b) {
  const uint64_t header = Be64At(b, 16), bat = Be64At(b, header + 16);
  for (uint32_t i = 0; i < Be32At(b, header + 28); ++i) {
    if (Be32At(b, bat + 4 * i) != 0xFFFFFFFF) return {i, bat};
  }
  FAIL("no allocated block");
  return {0, 0};
}

TEST_CASE("dynamic VHD maps footer copies, header, BAT and bitmaps, and checks clean", "[vhd]") {
  ScratchDir dir;
  const std::string path = MakeDynamic(dir);
  Run("qemu-img info " + path);  // qemu opens it (vpc has no check)
  auto file = OpenLocalImage(path);
  CHECK(kParser.Probe(*file));
  REQUIRE(DetectFormat(*file) != nullptr);
  CHECK(DetectFormat(*file)->Name() == "vhd");
  const std::vector<uint8_t> b = ReadFile(path);
  ParsedImage p = ParseFile(path);
  INFO(Joined(p.problems));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == ExpectedDynamicUnits(b));
  CHECK(p.virtual_size == Be64At(b, 48));
  CHECK(p.cluster_size == Be32At(b, Be64At(b, 16) + 32));
  CHECK(p.map.Touching(0, 0, b.size()).size() == p.map.size());
  CHECK(CheckFile(path).empty());
  CHECK(kParser.MapDependsOnFileSize());
}

TEST_CASE("dynamic VHD footer follows the end of the file as it grows", "[vhd]") {
  ScratchDir dir;
  const std::string path = MakeDynamic(dir);
  const uint64_t before = ReadFile(path).size();
  Run("qemu-io -c 'write -P 0xdd 50M 4k' " + path);
  const std::vector<uint8_t> b = ReadFile(path);
  REQUIRE(b.size() > before);
  ParsedImage p = ParseFile(path);
  CHECK(p.valid());
  const MetadataUnit* footer = p.map.Find(0, b.size() - 512);
  REQUIRE(footer != nullptr);
  CHECK(footer->kind == UnitKind::kFooter);
  // The old footer's place now holds the new block's sector bitmap.
  const MetadataUnit* old = p.map.Find(0, before - 512);
  REQUIRE(old != nullptr);
  CHECK(old->kind == UnitKind::kSectorBitmap);
  CHECK(Describe(p.map.units()) == ExpectedDynamicUnits(b));
}

TEST_CASE("fixed VHD is its footer only; probes before raw even with a GPT inside", "[vhd]") {
  ScratchDir dir;
  const std::string raw = dir.File("disk.img"), path = dir.File("fixed.vhd");
  Run("truncate -s 16M " + raw);
  Run("sgdisk -n 1:2048:+1M " + raw);
  Run("qemu-img convert -O vpc -o subformat=fixed " + raw + " " + path);
  auto file = OpenLocalImage(path);
  REQUIRE(DetectFormat(*file) != nullptr);
  CHECK(DetectFormat(*file)->Name() == "vhd");
  const std::vector<uint8_t> b = ReadFile(path);
  ParsedImage p = ParseFile(path);
  INFO(Joined(p.problems));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == Describe({{b.size() - 512, 512, 0, UnitKind::kFooter, true}}));
  CHECK(p.virtual_size == Be64At(b, b.size() - 512 + 48));
  CHECK(CheckFile(path).empty());

  SECTION("footer checksum") {
    Flip(path, b.size() - 512 + 40);
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VHD footer at offset {}: checksum mismatch", b.size() - 512)));
  }
  SECTION("footer cookie: no longer a VHD") {
    WriteFileAt(path, b.size() - 512, {'x'});
    CHECK_FALSE(kParser.Probe(*OpenLocalImage(path)));
  }
  SECTION("511-byte footer of old Virtual PC images") {
    Run("truncate -s -1 " + path);
    ParsedImage q = ParseFile(path);
    INFO(Joined(q.problems));
    CHECK(q.valid());
    CHECK(Describe(q.map.units()) == Describe({{b.size() - 512, 511, 0, UnitKind::kFooter, true}}));
  }
}

TEST_CASE("dynamic VHD damage is reported, naming the structure", "[vhd]") {
  ScratchDir dir;
  const std::string path = MakeDynamic(dir);
  const std::vector<uint8_t> b = ReadFile(path);
  const uint64_t end_footer = b.size() - 512, header = Be64At(b, 16);
  const auto [index, bat] = FirstAllocated(b);

  SECTION("footer at the end") {
    Flip(path, end_footer + 40);
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems,
                   fmt::format("VHD footer at offset {}: checksum mismatch", end_footer)));
    CHECK(Mentions(p.problems, "copy at offset 0 valid"));
    CHECK(Describe(p.map.units()) == ExpectedDynamicUnits(b));
  }
  SECTION("footer copy cookie: the end footer still identifies the image") {
    WriteFileAt(path, 0, {'x'});
    CHECK(kParser.Probe(*OpenLocalImage(path)));
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "VHD footer copy at offset 0: no \"conectix\" cookie"));
    CHECK(Mentions(p.problems, fmt::format("footer at offset {} valid", end_footer)));
    CHECK(Describe(p.map.units()) == ExpectedDynamicUnits(b));
  }
  SECTION("footer copy checksum") {
    Flip(path, 40);
    CHECK(Mentions(ParseFile(path).problems, "VHD footer copy at offset 0: checksum mismatch"));
  }
  SECTION("dynamic header cookie") {
    WriteFileAt(path, header, {'x'});
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VHD dynamic disk header at offset {}: no \"cxsparse\"", header)));
  }
  SECTION("dynamic header checksum") {
    Flip(path, header + 100);
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VHD dynamic disk header at offset {}: checksum mismatch", header)));
  }
  SECTION("BAT entry past the end of the file") {
    Poke32(path, bat + 4 * index, 0x7FFFFFF0);
    CHECK(Mentions(ParseFile(path).problems,
                   fmt::format("VHD BAT entry {} at offset {}", index, bat + 4 * index)));
  }
  SECTION("BAT table offset past the end") {
    std::vector<uint8_t> h(b.begin() + header, b.begin() + header + 1024);
    // Rewrite table_offset and fix the checksum, so only the placement is wrong.
    for (int i = 0; i < 8; ++i) h[16 + i] = 0x7F;
    uint32_t sum = 0;
    for (int i = 0; i < 1024; ++i) sum += (i >= 36 && i < 40) ? 0 : h[i];
    sum = ~sum;
    for (int i = 0; i < 4; ++i) h[36 + i] = static_cast<uint8_t>(sum >> (24 - 8 * i));
    WriteFileAt(path, header, h);
    CHECK(Mentions(ParseFile(path).problems, "VHD BAT at offset"));
  }
  SECTION("two BAT entries sharing a block: Parse is fine, Check is not") {
    uint32_t other = 0;
    while (other == index || Be32At(b, bat + 4 * other) != 0xFFFFFFFF) ++other;
    Poke32(path, bat + 4 * other, Be32At(b, bat + 4 * index));
    ParsedImage p = ParseFile(path);
    INFO(Joined(p.problems));
    CHECK(p.valid());
    CHECK(Mentions(CheckFile(path), "overlap"));
  }
  SECTION("truncated image") {
    Run("truncate -s 3M " + path);
    ParsedImage p = ParseFile(path);
    CHECK(!p.valid());
  }
}

TEST_CASE("VHD parser survives short and empty files", "[vhd]") {
  for (size_t n : {0, 1, 100, 511, 512, 513, 1536}) {
    MemoryImageFile f(std::vector<uint8_t>(n, 0));
    ParsedImage p;
    REQUIRE(kParser.Parse(f, ParseLimits{}, &p).ok());
    CHECK(!p.valid());
    CHECK_FALSE(kParser.Probe(f));
  }
}

}  // namespace
}  // namespace vmetafs::store
