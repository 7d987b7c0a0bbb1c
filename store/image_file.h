// ImageFile: how store/ reaches the bytes of an image on the backing storage.
//
// store/ never opens files itself: the daemon and meta-restore hand it an ImageFile from a backend
// (local directory, NFS). Implementations accept any buffer alignment and any offset.
// Thread safety: ReadAt may be called concurrently; WriteAt/Sync/Truncate are serialized by the
// caller per file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
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

// A read-only view of `base` with some byte ranges replaced: a write not yet sent to the storage,
// or the journal's units laid over a damaged file. Overlays may extend past the base's end (the
// view's size grows). Later overlays win. Lookups are O(log n) in the number of patches, so a view
// with every unit of a large image laid over it stays cheap. Borrowed `base` must outlive the view.
class OverlayImageFile : public ImageFile {
 public:
  explicit OverlayImageFile(const ImageFile& base) : base_(base) {}
  void Add(uint64_t offset, std::span<const uint8_t> bytes);
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override;
  Status WriteAt(uint64_t, std::span<const uint8_t>) override;  // NotSupported
  Status Sync() override { return Status::Ok(); }
  Status Size(uint64_t* size) const override;
  Status Identity(FileIdentity* id) const override { return base_.Identity(id); }

 private:
  const ImageFile& base_;
  std::map<uint64_t, std::vector<uint8_t>> patches_;  // disjoint, keyed by offset
  uint64_t end_ = 0;                                  // end of the furthest patch
};

}  // namespace vmetafs::store
