#include "store/formats/vhd.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "store/coding.h"
#include "store/formats/unit_list.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kFooterSize = 512;
constexpr uint64_t kOldFooterSize = 511;  // Virtual PC before 2004
constexpr uint64_t kHeaderSize = 1024;
constexpr uint64_t kSector = 512;
constexpr uint32_t kUnallocated = 0xFFFFFFFF;
constexpr uint32_t kTypeFixed = 2, kTypeDynamic = 3, kTypeDifferencing = 4;
constexpr size_t kFooterChecksumField = 64, kHeaderChecksumField = 36;
constexpr size_t kLocatorTable = 576, kLocatorCount = 8, kLocatorSize = 24;
constexpr size_t kMaxEntryProblems = 8;

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// "One's complement of the sum of all the bytes in the footer without the checksum field."
uint32_t VhdChecksum(std::span<const uint8_t> bytes, size_t field) {
  uint32_t sum = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i < field || i >= field + 4) sum += bytes[i];
  }
  return ~sum;
}

bool CookieAt(const ImageFile& file, uint64_t size, uint64_t offset) {
  uint8_t cookie[8];
  if (offset > size || size - offset < sizeof(cookie)) return false;
  return file.ReadAt(offset, cookie).ok() && std::memcmp(cookie, "conectix", 8) == 0;
}

struct Footer {
  uint64_t offset = 0;
  uint64_t length = 0;  // 0: not present
  std::string defect;   // empty when valid
  std::vector<uint8_t> bytes;
  uint64_t data_offset = 0, current_size = 0;
  uint32_t type = 0;

  bool present() const { return length != 0; }
  bool valid() const { return present() && defect.empty(); }
};

void DecodeFooter(Footer* f) {
  const uint8_t* p = f->bytes.data();
  if (std::memcmp(p, "conectix", 8) != 0) {
    f->defect = "no \"conectix\" cookie";
    return;
  }
  f->data_offset = LoadBe64(p + 16);
  f->current_size = LoadBe64(p + 48);
  f->type = LoadBe32(p + 60);
  const uint32_t stored = LoadBe32(p + kFooterChecksumField);
  const uint32_t computed = VhdChecksum(f->bytes, kFooterChecksumField);
  if (stored != computed) {
    f->defect =
        fmt::format("checksum mismatch (stored {:#010x}, computed {:#010x})", stored, computed);
  } else if (f->type != kTypeFixed && f->type != kTypeDynamic && f->type != kTypeDifferencing) {
    f->defect =
        fmt::format("disk type {} is not fixed (2), dynamic (3) or differencing (4)", f->type);
  }
}

// UTF-16BE parent name to UTF-8 (BMP only; anything else becomes '?'): for a note, not a path.
std::string ParentName(const uint8_t* p, size_t bytes) {
  std::string name;
  for (size_t i = 0; i + 1 < bytes; i += 2) {
    const uint16_t c = LoadBe16(p + i);
    if (c == 0) break;
    if (c < 0x80) {
      name.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      name.push_back(static_cast<char>(0xC0 | (c >> 6)));
      name.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c >= 0xD800 && c < 0xE000) {
      name.push_back('?');
    } else {
      name.push_back(static_cast<char>(0xE0 | (c >> 12)));
      name.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      name.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return name;
}

// One parse of one VHD: the footers, then (dynamic and differencing) the header, BAT, bitmaps
// and parent locators.
class VhdImage {
 public:
  VhdImage(const ImageFile& file, const ParseLimits& limits, uint64_t size, ParsedImage* out)
      : file_(file),
        limits_(limits),
        size_(size),
        out_(out),
        units_(limits, size, &out->problems) {}

  Status Run();
  // Check(): allocated blocks against each other and against the metadata units.
  void CheckBlocks(std::vector<std::string>* problems) const;

 private:
  Status ReadFooters();
  void ReportFooters();
  Status ReadHeader();
  Status ReadBat();
  void AddParentLocators(const uint8_t* header);
  void Problem(std::string text) { out_->problems.push_back(std::move(text)); }

  const ImageFile& file_;
  const ParseLimits& limits_;
  const uint64_t size_;
  ParsedImage* out_;
  UnitList units_;
  Footer head_, tail_;
  const Footer* footer_ = nullptr;  // the valid footer the image is read by
  uint64_t bat_offset_ = 0;
  uint32_t max_entries_ = 0;
  uint32_t block_size_ = 0, bitmap_size_ = 0;
  std::vector<uint32_t> bat_;
};

Status VhdImage::Run() {
  out_->format = "vhd";
  if (size_ < kFooterSize) {
    Problem(fmt::format("the file ({} bytes) is smaller than a VHD footer", size_));
    return Status::Ok();
  }
  VMETAFS_RETURN_IF_ERROR(ReadFooters());
  ReportFooters();
  if (tail_.present()) {
    units_.Add(tail_.offset, tail_.length, UnitKind::kFooter, true, "VHD footer");
  }
  if (footer_ != nullptr && footer_->type != kTypeFixed) {
    units_.Add(0, kFooterSize, UnitKind::kFooter, true, "VHD footer copy");
    VMETAFS_RETURN_IF_ERROR(ReadHeader());
  }
  units_.BuildMap(&out_->map);
  return Status::Ok();
}

// The footer at the end is found by its cookie: 512 bytes, or 511 for old Virtual PC images.
// Dynamic disks keep a copy at offset 0; fixed disks hold guest data there.
Status VhdImage::ReadFooters() {
  tail_.length = kFooterSize;
  if (!CookieAt(file_, size_, size_ - kFooterSize) &&
      CookieAt(file_, size_, size_ - kOldFooterSize)) {
    tail_.length = kOldFooterSize;
  }
  tail_.offset = size_ - tail_.length;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, tail_.offset, tail_.length, &tail_.bytes));
  tail_.bytes.resize(kFooterSize);  // the missing reserved byte of a 511-byte footer reads as 0
  DecodeFooter(&tail_);
  head_.length = kFooterSize;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, 0, kFooterSize, &head_.bytes));
  DecodeFooter(&head_);
  // A copy at 0 that is not a fixed disk's footer makes the image dynamic, whatever the end says.
  if (head_.valid() && head_.type != kTypeFixed) {
    footer_ = &head_;
  } else if (tail_.valid()) {
    footer_ = &tail_;
  }
  if (footer_ != nullptr) out_->virtual_size = footer_->current_size;
  if (footer_ == &tail_ && tail_.type == kTypeFixed) head_.length = 0;  // guest data, not a copy
  return Status::Ok();
}

void VhdImage::ReportFooters() {
  const bool dynamic = footer_ == nullptr || footer_->type != kTypeFixed;
  if (!tail_.valid()) {
    Problem(fmt::format("VHD footer at offset {}: {}; {}", tail_.offset, tail_.defect,
                        head_.valid() ? "copy at offset 0 valid" : "no valid copy at offset 0"));
  }
  if (dynamic && head_.present() && !head_.valid()) {
    Problem(fmt::format("VHD footer copy at offset 0: {}; footer at offset {} {}", head_.defect,
                        tail_.offset, tail_.valid() ? "valid" : "damaged too"));
  }
  if (dynamic && head_.valid() && tail_.valid() &&
      !std::equal(head_.bytes.begin(), head_.bytes.begin() + tail_.length, tail_.bytes.begin())) {
    Problem(fmt::format("VHD footer copy at offset 0 differs from the footer at offset {}",
                        tail_.offset));
  }
  if (footer_ != nullptr && footer_->type == kTypeFixed && tail_.offset < footer_->current_size) {
    Problem(
        fmt::format("fixed VHD: the data before the footer at offset {} is shorter than the "
                    "disk size {}",
                    tail_.offset, footer_->current_size));
  }
}

Status VhdImage::ReadHeader() {
  const uint64_t offset = footer_->data_offset;
  if (offset < kFooterSize || !units_.Fits(offset, kHeaderSize) ||
      offset + kHeaderSize > tail_.offset) {
    Problem(
        fmt::format("VHD footer's Data Offset {} does not leave room for the 1024-byte "
                    "dynamic disk header between offset 512 and the footer at offset {}",
                    offset, tail_.offset));
    return Status::Ok();
  }
  units_.Add(offset, kHeaderSize, UnitKind::kHeader, true, "VHD dynamic disk header");
  std::vector<uint8_t> h;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, offset, kHeaderSize, &h));
  if (std::memcmp(h.data(), "cxsparse", 8) != 0) {
    Problem(fmt::format("VHD dynamic disk header at offset {}: no \"cxsparse\" cookie", offset));
    return Status::Ok();
  }
  const uint32_t stored = LoadBe32(h.data() + kHeaderChecksumField);
  const uint32_t computed = VhdChecksum(h, kHeaderChecksumField);
  if (stored != computed) {
    Problem(
        fmt::format("VHD dynamic disk header at offset {}: checksum mismatch (stored {:#010x}, "
                    "computed {:#010x})",
                    offset, stored, computed));
    return Status::Ok();
  }
  bat_offset_ = LoadBe64(h.data() + 16);
  const uint32_t entries = LoadBe32(h.data() + 28);
  block_size_ = LoadBe32(h.data() + 32);
  if (block_size_ < kSector || (block_size_ & (block_size_ - 1)) != 0) {
    Problem(
        fmt::format("VHD dynamic disk header at offset {}: block size {} is not a power of "
                    "two of at least 512",
                    offset, block_size_));
    return Status::Ok();
  }
  out_->cluster_size = block_size_;
  bitmap_size_ = static_cast<uint32_t>(RoundUp(block_size_ / (8 * kSector), kSector));
  if (uint64_t{entries} * block_size_ < footer_->current_size) {
    Problem(
        fmt::format("VHD dynamic disk header at offset {}: {} BAT entries of {} bytes do not "
                    "cover the disk size {}",
                    offset, entries, block_size_, footer_->current_size));
    return Status::Ok();
  }
  if (footer_->type == kTypeDifferencing) {
    out_->notes.push_back("backing file: " + ParentName(h.data() + 64, 512));
  }
  AddParentLocators(h.data());
  max_entries_ = entries;
  return ReadBat();
}

void VhdImage::AddParentLocators(const uint8_t* header) {
  for (size_t i = 0; i < kLocatorCount; ++i) {
    const uint8_t* e = header + kLocatorTable + i * kLocatorSize;
    const uint32_t platform = LoadBe32(e), length = LoadBe32(e + 8);
    if (platform == 0 || length == 0) continue;
    const uint64_t offset = LoadBe64(e + 16);
    units_.Add(offset, RoundUp(length, kSector), UnitKind::kParentLocator, false,
               fmt::format("VHD parent locator {}", i + 1));
  }
}

// Each allocated block starts with its sector bitmap; bitmap and data end before the footer.
Status VhdImage::ReadBat() {
  const uint64_t bytes = uint64_t{max_entries_} * 4;
  if (bytes > limits_.max_table_bytes) {
    Problem(fmt::format("VHD BAT at offset {}: {} bytes exceed the parse limit of {}", bat_offset_,
                        bytes, limits_.max_table_bytes));
    return Status::Ok();
  }
  if (bat_offset_ < kFooterSize || bat_offset_ > tail_.offset ||
      RoundUp(bytes, kSector) > tail_.offset - bat_offset_) {
    Problem(
        fmt::format("VHD BAT at offset {} ({} entries) does not fit between offset 512 and "
                    "the footer at offset {}",
                    bat_offset_, max_entries_, tail_.offset));
    return Status::Ok();
  }
  const uint64_t table_end = bat_offset_ + RoundUp(bytes, kSector);
  units_.Add(bat_offset_, table_end - bat_offset_, UnitKind::kBat, true, "VHD BAT");
  std::vector<uint8_t> raw;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, bat_offset_, bytes, &raw));
  bat_.resize(max_entries_);
  size_t reported = 0;
  for (uint32_t i = 0; i < max_entries_; ++i) {
    bat_[i] = LoadBe32(raw.data() + uint64_t{i} * 4);
    if (bat_[i] == kUnallocated) continue;
    const uint64_t start = uint64_t{bat_[i]} * kSector;
    const uint64_t end = start + bitmap_size_ + block_size_;
    if (end > tail_.offset || start < table_end) {
      if (reported++ < kMaxEntryProblems) {
        Problem(
            fmt::format("VHD BAT entry {} at offset {} points to bytes {}..{}, outside the "
                        "data area {}..{}",
                        i, bat_offset_ + uint64_t{i} * 4, start, end, table_end, tail_.offset));
      }
      continue;
    }
    units_.Add(start, bitmap_size_, UnitKind::kSectorBitmap, false, "VHD sector bitmap");
  }
  return Status::Ok();
}

void VhdImage::CheckBlocks(std::vector<std::string>* problems) const {
  if ((bat_.size() + units_.units().size()) * sizeof(ClaimedRange) > limits_.max_check_memory) {
    problems->push_back("VHD BAT is too large to check within the memory limit");
    return;
  }
  std::vector<ClaimedRange> ranges;
  for (uint32_t i = 0; i < bat_.size(); ++i) {
    if (bat_[i] == kUnallocated) continue;
    const uint64_t start = uint64_t{bat_[i]} * kSector;
    ranges.push_back({start, start + bitmap_size_ + block_size_, i});
  }
  for (const MetadataUnit& u : units_.units()) {
    if (u.kind != UnitKind::kSectorBitmap) ranges.push_back({u.offset, u.end(), -1});
  }
  ReportOverlaps(
      std::move(ranges), kMaxEntryProblems,
      [](const ClaimedRange& a, const ClaimedRange& b) {
        if (a.index >= 0 && b.index >= 0) {
          return fmt::format("VHD blocks of BAT entries {} and {} overlap at offset {}", a.index,
                             b.index, b.start);
        }
        const ClaimedRange& block = a.index >= 0 ? a : b;
        const ClaimedRange& meta = a.index >= 0 ? b : a;
        return fmt::format("VHD block of BAT entry {} at offset {} overlaps metadata at offset {}",
                           block.index, block.start, meta.start);
      },
      problems);
}

}  // namespace

bool VhdParser::Probe(const ImageFile& file) const {
  uint64_t size = 0;
  if (!file.Size(&size).ok() || size < kFooterSize) return false;
  return CookieAt(file, size, 0) || CookieAt(file, size, size - kFooterSize) ||
         CookieAt(file, size, size - kOldFooterSize);
}

Status VhdParser::Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const {
  *out = ParsedImage{};
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  VhdImage image(file, limits, size, out);
  return image.Run();
}

Status VhdParser::Check(const ImageFile& file, const ParsedImage&, const ParseLimits& limits,
                        std::vector<std::string>* problems) const {
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  ParsedImage scratch;
  VhdImage image(file, limits, size, &scratch);
  VMETAFS_RETURN_IF_ERROR(image.Run());
  image.CheckBlocks(problems);
  return Status::Ok();
}

}  // namespace vmetafs::store
