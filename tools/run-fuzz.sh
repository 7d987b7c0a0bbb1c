#!/usr/bin/env bash
# Builds the libFuzzer targets of the format parsers (tests/fuzz, clang with ASan+UBSan) and runs
# each for a bounded time on a corpus seeded with images that qemu-img/qemu-io (and sgdisk/parted
# for raw disks) make at run time. Exits non-zero if a target fails to build, finds a crash, a
# leak, a timeout or an out-of-memory input; the input that did it is kept and named.
#
# Usage: tools/run-fuzz.sh [SECONDS_PER_TARGET]
# Environment:
#   FUZZ_SECONDS  time per target (default 45; the argument wins)
#   FUZZ_JOBS     targets run at once (default 2)
#   FUZZ_BUILD    build directory (default build-fuzz)
#   FUZZ_TARGETS  targets to run (default: qcow2 vhd vhdx vmdk raw_gpt)
#   FUZZ_OUT      where corpora, logs and crashing inputs go (default: a fresh directory under
#                 /tmp, removed when every target passed, kept otherwise)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECONDS_PER_TARGET=${1:-${FUZZ_SECONDS:-45}}
JOBS=${FUZZ_JOBS:-2}
BUILD=${FUZZ_BUILD:-build-fuzz}
TARGETS=(${FUZZ_TARGETS:-qcow2 vhd vhdx vmdk raw_gpt})
OUT=${FUZZ_OUT:-$(mktemp -d /tmp/vmetafs-fuzz.XXXXXX)}
mkdir -p "$OUT"

ok=0
on_exit() {
  if [ "$ok" -eq 1 ]; then
    rm -rf "$OUT"
  else
    echo "run-fuzz: corpora, logs and crashing inputs kept in $OUT" >&2
  fi
}
trap on_exit EXIT

echo "===== run-fuzz: build ($BUILD, clang)"
CC=clang CXX=clang++ cmake -S "$ROOT" -B "$ROOT/$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DVMETAFS_FUZZ=ON >"$OUT/cmake.log" 2>&1 || { cat "$OUT/cmake.log"; exit 1; }
cmake --build "$ROOT/$BUILD" -j "$JOBS" --target "${TARGETS[@]/%/_fuzz}"

# ---- seeds: small images of every format, made now by the real tools ----
seed() {  # seed TARGET NAME: prints the path of a new seed file of TARGET's corpus
  mkdir -p "$OUT/corpus/$1"
  echo "$OUT/corpus/$1/$2"
}
q() { qemu-img "$@" >/dev/null; }
io() { qemu-io "$@" >/dev/null; }

make_qcow2_seeds() {
  local s
  s=$(seed qcow2 empty); q create -f qcow2 -o cluster_size=512 "$s" 1M
  s=$(seed qcow2 written); q create -f qcow2 -o cluster_size=512 "$s" 1M
  io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x22 600k 2k' "$s"
  s=$(seed qcow2 snapshot); cp "$(dirname "$s")/written" "$s"
  q snapshot -c s1 "$s"; io -f qcow2 -c 'write -P 0x33 1k 1k' "$s"
  s=$(seed qcow2 bitmap); q create -f qcow2 -o cluster_size=512 "$s" 1M
  q bitmap --add "$s" b0; io -f qcow2 -c 'write 0 2k' "$s"
  s=$(seed qcow2 v2); q create -f qcow2 -o compat=0.10,cluster_size=512 "$s" 1M
  io -f qcow2 -c 'write 64k 4k' "$s"
  s=$(seed qcow2 refcount1); q create -f qcow2 -o refcount_bits=1,cluster_size=4k "$s" 4M
  io -f qcow2 -c 'write 1M 8k' "$s"
  s=$(seed qcow2 extl2); q create -f qcow2 -o extended_l2=on,cluster_size=16k "$s" 4M
  io -f qcow2 -c 'write 4k 4k' "$s"
}

make_vhd_seeds() {
  local s
  s=$(seed vhd dynamic); q create -f vpc "$s" 64M
  s=$(seed vhd written); q create -f vpc "$s" 64M; io -f vpc -c 'write -P 0x44 0 4k' "$s"
  s=$(seed vhd fixed); q create -f vpc -o subformat=fixed "$s" 64K
}

make_vhdx_seeds() {
  local s
  # qemu makes the smallest VHDX 8 MiB, of which only the first 4 MiB (headers, region tables,
  # log, metadata, BAT) are not zero; qemu accepts it cut there, and the fuzzer runs far faster.
  s=$(seed vhdx dynamic); q create -f vhdx -o block_size=1M,log_size=1M "$s" 1M
  truncate -s 4M "$s"
  s=$(seed vhdx written); cp "$(dirname "$s")/dynamic" "$s"
  io -f vhdx -c 'write -P 0x55 0 64k' "$s"
  q check -f vhdx "$s"
}

make_vmdk_seeds() {
  local s tmp
  s=$(seed vmdk sparse); q create -f vmdk "$s" 8M
  s=$(seed vmdk written); q create -f vmdk "$s" 8M; io -f vmdk -c 'write -P 0x66 0 64k' "$s"
  tmp=$(mktemp -d "$OUT/vmdk.XXXX")
  s=$(seed vmdk stream); q convert -f vmdk -O vmdk -o subformat=streamOptimized \
    "$(dirname "$s")/written" "$s"
  q create -f vmdk -o subformat=monolithicFlat "$tmp/flat.vmdk" 1M
  cp "$tmp/flat.vmdk" "$(seed vmdk flat-descriptor)"
  rm -rf "$tmp"
}

make_raw_gpt_seeds() {
  local s
  s=$(seed raw_gpt gpt); truncate -s 1M "$s"
  sgdisk -n 1:0:+256K -n 2:0:0 "$s" >/dev/null 2>&1
  s=$(seed raw_gpt mbr); truncate -s 1M "$s"
  parted -s "$s" mklabel msdos mkpart primary 1KiB 256KiB mkpart extended 300KiB 900KiB \
    mkpart logical 301KiB 400KiB >/dev/null 2>&1
}

echo "===== run-fuzz: seeds"
for t in "${TARGETS[@]}"; do
  "make_${t}_seeds"
  echo "$t: $(ls "$OUT/corpus/$t" | wc -l) seeds, largest $(du -b "$OUT/corpus/$t"/* | sort -n |
    tail -n 1 | cut -f1) bytes"
done

# ---- run ----
run_target() {  # run_target TARGET: one bounded libFuzzer run; the verdict goes to $OUT/TARGET.rc
  local t=$1 max_len rc=0
  max_len=$(du -b "$OUT/corpus/$t"/* | sort -n | tail -n 1 | cut -f1)
  mkdir -p "$OUT/artifacts"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    timeout -k 30 $((SECONDS_PER_TARGET + 120)) \
    "$ROOT/$BUILD/bin/${t}_fuzz" -max_total_time="$SECONDS_PER_TARGET" -max_len="$max_len" \
    -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$OUT/artifacts/$t-" "$OUT/corpus/$t" >"$OUT/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$OUT/$t.rc"
}

echo "===== run-fuzz: ${TARGETS[*]}, ${SECONDS_PER_TARGET}s each, $JOBS at a time"
failed=()
running=0
for t in "${TARGETS[@]}"; do
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait
for t in "${TARGETS[@]}"; do
  if [ "$(cat "$OUT/$t.rc" 2>/dev/null || echo 1)" = 0 ]; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$OUT/$t.log" | grep -o '[0-9]*$')
    echo "PASS  ${t}_fuzz: ${runs:-?} inputs, corpus $(ls "$OUT/corpus/$t" | wc -l)"
  else
    failed+=("$t")
    echo "FAIL  ${t}_fuzz (see $OUT/$t.log):"
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written|deadly signal|timeout|out-of-memory' \
      "$OUT/$t.log" | head -n 20
  fi
done
if [ "${#failed[@]}" -ne 0 ]; then
  echo "run-fuzz: FAILED: ${failed[*]}; inputs in $OUT/artifacts"
  exit 1
fi
ok=1
echo "run-fuzz: all passed"
