#include "store/status.h"

#include <cstring>

namespace vmetafs {

std::string Status::ToString() const {
  if (ok()) return "OK";
  const char* kind = "error";
  switch (code_) {
    case Code::kOk:
      kind = "OK";
      break;
    case Code::kNotFound:
      kind = "not found";
      break;
    case Code::kCorruption:
      kind = "corruption";
      break;
    case Code::kInvalidArgument:
      kind = "invalid argument";
      break;
    case Code::kIoError:
      kind = "I/O error";
      break;
    case Code::kBusy:
      kind = "busy";
      break;
    case Code::kNotSupported:
      kind = "not supported";
      break;
  }
  return std::string(kind) + ": " + message_;
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return *this;
  Status s = *this;
  s.message_ = std::string(context) + ": " + message_;
  return s;
}

Status PosixError(std::string_view context, int saved_errno) {
  std::string msg(context);
  msg += ": ";
  msg += std::strerror(saved_errno);
  if (saved_errno == 2) return Status::NotFound(std::move(msg));
  return Status::IoError(std::move(msg), saved_errno);
}

}  // namespace vmetafs
