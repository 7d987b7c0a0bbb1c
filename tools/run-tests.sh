#!/usr/bin/env bash
# Sets up and runs every test of vmetafs on a bare Debian 12, as root:
#   1. dependencies (tools/install-deps.sh)
#   2. a release build (build/) and an ASan+UBSan build (build-asan/), -j2
#   3. the unit tests (ctest) of both builds
#   4. the integration tests (real FUSE mounts, pytest) against the ASan build with FUSE over
#      io_uring offered by the kernel (where it can: Linux 6.14+), then against the release build
#      with /dev/fuse, so that the whole suite runs over each transport
#   5. the libFuzzer targets of the format parsers, FUZZ_SECONDS (default 30) each
# Every step runs even when an earlier one failed (except what needs a failed build); the exit
# status is non-zero if anything failed. The last lines repeat pytest's summary lines.
#
# Environment:
#   JOBS            build parallelism (default 2)
#   PYTEST_ARGS     extra pytest arguments, words split on blanks (e.g. "-k damage")
#   RELEASE_TESTS   the integration tests run against the release build (default: all of them)
#   PYTEST_TIMEOUT  seconds before a pytest run is interrupted (default 1800)
#   TEST_TMP        where mounts, stores and daemon logs go (default: a fresh directory under
#                   /tmp, removed when everything passed, kept otherwise)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
JOBS=${JOBS:-2}
PYTHON=/usr/bin/python3  # Debian's python3, which has python3-pytest
RELEASE_TESTS=${RELEASE_TESTS:-tests/integration}
# A hung run is interrupted with SIGINT (pytest still prints its summary) well inside CI's limit.
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-1800}

if [ "$(id -u)" -ne 0 ]; then
  echo "run-tests: run as root (it installs packages and mounts FUSE filesystems)" >&2
  exit 1
fi

TEST_TMP=${TEST_TMP:-$(mktemp -d /tmp/vmetafs-tests.XXXXXX)}
mkdir -p "$TEST_TMP"

failures=()
results=()
summaries=()

# Unmounts whatever fuse.vmetafs mount the tests left under TEST_TMP (the daemons then exit).
cleanup_mounts() {
  local mnt
  awk '$3 == "fuse.vmetafs" { print $2 }' /proc/mounts | while read -r mnt; do
    case "$mnt" in
      "$TEST_TMP"/*)
        echo "run-tests: unmounting leftover $mnt" >&2
        fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
        ;;
    esac
  done
}

# The kernel offers FUSE over io_uring while its fuse module's enable_uring parameter is set; the
# value found is put back at exit.
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_BEFORE=$(cat "$URING_PARAM" 2>/dev/null || true)
offer_io_uring() {  # offer_io_uring Y|N
  if [ -w "$URING_PARAM" ]; then
    echo "$1" >"$URING_PARAM"
    echo "run-tests: FUSE over io_uring offered by the kernel: $(cat "$URING_PARAM")"
  else
    echo "run-tests: this kernel has no FUSE over io_uring; the suite runs over /dev/fuse"
  fi
}

on_exit() {
  local rc=$?
  cleanup_mounts
  if [ -n "$URING_BEFORE" ] && [ -w "$URING_PARAM" ]; then echo "$URING_BEFORE" >"$URING_PARAM"; fi
  if [ "$rc" -eq 0 ] && [ "${#failures[@]}" -eq 0 ]; then
    rm -rf "$TEST_TMP"
  else
    echo "run-tests: logs, stores and daemon logs kept in $TEST_TMP" >&2
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

step() {  # step NAME COMMAND...: runs a step, records its outcome, never stops the script
  local name=$1
  shift
  echo
  echo "===== $name: $*"
  if "$@"; then
    results+=("PASS  $name")
  else
    results+=("FAIL  $name (exit $?)")
    failures+=("$name")
  fi
}

skip() {
  results+=("SKIP  $1 ($2)")
  failures+=("$1")
}

build() {  # build DIR CMAKE_ARGS...
  local dir=$1
  shift
  cmake -S "$ROOT" -B "$ROOT/$dir" "$@" && cmake --build "$ROOT/$dir" -j "$JOBS"
}

unit_tests() {  # unit_tests DIR
  ctest --test-dir "$ROOT/$1" --output-on-failure
}

integration_tests() {  # integration_tests BUILD_DIR NAME PATHS...
  local build=$1 name=$2
  shift 2
  local log="$TEST_TMP/pytest-$name.log" rc
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
  {
    VMETAFS_BUILD="$ROOT/$build" timeout -s INT -k 120 "$PYTEST_TIMEOUT" \
      "$PYTHON" -m pytest -v -ra -p no:cacheprovider --durations=15 \
      --basetemp="$TEST_TMP/pytest-$name" ${PYTEST_ARGS:-} "$@"
    echo $? >"$log.rc"
  } 2>&1 | tee "$log"
  rc=$(cat "$log.rc")
  cleanup_mounts
  local summary
  summary=$(grep -E '^=+ .*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.* =+$' \
    "$log" | tail -n 1 || true)
  summaries+=("pytest ($name): ${summary:-no summary (pytest did not finish)}")
  return "$rc"
}

step "install dependencies" tools/install-deps.sh

# RelWithDebInfo (-O2 -g), the project default: optimized, and its stack traces stay readable.
step "build release (build/)" build build -DCMAKE_BUILD_TYPE=RelWithDebInfo
release_built=$([ "${results[-1]:0:4}" = PASS ] && echo yes || echo no)
step "build asan+ubsan (build-asan/)" build build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DVMETAFS_SANITIZE=ON
asan_built=$([ "${results[-1]:0:4}" = PASS ] && echo yes || echo no)

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export LSAN_OPTIONS=suppressions=$ROOT/tests/lsan.supp
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

if [ "$release_built" = yes ]; then
  step "unit tests (release)" unit_tests build
else
  skip "unit tests (release)" "build failed"
fi
if [ "$asan_built" = yes ]; then
  step "unit tests (asan)" unit_tests build-asan
  offer_io_uring Y
  step "integration tests (asan, io_uring)" integration_tests build-asan asan tests/integration
else
  skip "unit tests (asan)" "build failed"
  skip "integration tests (asan, io_uring)" "build failed"
fi
if [ "$release_built" = yes ]; then
  offer_io_uring N
  # shellcheck disable=SC2086  # RELEASE_TESTS is a list of paths on purpose
  step "integration tests (release, /dev/fuse)" integration_tests build release $RELEASE_TESTS
else
  skip "integration tests (release, /dev/fuse)" "build failed"
fi

# The parsers under libFuzzer (clang, ASan+UBSan), seeded with qemu-made images, bounded in time.
step "fuzz the format parsers (${FUZZ_SECONDS:-30} s per target)" tools/run-fuzz.sh "${FUZZ_SECONDS:-30}"

echo
echo "===== results"
printf '%s\n' "${results[@]}"
printf '%s\n' "${summaries[@]}"
if [ "${#failures[@]}" -ne 0 ]; then
  echo "run-tests: FAILED: ${failures[*]}"
  exit 1
fi
echo "run-tests: all passed"
