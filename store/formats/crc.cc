#include "store/formats/crc.h"

#include <isa-l/crc.h>

#include <algorithm>
#include <climits>

namespace vmetafs::store {
namespace {

// ISA-L's iSCSI CRC keeps the running register un-inverted and takes an int length: feed it in
// pieces and invert once at the end.
uint32_t Crc32cUpdate(uint32_t reg, std::span<const uint8_t> data) {
  constexpr size_t kPiece = 1u << 30;
  while (!data.empty()) {
    const size_t n = std::min(data.size(), kPiece);
    // crc32_iscsi only reads the buffer; its prototype just lacks the const.
    reg = crc32_iscsi(const_cast<uint8_t*>(data.data()), static_cast<int>(n), reg);
    data = data.subspan(n);
  }
  return reg;
}

// ISA-L's gzip CRC takes and returns the finished (inverted) value, like zlib's crc32().
uint32_t Crc32Update(uint32_t crc, std::span<const uint8_t> data) {
  return data.empty() ? crc : crc32_gzip_refl(crc, data.data(), data.size());
}

constexpr uint8_t kZeros[4] = {0, 0, 0, 0};

template <typename Update>
uint32_t WithZeroedField(uint32_t init, std::span<const uint8_t> data, size_t zeroed_field,
                         Update update) {
  if (zeroed_field == kNoZeroedField || zeroed_field > data.size() ||
      data.size() - zeroed_field < 4) {
    return update(init, data);
  }
  uint32_t c = update(init, data.first(zeroed_field));
  c = update(c, std::span<const uint8_t>(kZeros, 4));
  return update(c, data.subspan(zeroed_field + 4));
}

}  // namespace

uint32_t Crc32c(std::span<const uint8_t> data, size_t zeroed_field) {
  return ~WithZeroedField(0xFFFFFFFFu, data, zeroed_field, Crc32cUpdate);
}

uint32_t Crc32(std::span<const uint8_t> data, size_t zeroed_field) {
  return WithZeroedField(0u, data, zeroed_field, Crc32Update);
}

}  // namespace vmetafs::store
