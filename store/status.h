// Status: the one way errors flow through vmetafs (after leveldb's util/status.h).
//
// A Status is either OK or carries a code, a message and, for errors that came from the operating
// system or the storage, the errno observed at the failing call. FUSE operations reply with
// Errno(); tools print ToString(). Status is a small value type: copy it freely.
#pragma once

#include <string>
#include <string_view>

namespace vmetafs {

class [[nodiscard]] Status {
 public:
  enum class Code { kOk, kNotFound, kCorruption, kInvalidArgument, kIoError, kBusy, kNotSupported };

  Status() = default;
  static Status Ok() { return Status(); }
  static Status NotFound(std::string msg) {
    return Status(Code::kNotFound, std::move(msg), ENOENT_);
  }
  static Status Corruption(std::string msg) {
    return Status(Code::kCorruption, std::move(msg), EIO_);
  }
  static Status InvalidArgument(std::string msg) {
    return Status(Code::kInvalidArgument, std::move(msg), EINVAL_);
  }
  static Status Busy(std::string msg) { return Status(Code::kBusy, std::move(msg), EBUSY_); }
  static Status NotSupported(std::string msg) {
    return Status(Code::kNotSupported, std::move(msg), EOPNOTSUPP_);
  }
  // An error reported by the OS or the storage; `err` is the positive errno it gave.
  static Status IoError(std::string msg, int err) {
    return Status(Code::kIoError, std::move(msg), err > 0 ? err : EIO_);
  }

  bool ok() const { return code_ == Code::kOk; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsBusy() const { return code_ == Code::kBusy; }
  Code code() const { return code_; }
  // Positive errno suitable for a FUSE reply; 0 when ok().
  int Errno() const { return errno_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Prefixes the message with context ("opening store: ..."); keeps code and errno.
  Status Annotate(std::string_view context) const;

 private:
  // Kept here so that status.h does not drag <cerrno> macros into every header.
  static constexpr int ENOENT_ = 2, EIO_ = 5, EBUSY_ = 16, EINVAL_ = 22, EOPNOTSUPP_ = 95;
  Status(Code code, std::string msg, int err)
      : code_(code), errno_(err), message_(std::move(msg)) {}

  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string message_;
};

// Builds a Status from an errno value saved right after the failing call (leveldb PosixError).
Status PosixError(std::string_view context, int saved_errno);

}  // namespace vmetafs

// Returns early from the enclosing function when `expr` yields a non-OK Status.
#define VMETAFS_RETURN_IF_ERROR(expr) \
  do {                                \
    ::vmetafs::Status _st = (expr);   \
    if (!_st.ok()) return _st;        \
  } while (0)
