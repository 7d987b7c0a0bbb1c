#include "store/metadata_map.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

namespace vmetafs::store {
namespace {

MetadataUnit Unit(uint64_t offset, uint32_t length, UnitKind kind = UnitKind::kL2Table,
                  bool moves_map = false, uint16_t extent = 0) {
  return MetadataUnit{offset, length, extent, kind, moves_map};
}

MetadataMap BuildOrFail(std::vector<MetadataUnit> units) {
  MetadataMap map;
  std::string problem;
  const bool built = MetadataMap::Build(std::move(units), &map, &problem);
  INFO(problem);
  REQUIRE(built);
  return map;
}

std::vector<uint64_t> Offsets(std::span<const MetadataUnit> units) {
  std::vector<uint64_t> out;
  for (const MetadataUnit& u : units) out.push_back(u.offset);
  return out;
}

TEST_CASE("Build sorts by extent and offset", "[metadata_map]") {
  MetadataMap map = BuildOrFail({Unit(4096, 512), Unit(0, 512, UnitKind::kHeader, true),
                                 Unit(1024, 512, UnitKind::kL2Table, false, 1), Unit(512, 512)});
  REQUIRE(map.size() == 4);
  CHECK(map.units()[0] == Unit(0, 512, UnitKind::kHeader, true));
  CHECK(map.units()[1] == Unit(512, 512));
  CHECK(map.units()[2] == Unit(4096, 512));
  CHECK(map.units()[3] == Unit(1024, 512, UnitKind::kL2Table, false, 1));
  CHECK(map.TotalBytes() == 2048);
  CHECK_FALSE(map.empty());
}

TEST_CASE("Build drops exact duplicates and keeps moves_map if either had it", "[metadata_map]") {
  MetadataMap map = BuildOrFail(
      {Unit(65536, 65536), Unit(65536, 65536, UnitKind::kL2Table, true), Unit(65536, 65536)});
  REQUIRE(map.size() == 1);
  CHECK(map.units()[0].moves_map);
  CHECK(map.TotalBytes() == 65536);
}

TEST_CASE("Build accepts adjacent units and equal ranges in different extents", "[metadata_map]") {
  MetadataMap map =
      BuildOrFail({Unit(0, 512), Unit(512, 512), Unit(0, 512, UnitKind::kL2Table, false, 2)});
  CHECK(map.size() == 3);
}

TEST_CASE("Build reports overlapping units", "[metadata_map]") {
  MetadataMap map;
  std::string problem;
  SECTION("partial overlap") {
    CHECK_FALSE(
        MetadataMap::Build({Unit(0, 1024, UnitKind::kHeader), Unit(512, 1024)}, &map, &problem));
    CHECK(problem.find("L2 table at offset 512") != std::string::npos);
    CHECK(problem.find("header at offset 0") != std::string::npos);
  }
  SECTION("same start, different lengths") {
    CHECK_FALSE(MetadataMap::Build({Unit(4096, 512), Unit(4096, 1024)}, &map, &problem));
    CHECK(problem.find("4096") != std::string::npos);
  }
  SECTION("one unit inside another, given in reverse order") {
    CHECK_FALSE(MetadataMap::Build(
        {Unit(2048, 16, UnitKind::kRefcountBlock), Unit(0, 65536, UnitKind::kRefcountTable)}, &map,
        &problem));
    CHECK(problem.find("refcount block at offset 2048") != std::string::npos);
  }
  CHECK_FALSE(problem.empty());
}

TEST_CASE("Touching finds the units a byte range intersects", "[metadata_map]") {
  MetadataMap map = BuildOrFail(
      {Unit(0, 512), Unit(1024, 512), Unit(2048, 512), Unit(0, 512, UnitKind::kL2Table, false, 1)});
  CHECK(Offsets(map.Touching(0, 0, 1)) == std::vector<uint64_t>{0});
  CHECK(Offsets(map.Touching(0, 511, 1)) == std::vector<uint64_t>{0});
  CHECK(map.Touching(0, 512, 512).empty());  // the gap between units
  CHECK(Offsets(map.Touching(0, 512, 513)) == std::vector<uint64_t>{1024});
  CHECK(Offsets(map.Touching(0, 1535, 514)) == (std::vector<uint64_t>{1024, 2048}));
  CHECK(Offsets(map.Touching(0, 0, 4096)) == (std::vector<uint64_t>{0, 1024, 2048}));
  CHECK(map.Touching(0, 2560, 1 << 20).empty());  // past the last unit
  CHECK(map.Touching(0, 0, 0).empty());           // empty range
  CHECK(map.Touching(0, 100, 0).empty());
  // Extents are separate files.
  CHECK(map.Touching(1, 0, 1).size() == 1);
  CHECK(map.Touching(1, 1024, 512).empty());
  CHECK(map.Touching(2, 0, 4096).empty());
  CHECK(MetadataMap().Touching(0, 0, 100).empty());
}

TEST_CASE("Find returns only the unit starting exactly there", "[metadata_map]") {
  MetadataMap map = BuildOrFail({Unit(0, 512, UnitKind::kHeader, true), Unit(1024, 512),
                                 Unit(1024, 512, UnitKind::kGrainTable, false, 3)});
  REQUIRE(map.Find(0, 0) != nullptr);
  CHECK(map.Find(0, 0)->kind == UnitKind::kHeader);
  REQUIRE(map.Find(0, 1024) != nullptr);
  CHECK(map.Find(0, 1024)->kind == UnitKind::kL2Table);
  REQUIRE(map.Find(3, 1024) != nullptr);
  CHECK(map.Find(3, 1024)->kind == UnitKind::kGrainTable);
  CHECK(map.Find(0, 1) == nullptr);     // inside a unit, not its start
  CHECK(map.Find(0, 512) == nullptr);   // in a gap
  CHECK(map.Find(0, 4096) == nullptr);  // past the end
  CHECK(map.Find(1, 0) == nullptr);     // another extent
  CHECK(MetadataMap().Find(0, 0) == nullptr);
}

TEST_CASE("An empty map", "[metadata_map]") {
  MetadataMap map = BuildOrFail({});
  CHECK(map.empty());
  CHECK(map.size() == 0);
  CHECK(map.TotalBytes() == 0);
}

TEST_CASE("Every unit kind has a name", "[metadata_map]") {
  for (UnitKind k : {UnitKind::kHeader, UnitKind::kL1Table, UnitKind::kL2Table,
                     UnitKind::kRefcountTable, UnitKind::kRefcountBlock, UnitKind::kSnapshotTable,
                     UnitKind::kSnapshotL1, UnitKind::kBitmapDirectory, UnitKind::kBitmapTable,
                     UnitKind::kFooter, UnitKind::kBat, UnitKind::kGptEntries}) {
    CHECK(UnitKindName(k) != "unknown");
  }
  CHECK(UnitKindName(static_cast<UnitKind>(200)) == "unknown");
}

}  // namespace
}  // namespace vmetafs::store
