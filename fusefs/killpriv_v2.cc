#include "fusefs/killpriv_v2.h"

#include <linux/fuse.h>
#include <spdlog/spdlog.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <functional>

#include "fusefs/fuse_uring.h"

namespace vmetafs::fusefs {
namespace {

// Set by the INIT request, read by its reply. Both run on one thread before any other request is
// read, but the loop's threads are started in between: atomics keep that well defined.
std::atomic<uint64_t> init_unique{0};
std::atomic<bool> init_offered{false};
std::atomic<bool> negotiated{false};
std::atomic<bool> want_killpriv{false};
// FUSE over io_uring: wanted by the daemon, offered by the kernel, called once accepted.
std::atomic<bool> want_uring{false};
std::atomic<bool> uring_offered{false};
std::function<void()> on_uring_accepted;

thread_local bool kill_suidgid = false;

// The field of type T at `offset` in the request's argument, or false when the request is too
// short to hold it (an older protocol's smaller struct).
template <typename T>
bool ArgField(const uint8_t* buf, size_t len, size_t offset, T* out) {
  size_t at = sizeof(fuse_in_header) + offset;
  if (len < at + sizeof(T)) return false;
  std::memcpy(out, buf + at, sizeof(T));
  return true;
}

template <typename T>
bool FlagSet(const uint8_t* buf, size_t len, size_t offset, T flag) {
  T value{};
  return ArgField(buf, len, offset, &value) && (value & flag) != 0;
}

bool AsksToKill(const fuse_in_header& h, const uint8_t* buf, size_t len) {
  switch (h.opcode) {
    case FUSE_WRITE:
      return FlagSet(buf, len, offsetof(fuse_write_in, write_flags),
                     uint32_t{FUSE_WRITE_KILL_SUIDGID});
    case FUSE_SETATTR:
      return FlagSet(buf, len, offsetof(fuse_setattr_in, valid), uint32_t{FATTR_KILL_SUIDGID});
    case FUSE_OPEN:
      return FlagSet(buf, len, offsetof(fuse_open_in, open_flags),
                     uint32_t{FUSE_OPEN_KILL_SUIDGID});
    case FUSE_CREATE:
      return FlagSet(buf, len, offsetof(fuse_create_in, open_flags),
                     uint32_t{FUSE_OPEN_KILL_SUIDGID});
    case FUSE_FALLOCATE:
      // The caller's capabilities are not in the request; root's uid stands for CAP_FSETID.
      return h.uid != 0;
  }
  return false;
}

}  // namespace

void NoteRequest(const uint8_t* buf, size_t len) {
  kill_suidgid = false;
  if (len < sizeof(fuse_in_header)) return;
  fuse_in_header h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.opcode == FUSE_INIT) {
    uint32_t flags = 0, flags2 = 0;
    bool have_flags = ArgField(buf, len, offsetof(fuse_init_in, flags), &flags);
    init_offered.store(want_killpriv.load() && have_flags &&
                       (flags & FUSE_HANDLE_KILLPRIV_V2) != 0);
    uring_offered.store(want_uring.load() && have_flags && (flags & FUSE_INIT_EXT) != 0 &&
                        ArgField(buf, len, offsetof(fuse_init_in, flags2), &flags2) &&
                        (flags2 & kFuseOverIoUringFlags2) != 0);
    init_unique.store(h.unique);
    return;
  }
  kill_suidgid = negotiated.load(std::memory_order_relaxed) && AsksToKill(h, buf, len);
}

namespace {

ssize_t Read(int fd, void* buf, size_t len, void*) {
  ssize_t n = read(fd, buf, len);
  if (n > 0) NoteRequest(static_cast<const uint8_t*>(buf), static_cast<size_t>(n));
  return n;
}

// The INIT reply as libfuse builds it: the header, then fuse_init_out in one piece.
bool IsInitReply(const struct iovec* iov, int count) {
  if (count < 2 || iov[0].iov_len != sizeof(fuse_out_header) ||
      iov[1].iov_len < offsetof(fuse_init_out, flags) + sizeof(uint32_t)) {
    return false;
  }
  fuse_out_header h;
  std::memcpy(&h, iov[0].iov_base, sizeof(h));
  return h.error == 0 && init_unique.load() != 0 && h.unique == init_unique.load();
}

// Sends libfuse's INIT reply with the flags the daemon accepts added, from a copy of its buffers.
ssize_t WriteInitReply(int fd, const struct iovec* iov, bool killpriv, bool uring) {
  fuse_init_out out{};
  size_t out_len = std::min(iov[1].iov_len, sizeof(out));
  std::memcpy(&out, iov[1].iov_base, out_len);
  if (killpriv) out.flags |= FUSE_HANDLE_KILLPRIV_V2;
  if (uring) {
    out.flags |= FUSE_INIT_EXT;
    out.flags2 |= kFuseOverIoUringFlags2;
  }
  struct iovec copy[2] = {iov[0], {&out, out_len}};
  // Set before the kernel sees the reply: it sends other requests, to other threads, at once.
  negotiated.store(killpriv);
  ssize_t n = writev(fd, copy, 2);
  int err = errno;
  if (n < 0) {
    negotiated.store(false);
  } else {
    if (killpriv) {
      spdlog::info(
          "FUSE_HANDLE_KILLPRIV_V2 negotiated: the daemon clears set-user-ID/set-group-ID");
    }
    if (uring && on_uring_accepted) on_uring_accepted();
  }
  errno = err;
  return n;
}

ssize_t Writev(int fd, struct iovec* iov, int count, void*) {
  ssize_t captured = 0;
  if (CaptureRingReply(iov, count, &captured)) return captured;
  if (init_unique.load(std::memory_order_relaxed) != 0 && IsInitReply(iov, count)) {
    bool killpriv = init_offered.load(), uring = uring_offered.load();
    init_unique.store(0);
    // libfuse's INIT reply is two pieces; anything else is sent as it is.
    bool layout = count == 2 && iov[1].iov_len >= offsetof(fuse_init_out, flags2) + 4 &&
                  iov[1].iov_len <= sizeof(fuse_init_out);
    if (want_killpriv.load() && !killpriv) {
      spdlog::info("FUSE_HANDLE_KILLPRIV_V2 not negotiated: the kernel did not offer it");
    }
    if (want_uring.load() && !uring) {
      spdlog::info(
          "FUSE over io_uring not used: the kernel did not offer it (its fuse module's "
          "enable_uring parameter is off, or the kernel predates 6.14)");
    }
    if ((killpriv || uring) && layout) return WriteInitReply(fd, iov, killpriv, uring);
    if (killpriv || uring) spdlog::info("INIT flags not added: unexpected INIT reply layout");
  }
  return writev(fd, iov, count);
}

}  // namespace

Status InstallDevHooks(fuse_session* se, bool killpriv_v2, std::function<void()> on_uring) {
  want_killpriv.store(killpriv_v2);
  want_uring.store(static_cast<bool>(on_uring));
  on_uring_accepted = std::move(on_uring);
  // No splice hooks: libfuse then reads and writes through these two.
  static const fuse_custom_io io = {
      .writev = Writev, .read = Read, .splice_receive = nullptr, .splice_send = nullptr};
  int rc = fuse_session_custom_io(se, &io, fuse_session_fd(se));
  return rc == 0 ? Status::Ok() : PosixError("installing the session's I/O hooks", -rc);
}

bool KillPrivV2Negotiated() { return negotiated.load(); }

bool KillSuidGidRequested() { return kill_suidgid; }

}  // namespace vmetafs::fusefs
