"""Reads a qcow2 image's own structures, to find where to poke damage.

Implements the parts of qemu's docs/interop/qcow2.txt that the integration tests need: the header
("Header"), the L1 and L2 tables ("Cluster mapping"), the refcount table ("Host cluster management")
and the snapshot table ("Snapshots"). All numbers are big-endian; every field is decoded explicitly
with struct.unpack_from at its documented byte offset. Extended L2 entries, compressed clusters and
external data files are not interpreted (the tests make none).
"""

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

QCOW2_MAGIC = b"QFI\xfb"

# L1 entry and standard L2 entry: bits 9..55 hold the host offset.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Refcount table entry: bits 9..63 hold the refcount block's offset.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62

HEADER_V2_LENGTH = 72
SNAPSHOT_ENTRY_FIXED = 40


def _be64(buf: bytes, offset: int) -> int:
    return struct.unpack_from(">Q", buf, offset)[0]


def _be32(buf: bytes, offset: int) -> int:
    return struct.unpack_from(">I", buf, offset)[0]


def _be16(buf: bytes, offset: int) -> int:
    return struct.unpack_from(">H", buf, offset)[0]


@dataclass
class Header:
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    # Version 3 only (defaults are the values version 2 implies).
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @staticmethod
    def parse(buf: bytes) -> "Header":
        if len(buf) < HEADER_V2_LENGTH:
            raise ValueError("file too short for a qcow2 header")
        h = Header(
            magic=bytes(buf[0:4]),
            version=_be32(buf, 4),
            backing_file_offset=_be64(buf, 8),
            backing_file_size=_be32(buf, 16),
            cluster_bits=_be32(buf, 20),
            size=_be64(buf, 24),
            crypt_method=_be32(buf, 32),
            l1_size=_be32(buf, 36),
            l1_table_offset=_be64(buf, 40),
            refcount_table_offset=_be64(buf, 48),
            refcount_table_clusters=_be32(buf, 56),
            nb_snapshots=_be32(buf, 60),
            snapshots_offset=_be64(buf, 64),
        )
        if h.magic != QCOW2_MAGIC:
            raise ValueError(f"not a qcow2 image (magic {h.magic!r})")
        if h.version >= 3 and len(buf) >= 104:
            h.incompatible_features = _be64(buf, 72)
            h.compatible_features = _be64(buf, 80)
            h.autoclear_features = _be64(buf, 88)
            h.refcount_order = _be32(buf, 96)
            h.header_length = _be32(buf, 100)
        return h


@dataclass
class Snapshot:
    entry_offset: int  # where this entry sits in the file (inside the snapshot table)
    entry_length: int  # bytes, padding included
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_data_size: int
    disk_size: Optional[int] = None  # from the extra data, when present


@dataclass
class Qcow2Layout:
    path: Path
    header: Header
    file_size: int
    l1_entries: List[int] = field(default_factory=list)
    refcount_table: List[int] = field(default_factory=list)
    snapshots: List[Snapshot] = field(default_factory=list)
    snapshot_table_length: int = 0

    # ---- reading ----
    @staticmethod
    def read(path) -> "Qcow2Layout":
        path = Path(path)
        with open(path, "rb") as f:
            header = Header.parse(f.read(4096))
            size = f.seek(0, 2)
            layout = Qcow2Layout(path=path, header=header, file_size=size)
            layout.l1_entries = layout._read_table(f, header.l1_table_offset, header.l1_size)
            nb_reft = header.refcount_table_clusters * header.cluster_size // 8
            layout.refcount_table = layout._read_table(f, header.refcount_table_offset, nb_reft)
            layout._read_snapshots(f)
        return layout

    def _read_table(self, f, offset: int, entries: int) -> List[int]:
        if entries == 0:
            return []
        if offset + entries * 8 > self.file_size:
            raise ValueError(f"{self.path}: table at {offset:#x} ({entries} entries) past EOF")
        f.seek(offset)
        buf = f.read(entries * 8)
        return [_be64(buf, 8 * i) for i in range(entries)]

    def _read_snapshots(self, f) -> None:
        h = self.header
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            f.seek(pos)
            fixed = f.read(SNAPSHOT_ENTRY_FIXED)
            id_len, name_len = _be16(fixed, 12), _be16(fixed, 14)
            extra_size = _be32(fixed, 36)
            rest = f.read(extra_size + id_len + name_len)
            extra = rest[:extra_size]
            disk_size = _be64(extra, 8) if extra_size >= 16 else None
            id_str = rest[extra_size:extra_size + id_len].decode()
            name = rest[extra_size + id_len:].decode()
            length = SNAPSHOT_ENTRY_FIXED + extra_size + id_len + name_len
            length = (length + 7) & ~7
            self.snapshots.append(Snapshot(
                entry_offset=pos, entry_length=length, l1_table_offset=_be64(fixed, 0),
                l1_size=_be32(fixed, 8), id_str=id_str, name=name,
                extra_data_size=extra_size, disk_size=disk_size))
            pos += length
        self.snapshot_table_length = pos - h.snapshots_offset

    # ---- derived locations ----
    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def l2_entries_per_table(self) -> int:
        return self.cluster_size // 8

    @property
    def l1_table_range(self) -> Tuple[int, int]:
        return self.header.l1_table_offset, self.header.l1_size * 8

    @property
    def refcount_table_range(self) -> Tuple[int, int]:
        h = self.header
        return h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size

    @property
    def snapshot_table_range(self) -> Tuple[int, int]:
        return self.header.snapshots_offset, self.snapshot_table_length

    def l2_table_offsets(self) -> List[int]:
        """Offsets of the L2 tables the active L1 table points at, in L1 order."""
        return [e & L1E_OFFSET_MASK for e in self.l1_entries if e & L1E_OFFSET_MASK]

    def refcount_block_offsets(self) -> List[int]:
        return [e & REFT_OFFSET_MASK for e in self.refcount_table if e & REFT_OFFSET_MASK]

    def snapshot_l1_entries(self, snap: Snapshot) -> List[int]:
        with open(self.path, "rb") as f:
            return self._read_table(f, snap.l1_table_offset, snap.l1_size)

    def snapshot_l2_table_offsets(self, snap: Snapshot) -> List[int]:
        return [e & L1E_OFFSET_MASK for e in self.snapshot_l1_entries(snap) if e & L1E_OFFSET_MASK]

    def read_l2_table(self, l2_offset: int) -> List[int]:
        with open(self.path, "rb") as f:
            return self._read_table(f, l2_offset, self.l2_entries_per_table)

    def guest_to_host(self, guest_offset: int) -> Optional[int]:
        """Host offset of a guest byte through the active tables; None if unallocated."""
        cs = self.cluster_size
        cluster = guest_offset // cs
        l1_index, l2_index = divmod(cluster, self.l2_entries_per_table)
        if l1_index >= len(self.l1_entries):
            return None
        l2_offset = self.l1_entries[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return None
        entry = self.read_l2_table(l2_offset)[l2_index]
        if entry & L2E_COMPRESSED:
            raise ValueError("compressed clusters are not interpreted")
        host = entry & L2E_OFFSET_MASK
        return host + guest_offset % cs if host else None
