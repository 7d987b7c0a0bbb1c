#include "fusefs/crash_report.h"

#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <cstring>

namespace vmetafs::fusefs {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};

void Write(const char* s) { (void)!write(STDERR_FILENO, s, strlen(s)); }

// Only async-signal-safe calls, except backtrace(), which InstallFatalSignalReport primes so
// that it does not load libgcc here.
void Report(int sig) {
  Write("vmetafs: fatal signal ");
  Write(sigabbrev_np(sig) != nullptr ? sigabbrev_np(sig) : "?");
  Write(", backtrace:\n");
  void* frames[64];
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  raise(sig);  // SA_RESETHAND restored the default action (a core dump): it runs now
}

}  // namespace

void InstallFatalSignalReport() {
  if (kSanitized) return;
  void* frame;
  (void)backtrace(&frame, 1);
  struct sigaction sa {};
  sa.sa_handler = Report;
  sa.sa_flags = SA_RESETHAND | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int sig : kSignals) sigaction(sig, &sa, nullptr);
}

}  // namespace vmetafs::fusefs
