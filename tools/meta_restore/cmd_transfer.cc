// meta-restore export and import: one image's journal carried to another host's store.
#include <fmt/format.h>

#include <cerrno>
#include <cstdio>

#include "store/journal_export.h"
#include "store/offline.h"
#include "tools/meta_restore/commands.h"
#include "tools/meta_restore/output.h"

namespace vmetafs::meta_restore {
namespace {

// The same file seen through another access path (an NFS URL instead of the local mount of the
// share) has another inode number or change attribute but the same size and modification time:
// then the import takes what this backing says, so the next open does not see an outside change.
void AdoptIdentityOfSameFile(Session& s, const store::ImageRecord& record, bool* present) {
  *present = false;
  std::unique_ptr<store::ImageFile> file;
  Status st = s.OpenImage(record.path, false, &file);
  if (!st.ok()) {
    Warn(
        fmt::format("{} does not exist on this store's backing {} ({}); the journal is imported "
                    "anyway and protects the image once it is there",
                    record.path, s.BackingSpec(), st.ToString()));
    return;
  }
  *present = true;
  store::FileIdentity now;
  if (!file->Identity(&now).ok()) return;
  if (now.size != record.identity.size || now.mtime_ns != record.identity.mtime_ns ||
      now == record.identity) {
    return;
  }
  st = store::UpdateRecord(s.journal(), record.id,
                           [&](store::ImageRecord* r) { r->identity = now; });
  if (!st.ok()) Warn("could not record the file's identity on this backing: " + st.ToString());
}

}  // namespace

int ExportCommand(const GlobalOptions& g, const ExportOptions& o) {
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kReadOnly, "export", false, &s); !st.ok()) {
    return Fail(st);
  }
  const std::string path = s->ImagePath(o.image);
  store::ImageRecord record;
  if (Status st = s->FindImage(path, &record); !st.ok()) return Fail(st);
  store::JournalExport e;
  if (Status st = store::CollectExport(s->journal(), record, o.with_quarantine, &e); !st.ok()) {
    return Fail(st);
  }
  if (Status st = store::WriteExportFile(o.output, e); !st.ok()) return Fail(st);
  size_t units = 0;
  for (const auto& v : e.versions) units += v.latest;
  if (g.json) {
    PrintJson({{"image", path},
               {"output", o.output},
               {"backing", e.backing},
               {"units", units},
               {"versions", e.versions.size()},
               {"events", e.events.size()},
               {"quarantined_events", e.quarantine.size()},
               {"content_bytes", e.ContentBytes()}});
    return kExitOk;
  }
  const std::string quarantine =
      o.with_quarantine ? fmt::format("the quarantine of {} events", e.quarantine.size())
                        : "without quarantine";
  std::printf("exported %s to %s: %zu units, %zu versions (%s), %zu events, %s\n", path.c_str(),
              o.output.c_str(), units, e.versions.size(), HumanBytes(e.ContentBytes()).c_str(),
              e.events.size(), quarantine.c_str());
  return kExitOk;
}

int ImportCommand(const GlobalOptions& g, const std::string& file) {
  store::JournalExport e;
  if (Status st = store::ReadExportFile(file, &e); !st.ok()) {
    return Fail(st.ToString() + "; nothing was imported");
  }
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kWritable, "import " + e.image_path,
                                /*create=*/true, &s);
      !st.ok()) {
    return Fail(st);
  }
  store::ImageRecord existing;
  const bool replaces = s->journal().FindImage(e.image_path, &existing).ok();
  if (replaces && !g.json) {
    std::printf(
        "%s: the store already has a journal for it (image %lu, last seq %lu): the import "
        "replaces it; the old journal's events are kept (meta-restore history %s)\n",
        e.image_path.c_str(), static_cast<unsigned long>(existing.id),
        static_cast<unsigned long>(existing.last_seq), e.image_path.c_str());
  }
  const std::string here = s->BackingSpec();
  if (here.empty()) {
    Warn(
        fmt::format("the store {} records no backing yet (the first vmetafs mounted with "
                    "store={} claims it); give --backing to check that {} is there",
                    g.store, g.store, e.image_path));
  } else if (here != e.backing) {
    Warn(fmt::format("the export comes from a store of backing {}; this store's backing is {}",
                     e.backing, here));
  }
  store::ImportResult result;
  if (Status st = store::ImportJournal(s->journal(), e, &result); !st.ok()) return Fail(st);
  bool present = false;
  if (!here.empty()) AdoptIdentityOfSameFile(*s, result.record, &present);
  if (Status st = s->journal().Sync(); !st.ok()) return Fail(st);
  if (g.json) {
    PrintJson({{"image", e.image_path},
               {"id", result.record.id},
               {"replaced", result.replaced},
               {"replaced_id", result.replaced ? Json(result.replaced_id) : Json(nullptr)},
               {"units", result.units},
               {"versions", result.versions},
               {"events", result.events},
               {"quarantined_units", result.quarantined},
               {"on_backing", here.empty() ? Json(nullptr) : Json(present)}});
    return kExitOk;
  }
  std::printf(
      "imported %s from %s: %zu units, %zu versions, %zu events; the image is protected "
      "by this store from its next open (or `meta-restore restore %s`)\n",
      e.image_path.c_str(), file.c_str(), result.units, result.versions, result.events,
      e.image_path.c_str());
  return kExitOk;
}

}  // namespace vmetafs::meta_restore
