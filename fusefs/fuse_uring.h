// FUSE over io_uring (Linux 6.14 and later, fs/fuse/dev_uring.c and
// Documentation/filesystems/fuse-io-uring.rst) on libfuse 3.14, which predates it.
//
// Why: on the classic transport every request costs the daemon a read(2) and a writev(2) of
// /dev/fuse, and the kernel wakes whichever worker thread waits. Over io_uring the kernel hands a
// request to a ring entry of the queue of the CPU the caller runs on, and the daemon returns the
// reply and takes the next request in one io_uring_enter(2). Each queue is served by threads
// bound to its CPU, so a request is usually served on the core that issued it.
//
// How: the kernel offers FUSE_OVER_IO_URING in INIT when its fuse module has enable_uring set;
// the INIT reply (dev_hooks) accepts it when the daemon wants it. Then every queue's threads
// register their entries, and once every queue has one, the kernel sends requests through the
// rings (FORGETs, INTERRUPTs and notifications keep using /dev/fuse, whose libfuse loop keeps
// running). A ring thread lays the request out as /dev/fuse would have delivered it and hands it
// to libfuse's fuse_session_process_buf; the reply libfuse writes is caught by the session's
// writev hook (CaptureRingReply) and committed with the next fetch.
//
// Two ways to serve a queue, chosen by the backing:
// - Local files (entries_per_thread > 1): a ring thread holds many entries and waits for
//   nothing but the disk. A READ or WRITE leaves its backing transfer to the thread's own
//   io_uring (RingRead, RingWrite) and the thread goes on with its other entries; the reply is
//   committed when the transfer completes. The thread itself does a FALLOCATE, a transfer the
//   kernel could not start without waiting, and a write the store journals first. Every other
//   request may block for long (a lock wait, a first open, an fsync): it is handed to a worker
//   thread and its reply comes back to the ring thread to be committed.
//   Per guest write the daemon then wakes once, not twice (for the request, and again when its
//   own blocking write ends), and one system call submits a batch of replies and transfers.
// - Storage reached by the daemon itself (nfs://), whose I/O has no descriptor for io_uring: a
//   thread holds one entry and serves its requests itself, blocking in them.
// A queue starts more threads when fewer than two of its entries wait for a request (requests
// that block hold theirs), up to 64 threads, libfuse's own limit for its classic loop.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "store/status.h"

namespace vmetafs::fusefs {

// FUSE_OVER_IO_URING, bit 41 of the 64-bit INIT flags: bit 9 of fuse_init_{in,out}.flags2.
inline constexpr uint32_t kFuseOverIoUringFlags2 = 1u << 9;

// The threads that serve a session's requests over io_uring. Thread-safe: Start runs once INIT
// was answered, Stop once the session loop has ended (or from the destructor).
class UringTransport {
 public:
  // `threads_per_queue` threads to start with for each CPU's queue, each with
  // `entries_per_thread` ring entries (1: each thread serves its requests itself; more: see above).
  UringTransport(fuse_session* se, unsigned threads_per_queue, unsigned entries_per_thread);
  ~UringTransport();
  UringTransport(const UringTransport&) = delete;
  UringTransport& operator=(const UringTransport&) = delete;

  // Starts the threads, which register their ring entries. Call only after the kernel took an INIT
  // reply that carried FUSE_OVER_IO_URING. An error leaves the classic transport in use.
  [[nodiscard]] Status Start();

  // Ends the threads (the kernel ends their commands when the connection goes away).
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// From the session's writev hook: when the calling thread serves a ring request and `iov` is its
// reply, keeps the reply for the ring, sets *written and returns true. Otherwise returns false
// and the reply goes to /dev/fuse.
bool CaptureRingReply(const struct iovec* iov, int count, ssize_t* written);

// Backing transfers a ring thread completes after the handler returned (entries_per_thread > 1).
// The handler replies as usual; that reply is set aside and replaced by the outcome, unless it
// was an error, which stands. `finish` runs on the ring thread with the kernel's result (bytes,
// or -errno, as pwrite and pread return them) and returns the final one: it may finish the
// transfer itself (the rest of a short write, a retry without O_DIRECT) and, for a READ, edit the
// bytes read, which it is given.
using RingFinish = std::function<ssize_t(ssize_t result, std::span<uint8_t> bytes)>;

// For a WRITE: takes the transfer of `data`, which must be the request's own payload as the
// handler was given it. False when the calling thread cannot (it is no ring thread, serves
// another request kind, or `data` lies elsewhere): the handler then writes as usual.
bool RingWrite(int fd, uint64_t offset, std::span<const uint8_t> data, RingFinish finish);

// For a READ of `size` bytes: the reply's own buffer, which RingRead reads into, or null when the
// calling thread cannot take the transfer.
uint8_t* RingReadBuffer(size_t size);
// Takes the transfer of a READ into (the start of) the buffer RingReadBuffer gave.
bool RingRead(int fd, uint64_t offset, std::span<uint8_t> into, RingFinish finish);

}  // namespace vmetafs::fusefs
