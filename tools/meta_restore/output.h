// How meta-restore talks: aligned tables and one-line verdicts on stdout, JSON with --json,
// warnings and errors on stderr, and a progress bar on stderr only when a person is watching.
// Not thread-safe (one command, one thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "store/journal.h"
#include "store/status.h"
#include "store/verifier.h"

namespace vmetafs::meta_restore {

using Json = nlohmann::ordered_json;

// A text table: columns padded to their widest cell; `right` columns (numbers) right-aligned.
class Table {
 public:
  Table(std::vector<std::string> headers, std::vector<bool> right = {});
  void Row(std::vector<std::string> cells);
  bool empty() const { return rows_.empty(); }
  void Print(const std::string& indent = "") const;

 private:
  std::vector<std::string> headers_;
  std::vector<bool> right_;
  std::vector<std::vector<std::string>> rows_;
};

std::string HumanBytes(uint64_t bytes);   // "64.0 KiB"
std::string TimeOrDash(int64_t time_ns);  // ISO 8601 UTC, or "-" for 0
std::string Hex(uint64_t v);              // 16 hex digits
// "3 (2 L2 table, 1 L1 table)"; "-" for none.
std::string DescribeUnits(const std::vector<store::MetadataUnit>& units);

Json UnitJson(const store::MetadataUnit& u);
Json UnitsJson(const std::vector<store::MetadataUnit>& units);
Json EventJson(const store::Event& e);
void PrintJson(const Json& j);

void Warn(const std::string& message);
// Prints "meta-restore: error: ..." and returns kExitError.
int Fail(const Status& s);
int Fail(const std::string& message);

// A progress bar on stderr when stderr is a terminal; otherwise every call is a no-op.
class Progress {
 public:
  Progress();
  ~Progress() { Clear(); }
  // A ProgressFn that draws "label [####....] 45% 1.2 MiB/2.7 MiB".
  store::ProgressFn Phase(std::string label);
  void Clear();

 private:
  void Draw(uint64_t done, uint64_t total);
  bool enabled_;
  bool drawn_ = false;
  std::string label_;
  int last_permille_ = -1;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace vmetafs::meta_restore
