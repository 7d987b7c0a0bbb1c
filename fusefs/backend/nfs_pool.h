// NfsPool: a fixed set of libnfs connections to one export, shared by every request of an
// NfsBackend and its open files.
//
// libnfs 4.0 contexts are single-threaded, so each connection is used by one request at a time; a
// request leases any free connection, and so up to `connections` requests run concurrently. Open
// files are opened lazily on each connection that serves them (by path) and the handle is kept in
// that connection's table until the file is closed or the connection is dropped.
//
// Outages: a request that fails with a transport-class error (the connection dropped, an RPC timed
// out) drops that connection (new context, MOUNT again, files re-opened by path on next use) and is
// retried until the server answers again (hard mount), or, with a soft timeout, until the timeout
// expires, after which it fails with EIO. Retries after a reconnect repeat the operation: an
// exclusive create, mkdir, unlink or rename whose reply was lost may then see EEXIST/ENOENT, as
// on any NFS client without a duplicate request cache across connections.
//
// Thread safety: every method may be called from any thread. Lock order: pool mutex only; it is
// never held while talking to the server.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "store/status.h"

struct nfs_context;
struct nfsfh;

namespace vmetafs::backend {

struct NfsOptions {
  std::string server;
  std::string export_path;  // what MOUNT (v3) / the v4 pseudo path names: "/srv/images"
  std::string libnfs_url;   // nfs://server/export?... with only libnfs's own arguments
  int version = 3;
  int timeout_s = 0;  // 0: hard (retry forever)
  int connections = 16;
};

// One connection; only the request that leases it touches it.
struct NfsConn {
  nfs_context* ctx = nullptr;
  uint64_t readmax = 0;
  uint64_t writemax = 0;
  std::unordered_map<uint64_t, nfsfh*> files;  // open file id -> handle on this context
  bool files_dirty = false;                    // `files` changed since the pool last looked
};

class NfsPool {
 public:
  // A call on one connection; returns >= 0 on success or -errno, as libnfs calls do.
  using Call = std::function<int(NfsConn&)>;

  // Connects one connection at once so that a wrong URL fails here; the others connect on use.
  static Status Create(NfsOptions options, std::shared_ptr<NfsPool>* out);
  ~NfsPool();
  NfsPool(const NfsPool&) = delete;
  NfsPool& operator=(const NfsPool&) = delete;

  // Runs `call` on a free connection, reconnecting and retrying across outages (see above).
  // `file` (non-zero) prefers a connection where that file is already open; with `only_open`,
  // only such a connection is used (NotFound if none has it). `what`/`path` name the request in
  // errors and the log.
  Status Run(std::string_view what, const std::string& path, const Call& call, uint64_t file = 0,
             bool only_open = false);

  // Closes the handles of `file` on every connection (waits for connections in use).
  void CloseFile(uint64_t file);

  const NfsOptions& options() const { return options_; }
  uint64_t NewFileId();

 private:
  explicit NfsPool(NfsOptions options);
  struct Slot {
    NfsConn conn;                           // touched only by the request that leased the slot
    bool busy = false;                      // guarded by mu_
    std::unordered_set<uint64_t> open_ids;  // guarded by mu_: the keys of conn.files
  };
  Slot* Acquire(uint64_t file, bool only_open);
  void Release(Slot* slot);
  Status Connect(NfsConn& conn) const;
  // Closes the connection; `abandoned`: a synchronous call left a request in it (nfs_pool.cc).
  static void Drop(NfsConn& conn, bool abandoned);
  void NoteOutage(std::string_view what, const std::string& path, const std::string& detail);
  void NoteRecovered();
  Status Fail(std::string_view what, const std::string& path, int err,
              const std::string& detail) const;

  const NfsOptions options_;
  std::mutex mu_;
  std::condition_variable freed_;
  std::vector<Slot> slots_;  // fixed size: pointers stay valid
  uint64_t next_file_id_ = 1;
  bool outage_logged_ = false;
};

}  // namespace vmetafs::backend
