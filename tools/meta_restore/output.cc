#include "tools/meta_restore/output.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "store/history.h"
#include "tools/meta_restore/session.h"

namespace vmetafs::meta_restore {

Table::Table(std::vector<std::string> headers, std::vector<bool> right)
    : headers_(std::move(headers)), right_(std::move(right)) {
  right_.resize(headers_.size(), false);
}

void Table::Row(std::vector<std::string> cells) {
  cells.resize(headers_.size());
  rows_.push_back(std::move(cells));
}

void Table::Print(const std::string& indent) const {
  std::vector<size_t> width(headers_.size());
  for (size_t c = 0; c < headers_.size(); ++c) {
    width[c] = headers_[c].size();
    for (const auto& row : rows_) width[c] = std::max(width[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out = indent;
    for (size_t c = 0; c < cells.size(); ++c) {
      const bool last = c + 1 == cells.size();
      if (right_[c]) {
        out += fmt::format("{:>{}}", cells[c], width[c]);
      } else {
        out += last ? cells[c] : fmt::format("{:<{}}", cells[c], width[c]);
      }
      if (!last) out += "  ";
    }
    std::fputs((out + "\n").c_str(), stdout);
  };
  line(headers_);
  for (const auto& row : rows_) line(row);
}

std::string HumanBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024 && u + 1 < std::size(kUnits)) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", v, kUnits[u]);
}

std::string TimeOrDash(int64_t time_ns) { return time_ns == 0 ? "-" : store::IsoTimeUtc(time_ns); }

std::string Hex(uint64_t v) { return fmt::format("{:016x}", v); }

std::string DescribeUnits(const std::vector<store::MetadataUnit>& units) {
  if (units.empty()) return "-";
  std::map<store::UnitKind, size_t> by_kind;
  for (const store::MetadataUnit& u : units) ++by_kind[u.kind];
  std::string kinds;
  for (const auto& [kind, n] : by_kind) {
    kinds += fmt::format("{}{} {}", kinds.empty() ? "" : ", ", n, store::UnitKindName(kind));
  }
  return fmt::format("{} ({})", units.size(), kinds);
}

Json UnitJson(const store::MetadataUnit& u) {
  Json j = {{"kind", store::UnitKindName(u.kind)}, {"offset", u.offset}, {"length", u.length}};
  if (u.extent != 0) j["extent"] = u.extent;
  return j;
}

Json UnitsJson(const std::vector<store::MetadataUnit>& units) {
  Json a = Json::array();
  for (const store::MetadataUnit& u : units) a.push_back(UnitJson(u));
  return a;
}

Json EventJson(const store::Event& e) {
  return {{"seq", e.seq},
          {"time", store::IsoTimeUtc(e.time_ns)},
          {"image", e.image},
          {"action", store::ActionName(e.action)},
          {"units", UnitsJson(e.units)},
          {"detail", e.detail}};
}

void PrintJson(const Json& j) {
  std::fputs((j.dump(2) + "\n").c_str(), stdout);
  std::fflush(stdout);
}

void Warn(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "meta-restore: warning: %s\n", message.c_str());
}

int Fail(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "meta-restore: error: %s\n", message.c_str());
  return kExitError;
}

int Fail(const Status& s) { return Fail(s.message().empty() ? s.ToString() : s.message()); }

// The bar is drawn on stderr, so it is drawn only when stderr is a terminal: escape codes never
// end up in a log file or a pipe.
Progress::Progress() : enabled_(isatty(STDERR_FILENO) == 1) {}

store::ProgressFn Progress::Phase(std::string label) {
  if (!enabled_) return nullptr;
  Clear();
  label_ = std::move(label);
  last_permille_ = -1;
  return [this](uint64_t done, uint64_t total) { Draw(done, total); };
}

void Progress::Draw(uint64_t done, uint64_t total) {
  const int permille =
      total == 0 ? 1000 : static_cast<int>(std::min<uint64_t>(done, total) * 1000 / total);
  const auto now = std::chrono::steady_clock::now();
  if (permille == last_permille_ ||
      (permille < 1000 && now - last_draw_ < std::chrono::milliseconds(100))) {
    return;
  }
  last_permille_ = permille;
  last_draw_ = now;
  constexpr int kWidth = 30;
  const int filled = permille * kWidth / 1000;
  std::fprintf(stderr, "\r%s [%s%s] %3d%% %s/%s\033[K", label_.c_str(),
               std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
               permille / 10, HumanBytes(done).c_str(), HumanBytes(total).c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::Clear() {
  if (!drawn_) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
  drawn_ = false;
}

}  // namespace vmetafs::meta_restore
