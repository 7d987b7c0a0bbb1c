// InodeTable: the FUSE inode numbers of the backing's files, and the names that reach them.
//
// FUSE speaks of inode numbers; backends speak of paths relative to the backing root. Each Inode
// is keyed by the backing's (st_dev, st_ino) so that hard links and repeated lookups share one
// number, and remembers the directory and name it was last looked up, created, linked or renamed
// under: following those up to the root gives the path a backend call needs. A file with several
// links is reached by whichever name was used last; when that name is unlinked the inode has no
// path until another name is looked up (operations then answer from an open handle or ESTALE).
//
// FUSE numbers are handed out from a counter and never reused, so generation numbers are not
// needed. The root is FUSE_ROOT_ID and is never forgotten. Lifetime follows the kernel's lookup
// count: Lookup() adds one, Forget() removes n, and at zero the number is dropped. Open handles
// keep their Inode alive through shared_ptr even after that.
//
// Locking: one mutex guards the maps and every Inode's naming fields (parent, name, lookup count).
// It is held only while those are read or changed, never across a backend or store call. Each
// Inode's OpenFile has its own mutex, taken BEFORE this one where both are needed.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

namespace vmetafs::store {
class ProtectedImage;
}

namespace vmetafs::fusefs {

struct FileHandle;

// What the daemon keeps for a backing file while it is open through the mount: all its open
// handles and the store's ProtectedImage (null with journal=off). `mutex` serializes the first
// open (which runs the store's first-open verification) and the last release, so an open never
// returns before the verification that guards it has finished.
struct OpenFile {
  std::mutex mutex;
  std::set<FileHandle*> handles;
  std::shared_ptr<store::ProtectedImage> image;
};

class Inode {
 public:
  Inode(fuse_ino_t id, dev_t dev, ino_t ino, mode_t type)
      : id_(id), dev_(dev), ino_(ino), type_(type) {}
  fuse_ino_t id() const { return id_; }
  dev_t dev() const { return dev_; }
  ino_t ino() const { return ino_; }
  mode_t type() const { return type_; }  // S_IFMT bits
  bool Matches(const struct stat& st) const {
    return st.st_dev == dev_ && st.st_ino == ino_ && (st.st_mode & S_IFMT) == type_;
  }

  OpenFile open;

  // The daemon's S_NOSEC: whether the file is known to have neither set-user-ID nor set-group-ID
  // with group-execute, so that a request asking to clear them needs no look at the backing.
  // Known from a stat taken after ModeEpoch() returned `epoch` (SawNoSuidGid); forgotten by
  // ModeChanged(), which is called after every stat that shows the bits (a chmod through the
  // mount ends with one).
  bool KnownNoSuidGid() const { return nosec_epoch_.load() == mode_epoch_.load(); }
  uint64_t ModeEpoch() const { return mode_epoch_.load(); }
  void SawNoSuidGid(uint64_t epoch) { nosec_epoch_.store(epoch); }
  void ModeChanged() { mode_epoch_.fetch_add(1); }

 private:
  friend class InodeTable;
  std::atomic<uint64_t> mode_epoch_{0};
  std::atomic<uint64_t> nosec_epoch_{UINT64_MAX};
  const fuse_ino_t id_;
  const dev_t dev_;
  const ino_t ino_;
  const mode_t type_;
  // Guarded by InodeTable::mutex_.
  fuse_ino_t parent_ = 0;
  std::string name_;
  uint64_t nlookup_ = 0;
  bool detached_ = false;  // its recorded name was removed
};

class InodeTable {
 public:
  InodeTable();

  // Records the backing root's identity. Called once, before the mount.
  void SetRoot(const struct stat& st);
  // The inode with FUSE number `id`, or null when the kernel names one it was told to forget.
  std::shared_ptr<Inode> Get(fuse_ino_t id) const;
  // Counts one lookup of `name` in directory `parent`, whose backing file is `st`. An existing
  // inode of the same file is reused and now reached by this name.
  std::shared_ptr<Inode> Lookup(fuse_ino_t parent, const std::string& name, const struct stat& st);
  void Forget(fuse_ino_t id, uint64_t nlookup);

  // The path of `id` relative to the root ("" for the root); false when it has none any more.
  bool Path(fuse_ino_t id, std::string* out) const;
  // The path of `name` inside directory `parent`.
  bool ChildPath(fuse_ino_t parent, const std::string& name, std::string* out) const;

  // A rename through the mount moved the file `st` to `name` in `parent`.
  void Moved(const struct stat& st, fuse_ino_t parent, const std::string& name);
  // The name `name` in `parent`, which held the file `st`, was removed.
  void Removed(const struct stat& st, fuse_ino_t parent, const std::string& name);

  size_t size() const;

 private:
  struct Key {
    dev_t dev;
    ino_t ino;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<uint64_t>()(k.ino * 31 + k.dev); }
  };
  bool PathLocked(fuse_ino_t id, std::string* out) const;
  std::shared_ptr<Inode> FindLocked(const struct stat& st) const;

  mutable std::mutex mutex_;
  std::unordered_map<fuse_ino_t, std::shared_ptr<Inode>> by_id_;
  std::unordered_map<Key, fuse_ino_t, KeyHash> by_key_;
  fuse_ino_t next_id_ = FUSE_ROOT_ID + 1;
};

}  // namespace vmetafs::fusefs
