"""The store itself damaged, removed or full: vmetafs never restores from a damaged journal, says
so when it cannot protect, and keeps the VMs running (unless told to fail their writes).

- A RocksDB file of the store (CURRENT, MANIFEST, a table or blob file) truncated or corrupted
  while unmounted, with the image damaged too so that a restore would be needed: the daemon
  refuses to start with a message naming the store's corruption, or starts and never writes
  anything but the image's true metadata.
- The store directory removed while mounted: the next first open says so and opens unprotected.
- The store's disk full: the guest's writes keep succeeding, the log says UNPROTECTED and counts
  them; once space is free, the next first open re-baselines ("protection resumed"). With
  unprotected_writes=fail the guest's metadata writes fail instead.
"""

import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from conftest import (GiB, KiB, MiB, PATTERNS, READY_TIMEOUT, copy_file, create_image,
                      daemon_command, expected_content, mount_count, out, qemu_img,
                      qemu_img_check, qemu_img_compare, qemu_io, run, sanitizer_report,
                      verify_patterns, write_patterns, zero)
from qcow2_layout import Qcow2Layout

IMAGE = "vm.qcow2"


# ---- damaged store files ----

def files(store: Path, pattern: str) -> List[Path]:
    found = sorted(store.glob(pattern))
    assert found, f"no {pattern} in the store: {sorted(p.name for p in store.iterdir())}"
    return found


def truncate(paths: List[Path], keep: int) -> None:
    for p in paths:
        os.truncate(p, min(keep, p.stat().st_size // 2))


def scribble(paths: List[Path], start: int = 64) -> None:
    """Overwrites each file from `start` to 64 bytes before its end (checksums, keys, values)."""
    for p in paths:
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.seek(min(start, size // 4))
            f.write(bytes([0xA5]) * max(0, size - 64 - min(start, size // 4)))


STORE_DAMAGE = {
    "current-empty": lambda s: truncate([s / "CURRENT"], 0),
    "current-garbage": lambda s: (s / "CURRENT").write_text("MANIFEST-999999\n"),
    "manifest-truncated": lambda s: truncate(files(s, "MANIFEST-*"), 100),
    "manifest-corrupted": lambda s: scribble(files(s, "MANIFEST-*"), 32),
    "tables-truncated": lambda s: truncate(files(s, "*.sst"), 500),
    "tables-corrupted": lambda s: scribble(files(s, "*.sst")),
    "blobs-corrupted": lambda s: scribble(files(s, "*.blob")),
}


def start_or_refuse(mount) -> str:
    """Starts the daemon; returns "" once it mounted, or its output if it exited instead."""
    log = mount.logdir / f"{mount.name}.{len(mount.log_files) + 1}.log"
    mount.log_files.append(log)
    cmd = daemon_command(mount.backing.spec, mount.mnt, mount.store)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    deadline = time.monotonic() + READY_TIMEOUT
    while mount_count(mount.mnt) == 0:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            assert proc.returncode != 0 and text.strip(), f"exited {proc.returncode}:\n{text}"
            assert sanitizer_report(text) is None, text
            return text
        assert time.monotonic() < deadline, f"neither mounted nor exited:\n{log.read_text()}"
        time.sleep(0.05)
    mount.proc = proc
    return ""


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_damaged_store_is_never_restored_from(damage, backing, mount, tmp_path):
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
    with mount.running():  # the reopen moves the journal from the log into table and blob files
        qemu_img_check(mount / IMAGE)
    raw = backing / IMAGE
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)
    zero(raw, *Qcow2Layout.read(reference).l1_table_range)  # a restore would be needed
    damaged = tmp_path / "damaged.qcow2"
    copy_file(raw, damaged)
    STORE_DAMAGE[damage](mount.store)

    refusal = start_or_refuse(mount)
    if refusal:
        assert re.search(r"store .*(corrupt|damaged)", refusal, re.I), refusal
        outcome = "refused to start"
    else:
        res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, mount / IMAGE,
                       check=False)
        mount.stop()
        outcome = f"started; the image's open -> exit {res.returncode}"
        if res.returncode != 0:
            assert re.search(r"corrupt", mount.log(), re.I), mount.log()
    # Nothing but the image's true metadata was ever written: untouched, or truly restored.
    if raw.read_bytes() != damaged.read_bytes():
        qemu_img_compare(reference, raw)
        outcome += ", restored correctly (the damage missed this image's journal)"
    else:
        outcome += ", the image left as it was"
    print(f"{damage}: {outcome}")


# ---- the store removed while mounted ----

def test_store_removed_while_mounted_is_reported(backing, mount):
    mount.start()
    create_image(mount / IMAGE)
    write_patterns(mount / IMAGE)
    shutil.rmtree(mount.store)
    since = len(mount.log())
    verify_patterns(mount / IMAGE, expected_content(PATTERNS))  # served as before
    log = mount.log()[since:]
    assert re.search(rf"{IMAGE}: opened unprotected: .*store .* was removed", log), mount.log()
    assert not re.search(r": (verified|restored|adopted|baseline): ", log), log
    mount.stop()
    # A new daemon makes a new store, and protection starts again with a baseline.
    with mount.running():
        qemu_img_check(mount / IMAGE)
        assert mount.decisions(IMAGE)[:1] == ["baseline"], mount.log()


# ---- the store's disk full ----

@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 64 MiB tmpfs for the store: RocksDB recovers once 16 MiB are free again."""
    path = tmp_path / "small-disk"
    path.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path])
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(MiB))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


# 256 GiB with 64 KiB clusters: each write lands in its own 512 MiB and needs a new L2 table and
# a refcount update, far more journal than RocksDB preallocated for its log.
BIG = 256 * GiB
FULL_WRITES = [(i * 512 * MiB, 64 * KiB, 1 + i % 250) for i in range(1, 301)]


def write_flushed(img, writes) -> subprocess.CompletedProcess:
    cmds = [c for off, n, p in writes for c in (f"write -P {p} {off} {n}", "flush")]
    return qemu_io(img, cmds, check=False)


def first_open_until(mount, img, pattern: str, attempts: int = 120) -> None:
    """Opens `img` again and again (each a first open) until the log matches."""
    for _ in range(attempts):
        qemu_img("info", "-f", "qcow2", img)
        if re.search(pattern, mount.log()):
            return
        time.sleep(0.5)
    pytest.fail(f"no /{pattern}/ after {attempts} first opens:\n{mount.log()}")


def test_full_store_keeps_the_vm_running_and_protection_resumes(backing, mount, small_disk,
                                                               tmp_path):
    mount.store = small_disk / "store"
    mount.start()
    create_image(mount / IMAGE, size=BIG)
    write_patterns(mount / IMAGE, patterns=PATTERNS[:2])
    filler = fill(small_disk)
    res = write_flushed(mount / IMAGE, FULL_WRITES)
    assert res.returncode == 0 and "failed" not in out(res), out(res)
    assert re.search(rf"{IMAGE}: .*UNPROTECTED", mount.log()), mount.log()
    filler.unlink()
    first_open_until(mount, mount / IMAGE, rf"{IMAGE}: baseline: protection resumed")
    verify_patterns(mount / IMAGE, expected_content(PATTERNS[:2], FULL_WRITES))
    qemu_img_check(mount / IMAGE)
    mount.stop()
    counted = re.search(r"(\d+) metadata writes went unjournaled", mount.log())
    assert counted and int(counted.group(1)) >= len(FULL_WRITES), mount.log()
    # Protected again: a damage after the new baseline is restored.
    reference = tmp_path / "reference.qcow2"
    copy_file(backing / IMAGE, reference)
    zero(backing / IMAGE, *Qcow2Layout.read(reference).l1_table_range)
    with mount.running():
        qemu_img_compare(reference, mount / IMAGE)
        assert "restored" in mount.decisions(IMAGE), mount.log()


def test_full_store_with_unprotected_writes_fail_fails_the_guest(backing, mount, small_disk):
    mount.store = small_disk / "store"
    mount.start(["unprotected_writes=fail"])
    create_image(mount / IMAGE, size=BIG)
    write_patterns(mount / IMAGE, patterns=PATTERNS[:2])
    filler = fill(small_disk)
    res = write_flushed(mount / IMAGE, FULL_WRITES)
    assert res.returncode != 0 and "No space left on device" in out(res), out(res)
    assert "failing the guest's write (unprotected_writes=fail)" in mount.log(), mount.log()
    assert "UNPROTECTED" not in mount.log(), mount.log()
    assert mount.running_now, mount.log()
    filler.unlink()
    # Once the journal works again, so do the guest's metadata writes; nothing was corrupted.
    later = [(100 * GiB + i * 512 * MiB, 64 * KiB, 0x77) for i in range(4)]
    for _ in range(120):
        if write_flushed(mount / IMAGE, later).returncode == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"metadata writes still fail after space was freed:\n{mount.log()}")
    verify_patterns(mount / IMAGE, later)
    res = qemu_img("check", "-f", "qcow2", mount / IMAGE, check=False)
    assert res.returncode in (0, 3), out(res)  # leaks of the failed allocations at most
    mount.stop()
