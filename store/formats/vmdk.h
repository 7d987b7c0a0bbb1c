// VMDK (VMware "Virtual Disk Format 1.1"): "The Descriptor File", "Hosted Sparse Extent Header",
// "Grain Directories and Grain Tables" (with the redundant copies) and "Stream-Optimized
// Compressed Sparse Extents" (markers, footer, end-of-stream). qemu's block/vmdk.c reads the same.
//
// Units. A sparse extent (monolithicSparse, one file of twoGbMaxExtentSparse, streamOptimized):
// the sparse header, the embedded descriptor, the grain directory and the redundant grain
// directory, every grain table of either, and for streams whose grain directory is at the end
// (gdOffset = GD_AT_END) the footer (a header copy at end - 1024) with its marker, the
// end-of-stream marker and the grain directory / grain table markers. A descriptor file
// ("# Disk DescriptorFile": monolithicFlat, twoGbMaxExtent*, vmfs...) is one descriptor unit, and
// the image: the extent files it names are opened through ImageFile::OpenExtent (numbered 1.. in
// the descriptor's order, in ParsedImage::extent_files and the notes as "extent: NAME"), and the
// units of each sparse extent file (as above) are units of the image with that extent index. An
// extent file that cannot be opened is a problem; a file with no storage around it (memory)
// notes the extents only. Check() checks every sparse extent's grains.
#pragma once

#include "store/formats/format.h"

namespace vmetafs::store {

class VmdkParser : public FormatParser {
 public:
  std::string_view Name() const override { return "vmdk"; }
  bool Probe(const ImageFile& file) const override;
  Status Parse(const ImageFile& file, const ParseLimits& limits, ParsedImage* out) const override;
  // Grain tables against their redundant copies, and grains inside the file, clear of metadata
  // and of each other.
  Status Check(const ImageFile& file, const ParsedImage& parsed, const ParseLimits& limits,
               std::vector<std::string>* problems) const override;
  // A descriptor file is one unit as long as the file; a stream's footer sits at its end.
  bool MapDependsOnFileSize() const override { return true; }
};

}  // namespace vmetafs::store
