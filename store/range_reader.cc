#include "store/range_reader.h"

#include <algorithm>

namespace vmetafs::store {

RangeReader::RangeReader(const ImageFile& file, uint64_t file_size, std::vector<ByteRange> ranges,
                         size_t readers)
    : file_(file), size_(file_size), ranges_(std::move(ranges)), slots_(ranges_.size()) {
  if (ranges_.size() < 2) return;  // nothing to overlap: Take reads it
  const size_t n = std::min(std::max<size_t>(readers, 1), ranges_.size());
  for (size_t i = 0; i < n; ++i) readers_.emplace_back([this] { Work(); });
}

RangeReader::~RangeReader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  readers_cv_.notify_all();
  for (std::thread& t : readers_) t.join();
}

Status RangeReader::Read(const ByteRange& r, std::vector<uint8_t>* buf) const {
  // A reused buffer keeps its pages: no fresh mapping, page faults and zeroing per range.
  buf->resize(r.length);
  const uint64_t present = r.offset < size_ ? std::min<uint64_t>(r.length, size_ - r.offset) : 0;
  std::fill(buf->begin() + present, buf->end(), 0);
  if (present == 0) return Status::Ok();
  return file_.ReadAt(r.offset, std::span<uint8_t>(*buf).first(present));
}

bool RangeReader::CanClaim() const {
  // Stay at most kWindowBytes ahead of the consumer: that bounds the memory held.
  return next_ < ranges_.size() &&
         (next_ == taken_ || held_ + ranges_[next_].length <= kWindowBytes);
}

void RangeReader::Work() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    readers_cv_.wait(lock, [this] { return stop_ || next_ >= ranges_.size() || CanClaim(); });
    if (stop_ || next_ >= ranges_.size()) return;
    const size_t k = next_++;
    held_ += ranges_[k].length;
    if (CanClaim()) readers_cv_.notify_one();  // room for more: pass the wake-up on
    std::vector<uint8_t> bytes;
    if (!spare_.empty()) {
      bytes = std::move(spare_.back());
      spare_.pop_back();
    }
    lock.unlock();
    Status s = Read(ranges_[k], &bytes);
    lock.lock();
    slots_[k].status = std::move(s);
    slots_[k].bytes = std::move(bytes);
    slots_[k].done = true;
    if (!slots_[k].status.ok()) {  // stop reading; the consumer sees the error at range k
      stop_ = true;
      failed_at_ = std::min(failed_at_, k);
      readers_cv_.notify_all();
    }
    if (k == awaited_ || k >= failed_at_) consumer_cv_.notify_one();
  }
}

Status RangeReader::Take(size_t k, std::vector<uint8_t>* buf) {
  if (readers_.empty()) return Read(ranges_.at(k), buf);
  std::unique_lock<std::mutex> lock(mu_);
  // Ranges are claimed in order and a claimed read always completes, so every range before a
  // failed one is there; ranges after it may never be read.
  awaited_ = k;
  consumer_cv_.wait(lock, [&] { return slots_.at(k).done || k > failed_at_; });
  awaited_ = std::numeric_limits<size_t>::max();
  if (k > failed_at_) return slots_[failed_at_].status;  // even if read before the failure
  if (buf->capacity() > 0)
    spare_.push_back(std::move(*buf));  // the range the consumer is done with
  *buf = std::move(slots_[k].bytes);
  slots_[k].bytes = {};
  taken_ = k + 1;
  held_ -= ranges_[k].length;
  if (CanClaim()) readers_cv_.notify_one();
  return slots_[k].status;
}

}  // namespace vmetafs::store
