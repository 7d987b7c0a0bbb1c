#include "store/formats/vmdk.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>

#include "store/coding.h"
#include "store/formats/unit_list.h"

namespace vmetafs::store {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint8_t kMagic[4] = {'K', 'D', 'M', 'V'};
constexpr std::string_view kDescriptorStart = "# Disk DescriptorFile";
constexpr uint64_t kGdAtEnd = ~0ull;
constexpr uint32_t kFlagNewlineTest = 1u << 0, kFlagRedundant = 1u << 1,
                   kFlagZeroedGrains = 1u << 2, kFlagCompressed = 1u << 16;
constexpr uint32_t kMarkerEndOfStream = 0, kMarkerGrainTable = 1, kMarkerGrainDirectory = 2,
                   kMarkerFooter = 3;
constexpr uint64_t kMaxGrainSectors = 0x200000;  // qemu's limit: 1 GiB grains
constexpr uint32_t kMaxGtesPerGt = 512;          // qemu's limit
constexpr uint64_t kMaxDescriptorFile = 1 << 20;
constexpr size_t kMaxEntryProblems = 8;

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

struct SparseHeader {
  uint32_t version = 0, flags = 0, gtes_per_gt = 0;
  uint64_t capacity = 0, grain = 0, descriptor_offset = 0, descriptor_size = 0;
  uint64_t rgd_offset = 0, gd_offset = 0, overhead = 0;
  bool unclean = false;
  std::string defect;
};

void DecodeHeader(const uint8_t* p, SparseHeader* h) {
  h->version = LoadLe32(p + 4);
  h->flags = LoadLe32(p + 8);
  h->capacity = LoadLe64(p + 12);
  h->grain = LoadLe64(p + 20);
  h->descriptor_offset = LoadLe64(p + 28);
  h->descriptor_size = LoadLe64(p + 36);
  h->gtes_per_gt = LoadLe32(p + 44);
  h->rgd_offset = LoadLe64(p + 48);
  h->gd_offset = LoadLe64(p + 56);
  h->overhead = LoadLe64(p + 64);
  h->unclean = p[72] != 0;
  if (std::memcmp(p, kMagic, 4) != 0) {
    h->defect = "no \"KDMV\" magic";
  } else if (h->version < 1 || h->version > 3) {
    h->defect = fmt::format("version {} is not 1, 2 or 3", h->version);
  } else if ((h->flags & kFlagNewlineTest) != 0 &&
             (p[73] != '\n' || p[74] != ' ' || p[75] != '\r' || p[76] != '\n')) {
    h->defect = "its newline test characters are altered (was it transferred in text mode?)";
  } else if (h->grain == 0 || h->grain > kMaxGrainSectors || (h->grain & (h->grain - 1)) != 0) {
    h->defect = fmt::format("grain size of {} sectors is not a power of two up to {}", h->grain,
                            kMaxGrainSectors);
  } else if (h->gtes_per_gt == 0 || h->gtes_per_gt > kMaxGtesPerGt) {
    h->defect =
        fmt::format("{} entries per grain table is not 1..{}", h->gtes_per_gt, kMaxGtesPerGt);
  } else if (h->capacity > (~0ull >> 9)) {
    h->defect = fmt::format("capacity of {} sectors is out of range", h->capacity);
  }
}

// A stream's metadata marker: {u64 sectors of metadata that follow, u32 size = 0, u32 type}.
// (A grain marker has a non-zero size: its compressed data follows at byte 12.)
bool IsMarker(const uint8_t* p, uint32_t type) {
  return LoadLe32(p + 8) == 0 && LoadLe32(p + 12) == type;
}

// `ACCESS SIZE TYPE "NAME" [OFFSET]`: the extent lines of a descriptor.
struct ExtentLine {
  uint64_t sectors = 0;
  std::string type, name;
};

bool ParseExtentLine(const std::string& line, ExtentLine* e) {
  std::istringstream in(line);
  std::string access;
  if (!(in >> access) || (access != "RW" && access != "RDONLY" && access != "NOACCESS")) {
    return false;
  }
  if (!(in >> e->sectors >> e->type)) return false;
  const size_t open = line.find('"');
  const size_t close = open == std::string::npos ? open : line.find('"', open + 1);
  if (close != std::string::npos) e->name = line.substr(open + 1, close - open - 1);
  return true;
}

// The value of `key="value"` or `key = "value"`, or empty.
std::string DescriptorValue(const std::string& line, std::string_view key) {
  if (line.compare(0, key.size(), key) != 0) return {};
  size_t i = line.find('=', key.size());
  if (i == std::string::npos || line.find_first_not_of(" \t", key.size()) != i) return {};
  std::string v = line.substr(i + 1);
  v.erase(0, v.find_first_not_of(" \t\""));
  v.erase(v.find_last_not_of(" \t\r\"") + 1);
  return v;
}

// Extent types whose file holds a sparse header, grain directories and tables (qemu: SPARSE,
// VMFSSPARSE); the others (FLAT, VMFS, VMFSRAW...) hold data only.
bool IsSparseType(const std::string& type) { return type == "SPARSE" || type == "VMFSSPARSE"; }

// One parse of one VMDK file: a sparse extent, or a descriptor file with the sparse extent files
// it names (each parsed as a nested VmdkImage whose units carry its extent index).
class VmdkImage {
 public:
  VmdkImage(const ImageFile& file, const ParseLimits& limits, uint64_t size, ParsedImage* out,
            bool nested = false)
      : file_(file),
        limits_(limits),
        size_(size),
        out_(out),
        nested_(nested),
        units_(limits, size, &out->problems) {}

  Status Run();
  Status CheckGrains(std::vector<std::string>* problems) const;

 private:
  // A sparse extent file of a descriptor, with its own parse.
  struct ExtentFile {
    uint16_t index = 0;
    std::string name;
    ParsedImage parsed;
    std::unique_ptr<VmdkImage> image;
  };

  Status RunDescriptorFile();
  Status OpenExtents(std::vector<MetadataUnit>* units);
  Status ParseExtent(uint16_t index, const ExtentLine& line, std::vector<MetadataUnit>* units);
  void ReadDescriptorText(std::string_view text, bool embedded);
  Status RunSparse(const uint8_t* first_sector);
  Status ReadFooter();
  Status ReadEmbeddedDescriptor();
  Status ReadDirectory(uint64_t offset, const char* what, std::vector<uint32_t>* gd);
  void CompareDirectories();
  Status AddGrainTables(const std::vector<uint32_t>& gd, uint64_t gd_offset, const char* what);
  Status AddMarkerBefore(uint64_t offset, uint32_t type);
  uint64_t BadGrains(const std::vector<uint8_t>& gt, uint64_t table, uint64_t gt_offset,
                     std::vector<ClaimedRange>* grains, std::vector<std::string>* problems,
                     size_t* reported) const;
  void Problem(std::string text) { out_->problems.push_back(std::move(text)); }

  const ImageFile& file_;
  const ParseLimits& limits_;
  const uint64_t size_;
  ParsedImage* out_;
  const bool nested_;  // an extent file of a descriptor: must be a sparse extent
  UnitList units_;
  std::vector<ExtentLine> extent_lines_;              // a descriptor file's, in order
  std::vector<std::unique_ptr<ExtentFile>> extents_;  // stable: each image points into its own
  SparseHeader header_;  // the header in effect (the footer's copy for GD_AT_END streams)
  bool gd_at_end_ = false;
  uint64_t gd_entries_ = 0, gt_bytes_ = 0;
  std::vector<uint32_t> gd_, rgd_;
};

Status VmdkImage::Run() {
  out_->format = "vmdk";
  if (size_ < kDescriptorStart.size()) {
    Problem(fmt::format("VMDK file of {} bytes is too short for a header or a descriptor", size_));
    return Status::Ok();
  }
  uint8_t first[kSector] = {};
  VMETAFS_RETURN_IF_ERROR(file_.ReadAt(0, std::span(first, std::min<uint64_t>(size_, kSector))));
  if (size_ >= kSector && std::memcmp(first, kMagic, 4) == 0) return RunSparse(first);
  if (std::string_view(reinterpret_cast<const char*>(first), std::min<uint64_t>(size_, kSector))
          .starts_with(kDescriptorStart)) {
    if (nested_) {
      Problem("VMDK extent file is a descriptor file, not a sparse extent");
      return Status::Ok();
    }
    return RunDescriptorFile();
  }
  Problem(
      "VMDK file at offset 0 has neither the \"KDMV\" sparse header magic nor a \"# Disk "
      "DescriptorFile\" line");
  return Status::Ok();
}

Status VmdkImage::RunDescriptorFile() {
  if (size_ > kMaxDescriptorFile) {
    Problem(fmt::format("VMDK descriptor file of {} bytes is larger than {} bytes", size_,
                        kMaxDescriptorFile));
    return Status::Ok();
  }
  std::vector<uint8_t> text;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, 0, size_, &text));
  units_.Add(0, size_, UnitKind::kDescriptor, true, "VMDK descriptor");
  ReadDescriptorText(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()),
                     false);
  std::vector<MetadataUnit> units = units_.units();
  VMETAFS_RETURN_IF_ERROR(OpenExtents(&units));
  std::string problem;
  if (!MetadataMap::Build(std::move(units), &out_->map, &problem)) {
    Problem(problem);
    out_->map = MetadataMap();
  }
  return Status::Ok();
}

// Extent files are numbered 1.. in the descriptor's order (extent 0 is the descriptor file).
// Every file is bound, data-only ones too, so that the image's identity covers them.
Status VmdkImage::OpenExtents(std::vector<MetadataUnit>* units) {
  uint16_t index = 0;
  for (const ExtentLine& line : extent_lines_) {
    if (line.type == "ZERO" || line.name.empty()) continue;
    if (index == UINT16_MAX) {
      Problem(fmt::format("VMDK descriptor names more than {} extent files", UINT16_MAX - 1));
      break;
    }
    VMETAFS_RETURN_IF_ERROR(ParseExtent(++index, line, units));
  }
  return Status::Ok();
}

Status VmdkImage::ParseExtent(uint16_t index, const ExtentLine& line,
                              std::vector<MetadataUnit>* units) {
  out_->extent_files.push_back(line.name);
  const ImageFile* file = nullptr;
  if (Status s = file_.OpenExtent(index, line.name, &file); !s.ok()) {
    if (s.code() ==
        Status::Code::kNotSupported) {  // bytes without a storage around them (tests, fuzzing)
      out_->notes.push_back("extent: " + line.name);
    } else {
      Problem(fmt::format("VMDK extent {} (\"{}\") named by the descriptor cannot be opened: {}",
                          index, line.name, s.ToString()));
    }
    return Status::Ok();
  }
  out_->notes.push_back("extent: " + line.name);
  if (!IsSparseType(line.type)) return Status::Ok();
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file->Size(&size));
  ExtentFile& e = *extents_.emplace_back(std::make_unique<ExtentFile>());
  e.index = index;
  e.name = line.name;
  e.image = std::make_unique<VmdkImage>(*file, limits_, size, &e.parsed, true);
  VMETAFS_RETURN_IF_ERROR(e.image->Run());
  for (const std::string& p : e.parsed.problems) {
    Problem(fmt::format("VMDK extent {} (\"{}\"): {}", index, line.name, p));
  }
  for (MetadataUnit u : e.parsed.map.units()) {
    u.extent = index;
    units->push_back(u);
  }
  return Status::Ok();
}

// Extent lines name the files that hold the data; an embedded descriptor names its own file.
void VmdkImage::ReadDescriptorText(std::string_view text, bool embedded) {
  std::istringstream in{std::string(text.substr(0, text.find('\0')))};
  std::string line;
  uint64_t sectors = 0, extents = 0;
  while (std::getline(in, line)) {
    line.erase(0, line.find_first_not_of(" \t"));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (std::string parent = DescriptorValue(line, "parentFileNameHint"); !parent.empty()) {
      out_->notes.push_back("backing file: " + parent);
    }
    ExtentLine e;
    if (!ParseExtentLine(line, &e)) continue;
    ++extents;
    sectors += e.sectors;
    if (!embedded) extent_lines_.push_back(std::move(e));
  }
  if (!embedded) {
    out_->virtual_size = sectors * kSector;
    if (extents == 0) Problem("VMDK descriptor at offset 0 declares no extents");
  }
}

Status VmdkImage::RunSparse(const uint8_t* first_sector) {
  DecodeHeader(first_sector, &header_);
  units_.Add(0, kSector, UnitKind::kHeader, true, "VMDK sparse header");
  if (!header_.defect.empty()) {
    Problem("VMDK sparse header at offset 0: " + header_.defect);
    units_.BuildMap(&out_->map);
    return Status::Ok();
  }
  if (header_.unclean) out_->notes.push_back("VMDK extent was not closed cleanly");
  gd_at_end_ = header_.gd_offset == kGdAtEnd;
  if (gd_at_end_) {
    VMETAFS_RETURN_IF_ERROR(ReadFooter());
    if (!header_.defect.empty()) {
      units_.BuildMap(&out_->map);
      return Status::Ok();
    }
  }
  out_->virtual_size = header_.capacity * kSector;
  out_->cluster_size = static_cast<uint32_t>(std::min<uint64_t>(header_.grain * kSector, ~0u));
  VMETAFS_RETURN_IF_ERROR(ReadEmbeddedDescriptor());
  const uint64_t per_gt = header_.grain * header_.gtes_per_gt;
  gd_entries_ = (header_.capacity + per_gt - 1) / per_gt;
  gt_bytes_ = RoundUp(uint64_t{header_.gtes_per_gt} * 4, kSector);
  VMETAFS_RETURN_IF_ERROR(ReadDirectory(header_.gd_offset, "grain directory", &gd_));
  const bool redundant = (header_.flags & kFlagRedundant) != 0 && header_.rgd_offset != 0;
  if (redundant) {
    VMETAFS_RETURN_IF_ERROR(ReadDirectory(header_.rgd_offset, "redundant grain directory", &rgd_));
  }
  CompareDirectories();
  VMETAFS_RETURN_IF_ERROR(AddGrainTables(gd_, header_.gd_offset, "grain directory"));
  VMETAFS_RETURN_IF_ERROR(AddGrainTables(rgd_, header_.rgd_offset, "redundant grain directory"));
  units_.BuildMap(&out_->map);
  return Status::Ok();
}

// Streams written front to back keep the real header in a footer: footer marker, footer (a
// header whose gdOffset is real), end-of-stream marker, in the last three sectors.
Status VmdkImage::ReadFooter() {
  const uint64_t end = size_ / kSector * kSector;
  if (end < 4 * kSector) {
    header_.defect = "stream is too short for a footer";
    Problem(
        "VMDK sparse header at offset 0 puts the grain directory at the end, but the file is "
        "too short for a footer");
    return Status::Ok();
  }
  std::vector<uint8_t> tail;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, end - 3 * kSector, 3 * kSector, &tail));
  SparseHeader footer;
  DecodeHeader(tail.data() + kSector, &footer);
  if (!IsMarker(tail.data(), kMarkerFooter)) {
    footer.defect = fmt::format("no footer marker at offset {}", end - 3 * kSector);
  } else if (!IsMarker(tail.data() + 2 * kSector, kMarkerEndOfStream) ||
             LoadLe64(tail.data() + 2 * kSector) != 0) {
    footer.defect = fmt::format("no end-of-stream marker at offset {}", end - kSector);
  } else if (footer.defect.empty() && footer.gd_offset == kGdAtEnd) {
    footer.defect = "its grain directory offset is GD_AT_END too";
  }
  units_.Add(end - 3 * kSector, kSector, UnitKind::kMarker, false, "VMDK footer marker");
  units_.Add(end - 2 * kSector, kSector, UnitKind::kHeader, true, "VMDK footer");
  units_.Add(end - kSector, kSector, UnitKind::kMarker, false, "VMDK end-of-stream marker");
  if (!footer.defect.empty()) {
    Problem(fmt::format("VMDK footer at offset {}: {}", end - 2 * kSector, footer.defect));
  }
  header_ = footer;
  return Status::Ok();
}

Status VmdkImage::ReadEmbeddedDescriptor() {
  const uint64_t offset = header_.descriptor_offset, sectors = header_.descriptor_size;
  if (offset == 0 || sectors == 0) return Status::Ok();
  if (offset > size_ / kSector || sectors > kMaxDescriptorFile / kSector) {
    Problem(
        fmt::format("VMDK embedded descriptor at sector {} ({} sectors) lies outside the file "
                    "or is larger than {} bytes",
                    offset, sectors, kMaxDescriptorFile));
    return Status::Ok();
  }
  if (!units_.Add(offset * kSector, sectors * kSector, UnitKind::kDescriptor, true,
                  "VMDK embedded descriptor")) {
    return Status::Ok();
  }
  std::vector<uint8_t> text;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, offset * kSector, sectors * kSector, &text));
  ReadDescriptorText(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()),
                     true);
  return Status::Ok();
}

Status VmdkImage::ReadDirectory(uint64_t offset, const char* what, std::vector<uint32_t>* gd) {
  const uint64_t bytes = gd_entries_ * 4;
  if (bytes > limits_.max_table_bytes) {
    Problem(fmt::format("VMDK {} at sector {}: {} bytes exceed the parse limit of {}", what, offset,
                        bytes, limits_.max_table_bytes));
    return Status::Ok();
  }
  if (bytes == 0) return Status::Ok();
  if (offset == 0 || offset > size_ / kSector ||
      !units_.Add(offset * kSector, RoundUp(bytes, kSector), UnitKind::kGrainDirectory, true,
                  fmt::format("VMDK {}", what))) {
    Problem(fmt::format("VMDK {} at sector {} ({} bytes) does not lie inside the file", what,
                        offset, bytes));
    return Status::Ok();
  }
  std::vector<uint8_t> raw;
  VMETAFS_RETURN_IF_ERROR(ReadRange(file_, offset * kSector, bytes, &raw));
  gd->resize(gd_entries_);
  for (uint64_t i = 0; i < gd_entries_; ++i) (*gd)[i] = LoadLe32(raw.data() + i * 4);
  if (gd_at_end_) return AddMarkerBefore(offset * kSector, kMarkerGrainDirectory);
  return Status::Ok();
}

// Both directories allocate the same grain tables; an entry allocated in one copy only, or
// pointing outside the file in one copy only, names the copy that is off.
void VmdkImage::CompareDirectories() {
  if (gd_.empty() || rgd_.empty()) return;
  size_t reported = 0;
  for (uint64_t i = 0; i < gd_entries_ && reported < kMaxEntryProblems; ++i) {
    if ((gd_[i] == 0) != (rgd_[i] == 0)) {
      ++reported;
      Problem(fmt::format(
          "VMDK grain directory entry {} at offset {} is {:#x} but the redundant grain directory "
          "entry at offset {} is {:#x}: the {} copy has lost a grain table",
          i, header_.gd_offset * kSector + i * 4, gd_[i], header_.rgd_offset * kSector + i * 4,
          rgd_[i], gd_[i] == 0 ? "primary" : "redundant"));
    }
  }
}

// A grain table must lie inside the file after the header; two entries never share one.
Status VmdkImage::AddGrainTables(const std::vector<uint32_t>& gd, uint64_t gd_offset,
                                 const char* what) {
  std::vector<std::pair<uint32_t, uint64_t>> seen;  // (sector, entry)
  size_t reported = 0;
  for (uint64_t i = 0; i < gd.size(); ++i) {
    if (gd[i] == 0) continue;
    const uint64_t offset = uint64_t{gd[i]} * kSector;
    if (!units_.Fits(offset, gt_bytes_)) {
      if (reported++ < kMaxEntryProblems) {
        Problem(
            fmt::format("VMDK {} entry {} at offset {} points to a grain table at offset {} "
                        "past the end of the file",
                        what, i, gd_offset * kSector + i * 4, offset));
      }
      continue;
    }
    if (!units_.Add(offset, gt_bytes_, UnitKind::kGrainTable, false, "VMDK grain table")) break;
    if (gd_at_end_) VMETAFS_RETURN_IF_ERROR(AddMarkerBefore(offset, kMarkerGrainTable));
    seen.emplace_back(gd[i], i);
  }
  std::sort(seen.begin(), seen.end());
  for (size_t i = 1; i < seen.size(); ++i) {
    if (seen[i].first == seen[i - 1].first) {
      Problem(fmt::format("VMDK {} entries {} and {} both point to the grain table at offset {}",
                          what, seen[i - 1].second, seen[i].second,
                          uint64_t{seen[i].first} * kSector));
      break;
    }
  }
  return Status::Ok();
}

// In a stream, the sector before a grain directory or table holds its marker.
Status VmdkImage::AddMarkerBefore(uint64_t offset, uint32_t type) {
  if (offset < 2 * kSector) return Status::Ok();
  uint8_t marker[kSector];
  VMETAFS_RETURN_IF_ERROR(file_.ReadAt(offset - kSector, marker));
  if (IsMarker(marker, type)) {
    units_.Add(offset - kSector, kSector, UnitKind::kMarker, false, "VMDK marker");
  }
  return Status::Ok();
}

// Counts the entries of one grain table that point outside the file or into metadata; with
// `grains` given, collects the others and reports the bad ones.
uint64_t VmdkImage::BadGrains(const std::vector<uint8_t>& gt, uint64_t table, uint64_t gt_offset,
                              std::vector<ClaimedRange>* grains, std::vector<std::string>* problems,
                              size_t* reported) const {
  const bool zeroed = (header_.flags & kFlagZeroedGrains) != 0;
  const uint64_t grain_bytes =
      (header_.flags & kFlagCompressed) != 0 ? kSector : header_.grain * kSector;
  uint64_t bad = 0;
  for (uint32_t j = 0; j < header_.gtes_per_gt; ++j) {
    const uint32_t e = LoadLe32(gt.data() + uint64_t{j} * 4);
    if (e == 0 || (e == 1 && zeroed)) continue;
    const uint64_t start = uint64_t{e} * kSector;
    const bool inside = units_.Fits(start, grain_bytes);
    const auto touching =
        inside ? out_->map.Touching(0, start, grain_bytes) : std::span<const MetadataUnit>();
    if (inside && touching.empty()) {
      if (grains != nullptr) {
        grains->push_back(
            {start, start + grain_bytes, static_cast<int64_t>(table * header_.gtes_per_gt + j)});
      }
      continue;
    }
    ++bad;
    if (grains != nullptr && (*reported)++ < kMaxEntryProblems) {
      problems->push_back(fmt::format(
          "VMDK grain table {} at offset {}: entry {} points to a grain at offset {} {}", table,
          gt_offset, j, start,
          inside ? fmt::format("inside the {} at offset {}", UnitKindName(touching[0].kind),
                               touching[0].offset)
                 : std::string("past the end of the file")));
    }
  }
  return bad;
}

Status VmdkImage::CheckGrains(std::vector<std::string>* problems) const {
  for (const std::unique_ptr<ExtentFile>& e : extents_) {
    if (!e->parsed.valid()) continue;
    std::vector<std::string> found;
    VMETAFS_RETURN_IF_ERROR(e->image->CheckGrains(&found));
    for (const std::string& p : found) {
      problems->push_back(fmt::format("VMDK extent {} (\"{}\"): {}", e->index, e->name, p));
    }
  }
  if (gd_.size() * header_.gtes_per_gt * sizeof(ClaimedRange) > limits_.max_check_memory) {
    problems->push_back("VMDK grain tables are too large to check within the memory limit");
    return Status::Ok();
  }
  std::vector<ClaimedRange> grains;
  std::vector<uint8_t> gt, rgt;
  size_t reported = 0, differing = 0;
  for (uint64_t i = 0; i < gd_.size(); ++i) {
    const uint64_t offset = uint64_t{gd_[i]} * kSector;
    if (gd_[i] == 0 || !units_.Fits(offset, gt_bytes_)) continue;
    VMETAFS_RETURN_IF_ERROR(ReadRange(file_, offset, gt_bytes_, &gt));
    const uint64_t bad = BadGrains(gt, i, offset, &grains, problems, &reported);
    if (rgd_.size() != gd_.size() || rgd_[i] == 0) continue;
    const uint64_t roffset = uint64_t{rgd_[i]} * kSector;
    if (!units_.Fits(roffset, gt_bytes_)) continue;
    VMETAFS_RETURN_IF_ERROR(ReadRange(file_, roffset, gt_bytes_, &rgt));
    if (rgt == gt || differing++ >= kMaxEntryProblems) continue;
    const uint64_t rbad = BadGrains(rgt, i, roffset, nullptr, nullptr, nullptr);
    problems->push_back(fmt::format(
        "VMDK grain table {} at offset {} differs from its redundant copy at offset {}: {}", i,
        offset, roffset,
        bad > 0 && rbad == 0   ? fmt::format("the primary copy has {} entries pointing outside "
                                               "the file or into metadata, the redundant copy is "
                                               "consistent",
                                             bad)
        : rbad > 0 && bad == 0 ? fmt::format("the redundant copy has {} entries pointing outside "
                                             "the file or into metadata, the primary copy is "
                                             "consistent",
                                             rbad)
                               : std::string("both copies are internally consistent")));
  }
  // Grains are appended to the file: bytes past all metadata that no grain table references mean
  // lost tables (zeroed directories are well-formed: every grain "not allocated").
  if (grains.empty()) {
    uint64_t claimed_end = header_.overhead * kSector;
    for (const MetadataUnit& u : units_.units()) claimed_end = std::max(claimed_end, u.end());
    if (size_ >= claimed_end + header_.grain * kSector && header_.grain != 0) {
      problems->push_back(fmt::format(
          "VMDK file holds {} bytes past offset {} but no grain table references a grain (lost "
          "grain directory or tables?)",
          size_ - claimed_end, claimed_end));
    }
  }
  ReportOverlaps(
      std::move(grains), kMaxEntryProblems,
      [this](const ClaimedRange& a, const ClaimedRange& b) {
        return fmt::format(
            "VMDK grains {} and {} (grain table {}, {}) overlap at "
            "offset {}",
            a.index, b.index, a.index / header_.gtes_per_gt, b.index / header_.gtes_per_gt,
            b.start);
      },
      problems);
  return Status::Ok();
}

}  // namespace

bool VmdkParser::Probe(const ImageFile& file) const {
  uint64_t size = 0;
  if (!file.Size(&size).ok() || size < kDescriptorStart.size()) return false;
  char head[kDescriptorStart.size()];
  if (!file.ReadAt(0, std::span(reinterpret_cast<uint8_t*>(head), sizeof(head))).ok()) return false;
  return std::memcmp(head, kMagic, 4) == 0 ||
         std::string_view(head, sizeof(head)) == kDescriptorStart;
}

Status VmdkParser::Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const {
  *out = ParsedImage{};
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  VmdkImage image(file, limits, size, out);
  return image.Run();
}

Status VmdkParser::Check(const ImageFile& file, const ParsedImage&, const ParseLimits& limits,
                         std::vector<std::string>* problems) const {
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(file.Size(&size));
  ParsedImage scratch;
  VmdkImage image(file, limits, size, &scratch);
  VMETAFS_RETURN_IF_ERROR(image.Run());
  return image.CheckGrains(problems);
}

}  // namespace vmetafs::store
