// Collecting one image's journal for export, and replaying an export into a store. The file
// format itself is in journal_export.cc.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <tuple>

#include "store/journal_export.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kMaxBatchBytes = 4ull << 20;  // as Reconcile's: each batch reuses memory
// An import is built under a name no backing file has, then renamed over the image's path.
constexpr std::string_view kStagingPrefix = ".vmetafs-import/";

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

using UnitKey = std::tuple<uint16_t, uint64_t>;
UnitKey KeyOf(const MetadataUnit& u) { return {u.extent, u.offset}; }

// Writes versions in their original order. A unit appears at most once per batch, so that each
// version's predecessor (with the sequence number this store gave it) is known when it is
// written and goes to the history ring exactly as it did in the exporting store.
class Replay {
 public:
  Replay(Journal& journal, uint64_t image_id, const JournalExport& e)
      : journal_(journal), id_(image_id) {
    for (const JournalExport::Version& v : e.versions) ++remaining_[KeyOf(v.version.unit)];
  }

  Status AddVersion(const UnitVersion& v) {
    const UnitKey key = KeyOf(v.unit);
    if (in_batch_.count(key) || bytes_ >= kMaxBatchBytes) VMETAFS_RETURN_IF_ERROR(Flush());
    UnitVersion copy = v;
    copy.seq = 0;  // renumbered by this store
    auto prev = previous_.find(key);
    batch_.PutUnit(id_, std::move(copy), prev == previous_.end() ? nullptr : &prev->second);
    in_batch_.emplace(key, v.unit);
    bytes_ += v.content.size();
    --remaining_[key];
    return Status::Ok();
  }

  Status AddEvent(const Event& event, const std::vector<QuarantinedUnit>& quarantine) {
    VMETAFS_RETURN_IF_ERROR(Flush());
    Event copy = event;
    copy.seq = 0;
    copy.image_id = id_;
    return journal_.AddEvent(&copy, quarantine);
  }

  Status Flush() {
    if (batch_.empty()) return Status::Ok();
    VMETAFS_RETURN_IF_ERROR(journal_.Write(batch_));
    for (const auto& [key, unit] : in_batch_) {
      if (remaining_[key] > 0) {
        VMETAFS_RETURN_IF_ERROR(journal_.GetUnit(id_, unit, &previous_[key]));
      } else {
        previous_.erase(key);
      }
    }
    batch_ = JournalBatch();
    in_batch_.clear();
    bytes_ = 0;
    return Status::Ok();
  }

 private:
  Journal& journal_;
  uint64_t id_;
  JournalBatch batch_;
  std::map<UnitKey, MetadataUnit> in_batch_;
  uint64_t bytes_ = 0;
  std::map<UnitKey, UnitVersion> previous_;  // the latest version written, with its new seq
  std::map<UnitKey, size_t> remaining_;      // versions of the unit still to write
};

Status ReplayAll(Journal& journal, uint64_t id, const JournalExport& e, ImportResult* result) {
  Replay replay(journal, id, e);
  size_t v = 0, ev = 0;
  while (v < e.versions.size() || ev < e.events.size()) {
    if (ev == e.events.size() ||
        (v < e.versions.size() && e.versions[v].version.seq < e.events[ev].seq)) {
      result->units += e.versions[v].latest;
      VMETAFS_RETURN_IF_ERROR(replay.AddVersion(e.versions[v++].version));
      ++result->versions;
      continue;
    }
    const Event& event = e.events[ev++];
    static const std::vector<QuarantinedUnit> kNone;
    auto q = e.quarantine.find(event.seq);
    const auto& quarantine = q == e.quarantine.end() ? kNone : q->second;
    VMETAFS_RETURN_IF_ERROR(replay.AddEvent(event, quarantine));
    ++result->events;
    result->quarantined += quarantine.size();
  }
  VMETAFS_RETURN_IF_ERROR(replay.Flush());
  return journal.Sync();
}

}  // namespace

Status CollectExport(const Journal& journal, const ImageRecord& image, bool with_quarantine,
                     JournalExport* out) {
  *out = JournalExport{};
  out->image_path = image.path;
  out->backing = journal.backing();
  out->exported_ns = NowNs();
  out->history_versions = journal.options().history_versions;
  out->with_quarantine = with_quarantine;
  out->record = image;
  std::vector<UnitVersion> latest;
  VMETAFS_RETURN_IF_ERROR(journal.ForEachUnit(image.id, true, [&](const UnitVersion& v) {
    latest.push_back(v);
    return Status::Ok();
  }));
  std::vector<UnitVersion> older;
  for (UnitVersion& v : latest) {
    VMETAFS_RETURN_IF_ERROR(journal.UnitHistory(image.id, v.unit, &older));
    for (UnitVersion& h : older) out->versions.push_back({std::move(h), false});
    out->versions.push_back({std::move(v), true});
  }
  std::stable_sort(out->versions.begin(), out->versions.end(),
                   [](const auto& a, const auto& b) { return a.version.seq < b.version.seq; });
  VMETAFS_RETURN_IF_ERROR(journal.Events(image.id, &out->events));
  std::sort(out->events.begin(), out->events.end(),
            [](const Event& a, const Event& b) { return a.seq < b.seq; });
  if (!with_quarantine) return Status::Ok();
  for (const Event& e : out->events) {
    std::vector<QuarantinedUnit> q;
    VMETAFS_RETURN_IF_ERROR(journal.Quarantine(e.seq, &q));
    if (!q.empty()) out->quarantine[e.seq] = std::move(q);
  }
  return Status::Ok();
}

Status ImportJournal(Journal& journal, const JournalExport& e, ImportResult* result) {
  *result = ImportResult{};
  ImageRecord existing;
  Status found = journal.FindImage(e.image_path, &existing);
  if (!found.ok() && !found.IsNotFound()) return found;
  result->replaced = found.ok();
  result->replaced_id = found.ok() ? existing.id : 0;

  const std::string staging = fmt::format("{}{}.{}", kStagingPrefix, e.image_path, NowNs());
  ImageRecord created;
  VMETAFS_RETURN_IF_ERROR(journal.CreateImage(staging, &created));
  ImageRecord record = e.record;
  record.id = created.id;
  record.path = staging;
  record.last_seq = 0;  // this store's counter follows the replayed versions
  JournalBatch batch;
  batch.PutImage(record);
  Status s = journal.Write(batch);
  if (s.ok()) s = ReplayAll(journal, created.id, e, result);
  // Atomic switch: the old journal of the path (if any) goes, its events stay.
  if (s.ok()) s = journal.RenameImage(staging, e.image_path);
  if (!s.ok()) {
    Status cleanup = journal.DeleteImage(created.id);
    return cleanup.ok() ? s : s.Annotate("(the partial import " + staging + " is left for gc)");
  }
  return journal.FindImage(e.image_path, &result->record);
}

}  // namespace vmetafs::store
