"""vmetafs over an nfs:// backing (nfs-ganesha on 127.0.0.1, NFSv3, reached with libnfs).

First a chosen subset of the core suites runs with the "nfs" backing kind in every run (the whole
suites run over NFS with VMETAFS_BACKINGS=dir,nfs): damage restored on first open, the
baseline/adopted lifecycle, meta-restore on a store whose backing is nfs://. Damage is poked
straight into the export directory, as a stray writer on the server would.

Then faults of the server seen through the mount, each with its own server:
  - hard mode: the server is SIGKILLed in the middle of a stream of writes-with-flush and
    restarted on the same port; the stream finishes and every flushed write is on the export;
  - soft mode (timeout=5): with the server down, clients get EIO, the daemon stays up, and the
    same mount serves again once the server is back;
  - the image file read-only on the server: damaged metadata cannot be written back, the open
    still shows the guest the journal's metadata and the daemon says so.
"""

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import test_damage
import test_lifecycle
import test_meta_restore
from conftest import (KiB, MiB, PATTERNS, Backing, NfsServer, copy_file, create_image,
                      expected_content, mount_count, out, qemu_img, qemu_img_check, read_at, run,
                      verify_patterns, write_patterns, zero)
from qcow2_layout import Qcow2Layout

pytestmark = pytest.mark.nfs


@pytest.fixture
def backing_kind() -> str:
    """Every `backing` of this module is a directory below the session's NFS export."""
    return "nfs"


# ---- the core suites, a subset over NFS ----

NFS_DAMAGES = [("zero-l1", None), ("zero-all-l2", "none"), ("zero-header-512", None),
               ("zero-one-refcount-block", "none")]


@pytest.mark.parametrize("case", NFS_DAMAGES, ids=[test_damage.case_id(c) for c in NFS_DAMAGES])
def test_damaged_metadata_is_restored_over_nfs(case, backing, mount, tmp_path):
    test_damage.test_damaged_metadata_is_restored(case, backing, mount, tmp_path)


def test_image_made_on_backing_is_baselined_then_protected_over_nfs(backing, mount, tmp_path):
    test_lifecycle.test_image_made_on_backing_is_baselined_then_protected(backing, mount,
                                                                          tmp_path)


@pytest.mark.parametrize("change", ["resize", "snapshot"])
def test_change_made_outside_the_mount_is_adopted_over_nfs(change, backing, mount, tmp_path):
    test_lifecycle.test_change_made_outside_the_mount_is_adopted(change, backing, mount, tmp_path)


def test_meta_restore_over_nfs(backing, mount, tmp_path):
    test_meta_restore.test_list_verify_restore_history_quarantine(backing, mount, tmp_path)


# ---- faults of the server, each test with a server of its own ----

@pytest.fixture
def own_server(tmp_path, request):
    """A server of this test only, over a fresh export; stopped at the end even on failure
    (after a failure its log is kept beside the test's files)."""
    export = tmp_path / "own-export"
    export.mkdir()
    export.chmod(0o755)
    server = NfsServer(export)
    request.node.nfs_servers = [server]  # its log goes into a failure's report (conftest.py)
    try:
        yield server.start()
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            (tmp_path / "ganesha.log").write_text(server.log())
        server.stop()


def own_backing(server: NfsServer, **args) -> Backing:
    return Backing("nfs", server.spec(**args), server.export)


WRITES = 48
WRITE_LEN = 64 * KiB


def write_offset(i: int) -> int:
    return i * 3 * MiB + (i % 5) * 4 * KiB


def write_pattern(i: int) -> int:
    return 0x10 + i % 0xE0


def test_hard_mount_survives_server_sigkill(own_server, make_mount, tmp_path):
    mount = make_mount(own_backing(own_server))
    mount.start()
    img = mount / "vm.qcow2"
    create_image(img, size=WRITES * 3 * MiB + MiB)

    flushed, errors = [], []

    def stream():
        # One qemu-io per write: its exit (0) means the write and its flush returned.
        for i in range(WRITES):
            cmds = [f"write -P {write_pattern(i):#x} {write_offset(i)} {WRITE_LEN}", "flush"]
            args = ["qemu-io", "-f", "qcow2"] + [a for c in cmds for a in ("-c", c)] + [str(img)]
            try:
                res = subprocess.run(args, capture_output=True, timeout=300)
            except subprocess.TimeoutExpired:
                errors.append(f"write {i} hung for 300 s")
                return
            if res.returncode != 0:
                errors.append(f"write {i} failed: {out(res)}")
                return
            flushed.append(i)

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    deadline = time.monotonic() + 120
    while len(flushed) < 6 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(flushed) >= 6, f"the stream did not get going: {errors}"
    assert len(flushed) < WRITES, "the stream finished before the server was killed"
    own_server.kill()
    killed_at = len(flushed)
    time.sleep(3)  # the stream is now blocked on the server (hard mount)
    own_server.start()
    writer.join(timeout=400)
    assert not writer.is_alive(), "the write stream did not finish after the server came back"
    assert not errors, "\n".join(errors)
    assert flushed == list(range(WRITES))
    assert killed_at < WRITES, killed_at
    assert mount.running_now, mount.log()
    runs = [(write_offset(i), WRITE_LEN, write_pattern(i)) for i in flushed]
    verify_patterns(img, runs)
    mount.stop()
    # What the server holds, read from the export directory itself.
    raw = own_server.export / "vm.qcow2"
    qemu_img_check(raw)
    verify_patterns(raw, runs)


IO_HELPER = r"""
import errno, mmap, os, sys
path, what = sys.argv[1], sys.argv[2]
buf = mmap.mmap(-1, 4096)
try:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    if what == "read":
        n = os.preadv(fd, [buf], 0)
        print("ok", n, buf[:16].hex())
    else:
        buf[:] = bytes([0x5A]) * 4096
        os.pwritev(fd, [buf], 4096)
        os.fsync(fd)
        print("ok")
    os.close(fd)
except OSError as e:
    print("errno", errno.errorcode.get(e.errno, e.errno))
"""


def client_io(path, what: str) -> str:
    res = subprocess.run([sys.executable, "-c", IO_HELPER, str(path), what], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_soft_mount_gives_eio_while_server_is_down(own_server, make_mount):
    mount = make_mount(own_backing(own_server, timeout=5))
    mount.start()
    data = bytes(range(256)) * 64
    (mount / "plain.bin").write_bytes(data * 4)
    assert client_io(mount / "plain.bin", "read") == f"ok 4096 {data[:16].hex()}"

    own_server.stop()
    time.sleep(6)  # longer than timeout=5
    try:
        got_read = client_io(mount / "plain.bin", "read")
        got_write = client_io(mount / "plain.bin", "write")
        assert got_read == "errno EIO", got_read
        assert got_write == "errno EIO", got_write
        assert mount.running_now, f"the daemon exited while the server was down:\n{mount.log()}"
        assert mount_count(mount.mnt) == 1, "the mount went away"
    finally:
        own_server.start()

    # The same mount serves again.
    assert client_io(mount / "plain.bin", "read") == f"ok 4096 {data[:16].hex()}"
    assert client_io(mount / "plain.bin", "write") == "ok"
    assert read_at(own_server.export / "plain.bin", 4096, 4096) == bytes([0x5A]) * 4096
    (mount / "after.txt").write_text("served again\n")
    assert (own_server.export / "after.txt").read_text() == "served again\n"
    assert mount.running_now
    mount.stop()


@contextlib.contextmanager
def immutable(path: Path):
    """The file cannot be written on the server, not even by root (which NFS does not squash
    here, so mode 0444 alone would not stop it)."""
    path.chmod(0o444)
    res = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"chattr +i {path}: {res.stderr}"
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o644)


def serve_damaged_read_only_image(server: NfsServer, make_mount, tmp_path) -> str:
    """Makes and journals an image through the mount, zeroes its L1 table on the export, makes
    the file unwritable on the server, and opens it through a new mount read-only: the guest
    must see the content from before the damage. Returns the daemon's log."""
    mount = make_mount(own_backing(server))
    with mount.running():
        img = mount / "vm.qcow2"
        create_image(img)
        write_patterns(img)
    raw = server.export / "vm.qcow2"
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)
    zero(raw, *Qcow2Layout.read(reference).l1_table_range)
    damaged = raw.read_bytes()
    with immutable(raw):
        with pytest.raises(PermissionError):
            open(raw, "r+b").close()
        mount.start()
        qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", reference, mount / "vm.qcow2")
        reads = [a for o, n, p in expected_content(PATTERNS)
                 for a in ("-c", f"read -P {p:#x} {o} {n}")]
        run(["qemu-io", "-r", "-f", "qcow2", *reads, mount / "vm.qcow2"])
        log = mount.log()
        assert mount.running_now, log
        mount.stop()
        assert raw.read_bytes() == damaged  # nothing could be written back
    return log


def test_read_only_image_on_server_is_served_from_the_journal(own_server, make_mount, tmp_path):
    log = serve_damaged_read_only_image(own_server, make_mount, tmp_path)
    lines = [l for l in log.splitlines() if "vm.qcow2" in l]
    assert any("restored" in l for l in lines), log
    assert any("served from the journal" in l for l in lines), \
        f"the log does not say the units are served from the journal:\n{log}"


def test_read_only_image_on_server_permission_error_is_named(own_server, make_mount, tmp_path):
    log = serve_damaged_read_only_image(own_server, make_mount, tmp_path)
    refused = [l for l in log.splitlines() if "vm.qcow2" in l and "could not be written" in l]
    assert refused, f"the log does not say the restore could not be written back:\n{log}"
    permission = (os.strerror(errno.EPERM), os.strerror(errno.EACCES))
    for line in refused:
        assert any(p in line for p in permission), f"no permission error named: {line}"
        assert os.strerror(errno.EFAULT) not in line, f"wrong error named: {line}"
    assert "reconnecting" not in log and "server answers again" not in log, \
        f"a refusal by a running server is handled as a lost connection:\n{log}"
