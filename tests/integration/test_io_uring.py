"""FUSE over io_uring: the transport the daemon takes when the kernel offers it.

The kernel offers it (Linux 6.14 and later) while its fuse module's `enable_uring` parameter is
set; the daemon then serves requests on ring threads, one queue per CPU (fusefs/fuse_uring.h).
Each test here sets the parameter as it needs and puts back the value it found. The rest of the
suite runs over whichever transport the parameter selects (tools/run-tests.sh runs it once each
way). A kernel without the parameter has no io_uring transport to test: these tests are skipped
there, saying so.
"""

import mmap
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (KiB, MiB, create_image, daemon_command, expected_content, qemu_img_check,
                      qemu_io, start_expecting_refusal, verify_patterns, write_patterns)

PARAM = Path("/sys/module/fuse/parameters/enable_uring")
SERVED = re.compile(r"io_uring: (\d+) requests served by (\d+) threads")
READY = "FUSE requests served over io_uring"


@pytest.fixture
def uring_param():
    """Yields a setter of the kernel's enable_uring; restores the value found."""
    if not PARAM.exists():
        pytest.skip(f"this kernel has no FUSE over io_uring ({PARAM} is missing)")
    before = PARAM.read_text().strip()

    def set_param(on: bool) -> None:
        PARAM.write_text("Y" if on else "N")

    yield set_param
    PARAM.write_text(before)


def served(log: str) -> int:
    """Requests the stopped daemon served over io_uring, from its closing line (0: none)."""
    found = SERVED.findall(log)
    return int(found[-1][0]) if found else 0


def qemu_workload(m) -> None:
    """Images made, written (direct and cached), read back and checked through the mount."""
    img = m / "vm.qcow2"
    create_image(img)
    runs = write_patterns(img, cache="none")
    qemu_io(img, [f"write -P 0x5a {8 * MiB} {1 * MiB}"], cache="writeback")
    runs = expected_content(runs, [(8 * MiB, 1 * MiB, 0x5a)])
    verify_patterns(img, runs, cache="none")
    verify_patterns(img, runs)
    qemu_img_check(img)


def test_requests_are_served_over_io_uring(uring_param, mount, backing):
    uring_param(True)
    m = mount.start()
    qemu_workload(m)
    # Directory listings and a large plain file through the rings too.
    for i in range(300):
        (m / f"f{i:03d}").write_bytes(bytes([i % 251]) * (i * 37 % 5000))
    assert sorted(os.listdir(m.mnt)) == sorted(os.listdir(backing.path))
    data = os.urandom(3 * MiB + 123)
    (m / "big").write_bytes(data)
    assert (m / "big").read_bytes() == data
    assert (backing / "big").read_bytes() == data
    log_before_stop = m.log()
    m.stop()
    assert READY in log_before_stop, log_before_stop
    # Thousands of requests went through the rings, not a handful.
    assert served(m.log()) > 1000, m.log()


def test_parallel_direct_io_keeps_every_byte(uring_param, mount, backing):
    """Reads and writes in flight together, as a guest's are, each land where they belong.

    Over a directory a ring thread leaves a READ's or WRITE's transfer to its io_uring and serves
    its other entries meanwhile; a transfer the kernel cannot do without waiting (a write that
    allocates) the thread does itself, and one O_DIRECT refuses (a length off the sector size)
    goes through the file's own path. 16 threads write 512 blocks of 64 KiB with O_DIRECT three
    times over (allocating, overwriting, unaligned heads), then read them back in parallel; the
    mount and the backing file must agree with what was written, block for block.
    """
    uring_param(True)
    m = mount.start()
    block, blocks = 64 * KiB, 512
    path = m / "raw.img"
    with open(path, "wb") as f:
        f.truncate(block * blocks)

    def fill(i: int, rnd: int) -> bytes:
        return bytes([(i * 7 + rnd) % 251 + 1]) * block

    expected = [b""] * blocks

    def write(i: int, rnd: int, length: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        data = fill(i, rnd)[:length]
        buf[:length] = data
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwrite(fd, memoryview(buf)[:length], i * block) == length
        finally:
            os.close(fd)
            buf.close()

    def read(i: int) -> bytes:
        buf = mmap.mmap(-1, block)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.preadv(fd, [buf], i * block) == block
            return bytes(buf)
        finally:
            os.close(fd)
            buf.close()

    with ThreadPoolExecutor(16) as pool:
        for rnd, length in ((1, block), (2, block), (3, 1000)):
            list(pool.map(lambda i: write(i, rnd, length), range(blocks)))
            for i in range(blocks):
                expected[i] = fill(i, rnd)[:length] + (expected[i] or bytes(block))[length:]
        got = list(pool.map(read, range(blocks)))
    for i in range(blocks):
        assert got[i] == expected[i], f"block {i} read through the mount differs"
    on_storage = (backing / "raw.img").read_bytes()
    for i in range(blocks):
        assert on_storage[i * block:(i + 1) * block] == expected[i], f"block {i} on the backing"
    m.stop()
    assert served(m.log()) >= 4 * blocks, m.log()


def test_off_keeps_dev_fuse(uring_param, mount):
    uring_param(True)
    m = mount.start(["io_uring=off"])
    qemu_workload(m)
    m.stop()
    assert READY not in m.log() and served(m.log()) == 0, m.log()


def test_a_kernel_that_does_not_offer_it_is_served_over_dev_fuse(uring_param, mount):
    uring_param(False)
    m = mount.start()
    qemu_workload(m)
    m.stop()
    assert "FUSE over io_uring not used: the kernel did not offer it" in m.log(), m.log()
    assert served(m.log()) == 0, m.log()


def test_blocked_requests_do_not_starve_a_queue(uring_param, mount):
    """Lock waits hold their ring entries; the queue grows, so the unlock still gets through.

    One thread per queue to start with (16 entries over a directory), and every waiter on CPU 0:
    without growth the waiters would hold all of queue 0's entries, and the holder's unlock, also
    sent from CPU 0, would wait behind them for ever. Each wait blocks a worker thread of its
    own, not the ring thread: the lock's holder is served meanwhile.
    """
    uring_param(True)
    m = mount.start(["ring_threads=1"])
    (m / "lockfile").write_bytes(b"x")
    cpu0 = ["taskset", "-c", "0"]
    holder = subprocess.Popen(cpu0 + ["flock", str(m / "lockfile"), "-c", "sleep 2"])
    waiters = []
    try:
        # The holder has the lock before the waiters start (flock -n fails while it is held).
        probe = cpu0 + ["flock", "-n", str(m / "lockfile"), "-c", "true"]
        for _ in range(100):
            if subprocess.run(probe).returncode != 0:
                break
            assert holder.poll() is None, "the holder ended before it was seen holding the lock"
            time.sleep(0.05)
        else:
            pytest.fail("the holder never took the lock")
        waiters = [subprocess.Popen(cpu0 + ["flock", str(m / "lockfile"), "-c", "true"])
                   for _ in range(40)]
        assert holder.wait(timeout=120) == 0
        for w in waiters:
            assert w.wait(timeout=120) == 0
    finally:
        for p in [holder, *waiters]:
            if p.poll() is None:
                p.kill()
                p.wait()
    m.stop()
    n_served, threads = map(int, SERVED.findall(m.log())[-1])
    assert threads > 2, f"the queue did not grow ({threads} threads):\n{m.log()}"
    assert n_served > 0


def test_a_stop_with_sigterm_ends_the_ring_threads(uring_param, mount):
    uring_param(True)
    m = mount.start()
    (m / "f").write_bytes(b"y" * (64 * KiB))
    m.terminate()  # must unmount and exit 0 while the rings wait for requests
    assert served(m.log()) > 0, m.log()


@pytest.mark.parametrize("opt, expected", [("io_uring=maybe", "on or off"),
                                           ("ring_threads=0", "a number from 1 to 64"),
                                           ("ring_threads=65", "a number from 1 to 64")])
def test_bad_values_are_refused(backing, tmp_path, opt, expected):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(backing.spec, mnt, tmp_path / "store", [opt]),
                                  mnt, tmp_path / "log")
    assert f"bad value in '-o {opt}': expected {expected}" in err, err
