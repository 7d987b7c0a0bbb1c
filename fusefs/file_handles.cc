// Filesystem: open handles, the first open through the store, and the last release.
#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>

#include <cerrno>

#include "fusefs/filesystem.h"
#include "fusefs/fuse_uring.h"
#include "fusefs/killpriv_v2.h"
#include "store/formats/format.h"

namespace vmetafs::fusefs {

int BackendOpenFlags(int client_flags) {
  constexpr int kPassed = O_ACCMODE | O_DIRECT | O_SYNC | O_DSYNC | O_NOATIME | O_LARGEFILE;
  return client_flags & kPassed;
}

Status Filesystem::OpenHandle(const std::shared_ptr<Inode>& node, int flags, FileHandle** out) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(node->id(), &path));
  std::unique_ptr<backend::File> file;
  VMETAFS_RETURN_IF_ERROR(backend_->Open(path, flags, 0, &file));
  return Attach(node, std::move(file), flags, out);
}

// The store gets its own buffered handles: it reads and restores metadata at any offset and must
// be able to write even when the client opened read-only (qemu-img info, check). The other files
// of a multi-file image (VMDK extents) are opened the same way when the image names them.
Status Filesystem::OwnHandle(const std::string& path, std::unique_ptr<store::ImageFile>* out) {
  std::unique_ptr<backend::File> own;
  Status st = backend_->Open(path, O_RDWR, 0, &own);
  if (st.Errno() == EROFS || st.Errno() == EACCES || st.Errno() == EPERM) {
    st = backend_->Open(path, O_RDONLY, 0, &own);
  }
  VMETAFS_RETURN_IF_ERROR(st);
  *out = std::move(own);
  return Status::Ok();
}

Status Filesystem::FirstOpen(const std::string& path,
                             std::shared_ptr<store::ProtectedImage>* image) {
  std::unique_ptr<store::ImageFile> own;
  VMETAFS_RETURN_IF_ERROR(OwnHandle(path, &own));
  auto files = std::make_unique<store::MultiFileImage>(
      std::move(own), path,
      [this](const std::string& extent, auto* out) { return OwnHandle(extent, out); });
  return protector_->OpenFirst(path, std::move(files), image);  // it logs its decision
}

Status Filesystem::Attach(const std::shared_ptr<Inode>& node, std::unique_ptr<backend::File> file,
                          int flags, FileHandle** out) {
  std::lock_guard lock(node->open.mutex);
  if (node->open.handles.empty()) {
    if (protector_ != nullptr && node->type() == S_IFREG) {
      std::string path;
      VMETAFS_RETURN_IF_ERROR(PathOf(node->id(), &path));
      VMETAFS_RETURN_IF_ERROR(FirstOpen(path, &node->open.image));
    }
    std::lock_guard open_lock(open_mutex_);
    open_.insert(node);
  }
  auto* fh = new FileHandle{node, std::move(file), node->open.image, flags};
  node->open.handles.insert(fh);
  *out = fh;
  return Status::Ok();
}

void Filesystem::CloseHandle(FileHandle* fh) {
  std::shared_ptr<Inode> node = fh->inode;
  std::lock_guard lock(node->open.mutex);
  node->open.handles.erase(fh);
  delete fh;  // closes the client's descriptor (and its locks) before the store looks
  if (!node->open.handles.empty()) return;
  if (node->open.image != nullptr) {
    Status st = node->open.image->Release();
    if (!st.ok()) spdlog::error("releasing inode {}: {}", node->id(), st.ToString());
    node->open.image.reset();
  }
  std::lock_guard open_lock(open_mutex_);
  open_.erase(node);
}

void Filesystem::ReleaseAll() {
  std::set<std::shared_ptr<Inode>> open;
  {
    std::lock_guard open_lock(open_mutex_);
    open = open_;
  }
  for (const auto& node : open) {
    std::vector<FileHandle*> handles;
    {
      std::lock_guard lock(node->open.mutex);
      handles.assign(node->open.handles.begin(), node->open.handles.end());
    }
    for (FileHandle* fh : handles) CloseHandle(fh);
  }
}

Status Filesystem::StatOpen(Inode& node, struct stat* st) {
  std::lock_guard lock(node.open.mutex);
  if (node.open.handles.empty()) return Status::IoError("file is gone from the backing", ESTALE);
  return (*node.open.handles.begin())->file->Fstat(st);
}

namespace {

// Images, and files that may become one (empty), bypass the kernel page cache so that the store
// sees each write when and as the client made it; so do O_DIRECT opens, which then skip the
// kernel's page-cache bookkeeping and may write in parallel (operations.cc, ReplyOpen). Other files
// may be cached.
bool WantsDirectIo(const FileHandle& fh) {
  if (fh.inode->type() != S_IFREG) return false;
  if ((fh.flags & O_DIRECT) != 0 || (fh.image != nullptr && fh.image->is_image())) return true;
  // Without the size, bypassing the cache is the side that keeps every write visible.
  struct stat st;
  if (!fh.file->Fstat(&st).ok()) return true;
  if (st.st_size == 0) return true;
  return fh.image == nullptr && (fh.flags & O_ACCMODE) != O_WRONLY &&
         store::DetectFormat(*fh.file) != nullptr;
}

}  // namespace

void Filesystem::FinishOpen(FileHandle* fh, fuse_file_info* fi) {
  fi->fh = reinterpret_cast<uint64_t>(fh);
  fi->direct_io = WantsDirectIo(*fh) ? 1 : 0;
  fi->keep_cache = 0;
}

Status Filesystem::WriteThrough(FileHandle& fh, uint64_t offset, std::span<const uint8_t> data) {
  auto write = [&] {
    size_t done = 0;
    return fh.file->Write(offset, data, &done);
  };
  // Served by a ring thread, a WRITE leaves its transfer to the ring; the reply waits for it.
  auto write_later = [&] {
    int fd = fh.file->TransferFd(data.data(), offset, data.size());
    if (fd >= 0 && RingWrite(fd, offset, data, FinishWrite(fh.file.get(), offset, data))) {
      return Status::Ok();
    }
    return write();
  };
  return fh.image != nullptr ? fh.image->Write(offset, data, write, write_later) : write_later();
}

// What ends a WRITE the ring took: the rest of a short write, or all of one that would have waited
// (EAGAIN: the ring asks for none) or that the storage refused (EINVAL: it wants a larger
// alignment), goes through the file as any write would.
RingFinish Filesystem::FinishWrite(backend::File* file, uint64_t offset,
                                   std::span<const uint8_t> data) {
  return [file, offset, data](ssize_t res, std::span<uint8_t>) -> ssize_t {
    if (res == static_cast<ssize_t>(data.size())) return res;
    if (res < 0 && res != -EINVAL && res != -EAGAIN) return res;
    const size_t from = res > 0 ? static_cast<size_t>(res) : 0;
    size_t done = 0;
    Status st = file->Write(offset + from, data.subspan(from), &done);
    if (!st.ok()) return -ErrnoOf(st);
    return static_cast<ssize_t>(from + done);
  };
}

Status Filesystem::TruncateThrough(FileHandle& fh, uint64_t size) {
  auto truncate = [&] { return fh.file->Truncate(size); };
  return fh.image != nullptr ? fh.image->Truncate(size, truncate) : truncate();
}

// A truncate without an open handle still goes through the store, with a handle of its own.
Status Filesystem::TruncateFile(const std::shared_ptr<Inode>& node, FileHandle* fh, uint64_t size) {
  if (fh != nullptr) return TruncateThrough(*fh, size);
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(node->id(), &path));
  if (protector_ == nullptr || node->type() != S_IFREG) return backend_->Truncate(path, size);
  FileHandle* tmp = nullptr;
  VMETAFS_RETURN_IF_ERROR(OpenHandle(node, O_WRONLY, &tmp));
  Status st = TruncateThrough(*tmp, size);
  CloseHandle(tmp);
  return st;
}

namespace {

// What a write by a caller without CAP_FSETID takes away (the kernel's
// setattr_should_drop_suidgid): set-user-ID, and set-group-ID when the group may execute (without
// it, the bit means mandatory locking, not privilege).
mode_t SuidGidToKill(mode_t mode) {
  mode_t kill = mode & S_ISUID;
  if ((mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP)) kill |= S_ISGID;
  return kill;
}

}  // namespace

void Filesystem::NoteMode(Inode& node, mode_t mode) {
  if (SuidGidToKill(mode) != 0) node.ModeChanged();
}

Status Filesystem::KillSuidGidIfAsked(Inode& node, backend::File* file) {
  return KillSuidGidRequested() ? KillSuidGid(node, file) : Status::Ok();
}

Status Filesystem::KillSuidGid(Inode& node, backend::File* file) {
  if (node.type() != S_IFREG || node.KnownNoSuidGid()) return Status::Ok();
  uint64_t epoch = node.ModeEpoch();
  struct stat st;
  std::string path;
  if (file != nullptr) {
    VMETAFS_RETURN_IF_ERROR(file->Fstat(&st));
  } else {
    VMETAFS_RETURN_IF_ERROR(PathOf(node.id(), &path));
    VMETAFS_RETURN_IF_ERROR(backend_->Lstat(path, &st));
  }
  mode_t kill = SuidGidToKill(st.st_mode);
  if (kill == 0) {
    node.SawNoSuidGid(epoch);
    return Status::Ok();
  }
  mode_t mode = st.st_mode & 07777 & ~kill;
  return file != nullptr ? file->Chmod(mode) : backend_->Chmod(path, mode);
}

}  // namespace vmetafs::fusefs
