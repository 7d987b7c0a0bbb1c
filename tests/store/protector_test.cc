// The first-open decision table and the write path, driven without FUSE: images made by qemu-img,
// damage poked at offsets read from the image, the Protector opening them as the daemon would.
#include "store/protector.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <set>

#include "store/verifier.h"
#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::Be64At;
using testing::OpenLocalImage;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;
using testing::WriteFileAt;

constexpr uint64_t kL1OffsetField = 40;  // qcow2 header: l1_table_offset

struct Fixture {
  ScratchDir dir;
  std::string store = dir.File("store");
  std::string image = dir.File("disk.qcow2");
  std::unique_ptr<Protector> protector;

  Fixture() {
    Run("qemu-img create -q -f qcow2 " + image + " 4G");
    Run("qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 512M 64k' " + image);
    OpenProtector();
  }
  void OpenProtector() {
    ProtectorOptions o;
    o.store_dir = store;
    o.journal.backing = dir.path();
    REQUIRE(Protector::Open(o, &protector).ok());
  }
  // Opens, decides, and closes again (the last release records the identity).
  OpenDecision FirstOpen(Status* status = nullptr, std::unique_ptr<ImageFile> file = nullptr) {
    std::shared_ptr<ProtectedImage> tracked;
    OpenDecision d;
    Status s = protector->OpenFirst("disk.qcow2", file ? std::move(file) : OpenLocalImage(image),
                                    &tracked, &d);
    if (status)
      *status = s;
    else
      REQUIRE(s.ok());
    if (s.ok()) REQUIRE(tracked->Release().ok());
    return d;
  }
  // After a baseline, opens the image for writing and returns it with its L1 table's offset.
  std::shared_ptr<ProtectedImage> OpenForWrites(uint64_t* l1) {
    FirstOpen();
    std::shared_ptr<ProtectedImage> tracked;
    REQUIRE(protector->OpenFirst("disk.qcow2", OpenLocalImage(image), &tracked).ok());
    *l1 = Be64At(ReadFile(image), kL1OffsetField);
    return tracked;
  }
  // The daemon or host stops with `tracked` open: no Release, the image stays "in use".
  void Crash(std::shared_ptr<ProtectedImage>* tracked) {
    tracked->reset();
    protector.reset();
    OpenProtector();
  }
  std::vector<Event> Events() {
    ImageRecord r;
    REQUIRE(protector->journal().FindImage("disk.qcow2", &r).ok());
    std::vector<Event> events;
    REQUIRE(protector->journal().Events(r.id, &events).ok());
    return events;
  }
};

void Zero(const std::string& path, uint64_t offset, size_t n) {
  WriteFileAt(path, offset, std::vector<uint8_t>(n, 0));
}

TEST_CASE("first open baselines, then verifies", "[protector]") {
  Fixture f;
  OpenDecision d = f.FirstOpen();
  CHECK(d.is_image);
  CHECK(d.action == Action::kBaseline);
  d = f.FirstOpen();
  CHECK(d.action == Action::kVerified);
  std::vector<Event> events = f.Events();
  REQUIRE(events.size() == 2);
  CHECK(events[0].action == Action::kBaseline);
  CHECK(events[1].action == Action::kVerified);
}

TEST_CASE("damage after a clean close is restored and quarantined", "[protector]") {
  Fixture f;
  f.FirstOpen();
  Run("cp " + f.image + " " + f.dir.File("reference.qcow2"));
  const std::vector<uint8_t> bytes = ReadFile(f.image);
  const uint64_t l1 = Be64At(bytes, kL1OffsetField);
  Zero(f.image, l1, 512);  // both L1 entries gone: guest data unreachable
  OpenDecision d = f.FirstOpen();
  CHECK(d.action == Action::kRestored);
  CHECK_FALSE(d.units.empty());
  Run("qemu-img check -q " + f.image);
  Run("qemu-img compare -q " + f.dir.File("reference.qcow2") + " " + f.image);
  std::vector<Event> events = f.Events();
  std::vector<QuarantinedUnit> quarantined;
  REQUIRE(f.protector->journal().Quarantine(events.back().seq, &quarantined).ok());
  bool found = false;
  for (const Event& e : events) {
    if (e.action != Action::kRestored) continue;
    REQUIRE(f.protector->journal().Quarantine(e.seq, &quarantined).ok());
    for (const QuarantinedUnit& q : quarantined)
      found = found || q.unit.offset == (l1 & ~0xffffull);
  }
  CHECK(found);
  CHECK(f.FirstOpen().action == Action::kVerified);
}

TEST_CASE("a restore quarantines exactly what the storage held", "[protector]") {
  Fixture f;
  f.FirstOpen();
  const std::vector<uint8_t> bytes = ReadFile(f.image);
  const uint64_t l1 = Be64At(bytes, kL1OffsetField);
  constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // L1 entry: the L2 table's offset
  const uint64_t l2_first = Be64At(bytes, l1) & kOffsetMask;
  const uint64_t l2_second = Be64At(bytes, l1 + 8) & kOffsetMask;
  REQUIRE(l2_first != 0);
  REQUIRE(l2_second != 0);
  // Two alike units (zeroed tables) and a garbled one.
  Zero(f.image, l2_first, 64 << 10);
  Zero(f.image, l2_second, 64 << 10);
  WriteFileAt(f.image, l1, std::vector<uint8_t>(16, 0x5a));
  const std::vector<uint8_t> damaged = ReadFile(f.image);

  REQUIRE(f.FirstOpen().action == Action::kRestored);
  Run("qemu-img check -q " + f.image);
  const std::vector<Event> events = f.Events();
  auto restored = std::find_if(events.rbegin(), events.rend(),
                               [](const Event& e) { return e.action == Action::kRestored; });
  REQUIRE(restored != events.rend());
  std::vector<QuarantinedUnit> quarantined;
  REQUIRE(f.protector->journal().Quarantine(restored->seq, &quarantined).ok());
  std::set<uint64_t> offsets;
  for (const QuarantinedUnit& q : quarantined) {
    INFO("unit at " << q.unit.offset);
    REQUIRE(q.unit.offset + q.unit.length <= damaged.size());
    CHECK(q.bytes == std::string(damaged.begin() + q.unit.offset,
                                 damaged.begin() + q.unit.offset + q.unit.length));
    offsets.insert(q.unit.offset);
  }
  CHECK(offsets.count(l2_first));
  CHECK(offsets.count(l2_second));
  CHECK(offsets.count(l1 & ~0xffffull));
}

TEST_CASE("DistinctBytes holds alike bytes once, within its limit", "[protector]") {
  DistinctBytes held;
  const std::vector<uint8_t> zeros(4096, 0), other(4096, 7);
  const std::string_view a = held.Hold(zeros, ContentHash(zeros), 8192);
  const std::string_view b = held.Hold(zeros, ContentHash(zeros), 8192);
  CHECK(a.data() == b.data());  // one copy
  CHECK(held.bytes() == 4096);
  // The same hash with other bytes is not taken for the same content.
  const std::string_view c = held.Hold(other, ContentHash(zeros), 8192);
  CHECK(c == std::string(4096, 7));
  CHECK(held.bytes() == 8192);
  const std::vector<uint8_t> third(1, 1);
  CHECK(held.Hold(third, ContentHash(third), 8192).empty());             // past the limit: not held
  CHECK(held.Hold(zeros, ContentHash(zeros), 8192).data() == a.data());  // held already
}

TEST_CASE("a valid change made outside the mount is adopted, not reverted", "[protector]") {
  Fixture f;
  f.FirstOpen();
  Run("qemu-img resize -q " + f.image + " 6G");
  Run("qemu-img snapshot -c outside " + f.image);
  OpenDecision d = f.FirstOpen();
  CHECK(d.action == Action::kAdopted);
  CHECK(Run("qemu-img info " + f.image).find("outside") != std::string::npos);
  CHECK(Run("qemu-img info " + f.image).find("6 GiB") != std::string::npos);
  CHECK(f.FirstOpen().action == Action::kVerified);
}

TEST_CASE("outside change plus damage restores the journal's valid view", "[protector]") {
  Fixture f;
  f.FirstOpen();
  Run("cp " + f.image + " " + f.dir.File("reference.qcow2"));
  Run("touch -d '2001-01-01' " + f.image);  // identity moved: vmetafs was not the last writer
  const uint64_t l1 = Be64At(ReadFile(f.image), kL1OffsetField);
  Zero(f.image, l1, 512);  // leaked clusters: internally invalid
  OpenDecision d = f.FirstOpen();
  CHECK(d.action == Action::kRestored);
  Run("qemu-img compare -q " + f.dir.File("reference.qcow2") + " " + f.image);
}

TEST_CASE("a journaled write that never reached the storage is not a reason to restore",
          "[protector]") {
  Fixture f;
  uint64_t l1 = 0;
  std::shared_ptr<ProtectedImage> tracked = f.OpenForWrites(&l1);
  std::vector<uint8_t> entry(8, 0);  // clear the first L1 entry, as a crash would interrupt it
  REQUIRE(tracked->Write(l1, entry, [&] { return Status::Ok(); }).ok());  // daemon died here
  f.Crash(&tracked);
  CHECK(f.FirstOpen().action == Action::kVerified);
  Run("qemu-img check -q " + f.image);
}

TEST_CASE("only a write whose bytes are not read back may complete later", "[protector]") {
  Fixture f;
  uint64_t l1 = 0;
  std::shared_ptr<ProtectedImage> tracked = f.OpenForWrites(&l1);
  const std::vector<uint8_t> bytes = ReadFile(f.image);
  // The host cluster of guest offset 0, through L1[0] and its L2 table's first entry.
  constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;
  const uint64_t data = Be64At(bytes, Be64At(bytes, l1) & kOffsetMask) & kOffsetMask;
  REQUIRE(data != 0);
  int now = 0, later = 0;
  auto write_now = [&] {
    ++now;
    return Status::Ok();
  };
  auto write_later = [&] {
    ++later;
    return Status::Ok();
  };
  // Guest data: no metadata there, nothing reads it back.
  const std::vector<uint8_t> block(bytes.begin() + static_cast<ptrdiff_t>(data),
                                   bytes.begin() + static_cast<ptrdiff_t>(data + 4096));
  REQUIRE(tracked->Write(data, block, write_now, write_later).ok());
  CHECK(now == 0);
  CHECK(later == 1);
  // The L1 table (rewritten as it is): journaled first, and written before the call returns.
  const std::vector<uint8_t> entry(bytes.begin() + static_cast<ptrdiff_t>(l1),
                                   bytes.begin() + static_cast<ptrdiff_t>(l1 + 8));
  REQUIRE(tracked->Write(l1, entry, write_now, write_later).ok());
  CHECK(now == 1);
  CHECK(later == 1);
  // A plain file: a write into its first MiB may make it an image and is probed right after;
  // one further on cannot.
  const std::string plain = f.dir.File("notes.txt");
  Run("truncate -s 4M " + plain);
  WriteFileAt(plain, 0, std::vector<uint8_t>(4 << 20, 'x'));
  std::shared_ptr<ProtectedImage> notes;
  REQUIRE(f.protector->OpenFirst("notes.txt", OpenLocalImage(plain), &notes).ok());
  REQUIRE_FALSE(notes->is_image());
  REQUIRE(notes->Write(4096, block, write_now, write_later).ok());
  CHECK(now == 2);
  CHECK(later == 1);
  REQUIRE(notes->Write(2 << 20, block, write_now, write_later).ok());
  CHECK(now == 2);
  CHECK(later == 2);
  REQUIRE(notes->Release().ok());
  REQUIRE(tracked->Release().ok());
}

TEST_CASE("a unit written twice between flushes: its last flushed content is still legitimate",
          "[protector]") {
  Fixture f;
  uint64_t l1 = 0;
  std::shared_ptr<ProtectedImage> tracked = f.OpenForWrites(&l1);
  const std::vector<uint8_t> entry(8, 0);
  // Two writes to the L1 table (its first two entries cleared) with no flush between them: after
  // a power loss the storage may hold the table as before either write, or after the first.
  bool first_lands = false;
  SECTION("neither write reached the storage") { first_lands = false; }
  SECTION("only the first write reached the storage") { first_lands = true; }
  REQUIRE(tracked
              ->Write(l1, entry,
                      [&] {
                        if (first_lands) WriteFileAt(f.image, l1, entry);
                        return Status::Ok();
                      })
              .ok());
  REQUIRE(tracked->Write(l1 + 8, entry, [&] { return Status::Ok(); }).ok());  // power lost here
  f.Crash(&tracked);
  const OpenDecision d = f.FirstOpen();
  INFO(d.detail);
  CHECK(d.action == Action::kVerified);
}

TEST_CASE("journaled writes keep the map current as the image grows", "[protector]") {
  Fixture f;
  f.FirstOpen();
  std::shared_ptr<ProtectedImage> tracked;
  REQUIRE(f.protector->OpenFirst("disk.qcow2", OpenLocalImage(f.image), &tracked).ok());
  // Let qemu allocate a new L2 table elsewhere, then replay its writes through the tracker: the
  // L1 entry that now points to it must bring the new table into the journal.
  Run("cp " + f.image + " " + f.dir.File("grown.qcow2"));
  Run("qemu-io -c 'write -P 0x33 3G 64k' " + f.dir.File("grown.qcow2"));
  const std::vector<uint8_t> grown = ReadFile(f.dir.File("grown.qcow2"));
  const std::vector<uint8_t> before = ReadFile(f.image);
  // Replay every differing 512-byte sector, data first, pointers (L1, header) last.
  const uint64_t l1 = Be64At(grown, kL1OffsetField);
  std::vector<uint64_t> late;
  for (uint64_t off = 0; off < grown.size(); off += 512) {
    bool differs = off >= before.size() || std::memcmp(&grown[off], &before[off],
                                                       std::min<size_t>(512, grown.size() - off));
    if (!differs) continue;
    if (off == 0 || (off >= l1 && off < l1 + 65536)) {
      late.push_back(off);
      continue;
    }
    std::vector<uint8_t> sector(grown.begin() + off, grown.begin() + off + 512);
    REQUIRE(tracked
                ->Write(off, sector,
                        [&] {
                          WriteFileAt(f.image, off, sector);
                          return Status::Ok();
                        })
                .ok());
  }
  for (uint64_t off : late) {
    std::vector<uint8_t> sector(grown.begin() + off, grown.begin() + off + 512);
    REQUIRE(tracked
                ->Write(off, sector,
                        [&] {
                          WriteFileAt(f.image, off, sector);
                          return Status::Ok();
                        })
                .ok());
  }
  REQUIRE(tracked->Flush([] { return Status::Ok(); }).ok());
  REQUIRE(tracked->Release().ok());
  tracked.reset();
  Run("cp " + f.image + " " + f.dir.File("reference.qcow2"));
  // Zero every L2 table the image now has, including the new one.
  const std::vector<uint8_t> now = ReadFile(f.image);
  for (uint64_t i = 0; i < 8; ++i) {
    const uint64_t l2 = Be64At(now, l1 + 8 * i) & 0x00fffffffffffe00ull;
    if (l2) Zero(f.image, l2, 65536);
  }
  CHECK(f.FirstOpen().action == Action::kRestored);
  Run("qemu-img compare -q " + f.dir.File("reference.qcow2") + " " + f.image);
  Run("qemu-img check -q " + f.image);
}

// An ImageFile whose storage refuses writes, as a read-only export does.
class ReadOnlyFile : public ImageFile {
 public:
  explicit ReadOnlyFile(std::unique_ptr<ImageFile> base) : base_(std::move(base)) {}
  Status ReadAt(uint64_t o, std::span<uint8_t> out) const override { return base_->ReadAt(o, out); }
  Status WriteAt(uint64_t, std::span<const uint8_t>) override {
    return Status::IoError("write refused", EROFS);
  }
  Status Sync() override { return Status::Ok(); }
  Status Size(uint64_t* s) const override { return base_->Size(s); }
  Status Identity(FileIdentity* id) const override { return base_->Identity(id); }

 private:
  std::unique_ptr<ImageFile> base_;
};

TEST_CASE("a restore the storage refuses is served from the journal", "[protector]") {
  Fixture f;
  f.FirstOpen();
  const std::vector<uint8_t> good = ReadFile(f.image);
  const uint64_t l1 = Be64At(good, kL1OffsetField);
  Zero(f.image, l1, 512);
  std::shared_ptr<ProtectedImage> tracked;
  REQUIRE(f.protector
              ->OpenFirst("disk.qcow2", std::make_unique<ReadOnlyFile>(OpenLocalImage(f.image)),
                          &tracked)
              .ok());
  std::vector<uint8_t> buf(512, 0xee);
  tracked->PatchRead(l1, buf);
  CHECK(std::memcmp(buf.data(), &good[l1], 512) == 0);
  CHECK(Be64At(ReadFile(f.image), l1) == 0);  // the storage itself was not written
}

TEST_CASE("an image with an absurd header opens unprotected", "[protector]") {
  Fixture f;
  std::vector<uint8_t> l1_size = {0x7f, 0xff, 0xff, 0xff};
  WriteFileAt(f.image, 36, l1_size);
  OpenDecision d = f.FirstOpen();
  CHECK(d.is_image);
  CHECK_FALSE(d.has_action);
}

TEST_CASE("a plain file is passed through untracked", "[protector]") {
  Fixture f;
  Run("head -c 100000 /dev/urandom > " + f.dir.File("notes.bin"));
  std::shared_ptr<ProtectedImage> tracked;
  OpenDecision d;
  REQUIRE(f.protector->OpenFirst("notes.bin", OpenLocalImage(f.dir.File("notes.bin")), &tracked, &d)
              .ok());
  CHECK_FALSE(d.is_image);
  CHECK_FALSE(tracked->is_image());
}

}  // namespace
}  // namespace vmetafs::store
