#include "store/journal_rocks.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <rocksdb/cache.h>
#include <rocksdb/convenience.h>
#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/merge_operator.h>
#include <rocksdb/table.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>

#include "store/journal_codec.h"

namespace vmetafs::store {

namespace {

constexpr std::array<const char*, kCfCount> kCfNames = {
    "default", "images", "paths", "units", "content", "history", "events", "quarantine"};

constexpr size_t kMiB = size_t{1} << 20;

// The counters of journal_codec (next_seq, next_image_id, an image's last_seq and flush_epoch)
// only ever grow: merging by maximum lets concurrent batches persist them without a read.
class MaxCounterOperator : public rocksdb::AssociativeMergeOperator {
 public:
  bool Merge(const rocksdb::Slice&, const rocksdb::Slice* existing, const rocksdb::Slice& value,
             std::string* new_value, rocksdb::Logger*) const override {
    uint64_t a = 0, b = 0;
    if (!journal_codec::DecodeCounter(value.ToStringView(), &b)) return false;
    if (existing != nullptr && !journal_codec::DecodeCounter(existing->ToStringView(), &a)) {
      return false;  // RocksDB reports this as Corruption
    }
    *new_value = journal_codec::EncodeCounter(std::max(a, b));
    return true;
  }
  const char* Name() const override { return "vmetafs.MaxCounter"; }
};

// A read-only open must not write: RocksDB would otherwise rotate the live daemon's LOG file.
class NullLogger : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char*, va_list) override {}
};

// RocksDB's info log goes to the daemon's log instead of a LOG file in the store: on a full local
// disk RocksDB 7.8 asserts on the next info-log line after one it failed to write (its file
// writer then holds a previous error), taking the daemon, and its VMs' I/O, down with it.
class DaemonLogger : public rocksdb::Logger {
 public:
  DaemonLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::INFO_LEVEL) {}
  void Logv(const char* format, va_list ap) override {
    Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap);
  }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel()) return;
    char line[1024];
    const int n = vsnprintf(line, sizeof line, format, ap);
    for (size_t end = std::min<size_t>(n < 0 ? 0 : n, sizeof line - 1); end > 0; --end) {
      if (line[end - 1] != '\n') break;
      line[end - 1] = '\0';
    }
    spdlog::log(level >= rocksdb::InfoLogLevel::ERROR_LEVEL  ? spdlog::level::err
                : level == rocksdb::InfoLogLevel::WARN_LEVEL ? spdlog::level::warn
                                                             : spdlog::level::debug,
                "rocksdb: {}", line);
  }
};

rocksdb::CompressionType Lz4IfAvailable() {
  auto supported = rocksdb::GetSupportedCompressions();
  bool lz4 =
      std::find(supported.begin(), supported.end(), rocksdb::kLZ4Compression) != supported.end();
  return lz4 ? rocksdb::kLZ4Compression : rocksdb::kNoCompression;
}

rocksdb::DBOptions DbOptions(bool read_only) {
  rocksdb::DBOptions o;
  o.create_if_missing = !read_only;
  o.create_missing_column_families = !read_only;
  o.paranoid_checks = true;
  o.manual_wal_flush = false;
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  o.max_background_jobs = 2;
  // With several column families a WAL file lives until every family flushed past it; this
  // bound makes RocksDB flush the quiet families (events, paths) instead of keeping old WALs.
  o.max_total_wal_size = 64 * kMiB;
  o.db_write_buffer_size = 64 * kMiB;
  if (read_only) {
    o.info_log = std::make_shared<NullLogger>();
  } else {
    o.info_log = std::make_shared<DaemonLogger>();
  }
  return o;
}

rocksdb::ColumnFamilyOptions CfOptions(Cf cf, const std::shared_ptr<rocksdb::Cache>& cache) {
  static const auto max_counter = std::make_shared<MaxCounterOperator>();
  static const rocksdb::CompressionType lz4 = Lz4IfAvailable();
  rocksdb::ColumnFamilyOptions o;
  rocksdb::BlockBasedTableOptions table;
  table.block_cache = cache;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  o.level_compaction_dynamic_level_bytes = true;
  o.compression = lz4;
  o.write_buffer_size = 4 * kMiB;
  if (cf == Cf::kDefault || cf == Cf::kImages) {
    o.merge_operator = max_counter;
    // Every batch merges its counters: fold them as they come, so that a read of a hot image's
    // counter never has to merge thousands of operands from the memtable.
    o.max_successive_merges = 8;
  }
  if (cf == Cf::kContent || cf == Cf::kHistory) {
    o.write_buffer_size = 16 * kMiB;
    o.enable_blob_files = true;
    o.min_blob_size = 4096;
    o.blob_file_size = 64 * kMiB;
    o.blob_compression_type = lz4;
    // Metadata tables are rewritten often; without GC the old blobs would never be reclaimed.
    o.enable_blob_garbage_collection = true;
  }
  return o;
}

// The errno an I/O error's text names, for callers that reply with it (ENOSPC above all).
int ErrnoOf(const std::string& text) {
  for (int e : {ENOSPC, EDQUOT, EROFS, EACCES, EPERM, ENOENT, ENOTDIR, EMFILE, ENFILE, ENOMEM}) {
    if (text.find(std::strerror(e)) != std::string::npos) return e;
  }
  return EIO;
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

}  // namespace

Status FromRocks(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::Ok();
  std::string msg = std::string(context) + ": " + s.ToString();
  if (s.IsCorruption()) return Status::Corruption(std::move(msg));
  if (s.IsNotFound() && !s.IsPathNotFound()) return Status::NotFound(std::move(msg));
  if (s.IsBusy() || s.IsTryAgain()) return Status::Busy(std::move(msg));
  if (s.IsInvalidArgument()) return Status::InvalidArgument(std::move(msg));
  if (s.IsNotSupported()) return Status::NotSupported(std::move(msg));
  if (s.IsNoSpace()) return Status::IoError(std::move(msg), ENOSPC);
  int err = ErrnoOf(msg);
  return Status::IoError(std::move(msg), err);
}

RocksStore::~RocksStore() {
  Status s = Close();
  (void)s;  // the Journal closes explicitly and reports; this only frees what a failed open left
}

Status RocksStore::Open(const std::string& dir, bool read_only) {
  dir_ = dir;
  read_only_ = read_only;
  VMETAFS_RETURN_IF_ERROR(PrepareDir(read_only));
  if (!read_only) VMETAFS_RETURN_IF_ERROR(TakeLock());
  return OpenDb(read_only);
}

Status RocksStore::ClaimStore(const std::string& backing, std::string* recorded) {
  namespace jc = journal_codec;
  std::string value;
  jc::StoreRecord rec;
  Status s = Get(Cf::kDefault, jc::kStoreKey, &value);
  bool write = false;
  if (s.IsNotFound()) {
    if (read_only_) return Status::NotFound("store " + dir_ + " holds no vmetafs store");
    rec.created_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    rec.backing = backing;
    write = true;
  } else {
    VMETAFS_RETURN_IF_ERROR(s);
    VMETAFS_RETURN_IF_ERROR(jc::DecodeStore(value, &rec).Annotate("store " + dir_));
  }
  if (rec.format_version > jc::kFormatVersion) {
    return Status::NotSupported(fmt::format(
        "store {} has format {}, newer than this vmetafs reads ({}); use a newer vmetafs", dir_,
        rec.format_version, jc::kFormatVersion));
  }
  if (!backing.empty() && rec.backing != backing) {
    if (!rec.backing.empty() || read_only_) {
      return Status::InvalidArgument(
          fmt::format("store {} belongs to backing {}, not {}; give each backing its own store",
                      dir_, rec.backing.empty() ? "(none)" : rec.backing, backing));
    }
    // A store made by a tool without a backing is claimed by the first daemon that uses it.
    rec.backing = backing;
    write = true;
  }
  if (write) {
    WriteSet ws;
    ws.Put(cf(Cf::kDefault), jc::kStoreKey, jc::EncodeStore(rec));
    VMETAFS_RETURN_IF_ERROR(Commit(&ws, /*sync=*/true, "recording the store"));
  }
  *recorded = rec.backing;
  return Status::Ok();
}

Status RocksStore::PrepareDir(bool read_only) {
  struct stat st;
  if (stat(dir_.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return Status::IoError("store " + dir_ + " is not a directory", ENOTDIR);
    }
  } else {
    int err = errno;
    if (err != ENOENT) return PosixError("store " + dir_, err);
    if (read_only) return Status::NotFound("no store at " + dir_);
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    if (ec) return Status::IoError("creating store " + dir_ + ": " + ec.message(), ec.value());
  }
  if (read_only && !Exists(dir_ + "/CURRENT")) return Status::NotFound("no store at " + dir_);
  return Status::Ok();
}

Status RocksStore::TakeLock() {
  std::string path = dir_ + "/" + kLockFileName;
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    return Status::IoError("store " + dir_ + " is not writable: " + std::strerror(err), err);
  }
  // flock, not fcntl: it belongs to the open file description, so a second open of the same store
  // inside this process is refused too.
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    char buf[32] = {};
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    close(fd);
    if (err != EWOULDBLOCK) return PosixError("locking store " + dir_, err);
    std::string holder(buf, n > 0 ? static_cast<size_t>(n) : 0);
    holder.erase(holder.find_last_not_of(" \n") + 1);
    return Status::Busy(fmt::format(
        "store {} is in use by another vmetafs (pid {}); unmount it first or use another store=",
        dir_, holder.empty() ? "unknown" : holder));
  }
  std::string line = std::to_string(getpid()) + "\n";
  if (ftruncate(fd, 0) != 0 ||
      pwrite(fd, line.data(), line.size(), 0) != static_cast<ssize_t>(line.size())) {
    int err = errno;
    close(fd);
    return Status::IoError("store " + dir_ + " is not writable: " + std::strerror(err), err);
  }
  lock_fd_ = fd;
  return Status::Ok();
}

Status RocksStore::OpenDb(bool read_only) {
  auto cache = rocksdb::NewLRUCache(8 * kMiB);
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (size_t i = 0; i < kCfCount; ++i) {
    families.emplace_back(kCfNames[i], CfOptions(static_cast<Cf>(i), cache));
  }
  rocksdb::DBOptions options = DbOptions(read_only);
  rocksdb::Status s;
  if (read_only) {
    // A live writer may delete a file (an obsolete WAL or SST) while we list and open them.
    for (int attempt = 0; attempt < 3; ++attempt) {
      s = rocksdb::DB::OpenForReadOnly(options, dir_, families, &handles_, &db_);
      if (!s.IsPathNotFound()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  } else {
    s = rocksdb::DB::Open(options, dir_, families, &handles_, &db_);
  }
  // A file that the store's own MANIFEST names and that is gone is damage, not absence.
  if (s.IsPathNotFound() && Exists(dir_ + "/CURRENT")) {
    return Status::Corruption("store " + dir_ + " is damaged: " + s.ToString());
  }
  return FromRocks(s, "opening store " + dir_);
}

// A caller whose writes an earlier SyncWAL already covered returns at once; callers queued behind
// a running sync usually find their writes covered when it finishes.
Status RocksStore::SyncWal() {
  if (read_only_) return Status::Ok();
  VMETAFS_RETURN_IF_ERROR(ResumeIfFailed());
  const uint64_t target = db_->GetLatestSequenceNumber();
  std::lock_guard<std::mutex> lock(sync_mu_);
  if (synced_upto_ >= target) return Status::Ok();
  const uint64_t upto = db_->GetLatestSequenceNumber();
  Status s = FromRocks(db_->SyncWAL(), "syncing the journal");
  NoteFailure(s);
  VMETAFS_RETURN_IF_ERROR(s);
  synced_upto_ = upto;
  return Status::Ok();
}

void RocksStore::NoteFailure(const Status& s) {
  if (s.code() != Status::Code::kIoError) return;
  std::lock_guard<std::mutex> lock(failure_mu_);
  if (!failed_.load()) failure_ = s;
  failed_.store(true);
}

Status RocksStore::ResumeIfFailed() {
  if (!failed_.load()) return Status::Ok();
  std::lock_guard<std::mutex> lock(failure_mu_);
  if (!failed_.load()) return Status::Ok();
  if (Status resumed = FromRocks(db_->Resume(), "resuming"); !resumed.ok()) {
    return Status::IoError(
        fmt::format("the journal is still failing ({}; {})", failure_.message(), resumed.message()),
        failure_.Errno());
  }
  failed_.store(false);
  spdlog::info("journal: store {} accepts writes again", dir_);
  return Status::Ok();
}

void RocksStore::StartPeriodicSync(uint32_t ms) {
  periodic_ = std::thread([this, period = std::chrono::milliseconds(std::max<uint32_t>(ms, 1))] {
    std::unique_lock<std::mutex> lock(periodic_mu_);
    bool failing = false;
    while (!periodic_cv_.wait_for(lock, period, [this] { return stop_periodic_; })) {
      lock.unlock();
      Status s = SyncWal();  // the DB stays open: Close() joins this thread first
      if (!s.ok() && !failing) spdlog::error("journal: periodic sync failed: {}", s.ToString());
      if (s.ok() && failing) spdlog::info("journal: periodic sync works again");
      failing = !s.ok();
      lock.lock();
    }
  });
}

void RocksStore::StopPeriodicSync() {
  {
    std::lock_guard<std::mutex> lock(periodic_mu_);
    stop_periodic_ = true;
  }
  periodic_cv_.notify_all();
  if (periodic_.joinable()) periodic_.join();
}

Status RocksStore::Close() {
  StopPeriodicSync();
  Status result;
  if (db_ != nullptr) {
    if (!read_only_) result = SyncWal();
    for (rocksdb::ColumnFamilyHandle* h : handles_) {
      Status s = FromRocks(db_->DestroyColumnFamilyHandle(h), "closing a column family");
      if (result.ok()) result = s;
    }
    Status s = FromRocks(db_->Close(), "closing the journal");
    if (result.ok()) result = s;
    delete db_;
    db_ = nullptr;
  }
  handles_.clear();
  if (lock_fd_ >= 0) {
    close(lock_fd_);  // releases the flock
    lock_fd_ = -1;
  }
  return result;
}

Status RocksStore::Get(Cf c, std::string_view key, std::string* value,
                       const rocksdb::Snapshot* snap) const {
  rocksdb::ReadOptions ro;
  ro.snapshot = snap;
  rocksdb::Status s = db_->Get(ro, cf(c), rocksdb::Slice(key.data(), key.size()), value);
  return FromRocks(s, fmt::format("reading {}", kCfNames[static_cast<size_t>(c)]));
}

Status RocksStore::GetCounter(Cf c, std::string_view key, uint64_t* value,
                              const rocksdb::Snapshot* snap) const {
  std::string v;
  Status s = Get(c, key, &v, snap);
  *value = 0;
  if (s.IsNotFound()) return Status::Ok();
  VMETAFS_RETURN_IF_ERROR(s);
  if (!journal_codec::DecodeCounter(v, value)) return Status::Corruption("malformed counter");
  return Status::Ok();
}

Status RocksStore::Scan(Cf c, std::string_view prefix, const rocksdb::Snapshot* snap,
                        const ScanFn& fn) const {
  std::string end = journal_codec::PrefixEnd(prefix);
  rocksdb::Slice upper(end);
  rocksdb::ReadOptions ro;
  ro.snapshot = snap;
  if (!prefix.empty()) ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, cf(c)));
  for (it->Seek(rocksdb::Slice(prefix.data(), prefix.size())); it->Valid(); it->Next()) {
    VMETAFS_RETURN_IF_ERROR(fn(it->key().ToStringView(), it->value().ToStringView()));
  }
  return FromRocks(it->status(), fmt::format("scanning {}", kCfNames[static_cast<size_t>(c)]));
}

Status RocksStore::ScanPaired(Cf first, Cf second, std::string_view prefix,
                              const PairFn& fn) const {
  rocksdb::ManagedSnapshot snap(db_);
  std::string value;
  return Scan(first, prefix, snap.snapshot(), [&](std::string_view key, std::string_view v) {
    Status s = Get(second, key, &value, snap.snapshot());
    if (s.IsNotFound()) {
      return Status::Corruption(fmt::format("{} has a key that {} lacks",
                                            kCfNames[static_cast<size_t>(first)],
                                            kCfNames[static_cast<size_t>(second)]));
    }
    VMETAFS_RETURN_IF_ERROR(s);
    return fn(key, v, &value);
  });
}

Status RocksStore::Commit(WriteSet* ws, bool sync, std::string_view context) {
  VMETAFS_RETURN_IF_ERROR(FromRocks(ws->status(), context));
  VMETAFS_RETURN_IF_ERROR(ResumeIfFailed());
  rocksdb::WriteOptions wo;
  wo.sync = sync;
  Status s = FromRocks(db_->Write(wo, ws->batch()), context);
  NoteFailure(s);
  return s;
}

Status RocksStore::Check() {
  if (lock_fd_ < 0) return Status::Ok();  // read-only opens hold nothing and write nothing
  struct stat held, now;
  if (fstat(lock_fd_, &held) != 0) return PosixError("store " + dir_, errno);
  const std::string lock = dir_ + "/" + kLockFileName;
  if (held.st_nlink > 0 && stat(lock.c_str(), &now) == 0 && now.st_ino == held.st_ino &&
      now.st_dev == held.st_dev) {
    return ResumeIfFailed();
  }
  return Status::IoError(
      "store " + dir_ + " was removed or replaced while in use; the journal writes nowhere",
      ENOENT);
}

uint64_t RocksStore::DiskBytes() const {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    std::string ext = entry.path().extension().string();
    if (ext != ".sst" && ext != ".blob" && ext != ".log") continue;
    std::error_code size_ec;
    uint64_t size = entry.file_size(size_ec);
    if (!size_ec) total += size;
  }
  return total;
}

}  // namespace vmetafs::store
