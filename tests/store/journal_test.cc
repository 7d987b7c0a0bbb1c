#include "store/journal.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <thread>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;

#define REQUIRE_OK(expr)           \
  do {                             \
    ::vmetafs::Status _s = (expr); \
    INFO(_s.ToString());           \
    REQUIRE(_s.ok());              \
  } while (0)

JournalOptions Options(std::string backing = "/srv/images", SyncMode mode = SyncMode::kFlush,
                       uint32_t history = 8) {
  JournalOptions o;
  o.backing = std::move(backing);
  o.sync = mode;
  o.history_versions = history;
  return o;
}

std::unique_ptr<Journal> OpenOk(const std::string& dir, const JournalOptions& options) {
  std::unique_ptr<Journal> j;
  REQUIRE_OK(Journal::Open(dir, options, &j));
  REQUIRE(j != nullptr);
  return j;
}

uint64_t HashOf(const std::string& s) {
  return ContentHash({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
}

MetadataUnit Unit(uint64_t offset, uint32_t length, UnitKind kind = UnitKind::kL2Table) {
  MetadataUnit u;
  u.offset = offset;
  u.length = length;
  u.kind = kind;
  return u;
}

UnitVersion Version(const MetadataUnit& u, std::string content, uint64_t epoch,
                    const UnitVersion* previous) {
  UnitVersion v;
  v.unit = u;
  v.content = std::move(content);
  v.hash = HashOf(v.content);
  v.epoch = epoch;
  if (previous != nullptr) {
    v.has_prev = true;
    v.prev_hash = previous->hash;
  }
  return v;
}

// Journals new content for `u` the way the write path does: the current version is `previous`.
UnitVersion Rewrite(Journal& j, uint64_t id, const MetadataUnit& u, std::string content) {
  ImageRecord im;
  REQUIRE_OK(j.GetImage(id, &im));
  UnitVersion prev;
  bool has_prev = j.GetUnit(id, u, &prev).ok();
  JournalBatch b;
  b.PutUnit(id, Version(u, std::move(content), im.flush_epoch, has_prev ? &prev : nullptr),
            has_prev ? &prev : nullptr);
  REQUIRE_OK(j.Write(b));
  UnitVersion now;
  REQUIRE_OK(j.GetUnit(id, u, &now));
  return now;
}

Event MakeEvent(uint64_t image_id, std::string image, Action action, std::string detail = "",
                std::vector<MetadataUnit> units = {}) {
  Event e;
  e.image_id = image_id;
  e.image = std::move(image);
  e.action = action;
  e.detail = std::move(detail);
  e.units = std::move(units);
  return e;
}

std::vector<UnitVersion> Units(const Journal& j, uint64_t id, bool with_content) {
  std::vector<UnitVersion> out;
  REQUIRE_OK(j.ForEachUnit(id, with_content, [&](const UnitVersion& v) {
    out.push_back(v);
    return Status::Ok();
  }));
  return out;
}

std::map<std::string, uintmax_t> Listing(const std::string& dir) {
  std::map<std::string, uintmax_t> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    out[e.path().filename().string()] = e.file_size();
  }
  return out;
}

TEST_CASE("images are created, found, renamed and deleted", "[journal]") {
  ScratchDir dir;
  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord a, b, found;
  REQUIRE_OK(j->CreateImage("vms/a.qcow2", &a));
  REQUIRE_OK(j->CreateImage("vms/b.qcow2", &b));
  CHECK(a.id != 0);
  CHECK(b.id != a.id);
  CHECK(j->CreateImage("vms/a.qcow2", &found).code() == Status::Code::kInvalidArgument);

  a.format = "qcow2";
  a.virtual_size = 64 << 20;
  a.identity =
      FileIdentity{.size = 196608, .mtime_ns = -5, .ctime_ns = 7, .ino = 42, .change_attr = 9};
  a.in_use = true;
  a.protection = Protection::kUnprotected;
  a.unprotected_reason = "journal disk full";
  a.last_check_ns = 1234;
  a.last_check = "baseline";
  JournalBatch batch;
  batch.PutImage(a);
  REQUIRE_OK(j->Write(batch));
  REQUIRE_OK(j->FindImage("vms/a.qcow2", &found));
  CHECK(found.id == a.id);
  CHECK(found.format == "qcow2");
  CHECK(found.virtual_size == a.virtual_size);
  CHECK(found.identity == a.identity);
  CHECK(found.in_use);
  CHECK(found.protection == Protection::kUnprotected);
  CHECK(found.unprotected_reason == a.unprotected_reason);
  CHECK(found.last_check_ns == 1234);
  CHECK(found.last_check == "baseline");

  std::vector<ImageRecord> all;
  REQUIRE_OK(j->ListImages(&all));
  REQUIRE(all.size() == 2);
  CHECK(all[0].path == "vms/a.qcow2");
  CHECK(all[1].path == "vms/b.qcow2");

  REQUIRE_OK(j->RenameImage("vms/a.qcow2", "vms/c.qcow2"));
  CHECK(j->FindImage("vms/a.qcow2", &found).IsNotFound());
  REQUIRE_OK(j->FindImage("vms/c.qcow2", &found));
  CHECK(found.id == a.id);
  CHECK(found.path == "vms/c.qcow2");
  CHECK(found.format == "qcow2");
  CHECK(j->RenameImage("vms/none.qcow2", "vms/x.qcow2").IsNotFound());
  // A record updated from a copy read before the rename keeps the journal's path.
  a.last_check = "verified";
  batch = JournalBatch();
  batch.PutImage(a);
  REQUIRE_OK(j->Write(batch));
  REQUIRE_OK(j->FindImage("vms/c.qcow2", &found));
  CHECK(found.path == "vms/c.qcow2");
  CHECK(found.last_check == "verified");
  CHECK(j->FindImage("vms/a.qcow2", &found).IsNotFound());

  REQUIRE_OK(j->DeleteImage(b.id));
  CHECK(j->FindImage("vms/b.qcow2", &found).IsNotFound());
  CHECK(j->GetImage(b.id, &found).IsNotFound());
  CHECK(j->DeleteImage(b.id).IsNotFound());
  // A write racing the deletion finds the image gone and leaves nothing behind.
  batch = JournalBatch();
  batch.PutUnit(b.id, Version(Unit(0, 512), std::string(512, 'b'), 0, nullptr), nullptr);
  CHECK(j->Write(batch).IsNotFound());
  CHECK(Units(*j, b.id, false).empty());
  REQUIRE_OK(j->ListImages(&all));
  REQUIRE(all.size() == 1);
  CHECK(all[0].id == a.id);

  // Ids are never reused, even after a restart.
  j.reset();
  j = OpenOk(dir.File("store"), Options());
  ImageRecord d;
  REQUIRE_OK(j->CreateImage("vms/b.qcow2", &d));
  CHECK(d.id > b.id);
}

TEST_CASE("renaming onto an existing image replaces it", "[journal]") {
  ScratchDir dir;
  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord a, b, found;
  REQUIRE_OK(j->CreateImage("a.img", &a));
  REQUIRE_OK(j->CreateImage("b.img", &b));
  Rewrite(*j, a.id, Unit(0, 512), std::string(512, 'a'));
  Rewrite(*j, b.id, Unit(0, 512), std::string(512, 'b'));
  Event e;
  e.image_id = b.id;
  e.image = "b.img";
  e.action = Action::kBaseline;
  REQUIRE_OK(j->AddEvent(&e));

  REQUIRE_OK(j->RenameImage("a.img", "b.img"));
  REQUIRE_OK(j->FindImage("b.img", &found));
  CHECK(found.id == a.id);
  CHECK(j->FindImage("a.img", &found).IsNotFound());
  CHECK(j->GetImage(b.id, &found).IsNotFound());
  CHECK(Units(*j, b.id, true).empty());
  REQUIRE(Units(*j, a.id, true).size() == 1);
  CHECK(Units(*j, a.id, true)[0].content == std::string(512, 'a'));
  std::vector<Event> events;
  REQUIRE_OK(j->Events(b.id, &events));
  CHECK(events.size() == 1);  // the replaced image's history stays
}

TEST_CASE("units of a real qcow2 image round-trip with and without content", "[journal]") {
  ScratchDir dir;
  std::string img = dir.File("disk.qcow2");
  Run("qemu-img create -q -f qcow2 " + img + " 64M");
  Run("qemu-io -c 'write -q -P 0x5a 0 1M' " + img);
  std::vector<uint8_t> bytes = ReadFile(img);
  const uint32_t cluster = 1u << testing::Be32At(bytes, 20);
  const uint64_t l1 = testing::Be64At(bytes, 40);
  const uint64_t refcount_table = testing::Be64At(bytes, 48);
  const uint64_t l2 = testing::Be64At(bytes, l1) & 0x00fffffffffffe00ULL;
  REQUIRE(l2 != 0);
  std::vector<MetadataUnit> units = {
      Unit(0, cluster, UnitKind::kHeader), Unit(l1, cluster, UnitKind::kL1Table),
      Unit(refcount_table, cluster, UnitKind::kRefcountTable), Unit(l2, cluster)};
  units[0].moves_map = units[1].moves_map = units[2].moves_map = true;

  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord im;
  REQUIRE_OK(j->CreateImage("disk.qcow2", &im));
  JournalBatch batch;
  for (const MetadataUnit& u : units) {
    std::string content(bytes.begin() + u.offset, bytes.begin() + u.offset + u.length);
    batch.PutUnit(im.id, Version(u, content, 0, nullptr), nullptr);
  }
  REQUIRE_OK(j->Write(batch));

  std::sort(units.begin(), units.end(),
            [](const MetadataUnit& a, const MetadataUnit& b) { return a.offset < b.offset; });
  std::vector<UnitVersion> full = Units(*j, im.id, true);
  std::vector<UnitVersion> light = Units(*j, im.id, false);
  REQUIRE(full.size() == units.size());
  REQUIRE(light.size() == units.size());
  for (size_t i = 0; i < units.size(); ++i) {
    CHECK(full[i].unit == units[i]);
    CHECK(light[i].unit == units[i]);
    CHECK(light[i].content.empty());
    CHECK(light[i].hash == full[i].hash);
    CHECK(light[i].seq == full[i].seq);
    CHECK(full[i].content == std::string(bytes.begin() + units[i].offset,
                                         bytes.begin() + units[i].offset + units[i].length));
    CHECK(full[i].hash == HashOf(full[i].content));
    CHECK_FALSE(full[i].has_prev);
    CHECK(full[i].time_ns > 0);
  }
  Journal::Usage usage;
  REQUIRE_OK(j->ImageUsage(im.id, &usage));
  CHECK(usage.units == units.size());
  CHECK(usage.bytes == units.size() * cluster);
  CHECK(j->DiskBytes() >= usage.bytes);

  int visited = 0;
  Status stop = j->ForEachUnit(im.id, false, [&](const UnitVersion&) {
    ++visited;
    return Status::NotFound("stop here");
  });
  CHECK(stop.IsNotFound());
  CHECK(visited == 1);

  UnitVersion v;
  CHECK(j->GetUnit(im.id, Unit(cluster * 1000, cluster), &v).IsNotFound());
  CHECK(Units(*j, im.id + 1, true).empty());
}

TEST_CASE("bad unit versions are refused", "[journal]") {
  ScratchDir dir;
  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord im;
  REQUIRE_OK(j->CreateImage("x.img", &im));
  UnitVersion short_content = Version(Unit(0, 512), std::string(100, 'x'), 0, nullptr);
  JournalBatch b1;
  b1.PutUnit(im.id, short_content, nullptr);
  CHECK(j->Write(b1).code() == Status::Code::kInvalidArgument);
  UnitVersion wrong_hash = Version(Unit(0, 512), std::string(512, 'x'), 0, nullptr);
  wrong_hash.hash ^= 1;
  JournalBatch b2;
  b2.PutUnit(im.id, wrong_hash, nullptr);
  CHECK(j->Write(b2).code() == Status::Code::kInvalidArgument);
  CHECK(Units(*j, im.id, false).empty());
}

TEST_CASE("the history ring keeps the newest older versions", "[journal]") {
  ScratchDir dir;
  const MetadataUnit u = Unit(65536, 4096);
  std::vector<std::string> contents;
  for (char c = 'a'; c <= 'f'; ++c) contents.emplace_back(4096, c);
  uint64_t id = 0;
  {
    auto j = OpenOk(dir.File("store"), Options("/b", SyncMode::kFlush, 3));
    ImageRecord im;
    REQUIRE_OK(j->CreateImage("h.img", &im));
    id = im.id;
    for (const std::string& c : contents) Rewrite(*j, id, u, c);
    std::vector<UnitVersion> history;
    REQUIRE_OK(j->UnitHistory(id, u, &history));
    REQUIRE(history.size() == 3);
    CHECK(history[0].content == contents[4]);
    CHECK(history[1].content == contents[3]);
    CHECK(history[2].content == contents[2]);
    CHECK(history[0].seq > history[1].seq);
    CHECK(history[1].seq > history[2].seq);
    CHECK(history[0].hash == HashOf(contents[4]));
    UnitVersion latest;
    REQUIRE_OK(j->GetUnit(id, u, &latest));
    CHECK(latest.content == contents[5]);
    CHECK(latest.prev_hash == history[0].hash);
  }
  SECTION("a smaller ring after reopen shows only its newest slots") {
    auto j = OpenOk(dir.File("store"), Options("/b", SyncMode::kFlush, 2));
    std::vector<UnitVersion> history;
    REQUIRE_OK(j->UnitHistory(id, u, &history));
    REQUIRE(history.size() == 2);
    CHECK(history[0].content == contents[4]);
    CHECK(history[1].content == contents[3]);
  }
  SECTION("a ring of zero keeps nothing") {
    auto j = OpenOk(dir.File("store"), Options("/b", SyncMode::kFlush, 0));
    std::vector<UnitVersion> history;
    Rewrite(*j, id, u, std::string(4096, 'g'));
    REQUIRE_OK(j->UnitHistory(id, u, &history));
    CHECK(history.empty());
  }
  SECTION("a previous version passed without content keeps the stored bytes") {
    auto j = OpenOk(dir.File("store"), Options("/b", SyncMode::kFlush, 3));
    UnitVersion prev;
    REQUIRE_OK(j->GetUnit(id, u, &prev));
    prev.content.clear();
    JournalBatch b;
    b.PutUnit(id, Version(u, std::string(4096, 'z'), 0, &prev), &prev);
    REQUIRE_OK(j->Write(b));
    std::vector<UnitVersion> history;
    REQUIRE_OK(j->UnitHistory(id, u, &history));
    REQUIRE(history.size() == 3);
    CHECK(history[0].content == contents[5]);
  }
}

TEST_CASE("the history ring counts versions kept, not writes", "[journal]") {
  // The write path passes no previous version while a unit is rewritten within one flush epoch;
  // the ring must still hold its N newest kept versions.
  ScratchDir dir;
  auto j = OpenOk(dir.File("store"), Options("/b", SyncMode::kFlush, 3));
  ImageRecord im;
  REQUIRE_OK(j->CreateImage("s.img", &im));
  const MetadataUnit u = Unit(0, 512);
  std::vector<std::string> contents;
  UnitVersion prev;
  for (int i = 0; i < 12; ++i) {
    contents.emplace_back(512, static_cast<char>('a' + i));
    const bool keep = i > 0 && i % 2 == 0;
    JournalBatch b;
    b.PutUnit(im.id, Version(u, contents.back(), 0, i > 0 ? &prev : nullptr),
              keep ? &prev : nullptr);
    REQUIRE_OK(j->Write(b));
    REQUIRE_OK(j->GetUnit(im.id, u, &prev));
  }
  std::vector<UnitVersion> history;
  REQUIRE_OK(j->UnitHistory(im.id, u, &history));
  REQUIRE(history.size() == 3);
  CHECK(history[0].content == contents[9]);
  CHECK(history[1].content == contents[7]);
  CHECK(history[2].content == contents[5]);

  UnitVersion wrong = prev;
  wrong.content = std::string(512, '#');  // not the content its hash names
  JournalBatch b;
  b.PutUnit(im.id, Version(u, std::string(512, 'z'), 0, &wrong), &wrong);
  CHECK(j->Write(b).code() == Status::Code::kInvalidArgument);
  UnitVersion latest;
  REQUIRE_OK(j->GetUnit(im.id, u, &latest));
  CHECK(latest.content == contents[11]);  // a refused batch changes nothing
}

TEST_CASE("a retired unit is forgotten with its history", "[journal]") {
  ScratchDir dir;
  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord im;
  REQUIRE_OK(j->CreateImage("r.img", &im));
  const MetadataUnit keep = Unit(0, 512, UnitKind::kHeader), freed = Unit(4096, 512);
  Rewrite(*j, im.id, keep, std::string(512, 'k'));
  Rewrite(*j, im.id, freed, std::string(512, '1'));
  Rewrite(*j, im.id, freed, std::string(512, '2'));
  JournalBatch b;
  b.RetireUnit(im.id, freed);
  REQUIRE_OK(j->Write(b));
  UnitVersion v;
  CHECK(j->GetUnit(im.id, freed, &v).IsNotFound());
  std::vector<UnitVersion> history;
  REQUIRE_OK(j->UnitHistory(im.id, freed, &history));
  CHECK(history.empty());
  auto left = Units(*j, im.id, true);
  REQUIRE(left.size() == 1);
  CHECK(left[0].unit == keep);

  // The cluster becomes metadata again: a fresh unit, no stale history.
  Rewrite(*j, im.id, freed, std::string(512, '3'));
  REQUIRE_OK(j->UnitHistory(im.id, freed, &history));
  CHECK(history.empty());

  REQUIRE_OK(j->DeleteUnits(im.id));
  CHECK(Units(*j, im.id, false).empty());
  REQUIRE_OK(j->GetImage(im.id, &im));  // the record stays
}

TEST_CASE("a version is pending until the guest's flush completes", "[journal]") {
  ScratchDir dir;
  const MetadataUnit u = Unit(8192, 1024);
  const std::string old_content(1024, 'o'), new_content(1024, 'n'), other(1024, '?');
  uint64_t id = 0;
  {
    auto j = OpenOk(dir.File("store"), Options());
    ImageRecord im;
    REQUIRE_OK(j->CreateImage("p.img", &im));
    id = im.id;
    CHECK(im.flush_epoch == 0);
    UnitVersion first = Rewrite(*j, id, u, old_content);
    REQUIRE_OK(j->GetImage(id, &im));
    CHECK_FALSE(first.Pending(im));  // nothing before it: only its own content is legitimate
    CHECK(first.Accepts(HashOf(old_content), im));

    REQUIRE_OK(j->CompleteFlush(id));
    REQUIRE_OK(j->GetImage(id, &im));
    CHECK(im.flush_epoch == 1);
    UnitVersion second = Rewrite(*j, id, u, new_content);
    CHECK(second.epoch == 1);
    CHECK(second.Pending(im));
    CHECK(second.Accepts(HashOf(new_content), im));
    CHECK(second.Accepts(HashOf(old_content), im));
    CHECK_FALSE(second.Accepts(HashOf(other), im));

    // An older copy of the record written later cannot move the epoch back.
    ImageRecord stale = im;
    stale.flush_epoch = 0;
    JournalBatch b;
    b.PutImage(stale);
    REQUIRE_OK(j->Write(b));
    REQUIRE_OK(j->GetImage(id, &im));
    CHECK(im.flush_epoch == 1);

    REQUIRE_OK(j->CompleteFlush(id));
    CHECK(j->CompleteFlush(id + 100).IsNotFound());
  }
  auto j = OpenOk(dir.File("store"), Options());
  ImageRecord im;
  REQUIRE_OK(j->GetImage(id, &im));
  CHECK(im.flush_epoch == 2);
  UnitVersion v;
  REQUIRE_OK(j->GetUnit(id, u, &v));
  CHECK_FALSE(v.Pending(im));
  CHECK(v.Accepts(HashOf(new_content), im));
  CHECK_FALSE(v.Accepts(HashOf(old_content), im));
}

TEST_CASE("sequence numbers grow across restarts", "[journal]") {
  ScratchDir dir;
  uint64_t id = 0, last = 0;
  {
    auto j = OpenOk(dir.File("store"), Options());
    ImageRecord im;
    REQUIRE_OK(j->CreateImage("s.img", &im));
    id = im.id;
    JournalBatch b;
    for (uint64_t off = 0; off < 4; ++off) {
      b.PutUnit(id, Version(Unit(off * 512, 512), std::string(512, char('a' + off)), 0, nullptr),
                nullptr);
    }
    REQUIRE_OK(j->Write(b));
    std::vector<UnitVersion> units = Units(*j, id, false);
    REQUIRE(units.size() == 4);
    for (size_t i = 1; i < units.size(); ++i) CHECK(units[i].seq == units[i - 1].seq + 1);
    last = units.back().seq;
    REQUIRE_OK(j->GetImage(id, &im));
    CHECK(im.last_seq == last);
    REQUIRE_OK(j->Close());
    REQUIRE_OK(j->Close());  // idempotent
    CHECK(j->Sync().code() == Status::Code::kIoError);
    CHECK(j->GetImage(id, &im).code() == Status::Code::kIoError);
  }
  auto j = OpenOk(dir.File("store"), Options());
  UnitVersion v = Rewrite(*j, id, Unit(0, 512), std::string(512, 'x'));
  CHECK(v.seq > last);
  Event e;
  e.image_id = id;
  REQUIRE_OK(j->AddEvent(&e));
  CHECK(e.seq > v.seq);
  ImageRecord im;
  REQUIRE_OK(j->GetImage(id, &im));
  CHECK(im.last_seq == v.seq);
}

TEST_CASE("events and quarantined bytes round-trip", "[journal]") {
  ScratchDir dir;
  uint64_t a_id = 0, b_id = 0, restore_seq = 0;
  std::vector<QuarantinedUnit> quarantine = {
      {Unit(0, 512, UnitKind::kHeader), std::string(512, '\0')},
      {Unit(196608, 65536, UnitKind::kL1Table), std::string(65536, '\x7f')}};
  {
    auto j = OpenOk(dir.File("store"), Options());
    ImageRecord a, b;
    REQUIRE_OK(j->CreateImage("a.qcow2", &a));
    REQUIRE_OK(j->CreateImage("b.qcow2", &b));
    a_id = a.id;
    b_id = b.id;
    Event baseline = MakeEvent(a.id, "a.qcow2", Action::kBaseline);
    REQUIRE_OK(j->AddEvent(&baseline));
    Event other =
        MakeEvent(b.id, "b.qcow2", Action::kRefused, "L1 table lost and the journal is empty");
    REQUIRE_OK(j->AddEvent(&other));
    Event restored =
        MakeEvent(a.id, "a.qcow2", Action::kRestored, "header and L1 did not match the journal",
                  {quarantine[0].unit, quarantine[1].unit});
    REQUIRE_OK(j->AddEvent(&restored, quarantine));
    restore_seq = restored.seq;
    CHECK(restored.time_ns > 0);
    REQUIRE_OK(j->DeleteImage(a.id));  // events and quarantine outlive the image
  }
  auto j = OpenOk(dir.File("store"), Options());
  std::vector<Event> events;
  REQUIRE_OK(j->Events(a_id, &events));
  REQUIRE(events.size() == 2);
  CHECK(events[0].action == Action::kBaseline);
  CHECK(events[1].action == Action::kRestored);
  CHECK(events[1].seq == restore_seq);
  CHECK(events[1].image == "a.qcow2");
  CHECK(events[1].image_id == a_id);
  CHECK(events[1].detail == "header and L1 did not match the journal");
  REQUIRE(events[1].units.size() == 2);
  CHECK(events[1].units[0] == quarantine[0].unit);
  CHECK(events[1].units[1] == quarantine[1].unit);

  REQUIRE_OK(j->AllEvents(&events));
  REQUIRE(events.size() == 3);
  CHECK(events[0].image_id == a_id);
  CHECK(events[1].image_id == b_id);
  CHECK(events[1].action == Action::kRefused);
  CHECK(events[2].seq == restore_seq);

  std::vector<QuarantinedUnit> back;
  REQUIRE_OK(j->Quarantine(restore_seq, &back));
  REQUIRE(back.size() == 2);
  CHECK(back[0].unit == quarantine[0].unit);
  CHECK(back[0].bytes == quarantine[0].bytes);
  CHECK(back[1].unit == quarantine[1].unit);
  CHECK(back[1].bytes == quarantine[1].bytes);
  REQUIRE_OK(j->Quarantine(restore_seq + 1000, &back));
  CHECK(back.empty());
}

TEST_CASE("identical quarantined bytes are stored once and read back whole", "[journal]") {
  ScratchDir dir;
  // A restore of zeroed tables: 256 identical 64 KiB units (16 MiB), and two that differ.
  std::vector<QuarantinedUnit> quarantine;
  for (uint64_t i = 0; i < 256; ++i) {
    quarantine.push_back(
        {Unit((i + 1) << 20, 65536, UnitKind::kL2Table), std::string(65536, '\0')});
  }
  quarantine.push_back({Unit(300u << 20, 65536, UnitKind::kL2Table), std::string(65536, 'a')});
  quarantine.push_back({Unit(0, 512, UnitKind::kHeader), std::string(512, '\0')});
  uint64_t seq = 0;
  {
    auto j = OpenOk(dir.File("store"), Options());
    ImageRecord a;
    REQUIRE_OK(j->CreateImage("a.qcow2", &a));
    Event restored = MakeEvent(a.id, "a.qcow2", Action::kRestored, "zeroed tables");
    REQUIRE_OK(j->AddEvent(&restored, quarantine));
    seq = restored.seq;
  }
  uintmax_t stored = 0;
  for (const auto& [name, size] : Listing(dir.File("store"))) stored += size;
  CHECK(stored < (4u << 20));  // not 16 MiB of zeros in the write-ahead log

  auto j = OpenOk(dir.File("store"), Options());
  std::vector<QuarantinedUnit> back;
  REQUIRE_OK(j->Quarantine(seq, &back));
  REQUIRE(back.size() == quarantine.size());
  std::map<uint64_t, const QuarantinedUnit*> by_offset;
  for (const QuarantinedUnit& q : back) by_offset[q.unit.offset] = &q;
  for (const QuarantinedUnit& q : quarantine) {
    REQUIRE(by_offset.count(q.unit.offset) == 1);
    CHECK(by_offset[q.unit.offset]->unit == q.unit);
    CHECK(by_offset[q.unit.offset]->bytes == q.bytes);
  }
}

TEST_CASE("action names round-trip", "[journal]") {
  for (Action a : {Action::kBaseline, Action::kVerified, Action::kRestored, Action::kAdopted,
                   Action::kRefused}) {
    Action back = Action::kVerified;
    REQUIRE(ParseAction(ActionName(a), &back));
    CHECK(back == a);
  }
  Action out;
  CHECK_FALSE(ParseAction("repaired", &out));
  CHECK(ActionName(Action::kAdopted) == "adopted");
}

TEST_CASE("a store path that is not a usable directory is a clear error", "[journal]") {
  ScratchDir dir;
  std::string file = dir.File("plain");
  std::ofstream(file) << "not a store";
  std::unique_ptr<Journal> j;
  for (bool read_only : {false, true}) {
    JournalOptions o = Options();
    o.read_only = read_only;
    Status s = Journal::Open(file, o, &j);
    CHECK(s.code() == Status::Code::kIoError);
    CHECK(s.Errno() == ENOTDIR);
    CHECK_THAT(s.message(), Catch::Contains("is not a directory"));
  }
  Status s = Journal::Open(file + "/store", Options(), &j);
  CHECK(s.code() == Status::Code::kIoError);
  CHECK(s.Errno() == ENOTDIR);
  CHECK(j == nullptr);
}

TEST_CASE("a store belongs to one backing", "[journal]") {
  ScratchDir dir;
  std::string store = dir.File("store");
  OpenOk(store, Options("/srv/a"));
  std::unique_ptr<Journal> j;
  Status s = Journal::Open(store, Options("/srv/b"), &j);
  CHECK(s.code() == Status::Code::kInvalidArgument);
  CHECK_THAT(s.message(), Catch::Contains("belongs to backing /srv/a, not /srv/b"));
  CHECK(OpenOk(store, Options(""))->backing() == "/srv/a");  // tools accept what is recorded

  // A store made without a backing (by a tool) is claimed by the first daemon naming one.
  std::string unclaimed = dir.File("unclaimed");
  CHECK(OpenOk(unclaimed, Options(""))->backing().empty());
  CHECK(OpenOk(unclaimed, Options("/srv/c"))->backing() == "/srv/c");
  CHECK(Journal::Open(unclaimed, Options("/srv/d"), &j).code() == Status::Code::kInvalidArgument);
}

// Another process holding a store: this test binary run again on the hidden test below.
class HolderProcess {
 public:
  explicit HolderProcess(const std::string& store) {
    int to[2], from[2];
    REQUIRE(pipe2(to, O_CLOEXEC) == 0);
    REQUIRE(pipe2(from, O_CLOEXEC) == 0);
    std::vector<std::string> env_strings = {"VMETAFS_HOLD_STORE=" + store};
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    std::vector<char*> envp;
    for (std::string& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {  // only async-signal-safe calls until exec
      dup2(to[0], 0);
      dup2(from[1], 1);
      execle("/proc/self/exe", "unit_tests", "[.journal_holder]", nullptr, envp.data());
      _exit(127);
    }
    close(to[0]);
    close(from[1]);
    to_child_ = to[1];
    from_child_ = from[0];
  }
  ~HolderProcess() {
    if (pid_ > 0) Finish();
  }
  pid_t pid() const { return pid_; }
  // The line the holder printed after trying to open the store ("ready ok" on success).
  std::string Ready() {
    std::string line;
    char c;
    while (read(from_child_, &c, 1) == 1) {
      if (c != '\n') {
        line += c;
      } else if (line.rfind("ready", 0) == 0) {
        return line;
      } else {
        line.clear();
      }
    }
    return line;
  }
  // Lets the holder close the store and exit; returns its exit status.
  int Finish() {
    close(to_child_);
    char buf[256];
    while (read(from_child_, buf, sizeof(buf)) > 0) {
    }
    close(from_child_);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int to_child_ = -1, from_child_ = -1;
};

TEST_CASE("holds a store until its input closes", "[.journal_holder]") {
  const char* store = std::getenv("VMETAFS_HOLD_STORE");
  REQUIRE(store != nullptr);
  std::unique_ptr<Journal> j;
  Status s = Journal::Open(store, Options(), &j);
  std::cout << "ready " << (s.ok() ? "ok" : s.ToString()) << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  REQUIRE_OK(s);
  REQUIRE_OK(j->Close());
}

TEST_CASE("a store held by another vmetafs is busy", "[journal]") {
  ScratchDir dir;
  std::string store = dir.File("store");
  std::unique_ptr<Journal> second;
  SECTION("held by this process") {
    auto j = OpenOk(store, Options());
    Status s = Journal::Open(store, Options(), &second);
    CHECK(s.IsBusy());
    CHECK(s.Errno() == EBUSY);
    CHECK_THAT(s.message(),
               Catch::Contains("in use by another vmetafs (pid " + std::to_string(getpid()) + ")"));
    CHECK_THAT(s.message(), Catch::Contains("unmount it first or use another store="));
    JournalOptions ro = Options();
    ro.read_only = true;
    OpenOk(store, ro);  // never busy
    REQUIRE_OK(j->Close());
    OpenOk(store, Options());
  }
  SECTION("held by another process") {
    HolderProcess holder(store);
    REQUIRE(holder.Ready() == "ready ok");
    Status s = Journal::Open(store, Options(), &second);
    CHECK(s.IsBusy());
    CHECK_THAT(s.message(), Catch::Contains("(pid " + std::to_string(holder.pid()) + ")"));
    CHECK(holder.Finish() == 0);
    OpenOk(store, Options());
  }
}

TEST_CASE("a read-only open works beside a writer and writes nothing", "[journal]") {
  ScratchDir dir;
  std::string store = dir.File("store");
  JournalOptions ro = Options();
  ro.read_only = true;
  std::unique_ptr<Journal> r;
  CHECK(Journal::Open(store, ro, &r).IsNotFound());
  CHECK_FALSE(std::filesystem::exists(store));

  auto w = OpenOk(store, Options());
  ImageRecord im;
  REQUIRE_OK(w->CreateImage("vm.qcow2", &im));
  const MetadataUnit u = Unit(0, 65536, UnitKind::kHeader);
  Rewrite(*w, im.id, u, std::string(65536, '1'));
  Rewrite(*w, im.id, u, std::string(65536, '2'));
  Event e = MakeEvent(im.id, "vm.qcow2", Action::kBaseline);
  REQUIRE_OK(w->AddEvent(&e));
  REQUIRE_OK(w->Sync());

  auto before = Listing(store);
  {
    r = OpenOk(store, ro);
    CHECK(r->backing() == "/srv/images");
    ImageRecord found;
    REQUIRE_OK(r->FindImage("vm.qcow2", &found));
    CHECK(found.id == im.id);
    UnitVersion v;
    REQUIRE_OK(r->GetUnit(im.id, u, &v));
    CHECK(v.content == std::string(65536, '2'));
    std::vector<UnitVersion> history;
    REQUIRE_OK(r->UnitHistory(im.id, u, &history));
    REQUIRE(history.size() == 1);
    CHECK(history[0].content == std::string(65536, '1'));
    std::vector<Event> events;
    REQUIRE_OK(r->Events(im.id, &events));
    CHECK(events.size() == 1);

    ImageRecord other;
    CHECK(r->CreateImage("new.qcow2", &other).code() == Status::Code::kNotSupported);
    JournalBatch b;
    b.PutUnit(im.id, Version(u, std::string(65536, '3'), 0, nullptr), nullptr);
    CHECK(r->Write(b).code() == Status::Code::kNotSupported);
    CHECK(r->CompleteFlush(im.id).code() == Status::Code::kNotSupported);
    CHECK(r->AddEvent(&e).code() == Status::Code::kNotSupported);
    REQUIRE_OK(r->Sync());
    REQUIRE_OK(r->Close());
  }
  CHECK(Listing(store) == before);
  JournalOptions other_backing = ro;
  other_backing.backing = "/srv/other";
  CHECK(Journal::Open(store, other_backing, &r).code() == Status::Code::kInvalidArgument);
  Rewrite(*w, im.id, u, std::string(65536, '4'));  // the writer carries on
}

TEST_CASE("every sync mode keeps what was written", "[journal]") {
  const SyncMode mode = GENERATE(SyncMode::kWrite, SyncMode::kFlush, SyncMode::kPeriodic);
  ScratchDir dir;
  std::string store = dir.File("store");
  JournalOptions o = Options("/b", mode, 4);
  o.periodic_ms = 2;
  constexpr int kThreads = 4, kRounds = 20;
  std::vector<uint64_t> ids;
  {
    auto j = OpenOk(store, o);
    for (int t = 0; t < kThreads; ++t) {
      ImageRecord im;
      REQUIRE_OK(j->CreateImage("img" + std::to_string(t), &im));
      ids.push_back(im.id);
    }
    // Catch2 assertions are not thread-safe: the writers only collect statuses.
    std::vector<Status> results(kThreads);
    std::vector<std::thread> writers;
    for (int t = 0; t < kThreads; ++t) {
      writers.emplace_back([&, t] {
        for (int round = 0; round < kRounds && results[t].ok(); ++round) {
          JournalBatch b;
          for (uint64_t off : {0, 4096}) {
            MetadataUnit u = Unit(off, 4096);
            UnitVersion prev;
            bool has = j->GetUnit(ids[t], u, &prev).ok();
            std::string content(4096, static_cast<char>('A' + round));
            b.PutUnit(ids[t], Version(u, content, 0, has ? &prev : nullptr), has ? &prev : nullptr);
          }
          results[t] = j->Write(b);
          if (results[t].ok()) results[t] = j->Sync();
          if (results[t].ok() && round % 5 == 4) results[t] = j->CompleteFlush(ids[t]);
        }
      });
    }
    for (std::thread& w : writers) w.join();
    for (const Status& s : results) REQUIRE_OK(s);
    if (mode == SyncMode::kPeriodic) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }  // the destructor stops the periodic thread and syncs
  auto j = OpenOk(store, o);
  for (uint64_t id : ids) {
    std::vector<UnitVersion> units = Units(*j, id, true);
    REQUIRE(units.size() == 2);
    for (const UnitVersion& v : units) {
      CHECK(v.content == std::string(4096, static_cast<char>('A' + kRounds - 1)));
      std::vector<UnitVersion> history;
      REQUIRE_OK(j->UnitHistory(id, v.unit, &history));
      CHECK(history.size() == 4);
    }
    ImageRecord im;
    REQUIRE_OK(j->GetImage(id, &im));
    CHECK(im.flush_epoch == kRounds / 5);
  }
}

TEST_CASE("a damaged store is reported as corruption", "[journal]") {
  ScratchDir dir;
  std::string store = dir.File("store");
  {
    auto j = OpenOk(store, Options());
    ImageRecord im;
    REQUIRE_OK(j->CreateImage("d.img", &im));
    Rewrite(*j, im.id, Unit(0, 512), std::string(512, 'd'));
  }
  std::string damaged = dir.File("damaged");
  std::filesystem::copy(store, damaged, std::filesystem::copy_options::recursive);
  std::vector<uint8_t> current_bytes = ReadFile(damaged + "/CURRENT");
  std::string current(current_bytes.begin(), current_bytes.end());
  REQUIRE(current.rfind("MANIFEST-", 0) == 0);
  std::string manifest = damaged + "/" + current.substr(0, current.find('\n'));

  SECTION("CURRENT without its newline") {
    std::ofstream(damaged + "/CURRENT", std::ios::trunc) << "MANIFEST-0000";
  }
  SECTION("CURRENT naming a MANIFEST that is gone") {
    std::ofstream(damaged + "/CURRENT", std::ios::trunc) << "MANIFEST-987654\n";
  }
  SECTION("MANIFEST with damaged records") {
    std::vector<uint8_t> bytes = ReadFile(manifest);
    REQUIRE(bytes.size() > 64);
    std::vector<uint8_t> garbage(bytes.size() / 2, 0xa5);
    testing::WriteFileAt(manifest, bytes.size() / 4, garbage);
  }
  SECTION("MANIFEST truncated in its first record") { std::filesystem::resize_file(manifest, 20); }
  for (bool read_only : {false, true}) {
    JournalOptions o = Options();
    o.read_only = read_only;
    std::unique_ptr<Journal> j;
    Status s = Journal::Open(damaged, o, &j);
    INFO(s.ToString());
    CHECK(s.IsCorruption());
    CHECK(j == nullptr);
  }
  OpenOk(store, Options());  // the original is fine
}

TEST_CASE("large contents go to blob files, and damage to tables or blobs is reported",
          "[journal]") {
  ScratchDir dir;
  std::string store = dir.File("store");
  // Incompressible contents, more than a memtable holds.
  constexpr int kUnits = 320;
  constexpr uint32_t kLength = 65536;
  std::mt19937_64 random(kUnits);
  std::vector<std::string> contents(kUnits);
  uint64_t id = 0;
  {
    auto j = OpenOk(store, Options());
    ImageRecord im;
    REQUIRE_OK(j->CreateImage("big.qcow2", &im));
    id = im.id;
    for (int first = 0; first < kUnits; first += 32) {
      JournalBatch b;
      for (int i = first; i < first + 32; ++i) {
        contents[i].resize(kLength);
        for (char& c : contents[i]) c = static_cast<char>(random());
        b.PutUnit(id, Version(Unit(uint64_t{kLength} * i, kLength), contents[i], 0, nullptr),
                  nullptr);
      }
      REQUIRE_OK(j->Write(b));
    }
    CHECK(j->DiskBytes() >= uint64_t{kUnits} * kLength);
  }
  {
    // Recovery replays the WAL and flushes what it replayed to table and blob files.
    auto j = OpenOk(store, Options());
    std::vector<UnitVersion> units = Units(*j, id, true);
    REQUIRE(units.size() == kUnits);
    for (int i = 0; i < kUnits; ++i) CHECK(units[i].content == contents[i]);
  }
  {
    auto j = OpenOk(store, Options());  // now read back from the blob files
    std::vector<UnitVersion> units = Units(*j, id, true);
    REQUIRE(units.size() == kUnits);
    for (int i = 0; i < kUnits; ++i) CHECK(units[i].content == contents[i]);
    CHECK(j->DiskBytes() >= uint64_t{kUnits} * kLength);
  }
  std::string damaged = dir.File("damaged");
  std::filesystem::copy(store, damaged, std::filesystem::copy_options::recursive);
  std::vector<std::string> blobs, tables;
  for (const auto& e : std::filesystem::directory_iterator(damaged)) {
    if (e.path().extension() == ".blob") blobs.push_back(e.path().filename());
    if (e.path().extension() == ".sst") tables.push_back(e.path().filename());
  }
  REQUIRE_FALSE(blobs.empty());
  REQUIRE_FALSE(tables.empty());
  SECTION("a truncated table file fails the open") {
    for (const std::string& t : tables) {
      std::filesystem::resize_file(damaged + "/" + t,
                                   std::filesystem::file_size(damaged + "/" + t) / 2);
    }
    std::unique_ptr<Journal> j;
    Status s = Journal::Open(damaged, Options(), &j);
    INFO(s.ToString());
    CHECK(s.IsCorruption());
  }
  SECTION("damaged blob bytes fail the read of the unit, not the process") {
    for (const std::string& b : blobs) {
      std::string path = damaged + "/" + b;
      testing::WriteFileAt(path, std::filesystem::file_size(path) / 2,
                           std::vector<uint8_t>(4096, 0));
    }
    auto j = OpenOk(damaged, Options());
    Status s = j->ForEachUnit(id, true, [](const UnitVersion&) { return Status::Ok(); });
    INFO(s.ToString());
    CHECK(s.IsCorruption());
    CHECK(Units(*j, id, false).size() == kUnits);  // the small records are intact
  }
}

}  // namespace
}  // namespace vmetafs::store
