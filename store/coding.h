// Explicit big- and little-endian encoding (after leveldb util/coding.h). Formats are decoded
// field by field from byte spans, never by casting packed structs.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>

namespace vmetafs::store {

inline uint16_t LoadBe16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
inline uint32_t LoadBe32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}
inline uint64_t LoadBe64(const uint8_t* p) { return uint64_t{LoadBe32(p)} << 32 | LoadBe32(p + 4); }
inline uint16_t LoadLe16(const uint8_t* p) { return static_cast<uint16_t>(p[1] << 8 | p[0]); }
inline uint32_t LoadLe32(const uint8_t* p) {
  return uint32_t{p[3]} << 24 | uint32_t{p[2]} << 16 | uint32_t{p[1]} << 8 | uint32_t{p[0]};
}
inline uint64_t LoadLe64(const uint8_t* p) { return uint64_t{LoadLe32(p + 4)} << 32 | LoadLe32(p); }

inline void StoreBe32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}
inline void StoreBe64(uint8_t* p, uint64_t v) {
  StoreBe32(p, static_cast<uint32_t>(v >> 32));
  StoreBe32(p + 4, static_cast<uint32_t>(v));
}
inline void StoreLe32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}
inline void StoreLe64(uint8_t* p, uint64_t v) {
  StoreLe32(p, static_cast<uint32_t>(v));
  StoreLe32(p + 4, static_cast<uint32_t>(v >> 32));
}

// Appends a big-endian fixed-width integer to a key or record (keys sort in numeric order).
inline void PutBe64(std::string* dst, uint64_t v) {
  uint8_t b[8];
  StoreBe64(b, v);
  dst->append(reinterpret_cast<const char*>(b), 8);
}
inline void PutBe32(std::string* dst, uint32_t v) {
  uint8_t b[4];
  StoreBe32(b, v);
  dst->append(reinterpret_cast<const char*>(b), 4);
}
inline void PutBe16(std::string* dst, uint16_t v) {
  dst->push_back(static_cast<char>(v >> 8));
  dst->push_back(static_cast<char>(v));
}

}  // namespace vmetafs::store
