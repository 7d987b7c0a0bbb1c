// The first open of an image: DESIGN.md's decision table, carried out before the open returns.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <chrono>

#include "store/protected_image_state.h"
#include "store/verifier.h"

namespace vmetafs::store {
namespace {

using Mode = ProtectedImage::State::Mode;

std::string FirstProblems(const std::vector<std::string>& problems) {
  std::string out;
  for (size_t i = 0; i < problems.size() && i < 3; ++i) out += (i ? "; " : "") + problems[i];
  return out;
}

// Publishes the parsed map for the write path and marks the image protected.
Status Protect(ProtectedImage::State& st, const ImageRecord& record, ParsedImage parsed) {
  MetadataMap map = std::move(parsed.map);
  st.extent_files = std::move(parsed.extent_files);
  st.image_id = record.id;
  st.flush_epoch = record.flush_epoch;
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(st.file->Size(&size));
  st.known_size.store(size);
  st.map.store(std::make_shared<const MetadataMap>(std::move(map)));
  st.mode.store(Mode::kProtected, std::memory_order_release);
  return Status::Ok();
}

void OpenUnprotected(ProtectedImage::State& st, const std::string& why) {
  spdlog::warn("{}: opened unprotected: {}", st.path, why);
  st.mode.store(Mode::kUnprotected);
}

constexpr uint32_t kMaxProbeAttempts = 4096;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// Journals the whole metadata of an image the journal does not know (or no longer trusts).
static Status Baseline(ProtectedImage::State& st, ImageRecord* record, ParsedImage parsed,
                       const std::string& why, OpenDecision* decision) {
  Journal& journal = st.protector->journal();
  VMETAFS_RETURN_IF_ERROR(journal.DeleteUnits(record->id));
  ReconcileStats stats;
  VMETAFS_RETURN_IF_ERROR(Reconcile(journal, *record, *st.file, parsed, nullptr, nullptr, &stats));
  record->format = parsed.format;
  record->virtual_size = parsed.virtual_size;
  record->protection = Protection::kProtected;
  record->unprotected_reason.clear();
  record->in_use = true;
  VMETAFS_RETURN_IF_ERROR(st.file->Identity(&record->identity));
  const std::string detail = fmt::format("{}: journaled {} units ({} bytes) of {} metadata", why,
                                         stats.captured, parsed.map.TotalBytes(), parsed.format);
  VMETAFS_RETURN_IF_ERROR(st.protector->UpdateImage(record->id, [&](ImageRecord* r) {
    std::string path = r->path;
    *r = *record;
    r->path = path;
  }));
  VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, *record, Action::kBaseline, {}, detail));
  VMETAFS_RETURN_IF_ERROR(journal.Sync());
  if (decision) *decision = OpenDecision{true, true, Action::kBaseline, {}, detail};
  return Protect(st, *record, std::move(parsed));
}

Status ProtectedImage::FirstOpen(OpenDecision* decision) {
  State& st = *state_;
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  Journal& journal = st.protector->journal();
  const ParseLimits& limits = st.protector->options().limits;
  if (decision) *decision = OpenDecision{};
  if (Status health = journal.CheckStore(); !health.ok()) {
    if (DetectFormat(*st.file) != nullptr) {
      OpenUnprotected(st, "the store cannot be written: " + health.ToString());
    }
    return Status::Ok();
  }

  ImageRecord record;
  Status found = journal.FindImage(st.path, &record);
  if (!found.ok() && !found.IsNotFound()) {
    OpenUnprotected(st, "the journal cannot be read: " + found.ToString());
    return Status::Ok();
  }
  if (found.IsNotFound()) {
    st.parser = DetectFormat(*st.file);
    if (st.parser == nullptr) return Status::Ok();  // a plain file, for now
    if (decision) decision->is_image = true;
    ParsedImage parsed;
    VMETAFS_RETURN_IF_ERROR(st.parser->Parse(*st.file, limits, &parsed));
    if (!parsed.valid()) {
      OpenUnprotected(st, fmt::format("not a valid {} image ({}); it has no journal yet",
                                      st.parser->Name(), FirstProblems(parsed.problems)));
      return Status::Ok();
    }
    VMETAFS_RETURN_IF_ERROR(journal.CreateImage(st.path, &record));
    return Baseline(st, &record, std::move(parsed), "first seen", decision);
  }
  return Decide(record, decision);
}

Status ProtectedImage::Decide(ImageRecord record, OpenDecision* decision) {
  State& st = *state_;
  Journal& journal = st.protector->journal();
  const ParseLimits& limits = st.protector->options().limits;
  if (decision) decision->is_image = true;

  // The journal failed while the image was open in this mount, perhaps too early to record it.
  std::string degraded_why;
  const bool degraded = st.protector->Degraded(record.id, &degraded_why);
  if (degraded) {
    record.protection = Protection::kUnprotected;
    if (record.unprotected_reason.empty()) record.unprotected_reason = degraded_why;
  }
  Verification v;
  VMETAFS_RETURN_IF_ERROR(Verify(journal, record, *st.file, limits, nullptr, &v));
  st.parser = v.parser;
  if (record.protection == Protection::kUnprotected || v.units.empty()) {
    // Protection resumes with a fresh baseline (the journal failed earlier, or holds nothing).
    if (st.parser == nullptr || !v.storage.valid()) {
      OpenUnprotected(st, fmt::format("not a valid image ({}) and no usable journal",
                                      FirstProblems(v.storage.problems)));
      return Status::Ok();
    }
    const std::string why = record.protection == Protection::kUnprotected
                                ? "protection resumed after: " + record.unprotected_reason
                                : "no journaled units";
    VMETAFS_RETURN_IF_ERROR(Baseline(st, &record, std::move(v.storage), why, decision));
    if (degraded) st.protector->ClearDegraded(record.id);
    return Status::Ok();
  }

  Plan plan;
  VMETAFS_RETURN_IF_ERROR(store::Decide(journal, *st.file, limits, &v, &plan));
  if (decision) *decision = OpenDecision{true, true, plan.action, plan.units, plan.detail};
  switch (plan.action) {
    case Action::kRefused:
      VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, record, plan.action, plan.units, plan.detail));
      (void)journal.Sync();
      return Status::IoError(fmt::format("{}: open refused: {}", st.path, plan.detail), EIO);
    case Action::kBaseline:
      return Baseline(st, &record, std::move(v.storage), "no journaled units", decision);
    case Action::kVerified:
    case Action::kAdopted:
      VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, record, plan.action, plan.units, plan.detail));
      break;
    case Action::kRestored: {
      std::vector<QuarantinedUnit> unwritten;
      VMETAFS_RETURN_IF_ERROR(Restore(journal, record, *st.file, &plan, nullptr, &unwritten));
      if (!unwritten.empty()) {
        // The storage refused the write-back: serve the journal's units while the file is open.
        for (QuarantinedUnit& u : unwritten) st.served.emplace(u.unit.offset, std::move(u.bytes));
        st.serving.store(true, std::memory_order_release);
        OpenUnprotected(st, "restored units are served from the journal; the storage refused them");
        return Status::Ok();
      }
      NoteRestored(plan, &v);
      v.storage = ParsedImage{};
      VMETAFS_RETURN_IF_ERROR(st.parser->Parse(*st.file, limits, &v.storage));
      break;
    }
  }
  if (!v.storage.valid()) {
    OpenUnprotected(st, fmt::format("the image is not valid after the decision ({})",
                                    FirstProblems(v.storage.problems)));
    return Status::Ok();
  }
  // The journal now follows the storage: captured, re-baselined (adopted, or pending writes that
  // never landed) and retired units.
  ReconcileStats stats;
  VMETAFS_RETURN_IF_ERROR(Reconcile(journal, record, *st.file, v.storage, &v, nullptr, &stats));
  VMETAFS_RETURN_IF_ERROR(st.protector->UpdateImage(record.id, [&](ImageRecord* r) {
    r->in_use = true;
    r->format = v.storage.format;
    r->virtual_size = v.storage.virtual_size;
    r->last_check = std::string(ActionName(plan.action));
    r->last_check_ns = NowNs();
  }));
  VMETAFS_RETURN_IF_ERROR(journal.Sync());
  return Protect(st, record, std::move(v.storage));
}

void ProtectedImage::MaybeBecomeImage() {
  State& st = *state_;
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  if (st.mode.load() != Mode::kPlain || st.probe_attempts >= kMaxProbeAttempts) return;
  ++st.probe_attempts;
  const FormatParser* parser = DetectFormat(*st.file);
  uint64_t size = 0;
  if (parser == nullptr || !st.file->Size(&size).ok()) {
    st.next_probe_end.store(0);
    return;
  }
  ParsedImage parsed;
  Status s = parser->Parse(*st.file, st.protector->options().limits, &parsed);
  if (!s.ok() || !parsed.valid()) {
    // Still taking shape: probe again once the file has grown by half, or at flush or close.
    st.next_probe_end.store(std::max<uint64_t>(size + size / 2, size + (1u << 20)));
    return;
  }
  st.next_probe_end.store(0);
  st.parser = parser;
  Journal& journal = st.protector->journal();
  ImageRecord record;
  s = journal.FindImage(st.path, &record);
  if (s.IsNotFound()) s = journal.CreateImage(st.path, &record);
  if (s.ok()) s = Baseline(st, &record, std::move(parsed), "created through the mount", nullptr);
  if (s.ok()) BindExtents();
  if (!s.ok()) {
    spdlog::error("{}: could not baseline the new image: {}", st.path, s.ToString());
    st.mode.store(Mode::kUnprotected);
  }
}

}  // namespace vmetafs::store
