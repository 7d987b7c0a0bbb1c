#include "tools/meta_restore/session.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <limits.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

namespace vmetafs::meta_restore {
namespace {

// The daemon writes its pid into this file of the store while it holds the store's flock.
constexpr char kLockFile[] = "LOCK.vmetafs";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string RealPath(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : p;
}

std::string Unescape(const std::string& field) {  // /proc/mounts escapes spaces etc. as \ooo
  std::string out;
  for (size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size()) {
      out.push_back(static_cast<char>(std::strtol(field.substr(i + 1, 3).c_str(), nullptr, 8)));
      i += 3;
    } else {
      out.push_back(field[i]);
    }
  }
  return out;
}

// The fuse.vmetafs mount point that process `pid` serves, or "" when it cannot be told.
std::string MountPointOf(long pid) {
  std::vector<std::string> args;
  {
    std::string cmdline = ReadAll(fmt::format("/proc/{}/cmdline", pid));
    std::string arg;
    for (char c : cmdline) {
      if (c != '\0') {
        arg.push_back(c);
        continue;
      }
      args.push_back(RealPath(arg));
      arg.clear();
    }
  }
  std::istringstream mounts(ReadAll("/proc/mounts"));
  std::string line;
  while (std::getline(mounts, line)) {
    std::istringstream fields(line);
    std::string device, where, type;
    fields >> device >> where >> type;
    if (type != "fuse.vmetafs") continue;
    where = Unescape(where);
    for (const std::string& a : args) {
      if (a == where) return where;
    }
  }
  return "";
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

std::string HeldByDaemonMessage(const std::string& store_dir, const std::string& purpose) {
  const long pid = std::strtol(ReadAll(store_dir + "/" + kLockFile).c_str(), nullptr, 10);
  const std::string mnt = pid > 0 ? MountPointOf(pid) : "";
  const std::string who = pid > 0 ? fmt::format("a vmetafs daemon (pid {}{})", pid,
                                                mnt.empty() ? "" : ", mounted on " + mnt)
                                  : "a vmetafs daemon";
  return fmt::format(
      "the store {} is held by {}; meta-restore never changes a store a daemon is using.\n"
      "Images of that mount are verified, and restored when damaged, automatically at their next "
      "first open through the mount (close every user of the image, then open it again).\n"
      "To {} with meta-restore, unmount first: fusermount3 -u {}",
      store_dir, who, purpose, mnt.empty() ? "MOUNTPOINT" : mnt);
}

Status Session::Open(const GlobalOptions& options, Mode mode, const std::string& purpose,
                     bool create, std::unique_ptr<Session>* out) {
  if (options.store.empty()) {
    return Status::InvalidArgument("no store given: use --store DIR or set VMETAFS_STORE");
  }
  std::unique_ptr<Session> s(new Session(options, mode));
  store::JournalOptions probe;
  probe.read_only = true;
  Status opened = Exists(options.store) ? store::Journal::Open(options.store, probe, &s->journal_)
                                        : Status::NotFound("no vmetafs store at " + options.store);
  const bool exists = opened.ok();
  if (!opened.ok() && !(opened.IsNotFound() && create)) return opened;
  if (mode == Mode::kReadOnly) {
    *out = std::move(s);
    return Status::Ok();
  }
  s->journal_.reset();
  store::JournalOptions jo;
  if (!exists && !options.backing.empty()) {
    // A fresh store records the backing it belongs to, as the daemon names it.
    backend::Backend* b = nullptr;
    VMETAFS_RETURN_IF_ERROR(s->Backing(&b));
    jo.backing = b->Id();
  }
  Status w = store::Journal::Open(options.store, jo, &s->journal_);
  if (w.IsBusy()) return Status::Busy(HeldByDaemonMessage(options.store, purpose));
  VMETAFS_RETURN_IF_ERROR(w);
  *out = std::move(s);
  return Status::Ok();
}

std::string Session::BackingSpec() const {
  if (!options_.backing.empty()) return options_.backing;
  return journal_ ? journal_->backing() : "";
}

Status Session::Backing(backend::Backend** out) {
  if (!backend_) {
    const std::string spec = BackingSpec();
    if (spec.empty()) {
      return Status::InvalidArgument("the store " + options_.store +
                                     " records no backing yet: give --backing DIR|nfs://URL");
    }
    VMETAFS_RETURN_IF_ERROR(
        backend::Backend::Open(spec, &backend_).Annotate("opening the backing " + spec));
  }
  *out = backend_.get();
  return Status::Ok();
}

std::string Session::ImagePath(const std::string& arg) const {
  std::string p = arg;
  const std::string root = BackingSpec();
  if (!root.empty() && p.size() > root.size() && p.starts_with(root) && p[root.size()] == '/') {
    p = p.substr(root.size());
  }
  while (p.starts_with("./")) p = p.substr(2);
  while (p.starts_with("/")) p = p.substr(1);
  return p;
}

Status Session::FindImage(const std::string& path, store::ImageRecord* out) const {
  Status s = journal_->FindImage(path, out);
  if (s.IsNotFound()) {
    return Status::NotFound(fmt::format(
        "unknown image {}: the store {} has no journal for it (`meta-restore list` shows the "
        "images it knows)",
        path, options_.store));
  }
  return s;
}

Status Session::OpenImage(const std::string& path, bool write,
                          std::unique_ptr<store::ImageFile>* out) {
  backend::Backend* b = nullptr;
  VMETAFS_RETURN_IF_ERROR(Backing(&b));
  if (write && !writable()) return Status::InvalidArgument("the store was opened read-only");
  // The other files of a multi-file image (VMDK extents), opened as the image names them.
  auto open = [this, b, write](const std::string& file, std::unique_ptr<store::ImageFile>* f) {
    std::unique_ptr<backend::File> opened;
    VMETAFS_RETURN_IF_ERROR(
        b->Open(file, write ? O_RDWR : O_RDONLY, 0, &opened)
            .Annotate(fmt::format("opening {} on the backing {}", file, BackingSpec())));
    *f = std::move(opened);
    return Status::Ok();
  };
  std::unique_ptr<store::ImageFile> primary;
  VMETAFS_RETURN_IF_ERROR(open(path, &primary));
  *out = std::make_unique<store::MultiFileImage>(std::move(primary), path, open);
  return Status::Ok();
}

}  // namespace vmetafs::meta_restore
