"""Set-user-ID, set-group-ID and file capabilities through the mount (FUSE_HANDLE_KILLPRIV_V2).

The daemon negotiates FUSE_HANDLE_KILLPRIV_V2 so that the kernel stops asking it for
security.capability before every fallocate and cached write (one GETXATTR round trip per guest
write on an allocating image). The kernel then leaves clearing the bits to the daemon, which writes
the backing as root (CAP_FSETID): these tests check that a writer without CAP_FSETID still loses
them, on the mount and on the backing, as it would on a local filesystem, and that root keeps them.

The unprivileged writer is a forked child that drops to nobody (65534) after the parent opened
what it needs: the kernel decides by the capabilities of the task doing the write, truncate or
fallocate, not by those of the opener. The mount runs with allow_other so that nobody may use it.
"""

import contextlib
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import Backing, dir_backing, run
from test_parity import fallocate

NOBODY = 65534
SUID_SGID_GX = 0o6777  # set-user-ID, set-group-ID, group-executable, writable by anyone
SGID_NO_GX = 0o2766  # set-group-ID without group-execute: not a privilege, must stay
FALLOC_FL_ZERO_RANGE = 0x10


def as_user(uid: int, action: Callable[[], None]) -> None:
    """Runs `action` in a forked child with uid and gid `uid`, no groups, no capabilities."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        except BaseException as e:  # reported through the exit code; the parent fails the test
            os.write(2, f"as_user({uid}): {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the action as uid {uid} failed"


def as_nobody(action: Callable[[], None]) -> None:
    as_user(NOBODY, action)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_file(path: Path, mode: int, size: int = 0) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * size)
    os.chmod(path, mode)


def expect_mode(m, backing: Backing, name: str, mode: int) -> None:
    assert oct(mode_of(backing / name)) == oct(mode), f"{name} on the backing"
    assert oct(mode_of(m / name)) == oct(mode), f"{name} on the mount"


@pytest.fixture
def m(mount):
    return mount.start(["allow_other"])


@contextlib.contextmanager
def opened(path: Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


# ---- write ----

def test_unprivileged_write_clears_suid_and_executable_sgid(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    with opened(m / "f") as fd:
        as_nobody(lambda: os.pwrite(fd, b"y" * 512, 0))
    expect_mode(m, backing, "f", 0o777)


def test_unprivileged_write_to_an_empty_file_clears_them(m, backing):
    # An empty file is served with direct I/O (it may become an image): the other write path.
    make_file(m / "f", SUID_SGID_GX)
    with opened(m / "f") as fd:
        as_nobody(lambda: os.pwrite(fd, b"y" * 512, 0))
    expect_mode(m, backing, "f", 0o777)


def test_unprivileged_write_keeps_sgid_without_group_execute(m, backing):
    make_file(m / "f", SGID_NO_GX | 0o4000, 4096)
    with opened(m / "f") as fd:
        as_nobody(lambda: os.pwrite(fd, b"y" * 512, 0))
    expect_mode(m, backing, "f", SGID_NO_GX)


def test_root_write_keeps_them(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    with opened(m / "f") as fd:
        os.pwrite(fd, b"y" * 512, 0)
    expect_mode(m, backing, "f", SUID_SGID_GX)


def test_bits_set_again_after_a_write_are_cleared_by_the_next(m, backing):
    make_file(m / "f", 0o777, 4096)
    with opened(m / "f") as fd:
        as_nobody(lambda: os.pwrite(fd, b"y" * 512, 0))  # the daemon learns: no bits
        os.chmod(m / "f", SUID_SGID_GX)
        as_nobody(lambda: os.pwrite(fd, b"z" * 512, 0))
    expect_mode(m, backing, "f", 0o777)


# ---- truncate, fallocate ----

def test_unprivileged_ftruncate_clears_them(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    with opened(m / "f") as fd:
        as_nobody(lambda: os.ftruncate(fd, 1024))
    expect_mode(m, backing, "f", 0o777)
    assert os.stat(backing / "f").st_size == 1024


def test_unprivileged_open_with_o_trunc_clears_them(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    # openat() below the mount's root: nobody needs no search permission above it.
    with opened(m.mnt, os.O_PATH | os.O_DIRECTORY) as root:
        as_nobody(lambda: os.close(os.open("f", os.O_WRONLY | os.O_TRUNC, dir_fd=root)))
    expect_mode(m, backing, "f", 0o777)
    assert os.stat(backing / "f").st_size == 0


def test_root_ftruncate_keeps_them(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    with opened(m / "f") as fd:
        os.ftruncate(fd, 1024)
    expect_mode(m, backing, "f", SUID_SGID_GX)


def test_unprivileged_fallocate_clears_them(m, backing):
    make_file(m / "f", SUID_SGID_GX, 4096)
    with opened(m / "f") as fd:
        as_nobody(lambda: fallocate(fd, 0, 0, 64 * 1024))
    expect_mode(m, backing, "f", 0o777)


# ---- chown ----

def test_chown_clears_suid(m, backing):
    make_file(m / "f", 0o4755, 4096)
    os.chown(m / "f", NOBODY, -1)
    expect_mode(m, backing, "f", 0o755)
    assert os.stat(backing / "f").st_uid == NOBODY


# ---- the reason for the flag: no security.capability question per write ----
# On a local directory whatever the backing kind: the question is the kernel's, and the NFS
# backing has no FALLOC_FL_ZERO_RANGE.

@pytest.fixture
def local_backing(tmp_path) -> Iterator[Backing]:
    with dir_backing(tmp_path / "local") as b:
        yield b


def getxattr_requests(log: str) -> int:
    return sum(1 for line in log.splitlines() if "opcode: GETXATTR" in line)


def allocating_writes(path: Path, count: int) -> None:
    """What qemu does per guest write to an unallocated cluster: zero it, then write into it."""
    with opened(path, os.O_RDWR | os.O_CREAT) as fd:
        for i in range(count):
            fallocate(fd, FALLOC_FL_ZERO_RANGE, i * 65536, 65536)
            os.pwrite(fd, b"w" * 4096, i * 65536)


def test_allocating_writes_ask_for_capabilities_once(make_mount, local_backing):
    mount = make_mount(local_backing).start(["debug"])  # libfuse logs each request
    allocating_writes(mount / "img", 64)
    log = mount.log()
    assert "FUSE_HANDLE_KILLPRIV_V2 negotiated" in log, log[-4000:]
    assert getxattr_requests(log) <= 2, "GETXATTR per write: FUSE_HANDLE_KILLPRIV_V2 not in effect"


def test_killpriv_v2_off_leaves_the_kernel_asking(make_mount, local_backing):
    mount = make_mount(local_backing).start(["debug", "killpriv_v2=off", "allow_other"])
    allocating_writes(mount / "img", 64)
    log = mount.log()
    assert "negotiated" not in log
    assert getxattr_requests(log) >= 64
    # The kernel clears the bits itself then.
    make_file(mount / "f", SUID_SGID_GX, 4096)
    with opened(mount / "f") as fd:
        as_nobody(lambda: os.pwrite(fd, b"y" * 512, 0))
    expect_mode(mount, local_backing, "f", 0o777)


# ---- file capabilities (a local directory: the NFS backing has no extended attributes) ----

@pytest.fixture
def local_mount(make_mount, local_backing) -> Iterator:
    return make_mount(local_backing, name="local").start(["allow_other"]), local_backing


def has_capability(path: Path) -> bool:
    try:
        os.getxattr(path, "security.capability")
        return True
    except OSError:
        return False


def give_capability(path: Path) -> None:
    run(["setcap", "cap_net_raw+ep", path])
    assert has_capability(path)


@pytest.mark.parametrize("writer", ["root", "nobody"])
def test_write_removes_file_capability(local_mount, writer):
    m, b = local_mount
    make_file(m / "f", 0o777, 4096)
    give_capability(m / "f")
    with opened(m / "f") as fd:
        write = lambda: os.pwrite(fd, b"y" * 512, 0)  # noqa: E731
        write() if writer == "root" else as_nobody(write)
    assert not has_capability(b / "f")
    assert not has_capability(m / "f")


def test_truncate_removes_file_capability(local_mount):
    m, b = local_mount
    make_file(m / "f", 0o777, 4096)
    give_capability(m / "f")
    with opened(m / "f") as fd:
        as_nobody(lambda: os.ftruncate(fd, 0))
    assert not has_capability(b / "f")
    assert not has_capability(m / "f")
