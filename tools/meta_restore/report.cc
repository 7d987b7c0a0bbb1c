#include "tools/meta_restore/report.h"

#include <fmt/format.h>

#include <cstdio>

namespace vmetafs::meta_restore {
namespace {

using store::Action;
using store::UnitCheck;

bool Differs(const UnitCheck& c) {
  return c.result == UnitCheck::Result::kDiffers || c.result == UnitCheck::Result::kMissing;
}

size_t Pending(const store::Verification& v) {
  size_t n = 0;
  for (const UnitCheck& c : v.units) n += c.result == UnitCheck::Result::kPendingOld;
  return n;
}

std::vector<std::string> Problems(const store::Verification& v) {
  std::vector<std::string> all = v.storage.problems;
  all.insert(all.end(), v.check_problems.begin(), v.check_problems.end());
  return all;
}

}  // namespace

bool Damaged(const store::OfflineDecision& d) {
  if (d.unprotectable) return true;
  if (d.plan.action == Action::kBaseline) return false;
  return d.verification.differing > 0 || !d.verification.storage_valid();
}

std::string WouldDo(const store::OfflineDecision& d) {
  const store::Plan& p = d.plan;
  if (d.unprotectable) return "open it unprotected (" + p.detail + ")";
  switch (p.action) {
    case Action::kVerified:
      return "find it verified";
    case Action::kBaseline:
      return "take a fresh baseline (" + p.detail + ")";
    case Action::kRestored:
      return fmt::format("restore {} unit{} from the journal{}", p.restore.size(),
                         p.restore.size() == 1 ? "" : "s",
                         p.skipped.empty() ? ""
                                           : fmt::format(" and leave {} that are no longer "
                                                         "metadata",
                                                         p.skipped.size()));
    case Action::kAdopted:
      return "adopt the change made outside the mount and re-baseline the journal";
    case Action::kRefused:
      return "refuse to open it (EIO): " + p.detail;
  }
  return "?";
}

std::string VerdictLine(const store::OfflineDecision& d) {
  const store::Verification& v = d.verification;
  const std::string& path = v.image.path;
  if (!Damaged(d)) {
    if (d.plan.action == Action::kBaseline) {
      return fmt::format(
          "{}: {}: a first open would {}", path,
          v.image.protection == store::Protection::kUnprotected ? "UNPROTECTED" : "not journaled",
          WouldDo(d));
    }
    const size_t pending = Pending(v);
    return fmt::format("{}: clean: {} units match the journal{}", path, v.units.size(),
                       pending == 0 ? ""
                                    : fmt::format(" ({} hold the content a pending write "
                                                  "replaces, which is legitimate)",
                                                  pending));
  }
  std::vector<std::string> what;
  if (v.differing > 0) {
    what.push_back(
        fmt::format("{} of {} units differ from the journal", v.differing, v.units.size()));
  }
  const std::vector<std::string> problems = Problems(v);
  if (!problems.empty()) {
    what.push_back(
        fmt::format("the storage's {} metadata is invalid ({}{})",
                    v.parser ? std::string(v.parser->Name()) : "image", problems[0],
                    problems.size() > 1 ? fmt::format(" and {} more", problems.size() - 1) : ""));
  }
  std::string joined;
  for (const std::string& w : what) joined += (joined.empty() ? "" : "; ") + w;
  return fmt::format("{}: DAMAGED: {}; a first open would {}", path, joined, WouldDo(d));
}

void PrintDifferences(const store::OfflineDecision& d) {
  const store::Verification& v = d.verification;
  Table t({"KIND", "OFFSET", "LENGTH", "RESULT", "JOURNAL HASH", "STORAGE HASH"},
          {false, true, true, false, false, false});
  for (const UnitCheck& c : v.units) {
    if (!Differs(c)) continue;
    const store::MetadataUnit& u = c.journaled.unit;
    t.Row({std::string(store::UnitKindName(u.kind)), std::to_string(u.offset),
           std::to_string(u.length), std::string(store::UnitResultName(c.result)),
           Hex(c.journaled.hash),
           c.result == UnitCheck::Result::kMissing ? "-" : Hex(c.storage_hash)});
  }
  if (!t.empty()) t.Print("  ");
  constexpr size_t kShown = 5;
  const std::vector<std::string> problems = Problems(v);
  for (size_t i = 0; i < problems.size() && i < kShown; ++i) {
    std::printf("  format problem: %s\n", problems[i].c_str());
  }
  if (problems.size() > kShown) {
    std::printf("  ... and %zu more format problems (--json lists them)\n",
                problems.size() - kShown);
  }
  if (v.changed_outside && v.differing > 0) {
    std::printf("  changed outside the mount: %s\n", v.change_reason.c_str());
  }
}

Json DecisionJson(const store::OfflineDecision& d) {
  const store::Verification& v = d.verification;
  Json differing = Json::array();
  for (const UnitCheck& c : v.units) {
    if (!Differs(c)) continue;
    Json u = UnitJson(c.journaled.unit);
    u["result"] = store::UnitResultName(c.result);
    u["journal_hash"] = Hex(c.journaled.hash);
    u["storage_hash"] =
        c.result == UnitCheck::Result::kMissing ? Json(nullptr) : Json(Hex(c.storage_hash));
    differing.push_back(u);
  }
  return {{"image", v.image.path},
          {"format", v.parser ? std::string(v.parser->Name()) : v.image.format},
          {"verdict", Damaged(d) ? "damaged" : "clean"},
          {"units_checked", v.units.size()},
          {"pending", Pending(v)},
          {"differing", differing},
          {"problems", Problems(v)},
          {"changed_outside", v.changed_outside},
          {"change_reason", v.change_reason},
          {"first_open",
           {{"action", d.unprotectable ? "unprotected" : store::ActionName(d.plan.action)},
            {"detail", d.plan.detail},
            {"restore", UnitsJson(d.plan.restore)},
            {"skipped", UnitsJson(d.plan.skipped)}}}};
}

}  // namespace vmetafs::meta_restore
