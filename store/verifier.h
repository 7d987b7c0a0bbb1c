// Verifier: compares an image on the storage with its journal and carries out DESIGN.md's
// first-open decision table. The daemon's first open and meta-restore both call it; neither
// re-implements any of it.
//
// Thread safety: the functions are stateless; the caller serializes work on one image.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "store/formats/format.h"
#include "store/image_file.h"
#include "store/journal.h"
#include "store/range_reader.h"
#include "store/status.h"

namespace vmetafs::store {

// Called with (bytes done, bytes total) while metadata is read; for progress bars.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// Byte strings held once each: alike units (the zeroed tables of a damaged image) share one copy.
// The views it hands out stay valid for its life.
class DistinctBytes {
 public:
  // A view of bytes equal to `bytes` (whose ContentHash is `hash`), held here; an empty view when
  // holding them would take more than `limit` bytes in all.
  std::string_view Hold(std::span<const uint8_t> bytes, uint64_t hash, uint64_t limit = UINT64_MAX);
  uint64_t bytes() const { return bytes_; }

 private:
  std::deque<std::string> held_;  // a deque: growing it moves no string
  std::unordered_multimap<uint64_t, std::string_view> by_hash_;
  uint64_t bytes_ = 0;
};

// One journaled unit held against the storage.
struct UnitCheck {
  enum class Result : uint8_t {
    kMatch,       // the storage holds the journal's latest content
    kPendingOld,  // the storage holds the content a pending write replaces: legitimate
    kDiffers,     // the storage holds neither
    kMissing,     // differs, and lies (partly) past the end of the file (truncated)
  };
  UnitVersion journaled;  // without content
  Result result = Result::kMatch;
  uint64_t storage_hash = 0;
  std::string_view storage_bytes;  // a differing unit's bytes as read, when held (Verification)
};
std::string_view UnitResultName(UnitCheck::Result r);

struct Verification {
  ImageRecord image;
  const FormatParser* parser = nullptr;     // from the journal's record, else from probing
  ParsedImage storage;                      // the storage parsed as it is now
  std::vector<std::string> check_problems;  // deep Check() findings (only when requested)
  bool checked_deep = false;
  uint64_t tolerated_leaks = 0;  // leaked clusters the deep check let pass after a crash
  std::vector<UnitCheck> units;  // every journaled unit, in (extent, offset) order
  size_t differing = 0;          // units with kDiffers or kMissing
  bool changed_outside = false;  // the storage changed while vmetafs was not the writer
  std::string change_reason;
  FileIdentity identity;  // what the storage says now
  // The bytes of the differing units as Verify read them, while they fit in kHeldBytes: a
  // restore puts them in quarantine without reading the storage again.
  static constexpr uint64_t kHeldBytes = 64ull << 20;
  std::shared_ptr<DistinctBytes> held = std::make_shared<DistinctBytes>();

  bool storage_valid() const {
    return storage.valid() && (!checked_deep || check_problems.empty());
  }
};

// Reads every journaled unit of `image` from `file` and compares hashes; parses the storage with
// the image's format. Returns non-OK only for I/O errors reading the file or the journal.
Status Verify(const Journal& journal, const ImageRecord& image, const ImageFile& file,
              const ParseLimits& limits, const ProgressFn& progress, Verification* out);

// Runs the format's deep consistency check on the storage (fills check_problems).
Status CheckStorageDeep(const ImageFile& file, const ParseLimits& limits, Verification* v);
// The same after the image's writer stopped uncleanly: leaked clusters that `journal_view` (the
// storage with the journal's content laid over the differing units) does not reference are an
// allocation in flight, not problems (fills tolerated_leaks too).
Status CheckStorageAfterCrash(const ImageFile& file, const ImageFile& journal_view,
                              const ParseLimits& limits, Verification* v);

// What a decision will do, before it is done (meta-restore --dry-run prints this).
struct Plan {
  Action action = Action::kVerified;
  std::vector<MetadataUnit> units;    // the units the decision concerns (for the event)
  std::vector<MetadataUnit> restore;  // units to write back from the journal
  std::vector<MetadataUnit> skipped;  // differing units the journal's view no longer references
  // The storage's bytes of `restore`, in its order, as Verify read them (held by replaced_held);
  // empty when Verify did not hold them all (Restore reads them then).
  std::vector<QuarantineView> replaced;
  std::shared_ptr<const DistinctBytes> replaced_held;
  std::string detail;  // the reason, in words
};

// Applies the decision table to a Verification (DESIGN.md): verified / restored / adopted /
// refused. May run the deep checks of the storage and of the journal's view (reading the file).
Status Decide(const Journal& journal, const ImageFile& file, const ParseLimits& limits,
              Verification* v, Plan* plan);

// Carries out a kRestored plan: the bytes being replaced go to quarantine with the event, the
// journal's units are written (read from the journal a run at a time: a large image's tables are
// never all in memory) and synced. When the storage refuses the writes, *unwritten receives the
// units (with journal content) the caller must serve from memory, and the event says so.
Status Restore(Journal& journal, const ImageRecord& image, ImageFile& file, Plan* plan,
               const ProgressFn& progress, std::vector<QuarantinedUnit>* unwritten);

// After Restore wrote plan.restore (and the storage took it), the storage holds the journal's
// latest content of those units: marks them matching in *v, so that Reconcile(.., v, ..) does not
// read back what was just written.
void NoteRestored(const Plan& plan, Verification* v);

// The write half of Restore, for callers that choose the contents themselves (meta-restore
// --at writes older journaled versions): the bytes being replaced go to quarantine with a
// kRestored event saying `detail`, then `contents` (unit + the bytes to put there) are written and
// synced. When the storage refuses the writes, *unwritten receives `contents` and a second event
// says so. Restore() is this with the journal's latest content of plan.restore.
Status RestoreContents(Journal& journal, const ImageRecord& image, ImageFile& file,
                       std::vector<QuarantinedUnit> contents, const std::string& detail,
                       const ProgressFn& progress, std::vector<QuarantinedUnit>* unwritten);

// Makes the journal equal the storage's current metadata (`parsed.map`): units it lacks are
// captured, units no longer in the map are retired, units whose content differs (adopted changes,
// pending writes that never landed) are journaled anew with the old version kept as history.
// Used for baseline (empty journal), adopt, and after every decision. `known`, when given, is a
// verification of the same storage state just made: units it found matching are not read again.
struct ReconcileStats {
  size_t captured = 0, replaced = 0, retired = 0;
};
Status Reconcile(Journal& journal, const ImageRecord& image, const ImageFile& file,
                 const ParsedImage& parsed, const Verification* known, const ProgressFn& progress,
                 ReconcileStats* stats);

// Records a decision as an event (and a log line).
Status RecordEvent(Journal& journal, const ImageRecord& image, Action action,
                   std::vector<MetadataUnit> units, const std::string& detail,
                   std::span<const QuarantineView> quarantine = {});

// Reads the listed units from `file` in large coalesced reads, ahead on `readers` threads (see
// RangeReader), and calls `fn` per unit with its bytes. Bytes past the end of the file read as
// zeros. Units of another extent are read from file.Extent(extent); those of an extent it has not
// bound are reported with an empty span.
Status ReadUnits(const ImageFile& file, const std::vector<MetadataUnit>& units,
                 const ProgressFn& progress,
                 const std::function<Status(const MetadataUnit&, std::span<const uint8_t>)>& fn,
                 size_t readers = RangeReader::kReaders);

}  // namespace vmetafs::store
