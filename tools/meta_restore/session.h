// Session: one meta-restore run's view of a store and its backing.
//
// Read-only commands open the journal read_only, which works while a daemon holds the store.
// Commands that change the store or an image open it writable; when a live daemon holds the
// store they are refused (exit 2) with a message naming its pid and mount point: meta-restore
// never races the daemon. Not thread-safe: one command, one thread.
#pragma once

#include <memory>
#include <string>

#include "fusefs/backend/backend.h"
#include "store/formats/format.h"
#include "store/journal.h"
#include "store/status.h"

namespace vmetafs::meta_restore {

// Exit codes, documented in --help.
inline constexpr int kExitOk = 0;      // clean / done
inline constexpr int kExitDamage = 1;  // damage found, or a restore refused
inline constexpr int kExitError = 2;   // bad arguments, unknown image, unreadable store/backing

struct GlobalOptions {
  std::string store;    // --store or $VMETAFS_STORE
  std::string backing;  // --backing: overrides (or supplies) the store's recorded backing
  bool json = false;
};

class Session {
 public:
  enum class Mode { kReadOnly, kWritable };
  // Opens the store. kWritable fails with Busy (message ready to print) when a daemon holds it;
  // `purpose` completes that message ("restore vms/web.qcow2"). A missing store is NotFound
  // unless `create` (import into a fresh store).
  static Status Open(const GlobalOptions& options, Mode mode, const std::string& purpose,
                     bool create, std::unique_ptr<Session>* out);

  store::Journal& journal() { return *journal_; }
  const GlobalOptions& options() const { return options_; }
  bool writable() const { return mode_ == Mode::kWritable; }
  const store::ParseLimits& limits() const { return limits_; }

  // The backing spec in use: --backing, else what the store recorded.
  std::string BackingSpec() const;
  // Opens the backing once; errors say which spec failed.
  Status Backing(backend::Backend** out);
  // IMAGE as given on the command line, made relative to the backing root.
  std::string ImagePath(const std::string& arg) const;
  // The image's journal record; NotFound says how to list the known images.
  Status FindImage(const std::string& path, store::ImageRecord* out) const;
  // Opens the image file on the backing (read-write only in a writable session).
  // A multi-file image's other files (VMDK extents) are opened as its parse names them.
  Status OpenImage(const std::string& path, bool write, std::unique_ptr<store::ImageFile>* out);

 private:
  Session(GlobalOptions options, Mode mode) : options_(std::move(options)), mode_(mode) {}

  GlobalOptions options_;
  Mode mode_;
  store::ParseLimits limits_;
  std::unique_ptr<store::Journal> journal_;
  std::unique_ptr<backend::Backend> backend_;
};

// The message for a store held by a live daemon (pid and mount point when they can be found).
std::string HeldByDaemonMessage(const std::string& store_dir, const std::string& purpose);

}  // namespace vmetafs::meta_restore
