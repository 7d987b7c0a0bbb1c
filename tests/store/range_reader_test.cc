#include "store/range_reader.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::CountingFile;

std::vector<uint8_t> Pattern(size_t n) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(i * 7 + i / 251);
  return out;
}

// Fails every read that touches `bad_offset`.
class FailingFile : public MemoryImageFile {
 public:
  FailingFile(std::vector<uint8_t> bytes, uint64_t bad_offset)
      : MemoryImageFile(std::move(bytes)), bad_(bad_offset) {}
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override {
    if (offset <= bad_ && bad_ < offset + out.size()) return Status::IoError("bad sector", EIO);
    return MemoryImageFile::ReadAt(offset, out);
  }

 private:
  uint64_t bad_;
};

TEST_CASE("RangeReader hands out every range in order, as the file holds it", "[range_reader]") {
  const std::vector<uint8_t> bytes = Pattern(1 << 20);
  MemoryImageFile file(bytes);
  std::vector<ByteRange> ranges;
  // More ranges than readers and window, of varying sizes, some overlapping or repeated.
  for (uint64_t k = 0; k < 40; ++k) ranges.push_back({(k * 24571) % 900000, 1000 + k * 977});
  ranges.push_back(ranges.front());
  RangeReader reader(file, bytes.size(), ranges);
  std::vector<uint8_t> buf;
  for (size_t k = 0; k < ranges.size(); ++k) {
    REQUIRE(reader.Take(k, &buf).ok());
    const auto first = bytes.begin() + static_cast<ptrdiff_t>(ranges[k].offset);
    REQUIRE(buf == std::vector<uint8_t>(first, first + static_cast<ptrdiff_t>(ranges[k].length)));
  }
}

TEST_CASE("RangeReader reads bytes past the end of the file as zeros", "[range_reader]") {
  const std::vector<uint8_t> bytes = Pattern(10000);
  MemoryImageFile file(bytes);
  for (size_t count : {1, 3}) {  // one range is read inline, several on the readers
    std::vector<ByteRange> ranges(count, ByteRange{9000, 3000});
    ranges.push_back({20000, 100});  // wholly past the end
    RangeReader reader(file, bytes.size(), ranges);
    std::vector<uint8_t> buf(5000, 0xee);  // a previous range's buffer is reused, not trusted
    for (size_t k = 0; k < count; ++k) {
      REQUIRE(reader.Take(k, &buf).ok());
      std::vector<uint8_t> want(bytes.begin() + 9000, bytes.end());
      want.resize(3000, 0);
      REQUIRE(buf == want);
    }
    REQUIRE(reader.Take(count, &buf).ok());
    CHECK(buf == std::vector<uint8_t>(100, 0));
  }
}

TEST_CASE("RangeReader reports a failed read at its range, and stops", "[range_reader]") {
  FailingFile file(Pattern(1 << 20), 500000);
  std::vector<ByteRange> ranges;
  for (uint64_t k = 0; k < 20; ++k) ranges.push_back({k * 50000, 50000});
  RangeReader reader(file, 1 << 20, ranges);
  std::vector<uint8_t> buf;
  for (size_t k = 0; k < 10; ++k) REQUIRE(reader.Take(k, &buf).ok());
  Status failed = reader.Take(10, &buf);  // the range holding offset 500000
  CHECK(failed.Errno() == EIO);
  CHECK(reader.Take(11, &buf).Errno() == EIO);
}

TEST_CASE("RangeReader holds at most its window of bytes ahead of the consumer", "[range_reader]") {
  // 4 MiB ranges: the window holds 8 of them, far fewer than the readers.
  const uint64_t range = 4 << 20, count = 24;
  CountingFile file(Pattern(range * 2));
  std::vector<ByteRange> ranges;
  for (uint64_t k = 0; k < count; ++k) ranges.push_back({(k % 2) * range, range});
  RangeReader reader(file, range * 2, ranges);
  std::vector<uint8_t> buf;
  for (uint64_t k = 0; k < count; ++k) {
    // Give the readers time to run ahead as far as they may.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(file.read() <= k * range + RangeReader::kWindowBytes);
    REQUIRE(reader.Take(k, &buf).ok());
  }
  // A range larger than the window is still read.
  std::vector<ByteRange> big = {{0, range * 2}, {0, range * 2}};
  CountingFile two(Pattern(range * 2));
  RangeReader whole(two, range * 2, big);
  REQUIRE(whole.Take(0, &buf).ok());
  REQUIRE(whole.Take(1, &buf).ok());
  CHECK(buf == Pattern(range * 2));
}

TEST_CASE("RangeReader can be dropped with ranges still unread", "[range_reader]") {
  MemoryImageFile file(Pattern(1 << 20));
  std::vector<ByteRange> ranges(100, ByteRange{0, 65536});
  RangeReader reader(file, 1 << 20, ranges);
  std::vector<uint8_t> buf;
  REQUIRE(reader.Take(0, &buf).ok());
  // The destructor stops the readers and waits for the reads in flight.
}

}  // namespace
}  // namespace vmetafs::store
