// meta-restore history and quarantine: an image's decisions, and the bytes its restores replaced.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <map>

#include "tools/meta_restore/commands.h"
#include "tools/meta_restore/output.h"

namespace vmetafs::meta_restore {
namespace {

// The events of the image now at `path`, and of former journals of that path (replaced by an
// import or a rename, or deleted by gc: their events stay). NotFound when there are none.
Status ImageEvents(Session& s, const std::string& path, std::vector<store::Event>* out) {
  out->clear();
  store::ImageRecord record;
  Status found = s.journal().FindImage(path, &record);
  if (!found.ok() && !found.IsNotFound()) return found;
  std::vector<store::Event> all;
  VMETAFS_RETURN_IF_ERROR(s.journal().AllEvents(&all));
  std::map<uint64_t, bool> live;  // image id -> still has a record
  for (store::Event& e : all) {
    if (found.ok() && e.image_id == record.id) {
      out->push_back(std::move(e));
      continue;
    }
    if (e.image != path) continue;
    if (!live.count(e.image_id)) {
      store::ImageRecord other;
      Status g = s.journal().GetImage(e.image_id, &other);
      if (!g.ok() && !g.IsNotFound()) return g;
      live[e.image_id] = g.ok();
    }
    if (!live[e.image_id]) out->push_back(std::move(e));
  }
  if (!found.ok() && out->empty()) return s.FindImage(path, &record);  // its NotFound message
  return Status::Ok();
}

uint64_t QuarantinedBytes(const std::vector<store::QuarantinedUnit>& q) {
  uint64_t n = 0;
  for (const auto& u : q) n += u.bytes.size();
  return n;
}

std::string LocalImagePath(Session& s, const std::string& path) {
  const std::string spec = s.BackingSpec();
  if (spec.empty() || spec.starts_with("nfs://")) return "IMAGE_ON_BACKING";
  return spec + "/" + path;
}

// Writes the quarantined units into a sparse file, each at its original offset.
Status WriteSparse(const std::string& output, const std::vector<store::QuarantinedUnit>& q) {
  int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return PosixError("creating " + output, errno);
  uint64_t end = 0;
  Status s;
  for (const store::QuarantinedUnit& u : q) {
    if (u.unit.extent != 0 || !s.ok()) continue;
    end = std::max(end, u.unit.offset + u.bytes.size());
    size_t done = 0;
    while (done < u.bytes.size() && s.ok()) {
      ssize_t n = ::pwrite(fd, u.bytes.data() + done, u.bytes.size() - done,
                           static_cast<off_t>(u.unit.offset + done));
      if (n < 0 && errno != EINTR) s = PosixError("writing " + output, errno);
      if (n > 0) done += static_cast<size_t>(n);
    }
  }
  if (s.ok() && ::ftruncate(fd, static_cast<off_t>(end)) != 0) {
    s = PosixError("sizing " + output, errno);
  }
  if (s.ok() && ::fsync(fd) != 0) s = PosixError("syncing " + output, errno);
  ::close(fd);
  return s;
}

int Extract(Session& s, const std::string& path, const std::vector<store::Event>& events,
            const QuarantineOptions& o) {
  auto it = std::find_if(events.begin(), events.end(),
                         [&](const store::Event& e) { return e.seq == o.extract_event; });
  if (it == events.end()) {
    return Fail(fmt::format("event {} is not an event of {} (see `meta-restore history {}`)",
                            o.extract_event, path, path));
  }
  std::vector<store::QuarantinedUnit> q;
  if (Status st = s.journal().Quarantine(it->seq, &q); !st.ok()) return Fail(st);
  if (q.empty()) return Fail(fmt::format("event {} of {} quarantined nothing", it->seq, path));
  if (Status st = WriteSparse(o.output, q); !st.ok()) return Fail(st);
  Json ranges = Json::array();
  for (const auto& u : q) ranges.push_back(UnitJson(u.unit));
  if (s.options().json) {
    PrintJson({{"event", it->seq}, {"image", path}, {"output", o.output}, {"ranges", ranges}});
    return kExitOk;
  }
  std::printf(
      "wrote %s: the %zu units event %lu (%s, %s) replaced, each at its original "
      "offset\n",
      o.output.c_str(), q.size(), static_cast<unsigned long>(it->seq),
      std::string(store::ActionName(it->action)).c_str(), TimeOrDash(it->time_ns).c_str());
  std::printf("to undo that restore, with the image not in use (unmounted), copy them back:\n");
  const std::string target = LocalImagePath(s, path);
  for (const auto& u : q) {
    if (u.unit.extent != 0) {
      Warn(fmt::format("unit at {} of extent {} is not in {} (multi-file image)", u.unit.offset,
                       u.unit.extent, o.output));
      continue;
    }
    std::printf(
        "  dd if=%s of=%s bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes "
        "conv=notrunc skip=%lu seek=%lu count=%zu   # %s\n",
        o.output.c_str(), target.c_str(), static_cast<unsigned long>(u.unit.offset),
        static_cast<unsigned long>(u.unit.offset), u.bytes.size(),
        std::string(store::UnitKindName(u.unit.kind)).c_str());
  }
  return kExitOk;
}

}  // namespace

int HistoryCommand(const GlobalOptions& g, const std::string& image) {
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kReadOnly, "history", false, &s); !st.ok()) {
    return Fail(st);
  }
  const std::string path = s->ImagePath(image);
  std::vector<store::Event> events;
  if (Status st = ImageEvents(*s, path, &events); !st.ok()) return Fail(st);
  Json out = Json::array();
  Table t({"SEQ", "TIME", "ACTION", "UNITS", "DETAIL"}, {true});
  for (const store::Event& e : events) {
    Json j = EventJson(e);
    if (e.action == store::Action::kRestored) {
      std::vector<store::QuarantinedUnit> q;
      if (Status st = s->journal().Quarantine(e.seq, &q); !st.ok()) return Fail(st);
      j["quarantined_units"] = q.size();
    }
    out.push_back(j);
    t.Row({std::to_string(e.seq), TimeOrDash(e.time_ns), std::string(store::ActionName(e.action)),
           DescribeUnits(e.units), e.detail});
  }
  if (g.json) {
    PrintJson(out);
  } else if (t.empty()) {
    std::printf("%s: no events\n", path.c_str());
  } else {
    t.Print();
  }
  return kExitOk;
}

int QuarantineCommand(const GlobalOptions& g, const QuarantineOptions& o) {
  std::unique_ptr<Session> s;
  if (Status st = Session::Open(g, Session::Mode::kReadOnly, "quarantine", false, &s); !st.ok()) {
    return Fail(st);
  }
  const std::string path = s->ImagePath(o.image);
  std::vector<store::Event> events;
  if (Status st = ImageEvents(*s, path, &events); !st.ok()) return Fail(st);
  if (o.extract_event != 0) return Extract(*s, path, events, o);
  Json out = Json::array();
  Table t({"EVENT", "TIME", "ACTION", "UNITS", "BYTES"}, {true, false, false, false, true});
  for (const store::Event& e : events) {
    std::vector<store::QuarantinedUnit> q;
    if (Status st = s->journal().Quarantine(e.seq, &q); !st.ok()) return Fail(st);
    if (q.empty()) continue;
    std::vector<store::MetadataUnit> units;
    for (const auto& u : q) units.push_back(u.unit);
    Json j = EventJson(e);
    j["quarantined"] = UnitsJson(units);
    j["bytes"] = QuarantinedBytes(q);
    out.push_back(j);
    t.Row({std::to_string(e.seq), TimeOrDash(e.time_ns), std::string(store::ActionName(e.action)),
           DescribeUnits(units), std::to_string(QuarantinedBytes(q))});
  }
  if (g.json) {
    PrintJson(out);
  } else if (t.empty()) {
    std::printf("%s: nothing in quarantine\n", path.c_str());
  } else {
    t.Print();
    std::printf("extract one with: meta-restore quarantine %s --extract EVENT -o FILE\n",
                path.c_str());
  }
  return kExitOk;
}

}  // namespace vmetafs::meta_restore
