// VHDX (Microsoft [MS-VHDX] VHDX Format Specification v1.0): 2.1 "File Type Identifier", 2.2
// "Headers", 2.3 "Region Table", 2.3.1 log (2.3.1.1 "Log Entry Header" and its CRC-32C), 2.5 "BAT"
// (payload and sector bitmap block entries) and 2.6 "Metadata Region" (file parameters, virtual
// disk size, logical sector size, parent locator). qemu's block/vhdx*.c implement the same.
//
// Units: the file type identifier (64 KiB at 0), both headers (4 KiB at 64 KiB and 128 KiB), both
// region tables (64 KiB at 192 KiB and 256 KiB), the log region, the BAT region, the metadata
// region, and the sector bitmap blocks of differencing disks. A log that needs replay is not a
// problem (qemu replays it on a read-write open): it is noted, and its entries' checksums are
// checked.
#pragma once

#include "store/formats/format.h"

namespace vmetafs::store {

class VhdxParser : public FormatParser {
 public:
  std::string_view Name() const override { return "vhdx"; }
  bool Probe(const ImageFile& file) const override;
  Status Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const override;
  // Payload and sector bitmap blocks against each other and against the metadata.
  Status Check(const ImageFile& file, const ParsedImage& parsed, const ParseLimits& limits,
               std::vector<std::string>* problems) const override;
};

}  // namespace vmetafs::store
