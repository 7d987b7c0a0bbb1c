#include "fusefs/backend/nfs_lock_table.h"

#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <limits>

namespace vmetafs::backend {
namespace {

constexpr uint64_t kToEof = std::numeric_limits<uint64_t>::max();

// Turns l_start/l_len (SEEK_SET only: the FUSE layer hands absolute ranges) into [start, end).
Status ToRange(const struct flock& lock, uint64_t* start, uint64_t* end) {
  if (lock.l_whence != SEEK_SET) return Status::InvalidArgument("lock: only SEEK_SET ranges");
  int64_t s = lock.l_start, len = lock.l_len;
  if (len < 0) {
    s += len;
    len = -len;
  }
  if (s < 0) return Status::InvalidArgument("lock: negative start");
  *start = static_cast<uint64_t>(s);
  *end = len == 0 ? kToEof : *start + static_cast<uint64_t>(len);
  return Status::Ok();
}

}  // namespace

bool NfsLockTable::Conflicts(const Range& a, const Range& b) {
  if (a.owner == b.owner || a.whole_file_flock != b.whole_file_flock) return false;
  if (a.type != F_WRLCK && b.type != F_WRLCK) return false;
  return a.start < b.end && b.start < a.end;
}

const NfsLockTable::Range* NfsLockTable::FindConflict(uint64_t file, const Range& want) const {
  auto it = locks_.find(file);
  if (it == locks_.end()) return nullptr;
  for (const Range& r : it->second) {
    if (Conflicts(r, want)) return &r;
  }
  return nullptr;
}

// Cuts [start, end) out of the owner's ranges, splitting a range that covers it.
void NfsLockTable::Remove(uint64_t file, const void* owner, bool flock, uint64_t start,
                          uint64_t end) {
  auto it = locks_.find(file);
  if (it == locks_.end()) return;
  std::vector<Range> kept;
  for (const Range& r : it->second) {
    if (r.owner != owner || r.whole_file_flock != flock || r.end <= start || end <= r.start) {
      kept.push_back(r);
      continue;
    }
    if (r.start < start) kept.push_back(Range{r.owner, flock, r.type, r.start, start});
    if (end < r.end) kept.push_back(Range{r.owner, flock, r.type, end, r.end});
  }
  if (kept.empty()) {
    locks_.erase(it);
  } else {
    it->second = std::move(kept);
  }
  released_.notify_all();
}

Status NfsLockTable::Place(uint64_t file, const Range& want, bool wait) {
  std::unique_lock lock(mu_);
  while (FindConflict(file, want) != nullptr) {
    if (!wait) return Status::IoError("lock held by another open file", EAGAIN);
    released_.wait(lock);
  }
  Remove(file, want.owner, want.whole_file_flock, want.start, want.end);
  locks_[file].push_back(want);
  return Status::Ok();
}

Status NfsLockTable::Test(uint64_t file, const void* owner, struct flock* lock) {
  Range want{owner, false, lock->l_type, 0, 0};
  VMETAFS_RETURN_IF_ERROR(ToRange(*lock, &want.start, &want.end));
  std::lock_guard guard(mu_);
  const Range* c = FindConflict(file, want);
  if (c == nullptr) {
    lock->l_type = F_UNLCK;
    return Status::Ok();
  }
  lock->l_type = c->type;
  lock->l_whence = SEEK_SET;
  lock->l_start = static_cast<off_t>(c->start);
  lock->l_len = c->end == kToEof ? 0 : static_cast<off_t>(c->end - c->start);
  lock->l_pid = 0;  // the owner is an open file, not a process (as for OFD locks)
  return Status::Ok();
}

Status NfsLockTable::Set(uint64_t file, const void* owner, const struct flock& lock, bool wait) {
  Range want{owner, false, lock.l_type, 0, 0};
  VMETAFS_RETURN_IF_ERROR(ToRange(lock, &want.start, &want.end));
  if (lock.l_type == F_UNLCK) {
    std::lock_guard guard(mu_);
    Remove(file, owner, false, want.start, want.end);
    return Status::Ok();
  }
  if (lock.l_type != F_RDLCK && lock.l_type != F_WRLCK) {
    return Status::InvalidArgument("lock: bad l_type");
  }
  return Place(file, want, wait);
}

Status NfsLockTable::Flock(uint64_t file, const void* owner, int op) {
  bool wait = (op & LOCK_NB) == 0;
  switch (op & ~LOCK_NB) {
    case LOCK_UN: {
      std::lock_guard guard(mu_);
      Remove(file, owner, true, 0, kToEof);
      return Status::Ok();
    }
    case LOCK_SH:
      return Place(file, Range{owner, true, F_RDLCK, 0, kToEof}, wait);
    case LOCK_EX:
      return Place(file, Range{owner, true, F_WRLCK, 0, kToEof}, wait);
    default:
      return Status::InvalidArgument("flock: bad operation");
  }
}

void NfsLockTable::ReleaseOwner(const void* owner) {
  std::lock_guard guard(mu_);
  for (auto it = locks_.begin(); it != locks_.end();) {
    std::erase_if(it->second, [owner](const Range& r) { return r.owner == owner; });
    it = it->second.empty() ? locks_.erase(it) : std::next(it);
  }
  released_.notify_all();
}

}  // namespace vmetafs::backend
