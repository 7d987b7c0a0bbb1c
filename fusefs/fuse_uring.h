// FUSE over io_uring (Linux 6.14 and later, fs/fuse/dev_uring.c and
// Documentation/filesystems/fuse-io-uring.rst) on libfuse 3.14, which predates it.
//
// Why: on the classic transport every request costs the daemon a read(2) and a writev(2) of
// /dev/fuse, and the kernel wakes whichever worker thread waits. Over io_uring the kernel hands a
// request to a ring entry of the queue of the CPU the caller runs on, and the daemon returns the
// reply and takes the next request in one io_uring_enter(2). Each queue is served by threads
// bound to its CPU, so a request is usually served on the core that issued it. A thread holds one
// entry, so a queue serves as many requests at once as it has threads; it grows by itself when
// its requests block (a lock wait, a first open), as libfuse's classic loop does.
//
// How: the kernel offers FUSE_OVER_IO_URING in INIT when its fuse module has enable_uring set;
// the INIT reply (dev_hooks) accepts it when the daemon wants it. Then every queue's threads
// register their entries, and once every queue has one, the kernel sends requests through the
// rings (FORGETs, INTERRUPTs and notifications keep using /dev/fuse, whose libfuse loop keeps
// running). A ring thread lays the request out as /dev/fuse would have delivered it and hands it
// to libfuse's fuse_session_process_buf; the reply libfuse writes is caught by the session's
// writev hook (CaptureRingReply) and committed with the next fetch.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/uio.h>

#include <cstdint>
#include <memory>

#include "store/status.h"

namespace vmetafs::fusefs {

// FUSE_OVER_IO_URING, bit 41 of the 64-bit INIT flags: bit 9 of fuse_init_{in,out}.flags2.
inline constexpr uint32_t kFuseOverIoUringFlags2 = 1u << 9;

// The threads that serve a session's requests over io_uring. Thread-safe: Start runs once INIT
// was answered, Stop once the session loop has ended (or from the destructor).
class UringTransport {
 public:
  // `threads_per_queue` threads to start with for each CPU's queue, each with one ring entry.
  UringTransport(fuse_session* se, unsigned threads_per_queue);
  ~UringTransport();
  UringTransport(const UringTransport&) = delete;
  UringTransport& operator=(const UringTransport&) = delete;

  // Registers the ring entries, each on its own thread. Call only after the kernel took an INIT
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

}  // namespace vmetafs::fusefs
