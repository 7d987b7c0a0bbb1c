// Options: the command line of `vmetafs BACKING MOUNTPOINT [-o ...] [-f] [-d]`.
//
// vmetafs's own -o options (store, sync, journal, unprotected_writes, threads, killpriv_v2,
// io_uring, ring_threads) are
// taken out; everything else (allow_other, ro, fsname...) is left for libfuse, which rejects what
// it does not know when the session is created.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "store/journal.h"

namespace vmetafs::fusefs {

// Exit codes of the daemon.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // could not mount: backing, mountpoint, store
inline constexpr int kExitUsage = 2;    // bad command line

struct Options {
  std::string backing;     // as given
  std::string mountpoint;  // as given
  std::string store_dir;   // empty: the default for the backing (DefaultStoreDir)
  bool journal = true;
  store::SyncMode sync = store::SyncMode::kFlush;
  uint32_t periodic_ms = 1000;
  bool fail_unprotected_writes = false;
  unsigned threads = 16;      // libfuse's max_idle_threads
  bool killpriv_v2 = true;    // negotiate FUSE_HANDLE_KILLPRIV_V2 (killpriv_v2.h)
  bool io_uring = true;       // serve requests over io_uring when the kernel offers it
  unsigned ring_threads = 0;  // io_uring: threads per CPU's queue to start with (0: by backing)
  bool foreground = false;
  bool debug = false;
  bool single_thread = false;
  // argv for fuse_session_new: program name, then the generic FUSE options.
  std::vector<std::string> fuse_argv;
};

// Parses argv. Returns true when the daemon should run; otherwise *exit_code says how to leave
// (kExitOk after --help/--version, kExitUsage after a message on stderr).
bool ParseOptions(int argc, char** argv, Options* out, int* exit_code);

// Where the journal of `backing_id` (a canonical path or URL) lives when store= is not given:
// /var/lib/vmetafs/<the id with '/' as '_'>-<8 hex digits of a stable hash of the id>.
std::string DefaultStoreDir(const std::string& backing_id);

}  // namespace vmetafs::fusefs
