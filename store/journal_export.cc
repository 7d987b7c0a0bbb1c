#include "store/journal_export.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <tuple>

#include "store/coding.h"

namespace vmetafs::store {
namespace {

enum class Section : uint32_t {
  kHeader = 1,
  kRecord = 2,
  kVersion = 3,
  kEvent = 4,
  kQuarantine = 5,
  kEnd = 65535,
};
constexpr size_t kMagicSize = 8;
constexpr size_t kSectionHead = 12;  // type u32 + length u64
constexpr size_t kSectionTail = 8;   // checksum

uint64_t Hash(std::string_view s) {
  return ContentHash(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

// ---- encoding ----

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U16(uint16_t v) { PutBe16(&out_, v); }
  void U32(uint32_t v) { PutBe32(&out_, v); }
  void U64(uint64_t v) { PutBe64(&out_, v); }
  void I64(int64_t v) { PutBe64(&out_, static_cast<uint64_t>(v)); }
  void Str(std::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  void Unit(const MetadataUnit& u) {
    U64(u.offset);
    U32(u.length);
    U16(u.extent);
    U8(static_cast<uint8_t>(u.kind));
    U8(u.moves_map ? 1 : 0);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class FileWriter {
 public:
  FileWriter() {
    out_.append(kExportMagic, kMagicSize);
    PutBe32(&out_, kExportVersion);
  }
  void Add(Section type, const std::string& payload) {
    const size_t start = out_.size();
    PutBe32(&out_, static_cast<uint32_t>(type));
    PutBe64(&out_, payload.size());
    out_ += payload;
    PutBe64(&out_, Hash(std::string_view(out_).substr(start)));
    ++sections_;
  }
  std::string Finish() {
    Writer end;
    end.U64(sections_);
    end.U64(Hash(out_));
    Add(Section::kEnd, end.Take());
    return std::move(out_);
  }

 private:
  std::string out_;
  uint64_t sections_ = 0;
};

std::string EncodeRecord(const ImageRecord& r) {
  Writer w;
  w.Str(r.path);
  w.Str(r.format);
  w.U64(r.virtual_size);
  w.U64(r.identity.size);
  w.I64(r.identity.mtime_ns);
  w.I64(r.identity.ctime_ns);
  w.U64(r.identity.ino);
  w.U64(r.identity.change_attr);
  w.U8(r.in_use ? 1 : 0);
  w.U8(static_cast<uint8_t>(r.protection));
  w.Str(r.unprotected_reason);
  w.U64(r.flush_epoch);
  w.U64(r.last_seq);
  w.I64(r.last_check_ns);
  w.Str(r.last_check);
  return w.Take();
}

std::string EncodeVersion(const JournalExport::Version& ev) {
  const UnitVersion& v = ev.version;
  Writer w;
  w.U8(ev.latest ? 1 : 0);
  w.Unit(v.unit);
  w.U64(v.seq);
  w.U64(v.epoch);
  w.U64(v.hash);
  w.U64(v.prev_hash);
  w.U8(v.has_prev ? 1 : 0);
  w.I64(v.time_ns);
  w.Str(v.content);
  return w.Take();
}

std::string EncodeEvent(const Event& e) {
  Writer w;
  w.U64(e.seq);
  w.I64(e.time_ns);
  w.Str(e.image);
  w.U8(static_cast<uint8_t>(e.action));
  w.U32(static_cast<uint32_t>(e.units.size()));
  for (const MetadataUnit& u : e.units) w.Unit(u);
  w.Str(e.detail);
  return w.Take();
}

std::string EncodeQuarantine(uint64_t event_seq, const QuarantinedUnit& q) {
  Writer w;
  w.U64(event_seq);
  w.Unit(q.unit);
  w.Str(q.bytes);
  return w.Take();
}

// ---- decoding ----

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool U8(uint8_t* v) {
    return Fixed(1, [&](const uint8_t* p) { *v = p[0]; });
  }
  bool U16(uint16_t* v) {
    return Fixed(2, [&](const uint8_t* p) { *v = LoadBe16(p); });
  }
  bool U32(uint32_t* v) {
    return Fixed(4, [&](const uint8_t* p) { *v = LoadBe32(p); });
  }
  bool U64(uint64_t* v) {
    return Fixed(8, [&](const uint8_t* p) { *v = LoadBe64(p); });
  }
  bool I64(int64_t* v) {
    uint64_t u = 0;
    if (!U64(&u)) return false;
    *v = static_cast<int64_t>(u);
    return true;
  }
  bool Bool(bool* v) {
    uint8_t b = 0;
    if (!U8(&b) || b > 1) return false;
    *v = b == 1;
    return true;
  }
  bool Str(std::string* s) {
    uint32_t n = 0;
    if (!U32(&n) || in_.size() - pos_ < n) return false;
    s->assign(in_.substr(pos_, n));
    pos_ += n;
    return true;
  }
  bool Unit(MetadataUnit* u) {
    uint8_t kind = 0;
    return U64(&u->offset) && U32(&u->length) && U16(&u->extent) && U8(&kind) &&
           Bool(&u->moves_map) && u->length > 0 && (u->kind = static_cast<UnitKind>(kind), true);
  }
  bool Done() const { return pos_ == in_.size(); }

 private:
  template <typename F>
  bool Fixed(size_t n, F&& f) {
    if (in_.size() - pos_ < n) return false;
    f(reinterpret_cast<const uint8_t*>(in_.data() + pos_));
    pos_ += n;
    return true;
  }
  std::string_view in_;
  size_t pos_ = 0;
};

bool DecodeHeader(std::string_view payload, JournalExport* e) {
  Reader r(payload);
  uint32_t flags = 0;
  if (!r.Str(&e->image_path) || !r.Str(&e->backing) || !r.I64(&e->exported_ns) ||
      !r.U32(&e->history_versions) || !r.U32(&flags) || !r.Done()) {
    return false;
  }
  e->with_quarantine = flags & 1;
  return !e->image_path.empty();
}

bool DecodeRecord(std::string_view payload, ImageRecord* rec) {
  Reader r(payload);
  uint8_t protection = 0;
  bool ok = r.Str(&rec->path) && r.Str(&rec->format) && r.U64(&rec->virtual_size) &&
            r.U64(&rec->identity.size) && r.I64(&rec->identity.mtime_ns) &&
            r.I64(&rec->identity.ctime_ns) && r.U64(&rec->identity.ino) &&
            r.U64(&rec->identity.change_attr) && r.Bool(&rec->in_use) && r.U8(&protection) &&
            r.Str(&rec->unprotected_reason) && r.U64(&rec->flush_epoch) && r.U64(&rec->last_seq) &&
            r.I64(&rec->last_check_ns) && r.Str(&rec->last_check) && r.Done() && protection <= 1;
  rec->protection = static_cast<Protection>(protection);
  return ok;
}

bool DecodeVersion(std::string_view payload, JournalExport::Version* ev) {
  Reader r(payload);
  UnitVersion& v = ev->version;
  return r.Bool(&ev->latest) && r.Unit(&v.unit) && r.U64(&v.seq) && r.U64(&v.epoch) &&
         r.U64(&v.hash) && r.U64(&v.prev_hash) && r.Bool(&v.has_prev) && r.I64(&v.time_ns) &&
         r.Str(&v.content) && r.Done() && v.content.size() == v.unit.length;
}

bool DecodeEvent(std::string_view payload, Event* e) {
  Reader r(payload);
  uint8_t action = 0;
  uint32_t n = 0;
  if (!r.U64(&e->seq) || !r.I64(&e->time_ns) || !r.Str(&e->image) || !r.U8(&action) || !r.U32(&n) ||
      action > static_cast<uint8_t>(Action::kRefused)) {
    return false;
  }
  e->action = static_cast<Action>(action);
  for (uint32_t i = 0; i < n; ++i) {
    e->units.emplace_back();
    if (!r.Unit(&e->units.back())) return false;
  }
  return r.Str(&e->detail) && r.Done();
}

bool DecodeQuarantine(std::string_view payload, uint64_t* seq, QuarantinedUnit* q) {
  Reader r(payload);
  return r.U64(seq) && r.Unit(&q->unit) && r.Str(&q->bytes) && r.Done();
}

std::string_view SectionName(uint32_t type) {
  switch (static_cast<Section>(type)) {
    case Section::kHeader:
      return "header";
    case Section::kRecord:
      return "image record";
    case Section::kVersion:
      return "unit version";
    case Section::kEvent:
      return "event";
    case Section::kQuarantine:
      return "quarantine";
    case Section::kEnd:
      return "end";
  }
  return "unknown";
}

}  // namespace

uint64_t JournalExport::ContentBytes() const {
  uint64_t n = 0;
  for (const Version& v : versions) n += v.version.content.size();
  return n;
}

std::string EncodeExport(const JournalExport& e) {
  FileWriter f;
  Writer header;
  header.Str(e.image_path);
  header.Str(e.backing);
  header.I64(e.exported_ns);
  header.U32(e.history_versions);
  header.U32(e.with_quarantine ? 1 : 0);
  f.Add(Section::kHeader, header.Take());
  f.Add(Section::kRecord, EncodeRecord(e.record));
  // Versions and events interleaved in sequence order: the order in which import replays them.
  size_t v = 0, ev = 0;
  while (v < e.versions.size() || ev < e.events.size()) {
    if (ev == e.events.size() ||
        (v < e.versions.size() && e.versions[v].version.seq < e.events[ev].seq)) {
      f.Add(Section::kVersion, EncodeVersion(e.versions[v++]));
      continue;
    }
    const Event& event = e.events[ev++];
    f.Add(Section::kEvent, EncodeEvent(event));
    if (auto q = e.quarantine.find(event.seq); q != e.quarantine.end()) {
      for (const QuarantinedUnit& u : q->second) {
        f.Add(Section::kQuarantine, EncodeQuarantine(event.seq, u));
      }
    }
  }
  return f.Finish();
}

namespace {

// Checks what the per-section checksums cannot: order, and one latest version per unit, last.
Status CheckSemantics(const JournalExport& e) {
  std::map<std::tuple<uint16_t, uint64_t>, bool> latest_seen;
  uint64_t last_seq = 0;
  for (const JournalExport::Version& v : e.versions) {
    const MetadataUnit& u = v.version.unit;
    if (v.version.seq < last_seq) return Status::Corruption("unit versions out of order");
    last_seq = v.version.seq;
    if (ContentHash(
            std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.version.content.data()),
                                     v.version.content.size())) != v.version.hash) {
      return Status::Corruption(
          fmt::format("the content of the unit at offset {} does not match its hash", u.offset));
    }
    bool& latest = latest_seen[{u.extent, u.offset}];
    if (latest) {
      return Status::Corruption(
          fmt::format("the unit at offset {} has a version after its latest", u.offset));
    }
    latest = v.latest;
  }
  for (const auto& [key, latest] : latest_seen) {
    if (!latest) {
      return Status::Corruption(
          fmt::format("the unit at offset {} has no latest version", std::get<1>(key)));
    }
  }
  return Status::Ok();
}

// Decodes one section's payload into `e`. `last_event` is the seq of the latest kEvent.
bool DecodeSection(uint32_t type, std::string_view payload, size_t index, uint64_t* last_event,
                   JournalExport* e) {
  if ((index == 0) != (type == static_cast<uint32_t>(Section::kHeader))) return false;
  if ((index == 1) != (type == static_cast<uint32_t>(Section::kRecord))) return false;
  switch (static_cast<Section>(type)) {
    case Section::kHeader:
      return DecodeHeader(payload, e);
    case Section::kRecord:
      return DecodeRecord(payload, &e->record);
    case Section::kVersion:
      e->versions.emplace_back();
      return DecodeVersion(payload, &e->versions.back());
    case Section::kEvent:
      e->events.emplace_back();
      if (!DecodeEvent(payload, &e->events.back())) return false;
      *last_event = e->events.back().seq;
      return true;
    case Section::kQuarantine: {
      uint64_t seq = 0;
      QuarantinedUnit q;
      if (!DecodeQuarantine(payload, &seq, &q) || e->events.empty() || seq != *last_event) {
        return false;
      }
      e->quarantine[seq].push_back(std::move(q));
      return true;
    }
    case Section::kEnd:
      return false;  // handled by the caller
  }
  return false;
}

}  // namespace

Status DecodeExport(std::string_view bytes, JournalExport* out) {
  *out = JournalExport{};
  auto damaged = [](const std::string& why) {
    return Status::Corruption("the export file is damaged or truncated: " + why);
  };
  if (bytes.size() < kMagicSize + 4 || bytes.substr(0, kMagicSize) != kExportMagic) {
    return Status::Corruption("not a vmetafs journal export (bad magic)");
  }
  const uint32_t version = LoadBe32(reinterpret_cast<const uint8_t*>(bytes.data() + kMagicSize));
  if (version != kExportVersion) {
    return Status::NotSupported(
        fmt::format("journal export version {} is not supported (this vmetafs reads version {})",
                    version, kExportVersion));
  }
  size_t pos = kMagicSize + 4, index = 0;
  uint64_t last_event = 0;
  while (true) {
    if (bytes.size() - pos < kSectionHead) {
      return damaged(fmt::format("it ends at byte {} without its end section", bytes.size()));
    }
    const auto* p = reinterpret_cast<const uint8_t*>(bytes.data() + pos);
    const uint32_t type = LoadBe32(p);
    const uint64_t length = LoadBe64(p + 4);
    if (length > bytes.size() - pos - kSectionHead ||
        bytes.size() - pos - kSectionHead - length < kSectionTail) {
      return damaged(fmt::format("section {} ({}) at byte {} runs past the end of the file", index,
                                 SectionName(type), pos));
    }
    std::string_view whole = bytes.substr(pos, kSectionHead + length);
    std::string_view payload = whole.substr(kSectionHead);
    const uint64_t sum = LoadBe64(p + kSectionHead + length);
    if (Hash(whole) != sum) {
      return damaged(fmt::format("section {} ({}) at byte {}: checksum mismatch", index,
                                 SectionName(type), pos));
    }
    if (type == static_cast<uint32_t>(Section::kEnd)) {
      Reader r(payload);
      uint64_t count = 0, file_hash = 0;
      if (!r.U64(&count) || !r.U64(&file_hash) || !r.Done() || count != index || index < 2) {
        return damaged("the end section does not match the sections before it");
      }
      if (Hash(bytes.substr(0, pos)) != file_hash) return damaged("whole-file checksum mismatch");
      if (pos + whole.size() + kSectionTail != bytes.size()) {
        return damaged("bytes follow the end section");
      }
      break;
    }
    if (!DecodeSection(type, payload, index, &last_event, out)) {
      return damaged(fmt::format("section {} ({}) at byte {} is malformed or out of place", index,
                                 SectionName(type), pos));
    }
    pos += whole.size() + kSectionTail;
    ++index;
  }
  return CheckSemantics(*out).Annotate("the export file is inconsistent");
}

Status WriteExportFile(const std::string& path, const JournalExport& e) {
  const std::string bytes = EncodeExport(e);
  const std::string tmp = path + ".partial";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return PosixError("creating " + tmp, errno);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = PosixError("writing " + tmp, errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    Status s = PosixError("syncing " + tmp, errno);
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = PosixError("renaming " + tmp + " to " + path, errno);
    ::unlink(tmp.c_str());
    return s;
  }
  return Status::Ok();
}

Status ReadExportFile(const std::string& path, JournalExport* out) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return PosixError("opening " + path, errno);
  std::string bytes;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = PosixError("reading " + path, errno);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    bytes.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return DecodeExport(bytes, out).Annotate(path);
}

}  // namespace vmetafs::store
