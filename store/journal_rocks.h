// RocksStore: the journal's RocksDB instance, its column families and its lock file. Private to
// store/journal.cc; the options chosen here are explained in docs/journal-format.md.
//
// Thread safety: after Open() and until Close(), every const method and Commit() may be called
// concurrently (RocksDB is thread-safe). Open() and Close() must not race with anything: the
// Journal guarantees that with its `life` lock.
#pragma once

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "store/status.h"

namespace vmetafs::store {

// Column families, in the order of their handles.
enum class Cf : uint8_t {
  kDefault,
  kImages,
  kPaths,
  kUnits,
  kContent,
  kHistory,
  kEvents,
  kQuarantine,
};
inline constexpr size_t kCfCount = 8;

// The lock file taken with flock(2) by a writable open, holding the holder's pid.
inline constexpr char kLockFileName[] = "LOCK.vmetafs";

// Maps a RocksDB status to ours: corruption stays Corruption, an I/O error keeps the errno its
// message names (ENOSPC, EROFS, EACCES...) or EIO.
Status FromRocks(const rocksdb::Status& s, std::string_view context);

// A rocksdb::WriteBatch that remembers the first error of its mutators, so that Commit reports
// it instead of the batch being silently incomplete.
class WriteSet {
 public:
  using Cfh = rocksdb::ColumnFamilyHandle;
  void Put(Cfh* cf, std::string_view k, std::string_view v) { Keep(batch_.Put(cf, S(k), S(v))); }
  void Merge(Cfh* cf, std::string_view k, std::string_view v) {
    Keep(batch_.Merge(cf, S(k), S(v)));
  }
  void Delete(Cfh* cf, std::string_view k) { Keep(batch_.Delete(cf, S(k))); }
  void DeleteRange(Cfh* cf, std::string_view begin, std::string_view end) {
    Keep(batch_.DeleteRange(cf, S(begin), S(end)));
  }
  rocksdb::WriteBatch* batch() { return &batch_; }
  const rocksdb::Status& status() const { return status_; }

 private:
  static rocksdb::Slice S(std::string_view s) { return rocksdb::Slice(s.data(), s.size()); }
  void Keep(rocksdb::Status s) {
    if (status_.ok()) status_ = std::move(s);
  }
  rocksdb::WriteBatch batch_;
  rocksdb::Status status_;
};

class RocksStore {
 public:
  using ScanFn = std::function<Status(std::string_view key, std::string_view value)>;
  using PairFn = std::function<Status(std::string_view key, std::string_view first,
                                      const std::string* second)>;

  RocksStore() = default;
  ~RocksStore();
  RocksStore(const RocksStore&) = delete;
  RocksStore& operator=(const RocksStore&) = delete;

  // Writable: creates `dir` if needed, takes the lock file (Busy when held), opens or creates the
  // DB. Read-only: takes no lock and writes nothing; NotFound when there is no store in `dir`.
  Status Open(const std::string& dir, bool read_only);
  // Reads the store record (format version, backing), creating it in a new store. Refuses a store
  // of another backing (InvalidArgument) unless `backing` is empty; a store recorded without a
  // backing is claimed by the first writable open that names one. *recorded: the backing now.
  Status ClaimStore(const std::string& backing, std::string* recorded);
  // Stops the periodic sync, syncs the WAL (writable opens), closes the DB and releases the
  // lock. Idempotent.
  Status Close();

  // Makes every write that returned before the call durable. Concurrent callers share one WAL
  // sync: a caller whose writes an earlier sync covered returns at once.
  Status SyncWal();
  // Writable opens: a thread that calls SyncWal() every `ms` milliseconds until Close().
  void StartPeriodicSync(uint32_t ms);

  bool is_open() const { return db_ != nullptr; }
  rocksdb::DB* db() const { return db_; }
  rocksdb::ColumnFamilyHandle* cf(Cf c) const { return handles_[static_cast<size_t>(c)]; }
  const std::string& dir() const { return dir_; }

  // NotFound when the key is absent.
  Status Get(Cf cf, std::string_view key, std::string* value,
             const rocksdb::Snapshot* snap = nullptr) const;
  // A max-merged counter; 0 when absent.
  Status GetCounter(Cf cf, std::string_view key, uint64_t* value,
                    const rocksdb::Snapshot* snap = nullptr) const;
  // Visits the keys that start with `prefix` (all keys for an empty prefix) in order; stops at
  // the first non-OK status of `fn` and returns it.
  Status Scan(Cf cf, std::string_view prefix, const rocksdb::Snapshot* snap,
              const ScanFn& fn) const;
  // Visits the keys of `first` under `prefix` with the value of the same key in `second`, read
  // from one snapshot. A key of `first` missing from `second` is Corruption.
  Status ScanPaired(Cf first, Cf second, std::string_view prefix, const PairFn& fn) const;
  Status Commit(WriteSet* ws, bool sync, std::string_view context);
  // Bytes of the SST, blob and WAL files in the store's directory.
  uint64_t DiskBytes() const;
  // IoError (ENOENT) when the directory no longer holds the lock file this open took (the store
  // was removed or replaced under it): RocksDB then writes to deleted files. Two stat calls.
  // After a write failure, tries to resume RocksDB and returns the error while it fails.
  Status Check();

 private:
  Status PrepareDir(bool read_only);
  Status TakeLock();
  Status OpenDb(bool read_only);
  void StopPeriodicSync();

  std::string dir_;
  bool read_only_ = false;
  int lock_fd_ = -1;
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;

  std::mutex sync_mu_;
  uint64_t synced_upto_ = 0;  // RocksDB sequence number known durable; guarded by sync_mu_

  // After a failed write or sync (a full or failing local disk) RocksDB refuses writes until
  // Resume() succeeds, and its log writer holds the error: nothing touches the log meanwhile, and
  // callers see the original error (errno kept). Set by NoteFailure, cleared by ResumeIfFailed
  // once RocksDB recovered (space was freed).
  void NoteFailure(const Status& s);
  Status ResumeIfFailed();
  std::mutex failure_mu_;
  std::atomic<bool> failed_{false};
  Status failure_;  // the failure that set failed_, errno kept; guarded by failure_mu_

  std::thread periodic_;
  std::mutex periodic_mu_;
  std::condition_variable periodic_cv_;
  bool stop_periodic_ = false;  // guarded by periodic_mu_
};

}  // namespace vmetafs::store
