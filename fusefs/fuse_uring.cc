#include "fusefs/fuse_uring.h"

#include <fmt/format.h>
#include <liburing.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
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

// A worker thread with nothing to do for this long ends.
constexpr auto kWorkerIdle = std::chrono::seconds(10);

// What a completion's user_data names: an entry's FUSE command (the entry's address), its
// backing transfer (the address with kTagTransfer set; entries are 8-byte aligned), or the
// eventfd through which worker threads return entries (kReturned, no address).
constexpr uint64_t kTagTransfer = 1;
constexpr uint64_t kReturned = 2;

class Ring;

// One ring entry: its buffers and the request it holds. Used by its ring thread, and by a
// worker thread while the request is handed off.
struct Entry {
  RingReqHeader header{};
  uint8_t* area = nullptr;  // kHeadroom, then the payload
  Ring* ring = nullptr;
  uint16_t qid = 0;
  uint64_t unique = 0;  // of the request being served
  uint32_t opcode = 0;
  bool replied = false;
  // A backing transfer left to the ring (RingRead, RingWrite), and what to reply when it ends.
  enum class Transfer : uint8_t { kNone, kRead, kWrite } transfer = Transfer::kNone;
  int reply_error = 0;  // the handler's reply, when an error, while the transfer runs
  std::span<uint8_t> bytes;
  RingFinish finish;
  struct iovec iov[2] = {};  // header and payload, as registered

  uint8_t* payload() const { return area + kHeadroom; }
  bool InPayload(const uint8_t* p, size_t len) const {
    return p >= payload() && len <= kPayloadSize &&
           static_cast<size_t>(p - payload()) <= kPayloadSize - len;
  }
};

// The entry whose request the calling thread is serving, for CaptureRingReply, and the ring
// the calling thread owns (null on worker threads), for RingRead and RingWrite.
thread_local Entry* serving = nullptr;
thread_local Ring* own_ring = nullptr;

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

// A ring thread's io_uring instance and its entries.
class Ring {
 public:
  Ring(uint16_t qid, unsigned entries, const cpu_set_t& cpus)
      : affinity(qid, cpus), entries_(entries) {
    for (Entry& e : entries_) {
      e.ring = this;
      e.qid = qid;
    }
  }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() {
    // Ends the transfers still running before their buffers go.
    if (ready_) io_uring_queue_exit(&ring_);
    if (returned_fd_ >= 0) close(returned_fd_);
    for (Entry& e : entries_) {
      if (e.area != nullptr) munmap(e.area, kHeadroom + kPayloadSize);
    }
  }

  Status Init() {
    for (Entry& e : entries_) {
      void* area = mmap(nullptr, kHeadroom + kPayloadSize, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (area == MAP_FAILED) return PosixError("allocating an io_uring entry", errno);
      e.area = static_cast<uint8_t*>(area);
    }
    // Per entry at most two submissions wait at once (its transfer and its commit), plus the
    // eventfd's read; completions stay below twice that, the ring's default.
    int rc = io_uring_queue_init(2 * static_cast<unsigned>(entries_.size()) + 8, &ring_,
                                 IORING_SETUP_SQE128);
    if (rc < 0) return PosixError("setting up an io_uring", -rc);
    ready_ = true;
    if (entries_.size() > 1) {
      returned_fd_ = eventfd(0, EFD_CLOEXEC);
      if (returned_fd_ < 0) return PosixError("creating an eventfd", errno);
      ArmReturned();
    }
    return Status::Ok();
  }

  std::vector<Entry>& entries() { return entries_; }
  io_uring* raw() { return &ring_; }

  // Queues a command for the entry: REGISTER, or COMMIT_AND_FETCH of the request `commit_id`.
  void Queue(Entry* e, int fuse_fd, uint32_t cmd, uint64_t commit_id) {
    io_uring_sqe* sqe = Sqe();
    auto* raw = reinterpret_cast<uint8_t*>(sqe);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = cmd;
    e->iov[0] = {&e->header, sizeof(e->header)};
    e->iov[1] = {e->payload(), kPayloadSize};
    sqe->addr = reinterpret_cast<uint64_t>(e->iov);
    sqe->len = 2;
    sqe->user_data = reinterpret_cast<uint64_t>(e);
    RingCmdReq req{};
    req.commit_id = commit_id;
    req.qid = e->qid;
    std::memcpy(raw + offsetof(io_uring_sqe, cmd), &req, sizeof(req));
  }

  // Queues the entry's backing transfer.
  void QueueTransfer(Entry* e, int fd, uint64_t offset, bool write) {
    io_uring_sqe* sqe = Sqe();
    if (write) {
      io_uring_prep_write(sqe, fd, e->bytes.data(), static_cast<unsigned>(e->bytes.size()), offset);
    } else {
      io_uring_prep_read(sqe, fd, e->bytes.data(), static_cast<unsigned>(e->bytes.size()), offset);
    }
    // A transfer that would block before it reaches the storage (a write that allocates, a
    // read that misses the page cache) fails with EAGAIN instead of going to a kernel worker
    // thread; the entry's finish then does it in this thread (RingFinish).
    sqe->rw_flags = RWF_NOWAIT;
    sqe->user_data = reinterpret_cast<uint64_t>(e) | kTagTransfer;
  }

  // From a worker thread: the entry's request was served; its ring thread commits the reply.
  void Return(Entry* e) {
    // All of it under the lock: once the last entry is back the ring thread may end and free
    // this Ring (AwaitHandedOff), so nothing here may touch it after the lock is released.
    std::lock_guard<std::mutex> lock(returned_mu_);
    returned_.push_back(e);
    uint64_t one = 1;
    if (write(returned_fd_, &one, sizeof(one)) != sizeof(one)) {
      spdlog::error("io_uring: waking a ring thread: {}", std::strerror(errno));
    }
    returned_cv_.notify_all();
  }

  // On the ring thread: the entries workers returned since the last call; reads the eventfd again.
  std::vector<Entry*> TakeReturned() {
    std::vector<Entry*> out;
    {
      std::lock_guard<std::mutex> lock(returned_mu_);
      out.swap(returned_);
      handed_off_ -= static_cast<int>(out.size());
    }
    returned_cv_.notify_all();
    ArmReturned();
    return out;
  }

  void NoteHandedOff() {
    std::lock_guard<std::mutex> lock(returned_mu_);
    ++handed_off_;
  }
  void NoteReturnedUnserved() {
    std::lock_guard<std::mutex> lock(returned_mu_);
    --handed_off_;
  }
  // Before the ring goes: waits until the workers gave back every entry they were handed.
  void AwaitHandedOff() {
    std::unique_lock<std::mutex> lock(returned_mu_);
    returned_cv_.wait(lock, [&] { return handed_off_ == static_cast<int>(returned_.size()); });
  }

  const Affinity affinity;

 private:
  // A free submission slot, cleared. The ring has room for every submission its entries can have
  // waiting at once (Init), so there always is one.
  io_uring_sqe* Sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) std::abort();
    std::memset(sqe, 0, 2 * sizeof(*sqe));  // a 128-byte SQE: the struct, then the command area
    return sqe;
  }

  void ArmReturned() {
    io_uring_sqe* sqe = Sqe();
    io_uring_prep_read(sqe, returned_fd_, &returned_count_, sizeof(returned_count_), 0);
    sqe->user_data = kReturned;
  }

  io_uring ring_{};
  bool ready_ = false;
  std::vector<Entry> entries_;
  int returned_fd_ = -1;
  uint64_t returned_count_ = 0;
  std::mutex returned_mu_;  // guards the three below
  std::condition_variable returned_cv_;
  std::vector<Entry*> returned_;
  int handed_off_ = 0;  // entries with a worker or returned, not yet taken back
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

uint32_t OpcodeOf(const Entry& e) {
  fuse_in_header in;
  std::memcpy(&in, e.header.in_out, sizeof(in));
  return in.opcode;
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
  unsigned entries_per_thread = 0;
  unsigned queues = 0;
  std::atomic<bool> stopping{false};
  std::atomic<unsigned> registered{0};
  std::atomic<uint64_t> served{0};
  std::atomic<uint64_t> handed_off{0};
  std::unique_ptr<std::atomic<int>[]> idle;  // per queue: entries waiting for a request
  cpu_set_t cpus{};                          // the daemon's, before any thread was pinned

  std::mutex mu;  // guards the two below
  std::vector<std::thread> threads;
  std::vector<unsigned> started;  // per queue

  // The worker threads that serve what ring threads hand off.
  std::mutex work_mu;  // guards the four below
  std::condition_variable work_cv;
  std::deque<Entry*> work;
  unsigned workers = 0;
  unsigned idle_workers = 0;
  unsigned most_workers = 0;

  void SpawnLocked(uint16_t qid);
  void Grow(uint16_t qid);
  void Run(uint16_t qid);
  void Serve(Entry* e);
  void Finish(Entry* e, int res);
  // Hands the entry to a worker thread; false when none could be had (the caller serves it).
  bool HandOff(Entry* e);
  void Work();
  void StopWorkers();
  // Whether a ring thread with many entries serves the request itself: READ and WRITE, whose
  // transfers it leaves to its io_uring, and FALLOCATE, which waits for the filesystem at most
  // (one per allocating guest write: a hand-off would add a wakeup to each); anything else may
  // block the thread for long.
  bool ServedOnRing(uint32_t opcode) const {
    return entries_per_thread == 1 || opcode == FUSE_READ || opcode == FUSE_WRITE ||
           opcode == FUSE_FALLOCATE;
  }
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

UringTransport::UringTransport(fuse_session* se, unsigned threads_per_queue,
                               unsigned entries_per_thread)
    : impl_(std::make_unique<Impl>()) {
  impl_->se = se;
  impl_->threads_per_queue = std::max(1u, threads_per_queue);
  impl_->entries_per_thread = std::max(1u, entries_per_thread);
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
  impl_->StopWorkers();
  if (!threads.empty()) {
    spdlog::info(
        "io_uring: {} requests served by {} threads of {} entries ({} handed to up to {} "
        "workers)",
        impl_->served.load(), started, impl_->entries_per_thread, impl_->handed_off.load(),
        impl_->most_workers);
  }
}

void UringTransport::Impl::Run(uint16_t qid) {
  Ring ring(qid, entries_per_thread, cpus);
  ring.affinity.Pin();
  pthread_setname_np(pthread_self(), fmt::format("ring-q{}", qid).c_str());
  Status st = ring.Init();
  if (!st.ok()) {
    spdlog::error("io_uring: {}", st.ToString());
    return;
  }
  own_ring = &ring;
  const int fd = fuse_session_fd(se);
  // A registration completes when a request arrives in the entry, or at once with an error.
  std::vector<int> tries(ring.entries().size(), 0);
  for (Entry& e : ring.entries()) ring.Queue(&e, fd, kCmdRegister, 0);
  idle[qid] += static_cast<int>(ring.entries().size());
  if (registered.fetch_add(1) + 1 == queues * threads_per_queue) {
    spdlog::info(
        "FUSE requests served over io_uring: {} queues, {} threads of {} entries each to "
        "start with",
        queues, threads_per_queue, entries_per_thread);
  }
  // Sends the entry's reply and takes it back for the next request.
  auto commit = [&](Entry* e) {
    ring.Queue(e, fd, kCmdCommitAndFetch, e->unique);
    ++idle[qid];
  };
  size_t live = ring.entries().size();  // entries the kernel has not let go
  while (live > 0 && !stopping.load()) {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{.tv_sec = 0, .tv_nsec = kStopPollNs};
    int rc = io_uring_submit_and_wait_timeout(ring.raw(), &cqe, 1, &ts, nullptr);
    if (rc == -ETIME || rc == -EINTR) continue;
    if (rc < 0) {
      spdlog::error("io_uring: waiting on an io_uring: {}", std::strerror(-rc));
      break;
    }
    // Completions are taken one at a time: serving one may queue submissions, never completions.
    while (io_uring_peek_cqe(ring.raw(), &cqe) == 0) {
      const uint64_t data = cqe->user_data;
      const int res = cqe->res;
      io_uring_cqe_seen(ring.raw(), cqe);
      if (data == kReturned) {
        for (Entry* e : ring.TakeReturned()) commit(e);
        continue;
      }
      Entry* e = reinterpret_cast<Entry*>(data & ~kTagTransfer);
      if ((data & kTagTransfer) != 0) {
        Finish(e, res);
        commit(e);
        continue;
      }
      if (res == -EAGAIN &&
          ++tries[static_cast<size_t>(e - ring.entries().data())] < kRegisterTries) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));  // INIT still completing
        ring.Queue(e, fd, kCmdRegister, 0);
        continue;
      }
      if (res != 0) {
        // ENOTCONN, ECANCELED: the connection is gone (unmounted or aborted).
        if (res != -ENOTCONN && res != -ECANCELED) {
          spdlog::error("io_uring: fetching a request: {}", std::strerror(-res));
        }
        --idle[qid];
        --live;
        continue;
      }
      if (--idle[qid] < kSpareEntries) Grow(qid);
      served.fetch_add(1, std::memory_order_relaxed);
      if (!ServedOnRing(OpcodeOf(*e)) && HandOff(e)) continue;
      Serve(e);
      if (e->transfer == Entry::Transfer::kNone) commit(e);
    }
  }
  ring.AwaitHandedOff();
  own_ring = nullptr;
}

// Lays the entry's request out as /dev/fuse delivers it and has libfuse process it; its reply
// comes back through CaptureRingReply. Unless a transfer was left to the ring, the reply is then
// in the entry, ready to be committed.
void UringTransport::Impl::Serve(Entry* e) {
  fuse_in_header in;
  std::memcpy(&in, e->header.in_out, sizeof(in));
  RingEntInOut io;
  std::memcpy(&io, &e->header.ring_ent_in_out, sizeof(io));
  e->unique = io.commit_id;
  e->opcode = in.opcode;
  e->replied = false;
  e->transfer = Entry::Transfer::kNone;
  e->reply_error = 0;
  size_t fixed = sizeof(in) + io.payload_sz;
  if (in.len < fixed || in.len - fixed > kOpInOutSize || io.payload_sz > kPayloadSize) {
    spdlog::error("io_uring: malformed request (opcode {}, length {}, payload {})", in.opcode,
                  in.len, io.payload_sz);
    FailRequest(e, io.commit_id);
    return;
  }
  size_t op_in = in.len - fixed;
  uint8_t* msg = e->payload() - op_in - sizeof(in);
  std::memcpy(msg, &in, sizeof(in));
  std::memcpy(msg + sizeof(in), e->header.op_in, op_in);
  NoteRequest(msg, in.len);
  fuse_buf buf{};
  buf.size = in.len;
  buf.mem = msg;
  // A thread with one entry serves an OPEN itself: the threads of a first open start from it.
  bool widen = own_ring != nullptr && Affinity::MaySpawnThreads(in.opcode);
  if (widen) e->ring->affinity.Widen();
  serving = e;
  fuse_session_process_buf(se, &buf);
  serving = nullptr;
  if (widen) e->ring->affinity.Pin();
  if (!e->replied && e->transfer == Entry::Transfer::kNone) {
    spdlog::error("io_uring: request {} (opcode {}) got no reply", io.commit_id, in.opcode);
    FailRequest(e, io.commit_id);
  }
}

// The entry's transfer completed with `res`: its reply replaces the one the handler gave.
void UringTransport::Impl::Finish(Entry* e, int res) {
  ssize_t done = e->finish ? e->finish(res, e->bytes) : res;
  e->finish = nullptr;
  if (!e->replied) {
    spdlog::error("io_uring: request {} (opcode {}) got no reply", e->unique, e->opcode);
    done = -EIO;
  } else if (e->reply_error != 0) {
    done = e->reply_error;
  }
  fuse_out_header out{sizeof(fuse_out_header), 0, e->unique};
  uint32_t body = 0;
  if (done < 0) {
    out.error = static_cast<int32_t>(done);
  } else if (e->transfer == Entry::Transfer::kWrite) {
    fuse_write_out w{};
    w.size = static_cast<uint32_t>(done);
    std::memcpy(e->payload(), &w, sizeof(w));
    body = sizeof(w);
  } else {
    body = static_cast<uint32_t>(std::min<size_t>(static_cast<size_t>(done), e->bytes.size()));
  }
  out.len = static_cast<uint32_t>(sizeof(out) + body);
  std::memcpy(e->header.in_out, &out, sizeof(out));
  e->header.ring_ent_in_out.payload_sz = body;
  e->transfer = Entry::Transfer::kNone;
  e->bytes = {};
}

bool UringTransport::Impl::HandOff(Entry* e) {
  e->ring->NoteHandedOff();
  std::unique_lock<std::mutex> lock(work_mu);
  work.push_back(e);
  if (idle_workers >= work.size()) {
    work_cv.notify_one();
  } else {
    ++workers;
    most_workers = std::max(most_workers, workers);
    lock.unlock();
    try {
      std::thread([this] { Work(); }).detach();
    } catch (const std::system_error& err) {
      spdlog::warn("io_uring: starting a worker thread: {}", err.what());
      lock.lock();
      --workers;
      // With no worker at all nobody would take it: the ring thread serves it itself.
      if (workers == 0) {
        work.erase(std::find(work.begin(), work.end(), e));
        lock.unlock();
        e->ring->NoteReturnedUnserved();
        return false;
      }
    }
  }
  handed_off.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// A worker thread: serves handed-off requests, blocking in them as long as they take, and gives
// each entry back to its ring thread. Ends after kWorkerIdle without work, or when stopping.
void UringTransport::Impl::Work() {
  pthread_setname_np(pthread_self(), "ring-worker");
  // Not bound to the CPU of the ring thread that started it: a first open's threads start here.
  (void)sched_setaffinity(0, sizeof(cpus), &cpus);
  std::unique_lock<std::mutex> lock(work_mu);
  for (;;) {
    ++idle_workers;
    bool woke = work_cv.wait_for(lock, kWorkerIdle, [&] { return !work.empty() || stopping; });
    --idle_workers;
    if (!woke || work.empty()) break;
    Entry* e = work.front();
    work.pop_front();
    lock.unlock();
    Serve(e);
    e->ring->Return(e);
    lock.lock();
  }
  --workers;
  work_cv.notify_all();  // under the lock: StopWorkers may free this Impl once it sees none
}

void UringTransport::Impl::StopWorkers() {
  std::unique_lock<std::mutex> lock(work_mu);
  work_cv.notify_all();
  work_cv.wait(lock, [&] { return workers == 0; });
}

bool CaptureRingReply(const struct iovec* iov, int count, ssize_t* written) {
  Entry* e = serving;
  if (e == nullptr || count < 1 || iov[0].iov_len != sizeof(fuse_out_header)) return false;
  fuse_out_header out;
  std::memcpy(&out, iov[0].iov_base, sizeof(out));
  if (out.unique != e->unique) return false;  // a notification, or not this entry's request
  e->replied = true;
  if (e->transfer != Entry::Transfer::kNone) {
    // The transfer still uses the payload; its outcome is the reply (Impl::Finish).
    e->reply_error = out.error;
    *written = static_cast<ssize_t>(out.len);
    return true;
  }
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
  *written = static_cast<ssize_t>(out.len);
  return true;
}

namespace {

// The entry whose request of kind `opcode` the calling ring thread serves, when it may leave a
// transfer to its ring; else null.
Entry* TransferEntry(uint32_t opcode) {
  Entry* e = serving;
  if (e == nullptr || own_ring == nullptr || e->ring != own_ring || e->opcode != opcode ||
      e->transfer != Entry::Transfer::kNone || e->replied) {
    return nullptr;
  }
  return e;
}

}  // namespace

bool RingWrite(int fd, uint64_t offset, std::span<const uint8_t> data, RingFinish finish) {
  Entry* e = TransferEntry(FUSE_WRITE);
  if (e == nullptr || !e->InPayload(data.data(), data.size())) return false;
  // The payload is the entry's own, writable memory.
  e->bytes = {e->payload() + (data.data() - e->payload()), data.size()};
  e->finish = std::move(finish);
  e->transfer = Entry::Transfer::kWrite;
  e->ring->QueueTransfer(e, fd, offset, true);
  return true;
}

uint8_t* RingReadBuffer(size_t size) {
  Entry* e = TransferEntry(FUSE_READ);
  return e != nullptr && size <= kPayloadSize ? e->payload() : nullptr;
}

bool RingRead(int fd, uint64_t offset, std::span<uint8_t> into, RingFinish finish) {
  Entry* e = TransferEntry(FUSE_READ);
  if (e == nullptr || into.data() != e->payload() || into.size() > kPayloadSize) return false;
  e->bytes = into;
  e->finish = std::move(finish);
  e->transfer = Entry::Transfer::kRead;
  e->ring->QueueTransfer(e, fd, offset, false);
  return true;
}

}  // namespace vmetafs::fusefs
