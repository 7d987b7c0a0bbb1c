#!/usr/bin/env bash
# The benchmark in one command: builds vmetafs (release) and the comparison helpers, mounts every
# system side by side, runs the workloads alternating systems per repetition, and writes a table,
# BUILD/bench.json and BUILD/bench.png.
#   tools/bench/run.sh [--quick] [--reps N] [--build DIR] [--only WORKLOAD,...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build="$root/build-bench"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$build"
work="$build/bench-work"

# vmetafs serves FUSE requests over io_uring where the kernel offers it (Linux 6.14+, the fuse
# module's enable_uring); offered for the run, the value found is put back at the end.
uring=/sys/module/fuse/parameters/enable_uring
uring_before=$(cat "$uring" 2>/dev/null || true)
if [ -w "$uring" ]; then
  echo Y >"$uring"
  echo "bench: FUSE over io_uring offered by the kernel"
else
  echo "bench: this kernel has no FUSE over io_uring: every vmetafs system uses /dev/fuse"
fi

cleanup() {
  if [ -n "$uring_before" ] && [ -w "$uring" ]; then echo "$uring_before" >"$uring"; fi
  # Never leave a mount behind, whatever happened to the driver.
  if [ -d "$work" ]; then
    grep -o " $work/[^ ]*" /proc/mounts 2>/dev/null | while read -r m; do
      fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done || true  # grep finds nothing when every mount is down: not a failure
  fi
  return 0
}
trap cleanup EXIT INT TERM

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DVMETAFS_TESTS=OFF >/dev/null
cmake --build "$build" -j2 --target vmetafs meta-restore >/dev/null

# libfuse's low-level passthrough example, built here and never committed.
ex=/usr/share/doc/libfuse3-dev/examples
if [ ! -x "$build/passthrough_ll" ] || [ "$ex/passthrough_ll.c" -nt "$build/passthrough_ll" ]; then
  src="$ex/passthrough_ll.c"
  [ -f "$src" ] || src="$ex/passthrough_ll.c.gz"
  if [ "${src%.gz}" != "$src" ]; then zcat "$src" >"$build/passthrough_ll.c"; src="$build/passthrough_ll.c"; fi
  gcc -O2 -Wall -I"$ex" "$src" -o "$build/passthrough_ll" $(pkg-config --cflags --libs fuse3)
fi

# XXH3 throughput on memory: the limit of checksumming (xxhsum may not be installed).
cat >"$build/xxh3_speed.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>
int main(int argc, char** argv) {
  size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024, unit = 64 * 1024;
  size_t n = mib << 20;
  unsigned char* buf = malloc(n);
  if (!buf) return 1;
  for (size_t i = 0; i < n; ++i) buf[i] = (unsigned char)(i * 2654435761u >> 13);
  struct timespec a, b;
  unsigned long long acc = 0;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (size_t off = 0; off < n; off += unit) acc += XXH3_64bits(buf + off, unit);
  clock_gettime(CLOCK_MONOTONIC, &b);
  double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
  printf("{\"bytes\": %zu, \"seconds\": %.6f, \"acc\": %llu}\n", n, s, acc);
  return 0;
}
EOF
gcc -O2 "$build/xxh3_speed.c" -o "$build/xxh3_speed" -lxxhash

/usr/bin/python3 "$root/tools/bench/bench.py" --build "$build" --work "$work" "${args[@]}"
# vmetafs over nfs:// against libnfs direct, on a local nfs-ganesha (skip with --skip nfs).
/usr/bin/python3 "$root/tools/bench/nfs_bench.py" --build "$build" --work "$work" "${args[@]}"
