// AlignedBuffer: page-aligned scratch memory for I/O on files opened O_DIRECT.
//
// libfuse hands the daemon request buffers at arbitrary addresses, and O_DIRECT rejects those with
// EINVAL. Each user keeps its own `thread_local AlignedBuffer`, so one worker thread never waits
// for another and two layers (the FUSE operations and a backend's bounce path) never share one.
// Not thread safe by design: one instance per thread.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

namespace vmetafs::backend {

inline constexpr size_t kPageAlignment = 4096;
// O_DIRECT needs offsets and lengths aligned to the logical block size; 512 is the common case,
// and a storage that wants more answers EINVAL, which the callers treat as "use the page cache".
inline constexpr size_t kDirectAlignment = 512;

inline bool IsAligned(uint64_t value, size_t alignment) { return value % alignment == 0; }
inline bool IsAligned(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  // Returns at least `size` bytes aligned to kPageAlignment, valid until the next call. Contents
  // are not preserved when it grows. Throws std::bad_alloc when memory is exhausted.
  uint8_t* Get(size_t size) {
    if (size > capacity_ || data_ == nullptr) {
      size_t rounded = (size + kPageAlignment - 1) / kPageAlignment * kPageAlignment;
      if (rounded == 0) rounded = kPageAlignment;
      void* p = nullptr;
      if (posix_memalign(&p, kPageAlignment, rounded) != 0) throw std::bad_alloc();
      std::free(data_);
      data_ = static_cast<uint8_t*>(p);
      capacity_ = rounded;
    }
    return data_;
  }

 private:
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace vmetafs::backend
