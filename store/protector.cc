#include "store/protector.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "store/protected_image_state.h"

namespace vmetafs::store {

Protector::Protector(ProtectorOptions options, std::unique_ptr<Journal> journal)
    : options_(std::move(options)), journal_(std::move(journal)) {}

Protector::~Protector() {
  Status s = Close();
  if (!s.ok()) spdlog::error("closing the store: {}", s.ToString());
}

Status Protector::Open(const ProtectorOptions& options, std::unique_ptr<Protector>* out) {
  std::unique_ptr<Journal> journal;
  VMETAFS_RETURN_IF_ERROR(Journal::Open(options.store_dir, options.journal, &journal));
  out->reset(new Protector(options, std::move(journal)));
  return Status::Ok();
}

Status Protector::OpenFirst(const std::string& path, std::unique_ptr<ImageFile> file,
                            std::shared_ptr<ProtectedImage>* out, OpenDecision* decision) {
  if (std::shared_ptr<ProtectedImage> extent = OpenExtentOf(path)) {
    // Verified with its image: its writes are journaled there.
    if (decision) *decision = OpenDecision{true, false, Action::kVerified, {}, {}};
    *out = std::move(extent);
    return Status::Ok();
  }
  std::shared_ptr<ProtectedImage> image(new ProtectedImage(this, path, std::move(file)));
  VMETAFS_RETURN_IF_ERROR(image->FirstOpen(decision));
  image->BindExtents();
  *out = std::move(image);
  return Status::Ok();
}

std::shared_ptr<ProtectedImage> Protector::OpenExtentOf(const std::string& path) {
  std::lock_guard<std::mutex> lock(extents_mutex_);
  auto it = extent_files_.find(path);
  if (it == extent_files_.end()) return nullptr;
  std::shared_ptr<ProtectedImage> image = it->second.first.lock();
  if (image == nullptr) return nullptr;
  std::shared_ptr<ProtectedImage> extent(new ProtectedImage(this, path, nullptr));
  extent->state_->image_of_extent = std::move(image);
  extent->state_->extent = it->second.second;
  spdlog::debug("{}: opened as extent {} of {}", path, extent->state_->extent,
                extent->state_->image_of_extent->state_->path);
  return extent;
}

Status Protector::UpdateImage(uint64_t id, const std::function<void(ImageRecord*)>& change) {
  std::lock_guard<std::mutex> lock(records_mutex_);
  ImageRecord record;
  VMETAFS_RETURN_IF_ERROR(journal_->GetImage(id, &record));
  change(&record);
  JournalBatch batch;
  batch.PutImage(record);
  return journal_->Write(batch);
}

void Protector::Renamed(const std::string& from, const std::string& to) {
  std::lock_guard<std::mutex> lock(records_mutex_);
  Status s = journal_->RenameImage(from, to);
  if (s.IsNotFound()) {
    // A directory: every image under it moves along.
    std::vector<ImageRecord> images;
    s = journal_->ListImages(&images);
    const std::string prefix = from + "/";
    for (const ImageRecord& r : images) {
      if (!s.ok()) break;
      if (r.path.compare(0, prefix.size(), prefix) == 0) {
        s = journal_->RenameImage(r.path, to + "/" + r.path.substr(prefix.size()));
      }
    }
  }
  if (!s.ok())
    spdlog::error("rename {} -> {}: the journal could not follow: {}", from, to, s.ToString());
}

void Protector::Unlinked(const std::string& path) {
  std::lock_guard<std::mutex> lock(records_mutex_);
  ImageRecord record;
  Status s = journal_->FindImage(path, &record);
  if (s.IsNotFound()) return;
  if (s.ok()) s = journal_->DeleteImage(record.id);
  if (s.ok()) {
    spdlog::info("{}: deleted through the mount; its journal is dropped", path);
  } else {
    spdlog::error("{}: deleted, but its journal could not be dropped: {}", path, s.ToString());
  }
}

bool Protector::Degraded(uint64_t id, std::string* why) {
  std::lock_guard<std::mutex> lock(records_mutex_);
  auto it = degraded_.find(id);
  if (it == degraded_.end()) return false;
  *why = it->second;
  return true;
}

void Protector::ClearDegraded(uint64_t id) {
  std::lock_guard<std::mutex> lock(records_mutex_);
  degraded_.erase(id);
}

Status Protector::Close() {
  if (closed_.exchange(true)) return Status::Ok();
  const uint64_t lost = unprotected_writes_.load();
  if (lost > 0) spdlog::warn("{} metadata writes went unjournaled during this mount", lost);
  return journal_->Close();
}

}  // namespace vmetafs::store
