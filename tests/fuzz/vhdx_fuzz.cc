// libFuzzer target for the VHDX parser: any bytes as an image file, parsed under tight limits,
// and checked when the parse found the image valid. Neither may crash, hang or allocate beyond
// the limits, whatever the bytes say.
//
// Built with the other fuzz targets by tests/fuzz/CMakeLists.txt (tools/run-fuzz.sh). By hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/vhdx_fuzz.cc \
//     store/status.cc store/metadata_map.cc store/image_file.cc store/formats/*.cc -lfmt -lisal \
//     -lxxhash -o vhdx_fuzz
//   ./vhdx_fuzz -rss_limit_mb=1024 corpus/
// Seeds: `qemu-img create -f vhdx -o block_size=1M,log_size=1M X 8M` (4 MiB), after
//   `qemu-io -c 'write 0 1M'`, and `-o subformat=fixed`; run with -max_len of the largest seed.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "store/formats/vhdx.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using vmetafs::store::MemoryImageFile;
  using vmetafs::store::ParsedImage;
  using vmetafs::store::ParseLimits;
  static const vmetafs::store::VhdxParser parser;
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
