// meta-restore restore: the daemon's first-open decision carried out offline, or (--at) the
// image's metadata brought back to the journaled versions in force at a point in time.
// --dry-run reads only (beside a live daemon too) and writes nothing, not even an event.
#include <fmt/format.h>

#include <cstdio>
#include <map>
#include <tuple>

#include "store/history.h"
#include "tools/meta_restore/commands.h"
#include "tools/meta_restore/output.h"
#include "tools/meta_restore/report.h"

namespace vmetafs::meta_restore {
namespace {

using store::Action;

struct Target {
  std::unique_ptr<Session> session;
  store::ImageRecord record;
  std::unique_ptr<store::ImageFile> file;
};

Status OpenTarget(const GlobalOptions& g, const RestoreOptions& o, Target* t) {
  const auto mode = o.dry_run ? Session::Mode::kReadOnly : Session::Mode::kWritable;
  VMETAFS_RETURN_IF_ERROR(Session::Open(g, mode, "restore " + o.image, false, &t->session));
  const std::string path = t->session->ImagePath(o.image);
  VMETAFS_RETURN_IF_ERROR(t->session->FindImage(path, &t->record));
  return t->session->OpenImage(path, !o.dry_run, &t->file);
}

// Where each unit of a plan comes from: the journal's latest version, as the verification saw it.
void PrintRestorePlan(const store::OfflineDecision& d) {
  std::map<std::tuple<uint16_t, uint64_t>, const store::UnitCheck*> checks;
  for (const store::UnitCheck& c : d.verification.units) {
    checks[{c.journaled.unit.extent, c.journaled.unit.offset}] = &c;
  }
  Table t({"KIND", "OFFSET", "LENGTH", "FROM", "STORAGE HASH", "JOURNAL HASH"},
          {false, true, true, false, false, false});
  for (const store::MetadataUnit& u : d.plan.restore) {
    const store::UnitCheck* c = checks[{u.extent, u.offset}];
    t.Row(
        {std::string(store::UnitKindName(u.kind)), std::to_string(u.offset),
         std::to_string(u.length),
         c ? fmt::format("journal seq {} ({})", c->journaled.seq, TimeOrDash(c->journaled.time_ns))
           : "journal",
         c && c->result != store::UnitCheck::Result::kMissing ? Hex(c->storage_hash) : "-",
         c ? Hex(c->journaled.hash) : "-"});
  }
  if (!t.empty()) t.Print("  ");
  for (const store::MetadataUnit& u : d.plan.skipped) {
    std::printf("  left as it is (no longer metadata in the journal's view): %s at %lu\n",
                std::string(store::UnitKindName(u.kind)).c_str(),
                static_cast<unsigned long>(u.offset));
  }
}

// Verifies again after a change: healthy means a first open would find it verified.
Status Reverify(Target& t, Progress& progress, store::OfflineDecision* after) {
  store::ImageRecord fresh;
  VMETAFS_RETURN_IF_ERROR(t.session->journal().GetImage(t.record.id, &fresh));
  Status s = store::PlanDecision(t.session->journal(), fresh, *t.file, t.session->limits(),
                                 progress.Phase("re-verify " + fresh.path), after);
  progress.Clear();
  return s;
}

bool Healthy(const store::OfflineDecision& d) {
  return !Damaged(d) && d.plan.action == Action::kVerified;
}

int Finish(const GlobalOptions& g, Json report, const store::OfflineDecision& after) {
  const bool healthy = Healthy(after);
  report["healthy"] = healthy;
  report["after"] = DecisionJson(after);
  if (g.json) {
    PrintJson(report);
  } else {
    std::printf("%s\n", VerdictLine(after).c_str());
    if (!healthy) PrintDifferences(after);
  }
  return healthy ? kExitOk : kExitDamage;
}

int RestoreDecision(const GlobalOptions& g, const RestoreOptions& o, Target& t) {
  Progress progress;
  store::OfflineDecision d;
  Status st = store::PlanDecision(t.session->journal(), t.record, *t.file, t.session->limits(),
                                  progress.Phase("verify " + t.record.path), &d);
  progress.Clear();
  if (!st.ok()) return Fail(st);
  Json report = DecisionJson(d);
  report["dry_run"] = o.dry_run;
  if (o.dry_run) {
    if (g.json) {
      PrintJson(report);
    } else {
      std::printf("%s\n", VerdictLine(d).c_str());
      PrintDifferences(d);
      if (d.plan.action == Action::kRestored) {
        std::printf(
            "plan: restore %zu units from the journal; the bytes they replace go to "
            "quarantine:\n",
            d.plan.restore.size());
        PrintRestorePlan(d);
      }
      std::printf("nothing was written (dry run)\n");
    }
    return Damaged(d) ? kExitDamage : kExitOk;
  }
  if (!g.json) std::printf("%s\n", VerdictLine(d).c_str());
  store::OfflineOutcome outcome;
  st = store::CarryOutDecision(t.session->journal(), *t.file, t.session->limits(),
                               progress.Phase("restore " + t.record.path), &d, &outcome);
  progress.Clear();
  if (!st.ok()) return Fail(st);
  report["done"] = {{"action", d.unprotectable ? "none" : store::ActionName(d.plan.action)},
                    {"detail", d.plan.detail},
                    {"written", outcome.written_units}};
  if (!g.json) {
    if (d.unprotectable || d.plan.action == Action::kRefused) {
      std::printf("%s: refused: %s\n", t.record.path.c_str(), d.plan.detail.c_str());
    } else if (d.plan.action == Action::kRestored) {
      std::printf(
          "%s: restored %zu units from the journal; the bytes they replaced are in "
          "quarantine (meta-restore quarantine %s)\n",
          t.record.path.c_str(), outcome.written_units, t.record.path.c_str());
    } else if (d.plan.action != Action::kVerified) {
      std::printf("%s: %s: %s\n", t.record.path.c_str(),
                  std::string(store::ActionName(d.plan.action)).c_str(), d.plan.detail.c_str());
    }
  }
  if (d.unprotectable || d.plan.action == Action::kRefused) {
    if (g.json) PrintJson(report);
    return kExitDamage;
  }
  store::OfflineDecision after;
  if (Status s = Reverify(t, progress, &after); !s.ok()) return Fail(s);
  return Finish(g, std::move(report), after);
}

void PrintPointPlan(const store::VersionPlan& plan) {
  std::map<std::string_view, size_t> counts;
  Table t(
      {"KIND", "OFFSET", "LENGTH", "VERSION SEQ", "VERSION TIME", "STORAGE HASH", "VERSION HASH"},
      {false, true, true, true, false, false, false});
  for (const store::VersionChoice& c : plan.units) {
    ++counts[store::ChoiceName(c.choice)];
    if (c.choice != store::VersionChoice::Choice::kWrite) continue;
    t.Row({std::string(store::UnitKindName(c.chosen.unit.kind)),
           std::to_string(c.chosen.unit.offset), std::to_string(c.chosen.unit.length),
           std::to_string(c.chosen.seq), TimeOrDash(c.chosen.time_ns), Hex(c.storage_hash),
           Hex(c.chosen.hash)});
  }
  std::string summary;
  for (const auto& [name, n] : counts)
    summary += fmt::format("{}{} {}", summary.empty() ? "" : ", ", n, name);
  std::printf("%s as of %s: %zu journaled units: %s\n",
              plan.view.format.empty() ? "image" : plan.view.format.c_str(),
              plan.point.ToString().c_str(), plan.units.size(), summary.c_str());
  if (!t.empty()) t.Print("  ");
  for (const std::string& p : plan.problems) std::printf("  problem: %s\n", p.c_str());
}

Json PointPlanJson(const store::VersionPlan& plan) {
  Json units = Json::array();
  for (const store::VersionChoice& c : plan.units) {
    Json u = UnitJson(c.unit);
    u["choice"] = store::ChoiceName(c.choice);
    if (c.choice != store::VersionChoice::Choice::kBornLater &&
        c.choice != store::VersionChoice::Choice::kAgedOut) {
      u["version_seq"] = c.chosen.seq;
      u["version_time"] = TimeOrDash(c.chosen.time_ns);
    }
    units.push_back(u);
  }
  return {{"point", plan.point.ToString()}, {"feasible", plan.feasible()},
          {"to_write", plan.to_write},      {"units", units},
          {"problems", plan.problems},      {"detail", plan.detail}};
}

int RestoreToPoint(const GlobalOptions& g, const RestoreOptions& o, Target& t,
                   const store::PointInTime& point) {
  Progress progress;
  store::VersionPlan plan;
  Status st =
      store::PlanRestoreToPoint(t.session->journal(), t.record, *t.file, t.session->limits(), point,
                                progress.Phase("plan " + t.record.path), &plan);
  progress.Clear();
  if (!st.ok()) return Fail(st);
  Json report = {{"image", t.record.path}, {"dry_run", o.dry_run}, {"plan", PointPlanJson(plan)}};
  if (!g.json) PrintPointPlan(plan);
  if (!plan.feasible()) {
    if (g.json) {
      PrintJson(report);
    } else {
      std::printf("%s: refused: the image cannot be brought back to %s (nothing was written)\n",
                  t.record.path.c_str(), point.ToString().c_str());
    }
    return kExitDamage;
  }
  if (o.dry_run) {
    if (g.json) {
      PrintJson(report);
    } else {
      std::printf("plan: write %zu units; nothing was written (dry run)\n", plan.to_write);
    }
    return kExitOk;
  }
  store::ReconcileStats stats;
  st = store::RestoreToPoint(t.session->journal(), t.record, *t.file, t.session->limits(), plan,
                             progress.Phase("restore " + t.record.path), &stats);
  progress.Clear();
  if (!st.ok()) return Fail(st);
  if (!g.json) {
    std::printf(
        "%s: restored %zu units to their versions at %s; the bytes they replaced are in "
        "quarantine; the journal now follows the storage (%zu replaced, %zu retired)\n",
        t.record.path.c_str(), plan.to_write, point.ToString().c_str(), stats.replaced,
        stats.retired);
  }
  store::OfflineDecision after;
  if (Status s = Reverify(t, progress, &after); !s.ok()) return Fail(s);
  return Finish(g, std::move(report), after);
}

}  // namespace

int RestoreCommand(const GlobalOptions& g, const RestoreOptions& o) {
  store::PointInTime point;
  if (!o.at.empty()) {
    if (Status st = store::ParsePointInTime(o.at, &point); !st.ok()) return Fail(st);
  }
  Target t;
  if (Status st = OpenTarget(g, o, &t); !st.ok()) return Fail(st);
  return o.at.empty() ? RestoreDecision(g, o, t) : RestoreToPoint(g, o, t, point);
}

}  // namespace vmetafs::meta_restore
