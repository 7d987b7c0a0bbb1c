// VHD (Microsoft Virtual Hard Disk Image Format Specification, version 1.0, October 2006):
// "Hard Disk Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data
// Blocks" (with the per-block sector bitmap) and the parent locator entries of differencing
// disks. qemu calls the format "vpc" (block/vpc.c).
//
// Units. Fixed disks: the footer, the last 512 bytes of the file. Dynamic and differencing
// disks: the footer copy at offset 0, the dynamic disk header (1024 bytes at the footer's Data
// Offset), the BAT, each allocated block's sector bitmap, each parent locator's data, and the
// footer at the end of the file, which moves whenever the file grows. Images made by Virtual PC
// before 2004 carry a 511-byte footer; the spec allows it, and it is mapped as such.
#pragma once

#include "store/formats/format.h"

namespace vmetafs::store {

class VhdParser : public FormatParser {
 public:
  std::string_view Name() const override { return "vhd"; }
  bool Probe(const ImageFile& file) const override;
  Status Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const override;
  // Blocks against each other and against the metadata: no two claim the same bytes.
  Status Check(const ImageFile& file, const ParsedImage& parsed, const ParseLimits& limits,
               std::vector<std::string>* problems) const override;
  // The footer is always at the end of the file.
  bool MapDependsOnFileSize() const override { return true; }
};

}  // namespace vmetafs::store
