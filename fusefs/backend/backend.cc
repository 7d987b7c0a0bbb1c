#include "fusefs/backend/backend.h"

#include <string_view>

#include "fusefs/backend/local_backend.h"
#include "fusefs/backend/nfs_backend.h"

namespace vmetafs::backend {
namespace {

constexpr std::string_view kNfsScheme = "nfs://";

Status OpenNfs(const std::string& spec, std::unique_ptr<Backend>* out) {
  return NfsBackend::Open(spec, out);
}

}  // namespace

Status Backend::Open(const std::string& spec, std::unique_ptr<Backend>* out) {
  if (spec.starts_with(kNfsScheme)) return OpenNfs(spec, out);
  return LocalBackend::Open(spec, out);
}

}  // namespace vmetafs::backend
