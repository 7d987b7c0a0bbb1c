#include "fusefs/operations.h"

#include <linux/fuse.h>
#include <spdlog/spdlog.h>
#include <sys/uio.h>

#include <cerrno>
#include <exception>

#include "fusefs/filesystem.h"

namespace vmetafs::fusefs {
namespace {

Filesystem& Fs(fuse_req_t req) { return *static_cast<Filesystem*>(fuse_req_userdata(req)); }

// Runs one operation body; an exception becomes EIO (it is thrown before any reply was sent:
// the replies themselves are C and do not throw).
template <typename Body>
void Serve(fuse_req_t req, const char* op, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    spdlog::error("{}: {}", op, e.what());
    fuse_reply_err(req, EIO);
  } catch (...) {
    spdlog::error("{}: unknown exception", op);
    fuse_reply_err(req, EIO);
  }
}

// Replies with the Status's errno, or runs `reply` when it is OK.
template <typename Reply>
void Finish(fuse_req_t req, const char* op, const Status& st, Reply&& reply) {
  if (st.ok()) return reply();
  int err = ErrnoOf(st);
  if (err == EIO) {
    spdlog::warn("{}: {}", op, st.ToString());
  } else {
    spdlog::debug("{}: {}", op, st.ToString());
  }
  fuse_reply_err(req, err);
}

void ReplyStatus(fuse_req_t req, const char* op, const Status& st) {
  Finish(req, op, st, [&] { fuse_reply_err(req, 0); });
}

// A reply the kernel did not take (the caller was interrupted) leaves no lookup or handle
// behind that the kernel would later forget or release: undo it here.
void ReplyEntry(fuse_req_t req, const fuse_entry_param& e) {
  if (fuse_reply_entry(req, &e) == -ENOENT) Fs(req).Forget(e.ino, 1);
}

// fuse_reply_open's reply, plus FOPEN_PARALLEL_DIRECT_WRITES for direct-I/O files: without it the
// kernel holds the inode lock across each direct write's round trip, so a client's parallel writes
// to one image reach the daemon one at a time. libfuse 3.14's fuse_file_info has no bit for the
// flag (3.15 added one), so the reply is built here; older kernels ignore the unknown bit.
int ReplyOpen(fuse_req_t req, const fuse_file_info& fi) {
  struct fuse_open_out out = {};
  out.fh = fi.fh;
  if (fi.direct_io) out.open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
  if (fi.keep_cache) out.open_flags |= FOPEN_KEEP_CACHE;
  if (fi.nonseekable) out.open_flags |= FOPEN_NONSEEKABLE;
  if (fi.noflush) out.open_flags |= FOPEN_NOFLUSH;
  struct iovec iov = {&out, sizeof(out)};
  return fuse_reply_iov(req, &iov, 1);
}

void ReplyXattr(fuse_req_t req, const std::string& value, size_t size) {
  if (size == 0) {
    fuse_reply_xattr(req, value.size());
  } else if (value.size() > size) {
    fuse_reply_err(req, ERANGE);
  } else {
    fuse_reply_buf(req, value.data(), value.size());
  }
}

void Init(void* userdata, fuse_conn_info* conn) {
  const FsConfig& config = static_cast<Filesystem*>(userdata)->config();
  auto want = [conn](unsigned cap) {
    if ((conn->capable & cap) != 0) conn->want |= cap;
  };
  want(FUSE_CAP_ASYNC_DIO);
  want(FUSE_CAP_PARALLEL_DIROPS);
  want(FUSE_CAP_POSIX_LOCKS);
  want(FUSE_CAP_FLOCK_LOCKS);
  // No writeback cache (the store must see writes in the client's order), no export support,
  // no splice (every write is copied into an aligned buffer anyway), and the kernel itself
  // clears set-user-ID bits on write (the daemon writes as root, which would keep them).
  conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_EXPORT_SUPPORT | FUSE_CAP_SPLICE_READ |
                  FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_HANDLE_KILLPRIV);
  conn->max_write = static_cast<unsigned>(config.max_write);
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, config.max_write);
  // Room for qemu's parallel asynchronous direct I/O.
  conn->max_background = 64;
  conn->congestion_threshold = 48;
}

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "lookup", [&] {
    fuse_entry_param e;
    Finish(req, "lookup", Fs(req).Lookup(parent, name, &e), [&] { ReplyEntry(req, e); });
  });
}

void Forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  Serve(req, "forget", [&] {
    Fs(req).Forget(ino, nlookup);
    fuse_reply_none(req);
  });
}

void ForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  Serve(req, "forget_multi", [&] {
    for (size_t i = 0; i < count; ++i) Fs(req).Forget(forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
  });
}

void Getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Serve(req, "getattr", [&] {
    struct stat st;
    Finish(req, "getattr", Fs(req).Getattr(ino, fi, &st),
           [&] { fuse_reply_attr(req, &st, Fs(req).config().timeout); });
  });
}

void Setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
  Serve(req, "setattr", [&] {
    struct stat st;
    Finish(req, "setattr", Fs(req).Setattr(ino, *attr, to_set, fi, &st),
           [&] { fuse_reply_attr(req, &st, Fs(req).config().timeout); });
  });
}

void Readlink(fuse_req_t req, fuse_ino_t ino) {
  Serve(req, "readlink", [&] {
    std::string target;
    Finish(req, "readlink", Fs(req).Readlink(ino, &target),
           [&] { fuse_reply_readlink(req, target.c_str()); });
  });
}

void Mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  Serve(req, "mknod", [&] {
    fuse_entry_param e;
    Finish(req, "mknod", Fs(req).Mknod(parent, name, mode, rdev, fuse_req_ctx(req), &e),
           [&] { ReplyEntry(req, e); });
  });
}

void Mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  Serve(req, "mkdir", [&] {
    fuse_entry_param e;
    Finish(req, "mkdir", Fs(req).Mkdir(parent, name, mode, fuse_req_ctx(req), &e),
           [&] { ReplyEntry(req, e); });
  });
}

void Symlink(fuse_req_t req, const char* target, fuse_ino_t parent, const char* name) {
  Serve(req, "symlink", [&] {
    fuse_entry_param e;
    Finish(req, "symlink", Fs(req).Symlink(target, parent, name, fuse_req_ctx(req), &e),
           [&] { ReplyEntry(req, e); });
  });
}

void Link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name) {
  Serve(req, "link", [&] {
    fuse_entry_param e;
    Finish(req, "link", Fs(req).Link(ino, parent, name, &e), [&] { ReplyEntry(req, e); });
  });
}

void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "unlink", [&] { ReplyStatus(req, "unlink", Fs(req).Unlink(parent, name)); });
}

void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "rmdir", [&] { ReplyStatus(req, "rmdir", Fs(req).Rmdir(parent, name)); });
}

void Rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
            const char* new_name, unsigned flags) {
  Serve(req, "rename", [&] {
    ReplyStatus(req, "rename", Fs(req).Rename(parent, name, new_parent, new_name, flags));
  });
}

void Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Serve(req, "open", [&] {
    Finish(req, "open", Fs(req).Open(ino, fi), [&] {
      if (ReplyOpen(req, *fi) == -ENOENT) Fs(req).Release(fi);
    });
  });
}

void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  Serve(req, "create", [&] {
    fuse_entry_param e;
    Status st = Fs(req).Create(parent, name, mode, fuse_req_ctx(req), fi, &e);
    Finish(req, "create", st, [&] {
      if (fuse_reply_create(req, &e, fi) != -ENOENT) return;
      Fs(req).Release(fi);
      Fs(req).Forget(e.ino, 1);
    });
  });
}

void Read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  Serve(req, "read", [&] {
    std::span<const uint8_t> data;
    Finish(req, "read", Fs(req).Read(fi, size, off, &data),
           [&] { fuse_reply_buf(req, reinterpret_cast<const char*>(data.data()), data.size()); });
  });
}

void WriteBuf(fuse_req_t req, fuse_ino_t, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
  Serve(req, "write", [&] {
    size_t written = 0;
    Finish(req, "write", Fs(req).Write(fi, in, off, &written),
           [&] { fuse_reply_write(req, written); });
  });
}

// close(2) of one descriptor: nothing to do, data is written through and locks are released by
// the kernel's unlock requests or with the backing descriptor.
void Flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }

void Release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  Serve(req, "release", [&] {
    Fs(req).Release(fi);
    fuse_reply_err(req, 0);
  });
}

void Fsync(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  Serve(req, "fsync", [&] { ReplyStatus(req, "fsync", Fs(req).Fsync(fi, datasync != 0)); });
}

void Opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Serve(req, "opendir", [&] {
    Finish(req, "opendir", Fs(req).Opendir(ino, fi), [&] {
      if (fuse_reply_open(req, fi) == -ENOENT) Fs(req).Releasedir(fi);
    });
  });
}

void ReaddirAny(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi,
                bool plus) {
  const char* op = plus ? "readdirplus" : "readdir";
  Serve(req, op, [&] {
    std::vector<char> buf;
    Finish(req, op, Fs(req).Readdir(req, ino, size, off, fi, plus, &buf),
           [&] { fuse_reply_buf(req, buf.data(), buf.size()); });
  });
}

void Readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  ReaddirAny(req, ino, size, off, fi, false);
}

void Readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  ReaddirAny(req, ino, size, off, fi, true);
}

void Releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  Serve(req, "releasedir", [&] {
    Fs(req).Releasedir(fi);
    fuse_reply_err(req, 0);
  });
}

void Fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  Serve(req, "fsyncdir",
        [&] { ReplyStatus(req, "fsyncdir", Fs(req).Fsyncdir(ino, datasync != 0)); });
}

void Statfs(fuse_req_t req, fuse_ino_t ino) {
  Serve(req, "statfs", [&] {
    struct statvfs st;
    Finish(req, "statfs", Fs(req).Statfs(ino, &st), [&] { fuse_reply_statfs(req, &st); });
  });
}

void Setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
              int flags) {
  Serve(req, "setxattr", [&] {
    ReplyStatus(req, "setxattr", Fs(req).SetXattr(ino, name, {value, size}, flags));
  });
}

void Getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Serve(req, "getxattr", [&] {
    std::string value;
    Finish(req, "getxattr", Fs(req).GetXattr(ino, name, &value),
           [&] { ReplyXattr(req, value, size); });
  });
}

void Listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Serve(req, "listxattr", [&] {
    std::string names;
    Finish(req, "listxattr", Fs(req).ListXattr(ino, &names), [&] { ReplyXattr(req, names, size); });
  });
}

void Removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  Serve(req, "removexattr",
        [&] { ReplyStatus(req, "removexattr", Fs(req).RemoveXattr(ino, name)); });
}

void Getlk(fuse_req_t req, fuse_ino_t, fuse_file_info* fi, struct flock* lock) {
  Serve(req, "getlk", [&] {
    Finish(req, "getlk", Fs(req).Getlk(fi, lock), [&] { fuse_reply_lock(req, lock); });
  });
}

void Setlk(fuse_req_t req, fuse_ino_t, fuse_file_info* fi, struct flock* lock, int sleep) {
  Serve(req, "setlk", [&] { ReplyStatus(req, "setlk", Fs(req).Setlk(fi, *lock, sleep != 0)); });
}

void Flock(fuse_req_t req, fuse_ino_t, fuse_file_info* fi, int op) {
  Serve(req, "flock", [&] { ReplyStatus(req, "flock", Fs(req).Flock(fi, op)); });
}

void Fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t offset, off_t length,
               fuse_file_info* fi) {
  Serve(req, "fallocate",
        [&] { ReplyStatus(req, "fallocate", Fs(req).Fallocate(fi, mode, offset, length)); });
}

void Lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  Serve(req, "lseek", [&] {
    off_t result = 0;
    Finish(req, "lseek", Fs(req).Lseek(fi, off, whence, &result),
           [&] { fuse_reply_lseek(req, result); });
  });
}

void CopyFileRange(fuse_req_t req, fuse_ino_t, off_t off_in, fuse_file_info* fi_in, fuse_ino_t,
                   off_t off_out, fuse_file_info* fi_out, size_t len, int flags) {
  Serve(req, "copy_file_range", [&] {
    size_t copied = 0;
    Finish(req, "copy_file_range",
           Fs(req).CopyFileRange(fi_in, off_in, fi_out, off_out, len, flags, &copied),
           [&] { fuse_reply_write(req, copied); });
  });
}

fuse_lowlevel_ops AssignOperations() {
  fuse_lowlevel_ops ops = {};
  ops.init = Init;
  ops.lookup = Lookup;
  ops.forget = Forget;
  ops.forget_multi = ForgetMulti;
  ops.getattr = Getattr;
  ops.setattr = Setattr;
  ops.readlink = Readlink;
  ops.mknod = Mknod;
  ops.mkdir = Mkdir;
  ops.unlink = Unlink;
  ops.rmdir = Rmdir;
  ops.symlink = Symlink;
  ops.rename = Rename;
  ops.link = Link;
  ops.open = Open;
  ops.create = Create;
  ops.read = Read;
  ops.write_buf = WriteBuf;
  ops.flush = Flush;
  ops.release = Release;
  ops.fsync = Fsync;
  ops.opendir = Opendir;
  ops.readdir = Readdir;
  ops.readdirplus = Readdirplus;
  ops.releasedir = Releasedir;
  ops.fsyncdir = Fsyncdir;
  ops.statfs = Statfs;
  ops.setxattr = Setxattr;
  ops.getxattr = Getxattr;
  ops.listxattr = Listxattr;
  ops.removexattr = Removexattr;
  ops.getlk = Getlk;
  ops.setlk = Setlk;
  ops.flock = Flock;
  ops.fallocate = Fallocate;
  ops.lseek = Lseek;
  ops.copy_file_range = CopyFileRange;
  return ops;
}

}  // namespace

const fuse_lowlevel_ops& Operations() {
  static const fuse_lowlevel_ops ops = AssignOperations();
  return ops;
}

}  // namespace vmetafs::fusefs
