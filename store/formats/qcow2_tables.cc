// qcow2: the tables the header points to ("Cluster mapping", "Host cluster management",
// "Snapshots", "Bitmaps" in qemu docs/interop/qcow2.txt), turned into metadata units. L2 tables
// are located but not read here: their entries are Check's business.
#include <algorithm>

#include "store/coding.h"
#include "store/formats/qcow2_layout.h"

namespace vmetafs::store::qcow2 {
namespace {

constexpr uint32_t kSnapshotFixedBytes = 40;
constexpr uint32_t kSnapshotV3ExtraBytes = 16;
constexpr uint32_t kBitmapEntryFixedBytes = 24;
constexpr uint32_t kBitmapMaxNameBytes = 1023;
constexpr uint32_t kBitmapReservedFlags = 0xfffffff8;
constexpr uint8_t kBitmapTypeDirty = 1;
constexpr uint64_t kSnapshotReadChunk = 64 << 10;

uint64_t Align8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }
uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// Records the L2 tables one L1 table points to.
void CollectL2Refs(Layout* layout, std::span<const uint8_t> l1, const std::string& what,
                   ProblemList* problems) {
  const uint64_t cs = layout->cluster_size;
  for (size_t i = 0; i < l1.size() / 8; ++i) {
    const uint64_t e = LoadBe64(&l1[i * 8]);
    if (e & kL1ReservedMask) {
      problems->Add("{} entry {}: reserved bits set (0x{:016x})", what, i, e);
    }
    const uint64_t off = e & kL1OffsetMask;
    if (off == 0) continue;
    if (!layout->Aligned(off)) {
      problems->Add("{} entry {}: L2 table offset {} is not cluster-aligned", what, i, off);
    } else if (layout->file_size < cs || off > layout->file_size - cs) {
      problems->Add(
          "{} entry {}: L2 table at offset {} reaches past the end of the file ({} bytes)", what, i,
          off, layout->file_size);
    } else if (layout->l2_refs.size() >= layout->limits.max_units) {
      layout->over_limits = true;
      return;
    } else {
      layout->l2_refs.push_back(off);
    }
  }
}

// Reads one L1 table (active or a snapshot's) and the L2 references in it.
Status ReadL1(const ImageFile& file, Layout* layout, uint64_t offset, uint32_t entries,
              UnitKind kind, const std::string& what, ProblemList* problems) {
  if (entries == 0) return Status::Ok();
  if (entries > kMaxL1Entries) {
    problems->Add("{} at offset {} has {} entries, more than qemu's limit of {}", what, offset,
                  entries, kMaxL1Entries);
    return Status::Ok();
  }
  const uint64_t bytes = uint64_t{entries} * 8;
  if (!CheckTablePlace(*layout, what, offset, bytes, layout->limits.max_table_bytes, problems)) {
    return Status::Ok();
  }
  AddClusterUnits(layout, offset, bytes, kind, true);
  std::vector<uint8_t> table;
  bool ok = false;
  VMETAFS_RETURN_IF_ERROR(ReadTable(file, layout, offset, bytes, &table, &ok, problems));
  if (ok) CollectL2Refs(layout, table, what, problems);
  return Status::Ok();
}

// The snapshot table, read in growing chunks: its length is only known by walking it.
class SnapshotTableReader {
 public:
  SnapshotTableReader(const ImageFile& file, Layout* layout, uint64_t offset, uint64_t max_bytes)
      : file_(file), layout_(layout), offset_(offset), max_bytes_(max_bytes) {}

  // Makes bytes [0, end) of the table available; *ok false when they are past max_bytes or
  // could not be read.
  Status Ensure(uint64_t end, bool* ok, ProblemList* problems) {
    *ok = end <= max_bytes_;
    if (!*ok || end <= buf_.size()) return Status::Ok();
    const uint64_t want = std::min(max_bytes_, std::max(end, buf_.size() * 2 + kSnapshotReadChunk));
    std::vector<uint8_t> more;
    VMETAFS_RETURN_IF_ERROR(
        ReadTable(file_, layout_, offset_ + buf_.size(), want - buf_.size(), &more, ok, problems));
    buf_.insert(buf_.end(), more.begin(), more.end());
    return Status::Ok();
  }
  const uint8_t* At(uint64_t pos) const { return buf_.data() + pos; }

 private:
  const ImageFile& file_;
  Layout* layout_;
  uint64_t offset_;
  uint64_t max_bytes_;
  std::vector<uint8_t> buf_;
};

// Decodes the snapshot table entry at `p`; returns its length without the padding (which qemu
// does not write after the last entry), 0 when it is malformed.
uint64_t DecodeSnapshot(const uint8_t* p, uint32_t index, uint64_t at, uint32_t version,
                        SnapshotInfo* sn, ProblemList* problems) {
  const uint32_t extra = LoadBe32(p + 36);
  if (extra > kMaxSnapshotExtraData) {
    problems->Add("snapshot table entry {} at offset {}: {} bytes of extra data, more than {}",
                  index, at, extra, kMaxSnapshotExtraData);
    return 0;
  }
  if (version >= 3 && extra < kSnapshotV3ExtraBytes) {
    problems->Add(
        "snapshot table entry {} at offset {}: {} bytes of extra data, version 3 needs {}", index,
        at, extra, kSnapshotV3ExtraBytes);
    return 0;
  }
  sn->l1_offset = LoadBe64(p);
  sn->l1_size = LoadBe32(p + 8);
  return uint64_t{kSnapshotFixedBytes} + extra + LoadBe16(p + 12) + LoadBe16(p + 14);
}

// Walks the snapshot table entries; false when the table is malformed (reported).
Status WalkSnapshotTable(const ImageFile& file, Layout* layout, ProblemList* problems, bool* ok) {
  const Header& h = layout->header;
  const uint64_t max_bytes = std::min({kMaxSnapshotTableBytes, layout->limits.max_table_bytes,
                                       layout->file_size - h.snapshots_offset});
  SnapshotTableReader reader(file, layout, h.snapshots_offset, max_bytes);
  uint64_t pos = 0;
  layout->snapshots.reserve(std::min<uint32_t>(h.nb_snapshots, 1024));
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    pos = Align8(pos);
    const uint64_t at = h.snapshots_offset + pos;
    VMETAFS_RETURN_IF_ERROR(reader.Ensure(pos + kSnapshotFixedBytes, ok, problems));
    SnapshotInfo sn;
    const uint64_t len = *ok ? DecodeSnapshot(reader.At(pos), i, at, h.version, &sn, problems) : 0;
    if (*ok && len > 0) VMETAFS_RETURN_IF_ERROR(reader.Ensure(pos + len, ok, problems));
    if (!*ok) {
      problems->Add(
          "snapshot table entry {} at offset {} reaches past the end of the file or {} "
          "bytes of table",
          i, at, max_bytes);
      return Status::Ok();
    }
    if (len == 0) return Status::Ok();
    const uint8_t* p = reader.At(pos);
    const uint32_t extra = LoadBe32(p + 36);
    sn.id = Printable({p + kSnapshotFixedBytes + extra, LoadBe16(p + 12)});
    layout->snapshots.push_back(std::move(sn));
    pos += len;
  }
  layout->snapshot_table_bytes = pos;
  *ok = true;
  return Status::Ok();
}

// The number of bitmap table entries a bitmap of 2^granularity_bits bytes per bit needs.
uint64_t BitmapTableEntries(uint64_t virtual_size, uint32_t granularity_bits,
                            uint32_t cluster_size) {
  const uint64_t bits = CeilDiv(virtual_size, uint64_t{1} << granularity_bits);
  return CeilDiv(CeilDiv(bits, 8), cluster_size);
}

// Decodes one bitmap directory entry; returns its length, 0 when malformed (reported).
uint64_t DecodeBitmapEntry(std::span<const uint8_t> dir, uint64_t pos, const Layout& layout,
                           BitmapInfo* bm, ProblemList* problems) {
  const uint64_t at = layout.bitmap_directory_offset + pos;
  if (dir.size() - pos < kBitmapEntryFixedBytes) {
    problems->Add("bitmap directory entry at offset {} runs past the directory's end", at);
    return 0;
  }
  const uint8_t* p = &dir[pos];
  const uint32_t flags = LoadBe32(p + 12), name_size = LoadBe16(p + 18);
  const uint8_t type = p[16], granularity_bits = p[17];
  const uint64_t len = Align8(uint64_t{kBitmapEntryFixedBytes} + LoadBe32(p + 20) + name_size);
  if (len > dir.size() - pos) {
    problems->Add("bitmap directory entry at offset {} runs past the directory's end", at);
    return 0;
  }
  bm->table_offset = LoadBe64(p);
  bm->table_size = LoadBe32(p + 8);
  const uint64_t name_at = kBitmapEntryFixedBytes + LoadBe32(p + 20);
  bm->name = Printable({p + name_at, name_size});
  if (name_size == 0 || name_size > kBitmapMaxNameBytes || type != kBitmapTypeDirty ||
      granularity_bits < 9 || granularity_bits > 31 || (flags & kBitmapReservedFlags)) {
    problems->Add(
        "bitmap directory entry at offset {}: unsupported fields (type {}, granularity bits {}, "
        "flags 0x{:x}, name size {})",
        at, type, granularity_bits, flags, name_size);
    return 0;
  }
  const uint64_t expected =
      BitmapTableEntries(layout.header.size, granularity_bits, layout.cluster_size);
  if (bm->table_size != expected) {
    problems->Add("bitmap '{}': table has {} entries, the virtual size needs {}", bm->name,
                  bm->table_size, expected);
    return 0;
  }
  return len;
}

bool WalkBitmapDirectory(std::span<const uint8_t> dir, Layout* layout, ProblemList* problems) {
  uint64_t pos = 0;
  for (BitmapInfo& bm : layout->bitmaps) {
    const uint64_t len = DecodeBitmapEntry(dir, pos, *layout, &bm, problems);
    if (len == 0) return false;
    pos += len;
  }
  if (pos != dir.size()) {
    problems->Add("bitmap directory at offset {}: {} bitmaps fill {} bytes, its size says {}",
                  layout->bitmap_directory_offset, layout->bitmaps.size(), pos, dir.size());
    return false;
  }
  return true;
}

void AddBitmapTables(Layout* layout, ProblemList* problems) {
  for (const BitmapInfo& bm : layout->bitmaps) {
    const std::string what = fmt::format("bitmap '{}' table", bm.name);
    if (bm.table_size > kMaxBitmapTableEntries) {
      problems->Add("{} at offset {} has {} entries, more than qemu's limit of {}", what,
                    bm.table_offset, bm.table_size, kMaxBitmapTableEntries);
      continue;
    }
    const uint64_t bytes = uint64_t{bm.table_size} * 8;
    if (CheckTablePlace(*layout, what, bm.table_offset, bytes, layout->limits.max_table_bytes,
                        problems)) {
      AddClusterUnits(layout, bm.table_offset, bytes, UnitKind::kBitmapTable, true);
    }
  }
}

}  // namespace

Status ReadTable(const ImageFile& file, Layout* layout, uint64_t offset, uint64_t bytes,
                 std::vector<uint8_t>* out, bool* ok, ProblemList* problems) {
  *ok = false;
  if (bytes > layout->limits.max_metadata_bytes -
                  std::min(layout->table_bytes_read, layout->limits.max_metadata_bytes)) {
    layout->over_limits = true;
    return Status::Ok();
  }
  layout->table_bytes_read += bytes;
  out->resize(bytes);
  if (bytes == 0) {
    *ok = true;
    return Status::Ok();
  }
  Status st = file.ReadAt(offset, *out);
  if (st.code() == Status::Code::kInvalidArgument) {
    problems->Add("reading {} bytes at offset {} failed, the file is shorter: {}", bytes, offset,
                  st.message());
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(st.Annotate("reading qcow2 metadata"));
  *ok = true;
  return Status::Ok();
}

bool CheckTablePlace(const Layout& layout, std::string_view what, uint64_t offset, uint64_t bytes,
                     uint64_t max_bytes, ProblemList* problems) {
  if (!layout.Aligned(offset)) {
    problems->Add("{} at offset {} is not aligned to the cluster size ({} bytes)", what, offset,
                  layout.cluster_size);
    return false;
  }
  if (bytes > max_bytes) {
    problems->Add("{} at offset {} is {} bytes, more than the limit of {} bytes", what, offset,
                  bytes, max_bytes);
    return false;
  }
  if (offset > layout.file_size || bytes > layout.file_size - offset) {
    problems->Add("{} at offset {} ({} bytes) reaches past the end of the file ({} bytes)", what,
                  offset, bytes, layout.file_size);
    return false;
  }
  return true;
}

void AddClusterUnits(Layout* layout, uint64_t offset, uint64_t bytes, UnitKind kind,
                     bool moves_map) {
  if (bytes == 0) return;
  const uint64_t cs = layout->cluster_size;
  const uint64_t end = offset + bytes;
  for (uint64_t c = offset & ~(cs - 1); c < end; c += cs) {
    if (layout->units.size() >= layout->limits.max_units ||
        layout->unit_bytes + cs > layout->limits.max_metadata_bytes) {
      layout->over_limits = true;
      return;
    }
    layout->units.push_back(MetadataUnit{c, static_cast<uint32_t>(cs), 0, kind, moves_map});
    layout->unit_bytes += cs;
  }
}

Status ReadActiveL1(const ImageFile& file, Layout* layout, ProblemList* problems) {
  const Header& h = layout->header;
  const uint64_t l2_span =
      uint64_t{layout->cluster_size} / layout->l2_entry_bytes * layout->cluster_size;
  const uint64_t needed = CeilDiv(h.size, l2_span);
  if (h.l1_size < needed) {
    problems->Add("L1 table at offset {} has {} entries, the virtual size {} needs {}",
                  h.l1_table_offset, h.l1_size, h.size, needed);
  }
  return ReadL1(file, layout, h.l1_table_offset, h.l1_size, UnitKind::kL1Table, "L1 table",
                problems);
}

Status ReadRefcountTable(const ImageFile& file, Layout* layout, ProblemList* problems) {
  const Header& h = layout->header;
  const uint64_t bytes = uint64_t{h.refcount_table_clusters} << h.cluster_bits;
  if (bytes == 0 || bytes > kMaxRefcountTableBytes) {
    problems->Add("refcount table at offset {} has {} clusters, expected 1 to {} bytes' worth",
                  h.refcount_table_offset, h.refcount_table_clusters, kMaxRefcountTableBytes);
    return Status::Ok();
  }
  if (!CheckTablePlace(*layout, "refcount table", h.refcount_table_offset, bytes,
                       layout->limits.max_table_bytes, problems)) {
    return Status::Ok();
  }
  AddClusterUnits(layout, h.refcount_table_offset, bytes, UnitKind::kRefcountTable, true);
  std::vector<uint8_t> table;
  bool ok = false;
  VMETAFS_RETURN_IF_ERROR(
      ReadTable(file, layout, h.refcount_table_offset, bytes, &table, &ok, problems));
  if (!ok) return Status::Ok();
  layout->refcount_blocks.assign(bytes / 8, 0);
  const uint64_t cs = layout->cluster_size;
  for (size_t i = 0; i < bytes / 8; ++i) {
    const uint64_t e = LoadBe64(&table[i * 8]);
    const uint64_t off = e & kRefTableOffsetMask;
    if (e & ~kRefTableOffsetMask) {
      problems->Add("refcount table entry {}: reserved bits set (0x{:016x})", i, e);
    } else if (off == 0) {
      continue;
    } else if (!layout->Aligned(off)) {
      problems->Add("refcount table entry {}: refcount block offset {} is not cluster-aligned", i,
                    off);
    } else if (layout->file_size < cs || off > layout->file_size - cs) {
      problems->Add(
          "refcount table entry {}: refcount block at offset {} reaches past the end of "
          "the file ({} bytes)",
          i, off, layout->file_size);
    } else {
      layout->refcount_blocks[i] = off;
      AddClusterUnits(layout, off, cs, UnitKind::kRefcountBlock, false);
    }
  }
  return Status::Ok();
}

Status ReadSnapshots(const ImageFile& file, Layout* layout, ProblemList* problems) {
  const Header& h = layout->header;
  if (h.nb_snapshots == 0) return Status::Ok();
  if (h.nb_snapshots > kMaxSnapshots) {
    problems->Add("header: {} snapshots, more than qemu's limit of {}", h.nb_snapshots,
                  kMaxSnapshots);
    return Status::Ok();
  }
  if (!CheckTablePlace(*layout, "snapshot table", h.snapshots_offset, kSnapshotFixedBytes,
                       kMaxSnapshotTableBytes, problems)) {
    return Status::Ok();
  }
  bool ok = false;
  VMETAFS_RETURN_IF_ERROR(WalkSnapshotTable(file, layout, problems, &ok));
  if (!ok) return Status::Ok();
  AddClusterUnits(layout, h.snapshots_offset, layout->snapshot_table_bytes,
                  UnitKind::kSnapshotTable, true);
  for (size_t i = 0; i < layout->snapshots.size(); ++i) {
    const SnapshotInfo& sn = layout->snapshots[i];
    const std::string what = fmt::format("snapshot {} (id '{}') L1 table", i, sn.id);
    VMETAFS_RETURN_IF_ERROR(
        ReadL1(file, layout, sn.l1_offset, sn.l1_size, UnitKind::kSnapshotL1, what, problems));
  }
  return Status::Ok();
}

Status ReadBitmapDirectory(const ImageFile& file, Layout* layout, ProblemList* problems) {
  if (layout->bitmaps.empty()) return Status::Ok();
  const uint64_t offset = layout->bitmap_directory_offset;
  const uint64_t bytes = layout->bitmap_directory_bytes;
  const uint64_t max_bytes = std::min(kMaxBitmapDirectoryBytes, layout->limits.max_table_bytes);
  bool ok = bytes != 0;
  if (!ok) problems->Add("bitmap directory at offset {} is empty", offset);
  ok = ok && CheckTablePlace(*layout, "bitmap directory", offset, bytes, max_bytes, problems);
  std::vector<uint8_t> dir;
  if (ok) {
    AddClusterUnits(layout, offset, bytes, UnitKind::kBitmapDirectory, true);
    VMETAFS_RETURN_IF_ERROR(ReadTable(file, layout, offset, bytes, &dir, &ok, problems));
  }
  if (!ok || !WalkBitmapDirectory(dir, layout, problems)) {
    layout->bitmaps.clear();
    return Status::Ok();
  }
  AddBitmapTables(layout, problems);
  return Status::Ok();
}

}  // namespace vmetafs::store::qcow2
