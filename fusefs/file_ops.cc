// Filesystem: the operations on open files (the data path).
#include <fcntl.h>
#include <linux/falloc.h>

#include <algorithm>
#include <cerrno>

#include "fusefs/backend/aligned_buffer.h"
#include "fusefs/filesystem.h"
#include "fusefs/fuse_uring.h"

namespace vmetafs::fusefs {
namespace {

// Per worker thread: the data of a read on its way to the kernel, of a write on its way to an
// O_DIRECT descriptor, and of an emulated copy.
thread_local backend::AlignedBuffer read_buffer;
thread_local backend::AlignedBuffer write_buffer;
thread_local backend::AlignedBuffer copy_buffer;

bool Writable(int flags) { return (flags & O_ACCMODE) != O_RDONLY; }

}  // namespace

Status Filesystem::Open(fuse_ino_t ino, fuse_file_info* fi) {
  std::shared_ptr<Inode> node = Node(ino);
  if (node == nullptr) return Status::IoError("open of a forgotten inode", ESTALE);
  FileHandle* fh = nullptr;
  VMETAFS_RETURN_IF_ERROR(OpenHandle(node, BackendOpenFlags(fi->flags), &fh));
  if ((fi->flags & O_TRUNC) != 0 && Writable(fi->flags)) {
    Status st = KillSuidGidIfAsked(*node, fh->file.get());
    if (st.ok()) st = TruncateThrough(*fh, 0);
    if (!st.ok()) {
      CloseHandle(fh);
      return st;
    }
  }
  FinishOpen(fh, fi);
  return Status::Ok();
}

Status Filesystem::Create(fuse_ino_t parent, const char* name, mode_t mode, const fuse_ctx* ctx,
                          fuse_file_info* fi, fuse_entry_param* e) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  int flags = BackendOpenFlags(fi->flags);
  std::unique_ptr<backend::File> file;
  VMETAFS_RETURN_IF_ERROR(
      backend_->Open(path, flags | O_CREAT | (fi->flags & O_EXCL), mode, &file));
  GiveToCaller(parent, path, ctx);
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(file->Fstat(&st));
  std::shared_ptr<Inode> node = inodes_.Lookup(parent, name, st);
  NoteMode(*node, st.st_mode);
  FileHandle* fh = nullptr;
  Status s = Attach(node, std::move(file), flags, &fh);
  // Another client may have created the file first: then this is an open of it.
  if (s.ok() && (fi->flags & O_TRUNC) != 0 && Writable(fi->flags)) {
    s = KillSuidGidIfAsked(*node, fh->file.get());
    if (s.ok() && st.st_size > 0) s = TruncateThrough(*fh, 0);
    if (!s.ok()) CloseHandle(fh);
  }
  if (!s.ok()) {
    inodes_.Forget(node->id(), 1);
    return s;
  }
  *e = fuse_entry_param{};
  e->ino = node->id();
  e->attr = st;
  e->attr_timeout = config_.timeout;
  e->entry_timeout = config_.timeout;
  FinishOpen(fh, fi);
  return Status::Ok();
}

Status Filesystem::Read(fuse_file_info* fi, size_t size, off_t offset,
                        std::span<const uint8_t>* out) {
  FileHandle& fh = Handle(fi);
  // Served by a ring thread, the read goes to the reply's own buffer and is left to the ring.
  if (uint8_t* into = RingReadBuffer(size)) {
    const uint64_t off = static_cast<uint64_t>(offset);
    int fd = fh.file->TransferFd(into, off, size);
    if (fd >= 0 &&
        RingRead(fd, off, {into, size}, FinishRead(fh.file.get(), fh.image.get(), off))) {
      *out = {};
      return Status::Ok();
    }
  }
  uint8_t* buf = read_buffer.Get(size);
  size_t done = 0;
  VMETAFS_RETURN_IF_ERROR(fh.file->Read(static_cast<uint64_t>(offset), {buf, size}, &done));
  if (fh.image != nullptr) fh.image->PatchRead(static_cast<uint64_t>(offset), {buf, done});
  *out = {buf, done};
  return Status::Ok();
}

// What ends a READ the ring took: one that would have waited (EAGAIN: the ring asks for none) or
// that the storage refused (EINVAL: it wants a larger alignment) goes through the file; what the
// journal serves is patched in, as for any read.
RingFinish Filesystem::FinishRead(const backend::File* file, const store::ProtectedImage* image,
                                  uint64_t offset) {
  return [file, image, offset](ssize_t res, std::span<uint8_t> bytes) -> ssize_t {
    if (res == -EINVAL || res == -EAGAIN) {
      size_t done = 0;
      Status st = file->Read(offset, bytes, &done);
      if (!st.ok()) return -ErrnoOf(st);
      res = static_cast<ssize_t>(done);
    }
    if (res > 0 && image != nullptr) {
      image->PatchRead(offset, bytes.first(static_cast<size_t>(res)));
    }
    return res;
  };
}

Status Filesystem::Write(fuse_file_info* fi, fuse_bufvec* in, off_t offset, size_t* written) {
  FileHandle& fh = Handle(fi);
  VMETAFS_RETURN_IF_ERROR(KillSuidGidIfAsked(*fh.inode, fh.file.get()));
  const fuse_buf& first = in->buf[0];
  size_t size = fuse_buf_size(in);
  std::span<const uint8_t> data;
  if (in->count == 1 && in->idx == 0 && in->off == 0 && (first.flags & FUSE_BUF_IS_FD) == 0 &&
      ((fh.flags & O_DIRECT) == 0 || backend::IsAligned(first.mem, backend::kDirectAlignment))) {
    data = {static_cast<const uint8_t*>(first.mem), size};
  } else {
    // libfuse's buffer sits just after the request header: never aligned enough for O_DIRECT
    // (the io_uring transport's is: its payload starts on a page).
    uint8_t* buf = write_buffer.Get(size);
    struct fuse_bufvec dst = FUSE_BUFVEC_INIT(size);
    dst.buf[0].mem = buf;
    ssize_t n = fuse_buf_copy(&dst, in, FUSE_BUF_NO_SPLICE);
    if (n < 0) return PosixError("receiving write data", static_cast<int>(-n));
    data = {buf, static_cast<size_t>(n)};
  }
  VMETAFS_RETURN_IF_ERROR(WriteThrough(fh, static_cast<uint64_t>(offset), data));
  *written = data.size();
  return Status::Ok();
}

Status Filesystem::Fsync(fuse_file_info* fi, bool datasync) {
  FileHandle& fh = Handle(fi);
  auto sync = [&] { return fh.file->Fsync(datasync); };
  return fh.image != nullptr ? fh.image->Flush(sync) : sync();
}

void Filesystem::Release(fuse_file_info* fi) { CloseHandle(&Handle(fi)); }

Status Filesystem::Fallocate(fuse_file_info* fi, int mode, off_t offset, off_t length) {
  FileHandle& fh = Handle(fi);
  VMETAFS_RETURN_IF_ERROR(KillSuidGidIfAsked(*fh.inode, fh.file.get()));
  uint64_t off = static_cast<uint64_t>(offset), len = static_cast<uint64_t>(length);
  auto allocate = [&] { return fh.file->Fallocate(mode, off, len); };
  if (fh.image == nullptr) return allocate();
  if ((mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)) != 0) {
    // Shifting the file's content moves every table behind the range: nothing an image survives.
    if (fh.image->is_image()) {
      return Status::NotSupported("collapse/insert range on a disk image");
    }
    return allocate();
  }
  if ((mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) != 0) {
    return fh.image->Discard(off, len, allocate);
  }
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(fh.file->Fstat(&st));
  if ((mode & FALLOC_FL_KEEP_SIZE) == 0 && off + len > static_cast<uint64_t>(st.st_size)) {
    return fh.image->Truncate(off + len, allocate);  // the file grows, as by truncate
  }
  return allocate();
}

Status Filesystem::Lseek(fuse_file_info* fi, off_t offset, int whence, off_t* result) {
  uint64_t r = 0;
  VMETAFS_RETURN_IF_ERROR(Handle(fi).file->Lseek(static_cast<uint64_t>(offset), whence, &r));
  *result = static_cast<off_t>(r);
  return Status::Ok();
}

Status Filesystem::CopyFileRange(fuse_file_info* fi_in, off_t off_in, fuse_file_info* fi_out,
                                 off_t off_out, size_t len, int flags, size_t* copied) {
  if (flags != 0) return Status::InvalidArgument("copy_file_range: flags must be 0");
  FileHandle& in = Handle(fi_in);
  FileHandle& out = Handle(fi_out);
  uint64_t from = static_cast<uint64_t>(off_in), to = static_cast<uint64_t>(off_out);
  // The store must see what lands in a tracked file (it may be an image being copied in), and
  // restored metadata of a source must be read as the client would read it.
  bool through_store = out.image != nullptr || (in.image != nullptr && in.image->is_image());
  if (!through_store) {
    Status st = in.file->CopyRangeTo(from, *out.file, to, len, copied);
    int err = st.Errno();
    if (st.ok() || (err != EXDEV && err != EOPNOTSUPP && err != ENOSYS)) return st;
  }
  return CopyThrough(in, from, out, to, len, copied);
}

Status Filesystem::CopyThrough(FileHandle& in, uint64_t off_in, FileHandle& out, uint64_t off_out,
                               size_t len, size_t* copied) {
  *copied = 0;
  while (*copied < len) {
    size_t chunk = std::min(len - *copied, config_.max_write);
    uint8_t* buf = copy_buffer.Get(chunk);
    size_t got = 0;
    Status st = in.file->Read(off_in + *copied, {buf, chunk}, &got);
    if (st.ok() && got > 0) {
      if (in.image != nullptr) in.image->PatchRead(off_in + *copied, {buf, got});
      st = WriteThrough(out, off_out + *copied, {buf, got});
    }
    // Like write(2): a failure after some progress reports the progress.
    if (!st.ok()) return *copied > 0 ? Status::Ok() : st;
    *copied += got;
    if (got < chunk) break;
  }
  return Status::Ok();
}

Status Filesystem::Getlk(fuse_file_info* fi, struct flock* lock) {
  return Handle(fi).file->Getlk(lock);
}

Status Filesystem::Setlk(fuse_file_info* fi, const struct flock& lock, bool wait) {
  return Handle(fi).file->Setlk(lock, wait);
}

Status Filesystem::Flock(fuse_file_info* fi, int op) { return Handle(fi).file->Flock(op); }

}  // namespace vmetafs::fusefs
