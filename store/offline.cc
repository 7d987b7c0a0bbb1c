#include "store/offline.h"

#include <fmt/format.h>

#include <chrono>

namespace vmetafs::store {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string FirstProblems(const std::vector<std::string>& problems) {
  std::string out;
  for (size_t i = 0; i < problems.size() && i < 3; ++i) out += (i ? "; " : "") + problems[i];
  return out.empty() ? "no format recognised" : out;
}

// The daemon's Baseline (store/first_open.cc): a fresh journal of the storage's metadata.
Status CarryOutBaseline(Journal& journal, const ImageFile& file, const ProgressFn& progress,
                        OfflineDecision* d, OfflineOutcome* outcome) {
  Verification& v = d->verification;
  VMETAFS_RETURN_IF_ERROR(journal.DeleteUnits(v.image.id));
  VMETAFS_RETURN_IF_ERROR(CloseOffline(journal, v.image, file, v.storage, nullptr,
                                       Action::kBaseline, progress, &outcome->reconciled));
  const std::string detail =
      fmt::format("{}: journaled {} units ({} bytes) of {} metadata", d->baseline_reason,
                  outcome->reconciled.captured, v.storage.map.TotalBytes(), v.storage.format);
  d->plan.detail = detail;
  VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, v.image, Action::kBaseline, {}, detail));
  return journal.Sync();
}

}  // namespace

Status UpdateRecord(Journal& journal, uint64_t id,
                    const std::function<void(ImageRecord*)>& change) {
  ImageRecord record;
  VMETAFS_RETURN_IF_ERROR(journal.GetImage(id, &record));
  change(&record);
  JournalBatch batch;
  batch.PutImage(record);
  return journal.Write(batch);
}

Status PlanDecision(const Journal& journal, const ImageRecord& image, const ImageFile& file,
                    const ParseLimits& limits, const ProgressFn& progress, OfflineDecision* out) {
  *out = OfflineDecision{};
  Verification& v = out->verification;
  VMETAFS_RETURN_IF_ERROR(Verify(journal, image, file, limits, progress, &v));
  if (image.protection == Protection::kUnprotected || v.units.empty()) {
    // As at a first open: protection resumes with a fresh baseline, when there is an image.
    if (v.parser == nullptr || !v.storage.valid()) {
      out->unprotectable = true;
      out->plan.action = Action::kRefused;
      out->plan.detail = fmt::format("not a valid image ({}) and no usable journal",
                                     FirstProblems(v.storage.problems));
      return Status::Ok();
    }
    out->plan.action = Action::kBaseline;
    out->baseline_reason = image.protection == Protection::kUnprotected
                               ? "protection resumed after: " + image.unprotected_reason
                               : "no journaled units";
    out->plan.detail = out->baseline_reason;
    return Status::Ok();
  }
  return Decide(journal, file, limits, &v, &out->plan);
}

Status CarryOutDecision(Journal& journal, ImageFile& file, const ParseLimits& limits,
                        const ProgressFn& progress, OfflineDecision* d, OfflineOutcome* outcome) {
  *outcome = OfflineOutcome{};
  Verification& v = d->verification;
  Plan& plan = d->plan;
  if (d->unprotectable) {
    outcome->problems = v.storage.problems;
    return Status::Ok();
  }
  switch (plan.action) {
    case Action::kBaseline:
      outcome->valid_after = true;
      return CarryOutBaseline(journal, file, progress, d, outcome);
    case Action::kRefused:
      VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, v.image, plan.action, plan.units, plan.detail));
      outcome->problems = v.storage.problems;
      return journal.Sync();
    case Action::kVerified:
    case Action::kAdopted:
      VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, v.image, plan.action, plan.units, plan.detail));
      break;
    case Action::kRestored: {
      std::vector<QuarantinedUnit> unwritten;
      VMETAFS_RETURN_IF_ERROR(Restore(journal, v.image, file, &plan, progress, &unwritten));
      if (!unwritten.empty()) {
        return Status::IoError(
            fmt::format("{}: the storage refused the restored units (see `meta-restore history`)",
                        v.image.path),
            EIO);
      }
      outcome->written_units = plan.restore.size();
      NoteRestored(plan, &v);
      v.storage = ParsedImage{};
      VMETAFS_RETURN_IF_ERROR(v.parser->Parse(file, limits, &v.storage));
      break;
    }
  }
  outcome->valid_after = v.storage.valid();
  if (!outcome->valid_after) {
    // The daemon opens such an image unprotected and leaves the journal as it is: so do we.
    outcome->problems = v.storage.problems;
    return journal.Sync();
  }
  return CloseOffline(journal, v.image, file, v.storage, &v, plan.action, progress,
                      &outcome->reconciled);
}

Status CloseOffline(Journal& journal, const ImageRecord& image, const ImageFile& file,
                    const ParsedImage& parsed, const Verification* known, Action action,
                    const ProgressFn& progress, ReconcileStats* stats) {
  VMETAFS_RETURN_IF_ERROR(Reconcile(journal, image, file, parsed, known, progress, stats));
  FileIdentity identity;
  VMETAFS_RETURN_IF_ERROR(file.Identity(&identity));
  VMETAFS_RETURN_IF_ERROR(UpdateRecord(journal, image.id, [&](ImageRecord* r) {
    r->format = parsed.format;
    r->virtual_size = parsed.virtual_size;
    r->identity = identity;
    r->in_use = false;
    r->protection = Protection::kProtected;
    r->unprotected_reason.clear();
    r->last_check = std::string(ActionName(action));
    r->last_check_ns = NowNs();
  }));
  return journal.Sync();
}

}  // namespace vmetafs::store
