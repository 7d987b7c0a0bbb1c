#include "fusefs/fuse_uring.h"

#include <fmt/format.h>
#include <liburing.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "fusefs/killpriv_v2.h"

namespace vmetafs::fusefs {
namespace {

// The kernel's io_uring protocol (include/uapi/linux/fuse.h since 6.14), absent from Debian 12's
// linux/fuse.h. The layouts are the kernel's; they are copied into and out of, never cast.
constexpr size_t kInOutHeaderSize = 128;  // fuse_in_header in, fuse_out_header out
constexpr size_t kOpInOutSize = 128;      // the opcode's own header (fuse_write_in, ...)
constexpr uint32_t kCmdRegister = 1;
constexpr uint32_t kCmdCommitAndFetch = 2;

struct RingEntInOut {
  uint64_t flags;
  uint64_t commit_id;   // the request's unique, named again in the commit
  uint32_t payload_sz;  // bytes of the payload used, by the request or by the reply
  uint32_t padding;
  uint64_t reserved;
};

struct RingReqHeader {
  uint8_t in_out[kInOutHeaderSize];
  uint8_t op_in[kOpInOutSize];
  RingEntInOut ring_ent_in_out;
};

struct RingCmdReq {  // the 80-byte command area of a 128-byte SQE
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};

// The largest payload the kernel puts in an entry is max(8 KiB, max_write, max_pages pages); it
// refuses an entry whose payload is smaller. The daemon's max_write is 1 MiB, and the kernel's
// max_pages allows as much; one page more covers a kernel that counts a partial page.
constexpr size_t kPayloadSize = (1u << 20) + 4096;

// Room before the payload where the request is laid out as /dev/fuse delivers it: header, then
// the opcode's header, then (already in place) the payload. A page, so that the payload, and
// with it a WRITE's data, starts page-aligned: O_DIRECT on the backing takes it as it is.
constexpr size_t kHeadroom = 4096;
static_assert(kHeadroom >= sizeof(fuse_in_header) + kOpInOutSize);

// Threads of a queue: it grows when fewer than kSpareEntries of its entries wait for a request
// (a request that blocks, a lock wait or a first open, then does not hold up the next ones),
// up to kMaxThreadsPerQueue, libfuse's own limit for its classic loop.
constexpr int kSpareEntries = 2;
constexpr unsigned kMaxThreadsPerQueue = 64;

// How long a waiting thread sleeps before it looks whether the transport is stopping.
constexpr long long kStopPollNs = 500LL * 1000 * 1000;

// A registration the kernel answers with EAGAIN (INIT not yet complete) is retried this often.
constexpr int kRegisterTries = 100;

// One ring entry: its buffers and the request it holds. Owned and used by one thread.
struct Entry {
  RingReqHeader header{};
  uint8_t* area = nullptr;  // kHeadroom, then the payload
  uint16_t qid = 0;
  uint64_t unique = 0;  // of the request being served
  bool replied = false;
  struct iovec iov[2] = {};  // header and payload, as registered

  uint8_t* payload() const { return area + kHeadroom; }
};

// The entry whose request the calling thread is serving, for CaptureRingReply.
thread_local Entry* serving = nullptr;

// Where a ring thread may run: pinned to its queue's CPU while it serves the small requests of
// the data path; on the CPUs the daemon was given while it serves an OPEN or CREATE, which may
// run a first open: the threads that verify and restore with start there and inherit it.
class Affinity {
 public:
  // `all`: the daemon's CPUs, as UringTransport::Start found them (a thread started by a pinned
  // ring thread inherits its one CPU).
  Affinity(unsigned cpu, const cpu_set_t& all) : all_(all) {
    CPU_ZERO(&pinned_);
    CPU_SET(cpu, &pinned_);
    known_ = CPU_ISSET(cpu, &all_);
  }
  // Best effort: a thread that stays where it is serves its queue all the same.
  void Pin() const {
    if (known_) (void)sched_setaffinity(0, sizeof(pinned_), &pinned_);
  }
  void Widen() const {
    if (known_) (void)sched_setaffinity(0, sizeof(all_), &all_);
  }
  static bool MaySpawnThreads(uint32_t opcode) {
    return opcode == FUSE_OPEN || opcode == FUSE_CREATE;
  }

 private:
  cpu_set_t all_{};
  cpu_set_t pinned_{};
  bool known_ = false;
};

// A thread's io_uring instance and its entry's payload memory.
class Ring {
 public:
  Ring(uint16_t qid, const cpu_set_t& cpus) : affinity(qid, cpus) { entry.qid = qid; }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() {
    if (ready_) io_uring_queue_exit(&ring_);
    if (entry.area != nullptr) munmap(entry.area, kHeadroom + kPayloadSize);
  }

  Status Init() {
    void* area = mmap(nullptr, kHeadroom + kPayloadSize, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) return PosixError("allocating an io_uring entry", errno);
    entry.area = static_cast<uint8_t*>(area);
    int rc = io_uring_queue_init(4, &ring_, IORING_SETUP_SQE128);
    if (rc < 0) return PosixError("setting up an io_uring", -rc);
    ready_ = true;
    return Status::Ok();
  }

  // Queues a command for the entry: REGISTER, or COMMIT_AND_FETCH of the request `commit_id`.
  void Queue(int fuse_fd, uint32_t cmd, uint64_t commit_id) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) std::abort();  // one command at a time in a ring of four
    auto* raw = reinterpret_cast<uint8_t*>(sqe);
    std::memset(raw, 0, 2 * sizeof(*sqe));  // a 128-byte SQE: the struct, then the command area
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = cmd;
    entry.iov[0] = {&entry.header, sizeof(entry.header)};
    entry.iov[1] = {entry.payload(), kPayloadSize};
    sqe->addr = reinterpret_cast<uint64_t>(entry.iov);
    sqe->len = 2;
    RingCmdReq req{};
    req.commit_id = commit_id;
    req.qid = entry.qid;
    std::memcpy(raw + offsetof(io_uring_sqe, cmd), &req, sizeof(req));
  }

  // Submits what is queued and waits for the command's completion, at most kStopPollNs. *done:
  // it completed, with *res its result (0: a request is in the entry).
  Status Wait(bool* done, int* res) {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{.tv_sec = 0, .tv_nsec = kStopPollNs};
    int rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
    *done = false;
    if (rc == -ETIME || rc == -EINTR) return Status::Ok();
    if (rc < 0) return PosixError("waiting on an io_uring", -rc);
    // liburing 2.3 may return after submitting, before a completion.
    return cqe == nullptr ? Status::Ok() : Take(cqe, done, res);
  }

  // Submits what is queued and takes a completion if there is one, without waiting.
  Status SubmitAndPeek(bool* done, int* res) {
    int rc = io_uring_submit(&ring_);
    if (rc < 0) return PosixError("submitting to an io_uring", -rc);
    io_uring_cqe* cqe = nullptr;
    *done = false;
    return io_uring_peek_cqe(&ring_, &cqe) == 0 ? Take(cqe, done, res) : Status::Ok();
  }

  Entry entry;
  const Affinity affinity;

 private:
  Status Take(io_uring_cqe* cqe, bool* done, int* res) {
    *res = cqe->res;
    *done = true;
    io_uring_cqe_seen(&ring_, cqe);
    return Status::Ok();
  }

  io_uring ring_{};
  bool ready_ = false;
};

// The kernel's num_possible_cpus(): one more than the highest CPU in
// /sys/devices/system/cpu/possible ("0-3", "0,2-5"). 0 when it cannot be read.
unsigned PossibleCpus() {
  std::ifstream in("/sys/devices/system/cpu/possible");
  std::string list;
  if (!std::getline(in, list)) return 0;
  size_t cut = list.find_last_of(",-");
  std::string_view last = std::string_view(list).substr(cut == std::string::npos ? 0 : cut + 1);
  unsigned highest = 0;
  auto [end, ec] = std::from_chars(last.data(), last.data() + last.size(), highest);
  if (ec != std::errc() || highest >= 65536) return 0;
  return highest + 1;
}

void FailRequest(Entry* e, uint64_t unique) {
  fuse_out_header out{sizeof(fuse_out_header), -EIO, unique};
  std::memcpy(e->header.in_out, &out, sizeof(out));
  e->header.ring_ent_in_out.payload_sz = 0;
}

}  // namespace

struct UringTransport::Impl {
  fuse_session* se = nullptr;
  unsigned threads_per_queue = 0;
  unsigned queues = 0;
  std::atomic<bool> stopping{false};
  std::atomic<unsigned> registered{0};
  std::atomic<uint64_t> served{0};
  std::unique_ptr<std::atomic<int>[]> idle;  // per queue: entries waiting for a request
  cpu_set_t cpus{};                          // the daemon's, before any thread was pinned

  std::mutex mu;  // guards the two below
  std::vector<std::thread> threads;
  std::vector<unsigned> started;  // per queue

  void SpawnLocked(uint16_t qid);
  void Grow(uint16_t qid);
  void Run(uint16_t qid);
  bool Register(Ring* ring, bool* has_request);
  bool NextRequest(Ring* ring);
  void Serve(Ring* ring);
};

void UringTransport::Impl::SpawnLocked(uint16_t qid) {
  ++started[qid];
  threads.emplace_back([this, qid] { Run(qid); });
}

void UringTransport::Impl::Grow(uint16_t qid) {
  std::lock_guard<std::mutex> lock(mu);
  if (stopping.load() || started[qid] >= kMaxThreadsPerQueue) return;
  if (idle[qid].load() >= kSpareEntries) return;  // another thread grew it meanwhile
  SpawnLocked(qid);
}

UringTransport::UringTransport(fuse_session* se, unsigned threads_per_queue)
    : impl_(std::make_unique<Impl>()) {
  impl_->se = se;
  impl_->threads_per_queue = std::max(1u, threads_per_queue);
}

UringTransport::~UringTransport() { Stop(); }

Status UringTransport::Start() {
  // The kernel keeps a queue for every possible CPU and uses the ring once each has an entry.
  unsigned cpus = PossibleCpus();
  if (cpus == 0) return Status::NotSupported("the number of possible CPUs is unknown");
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->queues != 0) return Status::Ok();
  if (sched_getaffinity(0, sizeof(impl_->cpus), &impl_->cpus) != 0) CPU_ZERO(&impl_->cpus);
  impl_->queues = cpus;
  impl_->idle = std::make_unique<std::atomic<int>[]>(impl_->queues);
  impl_->started.assign(impl_->queues, 0);
  for (unsigned q = 0; q < impl_->queues; ++q) {
    for (unsigned t = 0; t < impl_->threads_per_queue; ++t) {
      impl_->SpawnLocked(static_cast<uint16_t>(q));
    }
  }
  return Status::Ok();
}

void UringTransport::Stop() {
  impl_->stopping.store(true);
  std::vector<std::thread> threads;
  unsigned started = 0;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    threads.swap(impl_->threads);
    for (unsigned n : impl_->started) started += n;
  }
  for (std::thread& t : threads) t.join();
  if (!threads.empty()) {
    spdlog::info("io_uring: {} requests served by {} threads", impl_->served.load(), started);
  }
}

// Registers the thread's entry. *has_request: a request arrived in it already.
bool UringTransport::Impl::Register(Ring* ring, bool* has_request) {
  *has_request = false;
  for (int tries = 0; tries < kRegisterTries && !stopping.load(); ++tries) {
    ring->Queue(fuse_session_fd(se), kCmdRegister, 0);
    int res = 0;
    bool done = false;
    // The kernel refuses a registration as it is submitted; an accepted one completes only
    // when a request arrives in the entry.
    Status st = ring->SubmitAndPeek(&done, &res);
    if (!st.ok()) {
      spdlog::error("io_uring: {}", st.ToString());
      return false;
    }
    if (!done || res == 0) {
      *has_request = done;
      return true;
    }
    if (res != -EAGAIN) {
      if (res != -ENOTCONN) {
        spdlog::error("io_uring: registering a ring entry: {}", std::strerror(-res));
      }
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // INIT still completing
  }
  return false;
}

// Waits for the next request in the ring's entry (submitting the commit Serve queued). False when
// the thread is to end: the transport stops, or the connection went away.
bool UringTransport::Impl::NextRequest(Ring* ring) {
  uint16_t qid = ring->entry.qid;
  ++idle[qid];
  bool done = false;
  int res = 0;
  Status st;
  do {
    st = ring->Wait(&done, &res);
  } while (st.ok() && !done && !stopping.load());
  --idle[qid];
  if (!st.ok()) spdlog::error("io_uring: {}", st.ToString());
  if (!st.ok() || !done) return false;
  // ENOTCONN, ECANCELED: the connection is gone (unmounted or aborted).
  if (res < 0 && res != -ENOTCONN && res != -ECANCELED) {
    spdlog::error("io_uring: fetching a request: {}", std::strerror(-res));
  }
  return res == 0;
}

void UringTransport::Impl::Run(uint16_t qid) {
  Ring ring(qid, cpus);
  ring.affinity.Pin();
  pthread_setname_np(pthread_self(), fmt::format("ring-q{}", qid).c_str());
  Status st = ring.Init();
  if (!st.ok()) {
    spdlog::error("io_uring: {}", st.ToString());
    return;
  }
  bool has_request = false;
  if (!Register(&ring, &has_request)) return;
  if (registered.fetch_add(1) + 1 == queues * threads_per_queue) {
    spdlog::info("FUSE requests served over io_uring: {} queues, {} threads each to start with",
                 queues, threads_per_queue);
  }
  while (has_request || NextRequest(&ring)) {
    has_request = false;
    if (idle[qid].load() < kSpareEntries) Grow(qid);
    Serve(&ring);
    served.fetch_add(1, std::memory_order_relaxed);
  }
}

// Lays the entry's request out as /dev/fuse delivers it, has libfuse process it (its reply comes
// back through CaptureRingReply) and queues the commit of the reply with the next fetch.
void UringTransport::Impl::Serve(Ring* ring) {
  Entry* e = &ring->entry;
  fuse_in_header in;
  std::memcpy(&in, e->header.in_out, sizeof(in));
  RingEntInOut io;
  std::memcpy(&io, &e->header.ring_ent_in_out, sizeof(io));
  e->unique = io.commit_id;
  e->replied = false;
  size_t fixed = sizeof(in) + io.payload_sz;
  if (in.len < fixed || in.len - fixed > kOpInOutSize || io.payload_sz > kPayloadSize) {
    spdlog::error("io_uring: malformed request (opcode {}, length {}, payload {})", in.opcode,
                  in.len, io.payload_sz);
    FailRequest(e, io.commit_id);
  } else {
    size_t op_in = in.len - fixed;
    uint8_t* msg = e->payload() - op_in - sizeof(in);
    std::memcpy(msg, &in, sizeof(in));
    std::memcpy(msg + sizeof(in), e->header.op_in, op_in);
    NoteRequest(msg, in.len);
    fuse_buf buf{};
    buf.size = in.len;
    buf.mem = msg;
    bool widen = Affinity::MaySpawnThreads(in.opcode);
    if (widen) ring->affinity.Widen();
    serving = e;
    fuse_session_process_buf(se, &buf);
    serving = nullptr;
    if (widen) ring->affinity.Pin();
    if (!e->replied) {
      spdlog::error("io_uring: request {} (opcode {}) got no reply", io.commit_id, in.opcode);
      FailRequest(e, io.commit_id);
    }
  }
  ring->Queue(fuse_session_fd(se), kCmdCommitAndFetch, io.commit_id);
}

bool CaptureRingReply(const struct iovec* iov, int count, ssize_t* written) {
  Entry* e = serving;
  if (e == nullptr || count < 1 || iov[0].iov_len != sizeof(fuse_out_header)) return false;
  fuse_out_header out;
  std::memcpy(&out, iov[0].iov_base, sizeof(out));
  if (out.unique != e->unique) return false;  // a notification, or not this entry's request
  size_t body = 0;
  for (int i = 1; i < count && out.error == 0; ++i) {
    if (iov[i].iov_len > kPayloadSize - body) {
      spdlog::error("io_uring: a reply of more than {} bytes", kPayloadSize);
      out.error = -EIO;
      break;
    }
    // memmove: a reply may quote the request, which sits in the same payload.
    std::memmove(e->payload() + body, iov[i].iov_base, iov[i].iov_len);
    body += iov[i].iov_len;
  }
  if (out.error != 0) body = 0;
  out.len = static_cast<uint32_t>(sizeof(out) + body);
  std::memcpy(e->header.in_out, &out, sizeof(out));
  e->header.ring_ent_in_out.payload_sz = static_cast<uint32_t>(body);
  e->replied = true;
  *written = static_cast<ssize_t>(out.len);
  return true;
}

}  // namespace vmetafs::fusefs
