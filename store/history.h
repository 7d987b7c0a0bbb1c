// Restoring an image's metadata to an earlier journaled version (meta-restore restore --at).
//
// Every unit keeps its latest version and a ring of older ones (JournalOptions::history_versions).
// A point in time is a store sequence number or a wall-clock time; for each journaled unit the
// version in force then is the newest one whose seq (or time) is not after the point. Those
// versions, laid over the storage, form the image "as it was": that view is parsed and
// deep-checked with the image's own format, and only units that view references as metadata are
// written (DESIGN.md: never write old metadata over a cluster the view does not call metadata).
// Writing goes through RestoreContents, so the replaced bytes are quarantined with a kRestored
// event exactly as for any restore.
//
// Thread safety: stateless; the caller holds the store for RestoreToPoint and works on one image.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "store/formats/format.h"
#include "store/image_file.h"
#include "store/journal.h"
#include "store/status.h"
#include "store/verifier.h"

namespace vmetafs::store {

struct PointInTime {
  enum class Kind : uint8_t { kSeq, kTime };
  Kind kind = Kind::kSeq;
  uint64_t seq = 0;     // kSeq: versions with seq <= this
  int64_t time_ns = 0;  // kTime: versions written at or before this (UTC, ns since the epoch)

  bool Includes(const UnitVersion& v) const {
    return kind == Kind::kSeq ? v.seq <= seq : v.time_ns <= time_ns;
  }
  std::string ToString() const;  // "seq 1234" or "2024-11-24T20:21:05Z"
};

// ISO 8601 UTC with milliseconds, "2024-11-24T20:21:05.123Z".
std::string IsoTimeUtc(int64_t time_ns);

// Parses `text`: "seq:N" or a bare number below 1000000000 is a sequence number; "@S[.F]" or a
// bare number from 1000000000 on (2001-09-09) is unix seconds; otherwise ISO 8601
// "YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM|-HH:MM]" (a space may replace T; no zone means UTC).
Status ParsePointInTime(std::string_view text, PointInTime* out);

// One journaled unit and the version chosen for it.
struct VersionChoice {
  enum class Choice : uint8_t {
    kCurrent,        // the storage already holds the chosen version
    kWrite,          // the chosen version will be written
    kNotReferenced,  // differs, but the view as of the point does not reference it: left alone
    kBornLater,      // every journaled version is newer: the unit was not metadata then
    kAgedOut,        // the ring no longer holds a version that old
  };
  MetadataUnit unit;
  Choice choice = Choice::kCurrent;
  uint64_t storage_hash = 0;
  UnitVersion chosen;   // with content; meaningful for kCurrent, kWrite and kNotReferenced
  size_t versions = 0;  // journaled versions of the unit (latest + history)
};
std::string_view ChoiceName(VersionChoice::Choice c);

struct VersionPlan {
  PointInTime point;
  std::vector<VersionChoice> units;  // every journaled unit, in (extent, offset) order
  size_t to_write = 0;
  size_t unknown_referenced = 0;  // units the view references whose content then is not journaled
  ParsedImage view;               // the image as of the point
  std::vector<std::string> problems;  // the view's problems (parse and deep check): refuse if any
  std::string detail;                 // the event's reason, in words

  bool feasible() const { return problems.empty() && unknown_referenced == 0; }
};

// Chooses the versions in force at `point` and checks the resulting view. Reads the journal and
// the file; writes nothing (serves --dry-run beside a live daemon).
Status PlanRestoreToPoint(const Journal& journal, const ImageRecord& image, const ImageFile& file,
                          const ParseLimits& limits, const PointInTime& point,
                          const ProgressFn& progress, VersionPlan* plan);

// Carries out a feasible plan made on the same, unchanged storage: quarantine + kRestored event,
// writes, sync; then the journal is re-baselined to what the storage now holds (the replaced
// versions stay as history) and the image record is closed, so that the next open verifies.
// InvalidArgument for an infeasible plan; IoError when the storage refuses the writes.
Status RestoreToPoint(Journal& journal, const ImageRecord& image, ImageFile& file,
                      const ParseLimits& limits, const VersionPlan& plan,
                      const ProgressFn& progress, ReconcileStats* stats);

}  // namespace vmetafs::store
