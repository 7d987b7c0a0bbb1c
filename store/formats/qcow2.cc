// qcow2: the header, its extensions, and Parse. Tables are read in qcow2_tables.cc, the deep check
// lives in qcow2_check.cc. Spec: qemu docs/interop/qcow2.txt.
#include "store/formats/qcow2.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <tuple>

#include "store/coding.h"
#include "store/formats/qcow2_layout.h"

namespace vmetafs::store {
namespace qcow2 {
namespace {

constexpr uint8_t kMagic[4] = {'Q', 'F', 'I', 0xfb};
constexpr uint32_t kV2HeaderBytes = 72;
constexpr uint32_t kV3HeaderBytes = 104;
constexpr uint32_t kHeaderReadBytes = 112;  // covers compression_type and its padding

// "Header extensions" types.
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureTable = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCrypto = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;

constexpr uint64_t kMaxBackingNameBytes = 1023;

uint64_t Align8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

// What the header extensions said, before it is checked against the rest of the header.
struct Extensions {
  std::map<unsigned, std::string> incompatible_names;  // from the feature name table
  bool has_bitmaps = false;
  uint32_t nb_bitmaps = 0;
  uint64_t bitmap_directory_bytes = 0;
  uint64_t bitmap_directory_offset = 0;
  bool has_crypto = false;
};

void ReadFeatureTable(std::span<const uint8_t> data, Extensions* ext) {
  constexpr size_t kEntryBytes = 48;
  for (size_t i = 0; i + kEntryBytes <= data.size(); i += kEntryBytes) {
    if (data[i] != 0 || data[i + 1] > 63) continue;  // only incompatible features are named
    std::span<const uint8_t> name = data.subspan(i + 2, 46);
    auto end = std::find(name.begin(), name.end(), uint8_t{0});
    ext->incompatible_names[data[i + 1]] = Printable({name.begin(), end});
  }
}

void ReadBitmapsExtension(std::span<const uint8_t> data, uint64_t at, Extensions* ext,
                          ProblemList* problems) {
  if (data.size() != 24) {
    problems->Add("bitmaps header extension at offset {} has length {}, expected 24", at,
                  data.size());
    return;
  }
  ext->has_bitmaps = true;
  ext->nb_bitmaps = LoadBe32(&data[0]);
  if (LoadBe32(&data[4]) != 0) {
    problems->Add("bitmaps header extension at offset {} has a non-zero reserved field", at);
  }
  ext->bitmap_directory_bytes = LoadBe64(&data[8]);
  ext->bitmap_directory_offset = LoadBe64(&data[16]);
}

void ReadCryptoExtension(std::span<const uint8_t> data, uint64_t at, Layout* layout,
                         Extensions* ext, ProblemList* problems) {
  if (data.size() != 16) {
    problems->Add("encryption header extension at offset {} has length {}, expected 16", at,
                  data.size());
    return;
  }
  ext->has_crypto = true;
  layout->crypto_offset = LoadBe64(&data[0]);
  layout->crypto_bytes = LoadBe64(&data[8]);
}

// Walks the "Header extensions" area: from the end of the header to the backing file name (or
// the end of the header cluster), each extension 8-byte aligned, until the end marker.
void WalkExtensions(std::span<const uint8_t> area, uint64_t start, Layout* layout, Extensions* ext,
                    ProblemList* problems) {
  uint64_t pos = start;
  while (pos < area.size()) {
    if (area.size() - pos < 8) {
      problems->Add("header extension area ends at offset {} without an end marker", pos);
      return;
    }
    const uint32_t type = LoadBe32(&area[pos]);
    const uint32_t len = LoadBe32(&area[pos + 4]);
    if (type == kExtEnd) return;
    if (len > area.size() - pos - 8) {
      problems->Add(
          "header extension 0x{:08x} at offset {} ({} bytes) runs past the end of the header "
          "area ({} bytes)",
          type, pos, len, area.size());
      return;
    }
    std::span<const uint8_t> data = area.subspan(pos + 8, len);
    switch (type) {
      case kExtBackingFormat:
        layout->notes.push_back("backing file format: " + Printable(data));
        break;
      case kExtFeatureTable:
        ReadFeatureTable(data, ext);
        break;
      case kExtBitmaps:
        ReadBitmapsExtension(data, pos, ext, problems);
        break;
      case kExtCrypto:
        ReadCryptoExtension(data, pos, layout, ext, problems);
        break;
      case kExtDataFile:
        layout->notes.push_back("external data file: " + Printable(data));
        break;
      default:
        break;  // unknown extensions may be ignored
    }
    pos += 8 + Align8(len);
  }
}

// Checks that decide whether anything else can be located; false stops the parse.
bool CheckGeometry(const Header& h, ProblemList* problems) {
  const size_t before = problems->count();
  if (h.cluster_bits < 9 || h.cluster_bits > 21) {
    problems->Add("header: cluster_bits {} is outside 9..21 (512 B to 2 MiB clusters)",
                  h.cluster_bits);
    return false;
  }
  const uint64_t cluster_size = uint64_t{1} << h.cluster_bits;
  if (h.version == 3 && (h.header_length < kV3HeaderBytes || h.header_length % 8 != 0)) {
    problems->Add("header: header_length {} is not a multiple of 8 of at least 104",
                  h.header_length);
  }
  if (h.header_length > cluster_size) {
    problems->Add("header: header_length {} exceeds the cluster size {}", h.header_length,
                  cluster_size);
  }
  if (h.refcount_order > 6) {
    problems->Add("header: refcount_order {} is above 6 (64-bit refcounts)", h.refcount_order);
  }
  if ((h.incompatible_features & kIncompatExtendedL2) && h.cluster_bits < 14) {
    problems->Add("header: extended L2 entries need clusters of at least 16 KiB, not {} bytes",
                  cluster_size);
  }
  return problems->count() == before;
}

void CheckFeatures(const Header& h, const Extensions& ext, Layout* layout, ProblemList* problems) {
  const uint64_t f = h.incompatible_features;
  if (f & kIncompatCorrupt) {
    problems->Add("header: the image is marked corrupt (incompatible feature bit 1)");
  }
  for (unsigned bit = 0; bit < 64; ++bit) {
    if (!((f >> bit) & 1) || ((kIncompatKnown >> bit) & 1)) continue;
    auto named = ext.incompatible_names.find(bit);
    problems->Add("header: unknown incompatible feature bit {}{}", bit,
                  named == ext.incompatible_names.end() ? "" : " (" + named->second + ")");
  }
  const bool compression_bit = f & kIncompatCompression;
  if (compression_bit && (h.compression_type == 0 || h.compression_type > 1)) {
    problems->Add("header: compression type {} is not a known non-zlib type (1 = zstd)",
                  h.compression_type);
  } else if (!compression_bit && h.compression_type != 0) {
    problems->Add("header: compression type {} without the compression type feature bit",
                  h.compression_type);
  }
  if (h.crypt_method > 2) problems->Add("header: unknown encryption method {}", h.crypt_method);
  if (h.crypt_method == 2 && !ext.has_crypto) {
    problems->Add("header: LUKS encryption without an encryption header extension");
  }
  if (f & kIncompatDirty) {
    layout->notes.push_back(
        "dirty: refcounts may be stale until qemu repairs them (lazy refcounts)");
  }
  if (h.compatible_features & kCompatLazyRefcounts) layout->notes.push_back("lazy refcounts");
  if (f & kIncompatExtendedL2) layout->notes.push_back("extended L2 entries");
  if (compression_bit && h.compression_type == 1) layout->notes.push_back("compression: zstd");
  if (h.crypt_method != 0) {
    layout->notes.push_back(h.crypt_method == 1 ? "encryption: AES" : "encryption: LUKS");
  }
}

void NoteBackingFile(const Header& h, std::span<const uint8_t> area, Layout* layout,
                     ProblemList* problems) {
  if (h.backing_file_offset == 0) return;
  const uint64_t off = h.backing_file_offset, len = h.backing_file_size;
  if (off < h.header_length || off > area.size() || len > area.size() - off ||
      len > kMaxBackingNameBytes) {
    problems->Add(
        "header: backing file name at offset {} ({} bytes) does not fit in the header cluster "
        "after the header",
        off, len);
    return;
  }
  layout->notes.push_back("backing file: " + Printable(area.subspan(off, len)));
}

void ApplyBitmaps(const Extensions& ext, Layout* layout, ProblemList* problems) {
  const bool consistent = layout->header.autoclear_features & kAutoclearBitmaps;
  if (!ext.has_bitmaps) {
    if (consistent) layout->notes.push_back("bitmaps autoclear bit set without bitmaps");
    return;
  }
  if (!consistent) {
    // qemu ignores such bitmaps too; their clusters then count as leaked in Check.
    layout->notes.push_back("bitmaps extension marked inconsistent (autoclear bit clear): ignored");
    return;
  }
  if (ext.nb_bitmaps == 0 || ext.nb_bitmaps > kMaxBitmaps) {
    problems->Add("bitmaps extension: {} bitmaps, expected 1..{}", ext.nb_bitmaps, kMaxBitmaps);
    return;
  }
  layout->bitmap_directory_offset = ext.bitmap_directory_offset;
  layout->bitmap_directory_bytes = ext.bitmap_directory_bytes;
  layout->bitmaps.resize(ext.nb_bitmaps);
}

// Reads the header cluster and everything in it.
Status ReadHeaderArea(const ImageFile& file, Layout* layout, ProblemList* problems, bool* ok) {
  *ok = false;
  std::array<uint8_t, kHeaderReadBytes> first{};
  const size_t got = static_cast<size_t>(std::min<uint64_t>(layout->file_size, first.size()));
  std::vector<uint8_t> head;
  bool read = false;
  VMETAFS_RETURN_IF_ERROR(ReadTable(file, layout, 0, got, &head, &read, problems));
  if (!read) return Status::Ok();
  std::copy(head.begin(), head.end(), first.begin());
  Header& h = layout->header;
  if (!DecodeHeader(std::span<const uint8_t>(first.data(), got), &h, problems)) {
    return Status::Ok();
  }
  if (!CheckGeometry(h, problems)) return Status::Ok();
  layout->cluster_size = uint32_t{1} << h.cluster_bits;
  layout->l2_entry_bytes = (h.incompatible_features & kIncompatExtendedL2) ? 16 : 8;
  const uint64_t area_bytes = std::min<uint64_t>(layout->cluster_size, layout->file_size);
  std::vector<uint8_t> area;
  VMETAFS_RETURN_IF_ERROR(ReadTable(file, layout, 0, area_bytes, &area, &read, problems));
  if (!read) return Status::Ok();
  std::span<const uint8_t> ext_area(area);
  if (h.backing_file_offset != 0 && h.backing_file_offset < ext_area.size()) {
    ext_area = ext_area.first(h.backing_file_offset);
  }
  Extensions ext;
  WalkExtensions(ext_area, h.header_length, layout, &ext, problems);
  CheckFeatures(h, ext, layout, problems);
  NoteBackingFile(h, area, layout, problems);
  ApplyBitmaps(ext, layout, problems);
  *ok = true;
  return Status::Ok();
}

void AddCryptoUnits(Layout* layout, ProblemList* problems) {
  if (layout->crypto_bytes == 0) return;
  // The LUKS header and key material: without them the data cannot be decrypted, so they are
  // kept like the header cluster.
  if (CheckTablePlace(*layout, "encryption header", layout->crypto_offset, layout->crypto_bytes,
                      layout->limits.max_table_bytes, problems)) {
    AddClusterUnits(layout, layout->crypto_offset, layout->crypto_bytes, UnitKind::kHeader, false);
  }
}

void AddL2Units(Layout* layout) {
  std::vector<uint64_t> l2 = layout->l2_refs;
  std::sort(l2.begin(), l2.end());
  l2.erase(std::unique(l2.begin(), l2.end()), l2.end());
  for (uint64_t off : l2) {
    AddClusterUnits(layout, off, layout->cluster_size, UnitKind::kL2Table, false);
  }
}

// MetadataMap::Build keeps one of two units with the same range whatever their kinds. Only an L2
// table may legitimately be reached twice; any other pair is one cluster used as two things.
void FindSharedClusters(std::vector<MetadataUnit> units, ProblemList* problems) {
  std::sort(units.begin(), units.end(), [](const MetadataUnit& a, const MetadataUnit& b) {
    return std::tie(a.offset, a.kind) < std::tie(b.offset, b.kind);
  });
  for (size_t i = 1; i < units.size(); ++i) {
    const MetadataUnit& a = units[i - 1];
    const MetadataUnit& b = units[i];
    if (a.offset != b.offset || (a.kind == b.kind && a.kind == UnitKind::kL2Table)) continue;
    problems->Add("cluster at offset {} is used both as {} and as {}", a.offset,
                  UnitKindName(a.kind), UnitKindName(b.kind));
  }
}

}  // namespace

bool DecodeHeader(std::span<const uint8_t> b, Header* h, ProblemList* problems) {
  if (b.size() < 4 || std::memcmp(b.data(), kMagic, 4) != 0) {
    problems->Add("header: no qcow2 magic (QFI\\xfb) at offset 0");
    return false;
  }
  if (b.size() < kV2HeaderBytes) {
    problems->Add("header: the file ({} bytes) is too short for a qcow2 header", b.size());
    return false;
  }
  h->version = LoadBe32(&b[4]);
  if (h->version != 2 && h->version != 3) {
    problems->Add("header: version {} is not 2 or 3", h->version);
    return false;
  }
  if (h->version == 3 && b.size() < kV3HeaderBytes) {
    problems->Add("header: the file ({} bytes) is too short for a version 3 header", b.size());
    return false;
  }
  h->backing_file_offset = LoadBe64(&b[8]);
  h->backing_file_size = LoadBe32(&b[16]);
  h->cluster_bits = LoadBe32(&b[20]);
  h->size = LoadBe64(&b[24]);
  h->crypt_method = LoadBe32(&b[32]);
  h->l1_size = LoadBe32(&b[36]);
  h->l1_table_offset = LoadBe64(&b[40]);
  h->refcount_table_offset = LoadBe64(&b[48]);
  h->refcount_table_clusters = LoadBe32(&b[56]);
  h->nb_snapshots = LoadBe32(&b[60]);
  h->snapshots_offset = LoadBe64(&b[64]);
  if (h->version == 3) {
    h->incompatible_features = LoadBe64(&b[72]);
    h->compatible_features = LoadBe64(&b[80]);
    h->autoclear_features = LoadBe64(&b[88]);
    h->refcount_order = LoadBe32(&b[96]);
    h->header_length = LoadBe32(&b[100]);
    if (h->header_length > kV3HeaderBytes && b.size() > kV3HeaderBytes) {
      h->compression_type = b[kV3HeaderBytes];
    }
  }
  return true;
}

Status ReadLayout(const ImageFile& file, const ParseLimits& limits, Layout* out,
                  ProblemList* problems) {
  out->limits = limits;
  VMETAFS_RETURN_IF_ERROR(file.Size(&out->file_size));
  bool ok = false;
  VMETAFS_RETURN_IF_ERROR(ReadHeaderArea(file, out, problems, &ok));
  if (!ok) return Status::Ok();
  AddClusterUnits(out, 0, out->cluster_size, UnitKind::kHeader, true);
  VMETAFS_RETURN_IF_ERROR(ReadActiveL1(file, out, problems));
  VMETAFS_RETURN_IF_ERROR(ReadRefcountTable(file, out, problems));
  VMETAFS_RETURN_IF_ERROR(ReadSnapshots(file, out, problems));
  VMETAFS_RETURN_IF_ERROR(ReadBitmapDirectory(file, out, problems));
  AddCryptoUnits(out, problems);
  AddL2Units(out);
  if (out->over_limits) {
    problems->Add(
        "the image's metadata exceeds the limits ({} units, {} bytes): not all of it is mapped",
        limits.max_units, limits.max_metadata_bytes);
  }
  return Status::Ok();
}

}  // namespace qcow2

bool Qcow2Parser::Probe(const ImageFile& file) const {
  uint8_t magic[4];
  if (!file.ReadAt(0, magic).ok()) return false;
  return std::memcmp(magic, qcow2::kMagic, sizeof(magic)) == 0;
}

Status Qcow2Parser::Parse(const ImageFile& file, const ParseLimits& limits,
                          ParsedImage* out) const {
  qcow2::ProblemList problems(&out->problems);
  qcow2::Layout layout;
  VMETAFS_RETURN_IF_ERROR(qcow2::ReadLayout(file, limits, &layout, &problems));
  out->format = "qcow2";
  out->virtual_size = layout.header.size;
  out->cluster_size = layout.cluster_size;
  out->notes.insert(out->notes.end(), layout.notes.begin(), layout.notes.end());
  qcow2::FindSharedClusters(layout.units, &problems);
  std::string overlap;
  if (!MetadataMap::Build(std::move(layout.units), &out->map, &overlap)) {
    problems.Add("{}", overlap);
  }
  problems.Finish();
  return Status::Ok();
}

}  // namespace vmetafs::store
