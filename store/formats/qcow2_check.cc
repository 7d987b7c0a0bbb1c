// qcow2: the deep check, after qemu-img check (block/qcow2-refcount.c, qcow2_check_refcounts):
// count the references to every host cluster from the image's own structures and compare them
// with the refcounts stored in the refcount blocks ("Host cluster management" in
// docs/interop/qcow2.txt). Unlike qemu, leaked clusters count as problems, except after a crash
// of the writer when nothing referenced them before (CheckAfterCrash); the COPIED flags are not
// judged (they are hints qemu rebuilds itself).
#include <algorithm>
#include <optional>
#include <unordered_map>
#include <vector>

#include "store/coding.h"
#include "store/formats/qcow2.h"
#include "store/formats/qcow2_layout.h"
#include "store/range_reader.h"

namespace vmetafs::store {
namespace qcow2 {
namespace {

// Clusters close together are read in one request, up to this many bytes.
constexpr uint64_t kBatchBytes = 8 << 20;
constexpr uint64_t kMaxGapBytes = 256 << 10;
constexpr uint16_t kSaturated = 0xffff;

uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// Reads the clusters at `offsets` (sorted; each one cluster inside the file) in few large reads,
// read ahead on a few threads (a 1 TiB image has 2048 L2 tables 512 MiB apart; in the journal's
// view each is decompressed from the journal), and calls visit(k, bytes of offsets[k]) for each,
// in order.
template <typename Visit>
Status ForEachCluster(const ImageFile& file, const Layout& layout,
                      const std::vector<uint64_t>& offsets, ProblemList* problems, Visit visit) {
  constexpr size_t kReaders = 4;
  const uint64_t cs = layout.cluster_size;
  std::vector<ByteRange> ranges;
  std::vector<size_t> ends;  // offsets [ends[r - 1], ends[r]) lie in ranges[r]
  for (size_t i = 0; i < offsets.size();) {
    const uint64_t start = offsets[i];
    uint64_t end = start + cs;
    size_t j = i + 1;
    while (j < offsets.size() && offsets[j] + cs - start <= kBatchBytes &&
           (offsets[j] < end || offsets[j] - end <= kMaxGapBytes)) {
      end = std::max(end, offsets[j] + cs);
      ++j;
    }
    if (end > layout.file_size) {
      problems->Add("reading {} bytes at offset {} failed, the file is shorter ({} bytes)",
                    end - start, start, layout.file_size);
      return Status::Ok();
    }
    ranges.push_back({start, end - start});
    ends.push_back(j);
    i = j;
  }
  RangeReader reader(file, layout.file_size, ranges, kReaders);
  std::vector<uint8_t> buf;
  for (size_t r = 0, k = 0; r < ranges.size(); ++r) {
    Status st = reader.Take(r, &buf);
    if (st.code() == Status::Code::kInvalidArgument) {
      problems->Add("reading {} bytes at offset {} failed, the file is shorter: {}",
                    ranges[r].length, ranges[r].offset, st.message());
      return Status::Ok();
    }
    VMETAFS_RETURN_IF_ERROR(st.Annotate("reading qcow2 tables"));
    for (; k < ends[r]; ++k) {
      visit(k, std::span<const uint8_t>(buf.data() + (offsets[k] - ranges[r].offset), cs));
    }
  }
  return Status::Ok();
}

// "Refcount block entry": refcount_bits = 1 << order wide, big-endian; sub-byte widths start at
// the least significant bit of each byte.
uint64_t RefcountAt(std::span<const uint8_t> block, uint64_t index, uint32_t order) {
  switch (order) {
    case 3:
      return block[index];
    case 4:
      return LoadBe16(&block[index * 2]);
    case 5:
      return LoadBe32(&block[index * 4]);
    case 6:
      return LoadBe64(&block[index * 8]);
    default: {
      const uint64_t bit = index << order;
      return (block[bit / 8] >> (bit % 8)) & ((1u << (1u << order)) - 1);
    }
  }
}

// One saturating reference count (up to kSaturated) per host cluster. A byte each, with the few
// counts past 254 (clusters shared by many snapshots) kept aside: a 1 TiB image has 16M clusters,
// and the array is fresh memory, which costs a page fault per 4 KiB.
class ClusterCounts {
 public:
  explicit ClusterCounts(uint64_t clusters) : small_(clusters, 0) {}
  uint64_t size() const { return small_.size(); }
  uint16_t operator[](uint64_t cluster) const {
    return small_[cluster] == kSpilled ? big_.at(cluster) : small_[cluster];
  }
  void Add(uint64_t cluster, uint32_t times) {
    const uint32_t now = std::min<uint32_t>(kSaturated, (*this)[cluster] + times);
    if (now < kSpilled) {
      small_[cluster] = static_cast<uint8_t>(now);
    } else {
      small_[cluster] = kSpilled;
      big_[cluster] = static_cast<uint16_t>(now);
    }
  }

 private:
  static constexpr uint8_t kSpilled = 0xff;
  std::vector<uint8_t> small_;
  std::unordered_map<uint64_t, uint16_t> big_;  // the counts of clusters marked kSpilled
};

// A cluster with a refcount that nothing references.
struct Leak {
  uint64_t cluster;
  uint64_t refcount;
};

// One walk over the image's structures: references counted in memory (ClusterCounts), then
// compared with the stored refcounts.
class RefcountCheck {
 public:
  // Leaked clusters go to `leaks` when given, else they are problems.
  RefcountCheck(const ImageFile& file, const Layout& layout, ProblemList* problems,
                std::vector<Leak>* leaks = nullptr)
      : file_(file),
        layout_(layout),
        problems_(problems),
        leaks_(leaks),
        counts_(CeilDiv(layout.file_size, layout.cluster_size)) {}

  Status Run() {
    VMETAFS_RETURN_IF_ERROR(CountReferences());
    return CompareRefcounts();
  }

  Status CountReferences() {
    CountTables();
    VMETAFS_RETURN_IF_ERROR(CountL2Tables());
    return CountBitmapData();
  }

  bool Referenced(uint64_t cluster) const {
    return cluster < counts_.size() && counts_[cluster] > 0;
  }

 private:
  // Counts `times` references to every cluster [offset, offset + bytes) touches; false when
  // some of them lie past the end of the file.
  bool Reference(uint64_t offset, uint64_t bytes, uint32_t times = 1) {
    if (bytes == 0) return true;
    const uint64_t first = layout_.ClusterOf(offset);
    const uint64_t last = layout_.ClusterOf(offset + (bytes - 1));
    for (uint64_t c = first; c <= last && c < counts_.size(); ++c) counts_.Add(c, times);
    return last < counts_.size();
  }

  // The tables Parse located: all validated to lie inside the file.
  void CountTables() {
    const Header& h = layout_.header;
    Reference(0, layout_.cluster_size);
    Reference(h.l1_table_offset, uint64_t{h.l1_size} * 8);
    for (const SnapshotInfo& sn : layout_.snapshots) {
      Reference(sn.l1_offset, uint64_t{sn.l1_size} * 8);
    }
    Reference(h.snapshots_offset, layout_.snapshot_table_bytes);
    Reference(h.refcount_table_offset, uint64_t{h.refcount_table_clusters} << h.cluster_bits);
    for (uint64_t block : layout_.refcount_blocks) {
      if (block != 0) Reference(block, layout_.cluster_size);
    }
    Reference(layout_.crypto_offset, layout_.crypto_bytes);
    Reference(layout_.bitmap_directory_offset, layout_.bitmap_directory_bytes);
    for (const BitmapInfo& bm : layout_.bitmaps) {
      Reference(bm.table_offset, uint64_t{bm.table_size} * 8);
    }
  }

  Status CountL2Tables() {
    std::vector<uint64_t> refs = layout_.l2_refs;
    std::sort(refs.begin(), refs.end());
    std::vector<uint64_t> tables;
    std::vector<uint32_t> times;
    for (uint64_t off : refs) {
      if (!tables.empty() && tables.back() == off) {
        ++times.back();
      } else {
        tables.push_back(off);
        times.push_back(1);
      }
    }
    for (size_t k = 0; k < tables.size(); ++k) Reference(tables[k], layout_.cluster_size, times[k]);
    return ForEachCluster(
        file_, layout_, tables, problems_,
        [&](size_t k, std::span<const uint8_t> l2) { CountL2Entries(tables[k], l2, times[k]); });
  }

  // "L2 table entry", "Compressed Clusters Descriptor", "Extended L2 Entries".
  void CountL2Entries(uint64_t l2_offset, std::span<const uint8_t> l2, uint32_t times) {
    const uint32_t step = layout_.l2_entry_bytes;
    for (size_t i = 0; i < l2.size() / step; ++i) {
      const uint64_t e = LoadBe64(&l2[i * step]);
      if (e & kL2Compressed) {
        CountCompressed(l2_offset, i, e, times);
        continue;
      }
      const uint64_t off = e & kL2OffsetMask;
      if (e & kL2StdReservedMask) {
        problems_->Add("L2 table at offset {} entry {}: reserved bits set (0x{:016x})", l2_offset,
                       i, e);
      }
      // Zero flag (bit 0) alone, or nothing: no host cluster. With an external data file the
      // host clusters are in that file, which is not refcounted.
      if (off == 0 || layout_.external_data()) continue;
      if (!layout_.Aligned(off)) {
        problems_->Add(
            "L2 table at offset {} entry {}: data cluster offset {} is not "
            "cluster-aligned",
            l2_offset, i, off);
      } else if (off >= layout_.file_size) {
        problems_->Add(
            "L2 table at offset {} entry {}: data cluster at offset {} lies past the "
            "end of the file ({} bytes)",
            l2_offset, i, off, layout_.file_size);
      } else {
        Reference(off, layout_.cluster_size, times);
      }
    }
  }

  // A compressed cluster covers a byte range that may cross into the next host cluster; like
  // qemu, every host cluster it touches gets one reference.
  void CountCompressed(uint64_t l2_offset, size_t i, uint64_t e, uint32_t times) {
    if (layout_.external_data()) {
      problems_->Add(
          "L2 table at offset {} entry {}: compressed cluster in an image with an "
          "external data file",
          l2_offset, i);
      return;
    }
    const uint32_t shift = 62 - (layout_.header.cluster_bits - 8);
    const uint64_t host = e & ((uint64_t{1} << shift) - 1);
    const uint64_t sectors =
        ((e >> shift) & ((uint64_t{1} << (layout_.header.cluster_bits - 8)) - 1)) + 1;
    const uint64_t start = host & ~uint64_t{511};
    if (start >= layout_.file_size || !Reference(start, sectors * 512, times)) {
      problems_->Add(
          "L2 table at offset {} entry {}: compressed data at offset {} ({} sectors) "
          "lies past the end of the file ({} bytes)",
          l2_offset, i, host, sectors, layout_.file_size);
    }
  }

  // "Bitmap table": each entry is one cluster of bitmap data, or none.
  Status CountBitmapData() {
    for (const BitmapInfo& bm : layout_.bitmaps) {
      if (bm.table_size == 0) continue;
      std::vector<uint8_t> table(uint64_t{bm.table_size} * 8);
      Status st = file_.ReadAt(bm.table_offset, table);
      if (st.code() == Status::Code::kInvalidArgument) {
        problems_->Add("bitmap '{}' table at offset {} could not be read: {}", bm.name,
                       bm.table_offset, st.message());
        continue;
      }
      VMETAFS_RETURN_IF_ERROR(st.Annotate("reading a qcow2 bitmap table"));
      for (size_t i = 0; i < bm.table_size; ++i) CountBitmapEntry(bm, i, LoadBe64(&table[i * 8]));
    }
    return Status::Ok();
  }

  void CountBitmapEntry(const BitmapInfo& bm, size_t i, uint64_t e) {
    const uint64_t off = e & kBitmapOffsetMask;
    if ((e & kBitmapReservedMask) || (off != 0 && (e & 1))) {
      problems_->Add("bitmap '{}' table entry {}: reserved bits set (0x{:016x})", bm.name, i, e);
    }
    if (off == 0) return;
    if (!layout_.Aligned(off) || off >= layout_.file_size) {
      problems_->Add(
          "bitmap '{}' table entry {}: data cluster offset {} is misaligned or past "
          "the end of the file",
          bm.name, i, off);
      return;
    }
    Reference(off, layout_.cluster_size);
  }

  Status CompareRefcounts() {
    const uint32_t order = layout_.header.refcount_order;
    const uint64_t per_block = (uint64_t{layout_.cluster_size} * 8) >> order;
    const uint64_t nb_blocks = CeilDiv(counts_.size(), per_block);
    std::vector<uint64_t> offsets;
    std::vector<uint64_t> indexes;
    for (uint64_t t = 0; t < nb_blocks; ++t) {
      const uint64_t block = t < layout_.refcount_blocks.size() ? layout_.refcount_blocks[t] : 0;
      if (block == 0) {
        CompareMissingBlock(t * per_block, std::min<uint64_t>(counts_.size(), (t + 1) * per_block));
      } else {
        offsets.push_back(block);
        indexes.push_back(t);
      }
    }
    std::vector<size_t> order_by_offset(offsets.size());
    for (size_t k = 0; k < offsets.size(); ++k) order_by_offset[k] = k;
    std::sort(order_by_offset.begin(), order_by_offset.end(),
              [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
    std::vector<uint64_t> sorted(offsets.size());
    for (size_t k = 0; k < offsets.size(); ++k) sorted[k] = offsets[order_by_offset[k]];
    return ForEachCluster(
        file_, layout_, sorted, problems_, [&](size_t k, std::span<const uint8_t> block) {
          const uint64_t first = indexes[order_by_offset[k]] * per_block;
          const uint64_t end = std::min<uint64_t>(counts_.size(), first + per_block);
          for (uint64_t c = first; c < end; ++c) {
            Compare(c, RefcountAt(block, c - first, order));
          }
        });
  }

  void CompareMissingBlock(uint64_t first, uint64_t end) {
    for (uint64_t c = first; c < end; ++c) {
      if (counts_[c] != 0) Compare(c, 0);
    }
  }

  void Compare(uint64_t cluster, uint64_t stored) {
    const uint16_t refs = counts_[cluster];
    if (refs == kSaturated && stored >= kSaturated) return;  // beyond what we count
    const uint64_t offset = cluster * layout_.cluster_size;
    if (stored < refs) {
      problems_->Add(
          "cluster at offset {}: refcount {} is smaller than its {} references "
          "(refcount too small)",
          offset, stored, refs);
    } else if (stored > refs && refs == 0 && leaks_ != nullptr) {
      leaks_->push_back({cluster, stored});
    } else if (stored > refs && refs == 0) {
      problems_->Add(
          "cluster at offset {}: refcount {} but nothing references it (leaked "
          "cluster)",
          offset, stored);
    } else if (stored > refs) {
      problems_->Add(
          "cluster at offset {}: refcount {} is larger than its {} references "
          "(leaked references)",
          offset, stored, refs);
    }
  }

  const ImageFile& file_;
  const Layout& layout_;
  ProblemList* problems_;
  std::vector<Leak>* leaks_;
  ClusterCounts counts_;
};

// Reads the layout of `file` and runs the refcount check on it (leaks to `leaks` when given).
Status CheckFile(const ImageFile& file, const ParseLimits& limits, ProblemList* problems,
                 std::vector<Leak>* leaks) {
  Layout layout;
  VMETAFS_RETURN_IF_ERROR(ReadLayout(file, limits, &layout, problems));
  if (problems->count() > 0) return Status::Ok();
  if (layout.dirty()) {
    problems->Add(
        "dirty lazy-refcount image: the dirty bit is set, so the refcounts may be stale until "
        "qemu repairs them on the next open; they were not checked");
    return Status::Ok();
  }
  const uint64_t clusters = CeilDiv(layout.file_size, layout.cluster_size);
  if (clusters > limits.max_check_memory / sizeof(uint16_t)) {
    problems->Add(
        "refcount check skipped: {} clusters need {} bytes of counters, more than the "
        "limit of {} bytes",
        clusters, clusters * sizeof(uint16_t), limits.max_check_memory);
    return Status::Ok();
  }
  RefcountCheck check(file, layout, problems, leaks);
  return check.Run();
}

// Moves the leaks that `before` references (or all of them, when `before` cannot be walked) to
// `problems`; returns in *tolerated how many are left.
Status JudgeLeaks(const ImageFile& before, const ParseLimits& limits,
                  const std::vector<Leak>& leaks, ProblemList* problems, uint64_t* tolerated) {
  std::vector<std::string> before_problems;
  ProblemList walk(&before_problems);
  Layout layout;
  VMETAFS_RETURN_IF_ERROR(ReadLayout(before, limits, &layout, &walk));
  const bool fits =
      CeilDiv(layout.file_size, layout.cluster_size) <= limits.max_check_memory / sizeof(uint16_t);
  std::optional<RefcountCheck> refs;
  if (walk.count() == 0 && fits) {
    refs.emplace(before, layout, &walk);
    VMETAFS_RETURN_IF_ERROR(refs->CountReferences());
  }
  const bool judged = refs.has_value() && walk.count() == 0;
  *tolerated = 0;
  for (const Leak& leak : leaks) {
    const uint64_t offset = leak.cluster * layout.cluster_size;
    if (!judged) {
      problems->Add(
          "cluster at offset {}: refcount {} but nothing references it (leaked cluster; the "
          "image before the crash cannot be walked to tell an allocation in flight from a lost "
          "reference)",
          offset, leak.refcount);
    } else if (refs->Referenced(leak.cluster)) {
      problems->Add(
          "cluster at offset {}: refcount {} but nothing references it, and the image before "
          "the crash did (a lost reference, not an allocation in flight)",
          offset, leak.refcount);
    } else {
      ++*tolerated;
    }
  }
  return Status::Ok();
}

}  // namespace
}  // namespace qcow2

Status Qcow2Parser::Check(const ImageFile& file, const ParsedImage& parsed,
                          const ParseLimits& limits, std::vector<std::string>* out) const {
  (void)parsed;  // derived again: the file is the truth, and may have changed since
  qcow2::ProblemList problems(out);
  VMETAFS_RETURN_IF_ERROR(qcow2::CheckFile(file, limits, &problems, nullptr));
  problems.Finish();
  return Status::Ok();
}

Status Qcow2Parser::CheckAfterCrash(const ImageFile& file, const ParsedImage& parsed,
                                    const ImageFile& before, const ParseLimits& limits,
                                    std::vector<std::string>* out, uint64_t* tolerated) const {
  (void)parsed;
  *tolerated = 0;
  qcow2::ProblemList problems(out);
  std::vector<qcow2::Leak> leaks;
  VMETAFS_RETURN_IF_ERROR(qcow2::CheckFile(file, limits, &problems, &leaks));
  // Leaks are judged only in an image otherwise sound: beside real damage they change nothing.
  if (problems.count() == 0 && !leaks.empty()) {
    VMETAFS_RETURN_IF_ERROR(qcow2::JudgeLeaks(before, limits, leaks, &problems, tolerated));
  }
  problems.Finish();
  return Status::Ok();
}

}  // namespace vmetafs::store
