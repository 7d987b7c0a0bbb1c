#include "fusefs/backend/nfs_backend.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <nfsc/libnfs-raw-nfs.h>
#include <nfsc/libnfs.h>
#include <sys/time.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <ctime>

#include "fusefs/backend/nfs_file.h"

namespace vmetafs::backend {
namespace {

constexpr std::string_view kScheme = "nfs://";

struct Spec {
  std::string libnfs_args;  // "" or "?a=b&c=d": the arguments libnfs understands
  // The arguments that say where the server answers (ports, NFSv4), kept in the backing's id:
  // the store records the id, and meta-restore reaches the server through it.
  std::string reach_args;
  int timeout_s = 0;
  int connections = 16;  // qemu keeps up to 16 requests in flight per image (cache=none)
  int version = 3;
};

Status ParseInt(std::string_view key, std::string_view value, int lo, int hi, int* out) {
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), *out);
  if (ec != std::errc() || end != value.data() + value.size() || *out < lo || *out > hi) {
    return Status::InvalidArgument(
        fmt::format("NFS URL argument {}={}: expected {}..{}", key, value, lo, hi));
  }
  return Status::Ok();
}

// Splits our own arguments off the URL's query and keeps libnfs's.
Status ParseArgs(std::string_view query, Spec* spec) {
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view arg = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    size_t eq = arg.find('=');
    std::string_view key = arg.substr(0, eq);
    std::string_view value = eq == std::string_view::npos ? "" : arg.substr(eq + 1);
    if (key == "timeout") {
      VMETAFS_RETURN_IF_ERROR(ParseInt(key, value, 0, 86400 * 365, &spec->timeout_s));
      continue;
    }
    if (key == "connections") {
      VMETAFS_RETURN_IF_ERROR(ParseInt(key, value, 1, 64, &spec->connections));
      continue;
    }
    if (key == "autoreconnect" || key == "dircache" || arg.empty()) continue;  // forced off
    if (key == "version") VMETAFS_RETURN_IF_ERROR(ParseInt(key, value, 3, 4, &spec->version));
    spec->libnfs_args += spec->libnfs_args.empty() ? "?" : "&";
    spec->libnfs_args += arg;
    if (key == "nfsport" || key == "mountport" || (key == "version" && spec->version == 4)) {
      spec->reach_args += spec->reach_args.empty() ? "?" : "&";
      spec->reach_args += arg;
    }
  }
  return Status::Ok();
}

// Server and path components of the URL, parsed by libnfs itself.
Status SplitUrl(const std::string& url, std::string* server, std::vector<std::string>* parts) {
  nfs_context* ctx = nfs_init_context();
  if (ctx == nullptr) return Status::IoError("nfs_init_context failed", ENOMEM);
  nfs_url* u = nfs_parse_url_dir(ctx, url.c_str());
  if (u == nullptr || u->server == nullptr || u->path == nullptr) {
    Status st = Status::InvalidArgument(
        fmt::format("bad NFS URL '{}': {}", url, nfs_get_error(ctx) ? nfs_get_error(ctx) : ""));
    if (u != nullptr) nfs_destroy_url(u);
    nfs_destroy_context(ctx);
    return st;
  }
  *server = u->server;
  std::string_view path = u->path;
  Status st = Status::Ok();
  while (!path.empty()) {
    size_t slash = path.find('/');
    std::string_view part = path.substr(0, slash);
    path = slash == std::string_view::npos ? std::string_view() : path.substr(slash + 1);
    if (part == "..") st = Status::InvalidArgument("NFS URL path must not contain '..': " + url);
    if (!part.empty() && part != ".") parts->emplace_back(part);
  }
  nfs_destroy_url(u);
  nfs_destroy_context(ctx);
  return st;
}

std::string Join(const std::vector<std::string>& parts, size_t from, size_t to) {
  std::string out;
  for (size_t i = from; i < to; ++i) out += "/" + parts[i];
  return out;
}

// Paths come from the FUSE layer's inode table; refusing odd ones keeps a bug there from
// reaching outside the backing root.
Status CheckRelative(const std::string& path) {
  if (path.empty()) return Status::Ok();
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string_view part(path.data() + start, end - start);
    if (part.empty() || part == "." || part == "..") {
      return Status::InvalidArgument(fmt::format("path '{}' is not relative to the root", path));
    }
    start = end + 1;
  }
  return Status::Ok();
}

bool MountRefused(const Status& st) {
  int e = st.Errno();
  return e == ENOENT || e == EACCES || e == EPERM || e == ENOTDIR || e == EINVAL;
}

mode_t TypeOf(const nfsdirent& e) {
  if ((e.mode & S_IFMT) != 0) return e.mode & S_IFMT;
  switch (e.type) {
    case NF3REG:
      return S_IFREG;
    case NF3DIR:
      return S_IFDIR;
    case NF3BLK:
      return S_IFBLK;
    case NF3CHR:
      return S_IFCHR;
    case NF3LNK:
      return S_IFLNK;
    case NF3SOCK:
      return S_IFSOCK;
    case NF3FIFO:
      return S_IFIFO;
    default:
      return 0;
  }
}

}  // namespace

NfsBackend::NfsBackend(std::string id, std::shared_ptr<NfsShared> shared)
    : id_(std::move(id)), shared_(std::move(shared)) {}

NfsBackend::~NfsBackend() = default;

Status NfsBackend::Open(const std::string& spec, std::unique_ptr<Backend>* out) {
  if (!spec.starts_with(kScheme)) return Status::InvalidArgument("not an nfs:// URL: " + spec);
  Spec parsed;
  size_t q = spec.find('?');
  if (q != std::string::npos) VMETAFS_RETURN_IF_ERROR(ParseArgs(spec.substr(q + 1), &parsed));
  const std::string base = spec.substr(0, q);
  std::string server;
  std::vector<std::string> parts;
  VMETAFS_RETURN_IF_ERROR(SplitUrl(base + parsed.libnfs_args, &server, &parts));

  // The export is the longest leading part of the path that the server mounts.
  auto shared = std::make_shared<NfsShared>();
  Status first;
  for (size_t n = parts.size() + 1; n-- > 0;) {
    NfsOptions o;
    o.server = server;
    o.export_path = n == 0 ? "/" : Join(parts, 0, n);
    o.libnfs_url = fmt::format("nfs://{}{}{}", server, o.export_path, parsed.libnfs_args);
    o.version = parsed.version;
    o.timeout_s = parsed.timeout_s;
    o.connections = parsed.connections;
    Status st = NfsPool::Create(std::move(o), &shared->pool);
    if (st.ok()) {
      shared->prefix = Join(parts, n, parts.size());
      break;
    }
    if (first.ok()) first = st;
    if (!MountRefused(st)) return st;
  }
  if (shared->pool == nullptr) return first;

  std::unique_ptr<NfsBackend> backend(new NfsBackend(
      fmt::format("nfs://{}{}{}", server, Join(parts, 0, parts.size()), parsed.reach_args),
      shared));
  struct stat root;
  VMETAFS_RETURN_IF_ERROR(backend->Lstat("", &root));
  if (!S_ISDIR(root.st_mode)) {
    return Status::IoError(fmt::format("{}: not a directory", backend->id_), ENOTDIR);
  }
  *out = std::move(backend);
  return Status::Ok();
}

Status NfsBackend::OnPath(std::string_view what, const std::string& path,
                          const std::function<int(nfs_context*, const char*)>& call) const {
  VMETAFS_RETURN_IF_ERROR(CheckRelative(path));
  const std::string nfs_path = shared_->NfsPath(path);
  return shared_->pool->Run(what, path,
                            [&](NfsConn& conn) { return call(conn.ctx, nfs_path.c_str()); });
}

Status NfsBackend::Lstat(const std::string& path, struct stat* st) const {
  nfs_stat_64 s{};
  VMETAFS_RETURN_IF_ERROR(OnPath(
      "lstat", path, [&s](nfs_context* ctx, const char* p) { return nfs_lstat64(ctx, p, &s); }));
  NfsStatToStat(s, st);
  return Status::Ok();
}

namespace {

// libnfs 4.0's NFSv4 OPEN loses track of the open-owner's sequence id after an OPEN fails (every
// later OPEN on the context gets NFS4ERR_BAD_SEQID; NfsPool reconnects on that), creates only
// exclusively, fails to create with O_TRUNC, and leaves a new file's mode and times unset. So:
// look first, never send an OPEN that is known to fail, and fix a new file's attributes.
int OpenV4(nfs_context* ctx, const char* p, int flags, mode_t mode, nfsfh** fh) {
  const int reopen = flags & ~(O_CREAT | O_EXCL | O_TRUNC);
  nfs_stat_64 st{};
  int rc = (flags & O_NOFOLLOW) != 0 ? nfs_lstat64(ctx, p, &st) : nfs_stat64(ctx, p, &st);
  if (rc == 0) {
    if ((flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL)) return -EEXIST;
    if (S_ISDIR(st.nfs_mode) && (flags & O_ACCMODE) != O_RDONLY) return -EISDIR;
    return nfs_open(ctx, p, flags & ~(O_CREAT | O_EXCL), fh);
  }
  if (rc != -ENOENT || (flags & O_CREAT) == 0) return rc;
  rc = nfs_open2(ctx, p, flags & ~O_TRUNC, static_cast<int>(mode), fh);
  if (rc < 0) return rc;
  // Setting attributes by path opens and closes the file under the context's one open-owner,
  // which would revoke our open's stateid: close first, fix the attributes, open again.
  (void)nfs_close(ctx, *fh);
  *fh = nullptr;
  struct timeval now[2];
  gettimeofday(&now[0], nullptr);
  now[1] = now[0];
  (void)nfs_chmod(ctx, p, static_cast<int>(mode & 07777));
  (void)nfs_utimes(ctx, p, now);
  return nfs_open(ctx, p, reopen, fh);
}

}  // namespace

Status NfsBackend::CreateFile(const std::string& path, int flags, mode_t mode, uint64_t id) const {
  const bool v4 = shared_->pool->options().version == 4;
  const bool writable = (flags & O_ACCMODE) != O_RDONLY;
  VMETAFS_RETURN_IF_ERROR(CheckRelative(path));
  const std::string nfs_path = shared_->NfsPath(path);
  return shared_->pool->Run("open", path, [&](NfsConn& conn) {
    nfs_context* ctx = conn.ctx;
    const char* p = nfs_path.c_str();
    nfsfh* fh = nullptr;
    int rc = v4 ? OpenV4(ctx, p, flags, mode, &fh)
                : nfs_open2(ctx, p, flags, static_cast<int>(mode), &fh);
    if (rc < 0) return rc;
    if (writable) {  // the server lets a directory be opened for writing; open(2) does not
      nfs_stat_64 s{};
      rc = nfs_fstat64(ctx, fh, &s);
      if (rc == 0 && S_ISDIR(s.nfs_mode)) rc = -EISDIR;
      if (rc < 0) {
        (void)nfs_close(ctx, fh);
        return rc;
      }
    }
    conn.files.emplace(id, fh);
    conn.files_dirty = true;
    return 0;
  });
}

Status NfsBackend::Open(const std::string& path, int flags, mode_t mode,
                        std::unique_ptr<File>* out) const {
  // O_SYNC makes libnfs send FILE_SYNC writes (see nfs_file.h). O_DIRECT means nothing to a
  // client without a cache; O_APPEND is dropped because every write carries its offset.
  int pass = flags & (O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_NOFOLLOW);
  if ((flags & O_ACCMODE) != O_RDONLY) pass |= O_SYNC;
  const uint64_t id = shared_->pool->NewFileId();
  shared_->SetPath(id, path);
  Status st = CreateFile(path, pass, mode, id);
  if (!st.ok()) {
    shared_->ForgetPath(id);
    return st;
  }
  *out = std::make_unique<NfsFile>(shared_, id, pass & ~(O_CREAT | O_EXCL | O_TRUNC));
  return Status::Ok();
}

Status NfsBackend::Mknod(const std::string& path, mode_t mode, dev_t rdev) const {
  return OnPath("mknod", path, [&](nfs_context* ctx, const char* p) {
    if (!S_ISREG(mode) && (mode & S_IFMT) != 0) {
      return nfs_mknod(ctx, p, static_cast<int>(mode), static_cast<int>(rdev));
    }
    nfsfh* fh = nullptr;
    int rc = nfs_open2(ctx, p, O_WRONLY | O_CREAT | O_EXCL, static_cast<int>(mode & 07777), &fh);
    if (rc == 0) (void)nfs_close(ctx, fh);
    return rc;
  });
}

Status NfsBackend::Mkdir(const std::string& path, mode_t mode) const {
  return OnPath("mkdir", path, [mode](nfs_context* ctx, const char* p) {
    return nfs_mkdir2(ctx, p, static_cast<int>(mode & 07777));
  });
}

Status NfsBackend::Rmdir(const std::string& path) const {
  return OnPath("rmdir", path, [](nfs_context* ctx, const char* p) { return nfs_rmdir(ctx, p); });
}

Status NfsBackend::Unlink(const std::string& path) const {
  return OnPath("unlink", path, [](nfs_context* ctx, const char* p) { return nfs_unlink(ctx, p); });
}

Status NfsBackend::Symlink(const std::string& target, const std::string& path) const {
  return OnPath("symlink", path, [&target](nfs_context* ctx, const char* p) {
    return nfs_symlink(ctx, target.c_str(), p);
  });
}

Status NfsBackend::Readlink(const std::string& path, std::string* target) const {
  return OnPath("readlink", path, [target](nfs_context* ctx, const char* p) {
    char* buf = nullptr;
    int rc = nfs_readlink2(ctx, p, &buf);
    if (rc == 0 && buf != nullptr) target->assign(buf);
    free(buf);
    return rc;
  });
}

Status NfsBackend::Link(const std::string& from, const std::string& to) const {
  VMETAFS_RETURN_IF_ERROR(CheckRelative(to));
  const std::string nfs_to = shared_->NfsPath(to);
  return OnPath("link", from, [&nfs_to](nfs_context* ctx, const char* p) {
    return nfs_link(ctx, p, nfs_to.c_str());
  });
}

Status NfsBackend::Rename(const std::string& from, const std::string& to, unsigned flags) const {
  if (flags != 0) return Status::NotSupported("rename flags are not available over NFS");
  VMETAFS_RETURN_IF_ERROR(CheckRelative(to));
  const std::string nfs_to = shared_->NfsPath(to);
  VMETAFS_RETURN_IF_ERROR(OnPath("rename", from, [&nfs_to](nfs_context* ctx, const char* p) {
    return nfs_rename(ctx, p, nfs_to.c_str());
  }));
  shared_->Renamed(from, to);
  return Status::Ok();
}

Status NfsBackend::Chmod(const std::string& path, mode_t mode) const {
  return OnPath("chmod", path, [mode](nfs_context* ctx, const char* p) {
    return nfs_lchmod(ctx, p, static_cast<int>(mode & 07777));
  });
}

Status NfsBackend::Chown(const std::string& path, uid_t uid, gid_t gid) const {
  return OnPath("chown", path, [uid, gid](nfs_context* ctx, const char* p) {
    nfs_stat_64 s{};
    if (uid == static_cast<uid_t>(-1) || gid == static_cast<gid_t>(-1)) {
      if (int rc = nfs_lstat64(ctx, p, &s); rc < 0) return rc;  // -1 keeps the current id
    }
    int u = uid == static_cast<uid_t>(-1) ? static_cast<int>(s.nfs_uid) : static_cast<int>(uid);
    int g = gid == static_cast<gid_t>(-1) ? static_cast<int>(s.nfs_gid) : static_cast<int>(gid);
    return nfs_lchown(ctx, p, u, g);
  });
}

Status NfsBackend::Utimens(const std::string& path, const struct timespec times[2]) const {
  return OnPath("utimens", path, [times](nfs_context* ctx, const char* p) {
    nfs_stat_64 s{};
    if (times[0].tv_nsec == UTIME_OMIT || times[1].tv_nsec == UTIME_OMIT) {
      if (int rc = nfs_lstat64(ctx, p, &s); rc < 0) return rc;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct timeval tv[2];
    const uint64_t kept_sec[2] = {s.nfs_atime, s.nfs_mtime};
    const uint64_t kept_nsec[2] = {s.nfs_atime_nsec, s.nfs_mtime_nsec};
    for (int i = 0; i < 2; ++i) {
      struct timespec t = times[i];
      if (t.tv_nsec == UTIME_NOW) t = now;
      if (t.tv_nsec == UTIME_OMIT) {
        t = {static_cast<time_t>(kept_sec[i]), static_cast<long>(kept_nsec[i])};
      }
      tv[i] = {t.tv_sec, t.tv_nsec / 1000};
    }
    return nfs_lutimes(ctx, p, tv);
  });
}

Status NfsBackend::Truncate(const std::string& path, uint64_t size) const {
  return OnPath("truncate", path,
                [size](nfs_context* ctx, const char* p) { return nfs_truncate(ctx, p, size); });
}

Status NfsBackend::Statfs(const std::string& path, struct statvfs* st) const {
  nfs_statvfs_64 s{};
  VMETAFS_RETURN_IF_ERROR(OnPath(
      "statfs", path, [&s](nfs_context* ctx, const char* p) { return nfs_statvfs64(ctx, p, &s); }));
  *st = {};
  st->f_bsize = s.f_bsize;
  st->f_frsize = s.f_frsize;
  st->f_blocks = s.f_blocks;
  st->f_bfree = s.f_bfree;
  st->f_bavail = s.f_bavail;
  st->f_files = s.f_files;
  st->f_ffree = s.f_ffree;
  st->f_favail = s.f_favail;
  st->f_fsid = s.f_fsid;
  st->f_flag = s.f_flag;
  st->f_namemax = s.f_namemax;
  return Status::Ok();
}

Status NfsBackend::ReadDir(const std::string& path, std::vector<DirEntry>* out) const {
  return OnPath("readdir", path, [out](nfs_context* ctx, const char* p) {
    nfsdir* dir = nullptr;
    if (int rc = nfs_opendir(ctx, p, &dir); rc < 0) return rc;
    out->clear();  // a retried call starts over
    while (nfsdirent* e = nfs_readdir(ctx, dir)) {
      std::string_view name = e->name;
      if (name == "." || name == "..") continue;
      out->push_back(DirEntry{std::string(name), static_cast<ino_t>(e->inode), TypeOf(*e)});
    }
    nfs_closedir(ctx, dir);
    return 0;
  });
}

Status NfsBackend::GetXattr(const std::string&, const std::string&, std::string*) const {
  return Status::NotSupported("extended attributes are not available over NFS");
}

Status NfsBackend::SetXattr(const std::string&, const std::string&, const std::string&, int) const {
  return Status::NotSupported("extended attributes are not available over NFS");
}

Status NfsBackend::ListXattr(const std::string&, std::string*) const {
  return Status::NotSupported("extended attributes are not available over NFS");
}

Status NfsBackend::RemoveXattr(const std::string&, const std::string&) const {
  return Status::NotSupported("extended attributes are not available over NFS");
}

}  // namespace vmetafs::backend
