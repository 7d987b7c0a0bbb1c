"""An image's life under vmetafs: baseline, verified, adopted, restored from birth; odd files; how
the daemon starts, stops and refuses bad input."""

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (GiB, KiB, MiB, PATTERNS, copy_file, create_image, daemon_command, expected_content,
                      out, poke, qemu_img, qemu_img_check, qemu_img_compare, random_bytes, read_at,
                      start_expecting_refusal, verify_patterns, write_patterns, zero)
from qcow2_layout import Qcow2Layout

IMAGE = "disk.qcow2"


def expect_decision(mount, name, word, forbidden=("refused", "unprotected")):
    words = mount.decisions(name)
    assert word in words, f"expected '{word}' for {name}, the log says {words}:\n{mount.log()}"
    for bad in forbidden:
        assert bad not in words, f"unexpected '{bad}' for {name}:\n{mount.log()}"


def info(img) -> dict:
    return json.loads(out(qemu_img("info", "--output=json", "-f", "qcow2", img)))


def damage_and_expect_restore(mount, backing, tmp_path, name, runs):
    """With the mount stopped: keep a reference, zero the L1 table and the first L2 table on the
    backing, remount, and require the client to see the reference again."""
    raw = backing / name
    reference = tmp_path / f"{name}.reference"
    copy_file(raw, reference)
    layout = Qcow2Layout.read(reference)
    zero(raw, *layout.l1_table_range)
    zero(raw, layout.l2_table_offsets()[0], layout.cluster_size)
    mount.start()
    qemu_img_compare(reference, mount / name)
    expect_decision(mount, name, "restored")
    qemu_img_check(mount / name)
    verify_patterns(mount / name, runs)
    mount.stop()
    qemu_img_compare(reference, raw)
    qemu_img_check(raw)
    return reference


# ---- first-open decisions ----

def test_image_made_on_backing_is_baselined_then_protected(backing, mount, tmp_path):
    create_image(backing / IMAGE)
    write_patterns(backing / IMAGE)
    runs = expected_content(PATTERNS)
    with mount.running():
        verify_patterns(mount / IMAGE, runs)
        expect_decision(mount, IMAGE, "baseline")
    damage_and_expect_restore(mount, backing, tmp_path, IMAGE, runs)


def test_unchanged_image_is_verified(backing, mount):
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
    with mount.running():
        qemu_img_check(mount / IMAGE)
        expect_decision(mount, IMAGE, "verified", forbidden=("restored", "adopted", "refused",
                                                             "unprotected", "baseline"))


@pytest.mark.parametrize("change", ["resize", "snapshot"])
def test_change_made_outside_the_mount_is_adopted(change, backing, mount, tmp_path):
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
    raw = backing / IMAGE
    if change == "resize":
        qemu_img("resize", "-f", "qcow2", raw, "+1G")
    else:
        qemu_img("snapshot", "-c", "x", raw)
    qemu_img_check(raw)

    def shows_the_change(img):
        i = info(img)
        if change == "resize":
            assert i["virtual-size"] == 5 * GiB, i
        else:
            assert [s["name"] for s in i.get("snapshots", [])] == ["x"], i

    runs = expected_content(PATTERNS)
    with mount.running():
        shows_the_change(mount / IMAGE)
        expect_decision(mount, IMAGE, "adopted", forbidden=("restored", "refused", "unprotected"))
        verify_patterns(mount / IMAGE, runs)
    shows_the_change(raw)  # the storage was not reverted either
    # The adopted version is what the journal protects from now on.
    damage_and_expect_restore(mount, backing, tmp_path, IMAGE, runs)
    shows_the_change(raw)


def test_image_created_through_mount_is_protected_from_birth(backing, mount, tmp_path):
    with mount.running():
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE)
        # The image was journaled while qemu-img created it: the next open verifies against that
        # journal instead of taking a first baseline.
        expect_decision(mount, IMAGE, "verified")
    damage_and_expect_restore(mount, backing, tmp_path, IMAGE, expected_content(PATTERNS))


def test_image_copied_in_with_one_open_is_protected(backing, mount, tmp_path):
    """A file that becomes an image while it is being written (one open, sequential writes)."""
    template = tmp_path / "template.qcow2"
    create_image(template)
    write_patterns(template)
    with mount.running():
        with open(template, "rb") as src, open(mount / IMAGE, "wb") as dst:
            while chunk := src.read(1 * MiB):
                dst.write(chunk)
    assert read_at(backing / IMAGE, 0, 1 << 30) == read_at(template, 0, 1 << 30)
    damage_and_expect_restore(mount, backing, tmp_path, IMAGE, expected_content(PATTERNS))


def test_parallel_direct_writes_keep_the_image_protected(backing, mount, tmp_path):
    """qemu's O_DIRECT writes at depth 16, each allocating a cluster, reach the daemon in parallel
    (direct I/O opens allow parallel writes): the image comes out as on a plain directory, and its
    journal still restores it."""
    step, count, pattern = 4 * MiB, 1000, 0x5A  # spread over 8 L2 tables
    bench = ["bench", "-q", "-w", "-f", "qcow2", "-t", "none", "-d", "16", "-s", "4096",
             "-S", str(step), "-c", str(count), f"--pattern={pattern}"]
    reference = tmp_path / "plain.qcow2"
    create_image(reference)
    qemu_img(*bench, reference)
    with mount.running():
        create_image(mount / IMAGE)
        qemu_img(*bench, mount / IMAGE)
        qemu_img_compare(reference, mount / IMAGE)
        qemu_img_check(mount / IMAGE)
    runs = [(i * step, 4096, pattern) for i in range(0, count, 37)]
    damage_and_expect_restore(mount, backing, tmp_path, IMAGE, runs)


# ---- files that are not (valid) images ----

def test_parallel_direct_writes_to_a_plain_file_all_land(backing, mount):
    block, blocks = 64 * KiB, 128
    with mount.running():
        # Inside the file, on an open (not a create): the kernel lets these writes run in parallel.
        with open(mount / "raw.img", "wb") as f:
            f.truncate(block * blocks)
        fd = os.open(mount / "raw.img", os.O_RDWR | os.O_DIRECT)

        def put(i):
            buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
            buf.write(random_bytes(block, i))
            assert os.pwrite(fd, buf, i * block) == block

        try:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(put, range(blocks)))
        finally:
            os.close(fd)
    expected = b"".join(random_bytes(block, i) for i in range(blocks))
    assert read_at(backing / "raw.img", 0, block * blocks) == expected


# qcow2 files with the magic but impossible tables: name -> (header field offset, new bytes).
ABSURD_IMAGES = {
    "huge-l1.qcow2": (36, (0x7FFFFFFF).to_bytes(4, "big")),  # l1_size
    "far-refcount-table.qcow2": (48, (1 << 50).to_bytes(8, "big")),  # refcount_table_offset
}


def test_absurd_header_is_opened_unprotected(backing, mount, tmp_path):
    template = tmp_path / "template.qcow2"
    create_image(template)
    for name, (field, value) in ABSURD_IMAGES.items():
        copy_file(template, backing / name)
        poke(backing / name, field, value)
    with mount.running():
        for name in ABSURD_IMAGES:
            with open(mount / name, "r+b") as f:
                assert f.read(4096) == read_at(backing / name, 0, 4096)
                f.seek(300 * 1024)
                f.write(b"still served")
            assert read_at(backing / name, 300 * 1024, 12) == b"still served"
            words = mount.decisions(name)
            assert "unprotected" in words, f"{name}: {words}\n{mount.log()}"
            assert mount.running_now, mount.log()
        # The daemon still serves everything else.
        (mount / "after.txt").write_text("alive\n")
        assert (backing / "after.txt").read_text() == "alive\n"
        assert sorted(os.listdir(mount.mnt)) == sorted(os.listdir(backing.path))


def test_plain_files_pass_through_unchanged(backing, mount):
    text = "".join(f"line {i}: nothing to see here\n" for i in range(1000)).encode()
    blob = random_bytes(10 * MiB, seed=10)
    direct = random_bytes(3 * MiB + 123, seed=11)
    (backing / "direct.bin").write_bytes(direct)
    with mount.running():
        (mount / "notes.txt").write_bytes(text)
        (mount / "blob.bin").write_bytes(blob)
        assert (mount / "direct.bin").read_bytes() == direct
        with open(mount / "blob.bin", "r+b") as f:  # overwrite in the middle, then append
            f.seek(5 * MiB + 1)
            f.write(b"x" * 70000)
            f.seek(0, os.SEEK_END)
            f.write(b"tail")
        blob = blob[:5 * MiB + 1] + b"x" * 70000 + blob[5 * MiB + 1 + 70000:] + b"tail"
        assert (mount / "blob.bin").read_bytes() == blob
    assert (backing / "notes.txt").read_bytes() == text
    assert (backing / "blob.bin").read_bytes() == blob
    with mount.running():
        for name, content in (("notes.txt", text), ("blob.bin", blob), ("direct.bin", direct)):
            assert (mount / name).read_bytes() == content
            words = mount.decisions(name)
            assert not {"restored", "adopted", "refused"} & set(words), f"{name}: {words}"


# ---- starting and stopping ----

def test_sigterm_unmounts_and_immediate_remount_works(backing, mount):
    mount.start()
    (mount / "kept.txt").write_text("kept\n")
    mount.terminate()
    mount.start()
    assert (mount / "kept.txt").read_text() == "kept\n"
    mount.stop()


def test_sync_options_mount_and_journal(backing, mount):
    with mount.running(["sync=write"]):
        create_image(mount / IMAGE)
        write_patterns(mount / IMAGE, cache="none")
        qemu_img_check(mount / IMAGE)
    with mount.running(["sync=periodic:50"]):
        verify_patterns(mount / IMAGE, expected_content(PATTERNS))
        expect_decision(mount, IMAGE, "verified")


# ---- bad input: each fails with a message and leaves no mount ----

def assert_mentions(text, *names):
    assert any(n.lower() in text.lower() for n in names), \
        f"the message names none of {names}:\n{text}"


def test_missing_backing_is_refused(tmp_path):
    missing, mnt = tmp_path / "no-such-dir", tmp_path / "mnt"
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(missing, mnt, tmp_path / "store"), mnt,
                                  tmp_path / "log")
    assert_mentions(err, str(missing))


def test_backing_that_is_a_file_is_refused(tmp_path):
    file, mnt = tmp_path / "a-file", tmp_path / "mnt"
    file.write_text("not a directory\n")
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(file, mnt, tmp_path / "store"), mnt,
                                  tmp_path / "log")
    assert_mentions(err, str(file))


def test_store_that_is_a_file_is_refused(backing, tmp_path):
    store, mnt = tmp_path / "store-file", tmp_path / "mnt"
    store.write_text("not a directory\n")
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(backing.spec, mnt, store), mnt, tmp_path / "log")
    assert_mentions(err, str(store))
    assert store.read_text() == "not a directory\n"


@pytest.mark.parametrize("opts", [["sync=sometimes"], ["sync=periodic:soon"], ["journal=maybe"]],
                         ids=["sync-word", "sync-period", "journal-word"])
def test_bad_option_value_is_refused(opts, backing, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(backing.spec, mnt, tmp_path / "store", opts),
                                  mnt, tmp_path / "log")
    assert_mentions(err, opts[0].split("=")[1], opts[0].split("=")[0])


def test_busy_mountpoint_is_refused(backing, make_backing, mount, tmp_path):
    other = make_backing("other")
    with mount.running():
        err = start_expecting_refusal(
            daemon_command(other.spec, mount.mnt, tmp_path / "other-store"), mount.mnt,
            tmp_path / "second.log")
        assert_mentions(err, str(mount.mnt), "already mounted", "busy")
        (mount / "first.txt").write_text("first still serves\n")
        assert (backing / "first.txt").read_text() == "first still serves\n"
        assert not (other / "first.txt").exists()


def test_second_daemon_on_the_same_store_is_refused(backing, make_mount, tmp_path):
    first = make_mount(backing, "first")
    second_mnt = tmp_path / "second.mnt"
    second_mnt.mkdir()
    with first.running():
        err = start_expecting_refusal(daemon_command(backing.spec, second_mnt, first.store),
                                      second_mnt, tmp_path / "second.log")
        assert_mentions(err, str(first.store), "store")
        (first / "first.txt").write_text("first still serves\n")
        assert (backing / "first.txt").read_text() == "first still serves\n"
    with first.running():  # and the refusal did not harm the store
        assert (first / "first.txt").read_text() == "first still serves\n"


def test_store_of_another_backing_is_refused(backing, make_backing, mount, tmp_path):
    with mount.running():
        create_image(mount / IMAGE)
    other = make_backing("other")
    mnt = tmp_path / "other.mnt"
    mnt.mkdir()
    err = start_expecting_refusal(daemon_command(other.spec, mnt, mount.store), mnt,
                                  tmp_path / "other.log")
    assert_mentions(err, str(mount.store), "store", "backing")
    with mount.running():  # the store still serves its own backing
        qemu_img_check(mount / IMAGE)
        expect_decision(mount, IMAGE, "verified")

