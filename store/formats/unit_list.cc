#include "store/formats/unit_list.h"

#include <fmt/format.h>

#include <algorithm>

namespace vmetafs::store {

bool UnitList::Fits(uint64_t offset, uint64_t length) const {
  return offset <= file_size_ && length <= file_size_ - offset;
}

bool UnitList::Add(uint64_t offset, uint64_t length, UnitKind kind, bool moves_map,
                   std::string_view what) {
  if (length == 0) {
    problems_->push_back(fmt::format("{} at offset {} has length 0", what, offset));
    return false;
  }
  if (!Fits(offset, length)) {
    problems_->push_back(
        fmt::format("{} at offset {} ({} bytes) reaches past the end of the file ({} bytes)", what,
                    offset, length, file_size_));
    return false;
  }
  const uint64_t pieces = (length + kMaxPiece - 1) / kMaxPiece;
  if (units_.size() + pieces > limits_.max_units || bytes_ + length > limits_.max_metadata_bytes) {
    if (!limit_reported_) {
      problems_->push_back(fmt::format(
          "{} at offset {}: the image's metadata exceeds the parse limits ({} units, {} bytes)",
          what, offset, limits_.max_units, limits_.max_metadata_bytes));
      limit_reported_ = true;
    }
    return false;
  }
  for (uint64_t done = 0; done < length; done += kMaxPiece) {
    MetadataUnit u;
    u.offset = offset + done;
    u.length = static_cast<uint32_t>(std::min(kMaxPiece, length - done));
    u.kind = kind;
    u.moves_map = moves_map;
    units_.push_back(u);
  }
  bytes_ += length;
  return true;
}

void UnitList::BuildMap(MetadataMap* map) {
  std::string problem;
  if (!MetadataMap::Build(units_, map, &problem)) {
    problems_->push_back(problem);
    *map = MetadataMap();
  }
}

void ReportOverlaps(
    std::vector<ClaimedRange> ranges, size_t max,
    const std::function<std::string(const ClaimedRange&, const ClaimedRange&)>& describe,
    std::vector<std::string>* problems) {
  std::sort(ranges.begin(), ranges.end(),
            [](const ClaimedRange& a, const ClaimedRange& b) { return a.start < b.start; });
  // Sorted by start, a range overlaps an earlier one exactly when it starts before the furthest
  // end seen so far.
  size_t reported = 0;
  const ClaimedRange* reach = nullptr;
  for (const ClaimedRange& r : ranges) {
    if (reported >= max) break;
    if (reach != nullptr && r.start < reach->end && (r.index >= 0 || reach->index >= 0)) {
      problems->push_back(describe(*reach, r));
      ++reported;
    }
    if (reach == nullptr || r.end > reach->end) reach = &r;
  }
}

Status ReadRange(const ImageFile& file, uint64_t offset, uint64_t length,
                 std::vector<uint8_t>* out) {
  out->assign(length, 0);
  return file.ReadAt(offset, std::span<uint8_t>(out->data(), out->size()));
}

}  // namespace vmetafs::store
