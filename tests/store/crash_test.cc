// Power loss, simulated in process. The image lives in a FaultFile that keeps writes in memory
// until Sync() and can lose what was not synced (like RocksDB's fault_injection_fs); the journal's
// store directory is copied at every real fsync/fdatasync of one of its files (interposed below),
// so "power loss" restores the copy of the last sync. A qemu write sequence, recorded by diffing
// qemu-io runs, is replayed through a ProtectedImage in qemu's order (data, refcount blocks,
// refcount table, L2, L1, header, with a flush after each) and power is cut at sampled points,
// in each sync mode. After every cut the next first open must keep the guarantees of
// docs/guarantees.md.
#include <dlfcn.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include "store/formats/qcow2.h"
#include "store/protector.h"
#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

namespace fs = std::filesystem;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;

// ---- the journal's sync points: every fsync/fdatasync of a file in the watched directory ----

// While a crash test runs, durability is the snapshots' business: the real syncs are skipped.
std::atomic<bool> simulated_syncs{false};
std::mutex sync_mu;
std::string sync_dir;           // guarded by sync_mu
std::function<void()> on_sync;  // guarded by sync_mu

void AfterSync(int fd) {
  std::lock_guard<std::mutex> lock(sync_mu);
  if (!on_sync) return;
  char target[4096];
  ssize_t n = readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof target);
  if (n <= 0) return;
  std::string_view t(target, static_cast<size_t>(n));
  if (t == sync_dir || (t.starts_with(sync_dir) && t[sync_dir.size()] == '/')) on_sync();
}

}  // namespace
}  // namespace vmetafs::store

// RocksDB makes its files durable with these two calls: after each one returns, the watched
// directory as it is now is what a power loss leaves.
extern "C" int fdatasync(int fd) {
  static const auto real = reinterpret_cast<int (*)(int)>(dlsym(RTLD_NEXT, "fdatasync"));
  const int r = vmetafs::store::simulated_syncs ? 0 : real(fd);
  if (r == 0) vmetafs::store::AfterSync(fd);
  return r;
}
extern "C" int fsync(int fd) {
  static const auto real = reinterpret_cast<int (*)(int)>(dlsym(RTLD_NEXT, "fsync"));
  const int r = vmetafs::store::simulated_syncs ? 0 : real(fd);
  if (r == 0) vmetafs::store::AfterSync(fd);
  return r;
}

namespace vmetafs::store {
namespace {

std::span<const uint8_t> Bytes(const std::vector<uint8_t>& v) { return {v.data(), v.size()}; }

void Apply(std::vector<uint8_t>* to, uint64_t offset, std::span<const uint8_t> data) {
  if (offset + data.size() > to->size()) to->resize(offset + data.size());
  std::copy(data.begin(), data.end(), to->begin() + offset);
}

// The storage: writes stay volatile until Sync(); PowerLoss() keeps the synced bytes and the
// unsynced writes that `keep` picks (a disk may have written any of them back on its own).
class FaultFile : public ImageFile {
 public:
  explicit FaultFile(std::vector<uint8_t> bytes) : durable_(bytes), current_(std::move(bytes)) {}
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override {
    if (offset > current_.size() || out.size() > current_.size() - offset)
      return Status::InvalidArgument("read past the end of the file");
    std::copy_n(current_.begin() + offset, out.size(), out.begin());
    return Status::Ok();
  }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    Apply(&current_, offset, data);
    unsynced_.push_back({offset, std::vector<uint8_t>(data.begin(), data.end())});
    return Status::Ok();
  }
  Status Sync() override {
    durable_ = current_;
    unsynced_.clear();
    return Status::Ok();
  }
  Status Size(uint64_t* size) const override {
    *size = current_.size();
    return Status::Ok();
  }
  Status Identity(FileIdentity* id) const override {
    *id = FileIdentity{};
    id->size = current_.size();
    id->ino = 1;
    return Status::Ok();
  }
  void PowerLoss(const std::function<bool()>& keep) {
    current_ = durable_;
    for (const auto& [offset, data] : unsynced_)
      if (keep()) Apply(&current_, offset, Bytes(data));
    Status s = Sync();
    REQUIRE(s.ok());
  }
  const std::vector<uint8_t>& bytes() const { return current_; }

 private:
  std::vector<uint8_t> durable_, current_;
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> unsynced_;
};

ParsedImage ParseQcow2(const ImageFile& file) {
  static const Qcow2Parser parser;
  ParsedImage parsed;
  REQUIRE(parser.Parse(file, ParseLimits{}, &parsed).ok());
  return parsed;
}

// ---- the recorded qemu write sequence ----

struct Op {
  enum class Kind { kWrite, kFlush } kind = Kind::kWrite;
  uint64_t offset = 0;
  std::vector<uint8_t> data;
  int completes_step = -1;  // kFlush: the guest write (step) whose last flush this is
};

struct Step {
  uint64_t offset;
  uint32_t length;
  int pattern;
};

struct Recording {
  std::vector<uint8_t> base;
  std::vector<Op> ops;
  std::vector<Step> steps;
  std::vector<uint8_t> final_image;  // what qemu left after the last step
};

constexpr uint64_t kSector = 512;
constexpr int kSteps = 20;

// qemu's dependency order: data and refcounts before the tables that point at them.
int PhaseOf(const MetadataUnit* u) {
  if (u == nullptr) return 0;
  switch (u->kind) {
    case UnitKind::kRefcountBlock:
      return 1;
    case UnitKind::kRefcountTable:
      return 2;
    case UnitKind::kL2Table:
      return 3;
    case UnitKind::kL1Table:
      return 4;
    default:
      return 5;
  }
}

// The writes that turn `prev` into `next`, phase by phase with a flush after each phase. Tables
// qemu writes whole (L2, refcount blocks) are written whole; everything else by differing sectors.
void AppendDiff(const std::vector<uint8_t>& prev, const std::vector<uint8_t>& next, int step,
                std::vector<Op>* ops) {
  const ParsedImage parsed = ParseQcow2(MemoryImageFile(next));
  REQUIRE(parsed.valid());
  REQUIRE(next.size() >= prev.size());
  auto byte_at = [](const std::vector<uint8_t>& v, uint64_t i) { return i < v.size() ? v[i] : 0; };
  auto differs = [&](uint64_t off) {
    for (uint64_t i = off; i < off + kSector; ++i)
      if (byte_at(prev, i) != byte_at(next, i)) return true;
    return false;
  };
  std::vector<Op> phases[6];
  std::set<uint64_t> whole_units;
  const uint64_t end = std::max(prev.size(), next.size());
  for (uint64_t off = 0; off < end; off += kSector) {
    if (!differs(off)) continue;
    auto touched = parsed.map.Touching(0, off, kSector);
    const MetadataUnit* u = touched.empty() ? nullptr : &touched.front();
    const int phase = PhaseOf(u);
    if (phase == 1 || phase == 3) {
      if (whole_units.insert(u->offset).second) {
        Op op{Op::Kind::kWrite, u->offset, {next.begin() + u->offset, next.begin() + u->end()}, -1};
        phases[phase].push_back(std::move(op));
      }
      continue;
    }
    std::vector<Op>& list = phases[phase];
    const uint64_t len = std::min<uint64_t>(kSector, next.size() - off);
    const bool joins = !list.empty() && list.back().offset + list.back().data.size() == off &&
                       (u == nullptr || list.back().offset >= u->offset);  // within one unit
    if (!joins) list.push_back(Op{Op::Kind::kWrite, off, {}, -1});
    list.back().data.insert(list.back().data.end(), next.begin() + off, next.begin() + off + len);
  }
  for (std::vector<Op>& list : phases) {
    if (list.empty()) continue;
    for (Op& op : list) ops->push_back(std::move(op));
    ops->emplace_back().kind = Op::Kind::kFlush;
  }
  ops->back().completes_step = step;
}

// Allocating writes spread over a 4 GiB image with 4 KiB clusters and 64-bit refcounts: every
// step needs a new L2 table, and every few steps a new refcount block.
const Recording& QemuRecording() {
  static const Recording rec = [] {
    ScratchDir dir;
    Recording r;
    const std::string img = dir.File("rec.qcow2");
    Run("qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=64 " + img + " 4G");
    Run("qemu-io -c 'write -P 0x01 0 128k' " + img);
    r.base = ReadFile(img);
    std::vector<uint8_t> prev = r.base;
    for (int k = 1; k <= kSteps; ++k) {
      Step s{k * (160ull << 20) + k * (64ull << 10), 256u << 10, 0x10 + k};
      Run(fmt::format("qemu-io -c 'write -P {} {} {}' {}", s.pattern, s.offset, s.length, img));
      std::vector<uint8_t> next = ReadFile(img);
      AppendDiff(prev, next, k - 1, &r.ops);
      r.steps.push_back(s);
      prev = std::move(next);
    }
    r.final_image = std::move(prev);
    return r;
  }();
  return rec;
}

// ---- the live run: replay with cuts ----

enum class Variant { kDropUnsynced, kKeepSome, kProcessOnly };
constexpr Variant kVariants[] = {Variant::kDropUnsynced, Variant::kKeepSome, Variant::kProcessOnly};
const char* VariantName(Variant v) {
  return v == Variant::kDropUnsynced ? "power loss, unsynced storage writes dropped"
         : v == Variant::kKeepSome   ? "power loss, some unsynced storage writes kept"
                                     : "process crash, the OS keeps everything";
}

struct Cut {
  std::string where;        // for messages
  size_t storage_ops = 0;   // storage log entries before the cut
  std::string power_dir;    // the store as a power loss leaves it (copy of the last sync)
  std::string process_dir;  // the store as a process crash leaves it
  uint64_t t = 0;           // logical time: storage writes made
  uint64_t t_flushed = 0;   // logical time of the last guest flush that returned
  uint64_t t_storage_synced = 0;
  uint64_t t_journal_synced = 0;  // periodic mode: the last explicit journal sync
  int steps_flushed = 0;          // guest writes whose last flush returned
  int steps_journal_synced = 0;   // periodic mode: guest writes flushed by the last journal sync
};

// What the image held, unit by unit, over logical time.
struct Timeline {
  std::vector<std::vector<MetadataUnit>> maps;                          // map at time t
  std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> hist;  // offset -> (t, hash)

  void Record(const FaultFile& file) {
    const std::vector<uint8_t>& image = file.bytes();
    const ParsedImage parsed = ParseQcow2(file);
    REQUIRE(parsed.valid());
    const uint64_t t = maps.size();
    maps.push_back(parsed.map.units());
    for (const MetadataUnit& u : parsed.map.units()) {
      const uint64_t h = ContentHash({image.data() + u.offset, u.length});
      auto& h_list = hist[u.offset];
      if (h_list.empty() || h_list.back().second != h) h_list.emplace_back(t, h);
    }
  }
  // The contents the unit at `offset` had at some time in [from, to].
  std::set<uint64_t> HashesBetween(uint64_t offset, uint64_t from, uint64_t to) const {
    std::set<uint64_t> out;
    auto it = hist.find(offset);
    if (it == hist.end()) return out;
    uint64_t before = 0;
    bool have_before = false;
    for (const auto& [t, h] : it->second) {
      if (t <= from) {
        before = h;
        have_before = true;
      } else if (t <= to) {
        out.insert(h);
      }
    }
    if (have_before) out.insert(before);
    return out;
  }
};

struct ModeRun {
  explicit ModeRun(SyncMode m) : mode(m) {}
  SyncMode mode;
  ScratchDir dir;
  std::string store = dir.File("store");
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> storage_log;  // empty data: a Sync
  std::vector<Cut> cuts;
  Timeline timeline;
  int periodic_every = 5;  // kPeriodic: an explicit journal sync after this many ops
};

ProtectorOptions OptionsFor(SyncMode mode, const std::string& store) {
  ProtectorOptions o;
  o.store_dir = store;
  o.journal.backing = "crash-test-backing";
  o.journal.sync = mode;
  o.journal.periodic_ms = 3600 * 1000;  // never on its own: the test syncs explicitly
  return o;
}

size_t CutsPerMode() {
  const char* env = std::getenv("VMETAFS_CRASH_CUTS");
  return env ? std::strtoul(env, nullptr, 10) : 48;
}

void Replay(ModeRun& run) {
  const Recording& rec = QemuRecording();
  FaultFile logical(rec.base);  // every write, never a power loss
  run.timeline.Record(logical);
  Cut state;
  int snapshots = 0;
  std::string last_snapshot;
  std::set<std::string> kept;  // snapshots a cut refers to
  {
    std::lock_guard<std::mutex> lock(sync_mu);
    sync_dir = run.store;
    on_sync = [&] {
      std::string snap = run.dir.File("sync-" + std::to_string(++snapshots));
      fs::copy(run.store, snap, fs::copy_options::recursive);
      if (!last_snapshot.empty() && !kept.count(last_snapshot)) fs::remove_all(last_snapshot);
      last_snapshot = snap;
    };
  }
  // Cut points, sampled: after an op (2i), and inside a flush between the storage's fsync and
  // the journal's completion of it (2i + 1).
  std::vector<size_t> after, inside;
  for (size_t i = 0; i < rec.ops.size(); ++i) {
    after.push_back(2 * i);
    if (rec.ops[i].kind == Op::Kind::kFlush) inside.push_back(2 * i + 1);
  }
  std::set<size_t> chosen;
  std::mt19937 rng(static_cast<uint32_t>(run.mode) * 7919 + 17);
  for (std::vector<size_t>* points : {&after, &inside}) {
    std::shuffle(points->begin(), points->end(), rng);
    points->resize(std::min(points->size(), CutsPerMode() / 2));
    chosen.insert(points->begin(), points->end());
  }
  auto maybe_cut = [&](size_t point, const std::string& where) {
    if (!chosen.count(point)) return;
    Cut c = state;
    c.where = where;
    c.storage_ops = run.storage_log.size();
    c.power_dir = last_snapshot;
    kept.insert(last_snapshot);
    c.process_dir = run.dir.File("process-" + std::to_string(run.cuts.size()));
    fs::copy(run.store, c.process_dir, fs::copy_options::recursive);
    run.cuts.push_back(c);
  };

  std::unique_ptr<Protector> protector;
  REQUIRE(Protector::Open(OptionsFor(run.mode, run.store), &protector).ok());
  auto owned = std::make_unique<FaultFile>(rec.base);
  FaultFile* file = owned.get();
  std::shared_ptr<ProtectedImage> image;
  OpenDecision d;
  REQUIRE(protector->OpenFirst("disk.qcow2", std::move(owned), &image, &d).ok());
  REQUIRE(d.action == Action::kBaseline);
  for (size_t i = 0; i < rec.ops.size(); ++i) {
    const Op& op = rec.ops[i];
    const std::string where = fmt::format("op {} of {}", i + 1, rec.ops.size());
    if (op.kind == Op::Kind::kWrite) {
      REQUIRE(image
                  ->Write(op.offset, Bytes(op.data),
                          [&] {
                            run.storage_log.emplace_back(op.offset, op.data);
                            Status s = file->WriteAt(op.offset, Bytes(op.data));
                            REQUIRE(logical.WriteAt(op.offset, Bytes(op.data)).ok());
                            run.timeline.Record(logical);
                            ++state.t;
                            return s;
                          })
                  .ok());
    } else {
      REQUIRE(image
                  ->Flush([&] {
                    run.storage_log.emplace_back(0, std::vector<uint8_t>{});
                    Status s = file->Sync();
                    state.t_storage_synced = state.t;
                    maybe_cut(2 * i + 1, where + ", between the storage's fsync and the journal");
                    return s;
                  })
                  .ok());
      state.t_flushed = state.t;
      if (op.completes_step >= 0) state.steps_flushed = op.completes_step + 1;
    }
    if (run.mode == SyncMode::kPeriodic && (i + 1) % run.periodic_every == 0) {
      REQUIRE(protector->journal().Sync().ok());
      state.t_journal_synced = state.t;
      state.steps_journal_synced = state.steps_flushed;
    }
    maybe_cut(2 * i, "after " + where);
  }
  {
    std::lock_guard<std::mutex> lock(sync_mu);
    on_sync = nullptr;
  }
  // The replay rebuilt qemu's image exactly (qemu may leave zeros past what was written).
  std::vector<uint8_t> expected = rec.final_image;
  const size_t size = logical.bytes().size();
  REQUIRE(size <= expected.size());
  REQUIRE(std::all_of(expected.begin() + size, expected.end(), [](uint8_t b) { return b == 0; }));
  expected.resize(size);
  REQUIRE(logical.bytes() == expected);
  REQUIRE(image->Release().ok());
  image.reset();
  REQUIRE(protector->Close().ok());
}

// ---- after the cut: the next first open ----

// The logical time whose unit contents the journal must hold after the cut, and the oldest a
// restore may write back (docs/guarantees.md): what the storage's last fsync made durable
// (sync=flush), everything (sync=write, or a crash of the process alone), what the last
// periodic sync covered (sync=periodic).
uint64_t Floor(SyncMode mode, Variant v, const Cut& c) {
  if (v == Variant::kProcessOnly || mode == SyncMode::kWrite) return c.t;
  return mode == SyncMode::kFlush ? c.t_storage_synced : c.t_journal_synced;
}
// The guest writes that must read back: those whose flush returned, unless the storage was
// damaged after a power loss in periodic mode (then the journal's view as of its last sync is
// all there is to restore).
int StepsDurable(SyncMode mode, Variant v, bool damage, const Cut& c) {
  return damage && mode == SyncMode::kPeriodic && v != Variant::kProcessOnly
             ? c.steps_journal_synced
             : c.steps_flushed;
}
// What the storage itself holds durably: its last fsync, or everything after a process crash.
uint64_t StorageFloor(Variant v, const Cut& c) {
  return v == Variant::kProcessOnly ? c.t : c.t_storage_synced;
}

std::vector<uint8_t> StorageAfter(const ModeRun& run, const Cut& cut, Variant v, uint32_t seed) {
  FaultFile f(QemuRecording().base);
  for (size_t i = 0; i < cut.storage_ops; ++i) {
    const auto& [offset, data] = run.storage_log[i];
    REQUIRE((data.empty() ? f.Sync() : f.WriteAt(offset, Bytes(data))).ok());
  }
  std::mt19937 rng(seed);
  if (v == Variant::kDropUnsynced) f.PowerLoss([] { return false; });
  if (v == Variant::kKeepSome) f.PowerLoss([&] { return rng() % 2 == 0; });
  return f.bytes();
}

// The guest's view: healthy for qemu (leaks allowed) and holding every write that is durable.
void CheckGuestData(const std::vector<uint8_t>& bytes, int steps) {
  ScratchDir dir;
  const std::string img = dir.File("after.qcow2");
  Run("truncate -s 0 " + img);
  testing::WriteFileAt(img, 0, bytes);
  const int rc = std::system(("qemu-img check -q -f qcow2 " + img + " >/dev/null 2>&1").c_str());
  INFO("qemu-img check exit " << WEXITSTATUS(rc) << " (0 clean, 3 leaks only)");
  CHECK((WEXITSTATUS(rc) == 0 || WEXITSTATUS(rc) == 3));
  std::string cmd = "qemu-io -r -f qcow2 -c 'read -P 1 0 128k'";
  for (int k = 0; k < steps; ++k) {
    const Step& s = QemuRecording().steps[k];
    cmd += fmt::format(" -c 'read -P {} {} {}'", s.pattern, s.offset, s.length);
  }
  Run(cmd + " " + img);  // qemu-io exits 1 when a pattern does not match
}

struct Tally {
  std::map<std::string, int> seen;  // "variant: action" -> count
  int opens = 0;
};

void CheckCut(const ModeRun& run, const Cut& cut, Variant v, bool damage, uint32_t seed,
              Tally* tally) {
  INFO("cut " << cut.where << "; " << VariantName(v) << (damage ? "; then L1 zeroed" : ""));
  const uint64_t floor = Floor(run.mode, v, cut);
  ScratchDir dir;
  const std::string store = dir.File("store");
  fs::copy(v == Variant::kProcessOnly ? cut.process_dir : cut.power_dir, store,
           fs::copy_options::recursive);
  std::unique_ptr<Protector> protector;
  REQUIRE(Protector::Open(OptionsFor(run.mode, store), &protector).ok());
  ImageRecord record;
  REQUIRE(protector->journal().FindImage("disk.qcow2", &record).ok());
  // Nothing durable is missing from the journal: each unit as of the floor, or a later version.
  for (const MetadataUnit& u : run.timeline.maps[floor]) {
    INFO(UnitKindName(u.kind) << " at " << u.offset << ", floor t=" << floor
                              << ", cut t=" << cut.t);
    UnitVersion got;
    REQUIRE(protector->journal().GetUnit(record.id, u, &got).ok());
    CHECK(run.timeline.HashesBetween(u.offset, floor, cut.t).count(got.hash) == 1);
  }

  auto owned = std::make_unique<FaultFile>(StorageAfter(run, cut, v, seed));
  FaultFile* file = owned.get();
  if (damage) {
    const ParsedImage parsed = ParseQcow2(*file);
    for (const MetadataUnit& u : parsed.map.units())
      if (u.kind == UnitKind::kL1Table)
        REQUIRE(file->WriteAt(u.offset, std::vector<uint8_t>(u.length)).ok());
    REQUIRE(file->Sync().ok());
  }
  const std::vector<uint8_t> before = file->bytes();
  std::shared_ptr<ProtectedImage> image;
  OpenDecision d;
  Status s = protector->OpenFirst("disk.qcow2", std::move(owned), &image, &d);
  INFO("decision " << ActionName(d.action) << ": " << d.detail);
  REQUIRE(s.ok());
  ++tally->opens;
  ++tally->seen[fmt::format("{}{}: {}", VariantName(v), damage ? ", L1 zeroed" : "",
                            ActionName(d.action))];
  if (damage) {
    REQUIRE(d.action == Action::kRestored);
    // A restore never writes back a version older than the floor.
    for (const MetadataUnit& u : d.units) {
      INFO("restored " << UnitKindName(u.kind) << " at " << u.offset);
      const uint64_t h = ContentHash({file->bytes().data() + u.offset, u.length});
      CHECK(run.timeline.HashesBetween(u.offset, floor, cut.t).count(h) == 1);
    }
  } else {
    // A crash that left the storage intact changes nothing, in every mode: leaked clusters of an
    // allocation in flight are no reason to restore, and a storage newer than the journal (its
    // unsynced tail lost) is adopted, never rolled back to the journal's view.
    REQUIRE((d.action == Action::kVerified || d.action == Action::kAdopted));
    REQUIRE(file->bytes() == before);
    const uint64_t durable = StorageFloor(v, cut);
    for (const MetadataUnit& u : run.timeline.maps[durable]) {
      INFO(UnitKindName(u.kind) << " at " << u.offset
                                << " older than the storage's durable t=" << durable);
      const uint64_t h = ContentHash({file->bytes().data() + u.offset, u.length});
      CHECK(run.timeline.HashesBetween(u.offset, durable, cut.t).count(h) == 1);
    }
  }
  CheckGuestData(file->bytes(), StepsDurable(run.mode, v, damage, cut));
  REQUIRE(image->Release().ok());
  image.reset();
  REQUIRE(protector->Close().ok());
}

void RunMode(SyncMode mode, const char* name) {
  simulated_syncs = true;
  struct Restore {
    ~Restore() { simulated_syncs = false; }
  } restore;
  ModeRun run(mode);
  Replay(run);
  Tally tally;
  for (size_t i = 0; i < run.cuts.size(); ++i) {
    for (Variant v : kVariants)
      CheckCut(run, run.cuts[i], v, false, static_cast<uint32_t>(i), &tally);
    if (i % 4 == 0) CheckCut(run, run.cuts[i], Variant::kDropUnsynced, true, 0, &tally);
  }
  std::string summary;
  for (const auto& [what, n] : tally.seen) summary += fmt::format("\n  {}: {}", what, n);
  std::printf("crash test, sync=%s: %zu ops replayed, %zu cut points, %d first opens:%s\n", name,
              QemuRecording().ops.size(), run.cuts.size(), tally.opens, summary.c_str());
}

TEST_CASE("power loss with sync=flush loses nothing the storage flushed", "[crash]") {
  RunMode(SyncMode::kFlush, "flush");
}

TEST_CASE("power loss with sync=write loses nothing written", "[crash]") {
  RunMode(SyncMode::kWrite, "write");
}

TEST_CASE("power loss with sync=periodic loses at most what followed the last sync", "[crash]") {
  RunMode(SyncMode::kPeriodic, "periodic");
}

}  // namespace
}  // namespace vmetafs::store
