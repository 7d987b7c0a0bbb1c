// qcow2 (versions 2 and 3): the metadata map and the format's own checks.
// Implements qemu's docs/interop/qcow2.txt: "Header", "Header extensions", "Host cluster
// management" (refcount table and blocks), "Cluster mapping" (L1/L2, extended L2 entries,
// compressed clusters), "Snapshots" and "Bitmaps" (bitmap directory and bitmap tables).
#pragma once

#include "store/formats/format.h"

namespace vmetafs::store {

class Qcow2Parser : public FormatParser {
 public:
  std::string_view Name() const override { return "qcow2"; }
  bool Probe(const ImageFile& file) const override;
  Status Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const override;
  Status Check(const ImageFile& file, const ParsedImage& parsed, const ParseLimits& limits,
               std::vector<std::string>* problems) const override;
  Status CheckAfterCrash(const ImageFile& file, const ParsedImage& parsed, const ImageFile& before,
                         const ParseLimits& limits, std::vector<std::string>* problems,
                         uint64_t* tolerated) const override;
};

}  // namespace vmetafs::store
