// meta-restore list and gc: the images a store knows, and dropping the journals of those gone.
#include <fmt/format.h>

#include <cerrno>

#include "store/history.h"
#include "tools/meta_restore/commands.h"
#include "tools/meta_restore/output.h"

namespace vmetafs::meta_restore {
namespace {

enum class Presence { kPresent, kMissing, kUnknown };

// Whether the image's file is still on the backing; kUnknown when that cannot be told.
Presence PresenceOf(backend::Backend* b, const std::string& path, std::string* why) {
  if (b == nullptr) return Presence::kUnknown;
  struct stat st;
  Status s = b->Lstat(path, &st);
  if (s.ok()) return Presence::kPresent;
  if (s.Errno() == ENOENT) return Presence::kMissing;
  *why = s.ToString();
  return Presence::kUnknown;
}

std::string ProtectionText(const store::ImageRecord& r) {
  std::string text = r.protection == store::Protection::kProtected
                         ? "protected"
                         : "UNPROTECTED: " + r.unprotected_reason;
  if (r.in_use) text += " (open, or not closed cleanly)";
  return text;
}

backend::Backend* BackingOrWarn(Session& s) {
  backend::Backend* b = nullptr;
  Status st = s.Backing(&b);
  if (!st.ok()) Warn(st.ToString() + "; presence on the backing is not checked");
  return st.ok() ? b : nullptr;
}

// The other files of a multi-file image (VMDK extents), as its file names them now; empty for a
// single-file image or when the image cannot be read.
std::vector<std::string> ExtentFilesOf(Session& s, const store::ImageRecord& r) {
  const store::FormatParser* parser = store::FormatByName(r.format);
  if (parser == nullptr || r.format != "vmdk") return {};
  std::unique_ptr<store::ImageFile> file;
  store::ParsedImage parsed;
  if (!s.OpenImage(r.path, false, &file).ok() || !parser->Parse(*file, s.limits(), &parsed).ok()) {
    return {};
  }
  return parsed.extent_files;
}

}  // namespace

int ListCommand(const GlobalOptions& g) {
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kReadOnly, "list", false, &s); !st.ok()) {
    return Fail(st);
  }
  std::vector<store::ImageRecord> images;
  if (Status st = s->journal().ListImages(&images); !st.ok()) return Fail(st);
  backend::Backend* b = images.empty() ? nullptr : BackingOrWarn(*s);
  Json out = Json::array();
  Table table(
      {"IMAGE", "FORMAT", "SIZE", "UNITS", "JOURNAL", "LAST SEQ", "LAST CHECK", "PROTECTION"},
      {false, false, true, true, true, true, false, false});
  for (const store::ImageRecord& r : images) {
    store::Journal::Usage usage;
    if (Status st = s->journal().ImageUsage(r.id, &usage); !st.ok()) return Fail(st);
    std::string why;
    const Presence presence = PresenceOf(b, r.path, &why);
    if (!why.empty()) Warn(r.path + ": " + why);
    std::string protection = ProtectionText(r);
    if (presence == Presence::kMissing) protection += "; MISSING from the backing (see gc)";
    const std::vector<std::string> extents =
        presence == Presence::kPresent ? ExtentFilesOf(*s, r) : std::vector<std::string>{};
    if (g.json) {
      out.push_back(
          {{"image", r.path},
           {"id", r.id},
           {"format", r.format},
           {"virtual_size", r.virtual_size},
           {"units", usage.units},
           {"bytes", usage.bytes},
           {"last_seq", r.last_seq},
           {"last_check", r.last_check_ns == 0 ? Json(nullptr)
                                               : Json{{"time", store::IsoTimeUtc(r.last_check_ns)},
                                                      {"action", r.last_check}}},
           {"protection",
            r.protection == store::Protection::kProtected ? "protected" : "unprotected"},
           {"unprotected_reason", r.unprotected_reason},
           {"in_use", r.in_use},
           {"extent_files", extents},
           {"on_backing", presence == Presence::kUnknown ? Json(nullptr)
                                                         : Json(presence == Presence::kPresent)}});
      continue;
    }
    std::string name = r.path;
    for (size_t i = 0; i < extents.size(); ++i) name += (i ? ", " : " (extents: ") + extents[i];
    if (!extents.empty()) name += ")";
    table.Row({name, r.format.empty() ? "-" : r.format, HumanBytes(r.virtual_size),
               std::to_string(usage.units), HumanBytes(usage.bytes), std::to_string(r.last_seq),
               r.last_check_ns == 0 ? "-" : TimeOrDash(r.last_check_ns) + " " + r.last_check,
               protection});
  }
  if (g.json) {
    PrintJson(out);
    return kExitOk;
  }
  if (!table.empty()) table.Print();
  std::printf("%zu image%s in store %s (backing %s, %s on disk)\n", images.size(),
              images.size() == 1 ? "" : "s", g.store.c_str(),
              s->BackingSpec().empty() ? "none recorded" : s->BackingSpec().c_str(),
              HumanBytes(s->journal().DiskBytes()).c_str());
  return kExitOk;
}

int GcCommand(const GlobalOptions& g, const GcOptions& o) {
  std::unique_ptr<Session> s;
  const auto mode = o.dry_run ? Session::Mode::kReadOnly : Session::Mode::kWritable;
  if (Status st = Session::Open(g, mode, "gc", false, &s); !st.ok()) return Fail(st);
  backend::Backend* b = nullptr;
  if (Status st = s->Backing(&b); !st.ok()) return Fail(st);  // never judge without the backing
  std::vector<store::ImageRecord> images, gone;
  if (Status st = s->journal().ListImages(&images); !st.ok()) return Fail(st);
  for (const store::ImageRecord& r : images) {
    std::string why;
    const Presence p = PresenceOf(b, r.path, &why);
    if (p == Presence::kUnknown) Warn(r.path + ": kept, its presence cannot be told: " + why);
    if (p == Presence::kMissing) gone.push_back(r);
  }
  if (!o.dry_run && !o.force && !gone.empty() && gone.size() == images.size()) {
    return Fail(fmt::format(
        "every one of the {} journaled images is missing from the backing {}: is it mounted? "
        "Nothing was deleted; use --force if the images are really gone",
        images.size(), s->BackingSpec()));
  }
  Json out = Json::array();
  Table table({"IMAGE", "UNITS", "JOURNAL", "LAST SEQ", "ACTION"}, {false, true, true, true});
  for (const store::ImageRecord& r : gone) {
    store::Journal::Usage usage;
    if (Status st = s->journal().ImageUsage(r.id, &usage); !st.ok()) return Fail(st);
    if (!o.dry_run) {
      if (Status st = s->journal().DeleteImage(r.id); !st.ok()) return Fail(st);
    }
    const std::string action = o.dry_run ? "would delete" : "deleted";
    out.push_back({{"image", r.path},
                   {"id", r.id},
                   {"units", usage.units},
                   {"bytes", usage.bytes},
                   {"action", action}});
    table.Row({r.path, std::to_string(usage.units), HumanBytes(usage.bytes),
               std::to_string(r.last_seq), action});
  }
  if (!o.dry_run && !gone.empty()) {
    if (Status st = s->journal().Sync(); !st.ok()) return Fail(st);
  }
  if (g.json) {
    PrintJson(out);
    return kExitOk;
  }
  if (!table.empty()) table.Print();
  std::printf("%zu of %zu journaled images are gone from the backing%s\n", gone.size(),
              images.size(),
              gone.empty() ? ""
                           : (o.dry_run ? "; nothing deleted (dry run)"
                                        : "; their journals were deleted (events are kept)"));
  return kExitOk;
}

}  // namespace vmetafs::meta_restore
