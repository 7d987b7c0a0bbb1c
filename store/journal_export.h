// Export and import of one image's journal (meta-restore export / import): a self-contained file
// that another host mounting the same storage imports so that the image is protected there.
//
// File format, version 1. All integers are big-endian; a string is a u32 byte count followed by
// the bytes.
//
//   magic     8 bytes  "VMJEXPRT"
//   version   u32      1
//   section*           one kHeader, one kRecord, then kVersion and kEvent sections in the
//                      exporting store's sequence order, each kEvent followed by its kQuarantine
//                      sections, then exactly one kEnd, which is the last thing in the file
//   section:  type u32 | length u64 | payload (length bytes) | XXH3-64 of type, length, payload
//
//   kHeader     (1): image path, backing id of the exporting store, export time (i64 ns),
//                    history_versions of the exporting store (u32), flags (u32, bit 0: quarantine
//                    included)
//   kRecord     (2): the image record (see EncodeRecord in journal_export.cc, field by field)
//   kVersion    (3): latest flag (u8: 1 for the unit's latest version, 0 for history), unit
//                    (offset u64, length u32, extent u16, kind u8, moves_map u8), seq, epoch,
//                    hash, prev_hash (u64 each), has_prev (u8), time_ns (i64), content (string)
//   kEvent      (4): seq (u64), time_ns (i64), image path (string), action (u8), unit count
//                    (u32) and the units, detail (string)
//   kQuarantine (5): event seq (u64), unit, bytes (string)
//   kEnd   (65535): number of sections before it (u64), XXH3-64 of every byte of the file
//                    before the kEnd section
//
// A reader refuses (Corruption) a file with a bad magic, an unknown version, a section whose
// checksum or payload does not add up, a missing or misplaced kEnd (a truncated file), a section
// count or whole-file hash that differs, or content whose hash differs from the recorded one.
//
// Thread safety: stateless functions; ImportJournal needs a writable Journal and must be the only
// writer of the image's record meanwhile.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "store/journal.h"
#include "store/status.h"

namespace vmetafs::store {

inline constexpr char kExportMagic[] = "VMJEXPRT";  // 8 bytes, no terminator in the file
inline constexpr uint32_t kExportVersion = 1;

struct JournalExport {
  std::string image_path;  // as the exporting store knew it
  std::string backing;     // the exporting store's backing id
  int64_t exported_ns = 0;
  uint32_t history_versions = 0;
  bool with_quarantine = false;
  ImageRecord record;
  struct Version {
    UnitVersion version;  // with content
    bool latest = false;
  };
  std::vector<Version> versions;                                // by seq
  std::vector<Event> events;                                    // by seq
  std::map<uint64_t, std::vector<QuarantinedUnit>> quarantine;  // by event seq

  uint64_t ContentBytes() const;
};

// Gathers the journal of `image`: record, latest units and history with content, events and
// (when `with_quarantine`) their quarantined bytes.
Status CollectExport(const Journal& journal, const ImageRecord& image, bool with_quarantine,
                     JournalExport* out);

std::string EncodeExport(const JournalExport& e);
// Corruption (with where and what) for anything but a whole, intact file.
Status DecodeExport(std::string_view bytes, JournalExport* out);

// Writes the file next to `path` and renames it into place once synced.
Status WriteExportFile(const std::string& path, const JournalExport& e);
Status ReadExportFile(const std::string& path, JournalExport* out);

struct ImportResult {
  ImageRecord record;        // the imported image as the store now has it
  bool replaced = false;     // the store had a journal for the path: replaced by the import
  uint64_t replaced_id = 0;  // its id (its events stay in the store)
  size_t units = 0, versions = 0, events = 0, quarantined = 0;
};

// Imports `e` under e.image_path. The versions are written in their original order, so that
// sequence numbers keep their relative order in this store (they are renumbered) and the
// history ring is rebuilt; times are kept. A journal the store already has for the path is
// replaced atomically once the import is complete (like rename(2) over a file: its events stay).
Status ImportJournal(Journal& journal, const JournalExport& e, ImportResult* result);

}  // namespace vmetafs::store
