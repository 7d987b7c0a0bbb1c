#include "store/image_file.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

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
  std::memcpy(out.data(), bytes_.data() + offset, out.size());
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
  patches_.push_back(Patch{offset, std::vector<uint8_t>(bytes.begin(), bytes.end())});
}

Status OverlayImageFile::Size(uint64_t* size) const {
  VMETAFS_RETURN_IF_ERROR(base_.Size(size));
  for (const Patch& p : patches_) *size = std::max<uint64_t>(*size, p.offset + p.bytes.size());
  return Status::Ok();
}

Status OverlayImageFile::ReadAt(uint64_t offset, std::span<uint8_t> out) const {
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(Size(&size));
  if (offset > size || out.size() > size - offset) return PastEnd(offset, out.size(), size);
  uint64_t base_size = 0;
  VMETAFS_RETURN_IF_ERROR(base_.Size(&base_size));
  // The part inside the base comes from the base; the rest (grown by patches) starts as zeros.
  const uint64_t end = offset + out.size();
  const uint64_t from_base = offset < base_size ? std::min(end, base_size) - offset : 0;
  if (from_base > 0) VMETAFS_RETURN_IF_ERROR(base_.ReadAt(offset, out.first(from_base)));
  std::memset(out.data() + from_base, 0, out.size() - from_base);
  for (const Patch& p : patches_) {
    const uint64_t lo = std::max(offset, p.offset), hi = std::min(end, p.offset + p.bytes.size());
    if (lo < hi) std::memcpy(out.data() + (lo - offset), p.bytes.data() + (lo - p.offset), hi - lo);
  }
  return Status::Ok();
}

Status OverlayImageFile::WriteAt(uint64_t, std::span<const uint8_t>) {
  return Status::NotSupported("an overlay view is read-only");
}

}  // namespace vmetafs::store
