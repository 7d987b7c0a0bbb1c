// libFuzzer target: arbitrary bytes parsed as a qcow2 image under tight limits, and checked when
// the parse finds them valid. Neither may crash, leak, or allocate beyond the limits.
//
// Built with the other fuzz targets by tests/fuzz/CMakeLists.txt (tools/run-fuzz.sh). By hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/qcow2_fuzz.cc \
//     store/status.cc store/metadata_map.cc store/image_file.cc store/formats/*.cc -lfmt -lisal \
//     -lxxhash -o qcow2_fuzz
//   ./qcow2_fuzz -max_len=65536 -rss_limit_mb=512 corpus/
// A seed corpus: small images from `qemu-img create -f qcow2 -o cluster_size=512 x.qcow2 1M`
// after a few `qemu-io -c 'write ...'`, with and without snapshots and bitmaps.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "store/formats/qcow2.h"
#include "store/image_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using vmetafs::store::MemoryImageFile;
  using vmetafs::store::ParsedImage;
  using vmetafs::store::ParseLimits;
  static const vmetafs::store::Qcow2Parser parser;

  MemoryImageFile file(std::vector<uint8_t>(data, data + size));
  ParseLimits limits;
  limits.max_metadata_bytes = 16 << 20;
  limits.max_units = 1 << 16;
  limits.max_table_bytes = 4 << 20;
  limits.max_check_memory = 16 << 20;

  (void)parser.Probe(file);
  ParsedImage parsed;
  // A memory file cannot fail to read: every fault in the bytes must come back as a problem.
  if (!parser.Parse(file, limits, &parsed).ok()) __builtin_trap();
  if (parsed.valid()) {
    std::vector<std::string> problems;
    if (!parser.Check(file, parsed, limits, &problems).ok()) __builtin_trap();
  }
  return 0;
}
