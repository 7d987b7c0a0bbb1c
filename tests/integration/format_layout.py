"""Reads VHD, VHDX, VMDK and GPT images' own structures, to find where to poke damage.

Each reader decodes the fields the integration tests need with struct.unpack_from at the byte
offsets the specifications give:
- VHD (Microsoft "Virtual Hard Disk Image Format Specification" 1.0; qemu block/vpc.c): "Hard Disk
  Footer Format", "Dynamic Disk Header Format", "Block Allocation Table". Big-endian.
- VHDX ([MS-VHDX] 1.0; qemu block/vhdx.h): 2.2 headers, 2.3 region table, 2.5 BAT, 2.6 metadata
  region (file parameters, virtual disk size, logical sector size). Little-endian, GUIDs in the
  mixed-endian Microsoft layout.
- VMDK (VMware "Virtual Disk Format 1.1"; qemu block/vmdk.c): the hosted sparse extent header,
  grain directory, redundant grain directory and grain tables; a stream whose grain directory is
  at the end (gdOffset = GD_AT_END) is read through its footer at end - 1024. Little-endian.
- GPT (UEFI 2.10, 5.3.2 "GPT Header", 5.3.3 "GPT Partition Entry Array"), 512-byte sectors.
  Little-endian.
Offsets and lengths returned are bytes in the file.
"""

import os
import struct
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

SECTOR = 512
Range = Tuple[int, int]


def _read(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _unpack(fmt: str, buf: bytes, offset: int) -> int:
    return struct.unpack_from(fmt, buf, offset)[0]


# ------------------------------------------------------------------------------------------------
# VHD

VHD_FOOTER_COOKIE = b"conectix"
VHD_DYNAMIC_COOKIE = b"cxsparse"
VHD_TYPE_FIXED, VHD_TYPE_DYNAMIC, VHD_TYPE_DIFFERENCING = 2, 3, 4
VHD_BAT_UNUSED = 0xFFFFFFFF
VHD_DYNAMIC_HEADER_LENGTH = 1024


@dataclass
class VhdFooter:
    cookie: bytes
    data_offset: int  # 0xFFFFFFFFFFFFFFFF for fixed disks
    current_size: int
    disk_type: int

    @staticmethod
    def parse(buf: bytes) -> "VhdFooter":
        return VhdFooter(cookie=bytes(buf[0:8]), data_offset=_unpack(">Q", buf, 16),
                         current_size=_unpack(">Q", buf, 48), disk_type=_unpack(">I", buf, 60))


@dataclass
class VhdLayout:
    file_size: int
    footer: VhdFooter  # the one at the end of the file
    footer_copy: Optional[VhdFooter] = None  # at offset 0 (dynamic and differencing disks)
    # Dynamic header fields.
    table_offset: int = 0
    max_table_entries: int = 0
    block_size: int = 0
    bat: List[int] = field(default_factory=list)  # sector numbers, VHD_BAT_UNUSED when free

    @property
    def footer_range(self) -> Range:
        return (self.file_size - SECTOR, SECTOR)

    @property
    def dynamic_header_range(self) -> Range:
        return (self.footer.data_offset, VHD_DYNAMIC_HEADER_LENGTH)

    @property
    def bat_range(self) -> Range:
        return (self.table_offset, 4 * self.max_table_entries)

    @property
    def bitmap_size(self) -> int:
        bits = self.block_size // SECTOR
        return -(-(bits // 8) // SECTOR) * SECTOR

    def allocated_blocks(self) -> List[int]:
        """Indexes of the BAT entries that point at a block."""
        return [i for i, e in enumerate(self.bat) if e != VHD_BAT_UNUSED]

    def guest_to_host(self, guest: int) -> Optional[int]:
        if self.footer.disk_type == VHD_TYPE_FIXED:
            return guest
        entry = self.bat[guest // self.block_size]
        if entry == VHD_BAT_UNUSED:
            return None
        return entry * SECTOR + self.bitmap_size + guest % self.block_size

    @staticmethod
    def read(path) -> "VhdLayout":
        size = os.path.getsize(path)
        footer = VhdFooter.parse(_read(path, size - SECTOR, SECTOR))
        if footer.cookie != VHD_FOOTER_COOKIE:
            raise ValueError(f"{path}: no VHD footer at the end")
        layout = VhdLayout(file_size=size, footer=footer)
        if footer.disk_type == VHD_TYPE_FIXED:
            return layout
        layout.footer_copy = VhdFooter.parse(_read(path, 0, SECTOR))
        dyn = _read(path, footer.data_offset, VHD_DYNAMIC_HEADER_LENGTH)
        if dyn[0:8] != VHD_DYNAMIC_COOKIE:
            raise ValueError(f"{path}: no dynamic disk header at {footer.data_offset:#x}")
        layout.table_offset = _unpack(">Q", dyn, 16)
        layout.max_table_entries = _unpack(">I", dyn, 28)
        layout.block_size = _unpack(">I", dyn, 32)
        bat = _read(path, layout.table_offset, 4 * layout.max_table_entries)
        layout.bat = list(struct.unpack(f">{layout.max_table_entries}I", bat))
        return layout


# ------------------------------------------------------------------------------------------------
# VHDX

VHDX_FILE_SIGNATURE = b"vhdxfile"
VHDX_HEADER_OFFSETS = (64 << 10, 128 << 10)
VHDX_HEADER_LENGTH = 4 << 10
VHDX_REGION_TABLE_OFFSETS = (192 << 10, 256 << 10)
VHDX_REGION_TABLE_LENGTH = 64 << 10
VHDX_BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
VHDX_METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_LOGICAL_SECTOR_SIZE_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
VHDX_BAT_STATE_MASK = 0x7
VHDX_PAYLOAD_BLOCK_FULLY_PRESENT = 6
VHDX_BAT_OFFSET_MASK = ~0xFFFFF


@dataclass
class VhdxHeader:
    signature: bytes
    sequence_number: int
    log_length: int
    log_offset: int

    @staticmethod
    def parse(buf: bytes) -> "VhdxHeader":
        return VhdxHeader(signature=bytes(buf[0:4]), sequence_number=_unpack("<Q", buf, 8),
                          log_length=_unpack("<I", buf, 68), log_offset=_unpack("<Q", buf, 72))


@dataclass
class VhdxLayout:
    file_size: int
    headers: List[VhdxHeader]
    regions: Dict[uuid.UUID, Range]  # from region table 1
    block_size: int
    virtual_size: int
    logical_sector_size: int
    bat: List[int]

    @property
    def bat_range(self) -> Range:
        return self.regions[VHDX_BAT_GUID]

    @property
    def metadata_range(self) -> Range:
        return self.regions[VHDX_METADATA_GUID]

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector_size // self.block_size

    def payload_entry_index(self, block: int) -> int:
        """Index in the BAT of payload block `block` (a sector bitmap entry follows each chunk)."""
        return block + block // self.chunk_ratio

    def guest_to_host(self, guest: int) -> Optional[int]:
        entry = self.bat[self.payload_entry_index(guest // self.block_size)]
        if entry & VHDX_BAT_STATE_MASK != VHDX_PAYLOAD_BLOCK_FULLY_PRESENT:
            return None
        return (entry & VHDX_BAT_OFFSET_MASK) + guest % self.block_size

    @staticmethod
    def read(path) -> "VhdxLayout":
        if _read(path, 0, 8) != VHDX_FILE_SIGNATURE:
            raise ValueError(f"{path}: no VHDX file type identifier")
        headers = [VhdxHeader.parse(_read(path, off, VHDX_HEADER_LENGTH))
                   for off in VHDX_HEADER_OFFSETS]
        table = _read(path, VHDX_REGION_TABLE_OFFSETS[0], VHDX_REGION_TABLE_LENGTH)
        if table[0:4] != b"regi":
            raise ValueError(f"{path}: no region table at {VHDX_REGION_TABLE_OFFSETS[0]:#x}")
        regions = {}
        for i in range(_unpack("<I", table, 8)):
            base = 16 + 32 * i
            guid = uuid.UUID(bytes_le=bytes(table[base:base + 16]))
            regions[guid] = (_unpack("<Q", table, base + 16), _unpack("<I", table, base + 24))
        meta_off, meta_len = regions[VHDX_METADATA_GUID]
        meta = _read(path, meta_off, meta_len)
        if meta[0:8] != b"metadata":
            raise ValueError(f"{path}: no metadata table at {meta_off:#x}")
        items = {}
        for i in range(_unpack("<H", meta, 10)):
            base = 32 + 32 * i
            guid = uuid.UUID(bytes_le=bytes(meta[base:base + 16]))
            items[guid] = _unpack("<I", meta, base + 16)  # offset inside the region
        block_size = _unpack("<I", meta, items[VHDX_FILE_PARAMETERS_GUID])
        virtual_size = _unpack("<Q", meta, items[VHDX_VIRTUAL_DISK_SIZE_GUID])
        sector_size = _unpack("<I", meta, items[VHDX_LOGICAL_SECTOR_SIZE_GUID])
        bat_off, bat_len = regions[VHDX_BAT_GUID]
        bat = list(struct.unpack(f"<{bat_len // 8}Q", _read(path, bat_off, bat_len)))
        return VhdxLayout(os.path.getsize(path), headers, regions, block_size, virtual_size,
                          sector_size, bat)


# ------------------------------------------------------------------------------------------------
# VMDK (hosted sparse extent)

VMDK_MAGIC = b"KDMV"
VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
VMDK_FLAG_RGD = 1 << 1
VMDK_FLAG_COMPRESSED = 1 << 16
VMDK_FLAG_MARKERS = 1 << 17


@dataclass
class VmdkHeader:
    magic: bytes
    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int  # sectors
    gd_offset: int  # sectors
    overhead: int

    @staticmethod
    def parse(buf: bytes) -> "VmdkHeader":
        return VmdkHeader(
            magic=bytes(buf[0:4]), version=_unpack("<I", buf, 4), flags=_unpack("<I", buf, 8),
            capacity=_unpack("<Q", buf, 12), grain_size=_unpack("<Q", buf, 20),
            descriptor_offset=_unpack("<Q", buf, 28), descriptor_size=_unpack("<Q", buf, 36),
            num_gtes_per_gt=_unpack("<I", buf, 44), rgd_offset=_unpack("<Q", buf, 48),
            gd_offset=_unpack("<Q", buf, 56), overhead=_unpack("<Q", buf, 64))


@dataclass
class VmdkLayout:
    path: str
    file_size: int
    header: VmdkHeader  # the footer's copy when the stream's grain directory is at the end
    gd: List[int]  # grain table sector numbers
    rgd: List[int]

    @property
    def grain_bytes(self) -> int:
        return self.header.grain_size * SECTOR

    @property
    def gt_bytes(self) -> int:
        return 4 * self.header.num_gtes_per_gt

    @property
    def gd_entries(self) -> int:
        covered = self.header.num_gtes_per_gt * self.header.grain_size
        return -(-self.header.capacity // covered)

    @property
    def gd_range(self) -> Range:
        return (self.header.gd_offset * SECTOR, 4 * self.gd_entries)

    @property
    def rgd_range(self) -> Range:
        return (self.header.rgd_offset * SECTOR, 4 * self.gd_entries)

    def gt_index(self, guest: int) -> int:
        return guest // (self.grain_bytes * self.header.num_gtes_per_gt)

    @staticmethod
    def read(path) -> "VmdkLayout":
        size = os.path.getsize(path)
        header = VmdkHeader.parse(_read(path, 0, SECTOR))
        if header.magic != VMDK_MAGIC:
            raise ValueError(f"{path}: no sparse extent header")
        if header.gd_offset == VMDK_GD_AT_END:
            header = VmdkHeader.parse(_read(path, size - 2 * SECTOR, SECTOR))
            if header.magic != VMDK_MAGIC:
                raise ValueError(f"{path}: no footer at end - 1024")
        layout = VmdkLayout(str(path), size, header, [], [])
        n = layout.gd_entries
        layout.gd = list(struct.unpack(f"<{n}I", _read(path, header.gd_offset * SECTOR, 4 * n)))
        if header.flags & VMDK_FLAG_RGD and header.rgd_offset:
            layout.rgd = list(struct.unpack(f"<{n}I",
                                            _read(path, header.rgd_offset * SECTOR, 4 * n)))
        return layout

    def grain_table_range(self, index: int, redundant: bool = False) -> Range:
        sector = (self.rgd if redundant else self.gd)[index]
        return (sector * SECTOR, self.gt_bytes)

    def grain_table_entries(self, index: int, redundant: bool = False) -> List[int]:
        off, length = self.grain_table_range(index, redundant)
        return list(struct.unpack(f"<{length // 4}I", _read(self.path, off, length)))

    def guest_to_host(self, guest: int) -> Optional[int]:
        """Host offset of a guest byte in an uncompressed extent (None if not allocated)."""
        gti = self.gt_index(guest)
        if not self.gd[gti]:
            return None
        entry = self.grain_table_entries(gti)[
            (guest // self.grain_bytes) % self.header.num_gtes_per_gt]
        if entry in (0, 1):  # unallocated, or a zeroed grain
            return None
        return entry * SECTOR + guest % self.grain_bytes


# ------------------------------------------------------------------------------------------------
# GPT

GPT_SIGNATURE = b"EFI PART"


@dataclass
class GptHeader:
    signature: bytes
    header_size: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    entries_lba: int
    num_entries: int
    entry_size: int

    @staticmethod
    def parse(buf: bytes) -> "GptHeader":
        return GptHeader(
            signature=bytes(buf[0:8]), header_size=_unpack("<I", buf, 12),
            my_lba=_unpack("<Q", buf, 24), alternate_lba=_unpack("<Q", buf, 32),
            first_usable_lba=_unpack("<Q", buf, 40), last_usable_lba=_unpack("<Q", buf, 48),
            entries_lba=_unpack("<Q", buf, 72), num_entries=_unpack("<I", buf, 80),
            entry_size=_unpack("<I", buf, 84))

    @property
    def entries_range(self) -> Range:
        return (self.entries_lba * SECTOR, self.num_entries * self.entry_size)


@dataclass
class GptPartition:
    type_guid: uuid.UUID
    first_lba: int
    last_lba: int

    @property
    def byte_range(self) -> Range:
        return (self.first_lba * SECTOR, (self.last_lba - self.first_lba + 1) * SECTOR)


@dataclass
class GptLayout:
    file_size: int
    primary: GptHeader
    backup: GptHeader
    partitions: List[GptPartition]

    @property
    def primary_header_range(self) -> Range:
        return (self.primary.my_lba * SECTOR, SECTOR)

    @property
    def backup_header_range(self) -> Range:
        return (self.primary.alternate_lba * SECTOR, SECTOR)

    @staticmethod
    def read(path) -> "GptLayout":
        primary = GptHeader.parse(_read(path, SECTOR, SECTOR))
        if primary.signature != GPT_SIGNATURE:
            raise ValueError(f"{path}: no GPT header at LBA 1")
        backup = GptHeader.parse(_read(path, primary.alternate_lba * SECTOR, SECTOR))
        if backup.signature != GPT_SIGNATURE:
            raise ValueError(f"{path}: no backup GPT header at LBA {primary.alternate_lba}")
        off, length = primary.entries_range
        table = _read(path, off, length)
        parts = []
        for i in range(primary.num_entries):
            base = i * primary.entry_size
            type_guid = uuid.UUID(bytes_le=bytes(table[base:base + 16]))
            if type_guid.int:
                parts.append(GptPartition(type_guid, _unpack("<Q", table, base + 32),
                                          _unpack("<Q", table, base + 40)))
        return GptLayout(os.path.getsize(path), primary, backup, parts)
