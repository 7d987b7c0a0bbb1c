// Filesystem: the namespace operations (names, attributes, extended attributes).
#include "fusefs/filesystem.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>

namespace vmetafs::fusefs {
namespace {

Status Stale() { return Status::IoError("inode has no path on the backing any more", ESTALE); }

struct timespec TimeToSet(int to_set, int set_bit, int now_bit, const struct timespec& value) {
  if ((to_set & now_bit) != 0) return {0, UTIME_NOW};
  if ((to_set & set_bit) != 0) return value;
  return {0, UTIME_OMIT};
}

}  // namespace

Filesystem::Filesystem(std::unique_ptr<backend::Backend> backend, FsConfig config)
    : config_(config), backend_(std::move(backend)), as_root_(geteuid() == 0) {}

Filesystem::~Filesystem() { ReleaseAll(); }

Status Filesystem::Init() {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(backend_->Lstat("", &st));
  inodes_.SetRoot(st);
  return Status::Ok();
}

Status Filesystem::PathOf(fuse_ino_t ino, std::string* path) const {
  return inodes_.Path(ino, path) ? Status::Ok() : Stale();
}

Status Filesystem::ChildPathOf(fuse_ino_t parent, const char* name, std::string* path) const {
  return inodes_.ChildPath(parent, name, path) ? Status::Ok() : Stale();
}

void Filesystem::EntryFromStat(fuse_ino_t parent, const std::string& name, const struct stat& st,
                               fuse_entry_param* e) {
  *e = fuse_entry_param{};
  std::shared_ptr<Inode> node = inodes_.Lookup(parent, name, st);
  NoteMode(*node, st.st_mode);
  e->ino = node->id();
  e->attr = st;
  e->attr_timeout = config_.timeout;
  e->entry_timeout = config_.timeout;
}

Status Filesystem::Entry(fuse_ino_t parent, const std::string& name, const std::string& path,
                         fuse_entry_param* e) {
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(backend_->Lstat(path, &st));
  EntryFromStat(parent, name, st, e);
  return Status::Ok();
}

void Filesystem::GiveToCaller(fuse_ino_t parent, const std::string& path, const fuse_ctx* ctx) {
  if (!as_root_ || ctx == nullptr || (ctx->uid == 0 && ctx->gid == 0)) return;
  std::string parent_path;
  struct stat pst;
  gid_t gid = ctx->gid;
  // A set-group-ID directory hands its group down; the backing already did that.
  if (inodes_.Path(parent, &parent_path) && backend_->Lstat(parent_path, &pst).ok() &&
      (pst.st_mode & S_ISGID) != 0) {
    gid = static_cast<gid_t>(-1);
  }
  Status st = backend_->Chown(path, ctx->uid, gid);
  if (!st.ok()) spdlog::debug("giving {} to uid {}: {}", path, ctx->uid, st.ToString());
}

Status Filesystem::Lookup(fuse_ino_t parent, const char* name, fuse_entry_param* e) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  return Entry(parent, name, path, e);
}

void Filesystem::Forget(fuse_ino_t ino, uint64_t nlookup) { inodes_.Forget(ino, nlookup); }

Status Filesystem::Getattr(fuse_ino_t ino, fuse_file_info* fi, struct stat* st) {
  std::shared_ptr<Inode> node = Node(ino);
  if (node == nullptr) return Stale();
  Status s = Stat(*node, fi, st);
  if (s.ok()) NoteMode(*node, st->st_mode);
  return s;
}

Status Filesystem::Stat(Inode& node, fuse_file_info* fi, struct stat* st) {
  const fuse_ino_t ino = node.id();
  if (FileHandle* fh = HandleOf(node, fi)) return fh->file->Fstat(st);
  std::string path;
  if (inodes_.Path(ino, &path)) {
    Status s = backend_->Lstat(path, st);
    if (s.ok() && (ino == FUSE_ROOT_ID || node.Matches(*st))) return s;
    if (!s.ok() && s.Errno() != ENOENT) return s;
  }
  // Unlinked, or its name now holds another file: an open handle still knows it.
  return StatOpen(node, st);
}

Status Filesystem::Setattr(fuse_ino_t ino, const struct stat& attr, int to_set, fuse_file_info* fi,
                           struct stat* out) {
  std::shared_ptr<Inode> node = Node(ino);
  if (node == nullptr) return Stale();
  FileHandle* fh = HandleOf(*node, fi);
  std::string path;
  bool named = inodes_.Path(ino, &path);
  if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) != 0) {
    if (!named) return Stale();
    uid_t uid = (to_set & FUSE_SET_ATTR_UID) != 0 ? attr.st_uid : static_cast<uid_t>(-1);
    gid_t gid = (to_set & FUSE_SET_ATTR_GID) != 0 ? attr.st_gid : static_cast<gid_t>(-1);
    VMETAFS_RETURN_IF_ERROR(backend_->Chown(path, uid, gid));
    // chown(2) clears the bits whoever calls it. A kernel that leaves that to the daemon does not
    // ask for it, and what an NFS server does for its root caller is the server's choice.
    VMETAFS_RETURN_IF_ERROR(KillSuidGid(*node, fh != nullptr ? fh->file.get() : nullptr));
  }
  if ((to_set & FUSE_SET_ATTR_MODE) != 0) {
    if (!named) return Stale();
    VMETAFS_RETURN_IF_ERROR(backend_->Chmod(path, attr.st_mode & 07777));
  }
  if ((to_set & FUSE_SET_ATTR_SIZE) != 0) {
    VMETAFS_RETURN_IF_ERROR(KillSuidGidIfAsked(*node, fh != nullptr ? fh->file.get() : nullptr));
    VMETAFS_RETURN_IF_ERROR(TruncateFile(node, fh, static_cast<uint64_t>(attr.st_size)));
  }
  if ((to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) != 0) {
    if (!named) return Stale();
    struct timespec times[2] = {
        TimeToSet(to_set, FUSE_SET_ATTR_ATIME, FUSE_SET_ATTR_ATIME_NOW, attr.st_atim),
        TimeToSet(to_set, FUSE_SET_ATTR_MTIME, FUSE_SET_ATTR_MTIME_NOW, attr.st_mtim)};
    VMETAFS_RETURN_IF_ERROR(backend_->Utimens(path, times));
  }
  return Getattr(ino, fi, out);
}

Status Filesystem::Readlink(fuse_ino_t ino, std::string* target) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  return backend_->Readlink(path, target);
}

Status Filesystem::Mknod(fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev,
                         const fuse_ctx* ctx, fuse_entry_param* e) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  VMETAFS_RETURN_IF_ERROR(backend_->Mknod(path, mode, rdev));
  GiveToCaller(parent, path, ctx);
  return Entry(parent, name, path, e);
}

Status Filesystem::Mkdir(fuse_ino_t parent, const char* name, mode_t mode, const fuse_ctx* ctx,
                         fuse_entry_param* e) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  VMETAFS_RETURN_IF_ERROR(backend_->Mkdir(path, mode));
  GiveToCaller(parent, path, ctx);
  return Entry(parent, name, path, e);
}

Status Filesystem::Symlink(const char* target, fuse_ino_t parent, const char* name,
                           const fuse_ctx* ctx, fuse_entry_param* e) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  VMETAFS_RETURN_IF_ERROR(backend_->Symlink(target, path));
  GiveToCaller(parent, path, ctx);
  return Entry(parent, name, path, e);
}

Status Filesystem::Link(fuse_ino_t ino, fuse_ino_t parent, const char* name, fuse_entry_param* e) {
  std::string from, to;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &from));
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &to));
  VMETAFS_RETURN_IF_ERROR(backend_->Link(from, to));
  return Entry(parent, name, to, e);
}

Status Filesystem::Unlink(fuse_ino_t parent, const char* name) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(backend_->Lstat(path, &st));
  VMETAFS_RETURN_IF_ERROR(backend_->Unlink(path));
  inodes_.Removed(st, parent, name);
  if (protector_ != nullptr && S_ISREG(st.st_mode) && st.st_nlink <= 1) {
    protector_->Unlinked(path);
  }
  return Status::Ok();
}

Status Filesystem::Rmdir(fuse_ino_t parent, const char* name) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &path));
  struct stat st;
  VMETAFS_RETURN_IF_ERROR(backend_->Lstat(path, &st));
  VMETAFS_RETURN_IF_ERROR(backend_->Rmdir(path));
  inodes_.Removed(st, parent, name);
  return Status::Ok();
}

Status Filesystem::Rename(fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
                          const char* new_name, unsigned flags) {
  std::string from, to;
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(parent, name, &from));
  VMETAFS_RETURN_IF_ERROR(ChildPathOf(new_parent, new_name, &to));
  struct stat src, dst;
  VMETAFS_RETURN_IF_ERROR(backend_->Lstat(from, &src));
  bool replaced = backend_->Lstat(to, &dst).ok();
  VMETAFS_RETURN_IF_ERROR(backend_->Rename(from, to, flags));
  // rename(2) between two links of one file changes nothing.
  if (replaced && src.st_dev == dst.st_dev && src.st_ino == dst.st_ino) return Status::Ok();
  if ((flags & RENAME_EXCHANGE) != 0) {
    inodes_.Moved(src, new_parent, new_name);
    inodes_.Moved(dst, parent, name);
    if (protector_ != nullptr) {
      // Protector knows plain renames; an exchange is three of them through a name no file can
      // have (an empty path component).
      const std::string parked = "//exchange/" + from;
      protector_->Renamed(from, parked);
      protector_->Renamed(to, from);
      protector_->Renamed(parked, to);
    }
    return Status::Ok();
  }
  if (replaced) {
    inodes_.Removed(dst, new_parent, new_name);
    if (protector_ != nullptr && S_ISREG(dst.st_mode) && dst.st_nlink <= 1) {
      protector_->Unlinked(to);
    }
  }
  inodes_.Moved(src, new_parent, new_name);
  if (protector_ != nullptr) protector_->Renamed(from, to);
  return Status::Ok();
}

Status Filesystem::Statfs(fuse_ino_t ino, struct statvfs* st) {
  std::string path;
  if (!inodes_.Path(ino, &path)) path.clear();
  return backend_->Statfs(path, st);
}

Status Filesystem::GetXattr(fuse_ino_t ino, const char* name, std::string* value) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  return backend_->GetXattr(path, name, value);
}

Status Filesystem::SetXattr(fuse_ino_t ino, const char* name, std::string_view value, int flags) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  return backend_->SetXattr(path, name, std::string(value), flags);
}

Status Filesystem::ListXattr(fuse_ino_t ino, std::string* names) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  return backend_->ListXattr(path, names);
}

Status Filesystem::RemoveXattr(fuse_ino_t ino, const char* name) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  return backend_->RemoveXattr(path, name);
}

}  // namespace vmetafs::fusefs
