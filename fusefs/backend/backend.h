// Backend: the storage under the mount, a local directory or an nfs:// URL.
//
// Paths are relative to the backing root, without a leading slash; "" is the root itself. Every
// method is safe to call from any thread. Errors come back as Status with the storage's errno
// (Errno()), which the FUSE layer replies with unchanged: the mount behaves like the backing.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "store/image_file.h"
#include "store/status.h"

namespace vmetafs::backend {

struct DirEntry {
  std::string name;
  ino_t ino = 0;
  mode_t type = 0;  // S_IFREG, S_IFDIR ... (from d_type; 0 if unknown)
};

// An open file of the backing. ReadAt/WriteAt (from store::ImageFile) accept any alignment even
// when the file was opened O_DIRECT: the backend bounces through an aligned buffer as needed.
class File : public store::ImageFile {
 public:
  // Like pread/pwrite: may return fewer bytes at end of file (Read) ; *done says how many.
  virtual Status Read(uint64_t offset, std::span<uint8_t> out, size_t* done) const = 0;
  virtual Status Write(uint64_t offset, std::span<const uint8_t> data, size_t* done) = 0;
  virtual Status Fsync(bool datasync) = 0;
  virtual Status Truncate(uint64_t size) = 0;
  virtual Status Fallocate(int mode, uint64_t offset, uint64_t length) = 0;
  // SEEK_DATA / SEEK_HOLE (others: EINVAL).
  virtual Status Lseek(uint64_t offset, int whence, uint64_t* result) const = 0;
  virtual Status Fstat(struct stat* st) const = 0;
  // Sets the permission bits (07777 of `mode`), like fchmod.
  virtual Status Chmod(mode_t mode) = 0;
  // POSIX record locks and flock(); `cmd` as for fcntl (F_GETLK, F_SETLK, F_SETLKW; OFD variants).
  virtual Status Getlk(struct flock* lock) = 0;
  virtual Status Setlk(const struct flock& lock, bool wait) = 0;
  virtual Status Flock(int op) = 0;
  // copy_file_range into `dst`; NotSupported where the storage cannot.
  virtual Status CopyRangeTo(uint64_t offset, File& dst, uint64_t dst_offset, size_t length,
                             size_t* copied) = 0;
  // A descriptor that a read or write of `len` bytes at `offset` from or into `buf` may go to
  // directly, as pread/pwrite or io_uring would take it; -1 when there is none (the storage is
  // reached by the daemon itself) or the transfer needs the file's own handling (an O_DIRECT
  // file and an unaligned buffer, offset or length).
  virtual int TransferFd(const void* buf, uint64_t offset, size_t len) const {
    (void)buf, (void)offset, (void)len;
    return -1;
  }
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Opens the backing named by `spec`: an existing directory, or nfs://SERVER/EXPORT[/DIR][?...].
  static Status Open(const std::string& spec, std::unique_ptr<Backend>* out);

  // A stable name of this backing, recorded in the store (canonical directory path or URL).
  virtual std::string Id() const = 0;
  // Whether its open files are this host kernel's, with descriptors (File::TransferFd) that the
  // daemon's io_uring can read and write.
  virtual bool KernelFiles() const = 0;

  virtual Status Lstat(const std::string& path, struct stat* st) const = 0;
  // flags as for open(2) (O_CREAT with `mode`). O_DIRECT is honoured.
  virtual Status Open(const std::string& path, int flags, mode_t mode,
                      std::unique_ptr<File>* out) const = 0;
  virtual Status Mknod(const std::string& path, mode_t mode, dev_t rdev) const = 0;
  virtual Status Mkdir(const std::string& path, mode_t mode) const = 0;
  virtual Status Rmdir(const std::string& path) const = 0;
  virtual Status Unlink(const std::string& path) const = 0;
  virtual Status Symlink(const std::string& target, const std::string& path) const = 0;
  virtual Status Readlink(const std::string& path, std::string* target) const = 0;
  virtual Status Link(const std::string& from, const std::string& to) const = 0;
  // flags: RENAME_NOREPLACE / RENAME_EXCHANGE as for renameat2 (NotSupported where not offered).
  virtual Status Rename(const std::string& from, const std::string& to, unsigned flags) const = 0;
  virtual Status Chmod(const std::string& path, mode_t mode) const = 0;
  virtual Status Chown(const std::string& path, uid_t uid, gid_t gid) const = 0;
  // times[0] atime, times[1] mtime; UTIME_NOW / UTIME_OMIT honoured.
  virtual Status Utimens(const std::string& path, const struct timespec times[2]) const = 0;
  virtual Status Truncate(const std::string& path, uint64_t size) const = 0;
  virtual Status Statfs(const std::string& path, struct statvfs* st) const = 0;
  virtual Status ReadDir(const std::string& path, std::vector<DirEntry>* out) const = 0;
  // Extended attributes; NotSupported (ENOTSUP) where the storage has none.
  virtual Status GetXattr(const std::string& path, const std::string& name,
                          std::string* value) const = 0;
  virtual Status SetXattr(const std::string& path, const std::string& name,
                          const std::string& value, int flags) const = 0;
  virtual Status ListXattr(const std::string& path, std::string* names) const = 0;
  virtual Status RemoveXattr(const std::string& path, const std::string& name) const = 0;
};

}  // namespace vmetafs::backend
