#include "store/verifier.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <set>
#include <tuple>

#include "store/range_reader.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kMaxReadRun = 2ull << 20;  // one coalesced read (RangeReader holds 8)
// One journal batch. Small enough that each batch reuses the memory the one before freed: a
// batch grows by doubling, and 32 MiB ones were fresh memory each time (the baseline of the
// 1 TiB benchmark image took 1.86 s with them, 1.03 s with 4 MiB).
constexpr uint64_t kMaxBatchBytes = 4ull << 20;
// Readers of the journal's content (decompression, CPU work): a few keep the cores busy.
constexpr size_t kJournalReaders = 4;

using UnitKey = std::tuple<uint16_t, uint64_t>;
UnitKey KeyOf(const MetadataUnit& u) { return {u.extent, u.offset}; }

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Why the storage's identity moved, or "" when it did not. Fields the storage cannot give are 0.
std::string IdentityChange(const FileIdentity& was, const FileIdentity& now) {
  auto moved = [](auto a, auto b) { return a != 0 && b != 0 && a != b; };
  if (moved(was.ino, now.ino)) return "the file was replaced (file id changed)";
  if (was.size != now.size) return fmt::format("size changed from {} to {}", was.size, now.size);
  if (moved(was.change_attr, now.change_attr)) return "change attribute moved";
  if (moved(was.mtime_ns, now.mtime_ns)) return "modification time moved";
  if (moved(was.ctime_ns, now.ctime_ns)) return "change time moved";
  return "";
}

std::string DescribeUnits(const std::vector<MetadataUnit>& units) {
  std::map<UnitKind, size_t> by_kind;
  for (const MetadataUnit& u : units) ++by_kind[u.kind];
  std::string out;
  for (const auto& [kind, n] : by_kind) {
    if (!out.empty()) out += ", ";
    out += fmt::format("{} {}", n, UnitKindName(kind));
  }
  return out.empty() ? "none" : out;
}

// ", in extent file NAME (extent N), ..." for the units of other files of a multi-file image.
std::string DescribeExtents(const std::vector<MetadataUnit>& units, const Verification& v) {
  std::map<uint16_t, size_t> by_extent;
  for (const MetadataUnit& u : units) {
    if (u.extent != 0) ++by_extent[u.extent];
  }
  std::string out;
  for (const auto& [extent, n] : by_extent) {
    const auto& names = v.storage.extent_files;
    out += fmt::format("{} {} in extent file {} (extent {})", out.empty() ? ";" : ",", n,
                       extent <= names.size() ? names[extent - 1] : std::string("?"), extent);
  }
  return out;
}

std::string JoinProblems(const std::vector<std::string>& problems) {
  std::string out;
  for (size_t i = 0; i < problems.size() && i < 3; ++i) {
    if (i) out += "; ";
    out += problems[i];
  }
  if (problems.size() > 3) out += fmt::format("; and {} more", problems.size() - 3);
  return out;
}

// A unit written several times within one flush epoch records as its previous content only what
// its last write replaced; what it held when the epoch's first write came (the content the last
// completed flush left) is its newest history version, and a crash or power loss may leave that
// too.
Status HoldsEpochStart(const Journal& journal, const ImageRecord& image, const UnitCheck& c,
                       bool* holds) {
  std::vector<UnitVersion> older;
  VMETAFS_RETURN_IF_ERROR(journal.UnitHistory(image.id, c.journaled.unit, &older));
  *holds = !older.empty() && older.front().hash == c.storage_hash;
  return Status::Ok();
}

// The journal's latest content of the units a view lays over the storage, read each time the
// view is read: the journal's view of a damaged 1 TiB image holds none of its 128 MiB of tables.
class JournalUnits : public PatchSource {
 public:
  JournalUnits(const Journal& journal, uint64_t image_id)
      : journal_(journal), image_id_(image_id) {}
  Status ReadPatch(uint16_t extent, uint64_t offset, uint64_t from,
                   std::span<uint8_t> out) const override {
    MetadataUnit unit;  // the journal finds a unit by its place
    unit.extent = extent;
    unit.offset = offset;
    UnitVersion v;
    VMETAFS_RETURN_IF_ERROR(journal_.GetUnit(image_id_, unit, &v));
    if (from > v.content.size() || out.size() > v.content.size() - from) {
      return Status::Corruption(fmt::format("journaled unit at extent {} offset {} holds {} bytes",
                                            extent, offset, v.content.size()));
    }
    std::memcpy(out.data(), v.content.data() + from, out.size());
    return Status::Ok();
  }

 private:
  const Journal& journal_;
  const uint64_t image_id_;
};

}  // namespace

std::string_view DistinctBytes::Hold(std::span<const uint8_t> bytes, uint64_t hash,
                                     uint64_t limit) {
  const std::string_view want(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  for (auto [it, end] = by_hash_.equal_range(hash); it != end; ++it) {
    if (it->second == want) return it->second;
  }
  if (bytes.size() > limit || bytes_ > limit - bytes.size()) return {};
  const std::string_view kept = held_.emplace_back(want);
  by_hash_.emplace(hash, kept);
  bytes_ += kept.size();
  return kept;
}

std::string_view UnitResultName(UnitCheck::Result r) {
  switch (r) {
    case UnitCheck::Result::kMatch:
      return "match";
    case UnitCheck::Result::kPendingOld:
      return "pending";
    case UnitCheck::Result::kDiffers:
      return "differs";
    case UnitCheck::Result::kMissing:
      return "missing";
  }
  return "?";
}

Status ReadUnits(const ImageFile& file, const std::vector<MetadataUnit>& units,
                 const ProgressFn& progress,
                 const std::function<Status(const MetadataUnit&, std::span<const uint8_t>)>& fn,
                 size_t readers) {
  uint64_t total = 0, done = 0;
  for (const MetadataUnit& u : units) total += u.length;
  std::vector<uint8_t> buf;
  // Units come grouped by file (extent); each group's runs of adjacent units, up to kMaxReadRun
  // bytes each, are read ahead by one RangeReader.
  for (size_t group = 0; group < units.size();) {
    size_t group_end = group + 1;
    while (group_end < units.size() && units[group_end].extent == units[group].extent) ++group_end;
    const ImageFile* extent = file.Extent(units[group].extent);
    if (extent == nullptr) {  // a file of a multi-file image this ImageFile does not reach
      for (size_t k = group; k < group_end; ++k) {
        VMETAFS_RETURN_IF_ERROR(fn(units[k], {}));
        done += units[k].length;
      }
      group = group_end;
      continue;
    }
    uint64_t size = 0;
    VMETAFS_RETURN_IF_ERROR(extent->Size(&size));
    std::vector<size_t> run_ends;  // [previous end, run_end) of units per range
    std::vector<ByteRange> ranges;
    for (size_t i = group; i < group_end;) {
      size_t j = i + 1;
      const uint64_t start = units[i].offset;
      while (j < group_end && units[j].offset == units[j - 1].end() &&
             units[j].end() - start <= kMaxReadRun) {
        ++j;
      }
      ranges.push_back({start, units[j - 1].end() - start});
      run_ends.push_back(j);
      i = j;
    }
    // Bytes past the end of the file read as zeros, as qemu reads them: a table in a last,
    // partly written cluster is still whole, and a unit lost to a truncation differs.
    RangeReader reader(*extent, size, ranges, readers);
    size_t first = group;
    for (size_t r = 0; r < ranges.size(); ++r) {
      VMETAFS_RETURN_IF_ERROR(reader.Take(r, &buf));
      for (size_t k = first; k < run_ends[r]; ++k) {
        VMETAFS_RETURN_IF_ERROR(
            fn(units[k], std::span<const uint8_t>(buf).subspan(units[k].offset - ranges[r].offset,
                                                               units[k].length)));
      }
      first = run_ends[r];
      done += buf.size();
      if (progress) progress(done, total);
    }
    group = group_end;
  }
  return Status::Ok();
}

namespace {

// Converted in place outside the mount (qemu-img convert to another format under the same name):
// the storage is judged as what it is now. Only a change from outside may change the format; a
// damaged header that happens to look like another format is judged as the journal's format.
Status JudgeConvertedFormat(const ImageFile& file, const ParseLimits& limits, Verification* v) {
  if (!v->changed_outside || v->parser == nullptr || v->parser->Probe(file)) return Status::Ok();
  const FormatParser* now = DetectFormat(file);
  if (now == nullptr || now == v->parser) return Status::Ok();
  ParsedImage parsed;
  VMETAFS_RETURN_IF_ERROR(now->Parse(file, limits, &parsed));
  if (!parsed.valid()) return Status::Ok();
  v->change_reason +=
      fmt::format(" and it is a {} image now, no longer {}", now->Name(), v->parser->Name());
  v->parser = now;
  v->storage = std::move(parsed);
  return Status::Ok();
}

}  // namespace

Status Verify(const Journal& journal, const ImageRecord& image, const ImageFile& file,
              const ParseLimits& limits, const ProgressFn& progress, Verification* out) {
  *out = Verification{};
  out->image = image;
  out->parser = FormatByName(image.format);
  if (out->parser == nullptr) out->parser = DetectFormat(file);
  if (out->parser == nullptr) {
    out->storage.problems.push_back("the file is not recognised as any image format");
  } else {
    VMETAFS_RETURN_IF_ERROR(out->parser->Parse(file, limits, &out->storage));
  }
  // After the parse: the identity of a multi-file image covers the extent files it bound.
  VMETAFS_RETURN_IF_ERROR(file.Identity(&out->identity));
  if (image.in_use) {
    out->changed_outside = true;
    out->change_reason = "it was not closed cleanly (daemon or host stopped while it was open)";
  } else {
    out->change_reason = IdentityChange(image.identity, out->identity);
    out->changed_outside = !out->change_reason.empty();
  }
  VMETAFS_RETURN_IF_ERROR(JudgeConvertedFormat(file, limits, out));

  std::vector<MetadataUnit> units;
  VMETAFS_RETURN_IF_ERROR(journal.ForEachUnit(image.id, false, [&](const UnitVersion& v) {
    out->units.push_back(UnitCheck{v, UnitCheck::Result::kMatch, 0, {}});
    units.push_back(v.unit);
    return Status::Ok();
  }));
  size_t next = 0;
  std::map<uint16_t, uint64_t> sizes;  // of each file with a differing unit, asked once
  auto past_end = [&](const MetadataUnit& u) {
    auto it = sizes.find(u.extent);
    if (it == sizes.end()) {
      const ImageFile* extent = file.Extent(u.extent);
      uint64_t size = 0;
      if (extent == nullptr || !extent->Size(&size).ok()) size = 0;
      it = sizes.emplace(u.extent, size).first;
    }
    return u.end() > it->second;
  };
  return ReadUnits(
      file, units, progress, [&](const MetadataUnit& u, std::span<const uint8_t> bytes) {
        UnitCheck& c = out->units[next++];
        c.storage_hash = bytes.empty() ? 0 : ContentHash(bytes);
        bool legitimate = !bytes.empty() && c.journaled.Accepts(c.storage_hash, image);
        // Only a stop that was not clean (a crash, a power loss) can leave the epoch's start on
        // the storage; after a clean close it would be damage that happens to look old.
        if (!bytes.empty() && !legitimate && image.in_use && c.journaled.Pending(image)) {
          VMETAFS_RETURN_IF_ERROR(HoldsEpochStart(journal, image, c, &legitimate));
        }
        if (!bytes.empty() && c.storage_hash == c.journaled.hash) {
          c.result = UnitCheck::Result::kMatch;
        } else if (legitimate) {
          c.result = UnitCheck::Result::kPendingOld;
        } else {
          c.result = past_end(u) ? UnitCheck::Result::kMissing : UnitCheck::Result::kDiffers;
          ++out->differing;
          if (!bytes.empty())
            c.storage_bytes = out->held->Hold(bytes, c.storage_hash, Verification::kHeldBytes);
        }
        return Status::Ok();
      });
}

Status CheckStorageDeep(const ImageFile& file, const ParseLimits& limits, Verification* v) {
  v->checked_deep = true;
  v->check_problems.clear();
  v->tolerated_leaks = 0;
  if (v->parser == nullptr || !v->storage.valid()) return Status::Ok();
  return v->parser->Check(file, v->storage, limits, &v->check_problems);
}

namespace {

// Lays the journal's latest content of `units` over the storage `view` is made of, read from
// `journaled` as the view is read.
void LayJournal(const std::vector<MetadataUnit>& units, const JournalUnits* journaled,
                OverlayImageFile* view) {
  for (const MetadataUnit& u : units) view->AddLazy(u.extent, u.offset, u.length, journaled);
}

// Parses the journal's view (LayJournal) in the journal's format, even when the storage was
// converted since, and deep-checks it when `deep`. Fills *view and *problems.
Status ParseJournalView(const ImageFile& overlay, const ParseLimits& limits, const Verification& v,
                        bool deep, ParsedImage* view, std::vector<std::string>* problems) {
  const FormatParser* parser = FormatByName(v.image.format);
  if (parser == nullptr) parser = v.parser;
  if (parser == nullptr) {
    problems->push_back("the journal does not name a known format");
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(parser->Parse(overlay, limits, view));
  *problems = view->problems;
  if (deep && view->valid())
    VMETAFS_RETURN_IF_ERROR(parser->Check(overlay, *view, limits, problems));
  return Status::Ok();
}

}  // namespace

Status CheckStorageAfterCrash(const ImageFile& file, const ImageFile& journal_view,
                              const ParseLimits& limits, Verification* v) {
  v->checked_deep = true;
  v->check_problems.clear();
  v->tolerated_leaks = 0;
  if (v->parser == nullptr || !v->storage.valid()) return Status::Ok();
  return v->parser->CheckAfterCrash(file, v->storage, journal_view, limits, &v->check_problems,
                                    &v->tolerated_leaks);
}

Status Decide(const Journal& journal, const ImageFile& file, const ParseLimits& limits,
              Verification* v, Plan* plan) {
  *plan = Plan{};
  std::vector<MetadataUnit> differing;
  for (const UnitCheck& c : v->units) {
    if (c.result == UnitCheck::Result::kDiffers || c.result == UnitCheck::Result::kMissing) {
      differing.push_back(c.journaled.unit);
    }
  }
  if (v->units.empty()) {
    plan->action = Action::kBaseline;
    plan->detail = "no journal yet";
    return Status::Ok();
  }
  if (differing.empty()) {
    plan->action = Action::kVerified;
    plan->detail = fmt::format("{} units match the journal", v->units.size());
    return Status::Ok();
  }
  const std::string what =
      fmt::format("{} of {} units differ from the journal ({}{})", differing.size(),
                  v->units.size(), DescribeUnits(differing), DescribeExtents(differing, *v));
  ParsedImage view;
  std::vector<std::string> view_problems;
  // After our own crash (in_use) the journal's view is what vmetafs wrote, journaled ahead: it may
  // hold the leaked clusters of an allocation in flight, which the deep check counts as problems
  // but qemu does not. Only a view laid over someone else's changes needs the deep check.
  const bool deep = v->changed_outside && !v->image.in_use;
  // The storage with the journal's content laid over the differing units, read from the journal
  // as it is read (never all held): the crash check below and the view's parse both look at it.
  JournalUnits journaled(journal, v->image.id);
  OverlayImageFile overlay(file);
  LayJournal(differing, &journaled, &overlay);
  auto journal_view = [&]() -> Status {
    return ParseJournalView(overlay, limits, *v, deep, &view, &view_problems);
  };
  bool have_view = false;
  if (v->changed_outside) {
    // Both deep checks take a while on a large image (every cluster reference is counted) and
    // the journal's view is needed unless the storage is valid: they run side by side. They
    // share only what neither writes (the units, the file, the journal).
    std::future<Status> view_done;
    if (deep) view_done = std::async(std::launch::async, journal_view);
    // After an unclean stop the storage may be newer than the journal (unsynced journal, kept
    // storage writes) with the leaks of an allocation in flight: qemu accepts those, and so
    // adopting keeps what the storage holds durably instead of rolling it back. (No view is
    // being made beside it then: deep is false.)
    Status checked;
    if (v->image.in_use) {
      checked = CheckStorageAfterCrash(file, overlay, limits, v);
    } else {
      checked = CheckStorageDeep(file, limits, v);
    }
    have_view = view_done.valid();
    Status viewed = have_view ? view_done.get() : Status::Ok();
    VMETAFS_RETURN_IF_ERROR(checked);
    if (v->storage_valid()) {
      plan->action = Action::kAdopted;
      plan->units = differing;
      plan->detail = fmt::format(
          "changed outside the mount ({}) and internally valid{}; {}; the "
          "change is kept and the journal re-baselined",
          v->change_reason,
          v->tolerated_leaks == 0
              ? ""
              : fmt::format(" but for {} leaked clusters of an allocation in flight (qemu-img "
                            "check -r leaks frees them)",
                            v->tolerated_leaks),
          what);
      return Status::Ok();
    }
    VMETAFS_RETURN_IF_ERROR(viewed);
  }
  if (!have_view) VMETAFS_RETURN_IF_ERROR(journal_view());
  if (!view_problems.empty()) {
    plan->action = Action::kRefused;
    plan->units = differing;
    const auto& storage_problems =
        v->storage.problems.empty() ? v->check_problems : v->storage.problems;
    plan->detail = fmt::format(
        "{}; the storage's metadata is {}, and the journal's view is not valid either ({}); "
        "nothing was written. Inspect with `meta-restore verify {}`",
        what,
        storage_problems.empty() ? "not trusted"
                                 : "invalid (" + JoinProblems(storage_problems) + ")",
        JoinProblems(view_problems), v->image.path);
    return Status::Ok();
  }
  // Never write a unit the journal's own view no longer references as metadata.
  std::map<UnitKey, std::string_view> read;  // the storage's bytes Verify held
  for (const UnitCheck& c : v->units) {
    if (!c.storage_bytes.empty()) read.emplace(KeyOf(c.journaled.unit), c.storage_bytes);
  }
  for (const MetadataUnit& u : differing) {
    const MetadataUnit* in_view = view.map.Find(u.extent, u.offset);
    const bool restore = in_view && in_view->length == u.length;
    (restore ? plan->restore : plan->skipped).push_back(u);
    if (!restore) continue;
    auto r = read.find(KeyOf(u));
    if (r != read.end() && r->second.size() == u.length) plan->replaced.push_back({u, r->second});
  }
  if (plan->replaced.size() == plan->restore.size()) {
    plan->replaced_held = v->held;
  } else {
    plan->replaced.clear();
  }
  plan->action = Action::kRestored;
  plan->units = plan->restore;
  plan->detail =
      v->changed_outside
          ? fmt::format(
                "{}; changed outside the mount ({}) but internally invalid ({}); "
                "restoring the journal's valid view",
                what, v->change_reason,
                JoinProblems(v->storage.problems.empty() ? v->check_problems : v->storage.problems))
          : fmt::format(
                "{}; vmetafs was the last writer, so the storage damaged them; "
                "restoring from the journal",
                what);
  if (!plan->skipped.empty()) {
    plan->detail += fmt::format(" ({} differing units are no longer metadata and stay as they are)",
                                plan->skipped.size());
  }
  return Status::Ok();
}

Status RecordEvent(Journal& journal, const ImageRecord& image, Action action,
                   std::vector<MetadataUnit> units, const std::string& detail,
                   std::span<const QuarantineView> quarantine) {
  Event e;
  e.time_ns = NowNs();
  e.image_id = image.id;
  e.image = image.path;
  e.action = action;
  e.units = std::move(units);
  e.detail = detail;
  auto level = action == Action::kRefused                                  ? spdlog::level::err
               : action == Action::kRestored || action == Action::kAdopted ? spdlog::level::warn
                                                                           : spdlog::level::info;
  spdlog::log(level, "{}: {}: {}", image.path, ActionName(action), detail);
  return journal.AddEvent(&e, quarantine);
}

namespace {

// The bytes `units` hold on the storage now, for the quarantine, alike ones held once.
Status ReadReplaced(const ImageFile& file, const std::vector<MetadataUnit>& units,
                    const ProgressFn& progress, DistinctBytes* held,
                    std::vector<QuarantineView>* replaced) {
  return ReadUnits(file, units, progress,
                   [&](const MetadataUnit& u, std::span<const uint8_t> bytes) {
                     replaced->push_back({u, held->Hold(bytes, ContentHash(bytes))});
                     return Status::Ok();
                   });
}

// Writes what `source` holds at `units` over `file` (the same units, in the same order as
// read), adjacent units in one write of up to kMaxReadRun bytes. `source` is read ahead on the
// reader's threads while the writes go on: a restore of a large image reads its tables from the
// journal (decompressing each) as it writes them, never holding them all.
Status WriteUnits(const ImageFile& source, const std::vector<MetadataUnit>& units,
                  ImageFile& file) {
  std::vector<uint8_t> run;
  MetadataUnit first;
  auto write_run = [&]() -> Status {
    if (run.empty()) return Status::Ok();
    ImageFile* extent = file.MutableExtent(first.extent);
    if (extent == nullptr) {
      return Status::NotFound(fmt::format("extent {} of the image is not open", first.extent));
    }
    VMETAFS_RETURN_IF_ERROR(extent->WriteAt(first.offset, run));
    run.clear();
    return Status::Ok();
  };
  VMETAFS_RETURN_IF_ERROR(ReadUnits(
      source, units, nullptr,
      [&](const MetadataUnit& u, std::span<const uint8_t> bytes) {
        if (bytes.size() != u.length) {
          return Status::NotFound(
              fmt::format("extent {} of the image is not open: the unit at {} has no content",
                          u.extent, u.offset));
        }
        if (!run.empty() && (u.extent != first.extent || u.offset != first.offset + run.size() ||
                             run.size() + bytes.size() > kMaxReadRun)) {
          VMETAFS_RETURN_IF_ERROR(write_run());
        }
        if (run.empty()) first = u;
        run.insert(run.end(), bytes.begin(), bytes.end());
        return Status::Ok();
      },
      kJournalReaders));
  return write_run();
}

// Writes what `source` holds at `units` over `file` once `replaced` (the bytes they replace, in
// the same order) is in the journal with a kRestored event saying `detail`: every restore can be
// undone, even one interrupted half way.
Status WriteBack(Journal& journal, const ImageRecord& image, ImageFile& file,
                 const std::vector<MetadataUnit>& units, const ImageFile& source,
                 std::span<const QuarantineView> replaced, const std::string& detail,
                 std::vector<QuarantinedUnit>* unwritten) {
  unwritten->clear();
  VMETAFS_RETURN_IF_ERROR(RecordEvent(journal, image, Action::kRestored, units, detail, replaced));
  VMETAFS_RETURN_IF_ERROR(journal.Sync());
  Status write_status = WriteUnits(source, units, file);
  if (write_status.ok()) write_status = file.Sync();
  if (!write_status.ok()) {
    VMETAFS_RETURN_IF_ERROR(ReadUnits(
        source, units, nullptr, [&](const MetadataUnit& u, std::span<const uint8_t> bytes) {
          unwritten->push_back({u, std::string(bytes.begin(), bytes.end())});
          return Status::Ok();
        }));
    return RecordEvent(journal, image, Action::kRestored, units,
                       fmt::format("the restored units could not be written back ({}); they are "
                                   "served from the journal while the image is open",
                                   write_status.ToString()));
  }
  return Status::Ok();
}

}  // namespace

Status Restore(Journal& journal, const ImageRecord& image, ImageFile& file, Plan* plan,
               const ProgressFn& progress, std::vector<QuarantinedUnit>* unwritten) {
  const std::vector<MetadataUnit>& units = plan->restore;
  JournalUnits journaled(journal, image.id);
  OverlayImageFile latest(file);
  LayJournal(units, &journaled, &latest);
  if (plan->replaced.size() == units.size() && plan->replaced_held != nullptr) {
    // Verify held what the storage holds there: no need to read it again.
    return WriteBack(journal, image, file, units, latest, plan->replaced, plan->detail, unwritten);
  }
  DistinctBytes held;
  std::vector<QuarantineView> replaced;
  VMETAFS_RETURN_IF_ERROR(ReadReplaced(file, units, progress, &held, &replaced));
  return WriteBack(journal, image, file, units, latest, replaced, plan->detail, unwritten);
}

void NoteRestored(const Plan& plan, Verification* v) {
  std::set<UnitKey> written;
  for (const MetadataUnit& u : plan.restore) written.insert(KeyOf(u));
  for (UnitCheck& c : v->units) {
    if (!written.count(KeyOf(c.journaled.unit))) continue;
    c.result = UnitCheck::Result::kMatch;
    c.storage_hash = c.journaled.hash;
    --v->differing;
  }
}

Status RestoreContents(Journal& journal, const ImageRecord& image, ImageFile& file,
                       std::vector<QuarantinedUnit> contents, const std::string& detail,
                       const ProgressFn& progress, std::vector<QuarantinedUnit>* unwritten) {
  std::vector<MetadataUnit> units;
  OverlayImageFile chosen(file);
  for (const QuarantinedUnit& c : contents) {
    units.push_back(c.unit);
    chosen.Add(c.unit.extent, c.unit.offset,
               {reinterpret_cast<const uint8_t*>(c.bytes.data()), c.bytes.size()});
  }
  DistinctBytes held;
  std::vector<QuarantineView> replaced;
  VMETAFS_RETURN_IF_ERROR(ReadReplaced(file, units, progress, &held, &replaced));
  return WriteBack(journal, image, file, units, chosen, replaced, detail, unwritten);
}

Status Reconcile(Journal& journal, const ImageRecord& image, const ImageFile& file,
                 const ParsedImage& parsed, const Verification* known, const ProgressFn& progress,
                 ReconcileStats* stats) {
  *stats = ReconcileStats{};
  std::map<UnitKey, UnitVersion> journaled;
  VMETAFS_RETURN_IF_ERROR(journal.ForEachUnit(image.id, false, [&](const UnitVersion& v) {
    journaled.emplace(KeyOf(v.unit), v);
    return Status::Ok();
  }));
  // Units a verification just found equal to the journal need not be read again.
  std::vector<MetadataUnit> to_read;
  to_read.reserve(parsed.map.size());
  {
    std::map<UnitKey, const UnitCheck*> matched;
    if (known != nullptr) {
      for (const UnitCheck& c : known->units) {
        if (c.result == UnitCheck::Result::kMatch) matched.emplace(KeyOf(c.journaled.unit), &c);
      }
    }
    for (const MetadataUnit& u : parsed.map.units()) {
      auto m = matched.find(KeyOf(u));
      auto j = journaled.find(KeyOf(u));
      if (m != matched.end() && j != journaled.end() && j->second.unit == u &&
          j->second.hash == m->second->journaled.hash) {
        journaled.erase(j);
      } else {
        to_read.push_back(u);
      }
    }
  }
  JournalBatch batch;
  uint64_t batch_bytes = 0;
  auto flush_batch = [&]() -> Status {
    if (batch.empty()) return Status::Ok();
    Status s = journal.Write(batch);
    batch = JournalBatch();
    batch_bytes = 0;
    return s;
  };
  VMETAFS_RETURN_IF_ERROR(
      ReadUnits(file, to_read, progress,
                [&](const MetadataUnit& u, std::span<const uint8_t> bytes) -> Status {
                  if (bytes.empty()) return Status::Ok();  // another extent's file
                  const uint64_t hash = ContentHash(bytes);
                  auto it = journaled.find(KeyOf(u));
                  UnitVersion previous;
                  const bool had = it != journaled.end();
                  if (had) {
                    const bool same = it->second.hash == hash && it->second.unit == u;
                    journaled.erase(it);
                    if (same) return Status::Ok();
                    VMETAFS_RETURN_IF_ERROR(journal.GetUnit(image.id, u, &previous));
                    ++stats->replaced;
                  } else {
                    ++stats->captured;
                  }
                  UnitVersion v;
                  v.unit = u;
                  v.epoch = image.flush_epoch;
                  v.hash = hash;
                  v.time_ns = NowNs();
                  v.content.assign(bytes.begin(), bytes.end());
                  batch.PutUnit(image.id, std::move(v), had ? &previous : nullptr);
                  batch_bytes += bytes.size();
                  return batch_bytes >= kMaxBatchBytes ? flush_batch() : Status::Ok();
                }));
  for (const auto& [key, v] : journaled) {
    // Still journaled but no longer metadata (freed, moved, or past the end): never restore it.
    batch.RetireUnit(image.id, v.unit);
    ++stats->retired;
  }
  return flush_batch();
}

}  // namespace vmetafs::store
