#include "store/journal_codec.h"

#include <array>

#include "store/coding.h"

namespace vmetafs::store::journal_codec {

namespace {

constexpr uint8_t kUnitMovesMap = 1 << 0;
constexpr uint8_t kUnitHasPrev = 1 << 1;
// A quarantined unit whose bytes equal another unit's of the same event names that unit instead
// of holding a copy (a restore of zeroed tables replaces thousands of identical units).
constexpr uint8_t kQuarantineSameAs = 1 << 2;
constexpr uint8_t kImageInUse = 1 << 0;

void PutU8(std::string* dst, uint8_t v) { dst->push_back(static_cast<char>(v)); }
void PutString(std::string* dst, std::string_view s) {
  PutBe32(dst, static_cast<uint32_t>(s.size()));
  dst->append(s);
}

// A cursor over a record. Reads past the end set failed() instead of reading out of bounds, so
// a decoder checks once at the end.
class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}
  uint8_t U8() { return Take(1) ? Byte(-1) : 0; }
  uint16_t Be16() { return Take(2) ? LoadBe16(Ptr(-2)) : 0; }
  uint32_t Be32() { return Take(4) ? LoadBe32(Ptr(-4)) : 0; }
  uint64_t Be64() { return Take(8) ? LoadBe64(Ptr(-8)) : 0; }
  int64_t Int64() { return static_cast<int64_t>(Be64()); }
  std::string String() {
    uint32_t n = Be32();
    if (failed_ || n > s_.size() - pos_) {
      failed_ = true;
      return {};
    }
    std::string out(s_.substr(pos_, n));
    pos_ += n;
    return out;
  }
  std::string_view Rest() {
    std::string_view r = s_.substr(pos_);
    pos_ = s_.size();
    return r;
  }
  bool failed() const { return failed_; }
  // True when every byte was consumed and none was missing.
  bool Done() const { return !failed_ && pos_ == s_.size(); }

 private:
  bool Take(size_t n) {
    if (failed_ || n > s_.size() - pos_) {
      failed_ = true;
      return false;
    }
    pos_ += n;
    return true;
  }
  const uint8_t* Ptr(ptrdiff_t back) const {
    return reinterpret_cast<const uint8_t*>(s_.data()) + pos_ + back;
  }
  uint8_t Byte(ptrdiff_t back) const { return *Ptr(back); }

  std::string_view s_;
  size_t pos_ = 0;
  bool failed_ = false;
};

Status Bad(std::string_view what) {
  return Status::Corruption("malformed " + std::string(what) + " record in the journal");
}

// Checks the version byte; a newer version is a store written by a newer vmetafs.
Status CheckVersion(Reader* r, std::string_view what) {
  uint8_t v = r->U8();
  if (r->failed()) return Bad(what);
  if (v != kRecordVersion) {
    return Status::Corruption(std::string(what) + " record has unknown version " +
                              std::to_string(v));
  }
  return Status::Ok();
}

// The unit fields shared by unit, event and quarantine records: kind, flags, length. Any kind
// byte is accepted: UnitKind is append-only, and a kind this build does not know is still a unit.
void PutUnitShape(std::string* dst, const MetadataUnit& u, uint8_t flags) {
  PutU8(dst, static_cast<uint8_t>(u.kind));
  PutU8(dst, flags | (u.moves_map ? kUnitMovesMap : 0));
  PutBe32(dst, u.length);
}
bool GetUnitShape(Reader* r, MetadataUnit* u, uint8_t* flags) {
  uint8_t kind = r->U8();
  *flags = r->U8();
  u->length = r->Be32();
  u->kind = static_cast<UnitKind>(kind);
  u->moves_map = (*flags & kUnitMovesMap) != 0;
  return !r->failed() && u->length != 0 &&
         (*flags & ~(kUnitMovesMap | kUnitHasPrev | kQuarantineSameAs)) == 0;
}

Status DecodeUnitFields(Reader* r, std::string_view key, UnitVersion* v, uint64_t* history) {
  uint64_t image_id;
  if (!DecodeUnitKey(key.substr(0, kUnitKeySize), &image_id, &v->unit.extent, &v->unit.offset)) {
    return Bad("unit key");
  }
  VMETAFS_RETURN_IF_ERROR(CheckVersion(r, "unit"));
  uint8_t flags = 0;
  if (!GetUnitShape(r, &v->unit, &flags)) return Bad("unit");
  v->has_prev = (flags & kUnitHasPrev) != 0;
  v->seq = r->Be64();
  v->epoch = r->Be64();
  v->hash = r->Be64();
  v->prev_hash = r->Be64();
  v->time_ns = r->Int64();
  *history = r->Be64();
  return r->failed() ? Bad("unit") : Status::Ok();
}

}  // namespace

std::string IdPrefix(uint64_t id) {
  std::string k;
  PutBe64(&k, id);
  return k;
}

std::string ImageKey(uint64_t id, ImageTag tag) {
  std::string k = IdPrefix(id);
  PutU8(&k, static_cast<uint8_t>(tag));
  return k;
}

std::string UnitKey(uint64_t image_id, uint16_t extent, uint64_t offset) {
  std::string k = IdPrefix(image_id);
  PutBe16(&k, extent);
  PutBe64(&k, offset);
  return k;
}

std::string HistoryKey(std::string_view unit_key, uint32_t slot) {
  std::string k(unit_key);
  PutBe32(&k, slot);
  return k;
}

std::string EventKey(uint64_t image_id, uint64_t seq) {
  std::string k = IdPrefix(image_id);
  PutBe64(&k, seq);
  return k;
}

std::string QuarantineKey(uint64_t event_seq, uint16_t extent, uint64_t offset) {
  std::string k = IdPrefix(event_seq);
  PutBe16(&k, extent);
  PutBe64(&k, offset);
  return k;
}

std::string PrefixEnd(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto last = static_cast<uint8_t>(end.back());
    if (last != 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  // Only a prefix of all 0xff bytes gets here; no key the journal writes has one.
  return std::string(prefix) + '\xff';
}

bool DecodeImageKey(std::string_view key, uint64_t* id, ImageTag* tag) {
  Reader r(key);
  *id = r.Be64();
  uint8_t t = r.U8();
  *tag = static_cast<ImageTag>(t);
  return r.Done() && t <= static_cast<uint8_t>(ImageTag::kFlushEpoch);
}

bool DecodeUnitKey(std::string_view key, uint64_t* image_id, uint16_t* extent, uint64_t* offset) {
  Reader r(key);
  *image_id = r.Be64();
  *extent = r.Be16();
  *offset = r.Be64();
  return r.Done();
}

bool DecodeEventKey(std::string_view key, uint64_t* image_id, uint64_t* seq) {
  Reader r(key);
  *image_id = r.Be64();
  *seq = r.Be64();
  return r.Done();
}

std::string EncodeStore(const StoreRecord& s) {
  std::string v;
  PutU8(&v, kRecordVersion);
  PutBe32(&v, s.format_version);
  PutBe64(&v, static_cast<uint64_t>(s.created_ns));
  PutString(&v, s.backing);
  return v;
}

Status DecodeStore(std::string_view value, StoreRecord* s) {
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(CheckVersion(&r, "store"));
  s->format_version = r.Be32();
  s->created_ns = r.Int64();
  s->backing = r.String();
  return r.Done() ? Status::Ok() : Bad("store");
}

std::string EncodeCounter(uint64_t c) {
  std::string v;
  PutU8(&v, kRecordVersion);
  PutBe64(&v, c);
  return v;
}

bool DecodeCounter(std::string_view value, uint64_t* c) {
  Reader r(value);
  bool version_ok = r.U8() == kRecordVersion;
  *c = r.Be64();
  return version_ok && r.Done();
}

std::string EncodePathValue(uint64_t id) { return EncodeCounter(id); }

Status DecodePathValue(std::string_view value, uint64_t* id) {
  return DecodeCounter(value, id) ? Status::Ok() : Bad("path");
}

std::string EncodeImage(const ImageRecord& im) {
  std::string v;
  PutU8(&v, kRecordVersion);
  PutString(&v, im.path);
  PutString(&v, im.format);
  PutBe64(&v, im.virtual_size);
  PutBe64(&v, im.identity.size);
  PutBe64(&v, static_cast<uint64_t>(im.identity.mtime_ns));
  PutBe64(&v, static_cast<uint64_t>(im.identity.ctime_ns));
  PutBe64(&v, im.identity.ino);
  PutBe64(&v, im.identity.change_attr);
  PutU8(&v, im.in_use ? kImageInUse : 0);
  PutU8(&v, static_cast<uint8_t>(im.protection));
  PutString(&v, im.unprotected_reason);
  PutBe64(&v, im.flush_epoch);
  PutBe64(&v, im.last_seq);
  PutBe64(&v, static_cast<uint64_t>(im.last_check_ns));
  PutString(&v, im.last_check);
  return v;
}

Status DecodeImage(std::string_view value, ImageRecord* im) {
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(CheckVersion(&r, "image"));
  im->path = r.String();
  im->format = r.String();
  im->virtual_size = r.Be64();
  im->identity.size = r.Be64();
  im->identity.mtime_ns = r.Int64();
  im->identity.ctime_ns = r.Int64();
  im->identity.ino = r.Be64();
  im->identity.change_attr = r.Be64();
  uint8_t flags = r.U8();
  uint8_t protection = r.U8();
  im->in_use = (flags & kImageInUse) != 0;
  im->protection = static_cast<Protection>(protection);
  im->unprotected_reason = r.String();
  im->flush_epoch = r.Be64();
  im->last_seq = r.Be64();
  im->last_check_ns = r.Int64();
  im->last_check = r.String();
  if (!r.Done() || (flags & ~kImageInUse) != 0 || protection > 1) return Bad("image");
  return Status::Ok();
}

std::string EncodeUnitRecord(const UnitVersion& v, uint64_t history) {
  std::string out;
  out.reserve(kUnitRecordSize);
  PutU8(&out, kRecordVersion);
  PutUnitShape(&out, v.unit, v.has_prev ? kUnitHasPrev : 0);
  PutBe64(&out, v.seq);
  PutBe64(&out, v.epoch);
  PutBe64(&out, v.hash);
  PutBe64(&out, v.prev_hash);
  PutBe64(&out, static_cast<uint64_t>(v.time_ns));
  PutBe64(&out, history);
  return out;
}

Status DecodeUnitRecord(std::string_view key, std::string_view value, UnitVersion* v,
                        uint64_t* history) {
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(DecodeUnitFields(&r, key, v, history));
  return r.Done() ? Status::Ok() : Bad("unit");
}

Status DecodeHistoryValue(std::string_view unit_key, std::string_view value, UnitVersion* v,
                          uint64_t* history) {
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(DecodeUnitFields(&r, unit_key, v, history));
  v->content = std::string(r.Rest());
  return Status::Ok();
}

std::string EncodeEvent(const Event& e) {
  std::string v;
  PutU8(&v, kRecordVersion);
  PutBe64(&v, static_cast<uint64_t>(e.time_ns));
  PutString(&v, e.image);
  PutU8(&v, static_cast<uint8_t>(e.action));
  PutBe32(&v, static_cast<uint32_t>(e.units.size()));
  for (const MetadataUnit& u : e.units) {
    PutBe16(&v, u.extent);
    PutBe64(&v, u.offset);
    PutUnitShape(&v, u, 0);
  }
  PutString(&v, e.detail);
  return v;
}

Status DecodeEvent(std::string_view key, std::string_view value, Event* e) {
  if (!DecodeEventKey(key, &e->image_id, &e->seq)) return Bad("event key");
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(CheckVersion(&r, "event"));
  e->time_ns = r.Int64();
  e->image = r.String();
  uint8_t action = r.U8();
  uint32_t n = r.Be32();
  // Each unit takes 16 bytes: a count beyond what is left is damage, not a reason to allocate.
  if (r.failed() || action > static_cast<uint8_t>(Action::kRefused) || n > value.size() / 16) {
    return Bad("event");
  }
  e->action = static_cast<Action>(action);
  e->units.assign(n, MetadataUnit{});
  for (MetadataUnit& u : e->units) {
    u.extent = r.Be16();
    u.offset = r.Be64();
    uint8_t flags = 0;
    if (!GetUnitShape(&r, &u, &flags) || (flags & kUnitHasPrev)) return Bad("event");
  }
  e->detail = r.String();
  return r.Done() ? Status::Ok() : Bad("event");
}

std::string EncodeQuarantine(const MetadataUnit& unit, std::string_view bytes,
                             const MetadataUnit* same_as) {
  std::string v;
  PutU8(&v, kRecordVersion);
  PutUnitShape(&v, unit, same_as ? kQuarantineSameAs : 0);
  if (same_as) {
    PutBe16(&v, same_as->extent);
    PutBe64(&v, same_as->offset);
  } else {
    v.append(bytes);
  }
  return v;
}

Status DecodeQuarantine(std::string_view key, std::string_view value, QuarantineRecord* rec) {
  *rec = QuarantineRecord{};
  QuarantinedUnit* q = &rec->unit;
  Reader k(key);
  k.Be64();  // the event's seq: the caller asked for it
  q->unit.extent = k.Be16();
  q->unit.offset = k.Be64();
  if (!k.Done()) return Bad("quarantine key");
  Reader r(value);
  VMETAFS_RETURN_IF_ERROR(CheckVersion(&r, "quarantine"));
  uint8_t flags = 0;
  if (!GetUnitShape(&r, &q->unit, &flags) || flags & kUnitHasPrev) return Bad("quarantine");
  rec->same_as = (flags & kQuarantineSameAs) != 0;
  if (rec->same_as) {
    rec->same_extent = r.Be16();
    rec->same_offset = r.Be64();
    if (r.failed() || !r.Done()) return Bad("quarantine");
  } else {
    q->bytes = std::string(r.Rest());
  }
  return Status::Ok();
}

}  // namespace vmetafs::store::journal_codec

namespace vmetafs::store {

namespace {
// Indexed by Action; the words meta-restore prints and parses.
constexpr std::array<std::string_view, 5> kActionNames = {"baseline", "verified", "restored",
                                                          "adopted", "refused"};
}  // namespace

std::string_view ActionName(Action a) {
  auto i = static_cast<size_t>(a);
  return i < kActionNames.size() ? kActionNames[i] : "unknown";
}

bool ParseAction(std::string_view name, Action* out) {
  for (size_t i = 0; i < kActionNames.size(); ++i) {
    if (kActionNames[i] == name) {
      *out = static_cast<Action>(i);
      return true;
    }
  }
  return false;
}

}  // namespace vmetafs::store
