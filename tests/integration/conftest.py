"""Fixtures and helpers for the integration tests: real vmetafs mounts driven by qemu-img/qemu-io.

Binaries come from $VMETAFS_BUILD/bin (default: build/ under the repository root; a relative
VMETAFS_BUILD is taken relative to the repository root). A missing binary fails every test that
needs it with a message naming the path: nothing is skipped.

Backings: the `backing` fixture is parametrized by kind. A kind plugs in by adding a
context-manager factory to BACKING_FACTORIES (it receives a fresh scratch directory and yields a
Backing whose .spec is what vmetafs is given, e.g. nfs://127.0.0.1/EXPORT, and whose .path is the
directory behind it where tests poke damage) and naming it in VMETAFS_BACKINGS (comma-separated,
default "dir"). Kinds: "dir" (a local directory) and "nfs" (a directory below the export of one
nfs-ganesha server per session, started on first use on a free port and stopped at the end of the
session; see NfsServer). A module can also override the `backing_kind` fixture to run its tests
over one kind only (test_nfs.py does, to run a chosen subset over NFS in every run).

Every daemon a test starts is stopped in the test's teardown even when the test failed (lazy
unmount, then kill); its stderr is attached to the report of a failing test; a session-level check
fails the run if any fuse.vmetafs mount under the session's temporary directory is left.
"""

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Generous bounds that only turn a hang into a failure (sanitizer builds are slow); no test
# asserts how long anything takes.
READY_TIMEOUT = 90
EXIT_TIMEOUT = 90
CMD_TIMEOUT = 600

DECISION_WORDS = ("baseline", "verified", "restored", "adopted", "refused", "unprotected")
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer")


def build_dir() -> Path:
    value = os.environ.get("VMETAFS_BUILD")
    if not value:
        return REPO_ROOT / "build"
    p = Path(value)
    return p if p.is_absolute() else REPO_ROOT / p


def binary(name: str) -> Path:
    path = build_dir() / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{name} not found at {path}: build the project first "
                    f"(cmake -S . -B build && cmake --build build -j2) or set VMETAFS_BUILD",
                    pytrace=False)
    return path


# --------------------------------------------------------------------------------------------
# Commands


def run(cmd: Sequence, check: bool = True, timeout: float = CMD_TIMEOUT, input: bytes = None,
        env: dict = None) -> subprocess.CompletedProcess:
    """Runs a command, capturing its output; a failure (or a hang) fails the test with both."""
    cmd = [str(c) for c in cmd]
    try:
        res = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"command timed out after {timeout}s: {' '.join(cmd)}\n"
                    f"stdout:\n{_text(e.stdout)}\nstderr:\n{_text(e.stderr)}")
    if check and res.returncode != 0:
        pytest.fail(f"command failed (exit {res.returncode}): {' '.join(cmd)}\n"
                    f"stdout:\n{_text(res.stdout)}\nstderr:\n{_text(res.stderr)}")
    return res


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else str(b)


def out(res: subprocess.CompletedProcess) -> str:
    return _text(res.stdout) + _text(res.stderr)


def meta_restore(*args, check: bool = True) -> subprocess.CompletedProcess:
    """The offline tool of the same build."""
    return run([binary("meta-restore"), *args], check=check)


def qemu_img(*args, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], check=check)


def qemu_io(path, cmds: Sequence[str], cache: Optional[str] = None, fmt: str = "qcow2",
            check: bool = True) -> subprocess.CompletedProcess:
    """qemu-io on `path`; cache='none' opens it O_DIRECT like a VM with cache=none."""
    args = ["qemu-io", "-f", fmt]
    if cache:
        args += ["-t", cache]
    for c in cmds:
        args += ["-c", c]
    return run(args + [path], check=check)


def image_opts(path, cache: Optional[str] = None) -> List[str]:
    """qemu-img arguments naming a qcow2 image, opened O_DIRECT when cache='none'."""
    if cache == "none":
        return ["--image-opts", f"driver=qcow2,file.filename={path},cache.direct=on"]
    return [str(path)]


def qemu_img_compare(a, b) -> subprocess.CompletedProcess:
    """Fails unless the two images show the same guest content (qemu-img compare exit 0)."""
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b, check=False)
    assert res.returncode == 0, f"qemu-img compare {a} {b} -> exit {res.returncode}:\n{out(res)}"
    return res


def qemu_img_check(path) -> subprocess.CompletedProcess:
    res = qemu_img("check", "-f", "qcow2", path, check=False)
    assert res.returncode == 0, f"qemu-img check {path} -> exit {res.returncode}:\n{out(res)}"
    return res


# --------------------------------------------------------------------------------------------
# Images and bytes

VIRTUAL_SIZE = 4 * GiB

# (offset, length, pattern byte): spread over the 4 GiB disk so that several L2 tables (one per
# 512 MiB with 64 KiB clusters, per 2 MiB with 4 KiB clusters) and, with small clusters, several
# refcount blocks are allocated; one write is not cluster-aligned (copy-on-write of a cluster).
PATTERNS = [
    (0, 4 * MiB, 0x11),
    (700 * MiB, 192 * KiB, 0x22),
    (1 * GiB + 320 * KiB, 64 * KiB, 0x33),
    (1700 * MiB, 6 * MiB, 0x44),
    (2 * GiB + 4 * KiB, 8 * KiB, 0x55),
    (3 * GiB + 512 * MiB, 6 * MiB, 0x66),
    (4 * GiB - 64 * KiB, 64 * KiB, 0x77),
]
# Written after a snapshot: overwrites clusters the snapshot shares (copy-on-write of L2 tables).
MORE_PATTERNS = [
    (1 * MiB, 64 * KiB, 0x81),
    (1700 * MiB + 2 * MiB, 128 * KiB, 0x82),
    (3 * GiB + 513 * MiB, 64 * KiB, 0x83),
    (2500 * MiB, 64 * KiB, 0x84),
]


def create_image(path, size: int = VIRTUAL_SIZE, cluster_size: Optional[int] = None):
    opts = ["-o", f"cluster_size={cluster_size}"] if cluster_size else []
    return qemu_img("create", "-q", "-f", "qcow2", *opts, path, str(size))


def write_patterns(img, cache: Optional[str] = None, patterns=PATTERNS):
    """Writes each pattern with qemu-io (one process, one open); returns the patterns."""
    qemu_io(img, [f"write -P {p:#x} {off} {length}" for off, length, p in patterns], cache=cache)
    return list(patterns)


def expected_content(*pattern_lists) -> List[Tuple[int, int, int]]:
    """What the disk holds after writing the lists in order: (offset, length, pattern) runs."""
    runs: List[Tuple[int, int, int]] = []
    for patterns in pattern_lists:
        for off, length, pat in patterns:
            end = off + length
            kept = []
            for o, l, p in runs:
                if o < off:
                    kept.append((o, min(o + l, off) - o, p))
                if o + l > end:
                    start = max(o, end)
                    kept.append((start, o + l - start, p))
            runs = [r for r in kept if r[1] > 0] + [(off, length, pat)]
    return sorted(runs)


def verify_patterns(img, runs, cache: Optional[str] = None):
    qemu_io(img, [f"read -P {p:#x} {off} {length}" for off, length, p in runs], cache=cache)


def copy_file(src, dst):
    shutil.copyfile(src, dst)


def read_at(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def poke(path, offset: int, data: bytes):
    """Overwrites bytes of a file directly on the backing, like a stray dd."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def zero(path, offset: int, length: int):
    poke(path, offset, bytes(length))


def random_bytes(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


# --------------------------------------------------------------------------------------------
# Daemon log


def _mentions(line: str, name: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", line) is not None


def decisions(log: str, name: str) -> List[str]:
    """The decision words, in order, on the log lines that name the image `name`."""
    found = []
    for line in log.splitlines():
        if _mentions(line, name):
            found += [w for w in DECISION_WORDS if re.search(rf"\b{w}\b", line, re.I)]
    return found


def sanitizer_report(text: str) -> Optional[str]:
    for marker in SANITIZER_MARKERS:
        if marker in text:
            return marker
    return None


# --------------------------------------------------------------------------------------------
# Mount table


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> List[Tuple[str, str]]:
    """(mount point, type) of every mount, from /proc/mounts."""
    result = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                result.append((_unescape(fields[1]), fields[2]))
    return result


def vmetafs_mounts(under: Optional[Path] = None) -> List[str]:
    found = [m for m, t in mounts() if t == "fuse.vmetafs"]
    if under is not None:
        prefix = str(under).rstrip("/") + "/"
        found = [m for m in found if m.startswith(prefix)]
    return found


def mount_count(mnt) -> int:
    return sum(1 for m, t in mounts() if m == str(mnt) and t == "fuse.vmetafs")


def _fuse_connection(mnt) -> Optional[str]:
    """The fusectl connection id of the mount at `mnt` (its device minor), from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == str(mnt) and " - fuse" in line:
                return fields[2].split(":")[1]
    return None


def force_unmount(mnt) -> None:
    """Best effort: abort the FUSE connection (unblocks hung requests) and detach the mount."""
    conn = _fuse_connection(mnt)
    if conn is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{conn}/abort").write_text("1")
    for cmd in (["fusermount3", "-uz", str(mnt)], ["umount", "-l", str(mnt)]):
        if mount_count(mnt) == 0:
            break
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


# --------------------------------------------------------------------------------------------
# Backings


@dataclass
class Backing:
    kind: str
    spec: str  # what vmetafs is given
    path: Path  # the same files, reachable directly (to poke damage, to compare)

    def __truediv__(self, name) -> Path:
        return self.path / name


@contextlib.contextmanager
def dir_backing(scratch: Path) -> Iterator[Backing]:
    root = scratch / "export"
    root.mkdir(parents=True)
    yield Backing("dir", str(root), root)


# ---- NFS: nfs-ganesha on 127.0.0.1, through mount-scripts/nfs-server-start and -stop ----

NFS_SCRIPTS = REPO_ROOT / "mount-scripts"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port P with P and P+1 (NFS and MOUNT) both free on 127.0.0.1 and no server state."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, 60000, 2)
        if (_port_free(port) and _port_free(port + 1)
                and not Path(f"/run/vmetafs-nfs/{port}").exists()):
            return port
    pytest.fail("no free pair of TCP ports for an NFS server", pytrace=False)


class NfsServer:
    """nfs-ganesha exporting `export` on 127.0.0.1:port (MOUNT on port+1).

    The state directory is the scripts' default (/run/vmetafs-nfs/PORT), so that the servers of
    concurrent runs see one another and the last one stops the rpcbind the first one started.
    stop() is safe to call at any time (also when the server was killed or never started).
    """

    def __init__(self, export: Path, port: Optional[int] = None):
        self.export = Path(os.path.realpath(export))
        self.port = port or free_port_pair()
        self.state = Path(f"/run/vmetafs-nfs/{self.port}")

    def start(self) -> "NfsServer":
        res = run([NFS_SCRIPTS / "nfs-server-start", self.export, self.port], check=False,
                  timeout=120)
        if res.returncode != 0:
            self.stop()
            pytest.fail(f"nfs-server-start {self.export} {self.port} failed "
                        f"(exit {res.returncode}):\n{out(res)}", pytrace=False)
        return self

    def stop(self) -> None:
        res = run([NFS_SCRIPTS / "nfs-server-stop", self.export, self.port], check=False,
                  timeout=120)
        assert res.returncode == 0, f"nfs-server-stop failed:\n{out(res)}"

    def pid(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state / "ganesha.pid").read_text())
            os.kill(pid, 0)
            return pid
        return None

    def kill(self) -> None:
        """SIGKILL, like a crash: no state is cleaned up; start() again serves the same export."""
        pid = self.pid()
        assert pid is not None, f"no nfs-ganesha running for port {self.port}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.state / "ganesha.log").read_text(errors="replace")[-20000:]
        return ""

    def spec(self, directory: Optional[Path] = None, **args) -> str:
        """The nfs:// spec of `directory` (the export or a directory below it) over NFSv3."""
        path = self.export if directory is None else Path(os.path.realpath(directory))
        assert path == self.export or self.export in path.parents, f"{path} not under the export"
        query = {"nfsport": self.port, "mountport": self.port + 1, "version": 3, **args}
        return f"nfs://127.0.0.1{path}?" + "&".join(f"{k}={v}" for k, v in query.items())

    @contextlib.contextmanager
    def running(self) -> Iterator["NfsServer"]:
        try:
            yield self.start()
        finally:
            self.stop()


_session_nfs: Dict[str, object] = {}  # "base": session temp dir, "server": the shared server


def session_nfs_server() -> NfsServer:
    """The session's shared server, started on first use (stopped by nfs_session_teardown)."""
    if "server" not in _session_nfs:
        base = _session_nfs.get("base")
        assert base is not None, "the nfs backing needs the nfs_session_teardown fixture"
        export = Path(base) / "nfs-export"
        export.mkdir(exist_ok=True)
        server = NfsServer(export)
        _session_nfs["server"] = server
        server.start()
    return _session_nfs["server"]


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "nfs: runs over an nfs:// backing (nfs-ganesha on 127.0.0.1)")


@pytest.fixture(scope="session", autouse=True)
def nfs_session_teardown(tmp_path_factory):
    _session_nfs["base"] = tmp_path_factory.getbasetemp()
    try:
        yield
    finally:
        server = _session_nfs.pop("server", None)
        if server is not None:
            server.stop()


@contextlib.contextmanager
def nfs_backing(scratch: Path) -> Iterator[Backing]:
    server = session_nfs_server()
    # A fresh directory below the shared export: the backing root of this test only.
    root = Path(tempfile.mkdtemp(prefix=f"{scratch.parent.name[:40]}-", dir=server.export))
    root.chmod(0o755)
    yield Backing("nfs", server.spec(root), root)


# kind -> factory(scratch directory) yielding a Backing and tearing down what it started.
BACKING_FACTORIES: Dict[str, Callable[[Path], contextlib.AbstractContextManager]] = {
    "dir": dir_backing,
    "nfs": nfs_backing,
}
BACKING_KINDS = [k for k in os.environ.get("VMETAFS_BACKINGS", "dir").split(",") if k]


@pytest.fixture(params=BACKING_KINDS)
def backing_kind(request) -> str:
    if request.param not in BACKING_FACTORIES:
        pytest.fail(f"unknown backing kind {request.param!r} in VMETAFS_BACKINGS "
                    f"(known: {', '.join(BACKING_FACTORIES)})", pytrace=False)
    return request.param


@pytest.fixture
def make_backing(backing_kind, tmp_path) -> Iterator[Callable[[str], Backing]]:
    """make_backing(name) -> a fresh, empty Backing of the test's kind."""
    with contextlib.ExitStack() as stack:
        def factory(name: str = "backing") -> Backing:
            scratch = tmp_path / name
            scratch.mkdir()
            return stack.enter_context(BACKING_FACTORIES[backing_kind](scratch))
        yield factory


@pytest.fixture
def backing(make_backing) -> Backing:
    return make_backing("backing")


# --------------------------------------------------------------------------------------------
# Daemon


def daemon_command(backing_spec: str, mnt, store, opts: Sequence[str] = ()) -> List[str]:
    options = ",".join([f"store={store}", *opts])
    return [str(binary("vmetafs")), str(backing_spec), str(mnt), "-o", options, "-f"]


class Mount:
    """One vmetafs mount point and store, started and stopped as often as a test needs.

    log() is the current (or last) run's stderr; every run's stderr is kept in its own file.
    """

    def __init__(self, backing: Backing, mnt: Path, store: Path, logdir: Path, name: str):
        self.backing, self.mnt, self.store = backing, mnt, store
        self.logdir, self.name = logdir, name
        self.proc: Optional[subprocess.Popen] = None
        self.log_files: List[Path] = []
        self.opts: List[str] = []
        mnt.mkdir(parents=True, exist_ok=True)

    # -- lifecycle --
    def start(self, opts: Sequence[str] = ()) -> "Mount":
        assert self.proc is None, "mount already running"
        self.opts = list(opts)
        log = self.logdir / f"{self.name}.{len(self.log_files) + 1}.log"
        self.log_files.append(log)
        cmd = daemon_command(self.backing.spec, self.mnt, self.store, self.opts)
        with open(log, "wb") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        deadline = time.monotonic() + READY_TIMEOUT
        while mount_count(self.mnt) == 0:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                pytest.fail(f"vmetafs exited with {rc} before mounting {self.mnt}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.cleanup()
                pytest.fail(f"vmetafs did not mount {self.mnt} within {READY_TIMEOUT}s:\n"
                            f"{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Unmounts with fusermount3 -u; the daemon must exit 0 and report no sanitizer error."""
        assert self.proc is not None, "mount not running"
        res = run(["fusermount3", "-u", self.mnt], check=False)
        assert res.returncode == 0, f"fusermount3 -u {self.mnt} failed:\n{out(res)}\n{self.log()}"
        self._expect_clean_exit("fusermount3 -u")

    def terminate(self) -> None:
        """Stops the daemon with SIGTERM; it must unmount and exit 0."""
        assert self.proc is not None, "mount not running"
        self.proc.send_signal(signal.SIGTERM)
        self._expect_clean_exit("SIGTERM")

    def restart(self, opts: Optional[Sequence[str]] = None) -> "Mount":
        self.stop()
        return self.start(self.opts if opts is None else opts)

    @contextlib.contextmanager
    def running(self, opts: Sequence[str] = ()) -> Iterator["Mount"]:
        self.start(opts)
        yield self
        self.stop()

    def _expect_clean_exit(self, how: str) -> None:
        proc = self.proc
        try:
            rc = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"vmetafs did not exit within {EXIT_TIMEOUT}s after {how}:\n{self.log()}")
        self.proc = None
        log = self.log()
        assert rc == 0, f"vmetafs exited with {rc} after {how}:\n{log}"
        assert mount_count(self.mnt) == 0, f"{self.mnt} still mounted after {how}"
        marker = sanitizer_report(log)
        assert marker is None, f"sanitizer report ({marker}) in the daemon log:\n{log}"

    def cleanup(self) -> bool:
        """Forcibly ends this mount if it is still up; True if anything had to be done."""
        forced = False
        if mount_count(self.mnt):
            force_unmount(self.mnt)
            forced = True
        if self.proc is not None:
            forced = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=EXIT_TIMEOUT)
            self.proc = None
        return forced

    # -- observation --
    @property
    def running_now(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def daemon_state(self) -> str:
        """How the last daemon is doing: running, stopped by the test, or exited by itself."""
        if self.proc is None:
            return "not running (stopped by the test or never started)"
        rc = self.proc.poll()
        if rc is None:
            return f"running (pid {self.proc.pid})"
        if rc < 0:
            return f"died of signal {signal.Signals(-rc).name} (pid {self.proc.pid})"
        return f"exited with {rc} (pid {self.proc.pid})"

    def log(self) -> str:
        return self.log_files[-1].read_text(errors="replace") if self.log_files else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_files)

    def decisions(self, image_name: str) -> List[str]:
        return decisions(self.log(), image_name)

    def __truediv__(self, name) -> Path:
        return self.mnt / name


@pytest.fixture
def make_mount(request, tmp_path) -> Iterator[Callable[..., Mount]]:
    """make_mount(backing, name='m', store=None) -> a Mount (not started) with its own store."""
    created: List[Mount] = []
    request.node.vmetafs_mounts = created

    def factory(backing: Backing, name: str = "m", store: Optional[Path] = None) -> Mount:
        assert all(m.name != name for m in created), f"mount name {name} used twice"
        m = Mount(backing, tmp_path / f"{name}.mnt", store or tmp_path / f"{name}.store",
                  tmp_path, name)
        created.append(m)
        return m

    yield factory
    # A test that passed but left its daemon running is stopped normally (and must exit cleanly);
    # after a failure, whatever is left is forced down.
    passed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.passed
    failures = []
    for m in created:
        if m.running_now and passed:
            try:
                m.stop()
            except BaseException as e:  # report after every mount is down
                failures.append(f"{m.name}: {e}")
        m.cleanup()
    assert not failures, "\n".join(failures)


@pytest.fixture
def mount(make_mount, backing) -> Mount:
    return make_mount(backing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.failed:
        for m in getattr(item, "vmetafs_mounts", []):
            report.sections.append((f"vmetafs {m.name} daemon", m.daemon_state()))
            for i, log in enumerate(m.log_files, 1):
                if log.exists():
                    report.sections.append((f"vmetafs {m.name} run {i} ({log})",
                                            log.read_text(errors="replace")[-20000:]))
        for server in getattr(item, "nfs_servers", []):
            lines = [l for l in server.log().splitlines() if ":DBUS :" not in l]
            report.sections.append((f"nfs-ganesha on port {server.port} (its last start)",
                                    "\n".join(lines[-60:])))


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    yield
    left = vmetafs_mounts(under=base)
    for m in left:
        force_unmount(m)
    assert not left, f"fuse.vmetafs mounts left behind: {left}"


def start_expecting_refusal(cmd: Sequence[str], mnt, log: Path) -> str:
    """Runs a daemon command that must fail: non-zero exit, a message, no mount of `mnt` added.

    Returns its stderr. A daemon that mounts anyway is unmounted and the test fails.
    """
    before = mount_count(mnt)
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=f)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while proc.poll() is None:
        accepted = mount_count(mnt) > before
        if accepted or time.monotonic() > deadline:
            if accepted:
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if mount_count(mnt) > before:
                force_unmount(mnt)
            pytest.fail(f"{' '.join(map(str, cmd))} "
                        f"{'mounted' if accepted else 'kept running'} instead of refusing:\n"
                        f"{log.read_text(errors='replace')}")
        time.sleep(0.05)
    rc = proc.returncode
    text = log.read_text(errors="replace")
    assert rc != 0, f"{' '.join(map(str, cmd))} exited 0 instead of refusing:\n{text}"
    assert mount_count(mnt) == before, f"{mnt} left mounted after a refused start:\n{text}"
    assert text.strip(), f"{' '.join(map(str, cmd))} failed without a message"
    marker = sanitizer_report(text)
    assert marker is None, f"sanitizer report ({marker}):\n{text}"
    return text
