// The write path of a protected image: one lock-free map lookup for data writes; write-ahead
// journaling and map movement for metadata writes.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "store/protected_image_state.h"
#include "store/verifier.h"

namespace vmetafs::store {
namespace {

using Mode = ProtectedImage::State::Mode;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Whether a write to a plain file may have made it an image: its first MiB (qcow2, VHDX, VMDK
// headers, MBR and primary GPT) or a trailing footer written at the end (fixed VHD, backup GPT).
bool MayMakeImage(uint64_t offset, std::span<const uint8_t> data) {
  if (offset < (1u << 20)) return true;
  if (data.size() < 512) return false;
  const uint8_t* last = data.data() + data.size() - 512;
  return std::memcmp(last, "conectix", 8) == 0 || std::memcmp(last, "EFI PART", 8) == 0;
}

// Stages the move from `old_map` to `next` into `batch`: units the new map adds are captured from
// `reader` (the storage as it will be), units it drops are retired; then publishes `next`.
Status StageMapChange(ProtectedImage::State& st, const MetadataMap& old_map,
                      const ImageFile& reader, MetadataMap next, JournalBatch* batch) {
  std::vector<MetadataUnit> added;
  for (const MetadataUnit& u : next.units()) {
    const MetadataUnit* old = old_map.Find(u.extent, u.offset);
    if (old == nullptr || old->length != u.length) added.push_back(u);
  }
  for (const MetadataUnit& u : old_map.units()) {
    const MetadataUnit* now = next.Find(u.extent, u.offset);
    if (now == nullptr || now->length != u.length) batch->RetireUnit(st.image_id, u);
  }
  VMETAFS_RETURN_IF_ERROR(
      ReadUnits(reader, added, nullptr, [&](const MetadataUnit& u, std::span<const uint8_t> b) {
        if (b.empty()) return Status::Ok();  // another extent's file
        UnitVersion v;
        v.unit = u;
        v.content.assign(b.begin(), b.end());
        v.hash = ContentHash(b);
        v.epoch = st.flush_epoch;
        v.time_ns = NowNs();
        batch->PutUnit(st.image_id, std::move(v), nullptr);
        return Status::Ok();
      }));
  st.map.store(std::make_shared<const MetadataMap>(std::move(next)), std::memory_order_release);
  return Status::Ok();
}

// The journaled version of `u`; a unit in the map that the journal lacks (it lay past the end of
// the file when captured) starts from what the storage holds, or zeros.
Status CurrentVersion(const ProtectedImage::State& st, const MetadataUnit& u, UnitVersion* out) {
  Status s = st.protector->journal().GetUnit(st.image_id, u, out);
  if (!s.IsNotFound()) return s;
  *out = UnitVersion{};
  out->unit = u;
  out->content.assign(u.length, '\0');
  const ImageFile* file = st.file->Extent(u.extent);
  uint64_t size = 0;
  if (file != nullptr) VMETAFS_RETURN_IF_ERROR(file->Size(&size));
  if (u.offset < size) {  // the part inside the file; the rest reads as zeros
    VMETAFS_RETURN_IF_ERROR(file->ReadAt(
        u.offset, {reinterpret_cast<uint8_t*>(out->content.data()),
                   static_cast<size_t>(std::min<uint64_t>(u.length, size - u.offset))}));
  }
  out->hash = ContentHash(AsBytes(out->content));
  out->epoch = st.flush_epoch;
  return Status::Ok();
}

}  // namespace

ProtectedImage::ProtectedImage(Protector* protector, std::string path,
                               std::unique_ptr<ImageFile> file)
    : state_(std::make_unique<State>()) {
  state_->protector = protector;
  state_->path = std::move(path);
  state_->file = std::move(file);
}

ProtectedImage::~ProtectedImage() = default;

bool ProtectedImage::is_image() const {
  if (state_->image_of_extent) return state_->image_of_extent->is_image();
  return state_->mode.load() != Mode::kPlain;
}
bool ProtectedImage::is_protected() const {
  if (state_->image_of_extent) return state_->image_of_extent->is_protected();
  return state_->mode.load() == Mode::kProtected;
}

Status ProtectedImage::Write(uint64_t offset, std::span<const uint8_t> data, const IoFn& write,
                             const IoFn& write_later) {
  if (State& st = *state_; st.image_of_extent) {
    return st.image_of_extent->WriteExtent(st.extent, offset, data, write, write_later);
  }
  return WriteExtent(0, offset, data, write, write_later);
}

Status ProtectedImage::WriteExtent(uint16_t extent, uint64_t offset, std::span<const uint8_t> data,
                                   const IoFn& write, const IoFn& write_later) {
  State& st = *state_;
  // For a write whose bytes nothing here reads back (Write's comment).
  const IoFn& data_write = write_later ? write_later : write;
  const Mode mode = st.mode.load(std::memory_order_acquire);
  if (mode == Mode::kUnprotected) {
    // A map is left only where the journal failed under the image: count what it misses.
    std::shared_ptr<const MetadataMap> map = st.map.load(std::memory_order_acquire);
    if (map && !map->Touching(extent, offset, data.size()).empty()) {
      st.protector->unprotected_writes_.fetch_add(1);
    }
    return data_write();
  }
  if (mode == Mode::kPlain) {
    // A write that may have made the file an image is probed once it is on the storage; any
    // other is not read back.
    const uint64_t probe_at = st.next_probe_end.load(std::memory_order_relaxed);
    if (!MayMakeImage(offset, data) && (probe_at == 0 || offset + data.size() < probe_at)) {
      return data_write();
    }
    Status s = write();
    if (s.ok()) MaybeBecomeImage();
    return s;
  }
  std::shared_ptr<const MetadataMap> map = st.map.load(std::memory_order_acquire);
  // known_size is the image file's: extent files (sparse) grow without moving the map.
  const bool grows =
      extent == 0 && offset + data.size() > st.known_size.load(std::memory_order_relaxed);
  if (map && map->Touching(extent, offset, data.size()).empty() &&
      !(grows && st.parser->MapDependsOnFileSize()) && !st.remap_pending) {
    return data_write();
  }
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  if (st.mode.load() != Mode::kProtected) return write();
  bool moved = false;
  Status j = JournalWrite(extent, offset, data, &moved);
  if (!j.ok()) {
    VMETAFS_RETURN_IF_ERROR(Degrade(j));
    return write();
  }
  Status s = write();
  if (s.ok() && (st.remap_pending || (grows && st.parser->MapDependsOnFileSize()))) {
    Status r = Remap();
    if (!r.ok()) return Degrade(r);
  }
  return s;
}

Status ProtectedImage::JournalWrite(uint16_t extent, uint64_t offset, std::span<const uint8_t> data,
                                    bool* map_moved) {
  State& st = *state_;
  Journal& journal = st.protector->journal();
  std::shared_ptr<const MetadataMap> map = st.map.load();
  std::span<const MetadataUnit> touched = map->Touching(extent, offset, data.size());
  if (touched.empty()) return Status::Ok();
  JournalBatch batch;
  bool pointers = false;
  for (const MetadataUnit& u : touched) {
    UnitVersion prev;
    VMETAFS_RETURN_IF_ERROR(CurrentVersion(st, u, &prev));
    UnitVersion next;
    next.unit = u;
    next.content = prev.content;
    next.content.resize(u.length);
    const uint64_t lo = std::max(offset, u.offset), hi = std::min(offset + data.size(), u.end());
    std::memcpy(next.content.data() + (lo - u.offset), data.data() + (lo - offset), hi - lo);
    next.hash = ContentHash(AsBytes(next.content));
    if (next.hash == prev.hash) continue;  // rewritten unchanged (qemu rewrites whole tables)
    // Until the next completed flush the storage may still hold the replaced content.
    next.prev_hash = prev.hash;
    next.has_prev = true;
    next.epoch = st.flush_epoch;
    next.time_ns = NowNs();
    pointers = pointers || u.moves_map;
    // The epoch's first write keeps what the unit held before it as history: a power loss may
    // leave that content however often the unit is written again before the next flush.
    const bool epoch_start = prev.epoch != st.flush_epoch || !prev.has_prev;
    batch.PutUnit(st.image_id, std::move(next), epoch_start ? &prev : nullptr);
  }
  if (pointers) {
    // Derive the map this write will produce; tables it now points to were written before the
    // pointer (qemu's order) and are captured from the storage now.
    OverlayImageFile after(*st.file);
    after.Add(extent, offset, data);
    ParsedImage parsed;
    VMETAFS_RETURN_IF_ERROR(st.parser->Parse(after, st.protector->options().limits, &parsed));
    if (!parsed.valid()) {
      // A pointer update in several writes (a header rewritten piecewise): keep the old map and
      // derive it again after the next metadata write.
      st.remap_pending = true;
      spdlog::debug("{}: map transiently invalid after write at {}: {}", st.path, offset,
                    parsed.problems.front());
    } else {
      st.remap_pending = false;
      VMETAFS_RETURN_IF_ERROR(StageMapChange(st, *map, after, std::move(parsed.map), &batch));
      *map_moved = true;
    }
  }
  if (batch.empty()) return Status::Ok();
  VMETAFS_RETURN_IF_ERROR(journal.Write(batch));
  st.dirty = true;
  st.write_gen.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

Status ProtectedImage::Remap() {
  State& st = *state_;
  ParsedImage parsed;
  VMETAFS_RETURN_IF_ERROR(st.parser->Parse(*st.file, st.protector->options().limits, &parsed));
  uint64_t size = 0;
  VMETAFS_RETURN_IF_ERROR(st.file->Size(&size));
  st.known_size.store(size);
  if (!parsed.valid()) {
    st.remap_pending = true;
    return Status::Ok();
  }
  st.remap_pending = false;
  JournalBatch batch;
  VMETAFS_RETURN_IF_ERROR(
      StageMapChange(st, *st.map.load(), *st.file, std::move(parsed.map), &batch));
  if (batch.empty()) return Status::Ok();
  VMETAFS_RETURN_IF_ERROR(st.protector->journal().Write(batch));
  st.dirty = true;
  st.write_gen.fetch_add(1);
  return Status::Ok();
}

Status ProtectedImage::Truncate(uint64_t new_size, const IoFn& truncate) {
  if (State& st = *state_; st.image_of_extent) {
    return st.image_of_extent->TruncateExtent(st.extent, new_size, truncate);
  }
  return TruncateExtent(0, new_size, truncate);
}

Status ProtectedImage::TruncateExtent(uint16_t extent, uint64_t new_size, const IoFn& truncate) {
  State& st = *state_;
  if (st.mode.load() != Mode::kProtected) {
    Status s = truncate();
    if (s.ok() && st.mode.load() == Mode::kPlain && new_size == 0 && extent == 0) {
      std::lock_guard<std::mutex> lock(st.meta_mutex);
      st.probe_attempts = 0;  // a new file takes shape
    }
    return s;
  }
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  VMETAFS_RETURN_IF_ERROR(truncate());
  Status r = Remap();
  return r.ok() ? r : Degrade(r);
}

Status ProtectedImage::Discard(uint64_t offset, uint64_t length, const IoFn& discard) {
  if (State& st = *state_; st.image_of_extent) {
    return st.image_of_extent->DiscardExtent(st.extent, offset, length, discard);
  }
  return DiscardExtent(0, offset, length, discard);
}

Status ProtectedImage::DiscardExtent(uint16_t extent, uint64_t offset, uint64_t length,
                                     const IoFn& discard) {
  State& st = *state_;
  std::shared_ptr<const MetadataMap> map = st.map.load();
  if (st.mode.load() != Mode::kProtected || !map || map->Touching(extent, offset, length).empty()) {
    return discard();
  }
  // A hole punched over live metadata reads back as zeros: journal it as a write of zeros.
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  std::span<const MetadataUnit> touched = st.map.load()->Touching(extent, offset, length);
  if (!touched.empty()) {
    const uint64_t lo = std::max(offset, touched.front().offset);
    const uint64_t hi = std::min(offset + length, touched.back().end());
    std::vector<uint8_t> zeros(hi - lo, 0);
    bool moved = false;
    Status j = JournalWrite(extent, lo, zeros, &moved);
    if (!j.ok()) VMETAFS_RETURN_IF_ERROR(Degrade(j));
  }
  return discard();
}

Status ProtectedImage::Flush(const IoFn& fsync) {
  State& st = *state_;
  // An extent file's flush is its image's: the image's journal is made durable before it.
  if (st.image_of_extent) return st.image_of_extent->Flush(fsync);
  const uint64_t gen = st.write_gen.load();
  Journal& journal = st.protector->journal();
  // Write-ahead across a power loss too: what the storage's fsync makes durable must be durable
  // in the journal first, or a crash between the two leaves the storage newer than the journal.
  if (st.mode.load() == Mode::kProtected && journal.options().sync == SyncMode::kFlush) {
    Status s = journal.Sync();
    if (!s.ok()) VMETAFS_RETURN_IF_ERROR(Degrade(s));
  }
  VMETAFS_RETURN_IF_ERROR(fsync());
  if (st.mode.load() == Mode::kPlain && st.next_probe_end.load() != 0) MaybeBecomeImage();
  if (st.mode.load() != Mode::kProtected) return Status::Ok();
  {
    std::lock_guard<std::mutex> lock(st.meta_mutex);
    if (!st.dirty) return Status::Ok();
    // Only writes journaled before the storage's fsync began are durable on the storage now.
    if (st.write_gen.load() == gen) {
      Status s = journal.CompleteFlush(st.image_id);
      if (!s.ok()) return Degrade(s);
      ++st.flush_epoch;
      st.dirty = false;
    }
  }
  // CompleteFlush is durable on return (sync=flush, sync=write): nothing is left to sync.
  return Status::Ok();
}

void ProtectedImage::PatchRead(uint64_t offset, std::span<uint8_t> buf) const {
  const State& st = *state_;
  // Only the image file's units are served (extent files: not yet).
  if (!st.serving.load(std::memory_order_acquire)) return;
  const uint64_t end = offset + buf.size();
  for (const auto& [unit_offset, bytes] : st.served) {
    const uint64_t lo = std::max(offset, unit_offset);
    const uint64_t hi = std::min(end, unit_offset + bytes.size());
    if (lo < hi)
      std::memcpy(buf.data() + (lo - offset), bytes.data() + (lo - unit_offset), hi - lo);
  }
}

Status ProtectedImage::Release() {
  State& st = *state_;
  if (st.image_of_extent) return Status::Ok();  // the image records its files at its own close
  UnbindExtents();
  if (st.mode.load() == Mode::kPlain && st.next_probe_end.load() != 0) MaybeBecomeImage();
  std::lock_guard<std::mutex> lock(st.meta_mutex);
  if (st.image_id == 0) return Status::Ok();
  FileIdentity identity;
  VMETAFS_RETURN_IF_ERROR(st.file->Identity(&identity));
  const bool unprotected = st.mode.load() == Mode::kUnprotected;
  Status s = st.protector->UpdateImage(st.image_id, [&](ImageRecord* r) {
    r->identity = identity;
    r->in_use = false;
    if (unprotected && r->protection == Protection::kProtected) {
      r->protection = Protection::kUnprotected;
      r->unprotected_reason = "the journal could not be written while the image was open";
    }
  });
  if (s.ok()) s = st.protector->journal().Sync();
  if (!s.ok())
    spdlog::error("{}: could not record the close in the journal: {}", st.path, s.ToString());
  return s;
}

void ProtectedImage::BindExtents() {
  State& st = *state_;
  Protector& p = *st.protector;
  if (st.mode.load() != Mode::kProtected) return;
  const std::vector<std::string>& names = st.extent_files;
  for (size_t i = 0; i < names.size(); ++i) {
    std::string path;
    if (!ExtentPath(st.path, names[i], &path).ok()) continue;  // the parse reported it
    {
      std::lock_guard<std::mutex> lock(p.extents_mutex_);
      p.extent_files_[path] = {weak_from_this(), static_cast<uint16_t>(i + 1)};
    }
    // Born through the mount before its descriptor (qemu-img create writes the extents first),
    // an extent file was journaled as an image of its own: it is this image's now.
    std::lock_guard<std::mutex> lock(p.records_mutex_);
    ImageRecord own;
    if (p.journal_->FindImage(path, &own).ok() && own.id != st.image_id) {
      Status s = p.journal_->DeleteImage(own.id);
      if (s.ok()) {
        spdlog::info("{}: now journaled as extent {} of {}", path, i + 1, st.path);
      } else {
        spdlog::error("{}: extent {} of {}, but its own journal could not be dropped: {}", path,
                      i + 1, st.path, s.ToString());
      }
    }
  }
}

void ProtectedImage::UnbindExtents() {
  Protector& p = *state_->protector;
  std::lock_guard<std::mutex> lock(p.extents_mutex_);
  std::erase_if(p.extent_files_, [this](const auto& entry) {
    std::shared_ptr<ProtectedImage> image = entry.second.first.lock();
    return image == nullptr || image.get() == this;
  });
}

Status ProtectedImage::Degrade(const Status& journal_error) {
  State& st = *state_;
  st.protector->unprotected_writes_.fetch_add(1);
  if (st.protector->options().fail_writes_when_unprotected) {
    spdlog::error(
        "{}: journal write failed, failing the guest's write (unprotected_writes=fail): {}",
        st.path, journal_error.ToString());
    return journal_error;
  }
  {
    std::lock_guard<std::mutex> lock(st.protector->records_mutex_);
    st.protector->degraded_.emplace(st.image_id, journal_error.ToString());
  }
  if (st.mode.exchange(Mode::kUnprotected) != Mode::kUnprotected) {
    spdlog::error(
        "{}: journal write failed: {}; the image is now UNPROTECTED and keeps running; "
        "protection resumes with a fresh baseline at its next first open",
        st.path, journal_error.ToString());
    // Best effort: the journal is failing, so this may not land; Release() tries again.
    (void)st.protector->UpdateImage(st.image_id, [&](ImageRecord* r) {
      r->protection = Protection::kUnprotected;
      r->unprotected_reason = journal_error.ToString();
    });
  }
  return Status::Ok();
}

}  // namespace vmetafs::store
