// NfsLockTable: POSIX record locks and flock() locks emulated inside this process.
//
// libnfs 4.0 offers no usable NLM / NFSv4 LOCK client, so the NFS backend keeps its locks here.
// They coordinate the opens of one vmetafs process only (each open file is one lock owner, like
// Linux OFD locks); they do NOT coordinate with other hosts or other NFS clients of the share.
// Files are identified by the server's file id. Thread safe; Set(wait=true) blocks until granted.
#pragma once

#include <fcntl.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "store/status.h"

namespace vmetafs::backend {

class NfsLockTable {
 public:
  // F_GETLK: sets lock->l_type to F_UNLCK when `lock` could be placed, else describes a conflict.
  Status Test(uint64_t file, const void* owner, struct flock* lock);
  // F_SETLK / F_SETLKW (F_UNLCK releases). EAGAIN when a conflict exists and !wait.
  Status Set(uint64_t file, const void* owner, const struct flock& lock, bool wait);
  // flock(2): LOCK_SH, LOCK_EX, LOCK_UN, optionally | LOCK_NB (EWOULDBLOCK on conflict).
  Status Flock(uint64_t file, const void* owner, int op);
  // Drops every lock of `owner` (on close).
  void ReleaseOwner(const void* owner);

 private:
  struct Range {
    const void* owner;
    bool whole_file_flock;  // flock() and POSIX locks do not interact (as on Linux)
    short type;             // F_RDLCK / F_WRLCK
    uint64_t start;
    uint64_t end;  // exclusive; UINT64_MAX means to end of file
  };
  static bool Conflicts(const Range& a, const Range& b);
  const Range* FindConflict(uint64_t file, const Range& want) const;
  void Remove(uint64_t file, const void* owner, bool flock, uint64_t start, uint64_t end);
  Status Place(uint64_t file, const Range& want, bool wait);

  std::mutex mu_;
  std::condition_variable released_;
  std::unordered_map<uint64_t, std::vector<Range>> locks_;
};

}  // namespace vmetafs::backend
