"""A VMDK made of several files (twoGbMaxExtentSparse, twoGbMaxExtentFlat) is one image.

The image is created and written THROUGH the mount (qemu opens the descriptor, then each extent
file through the mount), so its extents' grain directories and tables are journaled under the
descriptor, each with its extent index. With the daemon stopped, a grain table and the grain
directory of the second extent file are damaged on the backing, at offsets read from that file's
own header (format_layout); the next first open of the descriptor restores them before it
returns. An extent file gone from the backing is a clear refusal, never a crash.
"""

import json
import shutil
from pathlib import Path
from typing import List

from conftest import GiB, KiB, MiB, meta_restore, out, qemu_img, qemu_io, read_at, zero
from format_layout import VmdkLayout

IMAGE = "split.vmdk"
EXTENTS = ["split-s001.vmdk", "split-s002.vmdk", "split-s003.vmdk"]
SIZE = 5 * GiB  # 2 GiB per extent file: three files
EXTENT_BYTES = 2 * GiB
# One or more runs in every extent file; the second extent's at 100 MiB and 1500 MiB into it.
PATTERNS = [
    (0, 1 * MiB, 0x11),
    (EXTENT_BYTES + 100 * MiB, 3 * MiB, 0x22),
    (EXTENT_BYTES + 1500 * MiB + 4 * KiB, 64 * KiB, 0x33),
    (2 * EXTENT_BYTES + 10 * MiB, 1 * MiB, 0x44),
]


def vmdk_io(img, cmds: List[str]):
    return qemu_io(img, cmds, fmt="vmdk")


def write(img, patterns):
    vmdk_io(img, [f"write -P {p:#x} {off} {length}" for off, length, p in patterns])


def read_back(img, patterns):
    vmdk_io(img, [f"read -P {p:#x} {off} {length}" for off, length, p in patterns])


def compare(a, b):
    res = qemu_img("compare", "-f", "vmdk", "-F", "vmdk", a, b, check=False)
    assert res.returncode == 0, f"qemu-img compare {a} {b} -> {res.returncode}:\n{out(res)}"


def check(img):
    res = qemu_img("check", "-f", "vmdk", img, check=False)
    assert res.returncode == 0, f"qemu-img check {img} -> {res.returncode}:\n{out(res)}"


def copy_image(directory: Path, dst: Path) -> Path:
    """Copies the descriptor and its extent files (it names them relative to itself)."""
    dst.mkdir()
    for name in [IMAGE, *EXTENTS]:
        shutil.copyfile(directory / name, dst / name)
    return dst / IMAGE


def listed(store) -> List[dict]:
    return json.loads(meta_restore("--store", store, "list", "--json").stdout)


def history(store) -> List[dict]:
    return json.loads(meta_restore("--store", store, "history", IMAGE, "--json").stdout)


def create(mount):
    img = mount / IMAGE
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, str(SIZE))
    write(img, PATTERNS)
    return img


def test_one_image_in_the_journal(backing, mount):
    with mount.running():
        create(mount)
        assert sorted(p.name for p in mount.mnt.iterdir()) == sorted([IMAGE, *EXTENTS])
    images = listed(mount.store)
    assert [i["image"] for i in images] == [IMAGE], images
    assert images[0]["extent_files"] == EXTENTS, images
    # Extents 1..3 each contribute their header, grain directories and grain tables.
    assert images[0]["units"] > 3 * 3, images
    res = meta_restore("--store", mount.store, "verify", IMAGE, check=False)
    assert res.returncode == 0, out(res)


def test_damaged_extent_is_restored(backing, mount, tmp_path):
    with mount.running():
        img = create(mount)
    reference = copy_image(backing.path, tmp_path / "reference")
    check(reference)
    read_back(reference, PATTERNS)

    second = backing / EXTENTS[1]
    layout = VmdkLayout.read(second)
    index = layout.gt_index(PATTERNS[1][0] - EXTENT_BYTES)
    assert any(layout.grain_table_entries(index)), "the grain table should map grains"
    damaged = [layout.grain_table_range(index), layout.gd_range]
    for offset, length in damaged:
        zero(second, offset, length)
    assert qemu_img("compare", "-f", "vmdk", "-F", "vmdk", reference, backing / IMAGE,
                    check=False).returncode != 0, "the damage is not noticed"

    with mount.running():
        # The first open (this compare) must find the damage and restore before it returns.
        compare(reference, img)
        words = mount.decisions(IMAGE)
        assert "restored" in words, f"no 'restored' for {IMAGE} (saw {words}):\n{mount.log()}"
        assert "refused" not in words and "unprotected" not in mount.log(), mount.log()
        assert EXTENTS[1] in mount.log(), "the restore does not name the extent file"
        check(img)
        read_back(img, PATTERNS)

    restored = [e for e in history(mount.store) if e["action"] == "restored"]
    assert restored, history(mount.store)
    assert {u.get("extent") for u in restored[0]["units"]} == {2}, restored[0]
    # Written back: the extent file alone is whole again.
    compare(reference, backing / IMAGE)
    for offset, length in damaged:
        assert read_at(second, offset, length) == read_at(reference.parent / EXTENTS[1],
                                                          offset, length)


def test_meta_restore_restores_an_extent_offline(backing, mount, tmp_path):
    with mount.running():
        create(mount)
    reference = copy_image(backing.path, tmp_path / "reference")
    second = backing / EXTENTS[1]
    layout = VmdkLayout.read(second)
    zero(second, *layout.grain_table_range(layout.gt_index(PATTERNS[2][0] - EXTENT_BYTES)))

    res = meta_restore("--store", mount.store, "verify", IMAGE, check=False)
    assert res.returncode == 1, out(res)
    res = meta_restore("--store", mount.store, "restore", IMAGE, check=False)
    assert res.returncode == 0, out(res)
    compare(reference, backing / IMAGE)
    check(backing / IMAGE)
    assert meta_restore("--store", mount.store, "verify", IMAGE, check=False).returncode == 0


def test_writes_to_extents_are_journaled_under_the_image(backing, mount):
    """Later writes through the mount, to every extent: the next first open verifies."""
    more = [(EXTENT_BYTES + 700 * MiB, 2 * MiB, 0x55), (2 * EXTENT_BYTES + 900 * MiB, 64 * KiB,
                                                          0x66)]
    with mount.running():
        img = create(mount)
    with mount.running():
        write(img, more)
    with mount.running():
        read_back(img, PATTERNS + more)
        words = mount.decisions(IMAGE)
        assert words and words[0] == "verified", f"{words}\n{mount.log()}"
    check(backing / IMAGE)


def test_missing_extent_file_is_refused(backing, mount):
    with mount.running():
        create(mount)
    hidden = backing / "elsewhere.vmdk"
    (backing / EXTENTS[2]).rename(hidden)
    with mount.running():
        res = qemu_img("info", "-f", "vmdk", mount / IMAGE, check=False)
        assert res.returncode != 0
        assert "refused" in mount.decisions(IMAGE), mount.log()
        assert EXTENTS[2] in mount.log(), "the refusal does not name the missing extent file"
    hidden.rename(backing / EXTENTS[2])
    with mount.running():
        read_back(mount / IMAGE, PATTERNS)
        assert "restored" not in mount.decisions(IMAGE), mount.log()


def test_extent_renamed_with_its_descriptor_is_adopted(backing, mount):
    """Renamed outside the mount, and the descriptor edited to name it: a valid change."""
    with mount.running():
        create(mount)
    (backing / EXTENTS[2]).rename(backing / "split-last.vmdk")
    descriptor = backing / IMAGE
    descriptor.write_text(descriptor.read_text().replace(EXTENTS[2], "split-last.vmdk"))
    with mount.running():
        read_back(mount / IMAGE, PATTERNS)
        words = mount.decisions(IMAGE)
        assert words and words[0] == "adopted", f"{words}\n{mount.log()}"
    assert listed(mount.store)[0]["extent_files"] == [*EXTENTS[:2], "split-last.vmdk"]


def test_flat_extents(backing, mount):
    """twoGbMaxExtentFlat: the descriptor is the metadata; the extent files are data."""
    with mount.running():
        img = mount / "flat.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", img,
                 str(SIZE))
        write(img, PATTERNS)
    images = listed(mount.store)
    assert [i["image"] for i in images] == ["flat.vmdk"], images
    assert len(images[0]["extent_files"]) == 3, images
    with mount.running():
        read_back(img, PATTERNS)
        assert "verified" in mount.decisions("flat.vmdk"), mount.log()
