#include "store/formats/vhdx.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "store/coding.h"
#include "store/formats/crc.h"
#include "store/formats/unit_list.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024;
constexpr uint64_t kIdentifierSize = 64 * kKiB;
constexpr uint64_t kHeaderOffsets[2] = {64 * kKiB, 128 * kKiB};
constexpr uint64_t kHeaderSize = 4 * kKiB;
constexpr uint64_t kRegionTableOffsets[2] = {192 * kKiB, 256 * kKiB};
constexpr uint64_t kRegionTableSize = 64 * kKiB;
constexpr uint64_t kHeaderSectionEnd = kMiB;
constexpr uint32_t kMaxTableEntries = 2047;  // region table and metadata table alike
constexpr uint64_t kLogSector = 4 * kKiB;
constexpr uint64_t kMetadataTableSize = 64 * kKiB;
constexpr uint64_t kSectorBitmapBlockSize = kMiB;
constexpr uint64_t kMaxVirtualSize = 64ull << 40;
constexpr uint64_t kSectorsPerBitmapBlock = 1ull << 23;  // MS-VHDX 2.5: chunk ratio numerator
constexpr size_t kChecksumField = 4;
constexpr size_t kMaxEntryProblems = 8;
constexpr uint64_t kBatOffsetMask = ~((1ull << 20) - 1);
constexpr uint8_t kPayloadFullyPresent = 6, kPayloadPartiallyPresent = 7, kPayloadInvalid = 4;
constexpr uint8_t kSectorBitmapPresent = 6;

// GUIDs as they lie on disk (the first three fields little-endian).
using Guid = std::array<uint8_t, 16>;
constexpr Guid kBatRegion = {0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42,
                             0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08};
constexpr Guid kMetadataRegion = {0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b,
                                  0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e};
constexpr Guid kFileParameters = {0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d,
                                  0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b};
constexpr Guid kVirtualDiskSize = {0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48,
                                   0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8};
constexpr Guid kLogicalSectorSize = {0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47,
                                     0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f};
constexpr Guid kParentLocator = {0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45,
                                 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c};
constexpr Guid kPage83Data = {0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45,
                              0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46};
constexpr Guid kPhysicalSectorSize = {0xc7, 0x48, 0xa3, 0xcd, 0x5d, 0x44, 0x71, 0x44,
                                      0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56};
constexpr Guid kZeroGuid = {};

Guid GuidAt(const uint8_t* p) {
  Guid g;
  std::memcpy(g.data(), p, g.size());
  return g;
}

std::string GuidText(const Guid& g) {
  return fmt::format("{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
                     LoadLe32(g.data()), LoadLe16(g.data() + 4), LoadLe16(g.data() + 6), g[8], g[9],
                     g[10], g[11], g[12], g[13], g[14], g[15]);
}

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

struct Header {
  uint64_t offset = 0;
  std::string defect;  // empty when valid
  uint64_t sequence = 0;
  Guid log_guid{};
  uint32_t log_length = 0;
  uint64_t log_offset = 0;
  bool valid() const { return defect.empty(); }
};

struct Region {
  uint64_t offset = 0;
  uint32_t length = 0;
  bool found = false;
};

struct RegionTable {
  uint64_t offset = 0;
  std::string defect;
  std::vector<uint8_t> bytes;
  Region bat, metadata;
  bool valid() const { return defect.empty(); }
};

void DecodeHeader(const std::vector<uint8_t>& b, Header* h) {
  const uint8_t* p = b.data();
  if (std::memcmp(p, "head", 4) != 0) {
    h->defect = "no \"head\" signature";
    return;
  }
  const uint32_t stored = LoadLe32(p + 4), computed = Crc32c(b, kChecksumField);
  if (stored != computed) {
    h->defect =
        fmt::format("CRC-32C mismatch (stored {:#010x}, computed {:#010x})", stored, computed);
    return;
  }
  h->sequence = LoadLe64(p + 8);
  h->log_guid = GuidAt(p + 48);
  const uint16_t version = LoadLe16(p + 66);
  h->log_length = LoadLe32(p + 68);
  h->log_offset = LoadLe64(p + 72);
  if (version != 1) h->defect = fmt::format("version {} is not 1", version);
}

void DecodeRegionTable(RegionTable* t) {
  const uint8_t* p = t->bytes.data();
  if (std::memcmp(p, "regi", 4) != 0) {
    t->defect = "no \"regi\" signature";
    return;
  }
  const uint32_t stored = LoadLe32(p + 4), computed = Crc32c(t->bytes, kChecksumField);
  if (stored != computed) {
    t->defect =
        fmt::format("CRC-32C mismatch (stored {:#010x}, computed {:#010x})", stored, computed);
    return;
  }
  const uint32_t count = LoadLe32(p + 8);
  if (count > kMaxTableEntries) {
    t->defect = fmt::format("{} entries exceed the maximum of {}", count, kMaxTableEntries);
    return;
  }
  for (uint32_t i = 0; i < count && t->valid(); ++i) {
    const uint8_t* e = p + 16 + 32 * i;
    const Guid guid = GuidAt(e);
    Region r{LoadLe64(e + 16), LoadLe32(e + 24), true};
    Region* slot = guid == kBatRegion ? &t->bat : guid == kMetadataRegion ? &t->metadata : nullptr;
    if (slot == nullptr && (LoadLe32(e + 28) & 1) != 0) {
      t->defect = fmt::format("entry {} is an unknown required region {}", i, GuidText(guid));
    } else if (slot != nullptr && slot->found) {
      t->defect = fmt::format("entry {} repeats region {}", i, GuidText(guid));
    } else if (slot != nullptr) {
      *slot = r;
    }
  }
  if (t->valid() && (!t->bat.found || !t->metadata.found)) {
    t->defect = t->bat.found ? "no metadata region entry" : "no BAT region entry";
  }
}

// UTF-16LE to UTF-8 (BMP only; anything else becomes '?'): for a note, not a path.
std::string Utf16LeText(const uint8_t* p, size_t bytes) {
  std::string s;
  for (size_t i = 0; i + 1 < bytes; i += 2) {
    const uint16_t c = LoadLe16(p + i);
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c >= 0xD800 && c < 0xE000) {
      s.push_back('?');
    } else {
      s.push_back(static_cast<char>(0xE0 | (c >> 12)));
      s.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return s;
}

// One parse of one VHDX, in the order the specification's open procedure reads the file.
class VhdxImage {
 public:
  VhdxImage(const ImageFile& file, const ParseLimits& limits, uint64_t size, ParsedImage* out)
      : file_(file),
        limits_(limits),
        size_(size),
        out_(out),
        units_(limits, size, &out->problems) {}

  Status Run();
  void CheckBlocks(std::vector<std::string>* problems) const;

 private:
  Status ReadHeaderSection();
  Status ReadLog();
  void ScanLog(const std::vector<uint8_t>& log);
  bool PlaceRegion(const Region& r, const char* what);
  Status ReadMetadata();
  bool DecodeMetadataTable(const std::vector<uint8_t>& region);
  void NoteParent(const uint8_t* item, uint32_t length);
  Status ReadBat();
  void CheckBatEntry(uint64_t index, uint64_t entry, size_t* reported);
  void Problem(std::string text) { out_->problems.push_back(std::move(text)); }

  const ImageFile& file_;
  const ParseLimits& limits_;
  const uint64_t size_;
  ParsedImage* out_;
  UnitList units_;
  Header headers_[2];
  RegionTable tables_[2];
  const Header* header_ = nullptr;      // the current header
  const RegionTable* table_ = nullptr;  // the region table in effect
  uint32_t block_size_ = 0, logical_sector_ = 0;
  uint64_t virtual_size_ = 0;
  bool has_parent_ = false;
  bool leave_blocks_allocated_ = false;
  uint64_t chunk_ratio_ = 0;
  std::vector<uint64_t> bat_;
};

Status VhdxImage::Run() {
  out_->format = "vhdx";
  if (size_ < kRegionTableOffsets[1] + kRegionTableSize) {
    Problem(fmt::format("the file ({} bytes) is too short for the VHDX header section", size_));
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(ReadHeaderSection());
  if (header_ != nullptr) VMETAFS_RETURN_IF_ERROR(ReadLog());
  if (table_ != nullptr) {
    VMETAFS_RETURN_IF_ERROR(ReadMetadata());
    if (block_size_ != 0) VMETAFS_RETURN_IF_ERROR(ReadBat());
  }
  units_.BuildMap(&out_->map);
  return Status::Ok();
}

// MS-VHDX 2.2: of two valid headers the one with the higher sequence number is current. Both
// copies of the region table must be valid and equal.
Status VhdxImage::ReadHeaderSection() {
  uint8_t id[8];
  VMETAFS_RETURN_IF_ERROR(file_.ReadAt(0, id));
  if (std::memcmp(id, "vhdxfile", 8) != 0) {
    Problem("VHDX file type identifier at offset 0: no \"vhdxfile\" signature");
  }
  units_.Add(0, kIdentifierSize, UnitKind::kFileIdentifier, false, "VHDX file type identifier");
  std::vector<uint8_t> bytes;
  for (int i = 0; i < 2; ++i) {
    Header& h = headers_[i];
    h.offset = kHeaderOffsets[i];
    VMETAFS_RETURN_IF_ERROR(ReadRange(file_, h.offset, kHeaderSize, &bytes));
    DecodeHeader(bytes, &h);
    units_.Add(h.offset, kHeaderSize, UnitKind::kHeader, true, "VHDX header");
    if (h.valid() && (header_ == nullptr || h.sequence > header_->sequence)) header_ = &h;
    RegionTable& t = tables_[i];
    t.offset = kRegionTableOffsets[i];
    VMETAFS_RETURN_IF_ERROR(ReadRange(file_, t.offset, kRegionTableSize, &t.bytes));
    DecodeRegionTable(&t);
    units_.Add(t.offset, kRegionTableSize, UnitKind::kRegionTable, true, "VHDX region table");
    if (t.valid() && table_ == nullptr) table_ = &t;
  }
  for (int i = 0; i < 2; ++i) {
    const Header& h = headers_[i];
    if (!h.valid()) {
      Problem(fmt::format("VHDX header {} at offset {}: {}; header {} {}", i + 1, h.offset,
                          h.defect, 2 - i, headers_[1 - i].valid() ? "valid" : "damaged too"));
    }
    const RegionTable& t = tables_[i];
    if (!t.valid()) {
      Problem(fmt::format("VHDX region table {} at offset {}: {}; region table {} {}", i + 1,
                          t.offset, t.defect, 2 - i,
                          tables_[1 - i].valid() ? "valid" : "damaged too"));
    }
  }
  if (tables_[0].valid() && tables_[1].valid() && tables_[0].bytes != tables_[1].bytes) {
    Problem(fmt::format("VHDX region tables at offsets {} and {} differ", tables_[0].offset,
                        tables_[1].offset));
  }
  return Status::Ok();
}

// A region (log, BAT, metadata) sits on 1 MiB boundaries after the header section, inside the
// file.
bool VhdxImage::PlaceRegion(const Region& r, const char* what) {
  if (r.offset % kMiB != 0 || r.length % kMiB != 0 || r.length == 0 ||
      r.offset < kHeaderSectionEnd || !units_.Fits(r.offset, r.length)) {
    Problem(
        fmt::format("VHDX {} at offset {} ({} bytes) is not a whole number of MiB on a MiB "
                    "boundary between the header section and the end of the file ({} bytes)",
                    what, r.offset, r.length, size_));
    return false;
  }
  return true;
}

Status VhdxImage::ReadLog() {
  const Region log{header_->log_offset, header_->log_length, true};
  if (log.length == 0 || !PlaceRegion(log, "log")) return Status::Ok();
  units_.Add(log.offset, log.length, UnitKind::kLog, false, "VHDX log");
  if (header_->log_guid == kZeroGuid) return Status::Ok();  // empty log: nothing to replay
  if (log.length > limits_.max_table_bytes) {
    Problem(fmt::format("VHDX log at offset {}: {} bytes exceed the parse limit of {}", log.offset,
                        log.length, limits_.max_table_bytes));
    return Status::Ok();
  }
  std::vector<uint8_t> bytes;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, log.offset, log.length, &bytes));
  ScanLog(bytes);
  return Status::Ok();
}

// MS-VHDX 2.3.1: entries of the current log GUID start on 4 KiB boundaries with "loge"; each is
// covered by a CRC-32C over its whole length (the log is circular, so an entry may wrap).
// Entries of other GUIDs are stale and ignored.
void VhdxImage::ScanLog(const std::vector<uint8_t>& log) {
  const uint64_t length = log.size(), base = header_->log_offset;
  uint64_t valid = 0;
  size_t reported = 0;
  std::vector<uint8_t> entry;
  for (uint64_t pos = 0; pos < length;) {
    const uint8_t* p = log.data() + pos;
    if (std::memcmp(p, "loge", 4) != 0 || GuidAt(p + 32) != header_->log_guid) {
      pos += kLogSector;
      continue;
    }
    const uint32_t entry_length = LoadLe32(p + 8);
    std::string defect;
    if (entry_length == 0 || entry_length % kLogSector != 0 || entry_length > length) {
      defect = fmt::format("length {} is not a multiple of 4 KiB within the log", entry_length);
    } else {
      entry.resize(entry_length);
      for (uint64_t i = 0; i < entry_length; ++i) entry[i] = log[(pos + i) % length];
      const uint32_t stored = LoadLe32(p + 4), computed = Crc32c(entry, kChecksumField);
      if (stored != computed) {
        defect =
            fmt::format("CRC-32C mismatch (stored {:#010x}, computed {:#010x})", stored, computed);
      }
    }
    if (defect.empty()) {
      ++valid;
      pos += entry_length;
    } else {
      if (reported++ < kMaxEntryProblems) {
        Problem(fmt::format("VHDX log entry at offset {}: {}", base + pos, defect));
      }
      pos += kLogSector;
    }
  }
  out_->notes.push_back(fmt::format(
      "VHDX log {} is not empty ({} valid entries): qemu replays it on a read-write open",
      GuidText(header_->log_guid), valid));
}

Status VhdxImage::ReadMetadata() {
  const Region& r = table_->metadata;
  if (!PlaceRegion(r, "metadata region")) return Status::Ok();
  units_.Add(r.offset, r.length, UnitKind::kMetadataRegion, true, "VHDX metadata region");
  if (r.length > limits_.max_table_bytes) {
    Problem(fmt::format("VHDX metadata region at offset {}: {} bytes exceed the parse limit of {}",
                        r.offset, r.length, limits_.max_table_bytes));
    return Status::Ok();
  }
  std::vector<uint8_t> bytes;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, r.offset, r.length, &bytes));
  if (!DecodeMetadataTable(bytes)) block_size_ = 0;
  return Status::Ok();
}

// MS-VHDX 2.6.1: the table of items at the region's start; 2.6.2: the system items.
bool VhdxImage::DecodeMetadataTable(const std::vector<uint8_t>& region) {
  const uint64_t where = table_->metadata.offset;
  const uint8_t* p = region.data();
  const uint16_t count = LoadLe16(p + 10);
  if (std::memcmp(p, "metadata", 8) != 0 || count > kMaxTableEntries) {
    Problem(
        fmt::format("VHDX metadata table at offset {}: no \"metadata\" signature or more "
                    "than {} entries",
                    where, kMaxTableEntries));
    return false;
  }
  bool have_params = false, have_size = false, have_sector = false;
  for (uint16_t i = 0; i < count; ++i) {
    const uint8_t* e = p + 32 + 32 * i;
    const Guid guid = GuidAt(e);
    const uint32_t off = LoadLe32(e + 16), len = LoadLe32(e + 20), flags = LoadLe32(e + 24);
    if (len != 0 &&
        (off < kMetadataTableSize || off > region.size() || len > region.size() - off)) {
      Problem(
          fmt::format("VHDX metadata entry {} at offset {}: item at {} ({} bytes) lies "
                      "outside the metadata region",
                      i, where + 32 + 32 * i, off, len));
      return false;
    }
    const uint8_t* item = p + off;
    if (guid == kFileParameters && len >= 8) {
      block_size_ = LoadLe32(item);
      leave_blocks_allocated_ = (LoadLe32(item + 4) & 1) != 0;  // a fixed disk
      has_parent_ = (LoadLe32(item + 4) & 2) != 0;
      have_params = true;
    } else if (guid == kVirtualDiskSize && len >= 8) {
      virtual_size_ = LoadLe64(item);
      have_size = true;
    } else if (guid == kLogicalSectorSize && len >= 4) {
      logical_sector_ = LoadLe32(item);
      have_sector = true;
    } else if (guid == kParentLocator) {
      NoteParent(item, len);
    } else if ((flags & 4) != 0 && guid != kPage83Data && guid != kPhysicalSectorSize) {
      Problem(fmt::format("VHDX metadata entry {} at offset {}: unknown required item {}", i,
                          where + 32 + 32 * i, GuidText(guid)));
      return false;
    }
  }
  if (!have_params || !have_size || !have_sector) {
    Problem(
        fmt::format("VHDX metadata table at offset {}: the file parameters, virtual disk "
                    "size or logical sector size item is missing",
                    where));
    return false;
  }
  if (!IsPowerOfTwo(block_size_) || block_size_ < kMiB || block_size_ > 256 * kMiB ||
      (logical_sector_ != 512 && logical_sector_ != 4096) || virtual_size_ == 0 ||
      virtual_size_ > kMaxVirtualSize || virtual_size_ % logical_sector_ != 0) {
    Problem(
        fmt::format("VHDX metadata at offset {}: block size {}, logical sector size {} or "
                    "virtual disk size {} is out of range",
                    where, block_size_, logical_sector_, virtual_size_));
    return false;
  }
  out_->virtual_size = virtual_size_;
  out_->cluster_size = block_size_;
  chunk_ratio_ = kSectorsPerBitmapBlock * logical_sector_ / block_size_;
  return true;
}

// MS-VHDX 2.6.2.6: key/value pairs of UTF-16LE strings; the parent's path makes the note.
void VhdxImage::NoteParent(const uint8_t* item, uint32_t length) {
  has_parent_ = true;
  if (length < 20) return;
  const uint16_t pairs = LoadLe16(item + 18);
  std::string path;
  for (uint32_t i = 0; i < pairs && 20 + 12 * (i + 1) <= length; ++i) {
    const uint8_t* e = item + 20 + 12 * i;
    const uint32_t key_off = LoadLe32(e), value_off = LoadLe32(e + 4);
    const uint16_t key_len = LoadLe16(e + 8), value_len = LoadLe16(e + 10);
    if (key_off > length || key_len > length - key_off || value_off > length ||
        value_len > length - value_off) {
      continue;
    }
    const std::string key = Utf16LeText(item + key_off, key_len);
    if (key == "relative_path" || (key == "absolute_win32_path" && path.empty())) {
      path = Utf16LeText(item + value_off, value_len);
    }
  }
  out_->notes.push_back("backing file: " + (path.empty() ? std::string("(unnamed)") : path));
}

// MS-VHDX 2.5: after every chunk_ratio payload entries comes one sector bitmap entry.
Status VhdxImage::ReadBat() {
  const Region& r = table_->bat;
  if (!PlaceRegion(r, "BAT region")) return Status::Ok();
  units_.Add(r.offset, r.length, UnitKind::kBat, true, "VHDX BAT region");
  const uint64_t data_blocks = (virtual_size_ + block_size_ - 1) / block_size_;
  const uint64_t bitmap_blocks = (data_blocks + chunk_ratio_ - 1) / chunk_ratio_;
  const uint64_t entries = has_parent_ ? bitmap_blocks * (chunk_ratio_ + 1)
                                       : data_blocks + (data_blocks - 1) / chunk_ratio_;
  if (entries * 8 > r.length || entries * 8 > limits_.max_table_bytes) {
    Problem(
        fmt::format("VHDX BAT region at offset {}: {} entries do not fit its {} bytes or the "
                    "parse limit of {} bytes",
                    r.offset, entries, r.length, limits_.max_table_bytes));
    return Status::Ok();
  }
  std::vector<uint8_t> bytes;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, r.offset, entries * 8, &bytes));
  bat_.resize(entries);
  size_t reported = 0;
  for (uint64_t i = 0; i < entries; ++i) {
    bat_[i] = LoadLe64(bytes.data() + i * 8);
    CheckBatEntry(i, bat_[i], &reported);
  }
  return Status::Ok();
}

void VhdxImage::CheckBatEntry(uint64_t index, uint64_t entry, size_t* reported) {
  const uint8_t state = entry & 7;
  const uint64_t offset = entry & kBatOffsetMask;
  const uint64_t where = table_->bat.offset + index * 8;
  const bool bitmap = index % (chunk_ratio_ + 1) == chunk_ratio_;
  std::string defect;
  uint64_t length = 0;
  if (bitmap) {
    if (state == kSectorBitmapPresent) length = kSectorBitmapBlockSize;
  } else if (state == kPayloadInvalid) {
    defect = "has the undefined payload block state 4";
  } else if (state == kPayloadPartiallyPresent && !has_parent_) {
    defect = "is partially present in a disk without a parent";
  } else if (state == kPayloadFullyPresent || state == kPayloadPartiallyPresent) {
    length = block_size_;
  }
  if (defect.empty() && length != 0 &&
      (offset < kHeaderSectionEnd || !units_.Fits(offset, length))) {
    defect = fmt::format("points to bytes {}..{}, outside the file's data area", offset,
                         offset + length);
  }
  if (!defect.empty()) {
    if ((*reported)++ < kMaxEntryProblems) {
      Problem(fmt::format("VHDX BAT entry {} at offset {} {}", index, where, defect));
    }
    return;
  }
  if (bitmap && length != 0) {
    units_.Add(offset, length, UnitKind::kSectorBitmap, false, "VHDX sector bitmap block");
  }
}

void VhdxImage::CheckBlocks(std::vector<std::string>* problems) const {
  if ((bat_.size() + units_.units().size()) * sizeof(ClaimedRange) > limits_.max_check_memory) {
    problems->push_back("VHDX BAT is too large to check within the memory limit");
    return;
  }
  std::vector<ClaimedRange> ranges;
  for (uint64_t i = 0; i < bat_.size(); ++i) {
    const uint8_t state = bat_[i] & 7;
    const uint64_t offset = bat_[i] & kBatOffsetMask;
    if (i % (chunk_ratio_ + 1) == chunk_ratio_) {
      if (state == kSectorBitmapPresent) {
        ranges.push_back({offset, offset + kSectorBitmapBlockSize, static_cast<int64_t>(i)});
      }
    } else if (state == kPayloadFullyPresent || state == kPayloadPartiallyPresent) {
      ranges.push_back({offset, offset + block_size_, static_cast<int64_t>(i)});
    }
  }
  for (const MetadataUnit& u : units_.units()) {
    if (u.kind != UnitKind::kSectorBitmap) ranges.push_back({u.offset, u.end(), -1});
  }
  // Blocks are allocated at the end of the file, so a whole block past everything referenced is
  // payload the BAT lost (a zeroed BAT is well-formed: every block "not present").
  uint64_t claimed_end = 0;
  for (const ClaimedRange& r : ranges) claimed_end = std::max(claimed_end, r.end);
  // A fixed disk's payload is preallocated whatever its BAT says.
  if (!leave_blocks_allocated_ && block_size_ != 0 && size_ >= claimed_end + block_size_) {
    problems->push_back(fmt::format(
        "VHDX file holds {} bytes past offset {} that no BAT entry or region references (lost "
        "BAT entries?)",
        size_ - claimed_end, claimed_end));
  }
  ReportOverlaps(
      std::move(ranges), kMaxEntryProblems,
      [](const ClaimedRange& a, const ClaimedRange& b) {
        if (a.index >= 0 && b.index >= 0) {
          return fmt::format("VHDX blocks of BAT entries {} and {} overlap at offset {}", a.index,
                             b.index, b.start);
        }
        const ClaimedRange& block = a.index >= 0 ? a : b;
        const ClaimedRange& meta = a.index >= 0 ? b : a;
        return fmt::format("VHDX block of BAT entry {} at offset {} overlaps metadata at offset {}",
                           block.index, block.start, meta.start);
      },
      problems);
}

}  // namespace

bool VhdxParser::Probe(const ImageFile& file) const {
  uint8_t id[8];
  return file.ReadAt(0, id).ok() && std::memcmp(id, "vhdxfile", 8) == 0;
}

Status VhdxParser::Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const {
  *out = ParsedImage{};
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  VhdxImage image(file, limits, size, out);
  return image.Run();
}

Status VhdxParser::Check(const ImageFile& file, const ParsedImage&, const ParseLimits& limits,
                         std::vector<std::string>* problems) const {
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  ParsedImage scratch;
  VhdxImage image(file, limits, size, &scratch);
  VMETAFS_RETURN_IF_ERROR(image.Run());
  image.CheckBlocks(problems);
  return Status::Ok();
}

}  // namespace vmetafs::store
