#!/usr/bin/env bash
# Sets up vmetafs on a Debian 12 host and mounts BACKING at MOUNTPOINT with the default options:
# installs the dependencies, builds into build/, lets the kernel offer FUSE over io_uring where it
# has it, and starts the daemon (which returns once the mount is ready). The journal goes to the
# default store under /var/lib/vmetafs.
#   tools/setup-and-mount.sh BACKING MOUNTPOINT [-o OPTIONS]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 BACKING MOUNTPOINT [-o OPTIONS]" >&2
  echo "  BACKING: the directory (or nfs://SERVER/EXPORT URL) holding the VM images" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVMETAFS_TESTS=OFF >/dev/null
cmake --build "$root/build" -j"$(nproc)"
# FUSE over io_uring (Linux 6.14+): the daemon serves requests over it when the kernel offers it.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then
  echo Y >"$uring" && echo "vmetafs: FUSE over io_uring enabled in the kernel ($uring)"
fi
mkdir -p "$2"
"$root/build/bin/vmetafs" "$@"
echo "vmetafs: $1 is mounted at $2 (unmount with: fusermount3 -u $2)"
