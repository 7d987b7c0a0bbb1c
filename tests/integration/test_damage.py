"""Metadata damaged on the backing while unmounted is restored on the next first open.

An image is made and written THROUGH the mount (qemu-img create, qemu-io), then, with the daemon
stopped, its metadata is damaged directly on the backing at offsets read from the image's own
structures. After remounting with the same store, the client must see the image exactly as it was
(qemu-img compare against a copy taken before the damage), healthy (qemu-img check), the daemon
must say "restored", and after unmounting the backing file itself must be repaired.
"""

import json
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import pytest

from conftest import (KiB, MORE_PATTERNS, PATTERNS, copy_file, create_image, expected_content,
                      image_opts, out, poke, qemu_img, qemu_img_check, qemu_img_compare, qemu_io,
                      random_bytes, read_at, verify_patterns, write_patterns, zero)
from qcow2_layout import L1E_OFFSET_MASK, Qcow2Layout

Ranges = List[Tuple[int, int]]
IMAGE = "vm.qcow2"
SNAPSHOT = "s1"


# ---- damage kinds: each pokes the backing file and returns the byte ranges it changed ----

def zero_l1(layout: Qcow2Layout, path) -> Ranges:
    off, length = layout.l1_table_range
    zero(path, off, length)
    return [(off, length)]


def zero_one_l2(layout: Qcow2Layout, path) -> Ranges:
    tables = layout.l2_table_offsets()
    off = tables[len(tables) // 2]
    zero(path, off, layout.cluster_size)
    return [(off, layout.cluster_size)]


def zero_all_l2(layout: Qcow2Layout, path) -> Ranges:
    tables = layout.l2_table_offsets()
    assert len(tables) >= 2, "the image should have several L2 tables"
    for off in tables:
        zero(path, off, layout.cluster_size)
    return [(off, layout.cluster_size) for off in tables]


def random_l2(layout: Qcow2Layout, path) -> Ranges:
    off = layout.l2_table_offsets()[0]
    poke(path, off, random_bytes(layout.cluster_size, seed=0x5EED))
    return [(off, layout.cluster_size)]


def zero_header(layout: Qcow2Layout, path) -> Ranges:
    zero(path, 0, 512)
    return [(0, 512)]


def zero_refcount_table(layout: Qcow2Layout, path) -> Ranges:
    off, length = layout.refcount_table_range
    zero(path, off, length)
    return [(off, length)]


def zero_one_refcount_block(layout: Qcow2Layout, path) -> Ranges:
    blocks = layout.refcount_block_offsets()
    assert len(blocks) >= 2, "the image should have several refcount blocks"
    zero(path, blocks[1], layout.cluster_size)
    return [(blocks[1], layout.cluster_size)]


def flip_l1_offset_bit(layout: Qcow2Layout, path) -> Ranges:
    """Flips one offset bit of an L1 entry so that it still points at an aligned cluster inside
    the file: the most plausible-looking corruption (the entry stays well-formed)."""
    index = next(i for i, e in enumerate(layout.l1_entries) if e & L1E_OFFSET_MASK)
    entry = layout.l1_entries[index]
    l2 = entry & L1E_OFFSET_MASK
    bit = next(b for b in range(layout.header.cluster_bits, 56)
               if 0 < (l2 ^ (1 << b)) < layout.file_size - layout.cluster_size)
    off = layout.header.l1_table_offset + 8 * index
    poke(path, off, (entry ^ (1 << bit)).to_bytes(8, "big"))
    return [(off, 8)]


def zero_snapshot_l1(layout: Qcow2Layout, path) -> Ranges:
    snap = layout.snapshots[0]
    zero(path, snap.l1_table_offset, snap.l1_size * 8)
    return [(snap.l1_table_offset, snap.l1_size * 8)]


def zero_snapshot_table(layout: Qcow2Layout, path) -> Ranges:
    off, length = layout.snapshot_table_range
    zero(path, off, length)
    return [(off, length)]


def zero_snapshot_l1_and_table(layout: Qcow2Layout, path) -> Ranges:
    return zero_snapshot_l1(layout, path) + zero_snapshot_table(layout, path)


@dataclass
class Damage:
    poke: Callable[[Qcow2Layout, object], Ranges]
    cluster_size: Optional[int] = None  # None: qemu-img's default (64 KiB)
    snapshot: bool = False


DAMAGES = {
    "zero-l1": Damage(zero_l1),
    "zero-one-l2": Damage(zero_one_l2),
    "zero-all-l2": Damage(zero_all_l2, cluster_size=4 * KiB),
    "random-l2": Damage(random_l2),
    "zero-header-512": Damage(zero_header),
    "zero-refcount-table": Damage(zero_refcount_table),
    "zero-one-refcount-block": Damage(zero_one_refcount_block, cluster_size=4 * KiB),
    "flip-l1-offset-bit": Damage(flip_l1_offset_bit),
    "zero-snapshot-l1": Damage(zero_snapshot_l1, snapshot=True),
    "zero-snapshot-l1-and-table": Damage(zero_snapshot_l1_and_table, snapshot=True),
    "zero-snapshot-table": Damage(zero_snapshot_table, snapshot=True),
}

# The first two kinds with both client cache modes; the others alternate between the two.
CASES = [("zero-l1", None), ("zero-l1", "none"), ("zero-one-l2", None), ("zero-one-l2", "none")]
CASES += [(kind, "none" if i % 2 == 0 else None) for i, kind in enumerate(list(DAMAGES)[2:])]


def case_id(case) -> str:
    kind, cache = case
    return f"{kind}-cache-{cache or 'default'}"


def qemu_sees_damage(reference, damaged) -> bool:
    check = qemu_img("check", "-f", "qcow2", damaged, check=False)
    compare = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", reference, damaged, check=False)
    return check.returncode != 0 or compare.returncode != 0


def snapshot_as_image(img, snapshot: str, dest):
    """Extracts an internal snapshot into a standalone qcow2 image, to compare snapshots."""
    qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.name={snapshot}", "-O", "qcow2", img, dest)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_damaged_metadata_is_restored(case, backing, mount, tmp_path):
    kind, cache = case
    damage = DAMAGES[kind]
    written = [PATTERNS]

    mount.start()
    img = mount / IMAGE
    create_image(img, cluster_size=damage.cluster_size)
    write_patterns(img, cache)
    if damage.snapshot:
        qemu_img("snapshot", "-c", SNAPSHOT, *image_opts(img, cache))
        write_patterns(img, cache, MORE_PATTERNS)
        written.append(MORE_PATTERNS)
    mount.stop()

    # The reference: the image as the client left it, checked healthy and holding the data.
    raw = backing / IMAGE
    reference = tmp_path / "reference.qcow2"
    copy_file(raw, reference)
    qemu_img_check(reference)
    verify_patterns(reference, expected_content(*written))
    if damage.snapshot:
        snapshot_as_image(reference, SNAPSHOT, tmp_path / "reference-s1.qcow2")
        verify_patterns(tmp_path / "reference-s1.qcow2", expected_content(PATTERNS))

    ranges = damage.poke(Qcow2Layout.read(reference), raw)
    assert any(read_at(raw, o, n) != read_at(reference, o, n) for o, n in ranges)
    assert qemu_sees_damage(reference, raw), f"{kind}: qemu does not notice the damage"

    mount.start()
    # The first open (this compare) must find the damage and restore before it returns.
    qemu_img_compare(reference, img)
    words = mount.decisions(IMAGE)
    assert "restored" in words, f"no 'restored' for {IMAGE} (saw {words}):\n{mount.log()}"
    assert "refused" not in words and "unprotected" not in words, mount.log()
    qemu_img_check(img)
    verify_patterns(img, expected_content(*written), cache)
    if damage.snapshot:
        listing = out(qemu_img("snapshot", "-l", img))
        assert SNAPSHOT in listing, listing
        snapshot_as_image(img, SNAPSHOT, tmp_path / "restored-s1.qcow2")
        qemu_img_compare(tmp_path / "reference-s1.qcow2", tmp_path / "restored-s1.qcow2")
    mount.stop()

    # The restore was written back to the storage: the file alone is whole again.
    qemu_img_check(raw)
    qemu_img_compare(reference, raw)
    for o, n in ranges:
        assert read_at(raw, o, n) == read_at(reference, o, n), \
            f"{kind}: bytes {o:#x}+{n:#x} of the backing file differ from before the damage"


@pytest.mark.parametrize("cluster_size", [None, 4 * KiB], ids=["64k", "4k"])
def test_layout_reader_agrees_with_qemu(cluster_size, tmp_path):
    """The offsets the damage is poked at are the image's real structures (no mount needed)."""
    img = tmp_path / "plain.qcow2"
    create_image(img, cluster_size=cluster_size)
    write_patterns(img)
    layout = Qcow2Layout.read(img)
    cs = layout.cluster_size
    assert cs == (cluster_size or 64 * KiB)
    assert layout.header.size == 4 << 30 and layout.header.nb_snapshots == 0
    assert layout.header.l1_size == -(-layout.header.size // (cs * (cs // 8)))

    extents = json.loads(out(qemu_img("map", "--output=json", "-f", "qcow2", img)))
    for off, length, _ in PATTERNS:
        for guest in (off, off + length - 1):
            ext = next(e for e in extents if e["start"] <= guest < e["start"] + e["length"])
            assert ext["data"], ext
            assert layout.guest_to_host(guest) == ext["offset"] + guest - ext["start"]

    l1_indexes = {g // (cs * (cs // 8)) for off, length, _ in PATTERNS
                  for g in range(off, off + length, cs)}
    tables = layout.l2_table_offsets()
    assert len(tables) == len(l1_indexes)
    assert all(t % cs == 0 and t + cs <= layout.file_size for t in tables)
    blocks = layout.refcount_block_offsets()
    assert blocks and all(b % cs == 0 and b + cs <= layout.file_size for b in blocks)
    if cluster_size == 4 * KiB:
        assert len(blocks) >= 2

    qemu_img("snapshot", "-c", SNAPSHOT, img)
    qemu_io(img, ["write -P 0x99 0 64k"])
    layout = Qcow2Layout.read(img)
    assert [s.name for s in layout.snapshots] == [SNAPSHOT]
    snap = layout.snapshots[0]
    assert snap.l1_size == layout.header.l1_size and snap.disk_size == layout.header.size
    assert layout.snapshot_l2_table_offsets(snap) == tables  # the L2 tables it was taken with
    assert layout.l2_table_offsets()[0] != tables[0]  # the write above copied the first L2 table
