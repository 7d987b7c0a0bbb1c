// Internal to the qcow2 parser: the decoded structure of one image, shared by Parse (which turns it
// into metadata units) and Check (which walks it again to count references). Field offsets and
// masks are those of qemu's docs/interop/qcow2.txt; section names are quoted where they are used.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "store/formats/format.h"
#include "store/image_file.h"
#include "store/metadata_map.h"
#include "store/status.h"

namespace vmetafs::store::qcow2 {

// "L1 table entry" / "L2 table entry": host offsets live in bits 9..55.
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;  // bit 63 is COPIED
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
inline constexpr uint64_t kL2Compressed = 1ull << 62;
// "Refcount table entry": bits 0..8 reserved, the rest is the refcount block's offset.
inline constexpr uint64_t kRefTableOffsetMask = 0xfffffffffffffe00ull;
// "Bitmap table": host offset in bits 9..55, bit 0 is the all-ones flag, the rest reserved.
inline constexpr uint64_t kBitmapOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapReservedMask = 0xff000000000001feull;

// "Header": incompatible feature bits this parser understands.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;

// qemu's implementation limits: an image beyond them cannot be opened by qemu, so no legitimate
// image exceeds them, and honouring them bounds what a hostile header can make us read.
inline constexpr uint64_t kMaxL1Entries = (32ull << 20) / 8;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 1024ull * kMaxSnapshots;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 1024ull * kMaxBitmaps;
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;

// Problems are capped so that an image with a million bad entries yields a readable report.
inline constexpr size_t kMaxProblems = 20;

// Appends problems to a caller's list, keeping the first kMaxProblems of them and counting the
// rest; Finish() states how many were left out.
class ProblemList {
 public:
  explicit ProblemList(std::vector<std::string>* out) : out_(out) {}
  template <typename... Args>
  void Add(fmt::format_string<Args...> format, Args&&... args) {
    if (kept_ < kMaxProblems) {
      out_->push_back(fmt::format(format, std::forward<Args>(args)...));
      ++kept_;
    } else {
      ++dropped_;
    }
  }
  size_t count() const { return kept_ + dropped_; }
  void Finish() {
    if (dropped_ > 0) out_->push_back(fmt::format("... and {} more problems", dropped_));
    dropped_ = 0;
  }

 private:
  std::vector<std::string>* out_;
  size_t kept_ = 0;
  size_t dropped_ = 0;
};

// Names and strings from the image, made safe to put in a message.
inline std::string Printable(std::span<const uint8_t> bytes) {
  std::string s;
  for (uint8_t c : bytes) s.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
  return s;
}

// The fixed header fields ("Header"); fields absent from a version 2 header read as 0.
struct Header {
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 72;
  uint8_t compression_type = 0;
};

struct SnapshotInfo {
  std::string id;
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
};

struct BitmapInfo {
  std::string name;
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
};

// Everything Parse and Check need to know about one image.
struct Layout {
  ParseLimits limits;
  Header header;
  uint64_t file_size = 0;
  uint32_t cluster_size = 0;
  uint32_t l2_entry_bytes = 8;  // 16 with extended L2 entries
  uint64_t snapshot_table_bytes = 0;
  uint64_t bitmap_directory_offset = 0;
  uint64_t bitmap_directory_bytes = 0;  // 0 when there are no (consistent) bitmaps
  uint64_t crypto_offset = 0;
  uint64_t crypto_bytes = 0;
  std::vector<uint64_t> refcount_blocks;  // one per refcount table entry, masked; 0 = none
  std::vector<SnapshotInfo> snapshots;
  std::vector<BitmapInfo> bitmaps;
  // Every L2 table offset found in any L1 table (active and snapshots), one per reference: a
  // table shared by n L1 tables appears n times, as its refcount should count it n times.
  std::vector<uint64_t> l2_refs;
  std::vector<MetadataUnit> units;
  uint64_t unit_bytes = 0;
  uint64_t table_bytes_read = 0;  // all tables read so far, held to limits.max_metadata_bytes
  bool over_limits = false;       // some units or references were dropped for the limits
  std::vector<std::string> notes;

  bool dirty() const { return header.incompatible_features & kIncompatDirty; }
  bool external_data() const { return header.incompatible_features & kIncompatDataFile; }
  uint64_t ClusterOf(uint64_t offset) const { return offset >> header.cluster_bits; }
  bool Aligned(uint64_t offset) const { return (offset & (cluster_size - 1)) == 0; }
};

// Reads and validates the image's structure. Everything wrong with the content goes into
// `problems`; returns non-OK only when the file could not be read. When the header is too broken
// to locate anything, the layout stays partial and at least one problem says why.
Status ReadLayout(const ImageFile& file, const ParseLimits& limits, Layout* out,
                  ProblemList* problems);
// Decodes the first bytes of the file (at least 72); false when they are not a qcow2 header of a
// known version, with the reason in `problems`.
bool DecodeHeader(std::span<const uint8_t> bytes, Header* h, ProblemList* problems);

// Steps of ReadLayout that follow the header (qcow2_tables.cc).
Status ReadActiveL1(const ImageFile& file, Layout* layout, ProblemList* problems);
Status ReadRefcountTable(const ImageFile& file, Layout* layout, ProblemList* problems);
Status ReadSnapshots(const ImageFile& file, Layout* layout, ProblemList* problems);
Status ReadBitmapDirectory(const ImageFile& file, Layout* layout, ProblemList* problems);

// Reads a table of `bytes` at `offset`, already checked to lie inside the file. *ok is false when
// the table was not read: the file shrank meanwhile, or all tables together exceed
// limits.max_metadata_bytes (both reported as problems). Other read errors are returned.
Status ReadTable(const ImageFile& file, Layout* layout, uint64_t offset, uint64_t bytes,
                 std::vector<uint8_t>* out, bool* ok, ProblemList* problems);

// Whether [offset, offset + bytes) may hold a table: cluster-aligned, inside the file and within
// the limit. Names the table (`what`) in the problem otherwise.
bool CheckTablePlace(const Layout& layout, std::string_view what, uint64_t offset, uint64_t bytes,
                     uint64_t max_bytes, ProblemList* problems);

// Adds the clusters covering [offset, offset + bytes) as units of `kind`, unless the units would
// exceed limits.max_units or limits.max_metadata_bytes (then sets over_limits).
void AddClusterUnits(Layout* layout, uint64_t offset, uint64_t bytes, UnitKind kind,
                     bool moves_map);

}  // namespace vmetafs::store::qcow2
