// LocalFile: one open file of a LocalBackend, with the O_DIRECT alignment handling of backend.h.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "fusefs/backend/aligned_buffer.h"
#include "fusefs/backend/local_backend.h"

namespace vmetafs::backend {
namespace {

// Bounce I/O goes in pieces of at most this size, so that the per-thread buffer stays small even
// when store/ reads a multi-megabyte table.
constexpr size_t kBounceChunk = 1 << 20;

thread_local AlignedBuffer bounce;

Status SysError(std::string_view what) {
  int err = errno;
  return PosixError(what, err);
}

}  // namespace

LocalFile::LocalFile(int fd, int flags)
    : fd_(fd), flags_(flags), direct_((flags & O_DIRECT) != 0) {}

LocalFile::~LocalFile() {
  close(fd_);
  if (buffered_fd_ >= 0) close(buffered_fd_);
}

bool LocalFile::DirectOk(uint64_t offset, size_t len) const {
  return IsAligned(offset, kDirectAlignment) &&
         IsAligned(static_cast<uint64_t>(len), kDirectAlignment);
}

int LocalFile::TransferFd(const void* buf, uint64_t offset, size_t len) const {
  if (!direct_) return fd_;
  return DirectOk(offset, len) && IsAligned(buf, kDirectAlignment) ? fd_ : -1;
}

Status LocalFile::BufferedFd(int* fd) const {
  if (!direct_) {
    *fd = fd_;
    return Status::Ok();
  }
  std::call_once(buffered_once_, [this] {
    // Reopening through /proc reaches the same inode even if it was renamed or unlinked since.
    std::string self = fmt::format("/proc/self/fd/{}", fd_);
    int keep = O_ACCMODE | O_SYNC | O_DSYNC | O_NOATIME;
    buffered_fd_ = open(self.c_str(), (flags_ & keep) | O_CLOEXEC);
    if (buffered_fd_ < 0) buffered_errno_ = errno;
  });
  if (buffered_fd_ < 0) return PosixError("reopening without O_DIRECT", buffered_errno_);
  *fd = buffered_fd_;
  return Status::Ok();
}

Status LocalFile::PreadLoop(int fd, uint64_t offset, std::span<uint8_t> out, size_t* done) const {
  *done = 0;
  while (*done < out.size()) {
    ssize_t n =
        pread(fd, out.data() + *done, out.size() - *done, static_cast<off_t>(offset + *done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return SysError("read");
    }
    *done += static_cast<size_t>(n);
    // A short read is the end of the file; on an O_DIRECT descriptor asking again from an
    // unaligned offset would fail instead of returning 0.
    if (n == 0 || (direct_ && fd == fd_)) break;
  }
  return Status::Ok();
}

Status LocalFile::PwriteLoop(int fd, uint64_t offset, std::span<const uint8_t> data,
                             size_t* done) const {
  *done = 0;
  while (*done < data.size()) {
    ssize_t n =
        pwrite(fd, data.data() + *done, data.size() - *done, static_cast<off_t>(offset + *done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return SysError("write");
    }
    if (n == 0) return Status::IoError("write: no progress", EIO);
    *done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status LocalFile::DirectRead(uint64_t offset, std::span<uint8_t> out, size_t* done) const {
  if (IsAligned(out.data(), kDirectAlignment)) return PreadLoop(fd_, offset, out, done);
  *done = 0;
  while (*done < out.size()) {
    size_t len = std::min(kBounceChunk, out.size() - *done);
    uint8_t* buf = bounce.Get(len);
    size_t got = 0;
    VMETAFS_RETURN_IF_ERROR(PreadLoop(fd_, offset + *done, {buf, len}, &got));
    std::memcpy(out.data() + *done, buf, got);
    *done += got;
    if (got < len) break;
  }
  return Status::Ok();
}

Status LocalFile::DirectWrite(uint64_t offset, std::span<const uint8_t> data, size_t* done) const {
  if (IsAligned(data.data(), kDirectAlignment)) return PwriteLoop(fd_, offset, data, done);
  *done = 0;
  while (*done < data.size()) {
    size_t len = std::min(kBounceChunk, data.size() - *done);
    uint8_t* buf = bounce.Get(len);
    std::memcpy(buf, data.data() + *done, len);
    size_t put = 0;
    Status st = PwriteLoop(fd_, offset + *done, {buf, len}, &put);
    *done += put;
    VMETAFS_RETURN_IF_ERROR(st);
  }
  return Status::Ok();
}

Status LocalFile::Read(uint64_t offset, std::span<uint8_t> out, size_t* done) const {
  if (direct_ && DirectOk(offset, out.size())) {
    Status st = DirectRead(offset, out, done);
    // EINVAL: the storage wants a larger alignment than kDirectAlignment.
    if (st.ok() || st.Errno() != EINVAL) return st;
  }
  int fd = -1;
  VMETAFS_RETURN_IF_ERROR(BufferedFd(&fd));
  return PreadLoop(fd, offset, out, done);
}

Status LocalFile::Write(uint64_t offset, std::span<const uint8_t> data, size_t* done) {
  if (direct_ && DirectOk(offset, data.size())) {
    Status st = DirectWrite(offset, data, done);
    if (st.ok() || st.Errno() != EINVAL || *done != 0) return st;
  }
  int fd = -1;
  VMETAFS_RETURN_IF_ERROR(BufferedFd(&fd));
  return PwriteLoop(fd, offset, data, done);
}

Status LocalFile::ReadAt(uint64_t offset, std::span<uint8_t> out) const {
  size_t done = 0;
  VMETAFS_RETURN_IF_ERROR(Read(offset, out, &done));
  if (done != out.size()) {
    return Status::InvalidArgument(fmt::format(
        "read of {} bytes at offset {} reaches past the end of the file", out.size(), offset));
  }
  return Status::Ok();
}

Status LocalFile::WriteAt(uint64_t offset, std::span<const uint8_t> data) {
  size_t done = 0;
  return Write(offset, data, &done);
}

Status LocalFile::Sync() { return fsync(fd_) == 0 ? Status::Ok() : SysError("fsync"); }

Status LocalFile::Size(uint64_t* size) const {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(Fstat(&st));
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

Status LocalFile::Identity(store::FileIdentity* id) const {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(Fstat(&st));
  *id = store::FileIdentity{};
  id->size = static_cast<uint64_t>(st.st_size);
  id->mtime_ns = st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
  id->ctime_ns = st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
  id->ino = st.st_ino;
  return Status::Ok();
}

Status LocalFile::Fsync(bool datasync) {
  int r = datasync ? fdatasync(fd_) : fsync(fd_);
  return r == 0 ? Status::Ok() : SysError(datasync ? "fdatasync" : "fsync");
}

Status LocalFile::Truncate(uint64_t size) {
  return ftruncate(fd_, static_cast<off_t>(size)) == 0 ? Status::Ok() : SysError("truncate");
}

Status LocalFile::Fallocate(int mode, uint64_t offset, uint64_t length) {
  if (fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
    return SysError("fallocate");
  }
  return Status::Ok();
}

Status LocalFile::Lseek(uint64_t offset, int whence, uint64_t* result) const {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    return Status::InvalidArgument("lseek: only SEEK_DATA and SEEK_HOLE are forwarded");
  }
  off_t r = lseek(fd_, static_cast<off_t>(offset), whence);
  if (r < 0) return SysError("lseek");
  *result = static_cast<uint64_t>(r);
  return Status::Ok();
}

Status LocalFile::Fstat(struct stat* st) const {
  return fstat(fd_, st) == 0 ? Status::Ok() : SysError("fstat");
}

Status LocalFile::Chmod(mode_t mode) {
  return fchmod(fd_, mode & 07777) == 0 ? Status::Ok() : SysError("chmod");
}

// Locks are taken as open file description (OFD) locks on this descriptor: each open through the
// mount has its own descriptor, so opens by different processes conflict with each other and with
// locks taken on the backing directly, as they would without the mount.
Status LocalFile::Getlk(struct flock* lock) {
  lock->l_pid = 0;
  return fcntl(fd_, F_OFD_GETLK, lock) == 0 ? Status::Ok() : SysError("getlk");
}

Status LocalFile::Setlk(const struct flock& lock, bool wait) {
  struct flock l = lock;
  l.l_pid = 0;
  return fcntl(fd_, wait ? F_OFD_SETLKW : F_OFD_SETLK, &l) == 0 ? Status::Ok() : SysError("setlk");
}

Status LocalFile::Flock(int op) { return flock(fd_, op) == 0 ? Status::Ok() : SysError("flock"); }

Status LocalFile::CopyRangeTo(uint64_t offset, File& dst, uint64_t dst_offset, size_t length,
                              size_t* copied) {
  auto* to = dynamic_cast<LocalFile*>(&dst);
  if (to == nullptr) return Status::NotSupported("copy_file_range between different backings");
  int in = -1, out = -1;
  VMETAFS_RETURN_IF_ERROR(BufferedFd(&in));
  VMETAFS_RETURN_IF_ERROR(to->BufferedFd(&out));
  loff_t off_in = static_cast<loff_t>(offset), off_out = static_cast<loff_t>(dst_offset);
  ssize_t n = copy_file_range(in, &off_in, out, &off_out, length, 0);
  if (n < 0) return SysError("copy_file_range");
  *copied = static_cast<size_t>(n);
  return Status::Ok();
}

}  // namespace vmetafs::backend
