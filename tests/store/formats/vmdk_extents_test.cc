// VMDK images made of several files (twoGbMaxExtentSparse, twoGbMaxExtentFlat), made by qemu-img
// and filled by qemu-io at test time: the descriptor file is the image, and the units of every
// sparse extent file are its units with the extent's index. Units are recomputed here from each
// extent's own sparse header; damage is poked at offsets read from it.
#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "store/formats/vmdk.h"
#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using namespace vmetafs::testing;  // NOLINT: scratch directories, qemu-img, byte access

const VmdkParser kParser;
constexpr auto Le32 = Le32At;
constexpr auto Le64 = Le64At;

std::vector<uint8_t> Le32Bytes(uint32_t v) {
  return {static_cast<uint8_t>(v), static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v >> 16),
          static_cast<uint8_t>(v >> 24)};
}

bool Mentions(const std::vector<std::string>& problems, const std::string& needle) {
  for (const std::string& p : problems) {
    if (p.find(needle) != std::string::npos) return true;
  }
  return false;
}

// The descriptor with its extent files opened from the scratch directory, as the daemon does
// through its backend.
std::unique_ptr<ImageFile> OpenImage(const ScratchDir& dir, const std::string& name) {
  return std::make_unique<MultiFileImage>(
      OpenLocalImage(dir.File(name)), name,
      [&dir](const std::string& path, std::unique_ptr<ImageFile>* out) -> Status {
        if (std::FILE* f = std::fopen(dir.File(path).c_str(), "rb")) {
          std::fclose(f);
          *out = OpenLocalImage(dir.File(path));
          return Status::Ok();
        }
        return Status::NotFound("no file " + path);
      });
}

struct Parsed {
  ParsedImage image;
  std::vector<std::string> check;  // Check()'s findings when the parse is valid
};

Parsed Parse(const ImageFile& file) {
  Parsed p;
  Status st = kParser.Parse(file, ParseLimits{}, &p.image);
  INFO(st.ToString());
  REQUIRE(st.ok());
  if (p.image.valid()) REQUIRE(kParser.Check(file, p.image, ParseLimits{}, &p.check).ok());
  return p;
}

// An extent's own units (header, embedded descriptor area, both grain directories and their
// tables), from its header.
std::vector<std::tuple<uint64_t, UnitKind>> SparseUnits(const std::vector<uint8_t>& b) {
  REQUIRE(std::string(b.begin(), b.begin() + 4) == "KDMV");
  const uint64_t capacity = Le64(b, 12), grain = Le64(b, 20), rgd = Le64(b, 48), gd = Le64(b, 56);
  const uint32_t gtes = Le32(b, 44);
  const uint64_t entries = (capacity + grain * gtes - 1) / (grain * gtes);
  std::vector<std::tuple<uint64_t, UnitKind>> units = {{0, UnitKind::kHeader}};
  if (const uint64_t desc = Le64(b, 28); desc != 0) {
    units.emplace_back(desc * 512, UnitKind::kDescriptor);
  }
  for (uint64_t dir : {gd, rgd}) {
    units.emplace_back(dir * 512, UnitKind::kGrainDirectory);
    for (uint64_t i = 0; i < entries; ++i) {
      if (const uint32_t gt = Le32(b, dir * 512 + 4 * i); gt != 0) {
        units.emplace_back(uint64_t{gt} * 512, UnitKind::kGrainTable);
      }
    }
  }
  std::sort(units.begin(), units.end());
  return units;
}

std::vector<std::tuple<uint64_t, UnitKind>> UnitsOf(const ParsedImage& p, uint16_t extent) {
  std::vector<std::tuple<uint64_t, UnitKind>> out;
  for (const MetadataUnit& u : p.map.units()) {
    if (u.extent == extent) out.emplace_back(u.offset, u.kind);
  }
  return out;
}

TEST_CASE("twoGbMaxExtentSparse VMDK: one image with the units of every extent", "[vmdk]") {
  ScratchDir dir;
  Run("qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse " + dir.File("d.vmdk") + " 5G");
  // Patterns in the first, second and third extent (2 GiB each, the last one 1 GiB).
  Run("qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 2500M 1M' -c 'write -P 0xcc 4500M 64k' " +
      dir.File("d.vmdk"));
  auto file = OpenImage(dir, "d.vmdk");
  const Parsed p = Parse(*file);
  INFO(fmt::format("{}", fmt::join(p.image.problems, "\n")));
  REQUIRE(p.image.valid());
  CHECK(p.check.empty());
  CHECK(p.image.virtual_size == 5ull << 30);
  REQUIRE(p.image.extent_files ==
          std::vector<std::string>{"d-s001.vmdk", "d-s002.vmdk", "d-s003.vmdk"});
  CHECK(UnitsOf(p.image, 0) ==
        std::vector<std::tuple<uint64_t, UnitKind>>{{0, UnitKind::kDescriptor}});
  for (uint16_t e = 1; e <= 3; ++e) {
    INFO("extent " << e);
    const std::vector<uint8_t> b = ReadFile(dir.File(p.image.extent_files[e - 1]));
    CHECK(UnitsOf(p.image, e) == SparseUnits(b));
    CHECK(file->Extent(e) != nullptr);
  }

  // The second extent's grain table for the write at 2500M (452 MiB into the extent).
  const std::string second = dir.File("d-s002.vmdk");
  const std::vector<uint8_t> b = ReadFile(second);
  const uint64_t gd = Le64(b, 56) * 512, rgd = Le64(b, 48) * 512;
  const uint64_t entry = (452ull << 20) / (Le64(b, 20) * 512 * Le32(b, 44));
  const uint64_t gt = uint64_t{Le32(b, gd + 4 * entry)} * 512;
  REQUIRE(gt != 0);

  SECTION("a lost grain directory entry names the extent and the copy") {
    WriteFileAt(second, gd + 4 * entry, Le32Bytes(0));
    const Parsed d = Parse(*OpenImage(dir, "d.vmdk"));
    CHECK(Mentions(d.image.problems, "VMDK extent 2 (\"d-s002.vmdk\")"));
    CHECK(Mentions(d.image.problems, "the primary copy has lost a grain table"));
  }
  SECTION("a grain table entry pointing past the end: Check names the extent") {
    const uint64_t grain_entry = ((452ull << 20) / (Le64(b, 20) * 512)) % Le32(b, 44);
    WriteFileAt(second, gt + 4 * grain_entry, Le32Bytes(0x7FFFFFF0));
    const Parsed d = Parse(*OpenImage(dir, "d.vmdk"));
    REQUIRE(d.image.valid());
    CHECK(Mentions(d.check, "VMDK extent 2 (\"d-s002.vmdk\"): VMDK grain table"));
    CHECK(Mentions(d.check, "differs from its redundant copy"));
    CHECK(rgd != 0);
  }
  SECTION("a missing extent file is a problem, not an error") {
    Run("mv " + second + " " + dir.File("elsewhere.vmdk"));
    const Parsed d = Parse(*OpenImage(dir, "d.vmdk"));
    CHECK(Mentions(d.image.problems,
                   "VMDK extent 2 (\"d-s002.vmdk\") named by the descriptor "
                   "cannot be opened"));
  }
  SECTION("an extent file outside the image's directory is refused") {
    Run("sed -i 's/\"d-s002.vmdk\"/\"..\\/d-s002.vmdk\"/' " + dir.File("d.vmdk"));
    const Parsed d = Parse(*OpenImage(dir, "d.vmdk"));
    CHECK(Mentions(d.image.problems, "\"..\" component"));
  }
  SECTION("an extent file that is itself a descriptor") {
    Run("cp " + dir.File("d.vmdk") + " " + second);
    CHECK(Mentions(Parse(*OpenImage(dir, "d.vmdk")).image.problems, "is a descriptor file"));
  }
  SECTION("without a storage around it, the descriptor notes its extents only") {
    const Parsed d = Parse(*OpenLocalImage(dir.File("d.vmdk")));
    CHECK(d.image.valid());
    CHECK(d.image.map.size() == 1);
    CHECK(d.image.notes.size() == 3);
  }
}

TEST_CASE("twoGbMaxExtentFlat VMDK: the descriptor is the metadata, every file is bound",
          "[vmdk]") {
  ScratchDir dir;
  Run("qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat " + dir.File("f.vmdk") + " 5G");
  auto file = OpenImage(dir, "f.vmdk");
  const Parsed p = Parse(*file);
  REQUIRE(p.image.valid());
  CHECK(p.image.map.size() == 1);
  CHECK(p.image.extent_files ==
        std::vector<std::string>{"f-f001.vmdk", "f-f002.vmdk", "f-f003.vmdk"});
  for (uint16_t e = 1; e <= 3; ++e) CHECK(file->Extent(e) != nullptr);

  // The image's identity covers its extent files.
  FileIdentity before, after;
  REQUIRE(file->Identity(&before).ok());
  Run("truncate -s 1M " + dir.File("f-f003.vmdk"));
  REQUIRE(file->Identity(&after).ok());
  CHECK(before.change_attr != 0);
  CHECK(before.change_attr != after.change_attr);
}

}  // namespace
}  // namespace vmetafs::store
