#!/usr/bin/env bash
# Build Zebu's container images without a container engine, as OCI archives:
#
#   deploy/kubernetes/images/build.sh [--bin-dir DIR] [--out DIR]
#
#   DIR/zebu.tar                 localhost/zebu:<version>   every Zebu binary on a
#                                minimal Debian (bookworm) root filesystem with what
#                                the node plugin runs: mkfs/resize tools, losetup,
#                                mount, fusermount3
#   DIR/csi-provisioner.tar ...  localhost/<sidecar>:<version>, the CSI sidecars and
#                                snapshot-controller, built from the Go module proxy
#                                (build-sidecars.sh), one static binary each
#
# Load them with `ctr -n k8s.io images import FILE` or push them with
# `skopeo copy oci-archive:FILE docker://REGISTRY/...`, and point the
# kustomization's `images:` at them. Without --bin-dir it makes a release
# build and packs target/release; with it, the Zebu binaries in DIR (the
# tests pass the ones they test). The Debian root
# filesystem is made by mmdebstrap and cached outside the repository, keyed
# by its package list (${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}/rootfs-<key>.tar).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
bin_dir= out=$root/target/images
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--bin-dir DIR] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
CACHE=${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}
log() { echo "images/build.sh: $*" >&2; }
mkdir -p "$out" "$CACHE"

# --- the Debian base, cached ---------------------------------------------------
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=e2fsprogs,xfsprogs,util-linux,mount,fuse3
EXCLUDED=(doc man info locale lintian)   # under /usr/share: not needed to run
key=$(printf '%s\n' "$SUITE" "$PACKAGES" "${EXCLUDED[@]}" | sha256sum | cut -c1-12)
base=$CACHE/rootfs-$key.tar
if [ ! -f "$base" ]; then
  command -v mmdebstrap >/dev/null || {
    log "installing mmdebstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  }
  log "making the Debian $SUITE root filesystem ($PACKAGES)"
  dpkgopts=()
  for e in "${EXCLUDED[@]}"; do dpkgopts+=(--dpkgopt="path-exclude=/usr/share/$e/*"); done
  tmp=$CACHE/.rootfs-$key.$$.tar
  SOURCE_DATE_EPOCH=0 mmdebstrap --quiet --mode=root --format=tar --variant=essential \
    --include="$PACKAGES" "${dpkgopts[@]}" "$SUITE" "$tmp" "$MIRROR" || { rm -f "$tmp"; exit 1; }
  mv "$tmp" "$base"
fi

# --- Zebu ----------------------------------------------------------------------
bins=(zebu-csi zebu-replica zebu-engine zebu-nbd-fuse zebu)
if [ -z "$bin_dir" ]; then
  (cd "$root" && cargo build --release --workspace --bins)
  bin_dir=$root/target/release
fi
version=$(cd "$root" && cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="zebu-csi"))')
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/zebu/usr/local/bin"
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { log "no $bin_dir/$b (cargo build --workspace --bins makes it)"; exit 1; }
  cp "$bin_dir/$b" "$w/zebu/usr/local/bin/"
done
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w/zebu" -cf "$w/zebu.layer" .
"$here/oci-image.sh" "localhost/zebu:$version" "$out/zebu.tar" '["/usr/local/bin/zebu-csi"]' "$base" "$w/zebu.layer"

# --- the CSI sidecars and the snapshot controller ---------------------------------
sidecars=$("$here/build-sidecars.sh")
"$here/build-sidecars.sh" --list | while read -r name tag; do
  mkdir -p "$w/$name"
  cp "$sidecars/bin/$name" "$w/$name/$name"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w/$name" -cf "$w/$name.layer" .
  "$here/oci-image.sh" "localhost/$name:$tag" "$out/$name.tar" "[\"/$name\"]" "$w/$name.layer"
done
cp "$sidecars"/crd/*.yaml "$out/"
log "images in $out"
