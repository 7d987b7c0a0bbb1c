#include "fusefs/backend/nfs_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <nfsc/libnfs.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace vmetafs::backend {
namespace {

// At most this many READs/WRITEs of one request are in flight at once on a connection.
constexpr uint64_t kMaxInFlight = 64;

// The chunks of one pipelined request. Callbacks run inside nfs_service() or, for chunks still
// pending when a dead connection is destroyed, inside nfs_destroy_context(): each holds a
// reference, so the batch outlives a waiter that gave up.
struct Batch {
  int pending = 0;
  bool abandoned = false;
  std::vector<int> result;     // bytes or -errno, per chunk
  std::vector<uint8_t*> dest;  // reads: where each chunk's bytes go
  std::vector<uint64_t> length;
};

struct ChunkArg {
  std::shared_ptr<Batch> batch;
  size_t index;
};

void OnChunk(int err, nfs_context*, void* data, void* private_data) {
  std::unique_ptr<ChunkArg> arg(static_cast<ChunkArg*>(private_data));
  Batch& b = *arg->batch;
  --b.pending;
  b.result[arg->index] = err;
  if (err > 0 && !b.abandoned && b.dest[arg->index] != nullptr) {
    std::memcpy(b.dest[arg->index], data, std::min<uint64_t>(err, b.length[arg->index]));
  }
}

// Runs the connection's event loop until every chunk is answered; -EIO if the connection failed.
int Drive(nfs_context* ctx, const Batch& batch) {
  while (batch.pending > 0) {
    pollfd pfd{nfs_get_fd(ctx), static_cast<short>(nfs_which_events(ctx)), 0};
    int ready = poll(&pfd, 1, 100);  // wakes up regularly so libnfs can time RPCs out
    if (ready < 0 && errno != EINTR) return -EIO;
    if (nfs_service(ctx, ready > 0 ? pfd.revents : 0) < 0) return -EIO;
  }
  return 0;
}

// Sends [offset, offset + count) as READs or WRITEs of at most `max` bytes each, all in flight
// together. Returns the bytes done from `offset` on (up to the first short or failed chunk), or
// -errno when the first chunk failed.
int PipelinedIo(NfsConn& conn, nfsfh* fh, bool write, uint64_t offset, uint8_t* buf, uint64_t count,
                uint64_t max) {
  auto batch = std::make_shared<Batch>();
  const size_t chunks = (count + max - 1) / max;
  batch->result.assign(chunks, -EIO);
  batch->dest.assign(chunks, nullptr);
  batch->length.assign(chunks, 0);
  size_t issued = 0;
  for (; issued < chunks; ++issued) {
    uint64_t at = issued * max, len = std::min(max, count - at);
    batch->length[issued] = len;
    if (!write) batch->dest[issued] = buf + at;
    auto* arg = new ChunkArg{batch, issued};
    ++batch->pending;
    int rc = write ? nfs_pwrite_async(conn.ctx, fh, offset + at, len, buf + at, OnChunk, arg)
                   : nfs_pread_async(conn.ctx, fh, offset + at, len, OnChunk, arg);
    if (rc < 0) {
      --batch->pending;
      delete arg;
      break;
    }
  }
  if (int rc = Drive(conn.ctx, *batch); rc < 0) {
    batch->abandoned = true;
    return rc;
  }
  uint64_t done = 0;
  for (size_t i = 0; i < issued; ++i) {
    int r = batch->result[i];
    if (r < 0) return done > 0 ? static_cast<int>(done) : r;
    done += static_cast<uint64_t>(r);
    if (static_cast<uint64_t>(r) < batch->length[i]) break;
  }
  return issued == 0 ? -EIO : static_cast<int>(done);
}

}  // namespace

std::string NfsShared::NfsPath(const std::string& rel) const {
  if (rel.empty()) return prefix.empty() ? "/" : prefix;
  return prefix + "/" + rel;
}

std::string NfsShared::PathOf(uint64_t id) const {
  std::lock_guard lock(mu_);
  auto it = paths_.find(id);
  return it == paths_.end() ? std::string() : it->second;
}

void NfsShared::SetPath(uint64_t id, std::string path) {
  std::lock_guard lock(mu_);
  paths_[id] = std::move(path);
}

void NfsShared::ForgetPath(uint64_t id) {
  std::lock_guard lock(mu_);
  paths_.erase(id);
}

void NfsShared::Renamed(const std::string& from, const std::string& to) {
  std::lock_guard lock(mu_);
  for (auto& [id, path] : paths_) {
    if (path == from) {
      path = to;
    } else if (path.size() > from.size() && path.starts_with(from) && path[from.size()] == '/') {
      path = to + path.substr(from.size());
    }
  }
}

void NfsStatToStat(const nfs_stat_64& in, struct stat* out) {
  *out = {};
  out->st_dev = in.nfs_dev;
  out->st_ino = in.nfs_ino;
  out->st_mode = static_cast<mode_t>(in.nfs_mode);
  out->st_nlink = in.nfs_nlink;
  out->st_uid = static_cast<uid_t>(in.nfs_uid);
  out->st_gid = static_cast<gid_t>(in.nfs_gid);
  out->st_rdev = in.nfs_rdev;
  out->st_size = static_cast<off_t>(in.nfs_size);
  out->st_blksize = static_cast<blksize_t>(in.nfs_blksize);
  out->st_blocks = static_cast<blkcnt_t>(in.nfs_blocks);
  out->st_atim = {static_cast<time_t>(in.nfs_atime), static_cast<long>(in.nfs_atime_nsec)};
  out->st_mtim = {static_cast<time_t>(in.nfs_mtime), static_cast<long>(in.nfs_mtime_nsec)};
  out->st_ctim = {static_cast<time_t>(in.nfs_ctime), static_cast<long>(in.nfs_ctime_nsec)};
}

NfsFile::NfsFile(std::shared_ptr<NfsShared> shared, uint64_t id, int reopen_flags)
    : shared_(std::move(shared)), id_(id), reopen_flags_(reopen_flags) {}

NfsFile::~NfsFile() {
  shared_->locks.ReleaseOwner(this);
  shared_->pool->CloseFile(id_);
  shared_->ForgetPath(id_);
}

Status NfsFile::WithHandle(std::string_view what, const HandleCall& call) const {
  const std::string path = shared_->PathOf(id_);
  bool path_gone = false;
  auto run = [&](NfsConn& conn) -> int {
    nfsfh* fh = nullptr;
    if (auto it = conn.files.find(id_); it != conn.files.end()) {
      fh = it->second;
    } else {
      int rc = nfs_open(conn.ctx, shared_->NfsPath(path).c_str(), reopen_flags_, &fh);
      if (rc < 0) {
        path_gone = rc == -ENOENT || rc == -ESTALE;
        return rc;
      }
      conn.files.emplace(id_, fh);
      conn.files_dirty = true;
    }
    return call(conn, fh);
  };
  Status st = shared_->pool->Run(what, path, run, id_);
  if (!st.ok() && path_gone) st = shared_->pool->Run(what, path, run, id_, /*only_open=*/true);
  return st;
}

Status NfsFile::Read(uint64_t offset, std::span<uint8_t> out, size_t* done) const {
  *done = 0;
  while (*done < out.size()) {
    int got = 0;
    VMETAFS_RETURN_IF_ERROR(WithHandle("read", [&](NfsConn& conn, nfsfh* fh) {
      uint64_t count = std::min<uint64_t>(out.size() - *done, conn.readmax * kMaxInFlight);
      int n = PipelinedIo(conn, fh, false, offset + *done, out.data() + *done, count, conn.readmax);
      got = std::max(n, 0);
      return n;
    }));
    if (got == 0) break;  // end of file
    *done += static_cast<size_t>(got);
  }
  return Status::Ok();
}

Status NfsFile::Write(uint64_t offset, std::span<const uint8_t> data, size_t* done) {
  *done = 0;
  while (*done < data.size()) {
    int put = 0;
    VMETAFS_RETURN_IF_ERROR(WithHandle("write", [&](NfsConn& conn, nfsfh* fh) {
      uint64_t count = std::min<uint64_t>(data.size() - *done, conn.writemax * kMaxInFlight);
      int n = PipelinedIo(conn, fh, true, offset + *done, const_cast<uint8_t*>(data.data()) + *done,
                          count, conn.writemax);
      put = std::max(n, 0);
      return n;
    }));
    if (put == 0) return Status::IoError("nfs write: the server accepted no bytes", EIO);
    *done += static_cast<size_t>(put);
  }
  return Status::Ok();
}

Status NfsFile::ReadAt(uint64_t offset, std::span<uint8_t> out) const {
  size_t done = 0;
  VMETAFS_RETURN_IF_ERROR(Read(offset, out, &done));
  if (done != out.size()) {
    return Status::InvalidArgument(
        fmt::format("read of {} bytes at {} reaches past the end of '{}'", out.size(), offset,
                    shared_->PathOf(id_)));
  }
  return Status::Ok();
}

Status NfsFile::WriteAt(uint64_t offset, std::span<const uint8_t> data) {
  size_t done = 0;
  return Write(offset, data, &done);
}

Status NfsFile::Fsync(bool) {
  return WithHandle("fsync", [](NfsConn& conn, nfsfh* fh) { return nfs_fsync(conn.ctx, fh); });
}

Status NfsFile::Truncate(uint64_t size) {
  return WithHandle("truncate",
                    [size](NfsConn& conn, nfsfh* fh) { return nfs_ftruncate(conn.ctx, fh, size); });
}

Status NfsFile::Chmod(mode_t mode) {
  return WithHandle("chmod", [mode](NfsConn& conn, nfsfh* fh) {
    return nfs_fchmod(conn.ctx, fh, static_cast<int>(mode & 07777));
  });
}

Status NfsFile::Fstat(struct stat* st) const {
  nfs_stat_64 s{};
  VMETAFS_RETURN_IF_ERROR(WithHandle(
      "fstat", [&s](NfsConn& conn, nfsfh* fh) { return nfs_fstat64(conn.ctx, fh, &s); }));
  NfsStatToStat(s, st);
  fileid_.store(s.nfs_ino);
  return Status::Ok();
}

Status NfsFile::Size(uint64_t* size) const {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(Fstat(&st));
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

Status NfsFile::Identity(store::FileIdentity* id) const {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(Fstat(&st));
  *id = {};
  id->size = static_cast<uint64_t>(st.st_size);
  id->mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  id->ctime_ns = int64_t{st.st_ctim.tv_sec} * 1000000000 + st.st_ctim.tv_nsec;
  id->ino = st.st_ino;  // the NFS file id; libnfs 4.0 does not expose the change attribute
  return Status::Ok();
}

Status NfsFile::Fallocate(int mode, uint64_t offset, uint64_t length) {
  if (mode != 0) {
    return Status::NotSupported("fallocate modes other than 0 are not available over NFS");
  }
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(Size(&size));
  return offset + length > size ? Truncate(offset + length) : Status::Ok();
}

Status NfsFile::Lseek(uint64_t offset, int whence, uint64_t* result) const {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    return Status::InvalidArgument("lseek: only SEEK_DATA and SEEK_HOLE are forwarded");
  }
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(Size(&size));
  if (offset >= size) return Status::IoError("lseek past the end of the file", ENXIO);
  *result = whence == SEEK_DATA ? offset : size;
  return Status::Ok();
}

Status NfsFile::LockKey(uint64_t* key) const {
  if (fileid_.load() == 0) {
    struct stat st;
    VMETAFS_RETURN_IF_ERROR(Fstat(&st));
  }
  *key = fileid_.load();
  return Status::Ok();
}

Status NfsFile::Getlk(struct flock* lock) {
  uint64_t key = 0;
  VMETAFS_RETURN_IF_ERROR(LockKey(&key));
  return shared_->locks.Test(key, this, lock);
}

Status NfsFile::Setlk(const struct flock& lock, bool wait) {
  uint64_t key = 0;
  VMETAFS_RETURN_IF_ERROR(LockKey(&key));
  return shared_->locks.Set(key, this, lock, wait);
}

Status NfsFile::Flock(int op) {
  uint64_t key = 0;
  VMETAFS_RETURN_IF_ERROR(LockKey(&key));
  return shared_->locks.Flock(key, this, op);
}

Status NfsFile::CopyRangeTo(uint64_t, File&, uint64_t, size_t, size_t*) {
  return Status::NotSupported("copy_file_range: NFSv3 has no server-side copy");
}

}  // namespace vmetafs::backend
