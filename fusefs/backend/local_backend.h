// LocalBackend: a directory of the host (a local filesystem, or an NFS share the kernel mounted).
//
// The root directory stays open for the backend's lifetime and every call resolves its path
// relative to it with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) or the *at() calls on a
// parent directory resolved that way, so no path, symlink or ".." can reach outside the root. The
// final component is never followed (O_NOFOLLOW / AT_SYMLINK_NOFOLLOW): the mount shows symlinks
// as symlinks. ReadDir omits "." and "..".
//
// Thread safety: all methods may be called concurrently; LocalFile follows store::ImageFile's
// rules (reads concurrent, writes serialized by the caller where it needs ordering).
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "fusefs/backend/backend.h"

namespace vmetafs::backend {

class LocalBackend final : public Backend {
 public:
  // `dir` must name an existing directory; it is canonicalized (realpath) for Id().
  static Status Open(const std::string& dir, std::unique_ptr<Backend>* out);
  ~LocalBackend() override;

  std::string Id() const override { return root_path_; }
  bool KernelFiles() const override { return true; }

  Status Lstat(const std::string& path, struct stat* st) const override;
  Status Open(const std::string& path, int flags, mode_t mode,
              std::unique_ptr<File>* out) const override;
  Status Mknod(const std::string& path, mode_t mode, dev_t rdev) const override;
  Status Mkdir(const std::string& path, mode_t mode) const override;
  Status Rmdir(const std::string& path) const override;
  Status Unlink(const std::string& path) const override;
  Status Symlink(const std::string& target, const std::string& path) const override;
  Status Readlink(const std::string& path, std::string* target) const override;
  Status Link(const std::string& from, const std::string& to) const override;
  Status Rename(const std::string& from, const std::string& to, unsigned flags) const override;
  Status Chmod(const std::string& path, mode_t mode) const override;
  Status Chown(const std::string& path, uid_t uid, gid_t gid) const override;
  Status Utimens(const std::string& path, const struct timespec times[2]) const override;
  Status Truncate(const std::string& path, uint64_t size) const override;
  Status Statfs(const std::string& path, struct statvfs* st) const override;
  Status ReadDir(const std::string& path, std::vector<DirEntry>* out) const override;
  Status GetXattr(const std::string& path, const std::string& name,
                  std::string* value) const override;
  Status SetXattr(const std::string& path, const std::string& name, const std::string& value,
                  int flags) const override;
  Status ListXattr(const std::string& path, std::string* names) const override;
  Status RemoveXattr(const std::string& path, const std::string& name) const override;

 private:
  class Parent;  // the directory holding a path's last component, resolved beneath the root
  LocalBackend(int root_fd, std::string root_path) : root_fd_(root_fd), root_path_(root_path) {}
  Status ResolveParent(const std::string& path, Parent* out) const;
  // openat2 beneath the root; `path` "" opens the root itself.
  Status OpenBeneath(const std::string& path, int flags, mode_t mode, int* fd) const;
  // A path through /proc naming `path` without following its last component, for the calls
  // that have no *at() variant (extended attributes).
  Status ProcPath(const std::string& path, Parent* parent, std::string* proc_path) const;

  int root_fd_;  // O_RDONLY | O_DIRECTORY, so that f*xattr() work on the root
  std::string root_path_;
};

// An open file of a LocalBackend. Owns its descriptor.
class LocalFile final : public File {
 public:
  // Takes ownership of `fd`, opened with `flags`.
  LocalFile(int fd, int flags);
  ~LocalFile() override;

  // store::ImageFile
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override;
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override;
  Status Sync() override;
  Status Size(uint64_t* size) const override;
  Status Identity(store::FileIdentity* id) const override;

  // File
  Status Read(uint64_t offset, std::span<uint8_t> out, size_t* done) const override;
  Status Write(uint64_t offset, std::span<const uint8_t> data, size_t* done) override;
  Status Fsync(bool datasync) override;
  Status Truncate(uint64_t size) override;
  Status Fallocate(int mode, uint64_t offset, uint64_t length) override;
  Status Lseek(uint64_t offset, int whence, uint64_t* result) const override;
  Status Fstat(struct stat* st) const override;
  Status Chmod(mode_t mode) override;
  Status Getlk(struct flock* lock) override;
  Status Setlk(const struct flock& lock, bool wait) override;
  Status Flock(int op) override;
  Status CopyRangeTo(uint64_t offset, File& dst, uint64_t dst_offset, size_t length,
                     size_t* copied) override;
  int TransferFd(const void* buf, uint64_t offset, size_t len) const override;

 private:
  // Whether an I/O of `len` bytes at `offset` from `buf` can go to the O_DIRECT descriptor.
  bool DirectOk(uint64_t offset, size_t len) const;
  // A second descriptor of the same open file without O_DIRECT (opened on first use), for I/O
  // whose offset or length O_DIRECT refuses.
  Status BufferedFd(int* fd) const;
  Status PreadLoop(int fd, uint64_t offset, std::span<uint8_t> out, size_t* done) const;
  Status PwriteLoop(int fd, uint64_t offset, std::span<const uint8_t> data, size_t* done) const;
  Status DirectRead(uint64_t offset, std::span<uint8_t> out, size_t* done) const;
  Status DirectWrite(uint64_t offset, std::span<const uint8_t> data, size_t* done) const;

  const int fd_;
  const int flags_;
  const bool direct_;
  mutable std::once_flag buffered_once_;
  mutable int buffered_fd_ = -1;
  mutable int buffered_errno_ = 0;
};

}  // namespace vmetafs::backend
