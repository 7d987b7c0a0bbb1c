"""The daemon killed for real (SIGKILL) while a guest writes, while it restores, while it baselines.

A SIGKILL loses nothing the OS already has: the journal's write-ahead log and the backing's page
cache survive. So after a kill the storage is never damaged, and the next first open must not
restore anything; every write whose flush returned must read back; qemu-img check must find no
corruption (leaked clusters are the normal residue of an allocation in flight). A restore or a
baseline cut short must be finished by the next first open.

Random choices come from one seed per test, printed on failure (VMETAFS_CRASH_SEED replays it).
"""

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import (GiB, KiB, MiB, copy_file, create_image, mount_count, out, qemu_img,
                      qemu_img_compare, qemu_io, read_at, run)
from qcow2_layout import Qcow2Layout

ROUNDS = int(os.environ.get("VMETAFS_CRASH_ROUNDS", "10"))
WRITES_PER_ROUND = 160
WRITE_SIZE = 64 * KiB
WAIT_LIMIT = 120  # only turns a hang into a failure


@pytest.fixture
def rng(request) -> random.Random:
    seed = int(os.environ.get("VMETAFS_CRASH_SEED", random.randrange(1 << 32)))
    request.node.user_properties.append(("crash seed", seed))
    print(f"VMETAFS_CRASH_SEED={seed}")
    return random.Random(seed)


def kill_daemon(mount) -> None:
    """SIGKILL, as a crash: nothing runs in the daemon after it. Then detach the dead mount."""
    assert mount.running_now, f"the daemon died before it was killed:\n{mount.log()}"
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(timeout=WAIT_LIMIT)
    mount.proc = None
    run(["fusermount3", "-uz", mount.mnt])
    assert mount_count(mount.mnt) == 0


def check_no_corruption(img) -> str:
    """qemu-img check: 0 (clean) or 3 (leaked clusters only); 2 would be corruption."""
    res = qemu_img("check", "-f", "qcow2", img, check=False)
    assert res.returncode in (0, 3), f"qemu-img check {img} -> {res.returncode}:\n{out(res)}"
    return out(res)


def words_for(mount, name) -> List[str]:
    return mount.decisions(name)


# ---- a guest writing and flushing when the daemon dies ----

class Guest:
    """qemu-io driven through stdin: allocating writes spread over a 4 GiB image, each followed
    by a flush and a read of what it wrote. A failed flush prints nothing, but after a kill every
    request fails, so the read that follows a flush succeeds only if that flush returned."""

    def __init__(self, img: Path):
        self.writes: List[Tuple[int, int]] = []  # (offset, pattern) in issue order
        script = []
        for i in range(WRITES_PER_ROUND):
            off = (i % 16) * 256 * MiB + i * WRITE_SIZE
            pattern = 1 + i % 255
            self.writes.append((off, pattern))
            script += [f"write -P {pattern} {off} {WRITE_SIZE}", "flush",
                       f"read -P {pattern} {off} {WRITE_SIZE}"]
        self.proc = subprocess.Popen(["qemu-io", "-f", "qcow2", "-t", "none", str(img)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.output = ""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.proc.stdin.write(("\n".join(script) + "\n").encode())
        self.proc.stdin.flush()

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            with self.lock:
                self.output += chunk.decode(errors="replace")

    def flushed(self) -> List[Tuple[int, int]]:
        """The writes whose flush returned: the read after the flush found their pattern.

        qemu-io prints its prompt before each command, so the text between two prompts is the
        output of one command, in script order. A read of a cluster qemu never allocated (its
        write failed) succeeds without I/O but fails the pattern check."""
        with self.lock:
            outputs = self.output.split("qemu-io> ")[1:-1]  # the last one may be incomplete
        done = []
        for i, (off, pattern) in enumerate(self.writes):
            k = 3 * i + 2
            if k < len(outputs) and re.search(rf"^read \d+/\d+ bytes at offset {off}$",
                                              outputs[k], re.M) \
                    and "failed" not in outputs[k]:
                done.append((off, pattern))
        return done

    def wait_for_flushes(self, n: int) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        while len(self.flushed()) < n:
            assert self.proc.poll() is None, f"qemu-io ended early:\n{self.output}"
            assert time.monotonic() < deadline, f"qemu-io made no progress:\n{self.output}"
            time.sleep(0.002)

    def stop(self) -> str:
        self.proc.kill()
        self.proc.wait(timeout=WAIT_LIMIT)
        self.reader.join(timeout=WAIT_LIMIT)
        return self.output


def test_daemon_killed_during_allocating_writes(backing, mount, rng):
    summary = []
    for r in range(ROUNDS):
        name = f"round{r}.qcow2"
        mount.start()
        create_image(mount / name)
        guest = Guest(mount / name)
        guest.wait_for_flushes(rng.randint(1, 24))
        time.sleep(rng.uniform(0, 0.03))  # anywhere in the write/flush/read cycle
        kill_daemon(mount)
        text = guest.stop()
        flushed = guest.flushed()
        written = len(re.findall(r"wrote \d+/\d+ bytes", text))
        assert flushed == guest.writes[:len(flushed)], text  # in order, none missing
        in_flight = written - len(flushed)
        summary.append(f"round {r}: killed after {len(flushed)} flushed writes "
                       f"({in_flight} written but not known flushed)")

        mount.start()
        reads = [f"read -P {p} {off} {WRITE_SIZE}" for off, p in flushed]
        res = qemu_io(mount / name, reads, check=False)  # the first open decides
        assert res.returncode == 0 and "verification failed" not in out(res), \
            f"{summary[-1]}: a flushed write is lost:\n{out(res)}\n{mount.log()}"
        check_no_corruption(mount / name)
        words = words_for(mount, name)
        assert words and words[0] in ("verified", "adopted"), \
            f"{summary[-1]}: {words}\n{mount.log()}"
        assert not {"restored", "refused", "unprotected"} & set(words), \
            f"{summary[-1]}: the storage was never damaged, yet: {words}\n{mount.log()}"
        summary[-1] += f"; next open: {words[0]}"
        mount.stop()
    print("\n".join(summary))


# ---- a restore cut short ----

def l2_tables(path) -> List[int]:
    return Qcow2Layout.read(path).l2_table_offsets()


def zero_many(path, offsets: List[int], length: int) -> None:
    """Zeroes `length` bytes at each offset directly on the backing, with one fsync at the end."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(bytes(length))
        f.flush()
        os.fsync(f.fileno())


def wait_for_log(mount, pattern: str, limit: float = WAIT_LIMIT) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if re.search(pattern, mount.log()):
            return True
        if not mount.running_now:
            return False
        time.sleep(0.002)
    return False


def start_first_open(img) -> subprocess.Popen:
    """A client whose open is the image's first: the daemon decides before it returns."""
    return subprocess.Popen(["qemu-img", "info", "-f", "qcow2", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def end_client(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=WAIT_LIMIT)


def test_daemon_killed_during_restore(backing, mount, rng, tmp_path):
    name = "many-l2.qcow2"
    raw = backing / name
    # 8 GiB with 4 KiB clusters: one L2 table per 2 MiB of guest, 4096 of them when every
    # 2 MiB holds data. Made directly on the backing, then baselined through the mount.
    create_image(raw, size=8 * GiB, cluster_size=4 * KiB)
    writes = [f"write -P {1 + i % 255} {i * 2 * MiB} 4k" for i in range(4096)]
    run(["qemu-io", "-f", "qcow2", raw], input=("\n".join(writes) + "\n").encode())
    with mount.running():
        qemu_img("info", "-f", "qcow2", mount / name)
        assert "baseline" in words_for(mount, name), mount.log()
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)
    tables = l2_tables(reference)
    assert len(tables) == 4096

    for r in range(3):
        zero_many(raw, tables, 4 * KiB)
        mount.start()
        client = start_first_open(mount / name)
        # The restore records its event (and the bytes it replaces) before it writes, then
        # writes the tables in offset order: kill it as soon as a randomly chosen one is back.
        assert wait_for_log(mount, rf"{re.escape(name)}: restored"), mount.log()
        watched = tables[rng.randrange(len(tables))]
        good = read_at(reference, watched, 4 * KiB)
        deadline = time.monotonic() + WAIT_LIMIT
        while read_at(raw, watched, 4 * KiB) != good:
            assert mount.running_now and time.monotonic() < deadline, mount.log()
        kill_daemon(mount)
        end_client(client)
        done = sum(read_at(raw, off, 4 * KiB) == read_at(reference, off, 4 * KiB)
                   for off in tables)
        print(f"round {r}: killed with {done} of {len(tables)} L2 tables written back")

        mount.start()
        qemu_img_compare(reference, mount / name)  # the first open finishes the job
        words = words_for(mount, name)
        assert words and words[0] in ("restored", "verified"), f"{words}\n{mount.log()}"
        assert not {"refused", "unprotected"} & set(words), mount.log()
        check_no_corruption(mount / name)
        mount.stop()
    qemu_img_compare(reference, raw)


# ---- a baseline cut short ----

def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.iterdir() if p.suffix in (".log", ".blob", ".sst"))


def test_daemon_killed_during_baseline(backing, mount):
    name = "big.qcow2"
    raw = backing / name
    # 1 TiB with every L2 table allocated: 2048 tables, 128 MiB of metadata to journal.
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", raw, "1T")
    mount.start()
    before = store_bytes(mount.store)
    client = start_first_open(mount / name)
    # The baseline journals in batches of at most 32 MiB and records its event at the end:
    # once 40 MiB more are in the store, it is under way and far from done.
    deadline = time.monotonic() + WAIT_LIMIT
    while store_bytes(mount.store) - before < 40 * MiB:
        assert mount.running_now and time.monotonic() < deadline, mount.log()
        time.sleep(0.005)
    interrupted = "baseline" not in words_for(mount, name)
    kill_daemon(mount)
    end_client(client)
    assert interrupted, f"the baseline finished before the kill:\n{mount.log()}"

    mount.start()
    qemu_img("check", "-f", "qcow2", mount / name)  # the next first open completes the journal
    words = words_for(mount, name)
    assert words and words[0] in ("baseline", "verified"), f"{words}\n{mount.log()}"
    print(f"baseline killed with {store_bytes(mount.store) >> 20} MiB journaled; next open: "
          f"{words[0]}")
    assert not {"restored", "refused", "unprotected"} & set(words), mount.log()
    mount.stop()

    # Every table is protected now, the last one too (the interrupted baseline had not got there).
    # The image is sparse but 1 TiB long: compare the tables themselves, not the whole disk.
    tables = l2_tables(raw)
    assert len(tables) == 2048
    damaged = [tables[0], tables[len(tables) // 2], tables[-1]]
    before = [read_at(raw, off, 64 * KiB) for off in damaged]
    zero_many(raw, damaged, 64 * KiB)
    with mount.running():
        check_no_corruption(mount / name)
        assert "restored" in words_for(mount, name), mount.log()
    assert [read_at(raw, off, 64 * KiB) for off in damaged] == before
    qemu_img("check", "-f", "qcow2", raw)
