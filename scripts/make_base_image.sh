#!/usr/bin/env bash
# A local base image for machines that cannot pull one (no reachable container registry):
# Debian minbase from debootstrap with Python 3 in a venv on PATH, imported with podman (or
# docker). The torch and torchvision wheels are cp311, so the suite must ship Python 3.11.
# The image is for PLATFORM (default linux/amd64, what SageMaker runs), whatever the host: on
# an arm64 host that needs qemu-user-static's binfmt handler for amd64.
# The image is tagged with a hash of its inputs and reused while they are unchanged.
# Prints the image name on stdout (everything else goes to stderr):
#   BASE_IMAGE=$(scripts/make_base_image.sh)
set -euo pipefail

DOCKER=${DOCKER:-podman}
SUITE=${BASE_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates
NAME=${BASE_IMAGE_NAME:-localhost/species-classifier-base}
ENV_PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PLATFORM=${PLATFORM:-linux/amd64}

die() { echo "make_base_image: $*" >&2; exit 1; }

[[ $PLATFORM =~ ^linux/(amd64|arm64)$ ]] || die "PLATFORM must be linux/amd64 or linux/arm64, not '$PLATFORM'"
arch=${PLATFORM#linux/}
echo "make_base_image: Debian $SUITE for $PLATFORM" >&2
command -v "$DOCKER" >/dev/null || die "$DOCKER not found (apt-get install podman runc)"

key=$( { cat "$0"; echo "$SUITE $MIRROR $PACKAGES $ENV_PATH"; } | sha256sum | cut -c1-12)
image="$NAME:$SUITE-$arch-$key"
if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
  echo "make_base_image: $image is up to date" >&2
  echo "$image"
  exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
[[ $(id -u) == 0 ]] || die "debootstrap and chroot need root"
host_arch=$(dpkg --print-architecture)
if [[ $arch != "$host_arch" && ! -e /proc/sys/fs/binfmt_misc/qemu-${arch/amd64/x86_64} ]]; then
  die "this $host_arch host cannot run $arch programs: apt-get install qemu-user-static binfmt-support"
fi

rootfs=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$rootfs" "$log"' EXIT

echo "make_base_image: debootstrap $SUITE from $MIRROR (about a minute)" >&2
debootstrap --arch="$arch" --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$log" 2>&1 \
  || { tail -20 "$log" >&2; die "debootstrap failed (log above)"; }
chroot "$rootfs" python3 -m venv /opt/venv
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

echo "make_base_image: importing $image" >&2
if [[ $(basename "$DOCKER") == podman ]]; then
  platform=(--os linux --arch "$arch")
else
  platform=(--platform "$PLATFORM")
fi
tar --numeric-owner -C "$rootfs" -c . \
  | "$DOCKER" import "${platform[@]}" \
    --change "ENV PATH=$ENV_PATH" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
echo "$image"
