// The checksums the formats use, computed by ISA-L.
//
// Crc32c: CRC-32C (Castagnoli, as iSCSI), used by VHDX for headers, region tables, metadata and
// log entries (MS-VHDX 2.2.2, 2.2.3, 2.3.1.1). Crc32: the reflected IEEE CRC-32 of zlib and gzip,
// used by GPT for its headers and partition entry arrays (UEFI 2.x, 5.3.2). Both take the whole
// structure and, optionally, the offset of a 4-byte checksum field that counts as zeros, as the
// specifications compute them. Pure functions, safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace vmetafs::store {

inline constexpr size_t kNoZeroedField = static_cast<size_t>(-1);

// CRC-32C of `data`, with the 4 bytes at `zeroed_field` (when given and inside) read as zeros.
uint32_t Crc32c(std::span<const uint8_t> data, size_t zeroed_field = kNoZeroedField);
// IEEE CRC-32 (zlib) of `data`, with the 4 bytes at `zeroed_field` read as zeros.
uint32_t Crc32(std::span<const uint8_t> data, size_t zeroed_field = kNoZeroedField);

}  // namespace vmetafs::store
