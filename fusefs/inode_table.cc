#include "fusefs/inode_table.h"

#include <algorithm>
#include <vector>

namespace vmetafs::fusefs {

InodeTable::InodeTable() {
  auto root = std::make_shared<Inode>(FUSE_ROOT_ID, 0, 0, S_IFDIR);
  root->nlookup_ = 1;
  by_id_[FUSE_ROOT_ID] = root;
}

void InodeTable::SetRoot(const struct stat& st) {
  std::lock_guard lock(mutex_);
  auto root = std::make_shared<Inode>(FUSE_ROOT_ID, st.st_dev, st.st_ino, S_IFDIR);
  root->nlookup_ = 1;
  by_id_[FUSE_ROOT_ID] = root;
  by_key_[Key{st.st_dev, st.st_ino}] = FUSE_ROOT_ID;
}

std::shared_ptr<Inode> InodeTable::Get(fuse_ino_t id) const {
  std::lock_guard lock(mutex_);
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

std::shared_ptr<Inode> InodeTable::FindLocked(const struct stat& st) const {
  auto it = by_key_.find(Key{st.st_dev, st.st_ino});
  if (it == by_key_.end()) return nullptr;
  auto node = by_id_.find(it->second);
  return node == by_id_.end() ? nullptr : node->second;
}

std::shared_ptr<Inode> InodeTable::Lookup(fuse_ino_t parent, const std::string& name,
                                          const struct stat& st) {
  std::lock_guard lock(mutex_);
  std::shared_ptr<Inode> node = FindLocked(st);
  // An inode number reused by the storage for a file of another type is another file: the kernel
  // must not see the old FUSE number change type, so the new file gets a number of its own.
  if (node != nullptr && !node->Matches(st)) node = nullptr;
  if (node == nullptr) {
    node = std::make_shared<Inode>(next_id_++, st.st_dev, st.st_ino, st.st_mode & S_IFMT);
    by_id_[node->id()] = node;
    by_key_[Key{st.st_dev, st.st_ino}] = node->id();
  }
  if (node->id() != FUSE_ROOT_ID) {
    node->parent_ = parent;
    node->name_ = name;
    node->detached_ = false;
  }
  ++node->nlookup_;
  return node;
}

void InodeTable::Forget(fuse_ino_t id, uint64_t nlookup) {
  if (id == FUSE_ROOT_ID) return;
  std::lock_guard lock(mutex_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return;
  Inode& node = *it->second;
  node.nlookup_ -= std::min(nlookup, node.nlookup_);
  if (node.nlookup_ > 0) return;
  auto key = by_key_.find(Key{node.dev(), node.ino()});
  if (key != by_key_.end() && key->second == id) by_key_.erase(key);
  by_id_.erase(it);
}

bool InodeTable::PathLocked(fuse_ino_t id, std::string* out) const {
  std::vector<const std::string*> names;
  // A chain longer than the table is a cycle: an invariant broken, answered as "no path".
  for (size_t depth = 0; id != FUSE_ROOT_ID; ++depth) {
    auto it = by_id_.find(id);
    if (it == by_id_.end() || it->second->detached_ || depth > by_id_.size()) return false;
    names.push_back(&it->second->name_);
    id = it->second->parent_;
  }
  out->clear();
  for (auto n = names.rbegin(); n != names.rend(); ++n) {
    if (!out->empty()) out->push_back('/');
    out->append(**n);
  }
  return true;
}

bool InodeTable::Path(fuse_ino_t id, std::string* out) const {
  std::lock_guard lock(mutex_);
  return PathLocked(id, out);
}

bool InodeTable::ChildPath(fuse_ino_t parent, const std::string& name, std::string* out) const {
  std::lock_guard lock(mutex_);
  if (!PathLocked(parent, out)) return false;
  if (!out->empty()) out->push_back('/');
  out->append(name);
  return true;
}

void InodeTable::Moved(const struct stat& st, fuse_ino_t parent, const std::string& name) {
  std::lock_guard lock(mutex_);
  std::shared_ptr<Inode> node = FindLocked(st);
  if (node == nullptr || node->id() == FUSE_ROOT_ID) return;
  node->parent_ = parent;
  node->name_ = name;
  node->detached_ = false;
}

void InodeTable::Removed(const struct stat& st, fuse_ino_t parent, const std::string& name) {
  std::lock_guard lock(mutex_);
  std::shared_ptr<Inode> node = FindLocked(st);
  if (node == nullptr || node->id() == FUSE_ROOT_ID) return;
  if (node->parent_ == parent && node->name_ == name) node->detached_ = true;
}

size_t InodeTable::size() const {
  std::lock_guard lock(mutex_);
  return by_id_.size();
}

}  // namespace vmetafs::fusefs
