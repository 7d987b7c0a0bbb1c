// ImageFile: how store/ reaches the bytes of an image on the backing storage.
//
// store/ never opens files itself: the daemon and meta-restore hand it an ImageFile from a backend
// (local directory, NFS). Implementations accept any buffer alignment and any offset.
// Thread safety: ReadAt may be called concurrently; WriteAt/Sync/Truncate are serialized by the
// caller per file.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "store/status.h"

namespace vmetafs::store {

// What the storage says about a file, used to tell whether it changed while vmetafs was not the
// writer. Fields a storage cannot provide stay 0 and are ignored in comparisons.
struct FileIdentity {
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  uint64_t ino = 0;          // inode number or NFS file id
  uint64_t change_attr = 0;  // NFSv4 change attribute or statx STATX_CHANGE_COOKIE where offered
  bool operator==(const FileIdentity&) const = default;
};

class ImageFile {
 public:
  virtual ~ImageFile() = default;
  // Reads exactly out.size() bytes at `offset`. A range reaching past the end of the file is an
  // error (InvalidArgument), not a short read.
  virtual Status ReadAt(uint64_t offset, std::span<uint8_t> out) const = 0;
  // Writes all of `data` at `offset`, extending the file if needed.
  virtual Status WriteAt(uint64_t offset, std::span<const uint8_t> data) = 0;
  // Makes written data durable on the storage (fsync / NFS COMMIT).
  virtual Status Sync() = 0;
  virtual Status Size(uint64_t* size) const = 0;
  virtual Status Identity(FileIdentity* id) const = 0;

  // Multi-file images (a VMDK descriptor and its extent files). OpenExtent resolves `name`,
  // relative to this file's directory and on the same storage, binds it as extent `extent` (1..)
  // of this image and keeps it open as long as this file lives. Extent returns the file bound to
  // `extent` (this file for 0), or nullptr. A file with no storage around it (memory) has no
  // extents: NotSupported. Both may be called concurrently with reads.
  virtual Status OpenExtent(uint16_t extent, const std::string& name, const ImageFile** out) const;
  virtual const ImageFile* Extent(uint16_t extent) const { return extent == 0 ? this : nullptr; }
  ImageFile* MutableExtent(uint16_t extent) { return const_cast<ImageFile*>(Extent(extent)); }
};

// An ImageFile held in memory: for tests, fuzzing and parsing bytes that have no file yet.
class MemoryImageFile : public ImageFile {
 public:
  explicit MemoryImageFile(std::vector<uint8_t> bytes) : bytes_(std::move(bytes)) {}
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override;
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override;
  Status Sync() override { return Status::Ok(); }
  Status Size(uint64_t* size) const override;
  Status Identity(FileIdentity* id) const override;
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Where the bytes of a lazy patch of an OverlayImageFile come from, read each time they are read:
// a view of a large image with the journal's every table laid over it then holds none of them.
// Thread safe.
class PatchSource {
 public:
  virtual ~PatchSource() = default;
  // Bytes [from, from + out.size()) of the patch laid at `offset` of file `extent`.
  virtual Status ReadPatch(uint16_t extent, uint64_t offset, uint64_t from,
                           std::span<uint8_t> out) const = 0;
};

// A read-only view of `base` with some byte ranges replaced: a write not yet sent to the storage,
// or the journal's units laid over a damaged file. Overlays may extend past the base's end (the
// view's size grows). Later overlays win. Lookups are O(log n) in the number of patches, so a view
// with every unit of a large image laid over it stays cheap. Borrowed `base` must outlive the view.
class OverlayImageFile : public ImageFile {
 public:
  explicit OverlayImageFile(const ImageFile& base) : base_(base) {}
  // The same base and patches (extent views are made again on demand).
  OverlayImageFile(const OverlayImageFile& other)
      : base_(other.base_),
        patches_(other.patches_),
        end_(other.end_),
        extent_patches_(other.extent_patches_) {}
  void Add(uint64_t offset, std::span<const uint8_t> bytes);
  // A patch of another file of a multi-file image: the extent, once the base resolves it, reads
  // as an overlay with the patch laid over it.
  void Add(uint16_t extent, uint64_t offset, std::span<const uint8_t> bytes);
  // As Add, with `length` bytes read from `source` whenever they are read; `source` must outlive
  // this view (and its copies).
  void AddLazy(uint16_t extent, uint64_t offset, uint64_t length, const PatchSource* source);
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override;
  Status WriteAt(uint64_t, std::span<const uint8_t>) override;  // NotSupported
  Status Sync() override { return Status::Ok(); }
  Status Size(uint64_t* size) const override;
  Status Identity(FileIdentity* id) const override { return base_.Identity(id); }
  Status OpenExtent(uint16_t extent, const std::string& name, const ImageFile** out) const override;
  const ImageFile* Extent(uint16_t extent) const override;

 private:
  // Bytes laid over the base: copied by Add (and then owned, shared by trimmed parts and copies
  // of the view), or lazy: bytes [from, from + length) of the patch laid at (extent, at), read
  // from `source`.
  struct Patch {
    std::span<const uint8_t> bytes;  // when not lazy
    std::shared_ptr<const std::vector<uint8_t>> owner;
    const PatchSource* source = nullptr;
    uint16_t extent = 0;
    uint64_t at = 0, from = 0, length = 0;

    uint64_t size() const { return source != nullptr ? length : bytes.size(); }
    Patch Part(uint64_t skip, uint64_t n) const;
    Status Read(uint64_t skip, std::span<uint8_t> out) const;
  };
  static Patch Copy(std::span<const uint8_t> bytes);
  void Lay(uint16_t extent, uint64_t offset, Patch patch);
  // `file`, the base's file of `extent`, seen with that extent's patches.
  const ImageFile* Overlaid(uint16_t extent, const ImageFile* file) const;

  const ImageFile& base_;
  std::map<uint64_t, Patch> patches_;  // disjoint, keyed by offset
  uint64_t end_ = 0;                   // end of the furthest patch
  std::map<uint16_t, std::vector<std::pair<uint64_t, Patch>>> extent_patches_;  // in order added
  mutable std::mutex extents_mutex_;  // guards extent_views_
  mutable std::map<std::pair<uint16_t, const ImageFile*>, std::unique_ptr<OverlayImageFile>>
      extent_views_;
};

// An image file with the other files of its image (a VMDK descriptor and its extents), opened on
// demand through `open` (given the extent's path relative to the backing root, from ExtentPath)
// and kept open for the life of this object. Everything else is the primary file's. Identity
// folds in the bound extents' identities, so that a change to any file of the image made outside
// the mount is seen at the next first open. Thread safe as ImageFile; Sync syncs every file.
class MultiFileImage : public ImageFile {
 public:
  using Opener = std::function<Status(const std::string& path, std::unique_ptr<ImageFile>* out)>;
  // `path` is the primary file's path relative to the backing root.
  MultiFileImage(std::unique_ptr<ImageFile> primary, std::string path, Opener open);
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override {
    return primary_->ReadAt(offset, out);
  }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    return primary_->WriteAt(offset, data);
  }
  Status Sync() override;
  Status Size(uint64_t* size) const override { return primary_->Size(size); }
  Status Identity(FileIdentity* id) const override;
  Status OpenExtent(uint16_t extent, const std::string& name, const ImageFile** out) const override;
  const ImageFile* Extent(uint16_t extent) const override;

 private:
  std::unique_ptr<ImageFile> primary_;
  const std::string path_;
  const Opener open_;
  mutable std::mutex mutex_;  // guards the two maps; files are never closed before the object
  mutable std::map<std::string, std::unique_ptr<ImageFile>> files_;  // by path
  mutable std::map<uint16_t, ImageFile*> extents_;
};

// The path, relative to the backing root, of the extent file `name` that the image at
// `image_path` names (relative to the image's directory). InvalidArgument for names that would
// leave the backing or name a directory (absolute, "..", empty).
Status ExtentPath(const std::string& image_path, const std::string& name, std::string* out);

}  // namespace vmetafs::store
