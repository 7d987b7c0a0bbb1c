// Keys and records of the journal's RocksDB store: private to store/journal.cc.
//
// The layouts are described in docs/journal-format.md; every function here implements one
// paragraph of it. Keys use big-endian integers so that RocksDB's bytewise order is numeric
// order. Every value starts with a record version byte (kRecordVersion) except the `content`
// column family, whose values are the unit's bytes exactly. Decoders never trust their input:
// a short, long or unknown record is reported as Corruption. (journal_codec.cc also holds
// ActionName and ParseAction of journal.h: the words for the actions an event records.)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "store/journal.h"
#include "store/status.h"

namespace vmetafs::store::journal_codec {

inline constexpr uint8_t kRecordVersion = 1;
// Version of the store as a whole (column families, key layouts). Bumped on incompatible change.
inline constexpr uint32_t kFormatVersion = 1;

// Keys of the `default` column family.
inline constexpr std::string_view kStoreKey = "store";
inline constexpr std::string_view kNextImageIdKey = "next_image_id";
inline constexpr std::string_view kNextSeqKey = "next_seq";

// The `images` column family holds, per image id, the record and two max-merged counters.
enum class ImageTag : uint8_t { kRecord = 0, kLastSeq = 1, kFlushEpoch = 2 };

// Size of a unit key: image id (8), extent (2), offset (8).
inline constexpr size_t kUnitKeySize = 18;
inline constexpr size_t kUnitRecordSize = 55;

std::string IdPrefix(uint64_t id);  // 8 bytes: the prefix of everything keyed by image id
std::string ImageKey(uint64_t id, ImageTag tag);
std::string UnitKey(uint64_t image_id, uint16_t extent, uint64_t offset);
std::string HistoryKey(std::string_view unit_key, uint32_t slot);
std::string EventKey(uint64_t image_id, uint64_t seq);
std::string QuarantineKey(uint64_t event_seq, uint16_t extent, uint64_t offset);
// The smallest key greater than every key that starts with `prefix` (an exclusive range end).
std::string PrefixEnd(std::string_view prefix);

bool DecodeImageKey(std::string_view key, uint64_t* id, ImageTag* tag);
bool DecodeUnitKey(std::string_view key, uint64_t* image_id, uint16_t* extent, uint64_t* offset);
bool DecodeEventKey(std::string_view key, uint64_t* image_id, uint64_t* seq);

// Store record (`default`/"store").
struct StoreRecord {
  uint32_t format_version = kFormatVersion;
  int64_t created_ns = 0;
  std::string backing;
};
std::string EncodeStore(const StoreRecord& r);
Status DecodeStore(std::string_view value, StoreRecord* r);

// Counters: next_image_id, next_seq, an image's last_seq and flush_epoch. Merged by maximum.
std::string EncodeCounter(uint64_t v);
bool DecodeCounter(std::string_view value, uint64_t* v);

std::string EncodePathValue(uint64_t id);
Status DecodePathValue(std::string_view value, uint64_t* id);

// Image record; the id is in the key, not the value.
std::string EncodeImage(const ImageRecord& r);
Status DecodeImage(std::string_view value, ImageRecord* r);

// Unit record: the version without its content, plus a history number. In `units` it is the
// count of versions the unit has sent to its history ring; in a history value, the index of
// that version among them (0 for the first). Extent and offset are in the key; the decoder fills
// them from `key`. A history value is a unit record followed by the content.
std::string EncodeUnitRecord(const UnitVersion& v, uint64_t history);
Status DecodeUnitRecord(std::string_view key, std::string_view value, UnitVersion* v,
                        uint64_t* history);
Status DecodeHistoryValue(std::string_view unit_key, std::string_view value, UnitVersion* v,
                          uint64_t* history);

// Event; seq and image id are in the key.
std::string EncodeEvent(const Event& e);
Status DecodeEvent(std::string_view key, std::string_view value, Event* e);

// A quarantined unit; with `same_as`, its bytes are those of that unit of the same event and are
// not stored again.
std::string EncodeQuarantine(const MetadataUnit& unit, std::string_view bytes,
                             const MetadataUnit* same_as);
struct QuarantineRecord {
  QuarantinedUnit unit;  // bytes empty when same_as
  bool same_as = false;
  uint16_t same_extent = 0;
  uint64_t same_offset = 0;
};
Status DecodeQuarantine(std::string_view key, std::string_view value, QuarantineRecord* rec);

}  // namespace vmetafs::store::journal_codec
