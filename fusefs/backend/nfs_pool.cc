#include "fusefs/backend/nfs_pool.h"

#include <fmt/format.h>
#include <nfsc/libnfs.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <thread>
#include <utility>

// libnfs 4.0 exports nfs_set_error (lib/libnfs.c) but declares it only in its private header.
extern "C" void nfs_set_error(struct nfs_context* nfs, char* error_string, ...);

namespace vmetafs::backend {
namespace {

using Clock = std::chrono::steady_clock;

// Hard mounts still time out single RPCs, so that a server that hangs (rather than drops the
// connection) is reconnected to instead of waited on forever.
constexpr int kHardRpcTimeoutS = 60;
// A request that fails with a transport-class errno on a connection it has just made is retried
// this many times more; after that the errno is taken as the server's own answer (NFS3ERR_IO).
constexpr int kFreshRetries = 1;
constexpr auto kMaxBackoff = std::chrono::milliseconds(1000);
// libnfs 4.0 sizes NFSv4 replies for at most 1 MiB reads and encodes each NFSv4 COMPOUND into a
// fixed 4 KiB buffer (larger WRITEs fail to encode or overrun it), and reports no maxima for v4.
constexpr uint64_t kNfs4ReadMax = 1 << 20;
constexpr uint64_t kNfs4WriteMax = 3072;

bool IsTransportError(int err) {
  switch (err) {
    case EIO:     // libnfs: "nfs_service failed", the socket is gone
    case EFAULT:  // libnfs: RPC_STATUS_ERROR
    case EINTR:   // libnfs: RPC timed out or cancelled
    case ETIMEDOUT:
    case ECONNRESET:
    case ECONNREFUSED:
    case ECONNABORTED:
    case ENOTCONN:
    case EPIPE:
    case ESHUTDOWN:
    case EHOSTUNREACH:
    case ENETUNREACH:
      return true;
    default:
      return false;
  }
}

// The errno of an NFS status named in a libnfs message ("NFS: Write failed with
// NFS3ERR_PERM(-1)"), or 0 when the message names none. libnfs reports a READ or WRITE split into
// several RPCs that the server refused as EFAULT, and some refusals as EIO, naming the server's
// status only in its message: the server answered, so the status is the error, not the transport.
int StatusErrno(std::string_view message) {
  static constexpr std::pair<std::string_view, int> kStatus[] = {
      {"PERM", EPERM},
      {"NOENT", ENOENT},
      {"IO", EIO},
      {"NXIO", ENXIO},
      {"ACCES", EACCES},
      {"EXIST", EEXIST},
      {"XDEV", EXDEV},
      {"NODEV", ENODEV},
      {"NOTDIR", ENOTDIR},
      {"ISDIR", EISDIR},
      {"INVAL", EINVAL},
      {"FBIG", EFBIG},
      {"NOSPC", ENOSPC},
      {"ROFS", EROFS},
      {"MLINK", EMLINK},
      {"NAMETOOLONG", ENAMETOOLONG},
      {"NOTEMPTY", ENOTEMPTY},
      {"DQUOT", EDQUOT},
      {"STALE", ESTALE},
      {"BADHANDLE", ESTALE},
      {"FHEXPIRED", ESTALE},
      {"NOTSUPP", EOPNOTSUPP},
      {"TOOSMALL", EINVAL},
      {"SERVERFAULT", EREMOTEIO},
      {"BADTYPE", EINVAL},
      {"OPENMODE", EACCES},
      {"LOCKED", EAGAIN},
  };
  for (std::string_view prefix : {"NFS3ERR_", "NFS4ERR_"}) {
    size_t at = message.find(prefix);
    if (at == std::string_view::npos) continue;
    std::string_view rest = message.substr(at + prefix.size());
    std::string_view name = rest.substr(0, rest.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ_"));
    for (const auto& [status, err] : kStatus) {
      if (name == status) return err;
    }
  }
  return 0;
}

std::string ErrorOf(nfs_context* ctx) {
  const char* e = ctx != nullptr ? nfs_get_error(ctx) : nullptr;
  return e != nullptr ? e : "";
}

// libnfs keeps a context's last error message until the next one, and some failures set none (a
// connection the server closed). Cleared before a call, the message after a failure is the
// call's own, or empty; comparing with the message before could not tell the server refusing the
// same write twice in a row from a failure that set no message.
void ClearError(nfs_context* ctx) {
  static char empty[] = "";
  nfs_set_error(ctx, empty);
}

// libnfs 4.0's synchronous calls (nfs_mount, nfs_open, nfs_stat64...) wait on a struct on the
// caller's stack. When the connection fails under one, it returns with "nfs_service failed" or
// "Poll failed" and leaves its request queued in the context: destroying the context then runs
// the request's callback, which writes into that long-gone stack frame (stack corruption, seen as
// a crash when the server died mid-request). Such a context must never be destroyed.
bool AbandonsSyncCall(std::string_view error) {
  return error.find("nfs_service failed") != std::string_view::npos ||
         error.find("Poll failed") != std::string_view::npos;
}

// Releases a context: destroyed, or, when a synchronous call abandoned a request in it, only its
// socket is closed and the context is kept, unused, for the life of the process (one per
// connection and outage).
void ReleaseContext(nfs_context* ctx, bool abandoned) {
  if (ctx == nullptr) return;
  if (!abandoned) return nfs_destroy_context(ctx);
  if (int fd = nfs_get_fd(ctx); fd >= 0) close(fd);
  static std::mutex mu;
  static std::vector<nfs_context*>* kept = new std::vector<nfs_context*>;
  std::lock_guard lock(mu);
  kept->push_back(ctx);
  spdlog::debug("nfs: a failed connection's context is kept undestroyed ({} so far)", kept->size());
}

}  // namespace

NfsPool::NfsPool(NfsOptions options)
    : options_(std::move(options)), slots_(std::max(1, options_.connections)) {}

NfsPool::~NfsPool() {
  for (Slot& s : slots_) Drop(s.conn, false);
}

Status NfsPool::Create(NfsOptions options, std::shared_ptr<NfsPool>* out) {
  // libnfs writes to sockets that a dying server closes at any moment, without MSG_NOSIGNAL: a
  // SIGPIPE must not end the process (libfuse ignores it only while a session runs).
  signal(SIGPIPE, SIG_IGN);
  std::shared_ptr<NfsPool> pool(new NfsPool(std::move(options)));
  VMETAFS_RETURN_IF_ERROR(pool->Connect(pool->slots_[0].conn));
  *out = std::move(pool);
  return Status::Ok();
}

uint64_t NfsPool::NewFileId() {
  std::lock_guard lock(mu_);
  return next_file_id_++;
}

Status NfsPool::Connect(NfsConn& conn) const {
  nfs_context* ctx = nfs_init_context();
  if (ctx == nullptr) return Status::IoError("nfs_init_context failed", ENOMEM);
  // Parsing applies the URL's libnfs arguments (version=, nfsport=, uid=...) to the context.
  nfs_url* url = nfs_parse_url_dir(ctx, options_.libnfs_url.c_str());
  if (url == nullptr) {
    Status st = Status::InvalidArgument(
        fmt::format("bad NFS URL '{}': {}", options_.libnfs_url, ErrorOf(ctx)));
    nfs_destroy_context(ctx);
    return st;
  }
  nfs_destroy_url(url);
  nfs_set_autoreconnect(ctx, 0);  // reconnects are ours: they must honour the soft timeout
  nfs_set_dircache(ctx, 0);       // other clients and the other connections change directories
  nfs_set_timeout(ctx, (options_.timeout_s > 0 ? options_.timeout_s : kHardRpcTimeoutS) * 1000);
  nfs_umask(ctx, 0);  // modes arrive with the caller's umask applied
  int rc = nfs_mount(ctx, options_.server.c_str(), options_.export_path.c_str());
  if (rc < 0) {
    const std::string error = ErrorOf(ctx);
    Status st = PosixError(
        fmt::format("mounting nfs://{}{}: {}", options_.server, options_.export_path, error), -rc);
    ReleaseContext(ctx, AbandonsSyncCall(error));
    return st;
  }
  conn.ctx = ctx;
  conn.readmax = nfs_get_readmax(ctx);
  conn.writemax = nfs_get_writemax(ctx);
  if (options_.version == 4) {
    conn.readmax = conn.readmax == 0 ? kNfs4ReadMax : std::min(conn.readmax, kNfs4ReadMax);
    conn.writemax = kNfs4WriteMax;
  }
  conn.readmax = std::max<uint64_t>(conn.readmax, 4096);
  conn.writemax = std::max<uint64_t>(conn.writemax, 1024);
  return Status::Ok();
}

void NfsPool::Drop(NfsConn& conn, bool abandoned) {
  if (conn.ctx != nullptr && !abandoned) {
    // NFSv3 handles are freed locally; NFSv4 sends CLOSE, which fails at once on a dead socket.
    for (auto& [id, fh] : conn.files) (void)nfs_close(conn.ctx, fh);
  }
  ReleaseContext(conn.ctx, abandoned);
  conn.ctx = nullptr;
  conn.files.clear();
  conn.files_dirty = true;
}

NfsPool::Slot* NfsPool::Acquire(uint64_t file, bool only_open) {
  std::unique_lock lock(mu_);
  for (;;) {
    bool held_somewhere = false;
    Slot* free_slot = nullptr;
    for (Slot& s : slots_) {
      if (file != 0 && s.open_ids.contains(file)) {
        held_somewhere = true;
        if (!s.busy) {
          s.busy = true;
          return &s;
        }
      }
      // Prefer a connected free slot over one that would have to connect first.
      if (!s.busy && (free_slot == nullptr || (free_slot->conn.ctx == nullptr && s.conn.ctx))) {
        free_slot = &s;
      }
    }
    if (only_open && !held_somewhere) return nullptr;
    if (!only_open && free_slot != nullptr) {
      free_slot->busy = true;
      return free_slot;
    }
    freed_.wait(lock);
  }
}

void NfsPool::Release(Slot* slot) {
  std::lock_guard lock(mu_);
  if (slot->conn.files_dirty) {
    slot->open_ids.clear();
    for (const auto& [id, fh] : slot->conn.files) slot->open_ids.insert(id);
    slot->conn.files_dirty = false;
  }
  slot->busy = false;
  freed_.notify_all();
}

Status NfsPool::Fail(std::string_view what, const std::string& path, int err,
                     const std::string& detail) const {
  return PosixError(fmt::format("nfs://{}{}: {} '{}'{}{}", options_.server, options_.export_path,
                                what, path, detail.empty() ? "" : ": ", detail),
                    err);
}

Status NfsPool::Run(std::string_view what, const std::string& path, const Call& call, uint64_t file,
                    bool only_open) {
  const bool soft = options_.timeout_s > 0;
  const auto deadline = Clock::now() + std::chrono::seconds(options_.timeout_s);
  auto backoff = std::chrono::milliseconds(50);
  int fresh_failures = 0;
  for (;;) {
    Slot* slot = Acquire(file, only_open);
    if (slot == nullptr) {
      return Fail(what, path, ENOENT, "the file is gone and no connection still holds it open");
    }
    NfsConn& conn = slot->conn;
    const bool fresh = conn.ctx == nullptr;
    Status connected = fresh ? Connect(conn) : Status::Ok();
    std::string detail = connected.ok() ? "" : connected.message();
    if (connected.ok()) {
      ClearError(conn.ctx);
      int rc = call(conn);
      if (rc >= 0) {
        Release(slot);
        NoteRecovered();
        return Status::Ok();
      }
      detail = ErrorOf(conn.ctx);
      if (detail.empty()) detail = std::strerror(-rc);
      const bool abandoned = AbandonsSyncCall(detail);
      int err = -rc;
      const int status = err == EFAULT || err == EIO ? StatusErrno(detail) : 0;
      if (status != 0) err = status;
      // libnfs 4.0 cannot recover an NFSv4 open-owner whose seqid it lost (NFS4ERR_BAD_SEQID,
      // which it reports as ERANGE): only a new context (a new client id) can.
      const bool reset =
          (status == 0 && IsTransportError(err)) || (options_.version == 4 && rc == -ERANGE);
      if (!reset || (fresh && ++fresh_failures > kFreshRetries)) {
        if (abandoned) Drop(conn, true);  // no later user may service or destroy it
        Release(slot);
        return Fail(what, path, err, detail);
      }
      Drop(conn, abandoned);
    }
    Release(slot);
    NoteOutage(what, path, detail);
    if (soft && Clock::now() >= deadline) {
      return Fail(what, path, EIO,
                  fmt::format("server not answering for {}s ({})", options_.timeout_s, detail));
    }
    if (!fresh) continue;  // a dropped connection: reconnect at once
    auto wait = backoff;
    if (soft)
      wait = std::min(
          wait, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
    std::this_thread::sleep_for(std::max(wait, std::chrono::milliseconds(1)));
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

void NfsPool::NoteOutage(std::string_view what, const std::string& path,
                         const std::string& detail) {
  std::lock_guard lock(mu_);
  if (outage_logged_) return;
  outage_logged_ = true;
  spdlog::warn("nfs://{}{}: {} '{}' failed ({}); reconnecting{}", options_.server,
               options_.export_path, what, path, detail,
               options_.timeout_s > 0 ? fmt::format(" for up to {}s", options_.timeout_s)
                                      : std::string(" until the server answers"));
}

void NfsPool::NoteRecovered() {
  std::lock_guard lock(mu_);
  if (!outage_logged_) return;
  outage_logged_ = false;
  spdlog::info("nfs://{}{}: server answers again", options_.server, options_.export_path);
}

void NfsPool::CloseFile(uint64_t file) {
  for (Slot& s : slots_) {
    std::unique_lock lock(mu_);
    freed_.wait(lock, [&s] { return !s.busy; });
    if (!s.open_ids.contains(file)) continue;
    s.busy = true;
    lock.unlock();
    if (auto it = s.conn.files.find(file); it != s.conn.files.end()) {
      (void)nfs_close(s.conn.ctx, it->second);
      s.conn.files.erase(it);
      s.conn.files_dirty = true;
    }
    Release(&s);
  }
}

}  // namespace vmetafs::backend
