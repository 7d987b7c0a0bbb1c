#include "store/image_file.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace vmetafs::store {

static Status PastEnd(uint64_t offset, size_t len, uint64_t size) {
  return Status::InvalidArgument(
      fmt::format("read of {} bytes at offset {} reaches past the end of the file ({} bytes)", len,
                  offset, size));
}

Status MemoryImageFile::ReadAt(uint64_t offset, std::span<uint8_t> out) const {
  if (offset > bytes_.size() || out.size() > bytes_.size() - offset) {
    return PastEnd(offset, out.size(), bytes_.size());
  }
  if (!out.empty()) std::memcpy(out.data(), bytes_.data() + offset, out.size());
  return Status::Ok();
}

Status MemoryImageFile::WriteAt(uint64_t offset, std::span<const uint8_t> data) {
  if (offset + data.size() > bytes_.size()) bytes_.resize(offset + data.size());
  std::memcpy(bytes_.data() + offset, data.data(), data.size());
  return Status::Ok();
}

Status MemoryImageFile::Size(uint64_t* size) const {
  *size = bytes_.size();
  return Status::Ok();
}

Status MemoryImageFile::Identity(FileIdentity* id) const {
  *id = FileIdentity{};
  id->size = bytes_.size();
  return Status::Ok();
}

void OverlayImageFile::Add(uint64_t offset, std::span<const uint8_t> bytes) {
  if (bytes.empty()) return;
  const uint64_t end = offset + bytes.size();
  // Keep patches disjoint: trim the ones the new patch covers, keeping their uncovered ends.
  auto it = patches_.upper_bound(offset);
  if (it != patches_.begin()) --it;
  while (it != patches_.end() && it->first < end) {
    const uint64_t p_off = it->first, p_end = p_off + it->second.size();
    if (p_end <= offset) {
      ++it;
      continue;
    }
    std::vector<uint8_t> old = std::move(it->second);
    it = patches_.erase(it);
    if (p_off < offset)
      patches_.emplace(p_off, std::vector<uint8_t>(old.begin(), old.begin() + (offset - p_off)));
    if (p_end > end) {
      patches_.emplace(end, std::vector<uint8_t>(old.begin() + (end - p_off), old.end()));
      break;
    }
  }
  patches_.emplace(offset, std::vector<uint8_t>(bytes.begin(), bytes.end()));
  end_ = std::max(end_, end);
}

Status OverlayImageFile::Size(uint64_t* size) const {
  VMETAFS_RETURN_IF_ERROR(base_.Size(size));
  *size = std::max(*size, end_);
  return Status::Ok();
}

Status OverlayImageFile::ReadAt(uint64_t offset, std::span<uint8_t> out) const {
  uint64_t base_size = 0;
  VMETAFS_RETURN_IF_ERROR(base_.Size(&base_size));
  const uint64_t size = std::max(base_size, end_);
  if (offset > size || out.size() > size - offset) return PastEnd(offset, out.size(), size);
  // The part inside the base comes from the base; the rest (grown by patches) starts as zeros.
  const uint64_t end = offset + out.size();
  const uint64_t from_base = offset < base_size ? std::min(end, base_size) - offset : 0;
  if (from_base > 0) VMETAFS_RETURN_IF_ERROR(base_.ReadAt(offset, out.first(from_base)));
  std::memset(out.data() + from_base, 0, out.size() - from_base);
  auto it = patches_.upper_bound(offset);
  if (it != patches_.begin()) --it;
  for (; it != patches_.end() && it->first < end; ++it) {
    const uint64_t lo = std::max(offset, it->first);
    const uint64_t hi = std::min(end, it->first + it->second.size());
    if (lo < hi)
      std::memcpy(out.data() + (lo - offset), it->second.data() + (lo - it->first), hi - lo);
  }
  return Status::Ok();
}

Status OverlayImageFile::WriteAt(uint64_t, std::span<const uint8_t>) {
  return Status::NotSupported("an overlay view is read-only");
}

}  // namespace vmetafs::store
