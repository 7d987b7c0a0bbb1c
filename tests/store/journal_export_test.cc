#include "store/journal_export.h"

#include <fmt/format.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "store/coding.h"
#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::ScratchDir;

#define REQUIRE_OK(expr)           \
  do {                             \
    ::vmetafs::Status _s = (expr); \
    INFO(_s.ToString());           \
    REQUIRE(_s.ok());              \
  } while (0)

std::unique_ptr<Journal> OpenStore(const std::string& dir, const std::string& backing) {
  JournalOptions o;
  o.backing = backing;
  o.history_versions = 8;
  std::unique_ptr<Journal> j;
  REQUIRE_OK(Journal::Open(dir, o, &j));
  return j;
}

MetadataUnit Unit(uint64_t offset, uint32_t length, UnitKind kind) {
  MetadataUnit u;
  u.offset = offset;
  u.length = length;
  u.kind = kind;
  u.moves_map = kind != UnitKind::kL2Table;
  return u;
}

std::string Bytes(uint32_t length, char seed) {
  std::string s(length, '\0');
  for (uint32_t i = 0; i < length; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

// Journals `content` as the unit's new latest version, the previous one going to history.
void Put(Journal& j, uint64_t id, const MetadataUnit& u, std::string content) {
  UnitVersion prev;
  const bool had = j.GetUnit(id, u, &prev).ok();
  UnitVersion v;
  v.unit = u;
  v.content = std::move(content);
  v.hash = ContentHash({reinterpret_cast<const uint8_t*>(v.content.data()), v.content.size()});
  v.has_prev = had;
  v.prev_hash = had ? prev.hash : 0;
  JournalBatch b;
  b.PutUnit(id, std::move(v), had ? &prev : nullptr);
  REQUIRE_OK(j.Write(b));
}

void AddEvent(Journal& j, const ImageRecord& im, Action a, std::vector<QuarantinedUnit> q = {}) {
  Event e;
  e.image_id = im.id;
  e.image = im.path;
  e.action = a;
  for (const QuarantinedUnit& u : q) e.units.push_back(u.unit);
  e.detail = std::string(ActionName(a)) + " in the test";
  REQUIRE_OK(j.AddEvent(&e, q));
}

// An image with a header rewritten three times, an L1 twice, an L2 once, and events between.
ImageRecord MakeImage(Journal& j, uint32_t unit_size) {
  ImageRecord im;
  REQUIRE_OK(j.CreateImage("vms/web.qcow2", &im));
  im.format = "qcow2";
  im.virtual_size = 4ull << 30;
  im.identity = FileIdentity{1 << 20, 111, 222, 333, 0};
  im.flush_epoch = 5;
  im.last_check = "verified";
  im.last_check_ns = 123456789;
  JournalBatch b;
  b.PutImage(im);
  REQUIRE_OK(j.Write(b));
  const MetadataUnit header = Unit(0, unit_size, UnitKind::kHeader);
  const MetadataUnit l1 = Unit(3 * unit_size, unit_size, UnitKind::kL1Table);
  const MetadataUnit l2 = Unit(5 * unit_size, unit_size, UnitKind::kL2Table);
  Put(j, im.id, header, Bytes(unit_size, 'a'));
  Put(j, im.id, l1, Bytes(unit_size, 'b'));
  AddEvent(j, im, Action::kBaseline);
  Put(j, im.id, header, Bytes(unit_size, 'c'));
  Put(j, im.id, l2, Bytes(unit_size, 'd'));
  AddEvent(j, im, Action::kRestored, {{l2, Bytes(unit_size, 'X')}, {l1, Bytes(unit_size, 'Y')}});
  Put(j, im.id, l1, Bytes(unit_size, 'e'));
  Put(j, im.id, header, Bytes(unit_size, 'f'));
  REQUIRE_OK(j.GetImage(im.id, &im));
  return im;
}

struct Snapshot {
  std::vector<std::string> latest;                      // content, in unit order
  std::vector<std::vector<std::string>> history;        // content, newest first
  std::vector<std::pair<std::string, int64_t>> events;  // action + time, in seq order
  std::vector<std::vector<std::string>> quarantine;     // per event
  std::vector<std::string> order;  // "v<offset>" / "e<action>" sorted by this store's seq
};

Snapshot Take(const Journal& j, const std::string& path) {
  ImageRecord im;
  REQUIRE_OK(j.FindImage(path, &im));
  Snapshot s;
  std::map<uint64_t, std::string> by_seq;
  std::vector<UnitVersion> units;
  REQUIRE_OK(j.ForEachUnit(im.id, true, [&](const UnitVersion& v) {
    units.push_back(v);
    return Status::Ok();
  }));
  for (const UnitVersion& v : units) {
    s.latest.push_back(v.content);
    by_seq[v.seq] = fmt::format("v{}", v.unit.offset);
    std::vector<UnitVersion> older;
    REQUIRE_OK(j.UnitHistory(im.id, v.unit, &older));
    s.history.emplace_back();
    for (const UnitVersion& h : older) {
      s.history.back().push_back(h.content);
      REQUIRE(h.seq < v.seq);
      by_seq[h.seq] = fmt::format("v{}", h.unit.offset);
    }
  }
  std::vector<Event> events;
  REQUIRE_OK(j.Events(im.id, &events));
  for (const Event& e : events) {
    s.events.emplace_back(std::string(ActionName(e.action)), e.time_ns);
    by_seq[e.seq] = "e" + std::string(ActionName(e.action));
    std::vector<QuarantinedUnit> q;
    REQUIRE_OK(j.Quarantine(e.seq, &q));
    s.quarantine.emplace_back();
    for (const QuarantinedUnit& u : q) s.quarantine.back().push_back(u.bytes);
  }
  for (const auto& [seq, what] : by_seq) s.order.push_back(what);
  return s;
}

void RequireSame(const Snapshot& a, const Snapshot& b) {
  CHECK(a.latest == b.latest);
  CHECK(a.history == b.history);
  CHECK(a.events == b.events);
  CHECK(a.quarantine == b.quarantine);
  CHECK(a.order == b.order);
}

std::string ExportBytes(const Journal& j, const std::string& path) {
  ImageRecord im;
  REQUIRE_OK(j.FindImage(path, &im));
  JournalExport e;
  REQUIRE_OK(CollectExport(j, im, /*with_quarantine=*/true, &e));
  return EncodeExport(e);
}

TEST_CASE("an exported journal imports into another store unchanged", "[journal_export]") {
  ScratchDir dir;
  auto a = OpenStore(dir.File("a"), "/srv/images");
  const ImageRecord im = MakeImage(*a, 512);
  const Snapshot original = Take(*a, im.path);
  REQUIRE(original.history.size() == 3);
  REQUIRE(original.order.size() == 8);  // 6 versions, 2 events

  JournalExport e;
  REQUIRE_OK(CollectExport(*a, im, true, &e));
  REQUIRE(e.versions.size() == 6);
  const std::string file = dir.File("web.vmjx");
  REQUIRE_OK(WriteExportFile(file, e));
  JournalExport decoded;
  REQUIRE_OK(ReadExportFile(file, &decoded));
  CHECK(decoded.image_path == "vms/web.qcow2");
  CHECK(decoded.backing == "/srv/images");
  CHECK(decoded.record.identity == im.identity);
  CHECK(decoded.record.format == "qcow2");
  CHECK(decoded.quarantine.size() == 1);
  CHECK(EncodeExport(decoded) == EncodeExport(e));

  // Another host's store, whose backing is named differently (an NFS URL).
  auto b = OpenStore(dir.File("b"), "nfs://filer/images");
  ImageRecord other;
  REQUIRE_OK(b->CreateImage("vms/other.qcow2", &other));
  ImportResult result;
  REQUIRE_OK(ImportJournal(*b, decoded, &result));
  CHECK_FALSE(result.replaced);
  CHECK(result.units == 3);
  CHECK(result.versions == 6);
  CHECK(result.events == 2);
  CHECK(result.quarantined == 2);
  CHECK(result.record.path == "vms/web.qcow2");
  CHECK(result.record.identity == im.identity);
  CHECK(result.record.flush_epoch == im.flush_epoch);
  CHECK(result.record.format == "qcow2");
  RequireSame(original, Take(*b, im.path));

  SECTION("importing again replaces the journal and keeps the old one's events") {
    ImportResult again;
    REQUIRE_OK(ImportJournal(*b, decoded, &again));
    CHECK(again.replaced);
    CHECK(again.replaced_id == result.record.id);
    CHECK(again.record.id != result.record.id);
    RequireSame(original, Take(*b, im.path));
    ImageRecord gone;
    CHECK(b->GetImage(result.record.id, &gone).IsNotFound());
    std::vector<Event> all;
    REQUIRE_OK(b->AllEvents(&all));
    CHECK(all.size() == 4);
    std::vector<ImageRecord> images;
    REQUIRE_OK(b->ListImages(&images));
    CHECK(images.size() == 2);  // vms/other.qcow2 and the import: no staging record left
  }
}

TEST_CASE("a damaged or truncated export is refused", "[journal_export]") {
  ScratchDir dir;
  auto a = OpenStore(dir.File("a"), "/srv/images");
  const ImageRecord im = MakeImage(*a, 64);
  const std::string bytes = ExportBytes(*a, im.path);
  JournalExport ok;
  REQUIRE_OK(DecodeExport(bytes, &ok));

  SECTION("every flipped bit is detected") {
    for (size_t i = 0; i < bytes.size(); ++i) {
      for (int bit : {0, 5}) {
        std::string damaged = bytes;
        damaged[i] = static_cast<char>(damaged[i] ^ (1 << bit));
        JournalExport out;
        Status s = DecodeExport(damaged, &out);
        INFO("byte " << i << " bit " << bit);
        REQUIRE_FALSE(s.ok());
      }
    }
  }
  SECTION("every truncation is detected, and so are trailing bytes") {
    for (size_t n = 0; n < bytes.size(); ++n) {
      JournalExport out;
      Status s = DecodeExport(std::string_view(bytes).substr(0, n), &out);
      INFO("length " << n << ": " << s.ToString());
      REQUIRE(s.IsCorruption());
    }
    JournalExport out;
    CHECK(DecodeExport(bytes + std::string(8, '\0'), &out).IsCorruption());
  }
  SECTION("a file cut short says so") {
    const std::string file = dir.File("cut.vmjx");
    std::ofstream(file, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    JournalExport out;
    Status s = ReadExportFile(file, &out);
    CHECK(s.IsCorruption());
    CHECK(s.ToString().find("truncated") != std::string::npos);
    CHECK(s.ToString().find(file) != std::string::npos);
  }
  SECTION("a section rewritten with a valid checksum still breaks the whole-file checksum") {
    // Re-checksumming one section (a deliberate edit) is caught by the kEnd hash.
    std::string edited = bytes;
    const size_t first = 12;  // the header section
    const uint64_t length = LoadBe64(reinterpret_cast<const uint8_t*>(edited.data() + first + 4));
    edited[first + 12 + length - 1] ^= 1;  // last payload byte (the flags word)
    const std::string_view whole = std::string_view(edited).substr(first, 12 + length);
    uint8_t sum[8];
    StoreBe64(sum, ContentHash({reinterpret_cast<const uint8_t*>(whole.data()), whole.size()}));
    edited.replace(first + 12 + length, 8, reinterpret_cast<const char*>(sum), 8);
    JournalExport out;
    Status s = DecodeExport(edited, &out);
    CHECK(s.IsCorruption());
    CHECK(s.ToString().find("whole-file") != std::string::npos);
  }
}

}  // namespace
}  // namespace vmetafs::store
