// FUSE_HANDLE_KILLPRIV_V2 on libfuse 3.14, which neither negotiates it nor hands the kernel's
// per-request "clear set-user-ID/set-group-ID" flags to the filesystem.
//
// Why: without it the kernel does not mark the mount SB_NOSEC, so no inode is ever S_NOSEC and
// every fallocate asks the daemon for the file's security.capability (a GETXATTR round trip per
// guest write on an allocating image). With it the kernel asks once per inode, and leaves clearing
// the bits on write, truncate and chown to the daemon.
//
// How: the session's reads and writes of /dev/fuse go through hooks (fuse_session_custom_io). The
// write hook adds the flag to the INIT reply when the kernel offered it (and FUSE_OVER_IO_URING,
// which libfuse 3.14 does not know either: fuse_uring.h), and hands the replies to requests that
// came over io_uring to their ring. The read hook notes, for
// the calling thread, whether the request it just read asks for the bits to be cleared: libfuse's
// loops (fuse_session_loop, and fuse_do_work of the multi-threaded one) process a request on the
// thread that read it, so the request's handler finds its own note.
#pragma once

#include <fuse_lowlevel.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "store/status.h"

namespace vmetafs::fusefs {

// Installs the hooks on `se`: after fuse_session_mount, before the loop. One session per process.
// `killpriv_v2`: accept FUSE_HANDLE_KILLPRIV_V2 when offered. `on_uring`, when set: accept
// FUSE_OVER_IO_URING when offered, and call it once the kernel took that INIT reply.
Status InstallDevHooks(fuse_session* se, bool killpriv_v2, std::function<void()> on_uring);

// Notes what the request in `buf` (as /dev/fuse delivers it) asks of the calling thread: the read
// hook calls it for /dev/fuse, the io_uring transport for its requests.
void NoteRequest(const uint8_t* buf, size_t len);

// Whether the INIT reply carried FUSE_HANDLE_KILLPRIV_V2 (false until the kernel's INIT).
bool KillPrivV2Negotiated();

// For the request the calling thread serves: whether set-user-ID, and set-group-ID of a
// group-executable file, must be cleared. True for a WRITE with FUSE_WRITE_KILL_SUIDGID, a
// SETATTR with FATTR_KILL_SUIDGID, an OPEN or CREATE with FUSE_OPEN_KILL_SUIDGID (the kernel sets
// them when the caller lacks CAP_FSETID), and a FALLOCATE by a caller other than root (the kernel
// flags none, and once the flag is negotiated it drops its own attempt). Always false when the
// flag was not negotiated: the kernel then clears the bits itself, except on a direct-I/O write
// and on open(O_TRUNC), where nobody does.
bool KillSuidGidRequested();

}  // namespace vmetafs::fusefs
