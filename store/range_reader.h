// RangeReader: reads a list of byte ranges of an ImageFile ahead of the code that consumes them,
// on a few threads, and hands them out in order.
//
// The first open reads every journaled unit of an image (a 1 TiB qcow2 holds 160 MiB of L2 and
// refcount blocks). One thread issuing one large read after another leaves the storage idle
// while each result is hashed or journaled, and a single request in flight is far from what a
// disk or an NFS server delivers with several: this keeps kReaders requests in flight. The tables
// of a large qcow2 lie 512 MiB apart, each its own read: a virtual disk served 64 KiB reads at
// 15k/s with 4 in flight, 22k/s with 16 and 25k/s with 32 (fio, O_DIRECT).
//
// Bytes of a range past the file's end (as the file's size was when the reader was made) read as
// zeros. Memory: the ranges claimed but not yet taken hold at most kWindowBytes (or one range,
// when a single range is larger).
//
// Thread safety: one consumer thread calls Take; the file must allow concurrent ReadAt (as
// ImageFile promises) and outlive the reader. The destructor waits for reads in flight.
// Wake-ups are targeted (readers and the consumer wait on separate conditions, each woken one at a
// time): with 32 readers on two cores, waking all of them for every range taken or read cost more
// CPU in futex calls and context switches than the reads from a warm page cache.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "store/image_file.h"
#include "store/status.h"

namespace vmetafs::store {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

class RangeReader {
 public:
  static constexpr size_t kReaders = 32;
  static constexpr uint64_t kWindowBytes = 32 << 20;

  // Starts reading at once, on up to `readers` threads, when there is more than one range; a
  // single range is read by Take. A file whose reads are CPU work rather than waits (the page
  // cache, a view laid from the journal) needs only a few readers.
  RangeReader(const ImageFile& file, uint64_t file_size, std::vector<ByteRange> ranges,
              size_t readers = kReaders);
  ~RangeReader();
  RangeReader(const RangeReader&) = delete;
  RangeReader& operator=(const RangeReader&) = delete;

  // The bytes of range k; ranges are taken once each, in order (k = 0, 1, ...). *buf is
  // replaced; the buffer it held (the previous range) is reused for a later one. After an error
  // the reader stops and the ranges after the failed one return its error.
  Status Take(size_t k, std::vector<uint8_t>* buf);

 private:
  struct Slot {
    bool done = false;
    Status status;
    std::vector<uint8_t> bytes;
  };
  Status Read(const ByteRange& r, std::vector<uint8_t>* buf) const;
  void Work();
  bool CanClaim() const;  // a reader may claim the next range; mu_ held

  const ImageFile& file_;
  const uint64_t size_;
  const std::vector<ByteRange> ranges_;
  std::mutex mu_;
  std::condition_variable readers_cv_;       // a range can be claimed, or stop
  std::condition_variable consumer_cv_;      // the range the consumer waits for is read, or failed
  std::vector<Slot> slots_;                  // guarded by mu_
  std::vector<std::vector<uint8_t>> spare_;  // buffers the consumer returned; guarded by mu_
  size_t next_ = 0;                          // next range a reader claims; guarded by mu_
  size_t taken_ = 0;                         // ranges the consumer took; guarded by mu_
  size_t awaited_ = std::numeric_limits<size_t>::max();  // the range Take waits for; guarded by mu_
  uint64_t held_ = 0;  // bytes of the ranges claimed and not yet taken; guarded by mu_
  bool stop_ = false;  // guarded by mu_
  size_t failed_at_ =
      std::numeric_limits<size_t>::max();  // the first range whose read failed; guarded by mu_
  std::vector<std::thread> readers_;
};

}  // namespace vmetafs::store
