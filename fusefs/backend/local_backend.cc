#include "fusefs/backend/local_backend.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>

namespace vmetafs::backend {
namespace {

// Paths come from the FUSE layer's inode table, built from names the kernel looked up, so they are
// well formed; checking anyway keeps a bug there from becoming an escape from the root.
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

Status Errno(std::string_view what, const std::string& path) {
  int err = errno;
  return PosixError(fmt::format("{} '{}'", what, path), err);
}

}  // namespace

class LocalBackend::Parent {
 public:
  Parent() = default;
  Parent(const Parent&) = delete;
  Parent& operator=(const Parent&) = delete;
  ~Parent() {
    if (owned_) close(fd_);
  }
  int fd() const { return fd_; }
  const char* base() const { return base_.c_str(); }

 private:
  friend class LocalBackend;
  int fd_ = -1;
  bool owned_ = false;
  std::string base_;
};

Status LocalBackend::Open(const std::string& dir, std::unique_ptr<Backend>* out) {
  char* real = realpath(dir.c_str(), nullptr);
  if (real == nullptr) return Errno("backing directory", dir);
  std::string canonical(real);
  std::free(real);
  int fd = open(canonical.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOTDIR) {
      return Status::IoError(fmt::format("backing '{}' is not a directory", dir), ENOTDIR);
    }
    return Errno("opening backing directory", canonical);
  }
  out->reset(new LocalBackend(fd, canonical));
  return Status::Ok();
}

LocalBackend::~LocalBackend() { close(root_fd_); }

Status LocalBackend::OpenBeneath(const std::string& path, int flags, mode_t mode, int* fd) const {
  VMETAFS_RETURN_IF_ERROR(CheckRelative(path));
  struct open_how how = {};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.mode = (flags & (O_CREAT | O_TMPFILE)) != 0 ? (mode & 07777) : 0;  // openat2 is strict
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  const char* name = path.empty() ? "." : path.c_str();
  for (int attempt = 0;; ++attempt) {
    long r = syscall(SYS_openat2, root_fd_, name, &how, sizeof(how));
    if (r >= 0) {
      *fd = static_cast<int>(r);
      return Status::Ok();
    }
    // RESOLVE_BENEATH answers EAGAIN when a concurrent rename raced with the lookup.
    if ((errno != EAGAIN || attempt >= 16) && errno != EINTR) return Errno("opening", path);
  }
}

Status LocalBackend::ResolveParent(const std::string& path, Parent* out) const {
  if (path.empty()) return Status::InvalidArgument("the backing root has no parent");
  VMETAFS_RETURN_IF_ERROR(CheckRelative(path));
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) {
    out->fd_ = root_fd_;
    out->base_ = path;
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(OpenBeneath(path.substr(0, slash), O_PATH | O_DIRECTORY, 0, &out->fd_));
  out->owned_ = true;
  out->base_ = path.substr(slash + 1);
  return Status::Ok();
}

Status LocalBackend::ProcPath(const std::string& path, Parent* parent,
                              std::string* proc_path) const {
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, parent));
  *proc_path = fmt::format("/proc/self/fd/{}/{}", parent->fd(), parent->base());
  return Status::Ok();
}

Status LocalBackend::Lstat(const std::string& path, struct stat* st) const {
  if (path.empty()) return fstat(root_fd_, st) == 0 ? Status::Ok() : Errno("stat", path);
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  if (fstatat(p.fd(), p.base(), st, AT_SYMLINK_NOFOLLOW) != 0) return Errno("stat", path);
  return Status::Ok();
}

Status LocalBackend::Open(const std::string& path, int flags, mode_t mode,
                          std::unique_ptr<File>* out) const {
  int fd = -1;
  VMETAFS_RETURN_IF_ERROR(OpenBeneath(path, flags | O_NOFOLLOW, mode, &fd));
  out->reset(new LocalFile(fd, flags));
  return Status::Ok();
}

Status LocalBackend::Mknod(const std::string& path, mode_t mode, dev_t rdev) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  return mknodat(p.fd(), p.base(), mode, rdev) == 0 ? Status::Ok() : Errno("mknod", path);
}

Status LocalBackend::Mkdir(const std::string& path, mode_t mode) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  return mkdirat(p.fd(), p.base(), mode) == 0 ? Status::Ok() : Errno("mkdir", path);
}

Status LocalBackend::Rmdir(const std::string& path) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  return unlinkat(p.fd(), p.base(), AT_REMOVEDIR) == 0 ? Status::Ok() : Errno("rmdir", path);
}

Status LocalBackend::Unlink(const std::string& path) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  return unlinkat(p.fd(), p.base(), 0) == 0 ? Status::Ok() : Errno("unlink", path);
}

Status LocalBackend::Symlink(const std::string& target, const std::string& path) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  return symlinkat(target.c_str(), p.fd(), p.base()) == 0 ? Status::Ok() : Errno("symlink", path);
}

Status LocalBackend::Readlink(const std::string& path, std::string* target) const {
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  for (size_t size = 256;; size *= 2) {
    target->resize(size);
    ssize_t n = readlinkat(p.fd(), p.base(), target->data(), size);
    if (n < 0) return Errno("readlink", path);
    if (static_cast<size_t>(n) < size) {
      target->resize(static_cast<size_t>(n));
      return Status::Ok();
    }
    if (size > PATH_MAX * 4) return Status::IoError("readlink: target too long", ENAMETOOLONG);
  }
}

Status LocalBackend::Link(const std::string& from, const std::string& to) const {
  Parent pf, pt;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(from, &pf));
  VMETAFS_RETURN_IF_ERROR(ResolveParent(to, &pt));
  return linkat(pf.fd(), pf.base(), pt.fd(), pt.base(), 0) == 0 ? Status::Ok() : Errno("link", to);
}

Status LocalBackend::Rename(const std::string& from, const std::string& to, unsigned flags) const {
  Parent pf, pt;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(from, &pf));
  VMETAFS_RETURN_IF_ERROR(ResolveParent(to, &pt));
  if (renameat2(pf.fd(), pf.base(), pt.fd(), pt.base(), flags) != 0) return Errno("rename", from);
  return Status::Ok();
}

Status LocalBackend::Chmod(const std::string& path, mode_t mode) const {
  if (path.empty()) return fchmod(root_fd_, mode) == 0 ? Status::Ok() : Errno("chmod", path);
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  // AT_SYMLINK_NOFOLLOW: refuses (EOPNOTSUPP) rather than follow a symlink swapped in meanwhile.
  if (fchmodat(p.fd(), p.base(), mode, AT_SYMLINK_NOFOLLOW) != 0) return Errno("chmod", path);
  return Status::Ok();
}

Status LocalBackend::Chown(const std::string& path, uid_t uid, gid_t gid) const {
  if (path.empty()) return fchown(root_fd_, uid, gid) == 0 ? Status::Ok() : Errno("chown", path);
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  if (fchownat(p.fd(), p.base(), uid, gid, AT_SYMLINK_NOFOLLOW) != 0) return Errno("chown", path);
  return Status::Ok();
}

Status LocalBackend::Utimens(const std::string& path, const struct timespec times[2]) const {
  if (path.empty()) return futimens(root_fd_, times) == 0 ? Status::Ok() : Errno("utimens", path);
  Parent p;
  VMETAFS_RETURN_IF_ERROR(ResolveParent(path, &p));
  if (utimensat(p.fd(), p.base(), times, AT_SYMLINK_NOFOLLOW) != 0) return Errno("utimens", path);
  return Status::Ok();
}

Status LocalBackend::Truncate(const std::string& path, uint64_t size) const {
  int fd = -1;
  VMETAFS_RETURN_IF_ERROR(OpenBeneath(path, O_WRONLY | O_NOFOLLOW, 0, &fd));
  Status st = ftruncate(fd, static_cast<off_t>(size)) == 0 ? Status::Ok() : Errno("truncate", path);
  close(fd);
  return st;
}

Status LocalBackend::Statfs(const std::string& path, struct statvfs* st) const {
  return fstatvfs(root_fd_, st) == 0 ? Status::Ok() : Errno("statfs", path);
}

Status LocalBackend::ReadDir(const std::string& path, std::vector<DirEntry>* out) const {
  int fd = -1;
  VMETAFS_RETURN_IF_ERROR(OpenBeneath(path, O_RDONLY | O_DIRECTORY, 0, &fd));
  DIR* dir = fdopendir(fd);
  if (dir == nullptr) {
    Status st = Errno("opendir", path);
    close(fd);
    return st;
  }
  out->clear();
  for (;;) {
    errno = 0;
    struct dirent* d = readdir(dir);
    if (d == nullptr) break;
    std::string_view name(d->d_name);
    if (name == "." || name == "..") continue;
    mode_t type = d->d_type == DT_UNKNOWN ? 0 : DTTOIF(d->d_type);
    out->push_back(DirEntry{std::string(name), d->d_ino, type});
  }
  Status st = errno != 0 ? Errno("readdir", path) : Status::Ok();
  closedir(dir);
  return st;
}

Status LocalBackend::GetXattr(const std::string& path, const std::string& name,
                              std::string* value) const {
  Parent p;
  std::string proc;
  if (!path.empty()) VMETAFS_RETURN_IF_ERROR(ProcPath(path, &p, &proc));
  for (int attempt = 0; attempt < 8; ++attempt) {
    ssize_t n = path.empty() ? fgetxattr(root_fd_, name.c_str(), nullptr, 0)
                             : lgetxattr(proc.c_str(), name.c_str(), nullptr, 0);
    if (n < 0) return Errno("getxattr", path);
    value->resize(static_cast<size_t>(n));
    n = path.empty() ? fgetxattr(root_fd_, name.c_str(), value->data(), value->size())
                     : lgetxattr(proc.c_str(), name.c_str(), value->data(), value->size());
    if (n >= 0) {
      value->resize(static_cast<size_t>(n));
      return Status::Ok();
    }
    if (errno != ERANGE) return Errno("getxattr", path);  // ERANGE: it grew meanwhile
  }
  return Status::IoError("getxattr: value keeps changing size", EIO);
}

Status LocalBackend::SetXattr(const std::string& path, const std::string& name,
                              const std::string& value, int flags) const {
  int r;
  if (path.empty()) {
    r = fsetxattr(root_fd_, name.c_str(), value.data(), value.size(), flags);
  } else {
    Parent p;
    std::string proc;
    VMETAFS_RETURN_IF_ERROR(ProcPath(path, &p, &proc));
    r = lsetxattr(proc.c_str(), name.c_str(), value.data(), value.size(), flags);
  }
  return r == 0 ? Status::Ok() : Errno("setxattr", path);
}

Status LocalBackend::ListXattr(const std::string& path, std::string* names) const {
  Parent p;
  std::string proc;
  if (!path.empty()) VMETAFS_RETURN_IF_ERROR(ProcPath(path, &p, &proc));
  for (int attempt = 0; attempt < 8; ++attempt) {
    ssize_t n =
        path.empty() ? flistxattr(root_fd_, nullptr, 0) : llistxattr(proc.c_str(), nullptr, 0);
    if (n < 0) return Errno("listxattr", path);
    names->resize(static_cast<size_t>(n));
    n = path.empty() ? flistxattr(root_fd_, names->data(), names->size())
                     : llistxattr(proc.c_str(), names->data(), names->size());
    if (n >= 0) {
      names->resize(static_cast<size_t>(n));
      return Status::Ok();
    }
    if (errno != ERANGE) return Errno("listxattr", path);
  }
  return Status::IoError("listxattr: list keeps changing size", EIO);
}

Status LocalBackend::RemoveXattr(const std::string& path, const std::string& name) const {
  int r;
  if (path.empty()) {
    r = fremovexattr(root_fd_, name.c_str());
  } else {
    Parent p;
    std::string proc;
    VMETAFS_RETURN_IF_ERROR(ProcPath(path, &p, &proc));
    r = lremovexattr(proc.c_str(), name.c_str());
  }
  return r == 0 ? Status::Ok() : Errno("removexattr", path);
}

}  // namespace vmetafs::backend
