// Private to store/: the state behind a ProtectedImage, shared by protected_image.cc (write path)
// and first_open.cc (first-open decision).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "store/protector.h"

namespace vmetafs::store {

struct ProtectedImage::State {
  enum class Mode : uint8_t {
    kPlain,        // not an image (yet): writes near its start are probed
    kProtected,    // mapped and journaled
    kUnprotected,  // an image vmetafs cannot protect now (invalid, or the journal failed)
  };

  Protector* protector = nullptr;
  std::unique_ptr<ImageFile> file;  // the daemon's own handle on the backing file

  // Serializes metadata writes, flushes and remaps of this image, so that the journal's order is
  // the storage's order. Data writes never take it.
  std::mutex meta_mutex;
  std::string path;       // for log lines and events
  uint64_t image_id = 0;  // 0 until the image has a journal record
  const FormatParser* parser = nullptr;
  std::vector<std::string> extent_files;  // ParsedImage::extent_files when last protected
  uint64_t flush_epoch = 0;               // mirror of the record's flush_epoch
  bool dirty = false;                     // metadata journaled since the last completed flush
  uint32_t probe_attempts = 0;            // plain mode: parses tried while the file takes shape

  // Read without the lock on the write path.
  std::atomic<Mode> mode{Mode::kPlain};
  std::atomic<std::shared_ptr<const MetadataMap>> map;
  std::atomic<uint64_t> write_gen{0};      // bumped by every journaled write
  std::atomic<bool> remap_pending{false};  // a pointer write left the map transiently invalid
  std::atomic<uint64_t> known_size{0};     // file size the map was derived at
  // Plain mode: the file carries an image's magic but its tables are not all written yet (an
  // image copied in sequentially). A write reaching this offset, a flush or the last close probes
  // again; 0 when the file does not look like an image.
  std::atomic<uint64_t> next_probe_end{0};

  // Set for the ProtectedImage of an extent file: every operation goes to the image's, with
  // `extent`; nothing else in this State is used.
  std::shared_ptr<ProtectedImage> image_of_extent;
  uint16_t extent = 0;

  // Units a restore could not write back, served from memory; set once, before publication.
  std::atomic<bool> serving{false};
  std::map<uint64_t, std::string> served;
};

}  // namespace vmetafs::store
