#include "tests/test_images.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>

namespace vmetafs::testing {

ScratchDir::ScratchDir() {
  const char* tmp = getenv("TMPDIR");
  std::string tmpl = std::string(tmp ? tmp : "/tmp") + "/vmetafs-test-XXXXXX";
  char* made = mkdtemp(tmpl.data());
  REQUIRE(made != nullptr);
  path_ = made;
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string Run(const std::string& command) {
  std::string out;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int rc = pclose(p);
  INFO("command: " << command << "\noutput: " << out);
  REQUIRE(rc == 0);
  return out;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void WriteFileAt(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  int fd = open(path.c_str(), O_WRONLY);
  REQUIRE(fd >= 0);
  ssize_t n = pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
  close(fd);
  REQUIRE(n == static_cast<ssize_t>(bytes.size()));
}

namespace {
class LocalImageFile : public store::ImageFile {
 public:
  explicit LocalImageFile(int fd) : fd_(fd) {}
  ~LocalImageFile() override { close(fd_); }
  Status ReadAt(uint64_t offset, std::span<uint8_t> out) const override {
    uint64_t size = 0;
    VMETAFS_RETURN_IF_ERROR(Size(&size));
    if (offset > size || out.size() > size - offset) {
      return Status::InvalidArgument("read past the end of the file");
    }
    ssize_t n = pread(fd_, out.data(), out.size(), static_cast<off_t>(offset));
    if (n != static_cast<ssize_t>(out.size())) return PosixError("pread", n < 0 ? errno : EIO);
    return Status::Ok();
  }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    ssize_t n = pwrite(fd_, data.data(), data.size(), static_cast<off_t>(offset));
    if (n != static_cast<ssize_t>(data.size())) return PosixError("pwrite", n < 0 ? errno : EIO);
    return Status::Ok();
  }
  Status Sync() override { return fsync(fd_) == 0 ? Status::Ok() : PosixError("fsync", errno); }
  Status Size(uint64_t* size) const override {
    struct stat st;
    if (fstat(fd_, &st) != 0) return PosixError("fstat", errno);
    *size = static_cast<uint64_t>(st.st_size);
    return Status::Ok();
  }
  Status Identity(store::FileIdentity* id) const override {
    struct stat st;
    if (fstat(fd_, &st) != 0) return PosixError("fstat", errno);
    *id = store::FileIdentity{};
    id->size = static_cast<uint64_t>(st.st_size);
    id->mtime_ns = st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    id->ctime_ns = st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
    id->ino = st.st_ino;
    return Status::Ok();
  }

 private:
  int fd_;
};
}  // namespace

std::unique_ptr<store::ImageFile> OpenLocalImage(const std::string& path) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  return std::make_unique<LocalImageFile>(fd);
}

uint64_t Be64At(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 8 <= b.size());
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[off + i];
  return v;
}

uint32_t Be32At(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 4 <= b.size());
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | b[off + i];
  return v;
}

uint64_t Le64At(const std::vector<uint8_t>& b, uint64_t off) {
  REQUIRE(off + 8 <= b.size());
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | b[off + i];
  return v;
}

uint32_t Le32At(const std::vector<uint8_t>& b, uint64_t off) {
  return static_cast<uint32_t>(Le64At(b, off) & 0xffffffffu);
}

}  // namespace vmetafs::testing
