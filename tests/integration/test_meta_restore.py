"""meta-restore, the offline tool: list, verify, restore (also to an earlier version), history,
quarantine, export/import and gc over a store written by a real mount.

Images are written THROUGH the mount (qemu-img create, qemu-io), the daemon is stopped, and damage
is poked directly into the backing file at offsets read from the image's own structures. The tool
runs on the store the daemon left, with no daemon running, except in the tests of its behaviour
beside a live daemon.
"""

import hashlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import (GiB, KiB, MiB, PATTERNS, binary, copy_file, create_image, expected_content,
                      meta_restore, out, poke, qemu_img_check, qemu_img_compare, random_bytes,
                      read_at, run, sanitizer_report, verify_patterns, write_patterns, zero)
from qcow2_layout import Qcow2Layout

ACTIONS = {"baseline", "verified", "restored", "adopted", "refused"}

# Written after the first version: each lands in a 512 MiB region PATTERNS leaves unallocated,
# so it allocates a new L2 table and data clusters, changing the L1 table and refcounts, while
# every guest byte of the first version stays where it was.
LATER_PATTERNS = [
    (200 * MiB, 64 * KiB, 0x91),
    (2700 * MiB, 128 * KiB, 0x92),
    (3 * GiB + 100 * MiB, 64 * KiB, 0x93),
]


def text(res):
    """The result with stdout and stderr decoded; a sanitizer report fails the test."""
    res.stdout = res.stdout.decode(errors="replace")
    res.stderr = res.stderr.decode(errors="replace")
    marker = sanitizer_report(res.stderr)
    assert marker is None, f"sanitizer report ({marker}) from {res.args}:\n{res.stderr}"
    return res


def mr(store, *args, check: bool = False):
    return text(meta_restore("--store", store, *args, check=check))


def mr_json(store, *args):
    res = mr(store, *args, "--json")
    assert res.returncode in (0, 1), f"meta-restore {args} -> {res.returncode}:\n{out(res)}"
    return json.loads(res.stdout), res.returncode


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_images(mount, names, patterns=PATTERNS):
    with mount.running():
        for name in names:
            create_image(mount / name)
            write_patterns(mount / name, patterns=patterns)


def events(store, image) -> List[dict]:
    found, rc = mr_json(store, "history", image)
    assert rc == 0
    return found


def parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


def ranges_equal(a, b, ranges: List[Tuple[int, int]]) -> bool:
    return all(read_at(a, o, n) == read_at(b, o, n) for o, n in ranges)


def test_list_verify_restore_history_quarantine(backing, mount, tmp_path):
    make_images(mount, ["good.qcow2", "bad.qcow2"])
    store = mount.store
    raw, good = backing / "bad.qcow2", backing / "good.qcow2"
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)

    listing = mr(store, "list", check=True)
    assert "good.qcow2" in listing.stdout and "bad.qcow2" in listing.stdout, out(listing)
    images, _ = mr_json(store, "list")
    by_name = {i["image"]: i for i in images}
    assert set(by_name) == {"good.qcow2", "bad.qcow2"}
    for i in images:
        assert i["format"] == "qcow2" and i["virtual_size"] == 4 * GiB, i
        assert i["units"] > 0 and i["bytes"] > 0 and i["last_seq"] > 0, i
        assert i["protection"] == "protected" and i["on_backing"] is True, i

    # Damage: one L2 table overwritten with noise, the way a torn or misdirected write would.
    layout = Qcow2Layout.read(reference)
    l2 = layout.l2_table_offsets()[1]
    noise = random_bytes(layout.cluster_size, seed=0xBAD)
    poke(raw, l2, noise)

    res = mr(store, "verify", "good.qcow2")
    assert res.returncode == 0 and "clean" in res.stdout, out(res)
    res = mr(store, "verify", "bad.qcow2")
    assert res.returncode == 1, out(res)
    assert "DAMAGED" in res.stdout and "L2 table" in res.stdout and str(l2) in res.stdout, out(res)
    assert mr(store, "verify", "good.qcow2", "bad.qcow2").returncode == 1
    report, rc = mr_json(store, "verify", "bad.qcow2")
    assert rc == 1 and report[0]["verdict"] == "damaged", report
    assert [(u["kind"], u["offset"]) for u in report[0]["differing"]] == [("L2 table", l2)]
    assert report[0]["first_open"]["action"] == "restored", report

    # A dry run writes nothing: not the image, not even an event.
    before, history_before = sha256(raw), events(store, "bad.qcow2")
    res = mr(store, "restore", "bad.qcow2", "--dry-run")
    assert res.returncode == 1 and str(l2) in res.stdout and "dry run" in res.stdout, out(res)
    assert sha256(raw) == before
    assert events(store, "bad.qcow2") == history_before

    good_before = sha256(good)
    res = mr(store, "restore", "bad.qcow2")
    assert res.returncode == 0, out(res)
    assert sha256(good) == good_before
    qemu_img_compare(reference, raw)
    qemu_img_check(raw)
    assert read_at(raw, l2, layout.cluster_size) == read_at(reference, l2, layout.cluster_size)
    assert mr(store, "verify", "bad.qcow2").returncode == 0

    history = events(store, "bad.qcow2")
    assert all(e["action"] in ACTIONS for e in history), history
    assert [e["seq"] for e in history] == sorted(e["seq"] for e in history)
    restored = [e for e in history if e["action"] == "restored"]
    assert len(restored) == 1, history
    ev = restored[0]
    assert ev["image"] == "bad.qcow2" and ev["units"] == [
        {"kind": "L2 table", "offset": l2, "length": layout.cluster_size}], ev
    assert abs((datetime.now().astimezone() - parse_time(ev["time"])).total_seconds()) < 24 * 3600
    assert ev["detail"], ev

    # The replaced bytes (the noise) are kept, and can be put back where they were.
    res = mr(store, "quarantine", "bad.qcow2", check=True)
    assert str(ev["seq"]) in res.stdout, out(res)
    undo = tmp_path / "undo.bin"
    res = mr(store, "quarantine", "bad.qcow2", "--extract", str(ev["seq"]), "-o", undo, check=True)
    assert f"skip={l2}" in res.stdout and "dd " in res.stdout, out(res)
    assert read_at(undo, l2, len(noise)) == noise
    assert undo.stat().st_size == l2 + len(noise)

    # The tool left the image closed: the next first open through the mount verifies it.
    with mount.running():
        qemu_img_compare(reference, mount / "bad.qcow2")
        words = mount.decisions("bad.qcow2")
        assert "verified" in words and "restored" not in words and "adopted" not in words, \
            mount.log()


def later_version(mount, backing, tmp_path):
    """v1 written and unmounted, then allocating writes through a remount; returns v1's copy and
    its last sequence number and a time between the two versions."""
    make_images(mount, ["vm.qcow2"])
    raw = backing / "vm.qcow2"
    v1 = tmp_path / "v1.qcow2"
    copy_file(raw, v1)
    (image,), _ = mr_json(mount.store, "list")
    v1_seq = image["last_seq"]
    time.sleep(1.1)  # the journal's clock must move on between the versions (no timing asserted)
    between = time.time()
    time.sleep(1.1)
    with mount.running():
        write_patterns(mount / "vm.qcow2", patterns=LATER_PATTERNS)
    v2 = Qcow2Layout.read(raw)
    assert len(v2.l2_table_offsets()) > len(Qcow2Layout.read(v1).l2_table_offsets())
    return raw, v1, v1_seq, between


def metadata_ranges(layout: Qcow2Layout) -> List[Tuple[int, int]]:
    cs = layout.cluster_size
    return ([(0, cs), layout.l1_table_range, layout.refcount_table_range]
            + [(o, cs) for o in layout.l2_table_offsets()]
            + [(o, cs) for o in layout.refcount_block_offsets()])


@pytest.mark.parametrize("point", ["seq", "unix", "iso"])
def test_restore_at_an_earlier_version(point, backing, mount, tmp_path):
    raw, v1, v1_seq, between = later_version(mount, backing, tmp_path)
    store = mount.store
    at = {"seq": str(v1_seq), "unix": f"@{between:.3f}",
          "iso": datetime.utcfromtimestamp(between).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}[point]
    v1_layout = Qcow2Layout.read(v1)
    assert not ranges_equal(raw, v1, metadata_ranges(v1_layout))

    before = sha256(raw)
    res = mr(store, "restore", "vm.qcow2", "--at", at, "--dry-run")
    assert res.returncode == 0 and "dry run" in res.stdout, out(res)
    assert sha256(raw) == before

    res = mr(store, "restore", "vm.qcow2", "--at", at)
    assert res.returncode == 0, out(res)
    # The metadata is v1's again, and so is the guest's view of the disk.
    assert ranges_equal(raw, v1, metadata_ranges(v1_layout))
    assert Qcow2Layout.read(raw).l1_entries == v1_layout.l1_entries
    qemu_img_check(raw)
    qemu_img_compare(v1, raw)
    verify_patterns(raw, expected_content(PATTERNS))

    history = events(store, "vm.qcow2")
    assert history[-1]["action"] == "restored" and "--at" in history[-1]["detail"], history[-1]
    assert mr(store, "verify", "vm.qcow2").returncode == 0  # the journal follows the storage
    with mount.running():
        qemu_img_compare(v1, mount / "vm.qcow2")
        assert "verified" in mount.decisions("vm.qcow2"), mount.log()


def test_restore_at_a_point_before_the_journal_is_refused(backing, mount, tmp_path):
    make_images(mount, ["vm.qcow2"])
    raw = backing / "vm.qcow2"
    before = sha256(raw)
    res = mr(mount.store, "restore", "vm.qcow2", "--at", "2001-01-01T00:00:00Z")
    assert res.returncode == 1 and "refused" in res.stdout, out(res)
    assert sha256(raw) == before


def test_export_import_into_another_store_heals(backing, mount, make_mount, tmp_path):
    make_images(mount, ["vm.qcow2"])
    raw = backing / "vm.qcow2"
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)
    export = tmp_path / "vm.vmjx"
    res = mr(mount.store, "export", "vm.qcow2", "-o", export, check=True)
    assert export.stat().st_size > 0, out(res)

    # A damaged and a truncated copy are refused, and nothing is created.
    data = export.read_bytes()
    flipped, cut = tmp_path / "flipped.vmjx", tmp_path / "cut.vmjx"
    flipped.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10])
                        + data[len(data) // 2 + 1:])
    cut.write_bytes(data[:len(data) - 100])
    untouched = tmp_path / "never-created.store"
    for bad in (flipped, cut):
        res = mr(untouched, "import", bad, "--backing", backing.spec)
        assert res.returncode == 2, out(res)
        assert "damaged" in res.stderr and "nothing was imported" in res.stderr, out(res)
    assert not untouched.exists()

    # Another host's store: the image is protected there once imported.
    other = tmp_path / "other.store"
    res = mr(other, "import", export, "--backing", backing.spec)
    assert res.returncode == 0, out(res)
    (image,), _ = mr_json(other, "list")
    assert image["image"] == "vm.qcow2" and image["units"] > 0, image

    layout = Qcow2Layout.read(reference)
    off, length = layout.l1_table_range
    zero(raw, off, length)
    assert mr(other, "verify", "vm.qcow2").returncode == 1
    res = mr(other, "restore", "vm.qcow2")
    assert res.returncode == 0, out(res)
    qemu_img_compare(reference, raw)
    qemu_img_check(raw)

    # Importing again replaces the journal, keeping the replaced one's events.
    res = mr(other, "import", export)
    assert res.returncode == 0 and "replaces" in res.stdout, out(res)
    history = events(other, "vm.qcow2")
    assert "restored" in [e["action"] for e in history], history
    assert mr(other, "verify", "vm.qcow2").returncode == 0

    # A daemon on that store protects the image: damage is restored at its first open.
    poke(raw, off, random_bytes(length, seed=7))
    with make_mount(backing, name="other", store=other).running() as m:
        qemu_img_compare(reference, m / "vm.qcow2")
        assert "restored" in m.decisions("vm.qcow2"), m.log()
    qemu_img_compare(reference, raw)


def test_errors_exit_2_with_a_message(backing, mount, tmp_path):
    make_images(mount, ["vm.qcow2"])
    store = mount.store
    res = mr(store, "verify", "nope.qcow2")
    assert res.returncode == 2 and "unknown image nope.qcow2" in res.stderr, out(res)
    res = mr(store, "restore", "nope.qcow2")
    assert res.returncode == 2 and "unknown image" in res.stderr, out(res)
    res = mr(tmp_path / "missing.store", "list")
    assert res.returncode == 2 and "no vmetafs store" in res.stderr, out(res)
    assert not (tmp_path / "missing.store").exists()
    res = mr(tmp_path / "missing.store", "restore", "vm.qcow2")
    assert res.returncode == 2 and not (tmp_path / "missing.store").exists(), out(res)
    res = mr(store, "restore", "vm.qcow2", "--at", "yesterday")
    assert res.returncode == 2 and "ISO 8601" in res.stderr, out(res)
    env = {k: v for k, v in os.environ.items() if k != "VMETAFS_STORE"}
    res = text(run([binary("meta-restore"), "list"], check=False, env=env))
    assert res.returncode == 2 and "--store" in out(res), out(res)
    res = text(run([binary("meta-restore"), "list"], check=False,
                   env={**env, "VMETAFS_STORE": str(store)}))
    assert res.returncode == 0 and "vm.qcow2" in res.stdout, out(res)
    res = mr(store, "frobnicate")
    assert res.returncode == 2, out(res)
    res = text(meta_restore("--help", check=False))
    assert res.returncode == 0 and "Exit codes" in res.stdout and "history_versions" in res.stdout


def test_beside_a_live_daemon(backing, mount, tmp_path):
    mount.start()
    create_image(mount / "vm.qcow2")
    write_patterns(mount / "vm.qcow2")
    store = mount.store
    res = mr(store, "list")
    assert res.returncode == 0 and "vm.qcow2" in res.stdout, out(res)
    assert mr(store, "verify", "vm.qcow2").returncode == 0
    assert mr(store, "history", "vm.qcow2").returncode == 0
    assert mr(store, "restore", "vm.qcow2", "--dry-run").returncode == 0
    assert mr(store, "export", "vm.qcow2", "-o", tmp_path / "x.vmjx").returncode == 0

    for args in (["restore", "vm.qcow2"], ["gc"], ["import", tmp_path / "x.vmjx"]):
        res = mr(store, *args)
        assert res.returncode == 2, out(res)
        msg = res.stderr
        assert "vmetafs daemon" in msg and f"pid {mount.proc.pid}" in msg, msg
        assert f"fusermount3 -u {mount.mnt}" in msg and "next first open" in msg, msg
    assert mount.running_now
    mount.stop()
    assert mr(store, "restore", "vm.qcow2").returncode == 0


def test_gc(backing, mount, tmp_path):
    make_images(mount, ["keep.qcow2", "gone.qcow2"])
    store = mount.store
    (backing / "gone.qcow2").unlink()
    res = mr(store, "gc", "--dry-run", check=True)
    assert "gone.qcow2" in res.stdout and "keep.qcow2" not in res.stdout, out(res)
    assert {i["image"] for i in mr_json(store, "list")[0]} == {"keep.qcow2", "gone.qcow2"}
    res = mr(store, "gc", check=True)
    assert {i["image"] for i in mr_json(store, "list")[0]} == {"keep.qcow2"}
    # The journal of the deleted image is gone; its events are not.
    assert any(e["action"] == "baseline" for e in events(store, "gone.qcow2"))

    (backing / "keep.qcow2").unlink()  # everything gone at once looks like an unmounted backing
    res = mr(store, "gc")
    assert res.returncode == 2 and "--force" in res.stderr, out(res)
    assert {i["image"] for i in mr_json(store, "list")[0]} == {"keep.qcow2"}
    mr(store, "gc", "--force", check=True)
    assert mr_json(store, "list")[0] == []
