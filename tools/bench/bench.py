#!/usr/bin/python3
"""vmetafs benchmark driver (started by tools/bench/run.sh, which builds what it needs).

Every system is mounted over its own backing directory on the same disk, side by side; each
workload runs REPS times, alternating the systems within a repetition, and the median is kept.
Ratios are therefore measured in one run under the same load. Timings on a shared machine are
noisy: compare ratios, not absolute figures, and rerun before drawing conclusions.
"""
import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time

# vmetafs-devfuse is the default sync=flush over /dev/fuse instead of io_uring: what the
# transport changes, side by side (run.sh lets the kernel offer io_uring where it has it).
SYSTEMS = ["bare", "bindfs", "passthrough_ll", "vmetafs-flush", "vmetafs-devfuse",
           "vmetafs-write", "vmetafs-periodic", "vmetafs-off"]
VMETAFS_OPTS = {"vmetafs-flush": "sync=flush",
                "vmetafs-devfuse": "sync=flush,io_uring=off",
                "vmetafs-write": "sync=write",
                "vmetafs-periodic": "sync=periodic:1000",
                "vmetafs-off": "journal=off"}
CACHE_BUDGET_MIB = 8 + 64  # RocksDB block cache + total memtable budget (store/journal_rocks.cc)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def is_mounted(path):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def drop_file_cache(path):
    """Cold-ish cache for one file without touching the rest of the machine's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def failure_text(stderr):
    for needle, name in (("Invalid argument", "EINVAL"), ("Operation not supported", "EOPNOTSUPP"),
                         ("Input/output error", "EIO"), ("Permission denied", "EACCES"),
                         ("No such file", "ENOENT"), ("Function not implemented", "ENOSYS")):
        if needle in stderr:
            return f"fails ({name})"
    return "fails"


class Mount:
    """One system over its own backing directory; bare is the backing directory itself."""

    def __init__(self, name, work, build):
        self.name, self.build, self.work = name, build, work
        self.backing = os.path.join(work, "back-" + name)
        self.mnt = os.path.join(work, "mnt-" + name)
        self.store = os.path.join(work, "store-" + name)
        self.proc = None
        self.path = self.backing if name == "bare" else self.mnt

    def fresh(self):
        for d in (self.backing, self.mnt, self.store):
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        return self

    def start(self, extra_opts=None):
        if self.name == "bare":
            return self
        if self.name == "bindfs":
            run(["bindfs", self.backing, self.mnt])
        else:
            if self.name == "passthrough_ll":
                cmd = [os.path.join(self.build, "passthrough_ll"), "-o", "source=" + self.backing,
                       self.mnt, "-f"]
            else:
                opts = "store=" + self.store
                o = extra_opts or VMETAFS_OPTS.get(self.name, "")
                if o:
                    opts += "," + o
                cmd = [os.path.join(self.build, "bin", "vmetafs"), self.backing, self.mnt, "-o",
                       opts, "-f"]
            self.errlog = open(os.path.join(self.work, self.name + ".log"), "a")
            self.proc = subprocess.Popen(cmd, stdout=self.errlog, stderr=self.errlog)
        deadline = time.time() + 60
        while not is_mounted(self.mnt):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before mounting")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not mount")
            time.sleep(0.05)
        return self

    def stop(self):
        if self.name == "bare":
            return
        if is_mounted(self.mnt):
            p = run(["fusermount3", "-u", self.mnt], check=False)
            if p.returncode != 0:
                time.sleep(1)
                run(["fusermount3", "-u", "-z", self.mnt], check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.errlog.close()

    def pid(self):
        return self.proc.pid if self.proc else None


# ---------------------------------------------------------------- workloads

def qemu_bench(path, args):
    p = run(["qemu-img", "bench", "-f", "qcow2"] + args + [path], check=False)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if p.returncode != 0 or not m:
        return None, failure_text(p.stderr + p.stdout)
    return float(m.group(1)), None


def fio(path, rw, bs, size, runtime):
    p = run(["fio", "--name=bench", "--filename=" + path, "--rw=" + rw, "--bs=" + bs,
             "--direct=1", "--ioengine=libaio", "--iodepth=16", "--size=" + size,
             "--runtime=%d" % runtime, "--time_based", "--output-format=json"], check=False)
    try:
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return None, failure_text(p.stderr + p.stdout)
    if p.returncode != 0 or job.get("error", 0) != 0:
        err = job.get("error", 0)
        return None, "fails (%s)" % errno.errorcode.get(err, err) if err else failure_text(p.stderr)
    return job["write"], None


class Workloads:
    def __init__(self, cfg):
        self.c = cfg
        self.counts = {}

    def list(self):
        return [
            # name, unit, setup(m) -> error, measure(m) -> (value, error)
            ("qcow2 4K write O_DIRECT (prealloc)", "IOPS", self.setup_pre,
             lambda m: self.qb(m, "w-none", "pre.qcow2", ["-w", "-t", "none"])),
            ("qcow2 4K write writeback (prealloc)", "IOPS", self.setup_pre,
             lambda m: self.qb(m, "w-wb", "pre.qcow2", ["-w", "-t", "writeback"])),
            ("qcow2 4K read O_DIRECT (prealloc)", "IOPS", self.setup_pre,
             lambda m: self.qb(m, "r-none", "pre.qcow2", ["-t", "none"])),
            ("qcow2 4K write O_DIRECT allocating (fresh, -S 64K)", "IOPS", None, self.alloc),
            ("fio 1M seq write O_DIRECT (raw)", "MB/s", self.setup_raw,
             lambda m: self.fio_run(m, "write", "1M", lambda w: w["bw_bytes"] / 1e6)),
            ("fio 4K rand write O_DIRECT (raw)", "IOPS", self.setup_raw,
             lambda m: self.fio_run(m, "randwrite", "4k", lambda w: w["iops"])),
        ]

    def setup_pre(self, m):
        f = os.path.join(m.path, "pre.qcow2")
        if not os.path.exists(f):
            p = run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", f,
                     self.c["pre_size"]], check=False)
            if p.returncode != 0:
                return failure_text(p.stderr)
        return None

    def qb(self, m, key, name, args, extra_setup=None):
        """qemu-img bench, 4 KiB at depth 16, with a count sized per system to run ~target s
        (a first, untimed run calibrates it: the systems differ by 30x)."""
        base = ["-s", "4096", "-d", "16"] + args
        if (key, m.name) not in self.counts:
            if extra_setup:
                err = extra_setup()
                if err:
                    return None, err
            n0 = self.c["calib_count"]
            secs, err = qemu_bench(os.path.join(m.path, name), base + ["-c", str(n0)])
            if err:
                return None, err
            n = int(n0 / max(secs, 1e-3) * self.c["target_seconds"])
            self.counts[(key, m.name)] = max(n0, min(n, self.c["max_count"]))
        if extra_setup:
            err = extra_setup()
            if err:
                return None, err
        n = self.counts[(key, m.name)]
        secs, err = qemu_bench(os.path.join(m.path, name), base + ["-c", str(n)])
        return (n / secs if secs else None), err

    def alloc(self, m):
        f = os.path.join(m.path, "fresh.qcow2")

        def create():
            if os.path.exists(f):
                os.unlink(f)
            p = run(["qemu-img", "create", "-q", "-f", "qcow2", f, self.c["fresh_size"]],
                    check=False)
            return failure_text(p.stderr) if p.returncode != 0 else None

        r = self.qb(m, "alloc", "fresh.qcow2", ["-w", "-t", "none", "-S", "65536"], create)
        if os.path.exists(f):
            os.unlink(f)
        return r

    def setup_raw(self, m):
        f = os.path.join(m.path, "raw.img")
        if not os.path.exists(f):
            p = run(["fio", "--name=layout", "--filename=" + f, "--size=" + self.c["raw_size"],
                     "--rw=write", "--bs=1M", "--create_only=1"], check=False)
            if p.returncode != 0:
                return failure_text(p.stderr)
        return None

    def fio_run(self, m, rw, bs, pick):
        w, err = fio(os.path.join(m.path, "raw.img"), rw, bs, self.c["raw_size"],
                     self.c["fio_runtime"])
        return (pick(w) if w else None), err


def run_order(rep, reps):
    """The systems' order in repetition `rep`: rotated by an even share of the list per repetition
    and reversed every other one, so that over the repetitions each system runs early and late and
    before and after each neighbour (a disk that slows down after a burst of writes, or a
    workload's cleanup still running, then weighs on all systems alike)."""
    n, reps = len(SYSTEMS), max(reps, 1)
    shift = rep * ((n + reps - 1) // reps) % n
    order = SYSTEMS[shift:] + SYSTEMS[:shift]
    return order[::-1] if rep % 2 else order


def run_workloads(mounts, cfg, reps, only):
    results = {}
    for name, unit, setup, measure in Workloads(cfg).list():
        if only and not any(o in name for o in only):
            continue
        log(f"== {name}")
        entry = {"unit": unit, "higher_is_better": True, "systems": {}}
        setup_err = {}
        for s, m in mounts.items():
            setup_err[s] = setup(m) if setup else None
            entry["systems"][s] = {"runs": [], "error": setup_err[s]}
        for rep in range(reps):
            order = run_order(rep, reps)
            for s in order:
                e = entry["systems"][s]
                if e["error"]:
                    continue
                v, err = measure(mounts[s])
                if err:
                    e["error"] = err
                else:
                    e["runs"].append(v)
                log(f"   rep {rep} {s:17s} {v if v is None else round(v, 1)} {err or ''}")
        for s, e in entry["systems"].items():
            e["median"] = statistics.median(e["runs"]) if e["runs"] and not e["error"] else None
        bare = entry["systems"]["bare"]["median"]
        bind = entry["systems"]["bindfs"]["median"]
        for e in entry["systems"].values():
            v = e["median"]
            e["ratio_bare"] = v / bare if v and bare else None
            e["ratio_bindfs"] = v / bind if v and bind else None
        results[name] = entry
    return results


# ---------------------------------------------------------------- first open of a large image

def qcow2_l2_ranges(path):
    with open(path, "rb") as f:
        h = f.read(72)
        (magic, _ver, _bfo, _bfs, cbits, _size, _crypt, l1_size, l1_off, _rt_off, _rt_cl, _ns,
         _so) = struct.unpack(">IIQIIQIIQQIIQ", h)
        assert magic == 0x514649FB, "not a qcow2 image"
        f.seek(l1_off)
        l1 = struct.unpack(">%dQ" % l1_size, f.read(8 * l1_size))
    cs = 1 << cbits
    return [(e & 0x00FFFFFFFFFFFE00, cs) for e in l1 if e & 0x00FFFFFFFFFFFE00]


def read_ranges(path, ranges):
    drop_file_cache(path)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    t = time.monotonic()
    try:
        for off, n in ranges:
            h.update(os.pread(fd, n, off))
    finally:
        os.close(fd)
    return time.monotonic() - t, h.hexdigest()


def timed_info(path, cold_file=None):
    if cold_file:
        drop_file_cache(cold_file)
    t = time.monotonic()
    p = run(["qemu-img", "info", path], check=False)
    dt = time.monotonic() - t
    if p.returncode != 0:
        raise RuntimeError("qemu-img info %s: %s" % (path, p.stderr.strip()))
    return dt


def zero_ranges(path, ranges):
    fd = os.open(path, os.O_WRONLY)
    try:
        zero = bytes(max(n for _, n in ranges))
        for off, n in ranges:
            os.pwrite(fd, zero[:n], off)
        os.fsync(fd)
    finally:
        os.close(fd)


FIRST_OPEN_TIMES = ("baseline_open_seconds", "verify_open_seconds", "restore_open_seconds",
                    "baseline_seconds", "verify_seconds", "verify_warm_seconds", "restore_seconds")


def timed_open(path, cold_file=None):
    """One open(2) through the mount: one first open, which verifies (or restores) before it
    returns."""
    if cold_file:
        drop_file_cache(cold_file)
    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    dt = time.monotonic() - t
    os.close(fd)
    return dt


def first_open_once(m, img, ranges, digest):
    """One round on fresh stores: baseline, verify (cold and warm), restore after the L2 tables
    were zeroed on the backing, checked byte for byte. Each step is timed twice: as one open(2)
    through the mount (one first open, the figure the targets name) and as a `qemu-img info`,
    which opens the image twice (format probe, then the open): the second of those is a first
    open too and verifies again, with a warm cache."""
    r = {}
    mp = os.path.join(m.mnt, "big.qcow2")

    def fresh_store():
        m.stop()
        shutil.rmtree(m.store, ignore_errors=True)
        m.start("sync=flush")

    def restored():
        _, after = read_ranges(img, ranges)
        return after == digest

    fresh_store()
    r["baseline_open_seconds"] = timed_open(mp, img)
    r["verify_open_seconds"] = timed_open(mp, img)
    r["verify_seconds"] = timed_info(mp, img)
    r["verify_warm_seconds"] = timed_info(mp)
    fresh_store()
    r["baseline_seconds"] = timed_info(mp, img)
    m.stop()
    zero_ranges(img, ranges)
    m.start("sync=flush")
    r["restore_open_seconds"] = timed_open(mp, img)
    m.stop()
    correct = restored()
    zero_ranges(img, ranges)
    m.start("sync=flush")
    r["restore_seconds"] = timed_info(mp, img)
    m.stop()
    r["restore_correct"] = correct and restored()
    return r


def first_open(work, build, cfg, reps):
    log("== first open of a large image")
    m = Mount("vmetafs-big", work, build).fresh()
    img = os.path.join(m.backing, "big.qcow2")
    t = time.monotonic()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "preallocation=metadata,cluster_size=65536", img, cfg["big_size"]])
    r = {"virtual_size": cfg["big_size"], "create_seconds": time.monotonic() - t, "reps": reps}
    ranges = qcow2_l2_ranges(img)
    r["l2_tables"] = len(ranges)
    r["l2_bytes"] = sum(n for _, n in ranges)
    r["limit_read_l2_seconds"], digest = read_ranges(img, ranges)
    r["limit_qemu_info_bare_seconds"] = timed_info(img, img)
    x = json.loads(run([os.path.join(build, "xxh3_speed"), str(cfg["xxh_mib"])]).stdout)
    r["limit_xxh3_GBps"] = x["bytes"] / x["seconds"] / 1e9
    try:
        # Single runs on a shared machine vary by 2x: medians of `reps` rounds, each on a fresh
        # store, with the runs kept.
        rounds = []
        for rep in range(reps):
            rounds.append(first_open_once(m, img, ranges, digest))
            log("   rep %d %s" % (rep, " ".join("%s %.3f" % (k.replace("_seconds", ""), v)
                                             for k, v in rounds[-1].items()
                                             if k.endswith("_seconds"))))
        for k in FIRST_OPEN_TIMES:
            r[k + "_runs"] = [x[k] for x in rounds]
            r[k] = statistics.median(r[k + "_runs"])
        r["restore_correct"] = all(x["restore_correct"] for x in rounds)
        lst = json.loads(run([os.path.join(build, "bin", "meta-restore"), "--store", m.store,
                              "list", "--json"]).stdout)
        ent = [e for e in lst if e["image"].endswith("big.qcow2")][0]
        r["journal_units"], r["journal_metadata_bytes"] = ent["units"], ent["bytes"]
        r["store_du_bytes"] = int(run(["du", "-sb", m.store]).stdout.split()[0])
        r["store_per_metadata_byte"] = r["store_du_bytes"] / max(1, r["journal_metadata_bytes"])
        r["verify_open_MBps"] = r["journal_metadata_bytes"] / r["verify_open_seconds"] / 1e6
        r["verify_MBps"] = r["journal_metadata_bytes"] / r["verify_seconds"] / 1e6
        r["verify_l2_MBps"] = r["l2_bytes"] / r["verify_seconds"] / 1e6
        r["limit_read_l2_MBps"] = r["l2_bytes"] / r["limit_read_l2_seconds"] / 1e6
    finally:
        m.stop()
        shutil.rmtree(m.backing, ignore_errors=True)
    return r


# ---------------------------------------------------------------- daemon memory

def vm_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def memory(work, build, count):
    log("== daemon memory")
    m = Mount("vmetafs-rss", work, build).fresh()
    for i in range(count):
        run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(m.backing, "s%03d.qcow2" % i),
             "1G"])
    r = {"images": count}
    fds = []
    try:
        m.start("sync=flush")
        time.sleep(0.5)
        r["idle"] = vm_status(m.pid())
        for i in range(count):
            fds.append(os.open(os.path.join(m.mnt, "s%03d.qcow2" % i), os.O_RDWR))
            if i == 0:
                time.sleep(0.5)
                r["open_1"] = vm_status(m.pid())
        time.sleep(0.5)
        r["open_%d" % count] = vm_status(m.pid())
    finally:
        for fd in fds:
            os.close(fd)
        m.stop()
        shutil.rmtree(m.backing, ignore_errors=True)
    r["cache_budget_MiB"] = CACHE_BUDGET_MIB
    return r


# ---------------------------------------------------------------- profile of the daemon

def profile(mounts, cfg, build):
    """perf and strace of vmetafs-flush during the allocating workload (not part of the timings)."""
    log("== profile (allocating workload on vmetafs-flush)")
    m = mounts["vmetafs-flush"]
    wl = Workloads(cfg)
    out = {}
    data = os.path.join(build, "bench-perf.data")
    perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", data, "-p", str(m.pid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    wl.alloc(m)
    perf.send_signal(2)
    perf.wait()
    rep = run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym",
               "--percent-limit", "1.5", "-g", "none"], check=False).stdout
    out["perf"] = [line for line in rep.splitlines() if line.strip() and not line.startswith("#")]
    st = subprocess.Popen(["strace", "-c", "-f", "-p", str(m.pid())],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    wl.alloc(m)
    st.send_signal(2)
    out["strace"] = [l for l in st.communicate()[1].splitlines()
                     if not l.startswith("strace:")][:20]
    return out


# ---------------------------------------------------------------- report

def fmt(v, unit=""):
    if v is None:
        return "-"
    return ("%.0f" % v if v >= 100 else "%.2f" % v) + unit


def targets(res, fo, mem):
    def ratio(wl, key):
        e = res.get(wl, {}).get("systems", {}).get("vmetafs-flush")
        return e and e.get(key)

    t = []

    def add(what, measured, ok, shown):
        t.append({"target": what, "measured": shown,
                  "met": None if measured is None else bool(ok)})

    pre = "qcow2 4K write O_DIRECT (prealloc)"
    alloc = "qcow2 4K write O_DIRECT allocating (fresh, -S 64K)"
    seq = "fio 1M seq write O_DIRECT (raw)"
    for wl, lo_bind, lo_bare in ((pre, 2.0, 0.4), (alloc, 1.1, 0.8)):
        if wl in res:
            rb, rr = ratio(wl, "ratio_bindfs"), ratio(wl, "ratio_bare")
            add(f"{wl}, sync=flush >= {lo_bind}x bindfs", rb, rb and rb >= lo_bind,
                fmt(rb, "x"))
            add(f"{wl}, sync=flush >= {lo_bare}x bare", rr, rr and rr >= lo_bare, fmt(rr, "x"))
    if seq in res:
        rr = ratio(seq, "ratio_bare")
        add(f"{seq}, sync=flush >= 0.8x bare", rr, rr and rr >= 0.8, fmt(rr, "x"))
    if fo:
        # The targets name one first open: the open(2) figures.
        add("verify of the large image >= 1 GB/s of metadata", fo["verify_open_MBps"],
            fo["verify_open_MBps"] >= 1000, fmt(fo["verify_open_MBps"], " MB/s"))
        add("restore of all its L2 tables < 1 s", fo["restore_open_seconds"],
            fo["restore_open_seconds"] < 1 and fo["restore_correct"],
            fmt(fo["restore_open_seconds"], " s") + ("" if fo["restore_correct"] else " (WRONG)"))
        add("baseline (first open, fresh store) < 2 s", fo["baseline_open_seconds"],
            fo["baseline_open_seconds"] < 2, fmt(fo["baseline_open_seconds"], " s"))
        add("journal on disk <= 1.3x metadata (+ history)", fo["store_per_metadata_byte"],
            fo["store_per_metadata_byte"] <= 1.3, fmt(fo["store_per_metadata_byte"], "x"))
    if mem:
        k = "open_%d" % mem["images"]
        rss = mem[k]["VmRSS"]
        add(f"RSS with {mem['images']} images <= 64 MiB + cache budget "
            f"({CACHE_BUDGET_MIB} MiB)", rss, rss <= 64 + CACHE_BUDGET_MIB, fmt(rss, " MiB"))
    return t


def print_report(doc):
    print("\nvmetafs benchmark - %s; %d repetitions per cell, systems alternated, medians."
          % (doc["meta"]["mode"], doc["meta"]["reps"]))
    print("NOTE: timings on a shared, loaded machine are noisy (load average %s at start, %s at "
          "end); compare ratios measured side by side, not absolute values."
          % (doc["meta"]["load_start"], doc["meta"]["load_end"]))
    for wl, e in doc["workloads"].items():
        print("\n%s [%s]" % (wl, e["unit"]))
        print("  %-17s %12s %9s %9s   %s" % ("system", "median", "x bare", "x bindfs", "runs"))
        for s in SYSTEMS:
            x = e["systems"][s]
            if x["error"]:
                print("  %-17s %12s" % (s, x["error"]))
                continue
            print("  %-17s %12s %9s %9s   %s" % (s, fmt(x["median"]), fmt(x["ratio_bare"]),
                                                fmt(x["ratio_bindfs"]),
                                                " ".join(fmt(v) for v in x["runs"])))
    fo = doc.get("first_open")
    if fo:
        print("\nFirst open of a %s qcow2 (preallocation=metadata, %d L2 tables = %.0f MiB), "
              "median of %d" % (fo["virtual_size"], fo["l2_tables"], fo["l2_bytes"] / 2**20,
                                fo["reps"]))
        print("  one open(2) through the mount (one first open):")
        for k in FIRST_OPEN_TIMES[:3]:
            runs = " ".join("%.3f" % v for v in fo.get(k + "_runs", []))
            print("    %-30s %8.3f s   %s" % (k, fo[k], runs))
        print("  qemu-img info through the mount (two first opens, the second warm):")
        for k in FIRST_OPEN_TIMES[3:]:
            runs = " ".join("%.3f" % v for v in fo.get(k + "_runs", []))
            print("    %-30s %8.3f s   %s" % (k, fo[k], runs))
        for k in ("limit_read_l2_seconds", "limit_qemu_info_bare_seconds"):
            print("  %-32s %8.3f s" % (k, fo[k]))
        print("  %-32s %8.0f MB/s one open, %.0f MB/s qemu-img info (L2 only: %.0f MB/s); "
              "limits: read %.0f MB/s, XXH3 %.1f GB/s"
              % ("verify metadata rate", fo["verify_open_MBps"], fo["verify_MBps"],
                 fo["verify_l2_MBps"], fo["limit_read_l2_MBps"], fo["limit_xxh3_GBps"]))
        print("  restore correct (L2 tables identical to before zeroing): %s"
              % fo["restore_correct"])
        print("  journal: %d units, %d bytes of metadata; store on disk %d bytes (%.2fx)"
              % (fo["journal_units"], fo["journal_metadata_bytes"], fo["store_du_bytes"],
                 fo["store_per_metadata_byte"]))
    mem = doc.get("memory")
    if mem:
        print("\nDaemon memory (VmRSS / VmHWM, MiB): idle %.1f/%.1f; 1 image open %.1f/%.1f; "
              "%d images open %.1f/%.1f" % (
                  mem["idle"]["VmRSS"], mem["idle"]["VmHWM"], mem["open_1"]["VmRSS"],
                  mem["open_1"]["VmHWM"], mem["images"], mem["open_%d" % mem["images"]]["VmRSS"],
                  mem["open_%d" % mem["images"]]["VmHWM"]))
    print("\nTargets (vmetafs sync=flush unless stated):")
    for t in doc["targets"]:
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        print("  %-72s %14s  %s" % (t["target"], t["measured"], met))
    prof = doc.get("profile")
    if prof:
        print("\nProfile of the daemon during the allocating workload (perf, >1.5%):")
        for line in prof["perf"][:25]:
            print("  " + line)
        print("strace -c:")
        for line in prof["strace"]:
            print("  " + line)


def plot(doc, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (python3-matplotlib): no chart")
        return
    wls = list(doc["workloads"])
    systems = [s for s in SYSTEMS if s != "bare"]
    fig, ax = plt.subplots(figsize=(13, 5.5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs, ys, fails = [], [], []
        for j, wl in enumerate(wls):
            e = doc["workloads"][wl]["systems"][s]
            x = j + (i - (len(systems) - 1) / 2) * width
            if e["error"]:
                fails.append(x)
            else:
                xs.append(x)
                ys.append(e["ratio_bare"] or 0)
        ax.bar(xs, ys, width, label=s)
        for x in fails:
            ax.text(x, 0.02, "fails", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(wls)))
    ax.set_xticklabels([w.replace(" (", "\n(") for w in wls], fontsize=7)
    ax.set_ylabel("throughput / bare directory")
    ax.set_title("vmetafs benchmark (%s, medians of %d; shared machine: noisy)"
                 % (doc["meta"]["mode"], doc["meta"]["reps"]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer ops, smaller images")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of workload name fragments")
    ap.add_argument("--skip", default="", help="comma list of: workloads,first-open,memory")
    ap.add_argument("--profile", action="store_true", help="perf + strace -c of the daemon")
    a = ap.parse_args()
    # max_count * 64 KiB must fit in fresh_size (the allocating run steps one cluster per write).
    cfg = {"calib_count": 1000, "target_seconds": 4, "max_count": 250000, "pre_size": "256M",
           "fresh_size": "16G", "raw_size": "256M", "fio_runtime": 5, "big_size": "1T",
           "xxh_mib": 1024, "images": 100}
    if a.quick:
        cfg.update(target_seconds=2, fio_runtime=2, xxh_mib=256)
    skip = set(filter(None, a.skip.split(",")))
    os.makedirs(a.work, exist_ok=True)
    doc = {"meta": {"mode": "quick" if a.quick else "full", "reps": a.reps, "config": cfg,
                    "load_start": os.getloadavg()[0],
                    "note": "timings on a shared machine are noisy; ratios are measured side by "
                            "side in one run, systems alternated per repetition"}}
    mounts = {}
    try:
        if "workloads" not in skip:
            for s in SYSTEMS:
                mounts[s] = Mount(s, a.work, a.build).fresh().start()
            doc["workloads"] = run_workloads(mounts, cfg, a.reps,
                                             [o for o in a.only.split(",") if o])
            if a.profile:
                doc["profile"] = profile(mounts, cfg, a.build)
            for m in mounts.values():
                m.stop()
        else:
            doc["workloads"] = {}
        doc["first_open"] = (None if "first-open" in skip
                             else first_open(a.work, a.build, cfg, a.reps))
        doc["memory"] = None if "memory" in skip else memory(a.work, a.build, cfg["images"])
    finally:
        for m in mounts.values():
            m.stop()
    doc["meta"]["load_end"] = os.getloadavg()[0]
    doc["targets"] = targets(doc["workloads"], doc["first_open"], doc["memory"])
    with open(os.path.join(a.build, "bench.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print_report(doc)
    if doc["workloads"]:
        plot(doc, os.path.join(a.build, "bench.png"))
    print("\nwrote %s and %s" % (os.path.join(a.build, "bench.json"),
                                 os.path.join(a.build, "bench.png")))
    for s in SYSTEMS:
        shutil.rmtree(os.path.join(a.work, "back-" + s), ignore_errors=True)


if __name__ == "__main__":
    main()
