#include "store/metadata_map.h"

#include <fmt/format.h>

#include <algorithm>
#include <tuple>

namespace vmetafs::store {

std::string_view UnitKindName(UnitKind kind) {
  switch (kind) {
    case UnitKind::kHeader:
      return "header";
    case UnitKind::kL1Table:
      return "L1 table";
    case UnitKind::kL2Table:
      return "L2 table";
    case UnitKind::kRefcountTable:
      return "refcount table";
    case UnitKind::kRefcountBlock:
      return "refcount block";
    case UnitKind::kSnapshotTable:
      return "snapshot table";
    case UnitKind::kSnapshotL1:
      return "snapshot L1 table";
    case UnitKind::kBitmapDirectory:
      return "bitmap directory";
    case UnitKind::kBitmapTable:
      return "bitmap table";
    case UnitKind::kFooter:
      return "footer";
    case UnitKind::kBat:
      return "BAT";
    case UnitKind::kSectorBitmap:
      return "sector bitmap";
    case UnitKind::kParentLocator:
      return "parent locator";
    case UnitKind::kFileIdentifier:
      return "file identifier";
    case UnitKind::kRegionTable:
      return "region table";
    case UnitKind::kLog:
      return "log";
    case UnitKind::kMetadataRegion:
      return "metadata region";
    case UnitKind::kDescriptor:
      return "descriptor";
    case UnitKind::kGrainDirectory:
      return "grain directory";
    case UnitKind::kGrainTable:
      return "grain table";
    case UnitKind::kMarker:
      return "marker";
    case UnitKind::kMbr:
      return "MBR";
    case UnitKind::kGptHeader:
      return "GPT header";
    case UnitKind::kGptEntries:
      return "GPT entries";
  }
  return "unknown";
}

static bool Before(const MetadataUnit& a, const MetadataUnit& b) {
  return std::tie(a.extent, a.offset, a.length) < std::tie(b.extent, b.offset, b.length);
}

bool MetadataMap::Build(std::vector<MetadataUnit> units, MetadataMap* out, std::string* problem) {
  std::sort(units.begin(), units.end(), Before);
  std::vector<MetadataUnit> merged;
  merged.reserve(units.size());
  for (const MetadataUnit& u : units) {
    if (!merged.empty()) {
      const MetadataUnit& prev = merged.back();
      if (prev.extent == u.extent && prev.offset == u.offset && prev.length == u.length) {
        // Same range reached twice (a shared L2 table): keep one, it moves the map if either does.
        merged.back().moves_map = prev.moves_map || u.moves_map;
        continue;
      }
      if (prev.extent == u.extent && u.offset < prev.end()) {
        *problem = fmt::format("{} at offset {} overlaps {} at offset {}", UnitKindName(u.kind),
                               u.offset, UnitKindName(prev.kind), prev.offset);
        return false;
      }
    }
    merged.push_back(u);
  }
  out->units_ = std::move(merged);
  return true;
}

std::span<const MetadataUnit> MetadataMap::Touching(uint16_t extent, uint64_t offset,
                                                    uint64_t length) const {
  if (length == 0 || units_.empty()) return {};
  // First unit whose end lies past `offset`: units are sorted and disjoint, so ends are sorted too.
  auto first = std::partition_point(units_.begin(), units_.end(), [&](const MetadataUnit& u) {
    return u.extent < extent || (u.extent == extent && u.end() <= offset);
  });
  auto last = first;
  const uint64_t end = offset + length;
  while (last != units_.end() && last->extent == extent && last->offset < end) ++last;
  return {first, last};
}

const MetadataUnit* MetadataMap::Find(uint16_t extent, uint64_t offset) const {
  auto it = std::lower_bound(units_.begin(), units_.end(), MetadataUnit{offset, 0, extent},
                             [](const MetadataUnit& a, const MetadataUnit& b) {
                               return std::tie(a.extent, a.offset) < std::tie(b.extent, b.offset);
                             });
  if (it == units_.end() || it->extent != extent || it->offset != offset) return nullptr;
  return &*it;
}

uint64_t MetadataMap::TotalBytes() const {
  uint64_t total = 0;
  for (const MetadataUnit& u : units_) total += u.length;
  return total;
}

}  // namespace vmetafs::store
