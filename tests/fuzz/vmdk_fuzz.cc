// libFuzzer target for the VMDK parser: any bytes as an image file, parsed under tight limits,
// and checked when the parse found the image valid. Neither may crash, hang or allocate beyond
// the limits, whatever the bytes say.
//
// Built with the other fuzz targets by tests/fuzz/CMakeLists.txt (tools/run-fuzz.sh). By hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/vmdk_fuzz.cc \
//     store/status.cc store/metadata_map.cc store/image_file.cc store/formats/*.cc -lfmt -lisal \
//     -lxxhash -o vmdk_fuzz
//   ./vmdk_fuzz -rss_limit_mb=1024 corpus/
// Seeds: `qemu-img create -f vmdk X 8M` (monolithicSparse), the same after a write and
//   converted with `-O vmdk -o subformat=streamOptimized`, and the descriptor of
//   `-o subformat=monolithicFlat`.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "store/formats/vmdk.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using vmetafs::store::MemoryImageFile;
  using vmetafs::store::ParsedImage;
  using vmetafs::store::ParseLimits;
  static const vmetafs::store::VmdkParser parser;
  ParseLimits limits;
  limits.max_metadata_bytes = 64 << 20;
  limits.max_units = 1 << 16;
  limits.max_table_bytes = 16 << 20;
  limits.max_check_memory = 64 << 20;
  MemoryImageFile file(std::vector<uint8_t>(data, data + size));
  (void)parser.Probe(file);
  ParsedImage parsed;
  if (!parser.Parse(file, limits, &parsed).ok() || !parsed.valid()) return 0;
  std::vector<std::string> problems;
  (void)parser.Check(file, parsed, limits, &problems);
  return 0;
}
