// meta-restore verify: every journaled unit held against the storage, and what a first open
// would do about it. Reads only: works beside a live daemon.
#include <algorithm>
#include <cstdio>

#include "tools/meta_restore/commands.h"
#include "tools/meta_restore/output.h"
#include "tools/meta_restore/report.h"

namespace vmetafs::meta_restore {
namespace {

// Verifies one image; *rc is raised to what it found.
void VerifyOne(Session& s, const std::string& arg, Progress& progress, Json* out, int* rc) {
  const std::string path = s.ImagePath(arg);
  auto error = [&](const Status& st) {
    *rc = std::max(*rc, kExitError);
    if (s.options().json) {
      out->push_back({{"image", path}, {"verdict", "error"}, {"error", st.ToString()}});
    }
    Fail(st);
  };
  store::ImageRecord record;
  if (Status st = s.FindImage(path, &record); !st.ok()) return error(st);
  std::unique_ptr<store::ImageFile> file;
  if (Status st = s.OpenImage(path, false, &file); !st.ok()) return error(st);
  store::OfflineDecision d;
  Status st = store::PlanDecision(s.journal(), record, *file, s.limits(),
                                  progress.Phase("verify " + path), &d);
  progress.Clear();
  if (!st.ok()) return error(st);
  if (Damaged(d)) *rc = std::max(*rc, kExitDamage);
  if (s.options().json) {
    out->push_back(DecisionJson(d));
    return;
  }
  std::printf("%s\n", VerdictLine(d).c_str());
  PrintDifferences(d);
}

}  // namespace

int VerifyCommand(const GlobalOptions& g, const std::vector<std::string>& images) {
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kReadOnly, "verify", false, &s); !st.ok()) {
    return Fail(st);
  }
  Progress progress;
  Json out = Json::array();
  int rc = kExitOk;
  for (const std::string& arg : images) VerifyOne(*s, arg, progress, &out, &rc);
  if (g.json) PrintJson(out);
  return rc;
}

}  // namespace vmetafs::meta_restore
