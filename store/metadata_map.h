// The metadata map of one image: the byte ranges of its files that are metadata right now.
//
// A format parser (store/formats/) derives the map from the image's own structures. The map is
// immutable once built; a change of the image's pointers produces a new map, which is published
// whole (see ProtectedImage), so that the write path can query it without locks.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace vmetafs::store {

// What a unit is, in the vocabulary of the formats. Stored in the journal: append only.
enum class UnitKind : uint8_t {
  kHeader = 1,           // qcow2 header cluster; VHD dynamic header; VMDK sparse header
  kL1Table = 2,          // qcow2 active L1 table (one unit per cluster)
  kL2Table = 3,          // qcow2 L2 table (active or snapshot)
  kRefcountTable = 4,    // qcow2 refcount table
  kRefcountBlock = 5,    // qcow2 refcount block
  kSnapshotTable = 6,    // qcow2 snapshot table
  kSnapshotL1 = 7,       // qcow2 L1 table of an internal snapshot
  kBitmapDirectory = 8,  // qcow2 bitmap directory
  kBitmapTable = 9,      // qcow2 bitmap table
  kFooter = 20,          // VHD footer (and its copy at offset 0)
  kBat = 21,             // VHD/VHDX block allocation table
  kSectorBitmap = 22,    // VHD per-block sector bitmap
  kParentLocator = 23,   // VHD parent locator data
  kFileIdentifier = 30,  // VHDX file type identifier
  kRegionTable = 31,     // VHDX region table
  kLog = 32,             // VHDX log region
  kMetadataRegion = 33,  // VHDX metadata region
  kDescriptor = 40,      // VMDK descriptor
  kGrainDirectory = 41,  // VMDK grain directory (primary or redundant)
  kGrainTable = 42,      // VMDK grain table (primary or redundant)
  kMarker = 43,          // VMDK streamOptimized footer/markers
  kMbr = 50,             // MBR / protective MBR (LBA 0)
  kGptHeader = 51,       // primary or backup GPT header
  kGptEntries = 52,      // GPT partition entry array
};

std::string_view UnitKindName(UnitKind kind);

// One contiguous range of metadata in one file of an image.
struct MetadataUnit {
  uint64_t offset = 0;  // byte offset in the file
  uint32_t length = 0;  // bytes; never 0
  uint16_t extent = 0;  // file of a multi-file image (VMDK extents); 0 for single-file images
  UnitKind kind = UnitKind::kHeader;
  // True when the unit holds pointers that locate other units (qcow2 header, L1, refcount table,
  // snapshot table...): a write to it may move the map, so the map is derived again.
  bool moves_map = false;

  uint64_t end() const { return offset + length; }
  bool operator==(const MetadataUnit&) const = default;
};

// A sorted, non-overlapping set of units. Thread safety: immutable after Build(), so any number
// of threads may query one instance concurrently.
class MetadataMap {
 public:
  MetadataMap() = default;

  // Sorts `units` by (extent, offset) and drops exact duplicates (an L2 table shared by the active
  // L1 and a snapshot). Returns false, leaving *problem set, when two different units overlap.
  static bool Build(std::vector<MetadataUnit> units, MetadataMap* out, std::string* problem);

  // The units of `extent` that intersect [offset, offset + length). Empty for length 0.
  std::span<const MetadataUnit> Touching(uint16_t extent, uint64_t offset, uint64_t length) const;
  // The unit that starts at exactly (extent, offset), or nullptr.
  const MetadataUnit* Find(uint16_t extent, uint64_t offset) const;

  const std::vector<MetadataUnit>& units() const { return units_; }
  size_t size() const { return units_.size(); }
  bool empty() const { return units_.empty(); }
  uint64_t TotalBytes() const;

 private:
  std::vector<MetadataUnit> units_;
};

}  // namespace vmetafs::store
