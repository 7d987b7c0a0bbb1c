#include "store/history.h"

#include <fmt/format.h>

#include <charconv>
#include <ctime>
#include <map>
#include <tuple>

#include "store/offline.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kFirstUnixSecondsNumber = 1000000000;  // 2001-09-09T01:46:40Z
constexpr int64_t kNsPerSecond = 1000000000;

// A cursor over the text of a point in time.
class Cursor {
 public:
  explicit Cursor(std::string_view s) : s_(s) {}
  bool AtEnd() const { return i_ == s_.size(); }
  bool Eat(char c) {
    if (AtEnd() || s_[i_] != c) return false;
    ++i_;
    return true;
  }
  bool EatAny(std::string_view chars) {
    if (AtEnd() || chars.find(s_[i_]) == std::string_view::npos) return false;
    ++i_;
    return true;
  }
  // Exactly `n` decimal digits.
  bool Digits(int n, int* out) {
    int v = 0;
    for (int k = 0; k < n; ++k, ++i_) {
      if (AtEnd() || s_[i_] < '0' || s_[i_] > '9') return false;
      v = v * 10 + (s_[i_] - '0');
    }
    *out = v;
    return true;
  }
  // A fraction of a second after the decimal point, as nanoseconds (1 to 9 digits).
  bool Fraction(int64_t* ns) {
    int64_t v = 0, scale = kNsPerSecond;
    size_t start = i_;
    while (!AtEnd() && s_[i_] >= '0' && s_[i_] <= '9' && i_ - start < 9) {
      scale /= 10;
      v += (s_[i_++] - '0') * scale;
    }
    *ns = v;
    return i_ > start;
  }

 private:
  std::string_view s_;
  size_t i_ = 0;
};

bool ParseIso(std::string_view text, int64_t* time_ns) {
  Cursor c(text);
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  int64_t frac = 0, offset_s = 0;
  if (!c.Digits(4, &year) || !c.Eat('-') || !c.Digits(2, &month) || !c.Eat('-') ||
      !c.Digits(2, &day)) {
    return false;
  }
  if (c.EatAny("Tt ")) {
    if (!c.Digits(2, &hour) || !c.Eat(':') || !c.Digits(2, &minute)) return false;
    if (c.Eat(':') && !c.Digits(2, &second)) return false;
    if (c.EatAny(".,") && !c.Fraction(&frac)) return false;
  }
  if (!c.EatAny("Zz") && !c.AtEnd()) {
    const int sign = c.Eat('-') ? -1 : (c.Eat('+') ? 1 : 0);
    int zh = 0, zm = 0;
    if (sign == 0 || !c.Digits(2, &zh)) return false;
    c.Eat(':');
    if (!c.Digits(2, &zm)) return false;
    offset_s = sign * (zh * 3600 + zm * 60);
  }
  if (!c.AtEnd() || month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 ||
      second > 60) {
    return false;
  }
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  const time_t t = timegm(&tm);
  *time_ns = (static_cast<int64_t>(t) - offset_s) * kNsPerSecond + frac;
  return true;
}

bool ParseNumber(std::string_view text, uint64_t* out) {
  if (text.empty()) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return ec == std::errc() && end == text.data() + text.size();
}

bool ParseUnixSeconds(std::string_view text, int64_t* time_ns) {
  const size_t dot = text.find('.');
  uint64_t seconds = 0;
  if (!ParseNumber(text.substr(0, dot), &seconds) || seconds > (1ull << 40)) return false;
  int64_t frac = 0;
  if (dot != std::string_view::npos) {
    Cursor c(text.substr(dot + 1));
    if (!c.Fraction(&frac) || !c.AtEnd()) return false;
  }
  *time_ns = static_cast<int64_t>(seconds) * kNsPerSecond + frac;
  return true;
}

// "@S[.F]", or a bare S[.F] from 2001 on (smaller bare numbers are sequence numbers), or ISO 8601.
bool ParseTime(std::string_view text, int64_t* time_ns) {
  if (text.starts_with("@")) return ParseUnixSeconds(text.substr(1), time_ns);
  if (ParseUnixSeconds(text, time_ns)) {
    return *time_ns >= static_cast<int64_t>(kFirstUnixSecondsNumber) * kNsPerSecond;
  }
  return ParseIso(text, time_ns);
}

using UnitKey = std::tuple<uint16_t, uint64_t>;

// Picks the version of one unit in force at `point`. Loads history only when the latest
// version is newer than the point.
Status ChooseVersion(const Journal& journal, uint64_t image_id, const UnitVersion& latest,
                     const PointInTime& point, VersionChoice* c) {
  c->unit = latest.unit;
  c->versions = 1;
  if (point.Includes(latest)) {
    c->choice = VersionChoice::Choice::kCurrent;  // decided against the storage later
    c->chosen = latest;  // its content is loaded only if it is to be written
    return Status::Ok();
  }
  std::vector<UnitVersion> older;
  VMETAFS_RETURN_IF_ERROR(journal.UnitHistory(image_id, latest.unit, &older));
  c->versions += older.size();
  for (UnitVersion& v : older) {  // newest first
    if (point.Includes(v)) {
      c->chosen = std::move(v);
      c->choice = VersionChoice::Choice::kCurrent;
      return Status::Ok();
    }
  }
  // The ring holds the unit's whole life only while it is not full.
  c->choice = older.size() < journal.options().history_versions ? VersionChoice::Choice::kBornLater
                                                                : VersionChoice::Choice::kAgedOut;
  return Status::Ok();
}

// Compares the chosen versions with the storage: kCurrent when equal, kWrite (for now) if not.
Status CompareWithStorage(const Journal& journal, uint64_t image_id, const ImageFile& file,
                          const ProgressFn& progress, std::vector<VersionChoice>* units) {
  std::vector<MetadataUnit> read;
  std::vector<VersionChoice*> owners;
  for (VersionChoice& c : *units) {
    if (c.choice != VersionChoice::Choice::kCurrent) continue;
    read.push_back(c.chosen.unit);
    owners.push_back(&c);
  }
  size_t next = 0;
  return ReadUnits(file, read, progress, [&](const MetadataUnit&, std::span<const uint8_t> b) {
    VersionChoice& c = *owners[next++];
    c.storage_hash = b.empty() ? 0 : ContentHash(b);
    if (!b.empty() && c.storage_hash == c.chosen.hash) {
      c.chosen.content.clear();  // not needed: nothing to lay over or write
      return Status::Ok();
    }
    c.choice = VersionChoice::Choice::kWrite;
    if (!c.chosen.content.empty()) return Status::Ok();
    return journal.GetUnit(image_id, c.chosen.unit, &c.chosen);  // the latest version
  });
}

std::string UnitName(const MetadataUnit& u) {
  return fmt::format("{} at {}", UnitKindName(u.kind), u.offset);
}

// Parses the storage with the chosen versions laid over it, and decides which of them to write.
Status CheckView(const ImageRecord& image, const ImageFile& file, const ParseLimits& limits,
                 VersionPlan* plan) {
  OverlayImageFile overlay(file);
  std::map<UnitKey, const VersionChoice*> journaled;
  for (const VersionChoice& c : plan->units) {
    journaled.emplace(UnitKey{c.unit.extent, c.unit.offset}, &c);
    if (c.choice != VersionChoice::Choice::kWrite) continue;
    const std::string& b = c.chosen.content;
    overlay.Add(c.chosen.unit.extent, c.chosen.unit.offset,
                std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
  }
  const FormatParser* parser = FormatByName(image.format);
  if (parser == nullptr) parser = DetectFormat(overlay);
  if (parser == nullptr) {
    plan->problems.push_back("the image as of " + plan->point.ToString() +
                             " is not recognised as any format");
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(parser->Parse(overlay, limits, &plan->view));
  plan->problems = plan->view.problems;
  if (plan->view.valid()) {
    VMETAFS_RETURN_IF_ERROR(parser->Check(overlay, plan->view, limits, &plan->problems));
  }
  for (VersionChoice& c : plan->units) {
    if (c.choice != VersionChoice::Choice::kWrite) continue;
    const MetadataUnit* in_view = plan->view.map.Find(c.chosen.unit.extent, c.chosen.unit.offset);
    if (in_view == nullptr || in_view->length != c.chosen.unit.length) {
      c.choice = VersionChoice::Choice::kNotReferenced;
    } else {
      ++plan->to_write;
    }
  }
  // Metadata of the view whose content at the point the journal cannot give.
  for (const MetadataUnit& u : plan->view.map.units()) {
    auto it = journaled.find(UnitKey{u.extent, u.offset});
    const bool known = it != journaled.end() && it->second->chosen.unit.length == u.length &&
                       (it->second->choice == VersionChoice::Choice::kCurrent ||
                        it->second->choice == VersionChoice::Choice::kWrite);
    if (known) continue;
    if (plan->unknown_referenced++ < 3) {
      plan->problems.push_back(fmt::format(
          "{} was metadata at {} but the journal no longer holds its content from then ({})",
          UnitName(u), plan->point.ToString(),
          it == journaled.end() ? "not journaled" : std::string(ChoiceName(it->second->choice))));
    }
  }
  return Status::Ok();
}

}  // namespace

std::string IsoTimeUtc(int64_t time_ns) {
  const int64_t secs = time_ns >= 0 ? time_ns / kNsPerSecond : (time_ns + 1) / kNsPerSecond - 1;
  const time_t t = static_cast<time_t>(secs);
  std::tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (time_ns - secs * kNsPerSecond) / 1000000);
}

std::string PointInTime::ToString() const {
  return kind == Kind::kSeq ? fmt::format("seq {}", seq) : IsoTimeUtc(time_ns);
}

Status ParsePointInTime(std::string_view text, PointInTime* out) {
  *out = PointInTime{};
  uint64_t n = 0;
  if (text.starts_with("seq:") && ParseNumber(text.substr(4), &n)) {
    out->seq = n;
    return Status::Ok();
  }
  if (ParseNumber(text, &n) && n < kFirstUnixSecondsNumber) {
    out->seq = n;
    return Status::Ok();
  }
  out->kind = PointInTime::Kind::kTime;
  if (ParseTime(text, &out->time_ns)) return Status::Ok();
  return Status::InvalidArgument(fmt::format(
      "'{}' is neither a sequence number (N or seq:N), unix seconds (@S) nor an ISO 8601 time "
      "(YYYY-MM-DDTHH:MM:SS[Z|+HH:MM])",
      text));
}

std::string_view ChoiceName(VersionChoice::Choice c) {
  switch (c) {
    case VersionChoice::Choice::kCurrent:
      return "current";
    case VersionChoice::Choice::kWrite:
      return "write";
    case VersionChoice::Choice::kNotReferenced:
      return "not-referenced";
    case VersionChoice::Choice::kBornLater:
      return "born-later";
    case VersionChoice::Choice::kAgedOut:
      return "aged-out";
  }
  return "?";
}

Status PlanRestoreToPoint(const Journal& journal, const ImageRecord& image, const ImageFile& file,
                          const ParseLimits& limits, const PointInTime& point,
                          const ProgressFn& progress, VersionPlan* plan) {
  *plan = VersionPlan{};
  plan->point = point;
  std::vector<UnitVersion> latest;
  VMETAFS_RETURN_IF_ERROR(journal.ForEachUnit(image.id, false, [&](const UnitVersion& v) {
    latest.push_back(v);
    return Status::Ok();
  }));
  if (latest.empty()) {
    plan->problems.push_back("the journal holds no units of " + image.path);
    return Status::Ok();
  }
  plan->units.resize(latest.size());
  for (size_t i = 0; i < latest.size(); ++i) {
    VMETAFS_RETURN_IF_ERROR(ChooseVersion(journal, image.id, latest[i], point, &plan->units[i]));
  }
  VMETAFS_RETURN_IF_ERROR(CompareWithStorage(journal, image.id, file, progress, &plan->units));
  VMETAFS_RETURN_IF_ERROR(CheckView(image, file, limits, plan));
  size_t later = 0;
  for (const VersionChoice& c : plan->units) later += c.choice == VersionChoice::Choice::kBornLater;
  plan->detail = fmt::format(
      "restored to the journaled versions in force at {} on request (meta-restore --at): {} units "
      "written; {} units made later left as they are",
      point.ToString(), plan->to_write, later);
  return Status::Ok();
}

Status RestoreToPoint(Journal& journal, const ImageRecord& image, ImageFile& file,
                      const ParseLimits& limits, const VersionPlan& plan,
                      const ProgressFn& progress, ReconcileStats* stats) {
  *stats = ReconcileStats{};
  if (!plan.feasible()) {
    return Status::InvalidArgument(image.path + ": the image cannot be restored to " +
                                   plan.point.ToString());
  }
  std::vector<QuarantinedUnit> contents;
  for (const VersionChoice& c : plan.units) {
    if (c.choice == VersionChoice::Choice::kWrite)
      contents.push_back({c.chosen.unit, c.chosen.content});
  }
  if (!contents.empty()) {
    std::vector<QuarantinedUnit> unwritten;
    VMETAFS_RETURN_IF_ERROR(RestoreContents(journal, image, file, std::move(contents), plan.detail,
                                            progress, &unwritten));
    if (!unwritten.empty()) {
      return Status::IoError(image.path + ": the storage refused the restored units", EIO);
    }
  }
  const FormatParser* parser = FormatByName(plan.view.format);
  ParsedImage now;
  if (parser != nullptr) VMETAFS_RETURN_IF_ERROR(parser->Parse(file, limits, &now));
  if (parser == nullptr || !now.valid()) {
    return Status::Corruption(image.path + ": the image is not valid after the restore to " +
                              plan.point.ToString() + "; the replaced bytes are in quarantine");
  }
  return CloseOffline(journal, image, file, now, nullptr, Action::kRestored, progress, stats);
}

}  // namespace vmetafs::store
