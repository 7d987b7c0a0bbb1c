// NfsBackend: a backing reached over NFS with libnfs 4.0 (no kernel mount).
//
// Spec: nfs://SERVER/EXPORT[/SUBDIR][?ARG=VALUE&...]. The longest leading part of the path that
// the server accepts as a mount is the export; the rest is a directory below it that becomes the
// backing root. Arguments of our own, removed before the URL is handed to libnfs:
//   timeout=SECONDS   soft mount: a request that cannot reach the server for this long fails
//                     with EIO (default 0: hard mount, requests wait until the server is back)
//   connections=N     connections in the pool, i.e. requests served concurrently (default 4, 1..64)
// Every other argument is libnfs's (version=3|4, nfsport=, mountport=, uid=, gid=, ...); libnfs's
// autoreconnect and directory cache are always off (reconnects are done here; see NfsPool).
//
// NFS version 3 is the one to use for images. version=4 works with libnfs 4.0's NFSv4 client,
// which its own header calls not yet functional: it cannot write more than a few KiB per WRITE
// (writes are split into 3 KiB WRITEs, slowly), creates files with an unset mode and time (the
// mode is set again after creating), and reads at most 1 MiB per READ.
//
// Semantics (see also nfs_pool.h and nfs_file.h): errors carry the server's errno as libnfs maps
// NFS status codes (ESTALE, EACCES, EPERM, ENOSPC, EDQUOT, EROFS, ENOENT, EEXIST, ENOTEMPTY,
// EISDIR, ENOTDIR, EIO...). Chmod/Chown/Utimens do not follow a final symlink. Utimens has
// microsecond resolution (libnfs passes struct timeval); UTIME_NOW is the client's clock.
// Rename flags (RENAME_NOREPLACE, RENAME_EXCHANGE) and extended attributes are NotSupported.
// ReadDir omits "." and "..". Id() is nfs://SERVER/PATH with the path normalized and no arguments.
// Thread safety: every method may be called from any thread.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "fusefs/backend/backend.h"

struct nfs_context;

namespace vmetafs::backend {

struct NfsShared;

class NfsBackend : public Backend {
 public:
  static Status Open(const std::string& spec, std::unique_ptr<Backend>* out);
  ~NfsBackend() override;

  std::string Id() const override { return id_; }
  bool KernelFiles() const override { return false; }
  Status Lstat(const std::string& path, struct stat* st) const override;
  Status Open(const std::string& path, int flags, mode_t mode,
              std::unique_ptr<File>* out) const override;
  Status Mknod(const std::string& path, mode_t mode, dev_t rdev) const override;
  Status Mkdir(const std::string& path, mode_t mode) const override;
  Status Rmdir(const std::string& path) const override;
  Status Unlink(const std::string& path) const override;
  Status Symlink(const std::string& target, const std::string& path) const override;
  Status Readlink(const std::string& path, std::string* target) const override;
  Status Link(const std::string& from, const std::string& to) const override;
  Status Rename(const std::string& from, const std::string& to, unsigned flags) const override;
  Status Chmod(const std::string& path, mode_t mode) const override;
  Status Chown(const std::string& path, uid_t uid, gid_t gid) const override;
  Status Utimens(const std::string& path, const struct timespec times[2]) const override;
  Status Truncate(const std::string& path, uint64_t size) const override;
  Status Statfs(const std::string& path, struct statvfs* st) const override;
  Status ReadDir(const std::string& path, std::vector<DirEntry>* out) const override;
  Status GetXattr(const std::string& path, const std::string& name,
                  std::string* value) const override;
  Status SetXattr(const std::string& path, const std::string& name, const std::string& value,
                  int flags) const override;
  Status ListXattr(const std::string& path, std::string* names) const override;
  Status RemoveXattr(const std::string& path, const std::string& name) const override;

 private:
  NfsBackend(std::string id, std::shared_ptr<NfsShared> shared);
  // Runs `call(ctx, nfs_path)` for a path relative to the backing root.
  Status OnPath(std::string_view what, const std::string& path,
                const std::function<int(struct nfs_context*, const char*)>& call) const;
  Status CreateFile(const std::string& path, int flags, mode_t mode, uint64_t id) const;

  const std::string id_;
  std::shared_ptr<NfsShared> shared_;
};

}  // namespace vmetafs::backend
