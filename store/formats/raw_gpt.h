// Raw disk images: the partition tables that locate everything a guest keeps on the disk.
// Implements the UEFI specification 2.10, section 5.2.1 "Legacy Master Boot Record" (with the
// extended boot record chain of logical partitions), 5.2.3 "Protective MBR", 5.3.2 "GPT Header"
// and 5.3.3 "GPT Partition Entry Array", for 512- and 4096-byte logical sectors.
//
// Units: the MBR (first 512 bytes) and each extended boot record; with a GPT, the primary header
// (LBA 1), its entry array, the backup header (normally the last LBA) and its entry array. When
// one GPT copy is damaged, its location is derived from the other copy or from the file size, so
// the map always names both. A raw file with neither an MBR signature nor a GPT header is not an
// image (Probe says no): there is nothing to protect.
#pragma once

#include "store/formats/format.h"

namespace vmetafs::store {

class RawGptParser : public FormatParser {
 public:
  std::string_view Name() const override { return "raw"; }
  bool Probe(const ImageFile& file) const override;
  Status Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const override;
  // The backup GPT header lives at the last LBA.
  bool MapDependsOnFileSize() const override { return true; }
};

}  // namespace vmetafs::store
