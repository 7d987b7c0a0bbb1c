// Filesystem: directory listing.
//
// A listing is a snapshot of the backing directory taken at opendir and again whenever the
// client rewinds to offset 0. Offsets are positions in it: 0 ".", 1 "..", then the backing's
// entries; an entry's offset is the position of the one after it.
#include <fcntl.h>

#include <cerrno>

#include "fusefs/filesystem.h"

namespace vmetafs::fusefs {
namespace {

DirHandle& Dir(const fuse_file_info* fi) { return *reinterpret_cast<DirHandle*>(fi->fh); }

}  // namespace

Status Filesystem::Opendir(fuse_ino_t ino, fuse_file_info* fi) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  auto dir = std::make_unique<DirHandle>();
  VMETAFS_RETURN_IF_ERROR(backend_->ReadDir(path, &dir->entries));
  fi->fh = reinterpret_cast<uint64_t>(dir.release());
  fi->cache_readdir = 0;
  fi->keep_cache = 0;
  return Status::Ok();
}

Status Filesystem::Readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                           fuse_file_info* fi, bool plus, std::vector<char>* buf) {
  DirHandle& dir = Dir(fi);
  std::lock_guard lock(dir.mutex);
  std::string dir_path;
  bool named = inodes_.Path(ino, &dir_path);
  if (offset == 0 && !dir.fresh) {
    if (!named) return Status::IoError("directory has no path any more", ESTALE);
    VMETAFS_RETURN_IF_ERROR(backend_->ReadDir(dir_path, &dir.entries));
  }
  dir.fresh = false;
  std::shared_ptr<Inode> self = Node(ino);
  buf->resize(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(offset); i < dir.entries.size() + 2; ++i) {
    std::string name = i == 0 ? "." : i == 1 ? ".." : dir.entries[i - 2].name;
    fuse_entry_param e = {};
    e.attr.st_ino = i < 2 ? (self != nullptr ? self->ino() : 0) : dir.entries[i - 2].ino;
    e.attr.st_mode = i < 2 ? S_IFDIR : dir.entries[i - 2].type;
    off_t next = static_cast<off_t>(i + 1);
    char* at = buf->data() + used;
    size_t room = size - used;
    size_t n;
    if (!plus) {
      n = fuse_add_direntry(req, at, room, name.c_str(), &e.attr, next);
    } else {
      // With no ino the kernel takes the entry as a name only and looks it up itself later.
      struct stat st;
      std::string path = named ? (dir_path.empty() ? name : dir_path + "/" + name) : "";
      if (i >= 2 && named && backend_->Lstat(path, &st).ok()) EntryFromStat(ino, name, st, &e);
      n = fuse_add_direntry_plus(req, at, room, name.c_str(), &e, next);
      if (n > room && e.ino != 0) inodes_.Forget(e.ino, 1);  // not sent: not looked up
    }
    if (n > room) break;
    used += n;
  }
  buf->resize(used);
  return Status::Ok();
}

void Filesystem::Releasedir(fuse_file_info* fi) { delete &Dir(fi); }

Status Filesystem::Fsyncdir(fuse_ino_t ino, bool datasync) {
  std::string path;
  VMETAFS_RETURN_IF_ERROR(PathOf(ino, &path));
  std::unique_ptr<backend::File> dir;
  VMETAFS_RETURN_IF_ERROR(backend_->Open(path, O_RDONLY | O_DIRECTORY, 0, &dir));
  return dir->Fsync(datasync);
}

}  // namespace vmetafs::fusefs
