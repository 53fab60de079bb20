#!/usr/bin/env bash
# Builds a Debian bookworm base image from Debian's packages alone, for machines that reach no image
# registry (only a Debian mirror): debootstrap --variant=minbase into ROOTFS, then import it.
#
#   sudo tools/container_base.sh [ROOTFS] [IMAGE]     # defaults: ./container-rootfs, localhost/debian:bookworm-local
#
# Needs root, debootstrap and podman or docker (apt-get install debootstrap podman runc). The image has
# no Python: deploy/Containerfile installs Debian's python3 (3.11) into a base that has none.
# ROOTFS is left in place; remove it when done. Keep it outside the repository (it is the build context).
set -euo pipefail

ROOTFS=${1:-container-rootfs}
IMAGE=${2:-localhost/debian:bookworm-local}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || { echo "container_base.sh: needs podman or docker" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "container_base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
[ ! -e "$ROOTFS" ] || { echo "container_base.sh: $ROOTFS exists; remove it or name another folder" >&2; exit 2; }

start=$(date +%s)
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
# The downloaded packages and lists are not part of a base: apt-get update fetches fresh lists.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$ENGINE" import - "$IMAGE" >/dev/null
echo "$IMAGE: $(( $(date +%s) - start )) s from $MIRROR ($("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
