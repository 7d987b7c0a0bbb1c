"""Changes made to an image outside the mount are adopted, not reverted (DESIGN.md).

Each image is made and written THROUGH the mount, so the journal knows it; then something else
changes it directly on the backing: qemu-img resize, snapshot -c/-d, amend, commit, check -r all,
a replacement file, a convert in place to another format, or another host's qemu-io while the
daemon runs but the image is closed. The
next first open through the mount must say "adopted" with the reason it saw, keep the change
(qemu-img info/compare show it, on the mount and on the backing), and from then on protect the
adopted version: a damage after it is restored to it.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from conftest import (GiB, MORE_PATTERNS, PATTERNS, copy_file, create_image, expected_content,
                      meta_restore, out, qemu_img, qemu_img_check, qemu_img_compare, qemu_io,
                      verify_patterns, write_patterns, zero)
from qcow2_layout import Qcow2Layout
from test_formats import FORMATS, make_created
from test_formats import verify as read_patterns

IMAGE = "vm.qcow2"
# The reasons store/verifier.cc gives for "changed outside the mount".
ANY_REASON = r"size changed|modification time moved|change time moved|file id changed|change attr"


def info(img) -> dict:
    return json.loads(out(qemu_img("info", "--output=json", "-f", "qcow2", img)))


def snapshots(img) -> List[str]:
    return [s["name"] for s in info(img).get("snapshots", [])]


def decision_lines(log: str, name: str) -> List[str]:
    return [line for line in log.splitlines() if f"{name}: " in line and
            re.search(r": (baseline|verified|restored|adopted|refused)\b", line)]


def history(store, name) -> List[dict]:
    res = meta_restore("--store", store, "history", name, "--json")
    return json.loads(res.stdout)


def expect_adopted(mount, name: str, reason: str, since: int = 0) -> None:
    """The first decision of this run (after character `since` of its log) is 'adopted', naming
    `reason`; nothing was restored."""
    lines = decision_lines(mount.log()[since:], name)
    assert lines and ": adopted: " in lines[0], f"{name}: {lines}\n{mount.log()}"
    assert re.search(reason, lines[0]), f"{name}: the reason is not /{reason}/: {lines[0]}"
    assert not any(re.search(r": (restored|refused): ", line) for line in lines), lines
    assert "unprotected" not in mount.log(), mount.log()


def expect_adopted_in_history(store, name: str, reason: str) -> None:
    events = history(store, name)
    adopted = [e for e in events if e["action"] == "adopted"]
    assert adopted and re.search(reason, adopted[-1]["detail"]), events
    assert events[-1]["action"] in ("adopted", "verified"), events


def damage_then_restored(mount, raw: Path, tmp_path: Path, name: str) -> None:
    """The adopted version is the one protected now: zero its L1 table, and get it back."""
    reference = tmp_path / f"{name}.adopted"
    copy_file(raw, reference)
    zero(raw, *Qcow2Layout.read(reference).l1_table_range)
    with mount.running():
        qemu_img_compare(reference, mount / name)
        lines = decision_lines(mount.log(), name)
        assert lines and ": restored: " in lines[0], f"{lines}\n{mount.log()}"
    qemu_img_compare(reference, raw)


# ---- changes made while unmounted ----

@dataclass
class Change:
    make: Callable[[Path, Path], None]  # (raw image, scratch dir): change it on the backing
    shows: Callable[[Path], None]  # asserts the change is visible in an image
    reason: str = ANY_REASON
    prepare: Optional[Callable[[Path], None]] = None  # through the mount, before unmounting
    data_kept: bool = True  # the guest data written through the mount is still there


def resize(raw, _):
    qemu_img("resize", "-f", "qcow2", raw, "+1G")


def shows_5g(img):
    assert info(img)["virtual-size"] == 5 * GiB


def snapshot_create(raw, _):
    qemu_img("snapshot", "-c", "outside", raw)


def shows_snapshot(img):
    assert snapshots(img) == ["outside"]


def snapshot_through_mount(img):
    qemu_img("snapshot", "-c", "inside", img)


def snapshot_delete(raw, _):
    qemu_img("snapshot", "-d", "inside", raw)


def shows_no_snapshot(img):
    assert snapshots(img) == []


def amend_compat(raw, _):
    qemu_img("amend", "-f", "qcow2", "-o", "compat=0.10", raw)


def shows_compat_010(img):
    assert info(img)["format-specific"]["data"]["compat"] == "0.10"


def amend_lazy(raw, _):
    qemu_img("amend", "-f", "qcow2", "-o", "lazy_refcounts=on", raw)


def shows_lazy(img):
    assert info(img)["format-specific"]["data"]["lazy-refcounts"] is True


def leak_a_cluster(img):
    """Through the mount, as a VM that died mid-allocation would leave it: one more cluster at
    the end of the file, counted in the refcount block but referenced by nothing."""
    layout = Qcow2Layout.read(img)
    cs = layout.cluster_size
    cluster = -(-layout.file_size // cs)
    bits = 1 << layout.header.refcount_order
    assert cluster < cs * 8 // bits, "the next cluster must be in the first refcount block"
    with open(img, "r+b") as f:
        f.seek(cluster * cs)
        f.write(bytes(cs))
        f.seek(layout.refcount_block_offsets()[0] + cluster * bits // 8)
        f.write((1).to_bytes(bits // 8, "big"))
        # Flushed, so the leaky refcount block is the journal's committed version (unflushed,
        # the version it replaced would still count as legitimate, and the repair as verified).
        f.flush()
        os.fsync(f.fileno())
    res = qemu_img("check", "-f", "qcow2", img, check=False)
    assert res.returncode == 3 and "1 leaked cluster" in out(res), out(res)


def repair(raw, _):
    res = qemu_img("check", "-r", "all", "-f", "qcow2", raw, check=False)
    assert "Leaked cluster" in out(res) and res.returncode == 0, out(res)


def shows_no_leak(img):
    res = qemu_img("check", "-f", "qcow2", img)
    assert "No errors were found" in out(res), out(res)


def replace(raw, scratch):
    """Another image, made elsewhere, renamed over this one's name."""
    other = scratch / "replacement.qcow2"
    create_image(other, size=3 * GiB)
    qemu_io(other, ["write -P 0xd1 0 1M", "write -P 0xd2 2G 64k"])
    copy_file(other, raw.parent / ".replacement.qcow2")
    os.replace(raw.parent / ".replacement.qcow2", raw)


def shows_replacement(img):
    assert info(img)["virtual-size"] == 3 * GiB
    verify_patterns(img, [(0, 1 << 20, 0xD1), (2 * GiB, 64 << 10, 0xD2)])


CHANGES = {
    "resize": Change(resize, shows_5g, reason=r"size changed from \d+ to \d+"),
    "snapshot-create": Change(snapshot_create, shows_snapshot),
    "snapshot-delete": Change(snapshot_delete, shows_no_snapshot, prepare=snapshot_through_mount),
    "amend-compat-0.10": Change(amend_compat, shows_compat_010),
    "amend-lazy-refcounts": Change(amend_lazy, shows_lazy),
    "check-repair-leaks": Change(repair, shows_no_leak, prepare=leak_a_cluster),
    "replaced-by-another-image": Change(replace, shows_replacement,
                                        reason=r"file was replaced \(file id changed\)",
                                        data_kept=False),
}


@pytest.mark.parametrize("kind", list(CHANGES))
def test_change_while_unmounted_is_adopted(kind, backing, mount, tmp_path):
    change = CHANGES[kind]
    raw = backing / IMAGE
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
        if change.prepare:
            change.prepare(mount / IMAGE)
    change.make(raw, tmp_path)
    qemu_img_check(raw)
    change.shows(raw)

    with mount.running():
        change.shows(mount / IMAGE)  # the first open decides, and keeps the change
        expect_adopted(mount, IMAGE, change.reason)
        if change.data_kept:
            verify_patterns(mount / IMAGE, expected_content(PATTERNS))
        qemu_img_check(mount / IMAGE)
    change.shows(raw)  # nothing was reverted on the storage either
    expect_adopted_in_history(mount.store, IMAGE, change.reason)
    damage_then_restored(mount, raw, tmp_path, IMAGE)
    change.shows(raw)


def test_commit_of_an_overlay_into_its_base_is_adopted(backing, mount, tmp_path):
    base, overlay = "base.qcow2", "overlay.qcow2"
    with mount.running():
        create_image(mount / base)
        write_patterns(mount / base)
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mount / overlay)
        write_patterns(mount / overlay, patterns=MORE_PATTERNS)
    qemu_img("commit", "-f", "qcow2", backing / overlay)
    both = expected_content(PATTERNS, MORE_PATTERNS)
    verify_patterns(backing / base, both)

    with mount.running():
        verify_patterns(mount / base, both)  # the commit is kept
        expect_adopted(mount, base, ANY_REASON)
        verify_patterns(mount / overlay, both)
        words = mount.decisions(overlay)
        assert words and words[0] in ("adopted", "verified"), f"{words}\n{mount.log()}"
        assert not {"restored", "refused", "unprotected"} & set(words), mount.log()
    verify_patterns(backing / base, both)
    expect_adopted_in_history(mount.store, base, ANY_REASON)
    damage_then_restored(mount, backing / base, tmp_path, base)


# ---- converted in place: qemu-img convert of the image to another format, same name ----

# (made as, converted to): FORMATS' names, or "qcow2"; qemu-img's format names.
CONVERSIONS = [("qcow2", "vpc"), ("vpc-dynamic", "qcow2"), ("raw-gpt", "qcow2"),
               ("qcow2", "vmdk")]
PARSER_NAMES = {"qcow2": "qcow2", "vpc": "vhd", "vmdk": "vmdk"}


def make_as(name: str):
    return make_created("qcow2", None) if name == "qcow2" else FORMATS[name].make


def qemu_format(name: str) -> str:
    return "qcow2" if name == "qcow2" else FORMATS[name].qemu_format


def compare_as(fmt: str, a, b) -> None:
    res = qemu_img("compare", "-f", fmt, "-F", fmt, a, b, check=False)
    assert res.returncode == 0, f"qemu-img compare {a} {b} -> {res.returncode}:\n{out(res)}"


@pytest.mark.parametrize("source,target", CONVERSIONS, ids=[f"{a}-to-{b}" for a, b in CONVERSIONS])
def test_converted_in_place_is_adopted(source, target, backing, mount, tmp_path):
    name = "disk.img"
    raw = backing / name
    with mount.running():
        runs = make_as(source)(mount / name, tmp_path)
    converted = tmp_path / f"converted.{target}"
    qemu_img("convert", "-f", qemu_format(source), "-O", target, raw, converted)
    copy_file(converted, raw.parent / ".converting")
    os.replace(raw.parent / ".converting", raw)

    reason = rf"it is a {PARSER_NAMES[target]} image now"
    with mount.running():
        compare_as(target, converted, mount / name)  # the first open decides
        expect_adopted(mount, name, reason)
        read_patterns(mount / name, target, runs)
    compare_as(target, converted, raw)  # nothing was reverted on the storage
    expect_adopted_in_history(mount.store, name, reason)
    images = json.loads(meta_restore("--store", mount.store, "list", "--json").stdout)
    assert [i["format"] for i in images if i["image"] == name] == [PARSER_NAMES[target]], images
    with mount.running():  # protected as what it is now
        compare_as(target, converted, mount / name)
        words = mount.decisions(name)
        assert words and words[0] == "verified", f"{words}\n{mount.log()}"


# ---- a change made while mounted, by someone else, while the image is closed ----

def test_other_host_writes_the_closed_image_while_mounted(backing, mount, tmp_path):
    mount.start()
    create_image(mount / IMAGE)
    write_patterns(mount / IMAGE)
    # Another host, writing the backing directly (new clusters, L2 tables and refcounts).
    write_patterns(backing / IMAGE, patterns=MORE_PATTERNS)
    both = expected_content(PATTERNS, MORE_PATTERNS)
    since = len(mount.log())
    verify_patterns(mount / IMAGE, both)  # the next open through the mount
    expect_adopted(mount, IMAGE, ANY_REASON, since)
    qemu_img_check(mount / IMAGE)
    mount.stop()
    verify_patterns(backing / IMAGE, both)
    damage_then_restored(mount, backing / IMAGE, tmp_path, IMAGE)


# ---- an outside change and a damage together ----

def test_resize_then_new_l1_zeroed_restores_the_journals_view(backing, mount, tmp_path):
    """qemu-img resize grows the L1 table into a newly allocated cluster and frees the old one;
    zeroing the new L1 then makes the image internally invalid (every L2 table and data cluster
    leaks). DESIGN.md: changed outside and invalid -> restore if the journal's view is valid.
    The journal's view is the image as it was before the resize (its header still points at the
    old L1, which qemu freed but did not overwrite), so vmetafs restores that: the guest's data
    are all there, and the resize (which added no data) is undone. The log says why."""
    raw = backing / IMAGE
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
    reference = tmp_path / "before-resize.qcow2"
    copy_file(raw, reference)
    qemu_img("resize", "-f", "qcow2", raw, "+4G")
    old_l1, new_l1 = Qcow2Layout.read(reference), Qcow2Layout.read(raw)
    assert new_l1.header.l1_table_offset != old_l1.header.l1_table_offset, "the L1 did not move"
    zero(raw, *new_l1.l1_table_range)

    with mount.running():
        qemu_img_compare(reference, mount / IMAGE)
        lines = decision_lines(mount.log(), IMAGE)
        assert lines and ": restored: " in lines[0], f"{lines}\n{mount.log()}"
        assert re.search(r"changed outside the mount \(size changed.*internally invalid", lines[0])
        verify_patterns(mount / IMAGE, expected_content(PATTERNS))
        qemu_img_check(mount / IMAGE)
        assert info(mount / IMAGE)["virtual-size"] == 4 * GiB
    qemu_img_compare(reference, raw)
    actions = [e["action"] for e in history(mount.store, IMAGE)]
    assert "restored" in actions and "adopted" not in actions, actions
