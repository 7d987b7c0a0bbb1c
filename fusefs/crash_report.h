// A daemon that dies of a fatal signal says so: the signal and a backtrace go to stderr (the log
// in the foreground, as systemd runs it) before the default action (core dump) runs.
#pragma once

namespace vmetafs::fusefs {

// Installs the report for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT. Under a sanitizer, which
// reports such signals itself, this does nothing.
void InstallFatalSignalReport();

}  // namespace vmetafs::fusefs
