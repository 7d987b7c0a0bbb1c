// Offline decisions: DESIGN.md's first-open decision taken on an image that no daemon has open,
// by meta-restore holding the store itself. Everything is done through verifier.h (Verify,
// Decide, Restore, Reconcile, RecordEvent), in the order the daemon's first open uses
// (store/first_open.cc); what differs offline is only that the image is closed again at the end:
// its record keeps what the storage says of it now, so that the next open through the mount
// verifies rather than sees a change made outside the mount.
//
// Thread safety: stateless; the caller holds the store (a writable Journal) for Carry*(), and
// works on one image at a time.
#pragma once

#include <string>
#include <vector>

#include "store/formats/format.h"
#include "store/image_file.h"
#include "store/journal.h"
#include "store/status.h"
#include "store/verifier.h"

namespace vmetafs::store {

// What a first open of the image would do, found without writing anything.
struct OfflineDecision {
  Verification verification;
  Plan plan;
  // The image cannot be protected: no usable journal and the storage is not a valid image (the
  // daemon opens such an image unprotected). Nothing would be done; `plan.detail` says why.
  bool unprotectable = false;
  // Why a baseline is planned although the journal knows the image ("protection resumed...").
  std::string baseline_reason;
};

// Verifies `image` against `file` and applies the decision table (the deep checks may read the
// file). Writes nothing, so it serves `verify` and `restore --dry-run` beside a live daemon.
Status PlanDecision(const Journal& journal, const ImageRecord& image, const ImageFile& file,
                    const ParseLimits& limits, const ProgressFn& progress, OfflineDecision* out);

struct OfflineOutcome {
  ReconcileStats reconciled;
  size_t written_units = 0;           // units written to the storage (restored)
  bool valid_after = false;           // the storage parses as a valid image afterwards
  std::vector<std::string> problems;  // the storage's problems afterwards, when not valid
};

// Carries out a decision found by PlanDecision on the same, unchanged storage: records the event,
// restores (quarantine first), re-baselines the journal to the storage and closes the image
// record. A refused decision records its event and changes nothing else. Fails when the storage
// refuses the restored units (the event says so; nothing is served offline).
Status CarryOutDecision(Journal& journal, ImageFile& file, const ParseLimits& limits,
                        const ProgressFn& progress, OfflineDecision* decision,
                        OfflineOutcome* outcome);

// After the storage was changed on purpose (a decision, a restore to an earlier version): makes
// the journal equal the storage's metadata (`parsed`, valid) and records the image as closed now
// (identity, format, size, last check `action`). `known` as for Reconcile.
Status CloseOffline(Journal& journal, const ImageRecord& image, const ImageFile& file,
                    const ParsedImage& parsed, const Verification* known, Action action,
                    const ProgressFn& progress, ReconcileStats* stats);

// Replaces the stored record of `image.id` by `change` applied to a fresh copy.
Status UpdateRecord(Journal& journal, uint64_t id, const std::function<void(ImageRecord*)>& change);

}  // namespace vmetafs::store
