// Reports of verifications and decisions, shared by verify and restore.
#pragma once

#include <string>

#include "store/offline.h"
#include "tools/meta_restore/output.h"

namespace vmetafs::meta_restore {

// True when the storage holds neither the journal's content for some unit nor a valid image.
bool Damaged(const store::OfflineDecision& d);

// "what a first open would do", in words: "restore 2 units from the journal".
std::string WouldDo(const store::OfflineDecision& d);

// The one-line verdict: "vms/web.qcow2: DAMAGED: 2 of 40 units differ ...".
std::string VerdictLine(const store::OfflineDecision& d);

// The units that differ, with journal and storage hashes; and the format's problems.
void PrintDifferences(const store::OfflineDecision& d);

Json DecisionJson(const store::OfflineDecision& d);

}  // namespace vmetafs::meta_restore
