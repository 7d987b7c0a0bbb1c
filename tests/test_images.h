// Helpers for unit tests: scratch directories and images made by qemu-img/qemu-io at test time.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "store/image_file.h"

namespace vmetafs::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its content on destruction.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs a shell command; fails the current test (Catch2 REQUIRE) unless it exits 0.
// Returns its standard output.
std::string Run(const std::string& command);

// Whole file contents.
std::vector<uint8_t> ReadFile(const std::string& path);
void WriteFileAt(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes);

// An ImageFile over a local file opened read-write with pread/pwrite (no backend library needed).
std::unique_ptr<store::ImageFile> OpenLocalImage(const std::string& path);

// Big-endian reads of an image's own fields, to find where to poke damage.
uint64_t Be64At(const std::vector<uint8_t>& bytes, uint64_t offset);
uint32_t Be32At(const std::vector<uint8_t>& bytes, uint64_t offset);
// Little-endian reads (VMDK, VHDX).
uint64_t Le64At(const std::vector<uint8_t>& bytes, uint64_t offset);
uint32_t Le32At(const std::vector<uint8_t>& bytes, uint64_t offset);

// An image in memory that counts the bytes read from it so far.
class CountingFile : public store::MemoryImageFile {
 public:
  using MemoryImageFile::MemoryImageFile;
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override {
    read_ += out.size();
    return MemoryImageFile::ReadAt(offset, out);
  }
  uint64_t read() const { return read_; }
  void Reset() { read_ = 0; }

 private:
  mutable std::atomic<uint64_t> read_{0};
};

}  // namespace vmetafs::testing
