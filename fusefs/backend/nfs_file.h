// NfsFile: an open file of an NfsBackend.
//
// The file is opened lazily, by its path, on each pooled connection that serves one of its
// requests (libnfs handles belong to one context); the path follows renames made through the same
// backend. If the path no longer resolves (the file was unlinked while open), requests go to a
// connection that still holds it open; after that connection dropped, they fail with ENOENT.
//
// Durability: every WRITE is sent FILE_SYNC (the file is opened O_SYNC on the server), so a write
// that returned is on the server's stable storage. libnfs 4.0's file API does not expose the
// WRITE/COMMIT verifiers, so with UNSTABLE writes a server restart between WRITE and COMMIT could
// lose acknowledged data unnoticed; FILE_SYNC needs no client-side buffering or resending. Fsync
// and Sync still send COMMIT (cheap after stable writes). Reads and writes are split at the
// negotiated rsize/wsize.
//
// Locks are emulated in this process only (NfsLockTable). Fallocate: mode 0 extends the size (no
// space is reserved on NFSv3); other modes are NotSupported. Lseek: the whole file is data
// (SEEK_HOLE = size). CopyRangeTo: NotSupported. Thread safety: all methods, any thread.
#pragma once

#include <fcntl.h>  // before backend.h, which names struct flock without including it
#include <sys/stat.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "fusefs/backend/backend.h"
#include "fusefs/backend/nfs_lock_table.h"
#include "fusefs/backend/nfs_pool.h"

struct nfs_stat_64;

namespace vmetafs::backend {

// What an NfsBackend shares with its open files (which may outlive it).
struct NfsShared {
  std::shared_ptr<NfsPool> pool;
  NfsLockTable locks;
  std::string prefix;  // the URL's directory below the export, "" or "/a/b"

  // The path libnfs is given for a path relative to the backing root.
  std::string NfsPath(const std::string& rel) const;
  // Open files' current relative paths, by file id; Rename moves them.
  std::string PathOf(uint64_t id) const;
  void SetPath(uint64_t id, std::string path);
  void ForgetPath(uint64_t id);
  void Renamed(const std::string& from, const std::string& to);

 private:
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, std::string> paths_;
};

void NfsStatToStat(const nfs_stat_64& in, struct stat* out);

class NfsFile : public File {
 public:
  // `id` is already registered (SetPath) and may hold a handle on some connection.
  NfsFile(std::shared_ptr<NfsShared> shared, uint64_t id, int reopen_flags);
  ~NfsFile() override;

  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override;
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override;
  Status Sync() override { return Fsync(false); }
  Status Size(uint64_t* size) const override;
  Status Identity(store::FileIdentity* id) const override;

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

 private:
  using HandleCall = std::function<int(NfsConn&, struct nfsfh*)>;
  Status WithHandle(std::string_view what, const HandleCall& call) const;
  Status LockKey(uint64_t* key) const;

  std::shared_ptr<NfsShared> shared_;
  const uint64_t id_;
  const int reopen_flags_;
  mutable std::atomic<uint64_t> fileid_{0};  // the server's file id, for the lock table
};

}  // namespace vmetafs::backend
