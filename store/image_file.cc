#include "store/image_file.h"

#include <fmt/format.h>
#include <xxhash.h>

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

OverlayImageFile::Patch OverlayImageFile::Copy(std::span<const uint8_t> bytes) {
  Patch p;
  p.owner = std::make_shared<const std::vector<uint8_t>>(bytes.begin(), bytes.end());
  p.bytes = *p.owner;
  return p;
}

void OverlayImageFile::Add(uint64_t offset, std::span<const uint8_t> bytes) {
  Lay(0, offset, Copy(bytes));
}

void OverlayImageFile::Add(uint16_t extent, uint64_t offset, std::span<const uint8_t> bytes) {
  Lay(extent, offset, Copy(bytes));
}

void OverlayImageFile::AddLazy(uint16_t extent, uint64_t offset, uint64_t length,
                               const PatchSource* source) {
  Lay(extent, offset, Patch{{}, nullptr, source, extent, offset, 0, length});
}

OverlayImageFile::Patch OverlayImageFile::Patch::Part(uint64_t skip, uint64_t n) const {
  Patch p = *this;
  if (source != nullptr) {
    p.from += skip;
    p.length = n;
  } else {
    p.bytes = bytes.subspan(skip, n);
  }
  return p;
}

Status OverlayImageFile::Patch::Read(uint64_t skip, std::span<uint8_t> out) const {
  if (source != nullptr) return source->ReadPatch(extent, at, from + skip, out);
  std::memcpy(out.data(), bytes.data() + skip, out.size());
  return Status::Ok();
}

void OverlayImageFile::Lay(uint16_t extent, uint64_t offset, Patch patch) {
  if (extent != 0) {
    extent_patches_[extent].emplace_back(offset, std::move(patch));
    return;
  }
  if (patch.size() == 0) return;
  const uint64_t end = offset + patch.size();
  // Keep patches disjoint: trim the ones the new patch covers, keeping their uncovered ends.
  auto it = patches_.upper_bound(offset);
  if (it != patches_.begin()) --it;
  while (it != patches_.end() && it->first < end) {
    const uint64_t p_off = it->first, p_end = p_off + it->second.size();
    if (p_end <= offset) {
      ++it;
      continue;
    }
    Patch old = std::move(it->second);
    it = patches_.erase(it);
    if (p_off < offset) patches_.emplace(p_off, old.Part(0, offset - p_off));
    if (p_end > end) {
      patches_.emplace(end, old.Part(end - p_off, p_end - end));
      break;
    }
  }
  patches_.emplace(offset, std::move(patch));
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
  // Patches are copied out (or read from their source); only the gaps between them come from the
  // base (a table the journal laid over is not read from the storage too). Past the base's end,
  // gaps read as zeros.
  const uint64_t end = offset + out.size();
  auto fill_gap = [&](uint64_t lo, uint64_t hi) -> Status {
    if (lo >= hi) return Status::Ok();
    std::span<uint8_t> gap = out.subspan(lo - offset, hi - lo);
    const uint64_t from_base = lo < base_size ? std::min(hi, base_size) - lo : 0;
    if (from_base > 0) VMETAFS_RETURN_IF_ERROR(base_.ReadAt(lo, gap.first(from_base)));
    std::memset(gap.data() + from_base, 0, gap.size() - from_base);
    return Status::Ok();
  };
  uint64_t pos = offset;  // everything before it is filled
  auto it = patches_.upper_bound(offset);
  if (it != patches_.begin()) --it;
  for (; it != patches_.end() && it->first < end; ++it) {
    const uint64_t lo = std::max(offset, it->first);
    const uint64_t hi = std::min(end, it->first + it->second.size());
    if (lo >= hi) continue;
    VMETAFS_RETURN_IF_ERROR(fill_gap(pos, lo));
    VMETAFS_RETURN_IF_ERROR(it->second.Read(lo - it->first, out.subspan(lo - offset, hi - lo)));
    pos = hi;
  }
  return fill_gap(pos, end);
}

Status OverlayImageFile::WriteAt(uint64_t, std::span<const uint8_t>) {
  return Status::NotSupported("an overlay view is read-only");
}

Status ImageFile::OpenExtent(uint16_t extent, const std::string& name, const ImageFile**) const {
  return Status::NotSupported(fmt::format(
      "extent {} (\"{}\"): this file has no storage to find other files on", extent, name));
}

const ImageFile* OverlayImageFile::Overlaid(uint16_t extent, const ImageFile* file) const {
  auto patches = extent_patches_.find(extent);
  if (file == nullptr || patches == extent_patches_.end()) return file;
  std::lock_guard lock(extents_mutex_);
  std::unique_ptr<OverlayImageFile>& view = extent_views_[{extent, file}];
  if (view == nullptr) {
    view = std::make_unique<OverlayImageFile>(*file);
    for (const auto& [offset, patch] : patches->second) view->Lay(0, offset, patch);
  }
  return view.get();
}

Status OverlayImageFile::OpenExtent(uint16_t extent, const std::string& name,
                                    const ImageFile** out) const {
  const ImageFile* file = nullptr;
  VMETAFS_RETURN_IF_ERROR(base_.OpenExtent(extent, name, &file));
  *out = Overlaid(extent, file);
  return Status::Ok();
}

const ImageFile* OverlayImageFile::Extent(uint16_t extent) const {
  return extent == 0 ? this : Overlaid(extent, base_.Extent(extent));
}

MultiFileImage::MultiFileImage(std::unique_ptr<ImageFile> primary, std::string path, Opener open)
    : primary_(std::move(primary)), path_(std::move(path)), open_(std::move(open)) {}

Status MultiFileImage::Sync() {
  VMETAFS_RETURN_IF_ERROR(primary_->Sync());
  std::lock_guard lock(mutex_);
  for (const auto& [path, file] : files_) VMETAFS_RETURN_IF_ERROR(file->Sync());
  return Status::Ok();
}

Status MultiFileImage::Identity(FileIdentity* id) const {
  VMETAFS_RETURN_IF_ERROR(primary_->Identity(id));
  std::lock_guard lock(mutex_);
  if (extents_.empty()) return Status::Ok();
  // One number that moves when any file of the image moves; 0 is "not offered", so never 0.
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, &id->change_attr, sizeof(id->change_attr));
  Status s;
  for (const auto& [index, file] : extents_) {
    FileIdentity e;
    s = file->Identity(&e);
    if (!s.ok()) break;
    const uint64_t fields[] = {
        index, e.size,       static_cast<uint64_t>(e.mtime_ns), static_cast<uint64_t>(e.ctime_ns),
        e.ino, e.change_attr};
    XXH3_64bits_update(state, fields, sizeof(fields));
  }
  id->change_attr = XXH3_64bits_digest(state) | 1;
  XXH3_freeState(state);
  return s;
}

Status MultiFileImage::OpenExtent(uint16_t extent, const std::string& name,
                                  const ImageFile** out) const {
  if (extent == 0) return Status::InvalidArgument("extent 0 is the image file itself");
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ExtentPath(path_, name, &path));
  std::lock_guard lock(mutex_);
  std::unique_ptr<ImageFile>& file = files_[path];
  if (file == nullptr) {
    Status s = open_(path, &file);
    if (!s.ok()) {
      files_.erase(path);
      return s;
    }
  }
  extents_[extent] = file.get();
  *out = file.get();
  return Status::Ok();
}

const ImageFile* MultiFileImage::Extent(uint16_t extent) const {
  if (extent == 0) return this;
  std::lock_guard lock(mutex_);
  auto it = extents_.find(extent);
  return it == extents_.end() ? nullptr : it->second;
}

Status ExtentPath(const std::string& image_path, const std::string& name, std::string* out) {
  if (name.empty() || name.front() == '/' || name.back() == '/') {
    return Status::InvalidArgument(
        fmt::format("extent file name \"{}\" is empty, absolute or a directory", name));
  }
  for (size_t start = 0; start <= name.size();) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    const std::string_view part(name.data() + start, end - start);
    if (part.empty() || part == "." || part == "..") {
      return Status::InvalidArgument(fmt::format(
          "extent file name \"{}\" has an empty, \".\" or \"..\" component: it must name a "
          "file beside or below the image",
          name));
    }
    start = end + 1;
  }
  const size_t slash = image_path.rfind('/');
  *out = slash == std::string::npos ? name : image_path.substr(0, slash + 1) + name;
  return Status::Ok();
}

}  // namespace vmetafs::store
