// The meta-restore commands. Each returns the process exit code (session.h: kExitOk,
// kExitDamage, kExitError) after printing its report; errors go to stderr.
#pragma once

#include <string>
#include <vector>

#include "tools/meta_restore/session.h"

namespace vmetafs::meta_restore {

int ListCommand(const GlobalOptions& g);

int VerifyCommand(const GlobalOptions& g, const std::vector<std::string>& images);

struct RestoreOptions {
  std::string image;
  bool dry_run = false;
  std::string at;  // empty: the daemon's decision; else a point in time (store/history.h)
};
int RestoreCommand(const GlobalOptions& g, const RestoreOptions& o);

int HistoryCommand(const GlobalOptions& g, const std::string& image);

struct QuarantineOptions {
  std::string image;
  uint64_t extract_event = 0;  // 0: list
  std::string output;
};
int QuarantineCommand(const GlobalOptions& g, const QuarantineOptions& o);

struct ExportOptions {
  std::string image;
  std::string output;
  bool with_quarantine = true;
};
int ExportCommand(const GlobalOptions& g, const ExportOptions& o);
int ImportCommand(const GlobalOptions& g, const std::string& file);

struct GcOptions {
  bool dry_run = false;
  bool force = false;  // delete even when every journaled image is missing from the backing
};
int GcCommand(const GlobalOptions& g, const GcOptions& o);

// The whole tool: parses the command line and runs one command.
int Main(int argc, char** argv);

}  // namespace vmetafs::meta_restore
