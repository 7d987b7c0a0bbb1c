#include "store/image_file.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <vector>

#include "tests/test_images.h"

namespace vmetafs::store {
namespace {

using testing::CountingFile;

std::vector<uint8_t> Bytes(std::initializer_list<int> values) {
  std::vector<uint8_t> out;
  for (int v : values) out.push_back(static_cast<uint8_t>(v));
  return out;
}

std::vector<uint8_t> ReadOrFail(const ImageFile& file, uint64_t offset, size_t len) {
  // One spare byte keeps the buffer non-null for empty reads (memcpy of 0 bytes from or to a
  // null pointer is undefined behaviour, which the sanitizer build flags).
  std::vector<uint8_t> out(len + 1, 0xee);
  Status st = file.ReadAt(offset, std::span<uint8_t>(out).first(len));
  INFO(st.ToString());
  REQUIRE(st.ok());
  out.pop_back();
  return out;
}

uint64_t SizeOf(const ImageFile& file) {
  uint64_t size = 12345;
  REQUIRE(file.Size(&size).ok());
  return size;
}

TEST_CASE("MemoryImageFile reads inside the file and refuses reads past its end", "[image_file]") {
  MemoryImageFile file(Bytes({1, 2, 3, 4, 5}));
  CHECK(SizeOf(file) == 5);
  CHECK(ReadOrFail(file, 0, 5) == Bytes({1, 2, 3, 4, 5}));
  CHECK(ReadOrFail(file, 3, 2) == Bytes({4, 5}));
  CHECK(ReadOrFail(file, 5, 0).empty());  // an empty read at the end is fine

  std::vector<uint8_t> buf(2);
  Status st = file.ReadAt(4, buf);  // one byte inside, one past
  CHECK(st.code() == Status::Code::kInvalidArgument);
  CHECK(file.ReadAt(6, std::span<uint8_t>(buf.data(), 0)).code() == Status::Code::kInvalidArgument);
  // Offsets so large that offset + length wraps around must not pass the bounds check.
  CHECK(file.ReadAt(UINT64_MAX, buf).code() == Status::Code::kInvalidArgument);
  CHECK(file.ReadAt(UINT64_MAX - 1, buf).code() == Status::Code::kInvalidArgument);
}

TEST_CASE("MemoryImageFile writes overwrite and grow with zeros", "[image_file]") {
  MemoryImageFile file(Bytes({1, 2, 3}));
  REQUIRE(file.WriteAt(1, Bytes({9})).ok());
  CHECK(file.bytes() == Bytes({1, 9, 3}));
  REQUIRE(file.WriteAt(5, Bytes({7, 8})).ok());
  CHECK(file.bytes() == Bytes({1, 9, 3, 0, 0, 7, 8}));
  CHECK(SizeOf(file) == 7);
  FileIdentity id;
  REQUIRE(file.Identity(&id).ok());
  CHECK(id.size == 7);
  CHECK(file.Sync().ok());
}

TEST_CASE("OverlayImageFile lays patches over the base, later ones winning", "[image_file]") {
  MemoryImageFile base(Bytes({10, 11, 12, 13, 14, 15, 16, 17}));
  OverlayImageFile view(base);
  CHECK(ReadOrFail(view, 0, 8) == base.bytes());

  view.Add(2, Bytes({20, 21, 22}));
  view.Add(3, Bytes({30}));  // later, overlapping: wins where it overlaps
  CHECK(ReadOrFail(view, 0, 8) == Bytes({10, 11, 20, 30, 22, 15, 16, 17}));
  CHECK(ReadOrFail(view, 3, 2) == Bytes({30, 22}));
  CHECK(ReadOrFail(view, 5, 3) == Bytes({15, 16, 17}));
  CHECK(SizeOf(view) == 8);

  // The base is untouched, and the view cannot be written.
  CHECK(base.bytes() == Bytes({10, 11, 12, 13, 14, 15, 16, 17}));
  CHECK(view.WriteAt(0, Bytes({1})).code() == Status::Code::kNotSupported);
}

TEST_CASE("OverlayImageFile grows past the base's end; reads past the view's end fail",
          "[image_file]") {
  MemoryImageFile base(Bytes({1, 2, 3, 4}));
  OverlayImageFile view(base);
  view.Add(6, Bytes({60, 61}));  // leaves a gap [4, 6) that reads as zeros
  CHECK(SizeOf(view) == 8);
  CHECK(ReadOrFail(view, 0, 8) == Bytes({1, 2, 3, 4, 0, 0, 60, 61}));
  CHECK(ReadOrFail(view, 3, 4) == Bytes({4, 0, 0, 60}));
  CHECK(ReadOrFail(view, 5, 1) == Bytes({0}));

  std::vector<uint8_t> buf(2);
  CHECK(view.ReadAt(7, buf).code() == Status::Code::kInvalidArgument);
  CHECK(view.ReadAt(9, std::span<uint8_t>(buf.data(), 1)).code() == Status::Code::kInvalidArgument);

  // A later patch over the grown part wins there as well.
  view.Add(5, Bytes({50, 51}));
  CHECK(ReadOrFail(view, 4, 4) == Bytes({0, 50, 51, 61}));

  // The view's identity is the base's: the overlay is not a different file.
  FileIdentity base_id, view_id;
  REQUIRE(base.Identity(&base_id).ok());
  REQUIRE(view.Identity(&view_id).ok());
  CHECK(view_id == base_id);
}

TEST_CASE("OverlayImageFile reads the base only between patches", "[image_file]") {
  CountingFile base(Bytes({10, 11, 12, 13, 14, 15, 16, 17}));
  OverlayImageFile view(base);
  view.Add(0, Bytes({20, 21, 22}));
  view.Add(5, Bytes({25, 26}));
  CHECK(ReadOrFail(view, 0, 3) == Bytes({20, 21, 22}));
  CHECK(base.read() == 0);  // wholly patched: the base is not read
  CHECK(ReadOrFail(view, 0, 8) == Bytes({20, 21, 22, 13, 14, 25, 26, 17}));
  CHECK(base.read() == 3);   // [3, 5) and [7, 8)
  view.Add(8, Bytes({28}));  // grows the view: the gap past the base reads as zeros
  view.Add(10, Bytes({30}));
  base.Reset();
  CHECK(ReadOrFail(view, 6, 5) == Bytes({26, 17, 28, 0, 30}));
  CHECK(base.read() == 1);
}

// Serves lazy patches from a map of (extent, offset) -> bytes, counting the bytes it reads.
class MapSource : public PatchSource {
 public:
  Status ReadPatch(uint16_t extent, uint64_t offset, uint64_t from,
                   std::span<uint8_t> out) const override {
    auto it = bytes.find({extent, offset});
    if (it == bytes.end() || from + out.size() > it->second.size()) {
      return Status::InvalidArgument("no such patch");
    }
    std::copy_n(it->second.begin() + from, out.size(), out.begin());
    read += out.size();
    return Status::Ok();
  }
  std::map<std::pair<uint16_t, uint64_t>, std::vector<uint8_t>> bytes;
  mutable uint64_t read = 0;
};

TEST_CASE("OverlayImageFile reads lazy patches from their source, trimmed like copies",
          "[image_file]") {
  MemoryImageFile base(Bytes({10, 11, 12, 13, 14, 15, 16, 17}));
  OverlayImageFile view(base);
  MapSource source;
  source.bytes[{0, 2}] = Bytes({40, 41, 42, 43});
  view.AddLazy(0, 2, 4, &source);
  CHECK(source.read == 0);  // nothing is read until the view is
  CHECK(ReadOrFail(view, 0, 8) == Bytes({10, 11, 40, 41, 42, 43, 16, 17}));
  CHECK(source.read == 4);
  source.bytes[{0, 2}][1] = 99;  // not held: read again each time
  CHECK(ReadOrFail(view, 3, 1) == Bytes({99}));
  // A later patch in the middle keeps both ends of the lazy one, each read at its own place.
  view.Add(3, Bytes({50}));
  CHECK(ReadOrFail(view, 0, 8) == Bytes({10, 11, 40, 50, 42, 43, 16, 17}));
  CHECK(ReadOrFail(view, 4, 2) == Bytes({42, 43}));
  // A copy of the view shares the patches; patches added to it stay its own.
  OverlayImageFile copy(view);
  copy.Add(4, Bytes({60, 61, 62}));
  CHECK(ReadOrFail(copy, 0, 8) == Bytes({10, 11, 40, 50, 60, 61, 62, 17}));
  CHECK(ReadOrFail(view, 0, 8) == Bytes({10, 11, 40, 50, 42, 43, 16, 17}));
  // A source that fails fails the read.
  view.AddLazy(0, 6, 2, &source);  // the source has no such patch
  std::vector<uint8_t> buf(8);
  CHECK(view.ReadAt(0, buf).code() == Status::Code::kInvalidArgument);
}

TEST_CASE("OverlayImageFile over an empty base, and overlays of overlays", "[image_file]") {
  MemoryImageFile empty({});
  OverlayImageFile view(empty);
  CHECK(SizeOf(view) == 0);
  std::vector<uint8_t> one(1);
  CHECK(view.ReadAt(0, one).code() == Status::Code::kInvalidArgument);
  view.Add(0, Bytes({5, 6}));
  CHECK(ReadOrFail(view, 0, 2) == Bytes({5, 6}));

  OverlayImageFile upper(view);
  upper.Add(1, Bytes({7, 8}));
  CHECK(SizeOf(upper) == 3);
  CHECK(ReadOrFail(upper, 0, 3) == Bytes({5, 7, 8}));
  CHECK(ReadOrFail(view, 0, 2) == Bytes({5, 6}));
}

}  // namespace
}  // namespace vmetafs::store
