// Protector and ProtectedImage: where the daemon (and meta-restore) meet the journal.
//
// Protector owns the journal of one store and takes the first-open decisions of DESIGN.md.
// ProtectedImage tracks one backing file while it is open through the mount: its current metadata
// map (published whole, so the write path looks it up without locks), the write-ahead journaling
// of writes that touch it, and the map's movement when pointers change.
//
// Lock order: ProtectedImage's meta_mutex (one image), then Protector::records_mutex_, then
// anything inside Journal. No lock of the FUSE layer is held while calling in here.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "store/formats/format.h"
#include "store/image_file.h"
#include "store/journal.h"
#include "store/status.h"

namespace vmetafs::store {

struct ProtectorOptions {
  std::string store_dir;
  JournalOptions journal;  // journal.backing names the backing this store belongs to
  ParseLimits limits;
  // When the journal cannot be written: false (default) keeps the VM running and marks the image
  // unprotected; true fails the guest's metadata write with the journal's errno instead.
  bool fail_writes_when_unprotected = false;
};

class ProtectedImage;

// What the first open decided; also what meta-restore prints.
struct OpenDecision {
  bool is_image = false;
  bool has_action = false;  // false for plain files and for images opened unprotected
  Action action = Action::kVerified;
  std::vector<MetadataUnit> units;  // mismatched / restored / adopted units
  std::string detail;
};

class Protector {
 public:
  static Status Open(const ProtectorOptions& options, std::unique_ptr<Protector>* out);
  ~Protector();

  // The first open of the file at `path` (relative to the backing root) while no other open of it
  // is active. `file` is the daemon's own handle on the backing file, opened read-write when the
  // storage allows. Runs the first-open decision before returning. *out tracks the file for all
  // its opens, even when it is not (yet) an image. A refused open returns a Status whose Errno()
  // is EIO, and the log says why. A file of a multi-file image (a VMDK extent) opened while its
  // image is open is not decided on its own: *out journals its writes under the image, with the
  // extent's index (the image's first open verified it).
  Status OpenFirst(const std::string& path, std::unique_ptr<ImageFile> file,
                   std::shared_ptr<ProtectedImage>* out, OpenDecision* decision = nullptr);

  // Namespace changes made through the mount; `from`/`to` may be directories (prefix rename).
  void Renamed(const std::string& from, const std::string& to);
  // The file's last name is gone: its journal is dropped (events stay for history).
  void Unlinked(const std::string& path);

  // Makes the journal durable and closes it. Idempotent.
  Status Close();

  Journal& journal() { return *journal_; }
  const ProtectorOptions& options() const { return options_; }
  // Metadata writes that went to the storage unjournaled because the journal failed.
  uint64_t unprotected_writes() const { return unprotected_writes_.load(); }
  // Read-modify-write of one image record, serialized against renames and other updates.
  Status UpdateImage(uint64_t id, const std::function<void(ImageRecord*)>& change);

 private:
  friend class ProtectedImage;
  Protector(ProtectorOptions options, std::unique_ptr<Journal> journal);

  ProtectorOptions options_;
  std::unique_ptr<Journal> journal_;
  // Images whose journal failed during this mount, with why: the journal may have been failing
  // too long to record it (neither the failure nor the close), and their first opens re-baseline
  // until one succeeds. Degraded() is true if `id` is marked; ClearDegraded() drops the mark once
  // protection has resumed, so that a first open that fails half way (the journal failing again)
  // leaves it for the next.
  bool Degraded(uint64_t id, std::string* why);
  void ClearDegraded(uint64_t id);

  std::mutex records_mutex_;  // guards read-modify-write of image records, and degraded_
  std::map<uint64_t, std::string> degraded_;
  // Extent files of the open multi-file images, by path: (the image, extent index). A leaf lock.
  std::mutex extents_mutex_;
  std::map<std::string, std::pair<std::weak_ptr<ProtectedImage>, uint16_t>> extent_files_;
  // The ProtectedImage for an extent file of an open image, or null when `path` is none.
  std::shared_ptr<ProtectedImage> OpenExtentOf(const std::string& path);
  std::atomic<bool> closed_{false};
  std::atomic<uint64_t> unprotected_writes_{0};
};

class ProtectedImage : public std::enable_shared_from_this<ProtectedImage> {
 public:
  using IoFn = std::function<Status()>;
  ~ProtectedImage();

  // Performs a client write through `write`, which sends it to the storage. When the range touches
  // metadata, the new content of every touched unit is journaled (pending) first; when a pointer
  // unit changes, the map is derived again and newly referenced units are captured. Writes that
  // touch no metadata cost one lock-free lookup. `write_later`, when given, is used instead of
  // `write` where nothing here reads the bytes back (they touch no metadata, the image is not
  // protected, or a plain file's write cannot have made it an image): it may return before the
  // bytes reach the storage, the caller then answers the client only once they have.
  Status Write(uint64_t offset, std::span<const uint8_t> data, const IoFn& write,
               const IoFn& write_later = nullptr);
  // Truncate / discard (punch hole, zero range) move metadata too.
  Status Truncate(uint64_t new_size, const IoFn& truncate);
  Status Discard(uint64_t offset, uint64_t length, const IoFn& discard);
  // The guest's flush: `fsync` syncs the storage, then the journal is made durable (sync=flush)
  // and pending versions become committed.
  Status Flush(const IoFn& fsync);
  // Replaces, in `buf` just read at `offset`, the ranges that are served from the journal because
  // a restore could not be written back. A no-op (one relaxed load) otherwise.
  void PatchRead(uint64_t offset, std::span<uint8_t> buf) const;
  // The last open of the file is gone: records what the storage says of it, so the next first
  // open can tell whether someone else changed it.
  Status Release();

  bool is_image() const;
  bool is_protected() const;

  struct State;  // private to store/: store/protected_image_state.h

 private:
  friend class Protector;
  ProtectedImage(Protector* protector, std::string path, std::unique_ptr<ImageFile> file);
  // The first-open decision (store/first_open.cc).
  Status FirstOpen(OpenDecision* decision);
  // The decision for an image the journal knows.
  Status Decide(ImageRecord record, OpenDecision* decision);
  // Journals the units a write to `extent` touches and, for pointer units, the map's movement.
  // Called with meta_mutex held.
  Status JournalWrite(uint16_t extent, uint64_t offset, std::span<const uint8_t> data,
                      bool* map_moved);
  // Re-derives the map from the storage after the file changed shape (truncate, growth).
  Status Remap();
  // The operations on the file holding `extent` (0: the image file itself; others: the extent
  // files of a multi-file image, reached through their own ProtectedImage).
  Status WriteExtent(uint16_t extent, uint64_t offset, std::span<const uint8_t> data,
                     const IoFn& write, const IoFn& write_later);
  Status DiscardExtent(uint16_t extent, uint64_t offset, uint64_t length, const IoFn& discard);
  Status TruncateExtent(uint16_t extent, uint64_t new_size, const IoFn& truncate);
  // The image is protected with extent files (State::extent_files): their opens through the
  // mount join this image, and journal records they had as images of their own go. Called with
  // meta_mutex held, or before the image is shared.
  void BindExtents();
  void UnbindExtents();
  // A plain file that may have become an image: probe, and baseline when valid.
  void MaybeBecomeImage();
  // The journal failed: continue unprotected (default) or return the error to the guest.
  Status Degrade(const Status& journal_error);
  std::unique_ptr<State> state_;
};

}  // namespace vmetafs::store
