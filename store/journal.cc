// The journal over RocksDB. Record layouts: store/journal_codec.h and docs/journal-format.md.
//
// Lock order: Impl::life (shared by every call, exclusive in Close) before Impl::namespace_mu
// (image creation, rename, deletion) before the image stripes (Impl::stripes, taken in index
// order) before RocksStore's sync lock. RocksDB's own locks are innermost.
#include "store/journal.h"

#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <unordered_map>

#include "store/journal_codec.h"
#include "store/journal_rocks.h"

namespace vmetafs::store {

namespace jc = journal_codec;

namespace {

constexpr size_t kImageStripes = 64;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

uint64_t HashOf(std::string_view s) { return XXH3_64bits(s.data(), s.size()); }

Status CheckContent(const UnitVersion& v, uint64_t image_id) {
  if (HashOf(v.content) == v.hash) return Status::Ok();
  return Status::Corruption(fmt::format(
      "journal content of {} at extent {} offset {} of image {} does not match its hash",
      UnitKindName(v.unit.kind), v.unit.extent, v.unit.offset, image_id));
}

}  // namespace

struct Journal::Impl {
  JournalOptions options;
  RocksStore store;
  std::atomic<uint64_t> next_seq{1};
  std::atomic<uint64_t> next_image_id{1};

  // Held shared by every call and exclusively by Close(), so the DB is never closed under a call.
  mutable std::shared_mutex life;
  std::mutex namespace_mu;
  // Writes of one image are serialized (a unit's history count is read-modify-write); writes
  // of different images mostly land on different stripes and are group committed by RocksDB.
  std::array<std::mutex, kImageStripes> stripes;
  Status CheckOpen() const {
    return store.is_open() ? Status::Ok() : Status::IoError("the journal is closed", EBADF);
  }
  Status CheckWritable() const {
    VMETAFS_RETURN_IF_ERROR(CheckOpen());
    if (options.read_only) return Status::NotSupported("the journal was opened read-only");
    return Status::Ok();
  }
  bool SyncEveryWrite() const { return options.sync == SyncMode::kWrite; }

  // Decodes every record of `cf` under `prefix` into *out, in key order.
  template <typename T>
  Status Collect(Cf cf, std::string_view prefix,
                 Status (*decode)(std::string_view, std::string_view, T*),
                 std::vector<T>* out) const {
    out->clear();
    return store.Scan(cf, prefix, nullptr, [&](std::string_view k, std::string_view v) {
      out->emplace_back();
      return decode(k, v, &out->back());
    });
  }

  std::vector<std::unique_lock<std::mutex>> LockImages(std::set<uint64_t> ids);
  Status LoadCounters();
  Status ReadImage(uint64_t id, ImageRecord* out, const rocksdb::Snapshot* snap = nullptr) const;
  Status LookupPath(std::string_view path, uint64_t* id) const;
  // The unit's latest record (NotFound when the journal does not hold it) and history count.
  Status ReadUnit(const std::string& key, const rocksdb::Snapshot* snap, UnitVersion* v,
                  uint64_t* pushed) const;
  Status HistoryCount(const std::string& key, std::map<std::string, uint64_t>* seen,
                      uint64_t* count) const;
  Status HistoryValue(const JournalBatch::Op& op, const std::string& key, uint64_t index,
                      std::string* value) const;
  Status AddUnit(JournalBatch::Op& op, std::map<std::string, uint64_t>* seen, WriteSet* ws) const;
  Status AddBatch(JournalBatch& batch, const std::map<uint64_t, std::string>& paths, WriteSet* ws);
  void AddDeleteUnits(uint64_t id, WriteSet* ws) const;
  void AddDeleteImage(const ImageRecord& im, WriteSet* ws) const;
  Status Close() {
    std::unique_lock<std::shared_mutex> lock(life);
    return store.Close();
  }
};

std::vector<std::unique_lock<std::mutex>> Journal::Impl::LockImages(std::set<uint64_t> ids) {
  std::set<size_t> idx;
  for (uint64_t id : ids) idx.insert(id % kImageStripes);
  std::vector<std::unique_lock<std::mutex>> locks;
  for (size_t i : idx) locks.emplace_back(stripes[i]);
  return locks;
}

Status Journal::Impl::LoadCounters() {
  uint64_t v = 0;
  VMETAFS_RETURN_IF_ERROR(store.GetCounter(Cf::kDefault, jc::kNextSeqKey, &v));
  next_seq = std::max<uint64_t>(v, 1);
  VMETAFS_RETURN_IF_ERROR(store.GetCounter(Cf::kDefault, jc::kNextImageIdKey, &v));
  next_image_id = std::max<uint64_t>(v, 1);
  return Status::Ok();
}

Status Journal::Impl::ReadImage(uint64_t id, ImageRecord* out,
                                const rocksdb::Snapshot* snap) const {
  std::string value;
  Status s = store.Get(Cf::kImages, jc::ImageKey(id, jc::ImageTag::kRecord), &value, snap);
  if (s.IsNotFound()) return Status::NotFound(fmt::format("no image {} in the journal", id));
  VMETAFS_RETURN_IF_ERROR(s);
  VMETAFS_RETURN_IF_ERROR(jc::DecodeImage(value, out));
  out->id = id;
  // The monotonic fields also live in max-merged counters, so that a concurrent PutImage of an
  // older copy of the record can never move them back.
  uint64_t c = 0;
  VMETAFS_RETURN_IF_ERROR(
      store.GetCounter(Cf::kImages, jc::ImageKey(id, jc::ImageTag::kLastSeq), &c, snap));
  out->last_seq = std::max(out->last_seq, c);
  VMETAFS_RETURN_IF_ERROR(
      store.GetCounter(Cf::kImages, jc::ImageKey(id, jc::ImageTag::kFlushEpoch), &c, snap));
  out->flush_epoch = std::max(out->flush_epoch, c);
  return Status::Ok();
}

Status Journal::Impl::LookupPath(std::string_view path, uint64_t* id) const {
  std::string value;
  Status s = store.Get(Cf::kPaths, path, &value);
  if (s.IsNotFound()) return Status::NotFound("no image " + std::string(path) + " in the journal");
  VMETAFS_RETURN_IF_ERROR(s);
  return jc::DecodePathValue(value, id);
}

Status Journal::Impl::ReadUnit(const std::string& key, const rocksdb::Snapshot* snap,
                               UnitVersion* v, uint64_t* pushed) const {
  std::string record;
  VMETAFS_RETURN_IF_ERROR(store.Get(Cf::kUnits, key, &record, snap));
  return jc::DecodeUnitRecord(key, record, v, pushed);
}

// How many versions the unit has sent to its history ring (0 for a unit the journal does not
// hold), as this batch leaves it.
Status Journal::Impl::HistoryCount(const std::string& key, std::map<std::string, uint64_t>* seen,
                                   uint64_t* count) const {
  if (auto it = seen->find(key); it != seen->end()) {
    *count = it->second;
    return Status::Ok();
  }
  UnitVersion stored;
  Status s = ReadUnit(key, nullptr, &stored, count);
  if (s.IsNotFound()) *count = 0;
  return s.IsNotFound() ? Status::Ok() : s;
}

// The history value of the replaced version: its record (numbered `index`) and its content.
Status Journal::Impl::HistoryValue(const JournalBatch::Op& op, const std::string& key,
                                   uint64_t index, std::string* value) const {
  const UnitVersion& prev = op.previous;
  std::string stored;
  if (prev.content.empty()) {
    // Loaded without content: the replaced version's bytes are the stored latest ones.
    Status s = store.Get(Cf::kContent, key, &stored);
    if (!s.ok() && !s.IsNotFound()) return s;
  }
  std::string_view content = prev.content.empty() ? stored : prev.content;
  if (prev.unit.length == 0 || HashOf(content) != prev.hash) {
    return Status::InvalidArgument(
        fmt::format("unit at offset {} of image {}: the previous version's content is missing "
                    "or does not match its hash",
                    prev.unit.offset, op.image_id));
  }
  *value = jc::EncodeUnitRecord(prev, index);
  value->append(content);
  return Status::Ok();
}

Status Journal::Impl::AddUnit(JournalBatch::Op& op, std::map<std::string, uint64_t>* seen,
                              WriteSet* ws) const {
  UnitVersion& v = op.version;
  if (v.unit.length == 0 || v.content.size() != v.unit.length || HashOf(v.content) != v.hash) {
    return Status::InvalidArgument(fmt::format(
        "unit at offset {} of image {}: {} bytes of content for a unit of {}, or a wrong hash",
        v.unit.offset, op.image_id, v.content.size(), v.unit.length));
  }
  if (v.time_ns == 0) v.time_ns = NowNs();
  std::string key = jc::UnitKey(op.image_id, v.unit.extent, v.unit.offset);
  uint64_t pushed = 0;
  VMETAFS_RETURN_IF_ERROR(HistoryCount(key, seen, &pushed));
  const uint32_t ring = options.history_versions;
  if (op.has_previous && ring > 0) {
    // Slots go round by the versions pushed, not by the writes: a unit rewritten many times
    // without a previous (within one flush epoch) still keeps its `ring` newest older versions.
    std::string value;
    VMETAFS_RETURN_IF_ERROR(HistoryValue(op, key, pushed, &value));
    ws->Put(store.cf(Cf::kHistory), jc::HistoryKey(key, static_cast<uint32_t>(pushed % ring)),
            value);
    ++pushed;
  }
  (*seen)[key] = pushed;
  ws->Put(store.cf(Cf::kUnits), key, jc::EncodeUnitRecord(v, pushed));
  ws->Put(store.cf(Cf::kContent), key, v.content);
  return Status::Ok();
}

Status Journal::Impl::AddBatch(JournalBatch& batch, const std::map<uint64_t, std::string>& paths,
                               WriteSet* ws) {
  uint64_t units = 0;
  for (const JournalBatch::Op& op : batch.ops_)
    units += op.type == JournalBatch::Op::Type::kPutUnit;
  uint64_t seq = units > 0 ? next_seq.fetch_add(units) : 0;
  std::map<std::string, uint64_t> pushed;  // history count per unit key, as the batch leaves it
  std::map<uint64_t, uint64_t> last_seq;
  for (JournalBatch::Op& op : batch.ops_) {
    switch (op.type) {
      case JournalBatch::Op::Type::kPutUnit:
        op.version.seq = seq++;
        last_seq[op.image_id] = op.version.seq;
        VMETAFS_RETURN_IF_ERROR(AddUnit(op, &pushed, ws));
        break;
      case JournalBatch::Op::Type::kRetireUnit: {
        std::string key = jc::UnitKey(op.image_id, op.version.unit.extent, op.version.unit.offset);
        ws->Delete(store.cf(Cf::kUnits), key);
        ws->Delete(store.cf(Cf::kContent), key);
        ws->DeleteRange(store.cf(Cf::kHistory), key, jc::PrefixEnd(key));
        pushed[key] = 0;
        break;
      }
      case JournalBatch::Op::Type::kPutImage:
        // The path belongs to CreateImage and RenameImage, which keep the path index in step.
        op.image.path = paths.at(op.image_id);
        ws->Put(store.cf(Cf::kImages), jc::ImageKey(op.image_id, jc::ImageTag::kRecord),
                jc::EncodeImage(op.image));
        break;
    }
  }
  for (auto [id, last] : last_seq) {
    ws->Merge(store.cf(Cf::kImages), jc::ImageKey(id, jc::ImageTag::kLastSeq),
              jc::EncodeCounter(last));
  }
  // Persisting the counter in every batch is what makes sequence numbers survive a restart.
  if (units > 0) ws->Merge(store.cf(Cf::kDefault), jc::kNextSeqKey, jc::EncodeCounter(seq));
  return Status::Ok();
}

void Journal::Impl::AddDeleteUnits(uint64_t id, WriteSet* ws) const {
  std::string begin = jc::IdPrefix(id), end = jc::PrefixEnd(begin);
  for (Cf cf : {Cf::kUnits, Cf::kContent, Cf::kHistory}) ws->DeleteRange(store.cf(cf), begin, end);
}

void Journal::Impl::AddDeleteImage(const ImageRecord& im, WriteSet* ws) const {
  AddDeleteUnits(im.id, ws);
  for (auto tag : {jc::ImageTag::kRecord, jc::ImageTag::kLastSeq, jc::ImageTag::kFlushEpoch}) {
    ws->Delete(store.cf(Cf::kImages), jc::ImageKey(im.id, tag));
  }
  uint64_t indexed = 0;
  if (LookupPath(im.path, &indexed).ok() && indexed == im.id) {
    ws->Delete(store.cf(Cf::kPaths), im.path);
  }
}

// ---- Journal ---------------------------------------------------------------------------------

Journal::Journal(std::unique_ptr<Impl> impl, JournalOptions options, std::string backing)
    : impl_(std::move(impl)), options_(std::move(options)), backing_(std::move(backing)) {}

Journal::~Journal() {
  Status s = Close();
  if (!s.ok()) spdlog::error("closing the journal: {}", s.ToString());
}

Status Journal::Open(const std::string& dir, const JournalOptions& options,
                     std::unique_ptr<Journal>* out) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  std::string backing;
  Status s = impl->store.Open(dir, options.read_only);
  if (s.ok()) s = impl->store.ClaimStore(options.backing, &backing);
  if (s.ok()) s = impl->LoadCounters();
  if (!s.ok()) {
    Status closed = impl->store.Close();
    if (!closed.ok())
      spdlog::warn("closing store {} after a failed open: {}", dir, closed.ToString());
    return s;
  }
  if (options.sync == SyncMode::kPeriodic && !options.read_only) {
    impl->store.StartPeriodicSync(options.periodic_ms);
  }
  out->reset(new Journal(std::move(impl), options, std::move(backing)));
  return Status::Ok();
}

Status Journal::Close() { return impl_->Close(); }

Status Journal::FindImage(std::string_view path, ImageRecord* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  uint64_t id = 0;
  VMETAFS_RETURN_IF_ERROR(impl_->LookupPath(path, &id));
  return impl_->ReadImage(id, out);
}

Status Journal::GetImage(uint64_t id, ImageRecord* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  return impl_->ReadImage(id, out);
}

Status Journal::CreateImage(std::string_view path, ImageRecord* out) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  if (path.empty()) return Status::InvalidArgument("an image needs a path");
  std::lock_guard<std::mutex> ns(impl_->namespace_mu);
  uint64_t existing = 0;
  Status s = impl_->LookupPath(path, &existing);
  if (s.ok()) {
    return Status::InvalidArgument(
        fmt::format("{} already has a journal (image {})", path, existing));
  }
  if (!s.IsNotFound()) return s;
  ImageRecord im;
  im.id = impl_->next_image_id.fetch_add(1);
  im.path = std::string(path);
  RocksStore& st = impl_->store;
  WriteSet ws;
  ws.Put(st.cf(Cf::kImages), jc::ImageKey(im.id, jc::ImageTag::kRecord), jc::EncodeImage(im));
  ws.Put(st.cf(Cf::kPaths), im.path, jc::EncodePathValue(im.id));
  ws.Merge(st.cf(Cf::kDefault), jc::kNextImageIdKey, jc::EncodeCounter(im.id + 1));
  VMETAFS_RETURN_IF_ERROR(st.Commit(&ws, impl_->SyncEveryWrite(), "creating an image record"));
  *out = std::move(im);
  return Status::Ok();
}

Status Journal::ListImages(std::vector<ImageRecord>* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  out->clear();
  // Keys sort as (id, tag): an image's record comes before its counters.
  return impl_->store.Scan(Cf::kImages, "", nullptr, [out](std::string_view k, std::string_view v) {
    uint64_t id = 0, c = 0;
    jc::ImageTag tag;
    if (!jc::DecodeImageKey(k, &id, &tag)) return Status::Corruption("malformed image key");
    if (tag == jc::ImageTag::kRecord) {
      out->emplace_back();
      out->back().id = id;
      return jc::DecodeImage(v, &out->back());
    }
    if (!jc::DecodeCounter(v, &c)) return Status::Corruption("malformed image counter");
    if (out->empty() || out->back().id != id) return Status::Ok();  // counter of a deleted image
    uint64_t& field =
        tag == jc::ImageTag::kLastSeq ? out->back().last_seq : out->back().flush_epoch;
    field = std::max(field, c);
    return Status::Ok();
  });
}

Status Journal::RenameImage(std::string_view from, std::string_view to) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  if (to.empty()) return Status::InvalidArgument("an image needs a path");
  std::lock_guard<std::mutex> ns(impl_->namespace_mu);
  uint64_t id = 0, victim = 0;
  VMETAFS_RETURN_IF_ERROR(impl_->LookupPath(from, &id));
  if (from == to) return Status::Ok();
  Status s = impl_->LookupPath(to, &victim);
  if (!s.ok() && !s.IsNotFound()) return s;
  bool replaces = s.ok() && victim != id;
  // Records are read under the images' locks so that a concurrent PutImage is not lost.
  auto locks = impl_->LockImages(replaces ? std::set<uint64_t>{id, victim} : std::set{id});
  ImageRecord im, target;
  VMETAFS_RETURN_IF_ERROR(impl_->ReadImage(id, &im));
  if (replaces) VMETAFS_RETURN_IF_ERROR(impl_->ReadImage(victim, &target));
  RocksStore& st = impl_->store;
  WriteSet ws;
  // Like rename(2) replacing the target file: the target's journal goes, its events stay.
  if (replaces) impl_->AddDeleteImage(target, &ws);
  ws.Delete(st.cf(Cf::kPaths), from);
  im.path = std::string(to);
  ws.Put(st.cf(Cf::kPaths), im.path, jc::EncodePathValue(id));
  ws.Put(st.cf(Cf::kImages), jc::ImageKey(id, jc::ImageTag::kRecord), jc::EncodeImage(im));
  return st.Commit(&ws, impl_->SyncEveryWrite(), "renaming an image");
}

Status Journal::DeleteImage(uint64_t id) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  std::lock_guard<std::mutex> ns(impl_->namespace_mu);
  auto locks = impl_->LockImages({id});
  ImageRecord im;
  VMETAFS_RETURN_IF_ERROR(impl_->ReadImage(id, &im));
  WriteSet ws;
  impl_->AddDeleteImage(im, &ws);
  return impl_->store.Commit(&ws, impl_->SyncEveryWrite(), "deleting an image");
}

Status Journal::ForEachUnit(uint64_t image_id, bool with_content,
                            const std::function<Status(const UnitVersion&)>& fn) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  std::string prefix = jc::IdPrefix(image_id);
  auto visit = [&](std::string_view key, std::string_view record, const std::string* content) {
    UnitVersion v;
    uint64_t pushed = 0;
    VMETAFS_RETURN_IF_ERROR(jc::DecodeUnitRecord(key, record, &v, &pushed));
    if (content != nullptr) {
      v.content = *content;
      VMETAFS_RETURN_IF_ERROR(CheckContent(v, image_id));
    }
    return fn(v);
  };
  if (!with_content) {
    return impl_->store.Scan(
        Cf::kUnits, prefix, nullptr,
        [&](std::string_view k, std::string_view v) { return visit(k, v, nullptr); });
  }
  return impl_->store.ScanPaired(Cf::kUnits, Cf::kContent, prefix, visit);
}

Status Journal::GetUnit(uint64_t image_id, const MetadataUnit& unit, UnitVersion* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  std::string key = jc::UnitKey(image_id, unit.extent, unit.offset);
  rocksdb::ManagedSnapshot snap(impl_->store.db());
  uint64_t pushed = 0;
  Status s = impl_->ReadUnit(key, snap.snapshot(), out, &pushed);
  if (s.IsNotFound()) {
    return Status::NotFound(fmt::format("no unit at extent {} offset {} of image {}", unit.extent,
                                        unit.offset, image_id));
  }
  VMETAFS_RETURN_IF_ERROR(s);
  s = impl_->store.Get(Cf::kContent, key, &out->content, snap.snapshot());
  if (s.IsNotFound()) return Status::Corruption("a journaled unit has no content: " + s.message());
  VMETAFS_RETURN_IF_ERROR(s);
  return CheckContent(*out, image_id);
}

Status Journal::UnitHistory(uint64_t image_id, const MetadataUnit& unit,
                            std::vector<UnitVersion>* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  out->clear();
  const uint64_t ring = impl_->options.history_versions;
  if (ring == 0) return Status::Ok();
  std::string key = jc::UnitKey(image_id, unit.extent, unit.offset);
  rocksdb::ManagedSnapshot snap(impl_->store.db());
  UnitVersion latest;
  uint64_t pushed = 0;
  Status s = impl_->ReadUnit(key, snap.snapshot(), &latest, &pushed);
  if (s.IsNotFound()) return Status::Ok();  // retired or never written: no history either
  VMETAFS_RETURN_IF_ERROR(s);
  // Every slot holds a genuine older version (retiring a unit drops its slots), but a ring once
  // larger leaves slots beyond this one's: only the `ring` newest are the answer.
  std::vector<std::pair<uint64_t, UnitVersion>> found;
  VMETAFS_RETURN_IF_ERROR(impl_->store.Scan(
      Cf::kHistory, key, snap.snapshot(), [&](std::string_view, std::string_view value) {
        UnitVersion v;
        uint64_t index = 0;
        VMETAFS_RETURN_IF_ERROR(jc::DecodeHistoryValue(key, value, &v, &index));
        if (index < pushed) found.emplace_back(index, std::move(v));
        return Status::Ok();
      }));
  std::sort(found.begin(), found.end(), [](auto& a, auto& b) { return a.first > b.first; });
  if (found.size() > ring) found.resize(ring);
  for (auto& [index, v] : found) {
    VMETAFS_RETURN_IF_ERROR(CheckContent(v, image_id));
    out->push_back(std::move(v));
  }
  return Status::Ok();
}

Status Journal::DeleteUnits(uint64_t image_id) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  auto locks = impl_->LockImages({image_id});
  WriteSet ws;
  impl_->AddDeleteUnits(image_id, &ws);
  return impl_->store.Commit(&ws, impl_->SyncEveryWrite(), "deleting units");
}

Status Journal::Write(JournalBatch& batch) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  if (batch.empty()) return Status::Ok();
  std::map<uint64_t, std::string> paths;
  for (const JournalBatch::Op& op : batch.ops_) paths[op.image_id];
  std::set<uint64_t> ids;
  for (const auto& entry : paths) ids.insert(entry.first);
  auto locks = impl_->LockImages(std::move(ids));
  // Under the image's lock: a batch for an image deleted meanwhile must not leave orphans.
  for (auto& [id, path] : paths) {
    ImageRecord im;
    VMETAFS_RETURN_IF_ERROR(impl_->ReadImage(id, &im).Annotate("writing to the journal"));
    path = std::move(im.path);
  }
  WriteSet ws;
  VMETAFS_RETURN_IF_ERROR(impl_->AddBatch(batch, paths, &ws));
  return impl_->store.Commit(&ws, impl_->SyncEveryWrite(), "writing to the journal");
}

Status Journal::Sync() {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  // In kWrite mode every write was synced already.
  if (impl_->options.read_only || impl_->SyncEveryWrite()) return Status::Ok();
  return impl_->store.SyncWal();
}

Status Journal::CompleteFlush(uint64_t image_id) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  auto locks = impl_->LockImages({image_id});
  ImageRecord im;
  VMETAFS_RETURN_IF_ERROR(impl_->ReadImage(image_id, &im));
  WriteSet ws;
  ws.Merge(impl_->store.cf(Cf::kImages), jc::ImageKey(image_id, jc::ImageTag::kFlushEpoch),
           jc::EncodeCounter(im.flush_epoch + 1));
  return impl_->store.Commit(&ws, options_.sync != SyncMode::kPeriodic, "completing a flush");
}

Status Journal::AddEvent(Event* event, const std::vector<QuarantinedUnit>& quarantine) {
  std::vector<QuarantineView> views;
  views.reserve(quarantine.size());
  for (const QuarantinedUnit& q : quarantine) views.push_back({q.unit, q.bytes});
  return AddEvent(event, views);
}

Status Journal::AddEvent(Event* event, std::span<const QuarantineView> quarantine) {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckWritable());
  for (const QuarantineView& q : quarantine) {
    if (q.unit.length == 0) return Status::InvalidArgument("quarantined unit without a length");
  }
  RocksStore& st = impl_->store;
  event->seq = impl_->next_seq.fetch_add(1);
  if (event->time_ns == 0) event->time_ns = NowNs();
  WriteSet ws;
  ws.Put(st.cf(Cf::kEvents), jc::EventKey(event->image_id, event->seq), jc::EncodeEvent(*event));
  // Identical bytes are stored once per event: zeroed tables are all alike, and this record is
  // synced before the restore writes anything.
  std::unordered_multimap<uint64_t, const QuarantineView*> stored;
  for (const QuarantineView& q : quarantine) {
    const uint64_t hash =
        ContentHash({reinterpret_cast<const uint8_t*>(q.bytes.data()), q.bytes.size()});
    const MetadataUnit* same_as = nullptr;
    for (auto [it, end] = stored.equal_range(hash); it != end; ++it) {
      if (it->second->bytes == q.bytes) {
        same_as = &it->second->unit;
        break;
      }
    }
    if (same_as == nullptr) stored.emplace(hash, &q);
    ws.Put(st.cf(Cf::kQuarantine), jc::QuarantineKey(event->seq, q.unit.extent, q.unit.offset),
           jc::EncodeQuarantine(q.unit, q.bytes, same_as));
  }
  ws.Merge(st.cf(Cf::kDefault), jc::kNextSeqKey, jc::EncodeCounter(event->seq + 1));
  // Always synced: the quarantined bytes must be safe before a restore overwrites them.
  return st.Commit(&ws, /*sync=*/true, "recording an event");
}

Status Journal::Events(uint64_t image_id, std::vector<Event>* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  return impl_->Collect(Cf::kEvents, jc::IdPrefix(image_id), jc::DecodeEvent, out);
}

Status Journal::AllEvents(std::vector<Event>* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  // Keyed by image first: the store-wide order is the order of sequence numbers.
  VMETAFS_RETURN_IF_ERROR(impl_->Collect(Cf::kEvents, "", jc::DecodeEvent, out));
  std::sort(out->begin(), out->end(), [](const Event& a, const Event& b) { return a.seq < b.seq; });
  return Status::Ok();
}

Status Journal::Quarantine(uint64_t event_seq, std::vector<QuarantinedUnit>* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  std::vector<jc::QuarantineRecord> records;
  VMETAFS_RETURN_IF_ERROR(
      impl_->Collect(Cf::kQuarantine, jc::IdPrefix(event_seq), jc::DecodeQuarantine, &records));
  std::map<std::pair<uint16_t, uint64_t>, const std::string*> held;
  for (const jc::QuarantineRecord& r : records) {
    if (!r.same_as) held.emplace(std::pair(r.unit.unit.extent, r.unit.unit.offset), &r.unit.bytes);
  }
  out->clear();
  out->reserve(records.size());
  for (jc::QuarantineRecord& r : records) {
    if (r.same_as) {
      auto it = held.find({r.same_extent, r.same_offset});
      if (it == held.end() || it->second->size() != r.unit.unit.length) {
        return Status::Corruption(fmt::format(
            "quarantine of event {}: the unit at {} names unit {}:{} for its bytes, which the "
            "event does not hold",
            event_seq, r.unit.unit.offset, r.same_extent, r.same_offset));
      }
      r.unit.bytes = *it->second;
    }
  }
  for (jc::QuarantineRecord& r : records) out->push_back(std::move(r.unit));
  return Status::Ok();
}

Status Journal::ImageUsage(uint64_t image_id, Usage* out) const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  *out = Usage{};
  return impl_->store.Scan(Cf::kUnits, jc::IdPrefix(image_id), nullptr,
                           [&](std::string_view k, std::string_view v) {
                             UnitVersion u;
                             uint64_t pushed = 0;
                             VMETAFS_RETURN_IF_ERROR(jc::DecodeUnitRecord(k, v, &u, &pushed));
                             out->units++;
                             out->bytes += u.unit.length;
                             return Status::Ok();
                           });
}

uint64_t Journal::DiskBytes() const { return impl_->store.DiskBytes(); }

Status Journal::CheckStore() const {
  std::shared_lock<std::shared_mutex> alive(impl_->life);
  VMETAFS_RETURN_IF_ERROR(impl_->CheckOpen());
  return impl_->store.Check();
}

// ---- JournalBatch and free functions ---------------------------------------------------------

void JournalBatch::PutUnit(uint64_t image_id, UnitVersion version, const UnitVersion* previous) {
  Op op;
  op.type = Op::Type::kPutUnit;
  op.image_id = image_id;
  op.version = std::move(version);
  if (previous != nullptr) {
    op.previous = *previous;
    op.has_previous = true;
  }
  ops_.push_back(std::move(op));
}

void JournalBatch::RetireUnit(uint64_t image_id, const MetadataUnit& unit) {
  Op op;
  op.type = Op::Type::kRetireUnit;
  op.image_id = image_id;
  op.version.unit = unit;
  ops_.push_back(std::move(op));
}

void JournalBatch::PutImage(const ImageRecord& image) {
  Op op;
  op.type = Op::Type::kPutImage;
  op.image_id = image.id;
  op.image = image;
  ops_.push_back(std::move(op));
}

uint64_t ContentHash(std::span<const uint8_t> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

}  // namespace vmetafs::store
