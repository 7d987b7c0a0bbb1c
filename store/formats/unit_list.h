// UnitList: the metadata units a format parser has found so far, kept within ParseLimits and the
// file's size.
//
// Long tables (a BAT, a grain directory, the VHDX log) are cut into pieces of at most kMaxPiece
// bytes, aligned to the table's start: the journal stores a unit's whole content on every write
// that touches it, so a 4-byte BAT update must not journal megabytes. Not thread safe; one parse
// owns one list.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "store/formats/format.h"
#include "store/metadata_map.h"

namespace vmetafs::store {

class UnitList {
 public:
  static constexpr uint64_t kMaxPiece = 64 * 1024;

  // `problems` (borrowed, must outlive the list) receives a sentence per rejected range.
  UnitList(const ParseLimits& limits, uint64_t file_size, std::vector<std::string>* problems)
      : limits_(limits), file_size_(file_size), problems_(problems) {}

  // Adds [offset, offset + length) as units of `kind`. When the range is empty, reaches past the
  // end of the file or would exceed the limits, adds nothing, records a problem naming `what`
  // (e.g. "VHD BAT") and returns false.
  bool Add(uint64_t offset, uint64_t length, UnitKind kind, bool moves_map, std::string_view what);
  // True when [offset, offset + length) lies inside the file (and does not wrap).
  bool Fits(uint64_t offset, uint64_t length) const;
  // Sorts the units into *map. Two units that overlap are recorded as a problem and leave *map
  // empty: the structures that located them contradict each other.
  void BuildMap(MetadataMap* map);

  const std::vector<MetadataUnit>& units() const { return units_; }
  uint64_t file_size() const { return file_size_; }

 private:
  const ParseLimits& limits_;
  const uint64_t file_size_;
  std::vector<std::string>* problems_;
  std::vector<MetadataUnit> units_;
  uint64_t bytes_ = 0;
  bool limit_reported_ = false;
};

// A byte range claimed by a data block (`index` >= 0: its table entry) or by metadata (-1).
struct ClaimedRange {
  uint64_t start = 0, end = 0;
  int64_t index = -1;
};
// Appends to *problems, at most `max` times, a sentence from `describe(earlier, later)` for each
// range that overlaps one sorted before it, unless both are metadata (the map reports those).
void ReportOverlaps(
    std::vector<ClaimedRange> ranges, size_t max,
    const std::function<std::string(const ClaimedRange&, const ClaimedRange&)>& describe,
    std::vector<std::string>* problems);

// Reads exactly `length` bytes at `offset` into *out. The caller has checked the range against
// the file size, so a failure here is an I/O error, never a content problem.
Status ReadRange(const ImageFile& file, uint64_t offset, uint64_t length,
                 std::vector<uint8_t>* out);

}  // namespace vmetafs::store
