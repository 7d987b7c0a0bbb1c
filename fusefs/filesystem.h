// Filesystem: what the FUSE operations do, between the kernel's requests and the backend/store.
//
// Each method serves one FUSE request and returns a Status whose Errno() the operation table
// (operations.cc) replies with; on success the outputs are filled and the reply is the table's.
// Methods are called concurrently from libfuse's worker threads. Write, Fallocate, Setattr, Open
// and Create clear set-user-ID/set-group-ID bits when the request being served asks for it
// (KillSuidGidRequested, killpriv_v2.h); chown always does.
//
// Open files. Every open through the mount gets a FileHandle (fi->fh) with its own backend File
// (honouring the client's O_DIRECT). The first open of a backing file, while no other is active,
// hands a second, buffered, read-write File to Protector::OpenFirst, which verifies and if needed
// restores the image's metadata before the open returns; all opens of the file then share the
// ProtectedImage until the last release. Writes, discards, truncates and flushes go through it.
// With journal=off (no Protector) everything passes straight to the backend.
//
// Lock order: OpenFile::mutex (per inode), then InodeTable's mutex, then open_mutex_. None is held
// while replying to the kernel.
#pragma once

#include <fuse_lowlevel.h>

#include <cerrno>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "fusefs/backend/backend.h"
#include "fusefs/fuse_uring.h"
#include "fusefs/inode_table.h"
#include "store/protector.h"

namespace vmetafs::fusefs {

// The errno a failed operation answers the kernel with: the Status's own, else EIO (0: OK).
inline int ErrnoOf(const Status& st) { return st.ok() ? 0 : st.Errno() > 0 ? st.Errno() : EIO; }

struct FsConfig {
  double timeout = 1.0;        // attribute and entry cache, seconds
  size_t max_write = 1 << 20;  // conn->max_write; also the largest read
};

struct FileHandle {
  std::shared_ptr<Inode> inode;
  std::unique_ptr<backend::File> file;
  std::shared_ptr<store::ProtectedImage> image;  // null with journal=off
  int flags = 0;                                 // as opened on the backend
};

struct DirHandle {
  std::mutex mutex;
  std::vector<backend::DirEntry> entries;  // a snapshot, taken at opendir and at each rewind
  bool fresh = true;                       // no readdir since the snapshot was taken
};

class Filesystem {
 public:
  Filesystem(std::unique_ptr<backend::Backend> backend, FsConfig config);
  ~Filesystem();
  // Starts journaling through `protector` (borrowed; outlives the mount). Before mounting.
  void SetProtector(store::Protector* protector) { protector_ = protector; }
  Status Init();  // stats the root; before mounting
  const FsConfig& config() const { return config_; }
  backend::Backend& backend() { return *backend_; }
  // Releases the images of files still open when the loop ends (a lazy unmount leaves them).
  void ReleaseAll();

  // Names.
  Status Lookup(fuse_ino_t parent, const char* name, fuse_entry_param* e);
  void Forget(fuse_ino_t ino, uint64_t nlookup);
  Status Getattr(fuse_ino_t ino, fuse_file_info* fi, struct stat* st);
  Status Setattr(fuse_ino_t ino, const struct stat& attr, int to_set, fuse_file_info* fi,
                 struct stat* out);
  Status Readlink(fuse_ino_t ino, std::string* target);
  Status Mknod(fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev, const fuse_ctx* ctx,
               fuse_entry_param* e);
  Status Mkdir(fuse_ino_t parent, const char* name, mode_t mode, const fuse_ctx* ctx,
               fuse_entry_param* e);
  Status Symlink(const char* target, fuse_ino_t parent, const char* name, const fuse_ctx* ctx,
                 fuse_entry_param* e);
  Status Link(fuse_ino_t ino, fuse_ino_t parent, const char* name, fuse_entry_param* e);
  Status Unlink(fuse_ino_t parent, const char* name);
  Status Rmdir(fuse_ino_t parent, const char* name);
  Status Rename(fuse_ino_t parent, const char* name, fuse_ino_t new_parent, const char* new_name,
                unsigned flags);
  Status Statfs(fuse_ino_t ino, struct statvfs* st);
  Status GetXattr(fuse_ino_t ino, const char* name, std::string* value);
  Status SetXattr(fuse_ino_t ino, const char* name, std::string_view value, int flags);
  Status ListXattr(fuse_ino_t ino, std::string* names);
  Status RemoveXattr(fuse_ino_t ino, const char* name);

  // Files. Open/Create set fi->fh to a new FileHandle that Release deletes.
  Status Open(fuse_ino_t ino, fuse_file_info* fi);
  Status Create(fuse_ino_t parent, const char* name, mode_t mode, const fuse_ctx* ctx,
                fuse_file_info* fi, fuse_entry_param* e);
  // *out points into a per-thread buffer, valid until the thread's next Read.
  Status Read(fuse_file_info* fi, size_t size, off_t offset, std::span<const uint8_t>* out);
  Status Write(fuse_file_info* fi, fuse_bufvec* in, off_t offset, size_t* written);
  Status Fsync(fuse_file_info* fi, bool datasync);
  void Release(fuse_file_info* fi);
  Status Fallocate(fuse_file_info* fi, int mode, off_t offset, off_t length);
  Status Lseek(fuse_file_info* fi, off_t offset, int whence, off_t* result);
  Status CopyFileRange(fuse_file_info* fi_in, off_t off_in, fuse_file_info* fi_out, off_t off_out,
                       size_t len, int flags, size_t* copied);
  Status Getlk(fuse_file_info* fi, struct flock* lock);
  Status Setlk(fuse_file_info* fi, const struct flock& lock, bool wait);
  Status Flock(fuse_file_info* fi, int op);

  // Directories. Opendir sets fi->fh to a DirHandle that Releasedir deletes. Readdir fills `buf`
  // with at most `size` bytes of entries starting after `offset`.
  Status Opendir(fuse_ino_t ino, fuse_file_info* fi);
  Status Readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi,
                 bool plus, std::vector<char>* buf);
  void Releasedir(fuse_file_info* fi);
  Status Fsyncdir(fuse_ino_t ino, bool datasync);

 private:
  std::shared_ptr<Inode> Node(fuse_ino_t ino) const { return inodes_.Get(ino); }
  Status PathOf(fuse_ino_t ino, std::string* path) const;
  Status ChildPathOf(fuse_ino_t parent, const char* name, std::string* path) const;
  // Stats `path` and counts a lookup of it as `name` in `parent`.
  // Getattr's stat, without noting the mode.
  Status Stat(Inode& node, fuse_file_info* fi, struct stat* st);
  Status Entry(fuse_ino_t parent, const std::string& name, const std::string& path,
               fuse_entry_param* e);
  void EntryFromStat(fuse_ino_t parent, const std::string& name, const struct stat& st,
                     fuse_entry_param* e);
  // New entries belong to the caller, as if it had created them on the backing itself.
  void GiveToCaller(fuse_ino_t parent, const std::string& path, const fuse_ctx* ctx);
  Status TruncateFile(const std::shared_ptr<Inode>& node, FileHandle* fh, uint64_t size);

  // Set-user-ID and set-group-ID (killpriv_v2.h). The daemon writes and truncates as root, so the
  // backing keeps the bits where the client's own write would have lost them: when the kernel
  // leaves clearing them to the daemon, KillSuidGid clears set-user-ID, and set-group-ID of a
  // group-executable file, through `file` (or by path when null). NoteMode records a stat's mode.
  Status KillSuidGidIfAsked(Inode& node, backend::File* file);
  Status KillSuidGid(Inode& node, backend::File* file);
  static void NoteMode(Inode& node, mode_t mode);

  // Open handles (file_handles.cc).
  Status OpenHandle(const std::shared_ptr<Inode>& node, int flags, FileHandle** out);
  Status Attach(const std::shared_ptr<Inode>& node, std::unique_ptr<backend::File> file, int flags,
                FileHandle** out);
  Status OwnHandle(const std::string& path, std::unique_ptr<store::ImageFile>* out);
  Status FirstOpen(const std::string& path, std::shared_ptr<store::ProtectedImage>* image);
  void CloseHandle(FileHandle* fh);
  Status StatOpen(Inode& node, struct stat* st);
  void FinishOpen(FileHandle* fh, fuse_file_info* fi);
  Status WriteThrough(FileHandle& fh, uint64_t offset, std::span<const uint8_t> data);
  // What ends a READ or WRITE whose transfer a ring thread took (fusefs/fuse_uring.h).
  static RingFinish FinishRead(const backend::File* file, const store::ProtectedImage* image,
                               uint64_t offset);
  static RingFinish FinishWrite(backend::File* file, uint64_t offset,
                                std::span<const uint8_t> data);
  Status TruncateThrough(FileHandle& fh, uint64_t size);
  Status CopyThrough(FileHandle& in, uint64_t off_in, FileHandle& out, uint64_t off_out, size_t len,
                     size_t* copied);

  const FsConfig config_;
  std::unique_ptr<backend::Backend> backend_;
  store::Protector* protector_ = nullptr;
  InodeTable inodes_;
  const bool as_root_;

  std::mutex open_mutex_;                  // guards open_
  std::set<std::shared_ptr<Inode>> open_;  // inodes with at least one FileHandle
};

// Backend open flags for the client's: access mode, O_DIRECT and the sync flags pass; O_APPEND is
// dropped because the kernel already chose the offset, O_TRUNC because truncation goes through
// the store, O_CREAT/O_EXCL because only create() creates.
int BackendOpenFlags(int client_flags);

inline FileHandle& Handle(const fuse_file_info* fi) {
  return *reinterpret_cast<FileHandle*>(fi->fh);
}
// The FileHandle of `fi` when it is one: the kernel also passes directories' handles (futimens on
// a directory), and those are DirHandles.
inline FileHandle* HandleOf(const Inode& node, const fuse_file_info* fi) {
  return fi != nullptr && fi->fh != 0 && node.type() == S_IFREG ? &Handle(fi) : nullptr;
}

}  // namespace vmetafs::fusefs
