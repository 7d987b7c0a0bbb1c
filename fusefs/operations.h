// The FUSE low-level operation table: the one place where libfuse meets the Filesystem.
//
// Each operation replies exactly once, with the positive errno of the Filesystem's Status or the
// result. No exception crosses into libfuse: each body runs inside a catch-all that logs and
// replies EIO.
#pragma once

#include <fuse_lowlevel.h>

namespace vmetafs::fusefs {

// The session's userdata must be the Filesystem the operations serve.
const fuse_lowlevel_ops& Operations();

}  // namespace vmetafs::fusefs
