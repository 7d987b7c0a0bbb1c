// FormatParser: turns an image's bytes into its metadata map and judges the image by its format's
// own rules. One implementation per format in this directory; each is pure (no state, no I/O
// except through the ImageFile it is given) and safe to call from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "store/image_file.h"
#include "store/metadata_map.h"
#include "store/status.h"

namespace vmetafs::store {

// Bounds that keep absurd headers from costing unbounded memory or time. A header whose tables
// exceed them is reported as a problem, never allocated.
struct ParseLimits {
  uint64_t max_metadata_bytes = 4ull << 30;  // sum of all units
  uint64_t max_units = 16ull << 20;
  uint64_t max_table_bytes = 512ull << 20;  // one table read into memory (an L1, a BAT...)
  uint64_t max_check_memory = 1ull << 30;   // Check()'s reference counters
};

// The result of parsing one image.
struct ParsedImage {
  std::string format;         // "qcow2", "vhd", "vhdx", "vmdk", "raw"
  uint64_t virtual_size = 0;  // guest-visible size in bytes
  uint32_t cluster_size = 0;  // allocation unit where the format has one, else 0
  MetadataMap map;            // valid only when problems is empty
  // Violations of the format's rules (bad magic, offsets past the end of the file, misaligned or
  // overlapping tables, bad checksums). Empty means structurally valid. Each names the structure
  // and the offset, in words an admin can act on.
  std::vector<std::string> problems;
  // Informational notes that are not problems (e.g. "backing file: base.qcow2").
  std::vector<std::string> notes;
  // Multi-file images (VMDK): the other files of the image as the primary file names them
  // (relative to its directory); extent_files[i] holds the units with extent i + 1.
  std::vector<std::string> extent_files;

  bool valid() const { return problems.empty(); }
};

class FormatParser {
 public:
  virtual ~FormatParser() = default;
  virtual std::string_view Name() const = 0;
  // True when the file's content says it is of this format (magic numbers). Cheap: reads a few
  // sectors at most. Errors reading count as "no".
  virtual bool Probe(const ImageFile& file) const = 0;
  // Derives the map. Returns a non-OK Status only when the file could not be read; everything
  // wrong with the content goes into out->problems.
  virtual Status Parse(const ImageFile& file, const ParseLimits& limits,
                       ParsedImage* out) const = 0;
  // True when the map depends on the file's size (a VHD footer is always the last 512 bytes; a
  // GPT backup header sits at the last LBA): a write or truncate that changes the size moves the
  // map.
  virtual bool MapDependsOnFileSize() const { return false; }
  // The deep consistency check run when deciding whether a change made outside the mount is
  // legitimate: allocation accounting against references (qcow2 refcounts vs L1/L2/..., VHD BAT
  // against file size...). Appends problems (leaked or doubly used clusters count as problems).
  // `parsed` is a valid result of Parse on the same file. The default finds nothing.
  virtual Status Check(const ImageFile& file, const ParsedImage& parsed, const ParseLimits& limits,
                       std::vector<std::string>* problems) const;
  // Check after the image's writer stopped uncleanly (daemon or host crash), with qemu's rule
  // for that case: clusters allocated but referenced by nothing, which an allocation in flight
  // leaves behind, are not problems (qemu-img check calls them leaks, not corruption). A leaked
  // cluster that `before` references is a problem all the same: the image lost a reference (a
  // zeroed L1 or L2 table leaks everything behind it). `before` is the same image as last known
  // good (the journal's view); when it cannot be walked, leaks stay problems. *tolerated counts
  // the leaked clusters not reported. The default is Check (formats without leaks).
  virtual Status CheckAfterCrash(const ImageFile& file, const ParsedImage& parsed,
                                 const ImageFile& before, const ParseLimits& limits,
                                 std::vector<std::string>* problems, uint64_t* tolerated) const;
};

// The parsers vmetafs knows, in probing order (most specific magic first).
const std::vector<const FormatParser*>& AllFormats();
// The first parser whose Probe() accepts the file, or nullptr.
const FormatParser* DetectFormat(const ImageFile& file);
// The parser called `name`, or nullptr.
const FormatParser* FormatByName(std::string_view name);

}  // namespace vmetafs::store
