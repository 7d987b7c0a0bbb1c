// Raw (MBR/GPT) parser tests: disks partitioned by sgdisk/parted at test time (4096-byte sectors
// through a loop device), units recomputed here from the tables' own fields, damage poked at
// offsets read from them.
#include "store/formats/raw_gpt.h"

#include <fmt/format.h>
#include <unistd.h>

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

const RawGptParser kParser;

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

ParsedImage ParseFile(const std::string& path) {
  auto file = OpenLocalImage(path);
  ParsedImage parsed;
  Status st = kParser.Parse(*file, ParseLimits{}, &parsed);
  INFO(st.ToString());
  REQUIRE(st.ok());
  CHECK(parsed.format == "raw");
  return parsed;
}

bool Mentions(const std::vector<std::string>& problems, const std::string& needle) {
  for (const std::string& p : problems) {
    if (p.find(needle) != std::string::npos) return true;
  }
  return false;
}

std::string Problems(const ParsedImage& p) {
  return fmt::format("{}", fmt::join(p.problems, "\n"));
}

// A GPT copy as its header says, read without the parser.
struct GptCopy {
  uint64_t header_offset, entries_offset, entries_bytes;
};

GptCopy ReadCopy(const std::vector<uint8_t>& b, uint64_t header_offset, uint32_t sector) {
  REQUIRE(std::string(b.begin() + header_offset, b.begin() + header_offset + 8) == "EFI PART");
  const uint64_t bytes = uint64_t{Le32(b, header_offset + 80)} * Le32(b, header_offset + 84);
  return {header_offset, Le64(b, header_offset + 72) * sector,
          (bytes + sector - 1) / sector * sector};
}

// The units a GPT disk should have, from its own headers.
std::vector<std::string> ExpectedGptUnits(const std::vector<uint8_t>& b, uint32_t sector) {
  const GptCopy primary = ReadCopy(b, sector, sector);
  const GptCopy backup = ReadCopy(b, Le64(b, sector + 32) * sector, sector);
  std::vector<MetadataUnit> units = {
      {0, 512, 0, UnitKind::kMbr, true},
      {primary.header_offset, sector, 0, UnitKind::kGptHeader, true},
      {backup.header_offset, sector, 0, UnitKind::kGptHeader, true},
  };
  for (const GptCopy& c : {primary, backup}) {
    for (uint64_t done = 0; done < c.entries_bytes; done += 65536) {
      units.push_back({c.entries_offset + done,
                       static_cast<uint32_t>(std::min<uint64_t>(65536, c.entries_bytes - done)), 0,
                       UnitKind::kGptEntries, true});
    }
  }
  return Describe(units);
}

void Poke(const std::string& path, uint64_t offset, std::vector<uint8_t> bytes) {
  WriteFileAt(path, offset, bytes);
}

// Flips one byte: whatever it held, it now holds something else.
void Flip(const std::string& path, uint64_t offset) {
  const std::vector<uint8_t> b = ReadFile(path);
  REQUIRE(offset < b.size());
  Poke(path, offset, {static_cast<uint8_t>(b[offset] ^ 0x5A)});
}

std::string MakeGpt512(const ScratchDir& dir, const std::string& name = "disk.img") {
  const std::string path = dir.File(name);
  Run("truncate -s 32M " + path);
  Run("sgdisk -n 1:2048:+1M -n 2:0:0 -c 1:first -c 2:second " + path);
  return path;
}

// A loop device with 4096-byte logical sectors over `path`, detached on destruction.
class LoopDevice {
 public:
  explicit LoopDevice(const std::string& path) {
    FILE* p =
        popen(("losetup --find --show --sector-size 4096 " + path + " 2>/dev/null").c_str(), "r");
    char buf[256] = {};
    if (p != nullptr) {
      if (fgets(buf, sizeof(buf), p) != nullptr) device_ = buf;
      if (pclose(p) != 0) device_.clear();
    }
    while (!device_.empty() && device_.back() == '\n') device_.pop_back();
  }
  ~LoopDevice() {
    if (!device_.empty()) Run("losetup -d " + device_);
  }
  const std::string& device() const { return device_; }

 private:
  std::string device_;
};

TEST_CASE("CRC32 and CRC32C match their check values", "[raw]") {
  const std::string text = "123456789";
  const std::vector<uint8_t> b(text.begin(), text.end());
  CHECK(Crc32(b) == 0xCBF43926u);
  CHECK(Crc32c(b) == 0xE3069283u);
  std::vector<uint8_t> zeroed = b;
  for (size_t i = 2; i < 6; ++i) zeroed[i] = 0;
  CHECK(Crc32(b, 2) == Crc32(zeroed));
  CHECK(Crc32c(b, 2) == Crc32c(zeroed));
  CHECK(Crc32(b, 2) != Crc32(b));
}

TEST_CASE("raw GPT disk with 512-byte sectors maps both copies and checks clean", "[raw]") {
  ScratchDir dir;
  const std::string path = MakeGpt512(dir);
  auto file = OpenLocalImage(path);
  CHECK(kParser.Probe(*file));
  const FormatParser* detected = DetectFormat(*file);
  REQUIRE(detected != nullptr);
  CHECK(detected->Name() == "raw");
  ParsedImage p = ParseFile(path);
  INFO(Problems(p));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == ExpectedGptUnits(ReadFile(path), 512));
  CHECK(p.virtual_size == 32u << 20);
  std::vector<std::string> problems;
  REQUIRE(kParser.Check(*file, p, ParseLimits{}, &problems).ok());
  CHECK(problems.empty());
}

TEST_CASE("raw GPT disk made by parted parses valid", "[raw]") {
  ScratchDir dir;
  const std::string path = dir.File("parted.img");
  Run("truncate -s 8M " + path);
  Run("parted -s " + path + " mklabel gpt mkpart p 1MiB 2MiB");
  ParsedImage p = ParseFile(path);
  INFO(Problems(p));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == ExpectedGptUnits(ReadFile(path), 512));
}

TEST_CASE("raw GPT damage names the copy and keeps both locations", "[raw]") {
  ScratchDir dir;
  const std::string path = MakeGpt512(dir);
  const std::vector<uint8_t> b = ReadFile(path);
  const std::vector<std::string> expected = ExpectedGptUnits(b, 512);
  const uint64_t backup = Le64(b, 512 + 32) * 512;
  REQUIRE(backup == b.size() - 512);

  SECTION("primary header CRC") {
    Flip(path, 512 + 40);  // FirstUsableLBA
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "primary GPT header at offset 512: CRC32 mismatch"));
    CHECK(Mentions(p.problems, "backup valid"));
    CHECK(Describe(p.map.units()) == expected);
  }
  SECTION("primary header signature: still probed by the protective MBR") {
    Poke(path, 512, {0, 0, 0, 0, 0, 0, 0, 0});
    CHECK(kParser.Probe(*OpenLocalImage(path)));
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "primary GPT header at offset 512: no \"EFI PART\" signature"));
    CHECK(Describe(p.map.units()) == expected);
  }
  SECTION("backup header CRC") {
    Flip(path, backup + 40);
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems,
                   fmt::format("backup GPT header at offset {}: CRC32 mismatch", backup)));
    CHECK(Mentions(p.problems, "primary valid"));
    CHECK(Describe(p.map.units()) == expected);
  }
  SECTION("primary entry array") {
    Flip(path, Le64(b, 512 + 72) * 512 + 56);  // the first partition's name
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "primary GPT partition entry array"));
    CHECK(Mentions(p.problems, "CRC32 mismatch"));
    CHECK(Mentions(p.problems, "backup valid"));
    CHECK(Describe(p.map.units()) == expected);
  }
  SECTION("backup entry array") {
    Flip(path, Le64(b, backup + 72) * 512 + 56);
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "backup GPT partition entry array"));
    CHECK(Mentions(p.problems, "primary valid"));
    CHECK(Describe(p.map.units()) == expected);
  }
  SECTION("both headers gone, protective MBR left") {
    Poke(path, 512, {0, 0, 0, 0, 0, 0, 0, 0});
    Poke(path, backup, {0, 0, 0, 0, 0, 0, 0, 0});
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "protective MBR"));
  }
  SECTION("protective MBR signature") {
    Poke(path, 510, {0, 0});
    ParsedImage p = ParseFile(path);
    CHECK(Mentions(p.problems, "protective MBR at offset 0 has no 0x55AA signature"));
  }
  SECTION("file grown: the backup is no longer at the last LBA") {
    Run("truncate -s +1M " + path);
    ParsedImage p = ParseFile(path);
    CHECK(p.valid());  // a grown disk is legitimate: noted, not a problem
    CHECK(Mentions(p.notes, "is not at the last LBA"));
    CHECK(Describe(p.map.units()) == expected);  // the backup stays where the primary says
  }
  SECTION("truncated: primary points past the end, backup location derived from the size") {
    Run("truncate -s 16M " + path);
    ParsedImage p = ParseFile(path);
    CHECK(!p.valid());
    CHECK(p.map.Find(0, (16u << 20) - 512) != nullptr);
  }
}

TEST_CASE("raw GPT disk with 4096-byte sectors", "[raw]") {
  ScratchDir dir;
  const std::string path = dir.File("disk4k.img");
  Run("truncate -s 64M " + path);
  {
    LoopDevice loop(path);
    if (loop.device().empty()) {
      WARN("no loop device with 4096-byte sectors here; skipping");
      return;
    }
    Run("sgdisk -n 1:0:+1M -n 2:0:0 " + loop.device());
  }
  const std::vector<uint8_t> b = ReadFile(path);
  REQUIRE(std::string(b.begin() + 4096, b.begin() + 4104) == "EFI PART");
  ParsedImage p = ParseFile(path);
  INFO(Problems(p));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == ExpectedGptUnits(b, 4096));
  CHECK(p.map.Find(0, b.size() - 4096) != nullptr);

  SECTION("primary damaged: backup found at the last 4096-byte LBA") {
    Poke(path, 4096, {0, 0, 0, 0, 0, 0, 0, 0});
    ParsedImage q = ParseFile(path);
    CHECK(Mentions(q.problems, "primary GPT header at offset 4096"));
    CHECK(Mentions(q.problems, "backup valid"));
    CHECK(Describe(q.map.units()) == ExpectedGptUnits(b, 4096));
  }
}

TEST_CASE("raw MBR disk with logical partitions maps the EBR chain", "[raw]") {
  ScratchDir dir;
  const std::string path = dir.File("mbr.img");
  Run("truncate -s 32M " + path);
  Run("parted -s " + path +
      " mklabel msdos mkpart primary 1MiB 2MiB mkpart extended 2MiB 30MiB"
      " mkpart logical 3MiB 5MiB mkpart logical 6MiB 9MiB mkpart logical 10MiB 12MiB");
  const std::vector<uint8_t> b = ReadFile(path);
  // Walk the chain by hand: the extended partition's entry, then each EBR's second entry.
  uint64_t start = 0;
  for (int i = 0; i < 4; ++i) {
    if (b[446 + 16 * i + 4] == 0x05 || b[446 + 16 * i + 4] == 0x0F)
      start = Le32(b, 446 + 16 * i + 8);
  }
  REQUIRE(start != 0);
  std::vector<MetadataUnit> units = {{0, 512, 0, UnitKind::kMbr, true}};
  for (uint64_t lba = start;;) {
    units.push_back({lba * 512, 512, 0, UnitKind::kMbr, true});
    const uint64_t next = Le32(b, lba * 512 + 446 + 16 + 8);
    if (next == 0) break;
    lba = start + next;
  }
  REQUIRE(units.size() == 4);
  ParsedImage p = ParseFile(path);
  INFO(Problems(p));
  CHECK(p.valid());
  CHECK(Describe(p.map.units()) == Describe(units));

  SECTION("a damaged EBR signature is a problem") {
    Poke(path, units[2].offset + 510, {0, 0});
    ParsedImage q = ParseFile(path);
    CHECK(Mentions(q.problems, fmt::format("extended boot record at offset {}", units[2].offset)));
  }
}

TEST_CASE("a raw file with neither MBR nor GPT is not an image", "[raw]") {
  ScratchDir dir;
  const std::string path = dir.File("plain.img");
  Run("truncate -s 4M " + path);
  auto file = OpenLocalImage(path);
  CHECK_FALSE(kParser.Probe(*file));
  CHECK(DetectFormat(*file) == nullptr);
  MemoryImageFile tiny(std::vector<uint8_t>(100, 0x55));
  CHECK_FALSE(kParser.Probe(tiny));
  ParsedImage p;
  REQUIRE(kParser.Parse(tiny, ParseLimits{}, &p).ok());
  CHECK(!p.valid());
}

}  // namespace
}  // namespace vmetafs::store
