"""POSIX parity: the same calls on the mount and on the backing give the same results and errno.

Each test runs one sequence of file operations twice: under MNT/via-mount and directly under
BACKING/direct (the same storage). Every step's outcome (a summary of the value, or the errno
name) is recorded; the two traces must be equal. Afterwards the trees the two runs left on the
storage must be equal too (what went through the mount really reached the storage).
"""

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from conftest import KiB, MiB, random_bytes

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return 0


def summarize(value):
    """A run-independent picture of a result (no inode numbers, no times unless set)."""
    if isinstance(value, os.stat_result):
        return {"type": stat.S_IFMT(value.st_mode), "perm": oct(stat.S_IMODE(value.st_mode)),
                "size": value.st_size if not stat.S_ISDIR(value.st_mode) else None,
                "nlink": value.st_nlink, "uid": value.st_uid, "gid": value.st_gid}
    if isinstance(value, (bytes, bytearray, mmap.mmap)):
        data = bytes(value)
        if len(data) <= 64:
            return data
        return f"{len(data)} bytes sha1 {hashlib.sha1(data).hexdigest()}"
    if isinstance(value, list):
        return [summarize(v) for v in value]
    return value


class Trace:
    """Runs steps under `root`, recording ("label", "ok", summary) or ("label", "errno", NAME)."""

    def __init__(self, root: Path):
        self.root = root
        self.steps: List[Tuple[str, str, object]] = []

    def p(self, name: str) -> str:
        return str(self.root / name)

    def __call__(self, label: str, fn: Callable, *args, **kwargs):
        try:
            value = fn(*args, **kwargs)
        except OSError as e:
            self.steps.append((label, "errno", errno.errorcode.get(e.errno, str(e.errno))))
            return None
        self.steps.append((label, "ok", summarize(value)))
        return value

    def open(self, label: str, name: str, flags: int, mode: int = 0o644):
        """Opens root/name; records only success or errno (descriptor numbers differ)."""
        try:
            fd = os.open(self.p(name), flags, mode)
        except OSError as e:
            self.steps.append((label, "errno", errno.errorcode.get(e.errno, str(e.errno))))
            return None
        self.steps.append((label, "ok", "fd"))
        return fd

    def note(self, label: str, value):
        self.steps.append((label, "ok", summarize(value)))


def content_summary(path: Path, size: int):
    """The whole content, or for huge sparse files their first and last 64 KiB."""
    with open(path, "rb") as f:
        if size <= 64 * MiB:
            return summarize(f.read())
        head = f.read(64 * KiB)
        f.seek(size - 64 * KiB)
        return summarize(head), summarize(f.read())


def close(fd):
    if fd is not None:
        os.close(fd)


def tree(root: Path) -> dict:
    """Everything the sequence left under root: types, modes, sizes, links, contents, xattrs."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            entry = summarize(st)
            if stat.S_ISREG(st.st_mode):
                entry["content"] = content_summary(p, st.st_size)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            else:
                entry["xattrs"] = sorted(os.listxattr(p, follow_symlinks=False))
            result[str(p.relative_to(root))] = entry
    return result


@pytest.fixture(params=[[], ["journal=off"]], ids=["journal", "journal-off"])
def roots(request, backing, mount):
    """(root through the mount, root directly on the backing, backing-side view of the former)."""
    old_umask = os.umask(0o022)
    mount.start(request.param)
    via_mount, direct = mount.mnt / "via-mount", backing.path / "direct"
    via_mount.mkdir()
    direct.mkdir()
    yield via_mount, direct, backing.path / "via-mount"
    os.umask(old_umask)
    mount.stop()


def check_parity(roots, sequence: Callable[[Trace], None]):
    via_mount, direct, landed = roots
    a, b = Trace(via_mount), Trace(direct)
    for t in (a, b):
        try:
            sequence(t)
        except Exception as e:  # e.g. a step that failed on one side only broke the next one
            t.steps.append(("sequence stopped", type(e).__name__, str(e)))
    for i, (x, y) in enumerate(zip(a.steps, b.steps)):
        assert x == y, (f"step {i} differs:\n  through the mount: {x}\n  on the backing:    {y}\n"
                        f"mount trace: {a.steps}")
    assert len(a.steps) == len(b.steps)
    assert tree(via_mount) == tree(direct), "the mount shows a different tree"
    assert tree(landed) == tree(direct), "the storage holds a different tree"


# ---- sequences ----

def open_flags(t: Trace):
    fd = t.open("create excl", "f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    t("write", os.write, fd, b"hello world")
    close(fd)
    close(t.open("create excl again", "f", os.O_CREAT | os.O_EXCL | os.O_RDWR))
    close(t.open("open missing", "missing", os.O_RDONLY))
    close(t.open("O_DIRECTORY on file", "f", os.O_RDONLY | os.O_DIRECTORY))
    close(t.open("path through a file", "f/child", os.O_RDONLY))
    t("mkdir", os.mkdir, t.p("d"))
    close(t.open("dir for writing", "d", os.O_WRONLY))
    close(t.open("O_DIRECTORY on dir", "d", os.O_RDONLY | os.O_DIRECTORY))
    close(t.open("create in missing dir", "nodir/x", os.O_CREAT | os.O_WRONLY))
    t("stat", os.stat, t.p("f"))
    fd = t.open("open O_TRUNC", "f", os.O_RDWR | os.O_TRUNC)
    t("fstat after O_TRUNC", os.fstat, fd)
    close(fd)
    fd = t.open("open rdonly", "f", os.O_RDONLY)
    t("write to rdonly fd", os.write, fd, b"x")
    t("ftruncate rdonly fd", os.ftruncate, fd, 0)
    close(fd)
    fd = t.open("open wronly", "f", os.O_WRONLY)
    t("read from wronly fd", os.read, fd, 10)
    close(fd)


def read_write(t: Trace):
    fd = t.open("create", "rw", os.O_CREAT | os.O_RDWR)
    for off, seed in ((0, 1), (4095, 2), (65536 + 3, 3), (1 * MiB + 17, 4), (300, 5)):
        t(f"pwrite {off}", os.pwrite, fd, random_bytes(5000, seed), off)
    for off, n in ((0, 100), (4000, 200), (65536, 9000), (1 * MiB, 5100), (1 * MiB + 5017, 10),
                   (1 * MiB + 5017, 0), (5 * MiB, 10)):
        t(f"pread {off}+{n}", os.pread, fd, n, off)
    t("lseek set", os.lseek, fd, 10, os.SEEK_SET)
    t("read", os.read, fd, 20)
    t("lseek end", os.lseek, fd, 0, os.SEEK_END)
    t("write at end", os.write, fd, b"end")
    t("fstat", os.fstat, fd)
    t("big write", os.pwrite, fd, random_bytes(3 * MiB + 7, 6), 2 * MiB - 1)
    t("big read", os.pread, fd, 4 * MiB, 1 * MiB)
    t("fsync", os.fsync, fd)
    t("fdatasync", os.fdatasync, fd)
    close(fd)
    fd = t.open("append", "rw", os.O_WRONLY | os.O_APPEND)
    t("append write", os.write, fd, b"appended")
    t("append pwrite", os.write, fd, b"again")
    close(fd)
    t("stat", os.stat, t.p("rw"))
    fd = t.open("far", "far", os.O_CREAT | os.O_RDWR)
    t("pwrite at 1 TiB", os.pwrite, fd, b"far away", 1 << 40)
    t("fstat far", os.fstat, fd)
    t("pread far", os.pread, fd, 16, (1 << 40) - 8)
    close(fd)


def direct_io(t: Trace):
    fd = t.open("open O_DIRECT", "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    wbuf = mmap.mmap(-1, 8192)
    wbuf.write(random_bytes(8192, 7))
    t("pwrite aligned 8k at 0", os.pwrite, fd, wbuf, 0)
    t("pwrite aligned 4k at 12k", os.pwrite, fd, memoryview(wbuf)[:4096], 12288)
    rbuf = mmap.mmap(-1, 16384)
    t("preadv aligned 16k at 0", os.preadv, fd, [rbuf], 0)
    t.note("read back", rbuf)
    rbuf2 = mmap.mmap(-1, 4096)
    t("preadv aligned at EOF", os.preadv, fd, [rbuf2], 16384)
    t("fstat", os.fstat, fd)
    close(fd)
    fd = t.open("open buffered", "direct", os.O_RDONLY)
    t("buffered read", os.pread, fd, 20000, 0)
    close(fd)


def truncate_and_fallocate(t: Trace):
    fd = t.open("create", "t", os.O_CREAT | os.O_RDWR)
    t("write", os.pwrite, fd, random_bytes(100000, 8), 0)
    t("truncate grow", os.truncate, t.p("t"), 3 * MiB)
    t("stat grown", os.stat, t.p("t"))
    t("read grown tail", os.pread, fd, 32, 2 * MiB)
    t("ftruncate shrink", os.ftruncate, fd, 5000)
    t("fstat shrunk", os.fstat, fd)
    t("read shrunk", os.pread, fd, 10000, 0)
    t("truncate missing", os.truncate, t.p("missing"), 0)
    t("posix_fallocate", os.posix_fallocate, fd, 0, 2 * MiB)
    st = t("fstat after fallocate", os.fstat, fd)
    t.note("allocated covers size", st is not None and st.st_blocks * 512 >= 2 * MiB)
    t("write over", os.pwrite, fd, random_bytes(256 * KiB, 9), 0)
    t("punch hole", fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 * KiB, 128 * KiB)
    t("read punched", os.pread, fd, 256 * KiB, 0)
    t("fstat punched", os.fstat, fd)
    t("punch without keep-size", fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)
    t("fallocate keep-size past EOF", fallocate, fd, FALLOC_FL_KEEP_SIZE, 4 * MiB, 64 * KiB)
    t("fstat", os.fstat, fd)
    close(fd)
    # SEEK_DATA / SEEK_HOLE on a sparse file: data at 1 MiB and 3 MiB, 6 MiB long.
    fd = t.open("create sparse", "sparse", os.O_CREAT | os.O_RDWR)
    t("write 1M", os.pwrite, fd, random_bytes(64 * KiB, 10), 1 * MiB)
    t("write 3M", os.pwrite, fd, random_bytes(64 * KiB, 11), 3 * MiB)
    t("ftruncate 6M", os.ftruncate, fd, 6 * MiB)
    t("fsync", os.fsync, fd)
    for whence, name in ((os.SEEK_DATA, "SEEK_DATA"), (os.SEEK_HOLE, "SEEK_HOLE")):
        for off in (0, 1 * MiB + 100, 2 * MiB, 3 * MiB, 4 * MiB, 6 * MiB - 1, 6 * MiB, 7 * MiB):
            t(f"lseek {name} {off}", os.lseek, fd, off, whence)
    close(fd)


def names_and_links(t: Trace):
    def write(name, data):
        fd = os.open(t.p(name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        return len(data)

    def read(name):
        with open(t.p(name), "rb") as f:
            return f.read()

    t("write a", write, "a", b"A" * 10)
    t("write c", write, "c", b"C" * 20)
    t("rename to new", os.rename, t.p("a"), t.p("b"))
    t("rename onto existing", os.rename, t.p("b"), t.p("c"))
    t("read renamed", read, "c")
    t("stat gone", os.lstat, t.p("b"))
    t("rename missing", os.rename, t.p("b"), t.p("x"))
    for d in ("d1", "d2", "d3", "d2/inner"):
        t(f"mkdir {d}", os.mkdir, t.p(d), 0o750)
    t("write d1/f", write, "d1/f", b"in d1")
    t("rename dir onto non-empty dir", os.rename, t.p("d1"), t.p("d2"))
    t("rename dir onto empty dir", os.rename, t.p("d1"), t.p("d3"))
    t("read moved", read, "d3/f")
    t("rename file onto dir", os.rename, t.p("c"), t.p("d2"))
    t("rename dir onto file", os.rename, t.p("d3"), t.p("c"))
    t("rename dir into itself", os.rename, t.p("d2"), t.p("d2/inner/x"))
    t("mkdir existing", os.mkdir, t.p("d2"))
    t("mkdir under file", os.mkdir, t.p("c/x"))
    t("stat dir", os.stat, t.p("d2"))
    t("rmdir non-empty", os.rmdir, t.p("d2"))
    t("rmdir file", os.rmdir, t.p("c"))
    t("rmdir missing", os.rmdir, t.p("nope"))
    t("rmdir empty", os.rmdir, t.p("d2/inner"))
    t("unlink dir", os.unlink, t.p("d2"))
    t("unlink missing", os.unlink, t.p("nope"))
    t("mkfifo", os.mkfifo, t.p("fifo"), 0o600)
    t("stat fifo", os.lstat, t.p("fifo"))
    t("symlink", os.symlink, "c", t.p("s"))
    t("symlink dangling", os.symlink, "no-such-target", t.p("dangling"))
    t("symlink onto existing", os.symlink, "c", t.p("s"))
    t("readlink", os.readlink, t.p("s"))
    t("readlink file", os.readlink, t.p("c"))
    t("lstat link", os.lstat, t.p("s"))
    t("stat through link", os.stat, t.p("s"))
    t("stat dangling", os.stat, t.p("dangling"))
    t("read through link", read, "s")
    t("link", os.link, t.p("c"), t.p("h"))
    t("stat linked", os.stat, t.p("c"))
    t("stat link name", os.stat, t.p("h"))
    t("link onto existing", os.link, t.p("c"), t.p("h"))
    t("link a dir", os.link, t.p("d2"), t.p("d2link"))
    t("unlink one name", os.unlink, t.p("h"))
    t("stat after unlink", os.stat, t.p("c"))
    t("listdir", lambda: sorted(os.listdir(t.root)))
    t("scandir", lambda: sorted((e.name, e.is_dir(follow_symlinks=False),
                                 e.is_file(follow_symlinks=False), e.is_symlink())
                                for e in os.scandir(t.root)))
    t("listdir file", os.listdir, t.p("c"))


def attributes(t: Trace):
    fd = t.open("create", "f", os.O_CREAT | os.O_WRONLY, 0o644)
    close(fd)
    t("mkdir", os.mkdir, t.p("d"))
    t("chmod", os.chmod, t.p("f"), 0o600)
    t("chmod setgid dir", os.chmod, t.p("d"), 0o2755)
    t("chown", os.chown, t.p("f"), 1234, 2345)
    t("stat", os.stat, t.p("f"))
    t("stat dir", os.stat, t.p("d"))
    t("symlink", os.symlink, "f", t.p("s"))
    t("lchown link", os.lchown, t.p("s"), 4321, 5432)
    t("lstat link", os.lstat, t.p("s"))
    t("chmod missing", os.chmod, t.p("missing"), 0o600)
    times = (1_000_000_000_123_456_789, 1_100_000_000_987_654_321)
    t("utime ns", os.utime, t.p("f"), ns=times)
    st = t("stat times", os.stat, t.p("f"))
    t.note("times kept", st is not None and (st.st_atime_ns, st.st_mtime_ns) == times)
    t("utime missing", os.utime, t.p("missing"), ns=times)
    fd = t.open("open", "f", os.O_RDWR)
    t("fchmod", os.fchmod, fd, 0o640)
    t("fstat", os.fstat, fd)
    close(fd)
    # Extended attributes (user namespace).
    t("setxattr", os.setxattr, t.p("f"), "user.alpha", b"one")
    t("setxattr dir", os.setxattr, t.p("d"), "user.beta", b"two" * 100)
    t("getxattr", os.getxattr, t.p("f"), "user.alpha")
    t("getxattr dir", os.getxattr, t.p("d"), "user.beta")
    t("getxattr missing", os.getxattr, t.p("f"), "user.missing")
    t("setxattr create existing", os.setxattr, t.p("f"), "user.alpha", b"x", os.XATTR_CREATE)
    t("setxattr replace missing", os.setxattr, t.p("f"), "user.gamma", b"x", os.XATTR_REPLACE)
    t("setxattr replace", os.setxattr, t.p("f"), "user.alpha", b"uno", os.XATTR_REPLACE)
    t("setxattr empty value", os.setxattr, t.p("f"), "user.empty", b"")
    t("getxattr empty value", os.getxattr, t.p("f"), "user.empty")
    t("listxattr", lambda: sorted(os.listxattr(t.p("f"))))
    t("removexattr", os.removexattr, t.p("f"), "user.alpha")
    t("removexattr missing", os.removexattr, t.p("f"), "user.alpha")
    t("listxattr after remove", lambda: sorted(os.listxattr(t.p("f"))))
    t("getxattr on missing file", os.getxattr, t.p("missing"), "user.alpha")


def copy_range(t: Trace):
    src = t.open("create src", "src", os.O_CREAT | os.O_RDWR)
    dst = t.open("create dst", "dst", os.O_CREAT | os.O_RDWR)
    t("write src", os.pwrite, src, random_bytes(300000, 12), 0)
    t("write dst", os.pwrite, dst, b"d" * 10, 0)
    t("copy_file_range", os.copy_file_range, src, dst, 200000, 1000, 5)
    t("copy_file_range past src EOF", os.copy_file_range, src, dst, 100, 300000, 0)
    t("copy_file_range into the same file", os.copy_file_range, src, src, 4096, 0, 500000)
    t("fstat dst", os.fstat, dst)
    t("read dst", os.pread, dst, 300000, 0)
    t("fstat src", os.fstat, src)
    t("read src", os.pread, src, 600000, 0)
    close(src)
    close(dst)
    ro = t.open("open rdonly", "dst", os.O_RDONLY)
    src = t.open("open src", "src", os.O_RDONLY)
    t("copy_file_range into rdonly fd", os.copy_file_range, src, ro, 10, 0, 0)
    close(ro)
    close(src)


LOCK_CHILD = r"""
import errno, fcntl, os, sys
path, kind, start, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDWR)
try:
    if kind == "lockf":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def other_process_locks(path: str, kind: str, start: int = 0, length: int = 0) -> str:
    res = subprocess.run([sys.executable, "-c", LOCK_CHILD, path, kind, str(start), str(length)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def locks(t: Trace):
    fd = t.open("create", "locked", os.O_CREAT | os.O_RDWR)
    t("write", os.write, fd, b"x" * 1000)
    t("lockf 0..100", fcntl.lockf, fd, fcntl.LOCK_EX, 100, 0)
    t("other process: overlapping", other_process_locks, t.p("locked"), "lockf", 50, 100)
    t("other process: disjoint", other_process_locks, t.p("locked"), "lockf", 200, 50)
    t("other process: whole file", other_process_locks, t.p("locked"), "lockf", 0, 0)
    t("unlock", fcntl.lockf, fd, fcntl.LOCK_UN, 100, 0)
    t("other process: after unlock", other_process_locks, t.p("locked"), "lockf", 50, 100)
    t("flock", fcntl.flock, fd, fcntl.LOCK_EX)
    t("other process: flock", other_process_locks, t.p("locked"), "flock")
    t("flock unlock", fcntl.flock, fd, fcntl.LOCK_UN)
    t("other process: flock after unlock", other_process_locks, t.p("locked"), "flock")
    close(fd)


SEQUENCES = [open_flags, read_write, direct_io, truncate_and_fallocate, names_and_links,
             attributes, copy_range, locks]


@pytest.mark.parametrize("sequence", SEQUENCES, ids=[s.__name__ for s in SEQUENCES])
def test_parity(sequence, roots):
    check_parity(roots, sequence)


def test_statvfs_matches_backing(backing, mount):
    with mount.running():
        a, b = os.statvfs(mount.mnt), os.statvfs(backing.path)
    total_a, total_b = a.f_blocks * a.f_frsize, b.f_blocks * b.f_frsize
    assert abs(total_a - total_b) <= max(a.f_frsize, b.f_frsize), (a, b)
    # Free space moves a little between the two calls (the store lives on a local disk too).
    slack = total_b // 50
    assert abs(a.f_bfree * a.f_frsize - b.f_bfree * b.f_frsize) <= slack, (a, b)
    assert abs(a.f_bavail * a.f_frsize - b.f_bavail * b.f_frsize) <= slack, (a, b)
    assert a.f_bavail <= a.f_bfree <= a.f_blocks, a
    assert a.f_files == b.f_files and abs(a.f_ffree - b.f_ffree) <= max(100, b.f_files // 100)
    assert a.f_namemax == b.f_namemax, (a, b)
