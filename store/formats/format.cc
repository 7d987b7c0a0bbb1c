#include "store/formats/format.h"

#include "store/formats/qcow2.h"
#include "store/formats/raw_gpt.h"
#include "store/formats/vhd.h"
#include "store/formats/vhdx.h"
#include "store/formats/vmdk.h"

namespace vmetafs::store {

Status FormatParser::Check(const ImageFile&, const ParsedImage&, const ParseLimits&,
                           std::vector<std::string>*) const {
  return Status::Ok();
}

Status FormatParser::CheckAfterCrash(const ImageFile& file, const ParsedImage& parsed,
                                     const ImageFile&, const ParseLimits& limits,
                                     std::vector<std::string>* problems,
                                     uint64_t* tolerated) const {
  *tolerated = 0;
  return Check(file, parsed, limits, problems);
}

const std::vector<const FormatParser*>& AllFormats() {
  static const Qcow2Parser qcow2;
  static const VhdxParser vhdx;
  static const VmdkParser vmdk;
  static const VhdParser vhd;
  static const RawGptParser raw;  // last: an MBR signature is the weakest magic
  static const std::vector<const FormatParser*> all = {&qcow2, &vhdx, &vmdk, &vhd, &raw};
  return all;
}

const FormatParser* DetectFormat(const ImageFile& file) {
  for (const FormatParser* p : AllFormats()) {
    if (p->Probe(file)) return p;
  }
  return nullptr;
}

const FormatParser* FormatByName(std::string_view name) {
  for (const FormatParser* p : AllFormats()) {
    if (p->Name() == name) return p;
  }
  return nullptr;
}

}  // namespace vmetafs::store
