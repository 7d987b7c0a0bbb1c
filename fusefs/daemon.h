// The daemon's life: options, backend and store, mount, the request loop, and a clean end.
//
// Everything that can fail is tried before the mount exists, and its error printed on stderr
// with exit code 1 (2 for a bad command line), leaving nothing mounted. Unless -f, the process
// forks first and the parent returns only when the child's mount is ready (or has failed). The
// store is opened in the child: its lock and its threads would not survive a fork.
//
// The loop ends on SIGTERM, SIGINT, SIGHUP or an unmount (fusermount3 -u). Then files still
// open are released, the journal is made durable and closed, the mount is removed, and the
// process exits 0.
#pragma once

namespace vmetafs::fusefs {

// Runs vmetafs with its command line; returns the process's exit code.
int RunDaemon(int argc, char** argv);

}  // namespace vmetafs::fusefs
