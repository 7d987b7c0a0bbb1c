// Journal: the second copy of every protected image's metadata, in RocksDB on the host's disk.
//
// This is the only code that includes RocksDB. Its on-disk record format is described in
// docs/journal-format.md; keep the two in step.
//
// Model. The store belongs to one backing (a directory or an nfs:// URL), recorded at creation.
// It holds, per image: an ImageRecord (identity, path, protection state, flush epoch), and per
// metadata unit the latest journaled content with its XXH3-64 hash and sequence number, plus a
// bounded ring of older versions (history). Events (baseline, verified, restored, adopted,
// refused) and the bytes a restore replaced (quarantine) are kept per image.
//
// Write-ahead and pending state. A unit written at flush epoch E keeps the hash of its previous
// content (prev_hash). While the image's flush epoch is still E the write is *pending*: the storage
// may legitimately hold either the previous or the latest content. Once a guest flush completes
// (Journal::CompleteFlush bumps the image's epoch), only the latest content is legitimate.
//
// Durability. Write() applies a batch atomically. With SyncMode::kWrite it returns only once the
// batch is durable; with kFlush it is durable once Sync() returns (called at the guest's flush);
// with kPeriodic a background thread syncs every periodic_ms. Concurrent writers are group
// committed by RocksDB's write leader; concurrent Sync() calls share one WAL sync where possible.
//
// Thread safety: all methods may be called concurrently. Errors: IoError for a failing local
// disk (errno kept), Corruption for a damaged store (never silently ignored), Busy when another
// process holds the store, InvalidArgument when the store belongs to another backing.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "store/image_file.h"
#include "store/metadata_map.h"
#include "store/status.h"

namespace vmetafs::store {

enum class SyncMode : uint8_t { kFlush, kWrite, kPeriodic };

struct JournalOptions {
  SyncMode sync = SyncMode::kFlush;
  uint32_t periodic_ms = 1000;    // kPeriodic only
  uint32_t history_versions = 8;  // older versions kept per unit (0 keeps none)
  // Open without writing anything, beside a live daemon if one holds the store.
  bool read_only = false;
  // The backing this store must belong to. A new store records it; an existing store whose
  // recorded backing differs is refused. Empty: accept whatever is recorded (tools).
  std::string backing;
};

enum class Protection : uint8_t { kProtected = 0, kUnprotected = 1 };

struct ImageRecord {
  uint64_t id = 0;     // assigned by the journal, never reused
  std::string path;    // relative to the backing root, e.g. "vms/web.qcow2"
  std::string format;  // parser name
  uint64_t virtual_size = 0;
  FileIdentity identity;  // what the storage said when vmetafs last closed the image
  bool in_use = false;    // opened for writing by a daemon and not closed cleanly since
  Protection protection = Protection::kProtected;
  std::string unprotected_reason;
  uint64_t flush_epoch = 0;   // completed guest flushes of this image (see "pending" above)
  uint64_t last_seq = 0;      // sequence number of the newest unit write
  int64_t last_check_ns = 0;  // time of the last first-open decision
  std::string last_check;     // its action: "verified", "restored", ...
};

// One journaled version of one unit.
struct UnitVersion {
  MetadataUnit unit;
  uint64_t seq = 0;        // store-wide sequence number of this write
  uint64_t epoch = 0;      // the image's flush_epoch when it was written
  uint64_t hash = 0;       // XXH3-64 of content
  uint64_t prev_hash = 0;  // hash of the content it replaced; meaningful when has_prev
  bool has_prev = false;
  int64_t time_ns = 0;  // wall clock of the write
  std::string content;  // empty when loaded without content

  // True while the storage may legitimately still hold the previous content.
  bool Pending(const ImageRecord& image) const { return has_prev && epoch == image.flush_epoch; }
  // True when `h` (the hash of what the storage holds) is a legitimate content for this unit.
  bool Accepts(uint64_t h, const ImageRecord& image) const {
    return h == hash || (Pending(image) && h == prev_hash);
  }
};

// The five decisions of DESIGN.md's first-open table, and nothing else.
enum class Action : uint8_t { kBaseline, kVerified, kRestored, kAdopted, kRefused };
std::string_view ActionName(Action a);
bool ParseAction(std::string_view name, Action* out);

struct Event {
  uint64_t seq = 0;  // assigned by the journal
  int64_t time_ns = 0;
  uint64_t image_id = 0;
  std::string image;  // path at the time of the event
  Action action = Action::kVerified;
  std::vector<MetadataUnit> units;  // the units the decision concerned (mismatched, restored...)
  std::string detail;               // the reason, in words
};

// Bytes that a restore overwrote, kept so that every restore can be undone.
struct QuarantinedUnit {
  MetadataUnit unit;
  std::string bytes;
};
// The same with the bytes borrowed: a restore of many alike units (zeroed tables) holds their
// content once.
struct QuarantineView {
  MetadataUnit unit;
  std::string_view bytes;
};

class JournalBatch {
 public:
  // Journals `version` as the unit's latest content. `previous`, when given, is the version it
  // replaces and goes to the unit's history ring.
  void PutUnit(uint64_t image_id, UnitVersion version, const UnitVersion* previous);
  // Forgets a unit that is no longer metadata (its cluster was freed): it will never be restored.
  void RetireUnit(uint64_t image_id, const MetadataUnit& unit);
  void PutImage(const ImageRecord& image);
  bool empty() const { return ops_.empty(); }
  size_t size() const { return ops_.size(); }

 private:
  friend class Journal;
  struct Op {
    enum class Type { kPutUnit, kRetireUnit, kPutImage } type;
    uint64_t image_id = 0;
    UnitVersion version;
    UnitVersion previous;
    bool has_previous = false;
    ImageRecord image;
  };
  std::vector<Op> ops_;
};

class Journal {
 public:
  // Opens (creating if absent, unless read_only) the store in `dir`. Fails with Busy when another
  // process holds it (read_only opens never fail for that reason), InvalidArgument when it belongs
  // to another backing, Corruption when RocksDB reports damage.
  static Status Open(const std::string& dir, const JournalOptions& options,
                     std::unique_ptr<Journal>* out);
  ~Journal();  // syncs and closes; errors are logged (use Close() to see them)
  Status Close();

  const std::string& backing() const { return backing_; }
  const JournalOptions& options() const { return options_; }

  // Images.
  Status FindImage(std::string_view path, ImageRecord* out) const;  // NotFound if none
  Status GetImage(uint64_t id, ImageRecord* out) const;
  // Creates the record (id assigned) without units. The caller fills it and writes units.
  Status CreateImage(std::string_view path, ImageRecord* out);
  Status ListImages(std::vector<ImageRecord>* out) const;
  Status RenameImage(std::string_view from, std::string_view to);
  // Removes the image's record, units and history; events and quarantine stay until gc.
  Status DeleteImage(uint64_t id);

  // Units. ForEachUnit visits the image's latest versions in (extent, offset) order; with
  // with_content false, content stays empty and nothing but the small unit records is read.
  Status ForEachUnit(uint64_t image_id, bool with_content,
                     const std::function<Status(const UnitVersion&)>& fn) const;
  Status GetUnit(uint64_t image_id, const MetadataUnit& unit, UnitVersion* out) const;
  // Older versions of a unit, newest first (at most history_versions).
  Status UnitHistory(uint64_t image_id, const MetadataUnit& unit,
                     std::vector<UnitVersion>* out) const;
  // Drops every unit and its history (used before a fresh baseline).
  Status DeleteUnits(uint64_t image_id);

  // Applies the batch atomically, assigning sequence numbers to its unit versions. Durability per
  // SyncMode (see above).
  Status Write(JournalBatch& batch);
  // Makes everything written so far durable (the guest's flush in kFlush mode).
  Status Sync();
  // Records that a guest flush of the image completed: bumps flush_epoch (pending versions become
  // committed). Durable on return in kFlush and kWrite modes.
  Status CompleteFlush(uint64_t image_id);

  // Events and quarantine.
  // Records the event with the bytes it replaced (stored once per distinct content), synced.
  Status AddEvent(Event* event, std::span<const QuarantineView> quarantine = {});
  Status AddEvent(Event* event, const std::vector<QuarantinedUnit>& quarantine);
  Status Events(uint64_t image_id, std::vector<Event>* out) const;
  Status AllEvents(std::vector<Event>* out) const;
  Status Quarantine(uint64_t event_seq, std::vector<QuarantinedUnit>* out) const;

  // Totals for `list` and the benchmark: unit count and bytes of latest content per image.
  struct Usage {
    uint64_t units = 0;
    uint64_t bytes = 0;
  };
  Status ImageUsage(uint64_t image_id, Usage* out) const;
  // Bytes the store occupies on disk (SST, blob and WAL files).
  uint64_t DiskBytes() const;
  // Cheap (two stat calls): IoError when the store's directory was removed or replaced while this
  // journal had it open, so that its writes land in deleted files; or the error of an earlier
  // failed write (a full local disk) while RocksDB cannot resume.
  Status CheckStore() const;

 private:
  struct Impl;
  Journal(std::unique_ptr<Impl> impl, JournalOptions options, std::string backing);
  std::unique_ptr<Impl> impl_;
  JournalOptions options_;
  std::string backing_;
};

// XXH3-64 of a unit's content: the one checksum the journal and the verifier use.
uint64_t ContentHash(std::span<const uint8_t> bytes);

}  // namespace vmetafs::store
