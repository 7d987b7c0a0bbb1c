// qcow2 parser tests: images made by qemu-img/qemu-io, units recomputed here from the images' own
// fields, damage poked at offsets read from the images' structures.
#include "store/formats/qcow2.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::Be32At;
using testing::Be64At;
using testing::OpenLocalImage;
using testing::ReadFile;
using testing::Run;
using testing::ScratchDir;
using testing::WriteFileAt;

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;

const Qcow2Parser kParser;

ParsedImage ParseFile(const std::string& path, const ParseLimits& limits = {}) {
  auto file = OpenLocalImage(path);
  ParsedImage parsed;
  Status st = kParser.Parse(*file, limits, &parsed);
  INFO(st.ToString());
  REQUIRE(st.ok());
  CHECK(parsed.format == "qcow2");
  return parsed;
}

std::vector<std::string> CheckFile(const std::string& path, const ParseLimits& limits = {}) {
  auto file = OpenLocalImage(path);
  ParsedImage parsed = ParseFile(path, limits);
  std::vector<std::string> problems;
  Status st = kParser.Check(*file, parsed, limits, &problems);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return problems;
}

bool Mentions(const std::vector<std::string>& problems, const std::string& needle) {
  for (const std::string& p : problems) {
    if (p.find(needle) != std::string::npos) return true;
  }
  return false;
}

uint64_t Align8(uint64_t n) { return (n + 7) / 8 * 8; }
uint16_t Be16At(const std::vector<uint8_t>& b, uint64_t off) {
  return static_cast<uint16_t>(b.at(off) << 8 | b.at(off + 1));
}

// The units an image should have, from its own fields (qcow2.txt), computed without the parser.
class ExpectedUnits {
 public:
  explicit ExpectedUnits(const std::vector<uint8_t>& b) : b_(b), cs_(uint64_t{1} << Be32At(b, 20)) {
    Add(0, cs_, UnitKind::kHeader, true);
    AddL1(Be64At(b, 40), Be32At(b, 36), UnitKind::kL1Table);
    const uint64_t rt = Be64At(b, 48), rt_bytes = uint64_t{Be32At(b, 56)} * cs_;
    Add(rt, rt_bytes, UnitKind::kRefcountTable, true);
    for (uint64_t i = 0; i < rt_bytes; i += 8) {
      if (uint64_t block = Be64At(b, rt + i)) Add(block, cs_, UnitKind::kRefcountBlock, false);
    }
    AddSnapshots(Be32At(b, 60), Be64At(b, 64));
    WalkExtensions(Be32At(b, 4) == 3 ? Be32At(b, 100) : 72);
  }
  std::vector<std::string> list() const { return {units_.begin(), units_.end()}; }
  std::set<uint64_t> l2_tables;
  size_t snapshot_l2_refs = 0;

 private:
  void Add(uint64_t off, uint64_t bytes, UnitKind kind, bool moves) {
    for (uint64_t c = off / cs_ * cs_; c < off + bytes; c += cs_) {
      units_.insert(fmt::format("{:>12} {} {}", c, UnitKindName(kind), moves ? "moves" : ""));
    }
  }
  void AddL1(uint64_t off, uint32_t entries, UnitKind kind) {
    Add(off, uint64_t{entries} * 8, kind, true);
    for (uint32_t i = 0; i < entries; ++i) {
      const uint64_t l2 = Be64At(b_, off + 8 * i) & kOffsetMask;
      if (l2 == 0) continue;
      Add(l2, cs_, UnitKind::kL2Table, false);
      if (kind == UnitKind::kSnapshotL1) snapshot_l2_refs += l2_tables.count(l2);
      l2_tables.insert(l2);
    }
  }
  void AddSnapshots(uint32_t n, uint64_t table) {
    uint64_t pos = table;
    for (uint32_t i = 0; i < n; ++i) {
      pos = Align8(pos);  // entries are 8-aligned; the last one's padding is not written
      AddL1(Be64At(b_, pos), Be32At(b_, pos + 8), UnitKind::kSnapshotL1);
      pos += 40 + Be32At(b_, pos + 36) + Be16At(b_, pos + 12) + Be16At(b_, pos + 14);
    }
    if (n > 0) Add(table, pos - table, UnitKind::kSnapshotTable, true);
  }
  void WalkExtensions(uint64_t pos) {
    for (uint32_t type; (type = Be32At(b_, pos)) != 0; pos += 8 + Align8(Be32At(b_, pos + 4))) {
      if (type == 0x0537be77) Add(Be64At(b_, pos + 8), Be64At(b_, pos + 16), UnitKind::kHeader, 0);
      if (type != 0x23852875) continue;
      const uint64_t dir = Be64At(b_, pos + 24), dir_bytes = Be64At(b_, pos + 16);
      Add(dir, dir_bytes, UnitKind::kBitmapDirectory, true);
      for (uint64_t e = dir; e < dir + dir_bytes;
           e += Align8(24 + Be32At(b_, e + 20) + Be16At(b_, e + 18))) {
        Add(Be64At(b_, e), uint64_t{Be32At(b_, e + 8)} * 8, UnitKind::kBitmapTable, true);
      }
    }
  }

  const std::vector<uint8_t>& b_;
  uint64_t cs_;
  std::set<std::string> units_;
};

std::vector<std::string> UnitList(const MetadataMap& map) {
  std::vector<std::string> out;
  for (const MetadataUnit& u : map.units()) {
    CHECK(u.length == map.units()[0].length);  // whole clusters, all alike
    out.push_back(
        fmt::format("{:>12} {} {}", u.offset, UnitKindName(u.kind), u.moves_map ? "moves" : ""));
  }
  return out;
}

// Host ranges qemu says hold guest data must not be metadata units.
void ExpectDataOutsideUnits(const std::string& path, const MetadataMap& map, bool has_offsets) {
  auto extents = nlohmann::json::parse(Run("qemu-img map --output=json " + path));
  size_t checked = 0;
  for (const auto& e : extents) {
    if (!e.contains("offset") || e.value("depth", 0) != 0) continue;
    const uint64_t off = e["offset"], len = e["length"];
    INFO("data extent at host offset " << off << ", " << len << " bytes");
    CHECK(map.Touching(0, off, len).empty());
    ++checked;
  }
  CHECK((checked > 0) == has_offsets);
}

// The common verdict on an image qemu made and left consistent.
// `has_offsets`: qemu-img map shows host offsets (not for compressed or empty images).
ExpectedUnits ExpectHealthy(const std::string& path, bool has_offsets = true) {
  Run("qemu-img check " + path);  // qemu agrees that it is consistent
  auto file = OpenLocalImage(path);
  CHECK(kParser.Probe(*file));
  ParsedImage parsed = ParseFile(path);
  INFO("problems: " << fmt::format("{}", fmt::join(parsed.problems, "\n")));
  REQUIRE(parsed.valid());
  std::vector<uint8_t> bytes = ReadFile(path);
  CHECK(parsed.virtual_size == Be64At(bytes, 24));
  CHECK(parsed.cluster_size == uint32_t{1} << Be32At(bytes, 20));
  ExpectedUnits expected(bytes);
  CHECK(UnitList(parsed.map) == expected.list());
  CHECK(CheckFile(path).empty());
  ExpectDataOutsideUnits(path, parsed.map, has_offsets);
  return expected;
}

void Write(const std::string& path, const std::string& qemu_io_commands) {
  Run("qemu-io " + qemu_io_commands + " " + path);
}

std::string Create(const ScratchDir& dir, const std::string& name, const std::string& options,
                   const std::string& size) {
  const std::string path = dir.File(name);
  Run("qemu-img create -f qcow2 " + options + " " + path + " " + size);
  return path;
}

const char* kWrites =
    "-c 'write -P 0x11 0 192k' -c 'write -P 0x22 1M 64k' -c 'write -P 0x33 40M 4k' "
    "-c 'write -z 2M 64k' -c 'write -P 0x44 63M 1k'";

TEST_CASE("qcow2 images of every kind parse, map as computed, and check clean", "[qcow2]") {
  ScratchDir dir;
  struct Case {
    const char* name;
    const char* options;
    const char* size;
  };
  const Case cases[] = {
      {"v2", "-o compat=0.10", "64M"},
      {"v3", "-o compat=1.1", "64M"},
      {"cluster512", "-o cluster_size=512", "64M"},  // multi-cluster L1 and refcount table
      {"cluster2m", "-o cluster_size=2M", "64M"},
      {"refcount1", "-o refcount_bits=1", "64M"},
      {"refcount16", "-o refcount_bits=16", "64M"},
      {"refcount64", "-o refcount_bits=64", "64M"},
      {"extended_l2", "-o extended_l2=on", "64M"},
      {"lazy", "-o lazy_refcounts=on", "64M"},
      {"empty", "", "0"},
  };
  for (const Case& c : cases) {
    SECTION(c.name) {
      const std::string path = Create(dir, std::string(c.name) + ".qcow2", c.options, c.size);
      if (std::string(c.size) != "0") Write(path, kWrites);
      if (std::string(c.name) == "extended_l2") Write(path, "-c 'write -P 0x55 8M 2k'");
      const bool empty = std::string(c.size) == "0";
      ExpectedUnits units = ExpectHealthy(path, !empty);
      CHECK(units.l2_tables.empty() == empty);
    }
  }
}

TEST_CASE("qcow2 internal snapshots: snapshot L1s and shared L2 tables", "[qcow2]") {
  ScratchDir dir;
  const std::string path = Create(dir, "snap.qcow2", "", "2G");  // L2 tables for 512 MiB each
  Write(path, "-c 'write -P 1 0 1M' -c 'write -P 2 1G 64k'");
  Run("qemu-img snapshot -c first " + path);
  Write(path, "-c 'write -P 3 0 64k'");  // copies the L2 table of the first 512 MiB
  Run("qemu-img snapshot -c second " + path);
  Write(path, "-c 'write -P 4 512k 64k'");
  ExpectedUnits units = ExpectHealthy(path);
  const std::vector<uint8_t> bytes = ReadFile(path);
  CHECK(Be32At(bytes, 60) == 2);
  CHECK(units.snapshot_l2_refs >= 1);  // some L2 table is reached from two L1 tables
  CHECK(Mentions(units.list(), "snapshot L1 table"));
}

TEST_CASE("qcow2 persistent bitmaps", "[qcow2]") {
  ScratchDir dir;
  const std::string path = Create(dir, "bitmap.qcow2", "", "64M");
  Run("qemu-img bitmap --add " + path + " coarse");
  Run("qemu-img bitmap --add -g 4096 " + path + " fine");
  Write(path, "-c 'write -P 5 0 1M' -c 'write -P 6 33M 64k'");  // dirties both bitmaps
  ExpectedUnits units = ExpectHealthy(path);
  CHECK(Mentions(units.list(), "bitmap table"));
  CHECK(Mentions(units.list(), "bitmap directory"));
}

TEST_CASE("qcow2 backing chain and external data file", "[qcow2]") {
  ScratchDir dir;
  const std::string base = Create(dir, "base.qcow2", "", "64M");
  Write(base, "-c 'write -P 7 0 2M'");
  const std::string top = Create(dir, "top.qcow2", "-b base.qcow2 -F qcow2", "64M");
  Write(top, "-c 'write -P 8 1M 128k'");
  ExpectHealthy(base);
  ExpectHealthy(top);
  ParsedImage parsed = ParseFile(top);
  CHECK(Mentions(parsed.notes, "backing file: base.qcow2"));
  CHECK(Mentions(parsed.notes, "backing file format: qcow2"));

  const std::string ext = Create(dir, "ext.qcow2", "-o data_file=" + dir.File("ext.raw"), "64M");
  Write(ext, "-c 'write -P 9 8M 1M'");
  CHECK(ParseFile(ext).valid());
  CHECK(CheckFile(ext).empty());  // its data clusters live in the other file
}

TEST_CASE("qcow2 preallocation=metadata", "[qcow2]") {
  ScratchDir dir;
  const std::string path = Create(dir, "prealloc.qcow2", "-o preallocation=metadata", "4G");
  ExpectedUnits units = ExpectHealthy(path);
  CHECK(units.l2_tables.size() == 8);  // 4 GiB / 512 MiB per L2 table
}

TEST_CASE("qcow2 compressed clusters, some spanning host clusters", "[qcow2]") {
  ScratchDir dir;
  const std::string raw = dir.File("src.raw");
  Run("qemu-img create -f raw " + raw + " 8M");
  // Half-random clusters compress to about half a cluster, so their data crosses host cluster
  // boundaries; the patterned megabyte packs many compressed clusters into one host cluster.
  Run("for i in $(seq 0 23); do dd if=/dev/urandom of=" + raw +
      " bs=1k count=36 seek=$((i*64)) conv=notrunc status=none; done");
  Run("qemu-io -f raw -c 'write -P 0x66 4M 1M' " + raw);
  const std::string path = dir.File("compressed.qcow2");
  Run("qemu-img convert -c -O qcow2 " + raw + " " + path);
  ExpectedUnits units = ExpectHealthy(path, false);

  const std::vector<uint8_t> bytes = ReadFile(path);
  size_t compressed = 0, spanning = 0;
  for (uint64_t l2 : units.l2_tables) {
    for (uint64_t i = 0; i < 65536; i += 8) {
      const uint64_t e = Be64At(bytes, l2 + i);
      if (!(e & (1ull << 62))) continue;
      ++compressed;
      const uint64_t host = e & ((1ull << 54) - 1), sectors = ((e >> 54) & 0xff) + 1;
      spanning += (host >> 16) != (((host & ~511ull) + sectors * 512 - 1) >> 16);
    }
  }
  CHECK(compressed >= 30);
  CHECK(spanning >= 1);
}

TEST_CASE("qcow2 refcounts past 254: one host cluster of hundreds of compressed clusters",
          "[qcow2]") {
  ScratchDir dir;
  const std::string raw = dir.File("src.raw");
  Run("qemu-img create -q -f raw " + raw + " 64M");
  Run("qemu-io -f raw -c 'write -P 0x01 0 64M' " + raw);
  const std::string path = dir.File("packed.qcow2");
  Run("qemu-img convert -c -O qcow2 " + raw + " " + path);
  CHECK(CheckFile(path).empty());

  // The host cluster with the most references (qemu packs ~800 compressed clusters in one).
  const std::vector<uint8_t> bytes = ReadFile(path);
  REQUIRE(Be32At(bytes, 96) == 4);  // 16-bit refcounts
  const uint64_t block = Be64At(bytes, Be64At(bytes, 48));
  uint64_t most = 0;
  for (uint64_t c = 1; c < bytes.size() / 65536 + 1; ++c) {
    if (Be16At(bytes, block + 2 * c) > Be16At(bytes, block + 2 * most)) most = c;
  }
  const uint16_t refs = Be16At(bytes, block + 2 * most);
  REQUIRE(refs > 300);
  for (int delta : {-1, +1}) {
    const uint16_t stored = static_cast<uint16_t>(refs + delta);
    WriteFileAt(path, block + 2 * most,
                {static_cast<uint8_t>(stored >> 8), static_cast<uint8_t>(stored & 0xff)});
    INFO("stored refcount " << stored << ", references " << refs);
    const std::vector<std::string> problems = CheckFile(path);
    const std::string expected =
        fmt::format("cluster at offset {}: refcount {} is {} than its {} references", most * 65536,
                    stored, delta < 0 ? "smaller" : "larger", refs);
    CHECK(Mentions(problems, expected));
    CHECK(problems.size() == 1);
  }
}

TEST_CASE("qcow2 dirty lazy-refcount image is one problem for Check", "[qcow2]") {
  ScratchDir dir;
  const std::string path = Create(dir, "dirty.qcow2", "-o lazy_refcounts=on", "64M");
  // abort leaves the image as a crash would: dirty bit set, refcounts not written.
  Run("ulimit -c 0; qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 20M 64k' -c abort " + path +
      " || true");
  const std::vector<uint8_t> bytes = ReadFile(path);
  REQUIRE((Be64At(bytes, 72) & 1) == 1);
  ParsedImage parsed = ParseFile(path);
  CHECK(parsed.valid());
  CHECK(Mentions(parsed.notes, "dirty"));
  const std::vector<std::string> problems = CheckFile(path);
  REQUIRE(problems.size() == 1);
  CHECK(Mentions(problems, "dirty lazy-refcount image"));
}

// A damaged copy of a fresh image with writes, snapshots off.
class Damage {
 public:
  explicit Damage(const std::string& options = "") {
    source_ = Create(dir_, "source.qcow2", options, "64M");
    Write(source_, kWrites);
    bytes_ = ReadFile(source_);
    path_ = dir_.File("damaged.qcow2");
    Run("cp " + source_ + " " + path_);
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  const std::string& path() const { return path_; }
  const std::string& source() const { return source_; }  // the image before the damage
  uint64_t cluster_size() const { return uint64_t{1} << Be32At(bytes_, 20); }
  uint64_t l1() const { return Be64At(bytes_, 40); }
  uint64_t first_l2() const { return Be64At(bytes_, l1()) & kOffsetMask; }
  uint64_t first_refblock() const { return Be64At(bytes_, Be64At(bytes_, 48)); }
  void Poke64(uint64_t off, uint64_t v) {
    std::vector<uint8_t> b(8);
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (56 - 8 * i));
    testing::WriteFileAt(path_, off, b);
  }
  void Poke32(uint64_t off, uint32_t v) {
    testing::WriteFileAt(path_, off,
                         {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)});
  }
  void Zero(uint64_t off, uint64_t len) {
    testing::WriteFileAt(path_, off, std::vector<uint8_t>(len, 0));
  }
  // Parse problems, or when the structure is sound, Check problems.
  std::vector<std::string> Problems(const ParseLimits& limits = {}) {
    ParsedImage parsed = ParseFile(path_, limits);
    if (!parsed.valid()) return parsed.problems;
    return CheckFile(path_, limits);
  }

 private:
  ScratchDir dir_;
  std::string source_, path_;
  std::vector<uint8_t> bytes_;
};

TEST_CASE("qcow2 damage: zeroed L1 table leaves leaked clusters", "[qcow2]") {
  Damage d;
  REQUIRE(d.first_l2() != 0);
  d.Zero(d.l1(), uint64_t{Be32At(d.bytes(), 36)} * 8);
  CHECK(ParseFile(d.path()).valid());  // still a well-formed image, just an empty one
  const std::vector<std::string> problems = CheckFile(d.path());
  CHECK(Mentions(problems, "leaked cluster"));
  CHECK(Mentions(problems, fmt::format("offset {}:", d.first_l2())));  // the lost L2 table
}

std::vector<std::string> CheckAfterCrash(const std::string& path, const std::string& before,
                                         uint64_t* tolerated) {
  auto file = OpenLocalImage(path);
  auto prior = OpenLocalImage(before);
  const ParsedImage parsed = ParseFile(path);
  std::vector<std::string> problems;
  Status st = kParser.CheckAfterCrash(*file, parsed, *prior, {}, &problems, tolerated);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return problems;
}

TEST_CASE("qcow2 after a crash: leaks of an allocation in flight pass, lost references do not",
          "[qcow2]") {
  Damage d;
  uint64_t tolerated = 99;
  SECTION("a new cluster counted, not yet referenced (qemu writes refcounts first)") {
    const uint64_t cs = d.cluster_size();
    const uint64_t cluster = (d.bytes().size() + cs - 1) / cs;  // the file's next cluster
    testing::WriteFileAt(d.path(), d.first_refblock() + cluster * 2, {0, 1});  // 16-bit refcount
    Run(fmt::format("truncate -s {} {}", (cluster + 1) * cs, d.path()));
    CHECK(Mentions(CheckFile(d.path()), "leaked cluster"));  // after a clean close: a problem
    CHECK(CheckAfterCrash(d.path(), d.source(), &tolerated).empty());
    CHECK(tolerated == 1);
  }
  SECTION("a zeroed L1 table leaks what the image before referenced") {
    d.Zero(d.l1(), uint64_t{Be32At(d.bytes(), 36)} * 8);
    const std::vector<std::string> problems = CheckAfterCrash(d.path(), d.source(), &tolerated);
    CHECK(Mentions(problems, "the image before the crash did"));
    CHECK(Mentions(problems, fmt::format("offset {}:", d.first_l2())));
    CHECK(tolerated == 0);
    // Judged against itself, the same image would pass: `before` is what tells the two apart.
    CHECK(CheckAfterCrash(d.path(), d.path(), &tolerated).empty());
  }
  SECTION("a zeroed refcount block is no leak") {
    d.Zero(d.first_refblock(), d.cluster_size());
    CHECK(Mentions(CheckAfterCrash(d.path(), d.source(), &tolerated), "refcount too small"));
  }
}

TEST_CASE("qcow2 damage: zeroed refcount block", "[qcow2]") {
  Damage d;
  d.Zero(d.first_refblock(), d.cluster_size());
  const std::vector<std::string> problems = d.Problems();
  CHECK(Mentions(problems, "refcount too small"));
  CHECK(Mentions(problems, "cluster at offset 0:"));  // the header's refcount is gone
}

TEST_CASE("qcow2 damage: a bit flipped in an L1 entry", "[qcow2]") {
  Damage d;
  const uint64_t entry = Be64At(d.bytes(), d.l1());
  REQUIRE((entry & kOffsetMask) != 0);
  int bit = GENERATE(9, 16, 17, 40, 55);
  d.Poke64(d.l1(), entry ^ (1ull << bit));
  INFO("flipped bit " << bit);
  CHECK_FALSE(d.Problems().empty());
}

TEST_CASE("qcow2 damage: header fields", "[qcow2]") {
  Damage d;
  SECTION("bad magic") {
    d.Poke32(0, 0x514649fa);
    CHECK_FALSE(kParser.Probe(*OpenLocalImage(d.path())));
    CHECK(Mentions(ParseFile(d.path()).problems, "magic"));
  }
  SECTION("bad version") {
    d.Poke32(4, 4);
    CHECK(Mentions(ParseFile(d.path()).problems, "version 4"));
  }
  SECTION("cluster_bits out of range") {
    d.Poke32(20, 22);
    CHECK(Mentions(ParseFile(d.path()).problems, "cluster_bits 22"));
  }
  SECTION("absurd l1_size is a problem, not an allocation") {
    d.Poke32(36, 0x7fffffff);
    CHECK(Mentions(ParseFile(d.path()).problems, "L1 table"));
    d.Poke32(36, 0xffffffff);
    CHECK(Mentions(ParseFile(d.path()).problems, "L1 table"));
  }
  SECTION("l1_size within qemu's limit but beyond the table limit") {
    d.Poke32(36, 1 << 20);
    ParseLimits tight;
    tight.max_table_bytes = 1 << 20;
    CHECK(Mentions(ParseFile(d.path(), tight).problems, "limit"));
  }
  SECTION("refcount table past the end of the file") {
    d.Poke64(48, d.bytes().size() / d.cluster_size() * d.cluster_size() + 16 * d.cluster_size());
    CHECK(Mentions(ParseFile(d.path()).problems, "refcount table"));
  }
  SECTION("L1 table overlapping the header") {
    d.Poke64(40, 0);
    CHECK(Mentions(ParseFile(d.path()).problems, "header"));
  }
  SECTION("L1 table not cluster-aligned") {
    d.Poke64(40, d.l1() + 512);
    CHECK(Mentions(ParseFile(d.path()).problems, "not aligned"));
  }
  SECTION("corrupt bit and unknown incompatible features") {
    d.Poke64(72, (1ull << 1) | (1ull << 40));
    const std::vector<std::string> problems = ParseFile(d.path()).problems;
    CHECK(Mentions(problems, "marked corrupt"));
    CHECK(Mentions(problems, "unknown incompatible feature bit 40"));
  }
  SECTION("a header extension running past the header cluster") {
    const uint64_t first_ext = Be32At(d.bytes(), 100);
    d.Poke32(first_ext + 4, static_cast<uint32_t>(d.cluster_size()));
    CHECK(Mentions(ParseFile(d.path()).problems, "header extension"));
  }
}

TEST_CASE("qcow2 damage: L2 entries", "[qcow2]") {
  Damage d;
  const uint64_t l2 = d.first_l2();
  const uint64_t entry = Be64At(d.bytes(), l2);
  REQUIRE((entry & kOffsetMask) != 0);
  SECTION("data cluster past the end of the file") {
    d.Poke64(l2, (entry & ~kOffsetMask) | (uint64_t{1} << 40));
    CHECK(ParseFile(d.path()).valid());  // L2 contents are Check's business
    CHECK(Mentions(CheckFile(d.path()), "past the end of the file"));
  }
  SECTION("data cluster misaligned") {
    d.Poke64(l2, entry + 512);
    CHECK(Mentions(CheckFile(d.path()), "not cluster-aligned"));
  }
  SECTION("data cluster pointing at the L1 table") {
    d.Poke64(l2, (entry & ~kOffsetMask) | d.l1());
    CHECK(Mentions(CheckFile(d.path()), "refcount too small"));
  }
  SECTION("COPIED flag cleared is not a problem") {
    d.Poke64(l2, entry & ~(1ull << 63));
    CHECK(CheckFile(d.path()).empty());
  }
}

TEST_CASE("qcow2 damage: truncated files and tight limits", "[qcow2]") {
  Damage d;
  SECTION("cut inside the tables") {
    Run("truncate -s " + std::to_string(d.first_l2() + 100) + " " + d.path());
    CHECK_FALSE(d.Problems().empty());
  }
  SECTION("only the header cluster written yet") {
    Run("truncate -s " + std::to_string(d.cluster_size()) + " " + d.path());
    CHECK(Mentions(ParseFile(d.path()).problems, "past the end of the file"));
  }
  SECTION("empty") {
    Run("truncate -s 0 " + d.path());
    CHECK_FALSE(kParser.Probe(*OpenLocalImage(d.path())));
    CHECK(Mentions(ParseFile(d.path()).problems, "magic"));
  }
  SECTION("a few bytes") {
    Run("truncate -s 50 " + d.path());
    CHECK(Mentions(ParseFile(d.path()).problems, "too short"));
  }
  SECTION("check memory limit") {
    ParseLimits tight;
    tight.max_check_memory = 16;
    CHECK(Mentions(CheckFile(d.path(), tight), "check skipped"));
  }
  SECTION("unit limit") {
    ParseLimits tight;
    tight.max_units = 3;
    CHECK(Mentions(ParseFile(d.path(), tight).problems, "exceeds the limits"));
  }
}

TEST_CASE("qcow2 damage: malformed snapshot table entry", "[qcow2]") {
  Damage d;
  Run("qemu-img snapshot -c s1 " + d.path());
  const std::vector<uint8_t> bytes = ReadFile(d.path());
  const uint64_t table = Be64At(bytes, 64);
  REQUIRE(Be32At(bytes, 60) == 1);
  SECTION("extra data size") {
    d.Poke32(table + 36, 0x10000000);
    CHECK(Mentions(ParseFile(d.path()).problems, "snapshot table entry 0"));
  }
  SECTION("L1 offset past the end") {
    d.Poke64(table, uint64_t{1} << 40);
    const std::vector<std::string> problems = ParseFile(d.path()).problems;
    INFO(fmt::format("{}", fmt::join(problems, "\n")));
    CHECK(Mentions(problems, "snapshot 0"));
  }
  SECTION("more snapshots than the table holds") {
    d.Poke32(60, 5000);
    CHECK_FALSE(d.Problems().empty());
  }
}

TEST_CASE("qcow2 parses from memory and never reads L2 tables in Parse", "[qcow2]") {
  Damage d;
  std::vector<uint8_t> bytes = d.bytes();
  // Garbage in every L2 table: Parse does not look, Check does.
  const uint64_t l2 = d.first_l2();
  for (uint64_t i = 0; i < d.cluster_size(); ++i) bytes[l2 + i] = 0xa5;
  MemoryImageFile file(bytes);
  ParsedImage parsed;
  REQUIRE(kParser.Parse(file, {}, &parsed).ok());
  CHECK(parsed.valid());
  std::vector<std::string> problems;
  REQUIRE(kParser.Check(file, parsed, {}, &problems).ok());
  CHECK_FALSE(problems.empty());
  CHECK(problems.size() <= 21);  // capped, with a count of the rest
}

}  // namespace
}  // namespace vmetafs::store
