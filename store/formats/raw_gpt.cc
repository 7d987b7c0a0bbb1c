#include "store/formats/raw_gpt.h"

#include <fmt/format.h>

#include <cstring>
#include <set>

#include "store/coding.h"
#include "store/formats/crc.h"
#include "store/formats/unit_list.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kMbrSize = 512;
constexpr uint8_t kGptSignature[8] = {'E', 'F', 'I', ' ', 'P', 'A', 'R', 'T'};
constexpr uint32_t kGptMinHeaderSize = 92;
constexpr uint32_t kGptMinEntrySize = 128;
constexpr size_t kHeaderCrcField = 16;
constexpr int kMaxExtendedBootRecords = 256;
constexpr size_t kMaxEntryProblems = 8;

bool HasMbrSignature(const uint8_t* sector) { return sector[510] == 0x55 && sector[511] == 0xAA; }
bool IsExtendedType(uint8_t type) { return type == 0x05 || type == 0x0F || type == 0x85; }
uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// Errors and short files count as "no signature": this only steers detection.
bool GptSignatureAt(const ImageFile& file, uint64_t size, uint64_t offset) {
  uint8_t sig[8];
  if (offset > size || size - offset < sizeof(sig)) return false;
  if (!file.ReadAt(offset, sig).ok()) return false;
  return std::memcmp(sig, kGptSignature, sizeof(sig)) == 0;
}

struct GptHeader {
  const char* name = "";  // "primary" or "backup"
  uint64_t lba = 0;
  uint64_t offset = 0;
  std::string defect;          // why the header is unusable; empty when it is valid
  std::string entries_defect;  // why its entry array is unusable; empty when it is valid
  uint32_t header_size = 0, num_entries = 0, entry_size = 0, entries_crc = 0;
  uint64_t my_lba = 0, alternate_lba = 0, first_usable = 0, last_usable = 0, entries_lba = 0;
  uint8_t disk_guid[16] = {};
  std::vector<uint8_t> entries;

  bool valid() const { return defect.empty(); }
  bool entries_valid() const { return valid() && entries_defect.empty(); }
  uint64_t EntriesBytes() const { return uint64_t{num_entries} * entry_size; }
};

// One parse of one raw image. Holds the facts found so far; the steps below fill them in order.
class RawImage {
 public:
  RawImage(const ImageFile& file, const ParseLimits& limits, uint64_t size, ParsedImage* out)
      : file_(file),
        limits_(limits),
        size_(size),
        out_(out),
        units_(limits, size, &out->problems) {}

  Status Run();

 private:
  Status ReadMbr();
  Status FollowExtendedBootRecords();
  bool FindGpt();
  Status ReadHeader(GptHeader* h, uint64_t lba, uint64_t expected_my_lba);
  void DecodeHeader(const std::vector<uint8_t>& sector, uint64_t expected_my_lba, GptHeader* h);
  Status ReadEntries(GptHeader* h);
  void CheckPartitions(const GptHeader& h);
  void ReportCopies();
  void CrossCheck();
  void AddGptUnits();
  void Problem(std::string text) { out_->problems.push_back(std::move(text)); }

  const ImageFile& file_;
  const ParseLimits& limits_;
  const uint64_t size_;
  ParsedImage* out_;
  UnitList units_;
  uint8_t mbr_[kMbrSize] = {};
  bool protective_ = false;
  uint32_t sector_ = 512;
  uint64_t last_lba_ = 0;
  GptHeader primary_, backup_;
};

Status RawImage::Run() {
  out_->format = "raw";
  out_->virtual_size = size_;
  if (size_ < kMbrSize) {
    Problem(fmt::format("the file ({} bytes) is smaller than one sector: no MBR", size_));
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(ReadMbr());
  if (!FindGpt()) {
    if (protective_) {
      Problem(
          "MBR at offset 0 is a protective MBR (partition type 0xEE) but no GPT header was found "
          "at LBA 1 or at the last LBA, for 512- or 4096-byte sectors");
    } else if (!HasMbrSignature(mbr_)) {
      Problem("MBR at offset 0 has no 0x55AA signature and no GPT header was found");
    } else {
      VMETAFS_RETURN_IF_ERROR(FollowExtendedBootRecords());
    }
    units_.BuildMap(&out_->map);
    return Status::Ok();
  }
  out_->notes.push_back(fmt::format("GPT with {}-byte logical sectors", sector_));
  if (!HasMbrSignature(mbr_)) Problem("protective MBR at offset 0 has no 0x55AA signature");
  VMETAFS_RETURN_IF_ERROR(ReadHeader(&primary_, 1, 1));
  // The backup is where the primary says; with the primary gone, at the end of the file.
  uint64_t backup_lba = last_lba_;
  if (primary_.valid() && primary_.alternate_lba > 1 && primary_.alternate_lba <= last_lba_) {
    backup_lba = primary_.alternate_lba;
  }
  VMETAFS_RETURN_IF_ERROR(ReadHeader(&backup_, backup_lba, backup_lba));
  VMETAFS_RETURN_IF_ERROR(ReadEntries(&primary_));
  VMETAFS_RETURN_IF_ERROR(ReadEntries(&backup_));
  ReportCopies();
  CrossCheck();
  AddGptUnits();
  units_.BuildMap(&out_->map);
  return Status::Ok();
}

Status RawImage::ReadMbr() {
  VMETAFS_RETURN_IF_ERROR(file_.ReadAt(0, mbr_));
  units_.Add(0, kMbrSize, UnitKind::kMbr, true, "MBR");
  for (int i = 0; i < 4; ++i) {
    if (mbr_[446 + 16 * i + 4] == 0xEE) protective_ = true;
  }
  return Status::Ok();
}

// Logical partitions hang off a chain of extended boot records inside the extended partition;
// each EBR's second entry points at the next one, relative to the extended partition's start.
Status RawImage::FollowExtendedBootRecords() {
  for (int i = 0; i < 4; ++i) {
    const uint8_t* entry = mbr_ + 446 + 16 * i;
    if (!IsExtendedType(entry[4])) continue;
    const uint64_t start = LoadLe32(entry + 8);
    std::set<uint64_t> seen;
    uint64_t lba = start;
    for (int n = 0; n < kMaxExtendedBootRecords; ++n) {
      const uint64_t offset = lba * kMbrSize;
      if (!seen.insert(lba).second) {
        Problem(fmt::format("extended boot record chain loops back to offset {}", offset));
        break;
      }
      if (!units_.Add(offset, kMbrSize, UnitKind::kMbr, true, "extended boot record")) break;
      uint8_t ebr[kMbrSize];
      VMETAFS_RETURN_IF_ERROR(file_.ReadAt(offset, ebr));
      if (!HasMbrSignature(ebr)) {
        Problem(fmt::format("extended boot record at offset {} has no 0x55AA signature", offset));
        break;
      }
      const uint8_t* next = ebr + 446 + 16;
      if (!IsExtendedType(next[4]) || LoadLe32(next + 8) == 0) break;
      lba = start + LoadLe32(next + 8);
    }
  }
  return Status::Ok();
}

// The sector size is where "EFI PART" is: LBA 1 at 512 or 4096, else the backup at the last LBA.
bool RawImage::FindGpt() {
  for (uint32_t sector : {512u, 4096u}) {
    if (GptSignatureAt(file_, size_, sector)) {
      sector_ = sector;
      last_lba_ = size_ / sector - 1;
      return true;
    }
  }
  for (uint32_t sector : {512u, 4096u}) {
    if (size_ < 3ull * sector) continue;
    const uint64_t last = size_ / sector - 1;
    if (GptSignatureAt(file_, size_, last * sector)) {
      sector_ = sector;
      last_lba_ = last;
      return true;
    }
  }
  return false;
}

Status RawImage::ReadHeader(GptHeader* h, uint64_t lba, uint64_t expected_my_lba) {
  h->name = (h == &primary_) ? "primary" : "backup";
  h->lba = lba;
  h->offset = lba * sector_;
  if (!units_.Fits(h->offset, sector_)) {
    h->defect = "lies past the end of the file";
    return Status::Ok();
  }
  std::vector<uint8_t> sector;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, h->offset, sector_, &sector));
  DecodeHeader(sector, expected_my_lba, h);
  return Status::Ok();
}

void RawImage::DecodeHeader(const std::vector<uint8_t>& s, uint64_t expected_my_lba, GptHeader* h) {
  if (std::memcmp(s.data(), kGptSignature, 8) != 0) {
    h->defect = "no \"EFI PART\" signature";
    return;
  }
  const uint8_t* p = s.data();
  h->header_size = LoadLe32(p + 12);
  if (h->header_size < kGptMinHeaderSize || h->header_size > sector_) {
    h->defect =
        fmt::format("header size {} is outside {}..{}", h->header_size, kGptMinHeaderSize, sector_);
    return;
  }
  const uint32_t stored = LoadLe32(p + kHeaderCrcField);
  const uint32_t computed = Crc32(std::span(p, h->header_size), kHeaderCrcField);
  if (stored != computed) {
    h->defect =
        fmt::format("CRC32 mismatch (stored {:#010x}, computed {:#010x})", stored, computed);
    return;
  }
  h->my_lba = LoadLe64(p + 24);
  h->alternate_lba = LoadLe64(p + 32);
  h->first_usable = LoadLe64(p + 40);
  h->last_usable = LoadLe64(p + 48);
  std::memcpy(h->disk_guid, p + 56, 16);
  h->entries_lba = LoadLe64(p + 72);
  h->num_entries = LoadLe32(p + 80);
  h->entry_size = LoadLe32(p + 84);
  h->entries_crc = LoadLe32(p + 88);
  if (h->my_lba != expected_my_lba) {
    h->defect = fmt::format("MyLBA is {}, expected {}", h->my_lba, expected_my_lba);
  } else if (h->entry_size < kGptMinEntrySize || (h->entry_size & (h->entry_size - 1)) != 0) {
    h->defect =
        fmt::format("partition entry size {} is not 128 times a power of two", h->entry_size);
  } else if (h->EntriesBytes() > limits_.max_table_bytes) {
    h->defect = fmt::format("partition entry array of {} bytes exceeds the parse limit of {}",
                            h->EntriesBytes(), limits_.max_table_bytes);
  } else if (h->first_usable > h->last_usable + 1 || h->last_usable > last_lba_) {
    h->defect = fmt::format("usable LBAs {}..{} do not fit the disk's {} sectors", h->first_usable,
                            h->last_usable, last_lba_ + 1);
  } else if (h->entries_lba == 0 || h->entries_lba == h->my_lba) {
    h->defect = fmt::format("PartitionEntryLBA {} overlaps the MBR or the header", h->entries_lba);
  }
}

Status RawImage::ReadEntries(GptHeader* h) {
  if (!h->valid() || h->num_entries == 0) return Status::Ok();
  const uint64_t bytes = h->EntriesBytes();
  const uint64_t offset = h->entries_lba * sector_;
  if (h->entries_lba > last_lba_ || !units_.Fits(offset, RoundUp(bytes, sector_))) {
    h->entries_defect = fmt::format("{} bytes reach past the end of the file", bytes);
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, offset, bytes, &h->entries));
  const uint32_t computed = Crc32(h->entries);
  if (computed != h->entries_crc) {
    h->entries_defect =
        fmt::format("CRC32 mismatch at offset {} (stored {:#010x}, computed {:#010x})", offset,
                    h->entries_crc, computed);
  }
  return Status::Ok();
}

// Partitions must stay inside the usable LBAs the header announces.
void RawImage::CheckPartitions(const GptHeader& h) {
  size_t reported = 0;
  static constexpr uint8_t kUnused[16] = {};
  for (uint32_t i = 0; i < h.num_entries && reported < kMaxEntryProblems; ++i) {
    const uint8_t* e = h.entries.data() + uint64_t{i} * h.entry_size;
    if (std::memcmp(e, kUnused, 16) == 0) continue;
    const uint64_t first = LoadLe64(e + 32), last = LoadLe64(e + 40);
    if (first < h.first_usable || last < first || last > h.last_usable) {
      Problem(fmt::format(
          "{} GPT partition entry {} at offset {} spans LBAs {}..{}, outside the usable {}..{}",
          h.name, i + 1, h.entries_lba * sector_ + uint64_t{i} * h.entry_size, first, last,
          h.first_usable, h.last_usable));
      ++reported;
    }
  }
}

void RawImage::ReportCopies() {
  for (const GptHeader* h : {&primary_, &backup_}) {
    const GptHeader& other = (h == &primary_) ? backup_ : primary_;
    if (!h->valid()) {
      Problem(fmt::format("{} GPT header at offset {}: {}; {} {}", h->name, h->offset, h->defect,
                          other.name, other.valid() ? "valid" : "damaged too"));
    } else if (!h->entries_defect.empty()) {
      // A defect may be an LBA far past the end: name the LBA, whose offset may not exist.
      Problem(fmt::format("{} GPT partition entry array at LBA {}: {}; {} {}", h->name,
                          h->entries_lba, h->entries_defect, other.name,
                          other.entries_valid() ? "valid" : "damaged too"));
    } else {
      CheckPartitions(*h);
    }
  }
  if (backup_.lba < last_lba_ && backup_.valid() && primary_.valid() &&
      primary_.alternate_lba == backup_.lba) {
    // What growing a disk leaves (qemu-img resize, truncate): both copies agree on where the
    // backup is, and the guest's tools move it to the new end when they next write the GPT.
    out_->notes.push_back(fmt::format(
        "backup GPT header at LBA {} is not at the last LBA {} of the file (the file grew)",
        backup_.lba, last_lba_));
  } else if (backup_.lba != last_lba_) {
    Problem(fmt::format(
        "backup GPT header at offset {} (LBA {}) is not at the last LBA {} of the file; was the "
        "file resized?",
        backup_.offset, backup_.lba, last_lba_));
  } else if (primary_.valid() && primary_.alternate_lba != last_lba_) {
    Problem(fmt::format("primary GPT header at offset {}: AlternateLBA {} is not the last LBA {}",
                        primary_.offset, primary_.alternate_lba, last_lba_));
  }
  if (backup_.valid() && backup_.alternate_lba != 1) {
    Problem(fmt::format("backup GPT header at offset {}: AlternateLBA is {}, expected 1",
                        backup_.offset, backup_.alternate_lba));
  }
}

// Two valid copies must describe the same disk.
void RawImage::CrossCheck() {
  if (!primary_.valid() || !backup_.valid()) return;
  const GptHeader &p = primary_, &b = backup_;
  const char* field = nullptr;
  if (std::memcmp(p.disk_guid, b.disk_guid, 16) != 0) {
    field = "the disk GUID";
  } else if (p.first_usable != b.first_usable || p.last_usable != b.last_usable) {
    field = "the usable LBAs";
  } else if (p.num_entries != b.num_entries || p.entry_size != b.entry_size) {
    field = "the partition entry count or size";
  } else if (p.entries_valid() && b.entries_valid() && p.entries != b.entries) {
    field = "the partition entries";
  }
  if (field != nullptr) {
    Problem(fmt::format("primary GPT header at offset {} and backup at offset {} disagree on {}",
                        p.offset, b.offset, field));
  }
}

// A damaged copy's entry array is placed where the other copy's geometry puts it: right after
// the primary header, right before the backup header.
void RawImage::AddGptUnits() {
  const GptHeader* geometry = primary_.valid() ? &primary_ : backup_.valid() ? &backup_ : nullptr;
  units_.Add(primary_.offset, sector_, UnitKind::kGptHeader, true, "primary GPT header");
  units_.Add(backup_.offset, sector_, UnitKind::kGptHeader, true, "backup GPT header");
  if (geometry == nullptr || geometry->num_entries == 0) return;
  const uint64_t bytes = RoundUp(geometry->EntriesBytes(), sector_);
  const uint64_t sectors = bytes / sector_;
  const uint64_t primary_lba = primary_.valid() ? primary_.entries_lba : 2;
  const uint64_t backup_lba = backup_.valid()             ? backup_.entries_lba
                              : backup_.lba > sectors + 1 ? backup_.lba - sectors
                                                          : 0;
  for (auto [lba, what] : {std::pair{primary_lba, "primary GPT partition entry array"},
                           std::pair{backup_lba, "backup GPT partition entry array"}}) {
    if (lba != 0 && units_.Fits(lba * sector_, bytes)) {
      units_.Add(lba * sector_, bytes, UnitKind::kGptEntries, true, what);
    }
  }
}

}  // namespace

bool RawGptParser::Probe(const ImageFile& file) const {
  uint64_t size = 0;
  if (!file.Size(&size).ok() || size < kMbrSize) return false;
  uint8_t mbr[kMbrSize];
  if (!file.ReadAt(0, mbr).ok()) return false;
  return HasMbrSignature(mbr) || GptSignatureAt(file, size, 512) ||
         GptSignatureAt(file, size, 4096);
}

Status RawGptParser::Parse(const ImageFile& file, const ParseLimits& limits,
                           ParsedImage* out) const {
  *out = ParsedImage{};
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  RawImage image(file, limits, size, out);
  return image.Run();
}

}  // namespace vmetafs::store
