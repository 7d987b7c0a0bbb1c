// The meta-restore command line (CLI11): options, help text and dispatch to the commands.
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>

#include "store/journal.h"
#include "tools/meta_restore/commands.h"

namespace vmetafs::meta_restore {
namespace {

std::string Footer() {
  return fmt::format(
      R"(IMAGE is a path relative to the backing root, as `list` shows it.
The store is the daemon's journal directory (vmetafs -o store=DIR): --store DIR or $VMETAFS_STORE.

Exit codes:
  0  ok: clean, or done and healthy afterwards
  1  damage found (verify, restore --dry-run), or a restore refused / not healthy afterwards
  2  error: bad arguments, unknown image, missing or unreadable store or backing, damaged or
     truncated export file, or a store held by a running vmetafs daemon

History retention: the journal keeps each unit's latest version and its {} older versions
(journal option history_versions, the daemon's default); `restore --at` reaches back only as far
as that ring, and units retired since (freed clusters) are gone from it.

--at SEQ|TIME:  N or seq:N is a sequence number (list and history show them); @S, or a number
from 1000000000 on, is unix seconds; otherwise ISO 8601, YYYY-MM-DDTHH:MM[:SS[.fff]][Z|+HH:MM]
(UTC when no zone is given).

Beside a running daemon, list, verify, history, quarantine, export and restore --dry-run work
(the store is opened read-only); restore, import and gc are refused: the daemon verifies and
restores an image itself at its next first open, or unmount first (fusermount3 -u MOUNTPOINT).)",
      store::JournalOptions{}.history_versions);
}

struct Parsed {
  GlobalOptions g;
  std::vector<std::string> images;
  RestoreOptions restore;
  QuarantineOptions quarantine;
  ExportOptions exp;
  std::string import_file;
  GcOptions gc;
  std::string history_image;
  bool no_quarantine = false;
};

void AddJson(CLI::App* sub, Parsed& p) {
  sub->add_flag("--json", p.g.json, "print the report as JSON on stdout");
}

CLI::App* Define(CLI::App& app, Parsed& p) {
  app.add_option("--store", p.g.store, "the journal store (the daemon's -o store=DIR)")
      ->envname("VMETAFS_STORE");
  app.add_option("--backing", p.g.backing,
                 "the backing (directory or nfs:// URL) to read images from, instead of the one "
                 "the store records (required for a store that records none)");
  app.require_subcommand(1);
  app.fallthrough();  // --store and --backing may also follow the command
  app.footer(Footer());
  AddJson(app.add_subcommand("list",
                             "every image of the store: format, size, journal use, last "
                             "check, protection"),
          p);
  CLI::App* verify = app.add_subcommand(
      "verify", "hold every journaled unit against the storage; say what a first open would do");
  verify->add_option("IMAGE", p.images, "images to verify")->required();
  AddJson(verify, p);
  CLI::App* restore =
      app.add_subcommand("restore",
                         "carry out the first-open decision now (restore damaged metadata from the "
                         "journal), or bring the metadata back to an earlier version (--at)");
  restore->add_option("IMAGE", p.restore.image, "the image")->required();
  restore->add_flag("--dry-run", p.restore.dry_run, "print the plan; write nothing");
  restore->add_option("--at", p.restore.at, "restore the versions in force at SEQ or TIME");
  restore->footer(Footer());
  AddJson(restore, p);
  CLI::App* history = app.add_subcommand("history", "the image's decisions (events)");
  history->add_option("IMAGE", p.history_image, "the image")->required();
  AddJson(history, p);
  CLI::App* quarantine =
      app.add_subcommand("quarantine", "bytes that restores replaced, kept to undo them");
  quarantine->add_option("IMAGE", p.quarantine.image, "the image")->required();
  auto* extract = quarantine->add_option("--extract", p.quarantine.extract_event,
                                         "write the units quarantined by event EVENT");
  quarantine
      ->add_option("-o,--output", p.quarantine.output,
                   "sparse file receiving them at their original offsets")
      ->needs(extract);
  extract->check(CLI::PositiveNumber);
  AddJson(quarantine, p);
  CLI::App* exp = app.add_subcommand("export", "write one image's journal to a file");
  exp->add_option("IMAGE", p.exp.image, "the image")->required();
  exp->add_option("-o,--output", p.exp.output, "the export file")->required();
  exp->add_flag("--no-quarantine", p.no_quarantine, "leave the quarantined bytes out");
  AddJson(exp, p);
  CLI::App* imp = app.add_subcommand("import", "import an exported journal into the store");
  imp->add_option("FILE", p.import_file, "the export file")->required();
  AddJson(imp, p);
  CLI::App* gc =
      app.add_subcommand("gc", "delete the journals of images whose file is gone from the backing");
  gc->add_flag("--dry-run", p.gc.dry_run, "list them; delete nothing");
  gc->add_flag("--force", p.gc.force, "delete even if every journaled image seems gone");
  AddJson(gc, p);
  return &app;
}

int Dispatch(CLI::App& app, Parsed& p) {
  const std::string name = app.get_subcommands().front()->get_name();
  if (name == "list") return ListCommand(p.g);
  if (name == "verify") return VerifyCommand(p.g, p.images);
  if (name == "restore") return RestoreCommand(p.g, p.restore);
  if (name == "history") return HistoryCommand(p.g, p.history_image);
  if (name == "quarantine") {
    if (p.quarantine.extract_event != 0 && p.quarantine.output.empty()) {
      std::fprintf(stderr, "meta-restore: error: --extract needs -o FILE\n");
      return kExitError;
    }
    return QuarantineCommand(p.g, p.quarantine);
  }
  if (name == "export") {
    p.exp.with_quarantine = !p.no_quarantine;
    return ExportCommand(p.g, p.exp);
  }
  if (name == "import") return ImportCommand(p.g, p.import_file);
  return GcCommand(p.g, p.gc);
}

}  // namespace

int Main(int argc, char** argv) {
  // The library logs its decisions; the tool reports them itself, so only errors are logged, and
  // on stderr, never into a --json report.
  spdlog::set_default_logger(spdlog::stderr_color_st("meta-restore"));
  spdlog::set_level(spdlog::level::err);
  CLI::App app("meta-restore: inspect, verify and restore the metadata journals of vmetafs",
               "meta-restore");
  Parsed p;
  Define(app, p);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitError;
  }
  return Dispatch(app, p);
}

}  // namespace vmetafs::meta_restore
