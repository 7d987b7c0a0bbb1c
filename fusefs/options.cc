#include "fusefs/options.h"

#include <fmt/format.h>
#include <fuse_lowlevel.h>
#include <fuse_opt.h>

#include <charconv>
#include <cstdio>
#include <string_view>

namespace vmetafs::fusefs {
namespace {

enum Key {
  kStore,
  kSync,
  kJournal,
  kUnprotected,
  kThreads,
  kKillPrivV2,
  kIoUring,
  kRingThreads,
  kHelp,
  kVersion
};

const struct fuse_opt kSpecs[] = {
    FUSE_OPT_KEY("store=", kStore),
    FUSE_OPT_KEY("sync=", kSync),
    FUSE_OPT_KEY("journal=", kJournal),
    FUSE_OPT_KEY("unprotected_writes=", kUnprotected),
    FUSE_OPT_KEY("threads=", kThreads),
    FUSE_OPT_KEY("killpriv_v2=", kKillPrivV2),
    FUSE_OPT_KEY("io_uring=", kIoUring),
    FUSE_OPT_KEY("ring_threads=", kRingThreads),
    FUSE_OPT_KEY("-h", kHelp),
    FUSE_OPT_KEY("--help", kHelp),
    FUSE_OPT_KEY("-V", kVersion),
    FUSE_OPT_KEY("--version", kVersion),
    FUSE_OPT_END,
};

constexpr const char* kUsage = R"(usage: vmetafs BACKING MOUNTPOINT [options]

Mounts BACKING (a directory, or nfs://SERVER/EXPORT[/DIR]) on MOUNTPOINT. Every operation passes
through; the metadata of disk images (qcow2 headers, L1/L2 and refcount tables, ...) written
through the mount is journaled on the local disk, verified on each image's first open and
restored from the journal when the storage lost or damaged it.

vmetafs options:
    -o store=DIR           journal directory (default: /var/lib/vmetafs/<name of BACKING>)
    -o sync=MODE           when journal entries become durable:
                             flush        by the time the guest's flush (fsync) returns (default)
                             write        before each metadata write returns
                             periodic:MS  at most MS milliseconds of journal can be lost
    -o journal=on|off      off: pure passthrough, no store is opened (default: on)
    -o unprotected_writes=continue|fail
                           when the journal cannot be written: keep serving the write and mark
                           the image unprotected (continue, default), or fail the write (fail)
    -o threads=N           FUSE worker threads kept idle (default: 16)
    -o killpriv_v2=on|off  on: negotiate FUSE_HANDLE_KILLPRIV_V2 with the kernel when it offers it,
                           the daemon then clears set-user-ID/set-group-ID bits on write,
                           truncate and chown, and the kernel stops asking for
                           security.capability before every write and fallocate (default: on)
    -o io_uring=on|off     on: take requests over io_uring when the kernel offers it (Linux 6.14+
                           with the fuse module's enable_uring parameter set), else over
                           /dev/fuse; off: always /dev/fuse (default: on)
    -o ring_threads=N      io_uring: threads per CPU to start with; each queue grows by itself
                           when its requests block, up to 64 (default: 2 over a directory,
                           whose threads hold 16 entries each; 4 over nfs://, one entry each)
    -f                     stay in the foreground, log to stderr (default: daemonize, log to syslog)
    -d                     debug output (implies -f)
    -s                     single-threaded
    -h, --help             this text
    -V, --version          version

The mount always uses default_permissions (the kernel checks modes); add allow_other to let other
users (e.g. the hypervisor's) in. Other FUSE options pass through to libfuse:
)";

struct ParseState {
  Options* options = nullptr;
  int positional = 0;
  bool help = false;
  bool version = false;
  std::string error;
};

bool ParseUnsigned(std::string_view text, uint32_t min, uint32_t max, uint32_t* out) {
  uint32_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || v < min || v > max) return false;
  *out = v;
  return true;
}

bool ParseSync(std::string_view v, Options* o) {
  if (v == "flush") {
    o->sync = store::SyncMode::kFlush;
  } else if (v == "write") {
    o->sync = store::SyncMode::kWrite;
  } else if (v.starts_with("periodic:")) {
    o->sync = store::SyncMode::kPeriodic;
    return ParseUnsigned(v.substr(9), 1, 3600 * 1000, &o->periodic_ms);
  } else {
    return false;
  }
  return true;
}

bool ParseValue(int key, std::string_view value, Options* o) {
  switch (key) {
    case kStore:
      o->store_dir = value;
      return !value.empty();
    case kSync:
      return ParseSync(value, o);
    case kJournal:
      o->journal = value == "on";
      return value == "on" || value == "off";
    case kUnprotected:
      o->fail_unprotected_writes = value == "fail";
      return value == "fail" || value == "continue";
    case kThreads:
      return ParseUnsigned(value, 1, 1024, &o->threads);
    case kKillPrivV2:
      o->killpriv_v2 = value == "on";
      return value == "on" || value == "off";
    case kIoUring:
      o->io_uring = value == "on";
      return value == "on" || value == "off";
    case kRingThreads:
      return ParseUnsigned(value, 1, 64, &o->ring_threads);
  }
  return false;
}

constexpr const char* kExpected[] = {"a directory",      "flush, write or periodic:MS", "on or off",
                                     "continue or fail", "a number from 1 to 1024",     "on or off",
                                     "on or off",        "a number from 1 to 64"};

int OptProc(void* data, const char* arg, int key, struct fuse_args*) {
  auto* state = static_cast<ParseState*>(data);
  if (key == FUSE_OPT_KEY_NONOPT) {
    if (state->positional == 0) state->options->backing = arg;
    if (state->positional == 1) state->options->mountpoint = arg;
    if (state->positional++ >= 2) state->error = fmt::format("unexpected argument '{}'", arg);
    return 0;
  }
  if (key == kHelp || key == kVersion) {
    (key == kHelp ? state->help : state->version) = true;
    return 0;
  }
  if (key < kStore || key > kRingThreads) return 1;  // FUSE's own: keep for libfuse
  std::string_view option(arg);
  std::string_view value = option.substr(option.find('=') + 1);
  if (!ParseValue(key, value, state->options) && state->error.empty()) {
    state->error = fmt::format("bad value in '-o {}': expected {}", option, kExpected[key]);
  }
  return 0;
}

int UsageError(const std::string& message) {
  std::fprintf(stderr, "vmetafs: %s\nTry 'vmetafs --help'.\n", message.c_str());
  return kExitUsage;
}

}  // namespace

bool ParseOptions(int argc, char** argv, Options* out, int* exit_code) {
  struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
  ParseState state;
  state.options = out;
  struct fuse_cmdline_opts cmd = {};
  bool parsed = fuse_opt_parse(&args, &state, kSpecs, OptProc) == 0 &&
                (state.help || state.version || fuse_parse_cmdline(&args, &cmd) == 0);
  if (parsed && !state.help && !state.version) {
    out->foreground = cmd.foreground != 0;
    out->debug = cmd.debug != 0;
    out->single_thread = cmd.singlethread != 0;
    out->fuse_argv.assign(args.argv, args.argv + args.argc);
  }
  free(cmd.mountpoint);
  fuse_opt_free_args(&args);
  *exit_code = kExitOk;
  if (state.help) {
    std::printf("%s", kUsage);
    fuse_lowlevel_help();
    return false;
  }
  if (state.version) {
    std::printf("vmetafs %s (libfuse %s)\n", VMETAFS_VERSION, fuse_pkgversion());
    return false;
  }
  if (!parsed) {
    *exit_code = UsageError(state.error.empty() ? "bad options" : state.error);
  } else if (!state.error.empty()) {
    *exit_code = UsageError(state.error);
  } else if (state.positional < 2) {
    *exit_code =
        UsageError(state.positional == 0 ? "missing BACKING and MOUNTPOINT" : "missing MOUNTPOINT");
  }
  return *exit_code == kExitOk;
}

std::string DefaultStoreDir(const std::string& backing_id) {
  uint64_t hash = 14695981039346656037ull;  // FNV-1a: stable across builds, unlike std::hash
  for (unsigned char c : backing_id) hash = (hash ^ c) * 1099511628211ull;
  std::string name;
  for (char c : backing_id) {
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '-' || c == '_';
    if (name.empty() && c == '/') continue;
    name.push_back(plain ? c : '_');
    if (name.size() >= 96) break;
  }
  if (name.empty()) name = "root";
  return fmt::format("/var/lib/vmetafs/{}-{:08x}", name,
                     static_cast<uint32_t>(hash ^ (hash >> 32)));
}

}  // namespace vmetafs::fusefs
