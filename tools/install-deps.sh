#!/usr/bin/env bash
# Installs everything vmetafs needs to build, run, test and benchmark, from Debian 12 packages only.
# Safe to run again: apt-get skips what is already installed.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it calls apt-get)" >&2
  exit 1
fi
build=(cmake g++ make pkg-config clang-format clang libclang-rt-14-dev
       libfuse3-dev fuse3 librocksdb-dev libxxhash-dev libnfs-dev libnfs-utils
       libcli11-dev nlohmann-json3-dev libspdlog-dev libfmt-dev libisal-dev liburing-dev libbenchmark-dev catch2)
test=(qemu-utils python3 python3-pytest gdisk parted attr nfs-ganesha nfs-ganesha-vfs rpcbind)
bench=(bindfs fio python3-matplotlib qemu-block-extra)
missing=()
for p in "${build[@]}" "${test[@]}" "${bench[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The NFS server packages enable their services; tests start their own server on demand.
systemctl disable --now nfs-ganesha >/dev/null 2>&1 || true
echo "install-deps: all dependencies present"
