#!/usr/bin/python3
"""vmetafs over nfs:// against the same NFS server reached through libnfs directly.

Started by tools/bench/run.sh after the local benchmark (skip it with `--skip nfs`). One
nfs-ganesha on 127.0.0.1 (mount-scripts/nfs-server-start) exports one directory; side by side, in
alternating repetitions (medians of --reps):
  - libnfs: `nfs-cp` (sequential copy) and qemu-img's own nfs:// driver (`qemu-img bench`), both
    libnfs clients with no FUSE in the way: the limit;
  - vmetafs: `vmetafs nfs://... MNT` (journal on, sync=flush) and the same with journal=off, read
    and written through the mount with O_DIRECT.
Where the time goes: CPU seconds per operation of the client, the vmetafs daemon and the server
during the 4 KiB write runs (on 2 cores, CPU is the limit), and the latency each adds.
Writes BUILD/bench-nfs.json and prints a table.
"""
import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import time

from bench import drop_file_cache, log, run  # the local benchmark, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "mount-scripts")
CLK_TCK = os.sysconf("SC_CLK_TCK")




def free_port_pair():
    for port in range(43000, 60000, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        if not os.path.exists(f"/run/vmetafs-nfs/{port}"):
            return port
    raise RuntimeError("no free pair of ports for the NFS server")


def cpu_seconds(pid):
    """utime + stime of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK



def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Server:
    def __init__(self, export):
        self.export, self.port = export, free_port_pair()

    def start(self):
        run([os.path.join(SCRIPTS, "nfs-server-start"), self.export, str(self.port)])
        with open(f"/run/vmetafs-nfs/{self.port}/ganesha.pid") as f:
            self.pid = int(f.read())
        return self

    def stop(self):
        run([os.path.join(SCRIPTS, "nfs-server-stop"), self.export, str(self.port)], check=False)

    def registered(self):
        """qemu's nfs driver finds MOUNT through rpcbind: is it this server that is registered?"""
        p = run(["rpcinfo", "-p", "127.0.0.1"], check=False)
        return any(line.split()[:4] == ["100005", "3", "tcp", str(self.port + 1)]
                   for line in p.stdout.splitlines())

    def url(self, name=""):
        path = self.export + ("/" + name if name else "")
        return f"nfs://127.0.0.1{path}?nfsport={self.port}&mountport={self.port + 1}&version=3"


class NfsMount:
    """vmetafs over the server's nfs:// URL."""

    def __init__(self, name, opts, server, work, build):
        self.name, self.opts, self.server, self.build = name, opts, server, build
        self.mnt = os.path.join(work, "mnt-" + name)
        self.store = os.path.join(work, "store-" + name)
        self.logf = os.path.join(work, name + ".log")
        self.proc = None

    def start(self):
        shutil.rmtree(self.store, ignore_errors=True)
        os.makedirs(self.mnt, exist_ok=True)
        opts = ",".join(["store=" + self.store] + ([self.opts] if self.opts else []))
        with open(self.logf, "a") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.build, "bin", "vmetafs"), self.server.url(), self.mnt, "-o",
                 opts, "-f"], stdout=log, stderr=log)
        deadline = time.time() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{self.name} did not mount (see {self.logf})")
            time.sleep(0.05)
        return self

    def stop(self):
        if os.path.ismount(self.mnt):
            if run(["fusermount3", "-u", self.mnt], check=False).returncode != 0:
                run(["fusermount3", "-u", "-z", self.mnt], check=False)
        if self.proc is not None:
            self.proc.wait(timeout=60)
            self.proc = None


def timed(cmd, pids):
    """Runs cmd; returns (seconds, CPU seconds of cmd and of each pid) or raises."""
    before = [cpu_seconds(p) for p in pids]
    child0 = children_cpu()
    t0 = time.monotonic()
    p = run(cmd, check=False)
    elapsed = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {(p.stderr or p.stdout).strip()[-300:]}")
    cpu = [children_cpu() - child0] + [cpu_seconds(p) - b for p, b in zip(pids, before)]
    return elapsed, cpu, p.stdout


def qemu_bench_cmd(target, write, count, cache="none"):
    return (["qemu-img", "bench", "-f", "qcow2", "-t", cache, "-d", "16", "-s", "4096",
             "-c", str(count)] + (["-w"] if write else []) + [target])


def qemu_bench(target, write, count, pids, cache="none"):
    secs, cpu, out = timed(qemu_bench_cmd(target, write, count, cache), pids)
    got = re.search(r"Run completed in ([0-9.]+) seconds", out)
    return float(got.group(1)) if got else secs, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="")
    args, _ = ap.parse_known_args()
    if "nfs" in args.skip.split(","):
        return
    work = os.path.join(args.work, "nfs")
    shutil.rmtree(work, ignore_errors=True)
    export = os.path.join(work, "export")
    os.makedirs(export)
    size_mib = 256 if args.quick else 1024
    ops = 20000 if args.quick else 60000

    # The data file is written on the export's directory, then dropped from the page cache.
    big = os.path.join(export, "big.raw")
    run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={size_mib}", "conv=fsync"])
    run(["qemu-img", "create", "-f", "qcow2", "-o", "preallocation=falloc",
        os.path.join(export, "img.qcow2"), "1G"])
    src = os.path.join(work, "local.raw")
    shutil.copyfile(big, src)

    server = Server(export).start()
    mounts = [NfsMount("vmetafs", "", server, work, args.build),
              NfsMount("vmetafs-off", "journal=off", server, work, args.build)]
    results = {}  # workload -> system -> list of (value, cpu per op by process)
    skipped = set()

    def record(workload, system, value, cpu, n):
        results.setdefault(workload, {}).setdefault(system, []).append(
            (value, [c / n for c in cpu]))

    # Both kinds of reader copy into memory (nfs-cp cannot write to /dev/null).
    sink = f"/dev/shm/vmetafs-nfs-bench-{os.getpid()}"
    try:
        for m in mounts:
            m.start()
        for rep in range(args.reps):
            log(f"nfs bench: repetition {rep + 1} of {args.reps}")
            systems = ["libnfs"] + [m.name for m in mounts]
            systems = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in systems:
                m = next((x for x in mounts if x.name == system), None)
                pids = [server.pid] + ([m.proc.pid] if m else [])
                drop_file_cache(big)
                if os.path.exists(sink):
                    os.unlink(sink)
                if m is None:
                    rd = ["nfs-cp", server.url("big.raw"), sink]
                    wr = ["nfs-cp", src, server.url("copy.raw")]
                    target = server.url("img.qcow2").split("?")[0]  # qemu's driver asks rpcbind
                else:
                    rd = ["dd", f"if={m.mnt}/big.raw", f"of={sink}", "bs=1M", "iflag=direct"]
                    wr = ["dd", f"if={src}", f"of={m.mnt}/copy.raw", "bs=1M", "oflag=direct",
                          "conv=fsync"]
                    target = os.path.join(m.mnt, "img.qcow2")
                secs, cpu, _ = timed(rd, pids)
                record("seq-read", system, size_mib / secs, cpu, size_mib)
                secs, cpu, _ = timed(wr, pids)
                record("seq-write", system, size_mib / secs, cpu, size_mib)
                os.unlink(os.path.join(export, "copy.raw"))
                if m is None and not server.registered():
                    skipped.add("rpcbind names another NFS server: qemu's nfs:// driver not run")
                    continue
                for write in (True, False):
                    secs, cpu = qemu_bench(target, write, ops, pids)
                    record("qcow2-4k-write" if write else "qcow2-4k-read", system, ops / secs, cpu,
                           ops)
                if m is None:
                    # Each write stable before the next completes, as vmetafs sends them (FILE_SYNC):
                    # qemu's driver then COMMITs after every write.
                    secs, cpu = qemu_bench(target, True, ops // 10, pids, cache="writethrough")
                    record("qcow2-4k-write", "libnfs-stable", ops // 10 / secs, cpu, ops // 10)
    finally:
        if os.path.exists(sink):
            os.unlink(sink)
        for m in mounts:
            m.stop()
        server.stop()

    doc = {"size_mib": size_mib, "ops": ops, "reps": args.reps, "results": {},
           "skipped": sorted(skipped)}
    for workload, per_system in results.items():
        doc["results"][workload] = {}
        for system, runs in per_system.items():
            cpu = [statistics.median(c[i] for _, c in runs) for i in range(len(runs[0][1]))]
            doc["results"][workload][system] = {
                "median": statistics.median(v for v, _ in runs),
                "cpu_per_op": {"client": cpu[0], "server": cpu[1],
                               **({"vmetafs": cpu[2]} if len(cpu) > 2 else {})}}
    with open(os.path.join(args.build, "bench-nfs.json"), "w") as f:
        json.dump(doc, f, indent=2)
    report(doc)


def num(v):
    return "-" if v is None else f"{v:.0f}"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def report(doc):
    units = {"seq-read": "MiB/s", "seq-write": "MiB/s", "qcow2-4k-write": "IOPS",
             "qcow2-4k-read": "IOPS"}
    print(f"\nvmetafs over nfs:// vs libnfs direct (nfs-cp {doc['size_mib']} MiB; qemu-img bench "
          f"{doc['ops']} x 4 KiB, depth 16; medians of {doc['reps']})")
    print("| workload | libnfs | libnfs, stable writes | vmetafs | vmetafs journal=off "
          "| vmetafs / libnfs | vmetafs / libnfs stable |")
    print("|---|---|---|---|---|---|---|")
    for w, per in doc["results"].items():
        base, stable, v, off = (per.get(s, {}).get("median")
                                for s in ("libnfs", "libnfs-stable", "vmetafs", "vmetafs-off"))
        print(f"| {w} ({units[w]}) | {num(base)} | {num(stable)} | {num(v)} | {num(off)} "
              f"| {ratio(v, base)} | {ratio(v, stable)} |")
    for reason in doc["skipped"]:
        print(f"(skipped: {reason})")
    print("\nCPU per operation (microseconds; per MiB for sequential):")
    print("| workload | system | client | vmetafs daemon | NFS server |")
    print("|---|---|---|---|---|")
    for w, per in doc["results"].items():
        for system, r in per.items():
            c = r["cpu_per_op"]
            daemon = f"{c['vmetafs'] * 1e6:.0f}" if "vmetafs" in c else "-"
            print(f"| {w} | {system} | {c['client'] * 1e6:.0f} | {daemon} | "
                  f"{c['server'] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
