#include "fusefs/daemon.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fuse_lowlevel.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <thread>

#include "fusefs/crash_report.h"
#include "fusefs/filesystem.h"
#include "fusefs/fuse_uring.h"
#include "fusefs/killpriv_v2.h"
#include "fusefs/operations.h"
#include "fusefs/options.h"

namespace vmetafs::fusefs {
namespace {

// A store whose previous daemon is still closing it (an unmount returns before the daemon has
// finished) becomes free within moments; a store held by a live daemon stays busy.
constexpr auto kStoreBusyWait = std::chrono::seconds(3);

// Ring entries per io_uring thread over local files: requests a CPU's queue has in flight before
// it starts another thread.
constexpr unsigned kRingEntriesPerThread = 16;

void UseLog(spdlog::sink_ptr sink, bool debug) {
  auto logger = std::make_shared<spdlog::logger>("vmetafs", std::move(sink));
  logger->set_level(debug ? spdlog::level::debug : spdlog::level::info);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

void UseStderrLog(bool debug) {
  UseLog(std::make_shared<spdlog::sinks::stderr_color_sink_mt>(), debug);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%l] %v");
}

void UseSyslog(bool debug) {
  UseLog(std::make_shared<spdlog::sinks::syslog_sink_mt>("vmetafs", LOG_PID, LOG_DAEMON, false),
         debug);
  spdlog::set_pattern("%v");
}

// libfuse's own messages join the daemon's log. It writes one line in several calls.
void FuseLog(enum fuse_log_level level, const char* format, va_list ap) {
  thread_local std::string line;
  char buf[1024];
  std::vsnprintf(buf, sizeof(buf), format, ap);
  line += buf;
  if (line.empty() || line.back() != '\n') return;
  while (!line.empty() && line.back() == '\n') line.pop_back();
  auto lvl = level <= FUSE_LOG_ERR       ? spdlog::level::err
             : level <= FUSE_LOG_WARNING ? spdlog::level::warn
             : level <= FUSE_LOG_INFO    ? spdlog::level::info
                                         : spdlog::level::debug;
  spdlog::log(lvl, "libfuse: {}", line);
  line.clear();
}

int Fail(const Status& st) {
  std::fprintf(stderr, "vmetafs: %s\n", st.message().c_str());
  return kExitFailure;
}

// Undoes the octal escapes of /proc/self/mountinfo ("\040" for a space).
std::string Unescape(const std::string& s) {
  auto octal = [&](size_t i) { return s[i] >= '0' && s[i] <= '7'; };
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
      out.push_back(
          static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

bool IsVmetafsMount(const std::string& dir) {
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, mountpoint, field;
    fields >> id >> parent >> devno >> root >> mountpoint;
    while (fields >> field && field != "-") {
    }
    std::string fstype;
    fields >> fstype;
    if (fstype == "fuse.vmetafs" && Unescape(mountpoint) == dir) return true;
  }
  return false;
}

Status CheckMountpoint(const std::string& given, std::string* canonical) {
  std::error_code ec;
  std::filesystem::path p = std::filesystem::canonical(given, ec);
  if (ec)
    return Status::IoError(fmt::format("mountpoint '{}': {}", given, ec.message()), ec.value());
  if (!std::filesystem::is_directory(p, ec)) {
    return Status::IoError(fmt::format("mountpoint '{}' is not a directory", given), ENOTDIR);
  }
  if (IsVmetafsMount(p.string())) {
    return Status::Busy(
        fmt::format("mountpoint '{}' is busy: vmetafs is already mounted there", given));
  }
  *canonical = p.string();
  return Status::Ok();
}

Status PrepareStore(const std::string& dir) {
  std::error_code ec;
  if (std::filesystem::exists(dir, ec) && !std::filesystem::is_directory(dir, ec)) {
    return Status::IoError(fmt::format("store '{}' is not a directory", dir), ENOTDIR);
  }
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return Status::IoError(fmt::format("creating store '{}': {}", dir, ec.message()), ec.value());
  }
  if (access(dir.c_str(), W_OK | X_OK) != 0) {
    int err = errno;
    return PosixError(fmt::format("store '{}' is not writable", dir), err);
  }
  return Status::Ok();
}

Status OpenProtector(const store::ProtectorOptions& options,
                     std::unique_ptr<store::Protector>* out) {
  auto deadline = std::chrono::steady_clock::now() + kStoreBusyWait;
  for (;;) {
    Status st = store::Protector::Open(options, out);
    if (!st.IsBusy() || std::chrono::steady_clock::now() >= deadline) return st;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

// How the daemonized child tells the waiting parent that the mount is ready (0) or failed.
class Readiness {
 public:
  ~Readiness() { Report(kExitFailure); }
  // Forks. In the parent, waits for the child's report and returns true with *exit_code set.
  bool ForkAndWait(int* exit_code) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0 || (pid_ = fork()) < 0) {
      *exit_code = Fail(PosixError("daemonizing", errno));
      return true;
    }
    if (pid_ == 0) {
      close(p[0]);
      fd_ = p[1];
      setsid();
      return false;
    }
    close(p[1]);
    uint8_t code = kExitFailure;
    ssize_t n;
    while ((n = read(p[0], &code, 1)) < 0 && errno == EINTR) {
    }
    if (n != 1) std::fprintf(stderr, "vmetafs: the daemon exited before the mount was ready\n");
    close(p[0]);
    *exit_code = n == 1 ? code : kExitFailure;
    return true;
  }
  void Report(int code) {
    if (fd_ < 0) return;
    uint8_t c = static_cast<uint8_t>(code);
    (void)!write(fd_, &c, 1);
    close(fd_);
    fd_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
};

void DetachStdio() {
  int null = open("/dev/null", O_RDWR);
  if (null < 0) return;
  for (int fd = 0; fd <= 2; ++fd) dup2(null, fd);
  if (null > 2) close(null);
}

// Each open through the mount holds one or two descriptors of the backing.
void RaiseFileLimit() {
  struct rlimit lim;
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
  }
}

struct SessionArgs {
  explicit SessionArgs(const Options& o, const std::string& backing_id) {
    for (const std::string& a : o.fuse_argv) fuse_opt_add_arg(&args, a.c_str());
    char* mount_opts = nullptr;
    fuse_opt_add_opt_escaped(&mount_opts, ("fsname=" + backing_id).c_str());
    fuse_opt_add_opt(&mount_opts, "subtype=vmetafs");
    fuse_opt_add_opt(&mount_opts, "default_permissions");
    fuse_opt_add_arg(&args, "-o");
    fuse_opt_add_arg(&args, mount_opts);
    free(mount_opts);
  }
  ~SessionArgs() { fuse_opt_free_args(&args); }
  struct fuse_args args = FUSE_ARGS_INIT(0, nullptr);
};

int Loop(fuse_session* se, const Options& o) {
  if (o.single_thread) return fuse_session_loop(se);
  struct fuse_loop_config* config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(config, 1);
  fuse_loop_cfg_set_idle_threads(config, o.threads);
  fuse_loop_cfg_set_max_threads(config, std::max(o.threads, 64u));
  int ret = fuse_session_loop_mt(se, config);
  fuse_loop_cfg_destroy(config);
  return ret;
}

// Serves the mount until it ends; the session is new and not yet mounted.
int Serve(fuse_session* se, Filesystem& fs, const Options& o, const std::string& mountpoint,
          const store::ProtectorOptions* popts, Readiness& ready) {
  std::unique_ptr<store::Protector> protector;
  if (popts != nullptr) {
    Status st = OpenProtector(*popts, &protector);
    if (!st.ok()) return Fail(st.Annotate(fmt::format("opening store '{}'", popts->store_dir)));
    fs.SetProtector(protector.get());
  }
  if (fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(se);
    if (protector != nullptr) (void)protector->Close();
    return kExitFailure;  // libfuse said why
  }
  std::unique_ptr<UringTransport> uring;
  std::function<void()> start_uring;
  if (o.io_uring && !o.single_thread) {
    // Local files: threads that leave their transfers to the ring, many entries each; over
    // nfs://, where the daemon blocks in every transfer, threads of one entry each.
    const bool kernel_files = fs.backend().KernelFiles();
    const unsigned entries = kernel_files ? kRingEntriesPerThread : 1;
    const unsigned threads = o.ring_threads != 0 ? o.ring_threads : kernel_files ? 2 : 4;
    uring = std::make_unique<UringTransport>(se, threads, entries);
    start_uring = [t = uring.get()] {
      Status st = t->Start();
      if (!st.ok()) spdlog::warn("FUSE over io_uring not started: {}", st.ToString());
    };
  }
  if (o.killpriv_v2 || start_uring) {
    Status st = InstallDevHooks(se, o.killpriv_v2, start_uring);
    if (!st.ok()) {
      spdlog::warn("neither FUSE_HANDLE_KILLPRIV_V2 nor io_uring offered: {}", st.ToString());
    }
  }
  ready.Report(kExitOk);
  if (!o.foreground) {
    DetachStdio();
    UseSyslog(o.debug);
  }
  spdlog::info("{} mounted on {} ({})", fs.backend().Id(), mountpoint,
               popts != nullptr ? "store " + popts->store_dir : "journal off");
  int ret = Loop(se, o);
  if (uring != nullptr) uring->Stop();
  fs.ReleaseAll();
  if (protector != nullptr) {
    Status st = protector->Close();
    if (!st.ok()) spdlog::error("closing the store: {}", st.ToString());
  }
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  spdlog::info("{} unmounted", mountpoint);
  return ret < 0 ? kExitFailure : kExitOk;
}

store::ProtectorOptions StoreOptions(const Options& o, const std::string& backing_id) {
  store::ProtectorOptions p;
  p.store_dir = o.store_dir.empty() ? DefaultStoreDir(backing_id)
                                    : std::filesystem::absolute(o.store_dir).string();
  p.journal.sync = o.sync;
  p.journal.periodic_ms = o.periodic_ms;
  p.journal.backing = backing_id;
  p.fail_writes_when_unprotected = o.fail_unprotected_writes;
  return p;
}

}  // namespace

int RunDaemon(int argc, char** argv) {
  Options o;
  int code = kExitOk;
  if (!ParseOptions(argc, argv, &o, &code)) return code;
  UseStderrLog(o.debug);
  InstallFatalSignalReport();
  fuse_set_log_func(FuseLog);
  umask(0);  // the kernel applied the client's umask already
  RaiseFileLimit();

  std::unique_ptr<backend::Backend> backend;
  std::string mountpoint;
  Status st = backend::Backend::Open(o.backing, &backend);
  if (st.ok()) st = CheckMountpoint(o.mountpoint, &mountpoint);
  if (!st.ok()) return Fail(st);
  store::ProtectorOptions popts = StoreOptions(o, backend->Id());
  SessionArgs args(o, backend->Id());
  Filesystem fs(std::move(backend), FsConfig{});
  const fuse_lowlevel_ops& ops = Operations();
  fuse_session* se = fuse_session_new(&args.args, &ops, sizeof(ops), &fs);
  if (se == nullptr) return kExitUsage;  // libfuse named the bad option
  st = fs.Init();
  if (st.ok() && o.journal) st = PrepareStore(popts.store_dir);
  Readiness ready;
  if (!st.ok()) {
    code = Fail(st);
  } else if (o.foreground || !ready.ForkAndWait(&code)) {
    code = Serve(se, fs, o, mountpoint, o.journal ? &popts : nullptr, ready);
    ready.Report(code);
  }
  fuse_session_destroy(se);
  return code;
}

}  // namespace vmetafs::fusefs
