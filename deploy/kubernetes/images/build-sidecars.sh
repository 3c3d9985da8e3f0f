#!/usr/bin/env bash
# Build the CSI sidecars Zebu's controller Deployment runs (csi-provisioner,
# csi-attacher, csi-resizer, csi-snapshotter) and the snapshot controller,
# at pinned versions from the Go module proxy, into a version-keyed cache
# outside the repository, with the VolumeSnapshot CRDs of the same release:
#
#   ${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}/sidecars-<key>/{bin,crd}/
#
# `go install mod/cmd/x@ver` refuses the sidecars (their go.mod files carry
# replace directives), so one wrapper module requires them all and pins the
# k8s.io staging modules to the cluster's release. sigs.k8s.io/gateway-api is
# raised to v1.4.0: provisioner v5.3.0's v1.3.0 does not compile against
# k8s.io v0.34 (structured-merge-diff v4 vs v6).
#
# Idempotent: does nothing when the cache for these versions is complete; an
# interrupted build never leaves a half-filled cache (built aside, renamed).
# Prints the cache directory on stdout. `build-sidecars.sh --list` builds
# nothing and prints each binary with its version ("csi-attacher v4.12.0").
# Cold, it takes 3-4 minutes on 2 idle cores after build-k8s.sh (shared
# Go build cache); 18 minutes beside a cargo build.
set -euo pipefail

STAGING_VERSION=0.34.4
P=github.com/kubernetes-csi
# module version binary-package(s); the README lists the same pins.
SIDECARS=(
  "$P/external-provisioner/v5 v5.3.0 $P/external-provisioner/v5/cmd/csi-provisioner"
  "$P/external-attacher/v4 v4.12.0 $P/external-attacher/v4/cmd/csi-attacher"
  "$P/external-resizer v1.14.0 $P/external-resizer/cmd/csi-resizer"
  "$P/external-snapshotter/v8 v8.4.0 $P/external-snapshotter/v8/cmd/csi-snapshotter $P/external-snapshotter/v8/cmd/snapshot-controller"
  "$P/external-snapshotter/client/v8 v8.4.0"
  "sigs.k8s.io/gateway-api v1.4.0"
)
BINARIES=(csi-provisioner csi-attacher csi-resizer csi-snapshotter snapshot-controller)
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
  endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
  kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver)

CACHE=${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}
GO=${GO:-/usr/local/go/bin/go}
KEY=$(printf '%s\n' "$STAGING_VERSION" "${SIDECARS[@]}" | sha256sum | cut -c1-12)
DEST=$CACHE/sidecars-$KEY

die() { echo "build-sidecars.sh: error: $*" >&2; exit 1; }
log() { echo "build-sidecars.sh: $*" >&2; }

cache_ok() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
  ls "$DEST"/crd/snapshot.storage.k8s.io_volumesnapshots.yaml >/dev/null 2>&1
}

if [ "${1:-}" = --list ]; then
  for s in "${SIDECARS[@]}"; do
    read -r mod ver rest <<<"$s"
    for p in $rest; do echo "${p##*/} $ver"; done
  done
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--list]"

if cache_ok; then echo "$DEST"; exit 0; fi
[ -x "$GO" ] || die "Go toolchain not found at $GO (set GO=/path/to/go)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-sidecars.lock"
flock 9
if cache_ok; then echo "$DEST"; exit 0; fi
rm -rf "$CACHE"/.build-sidecars.*

START=$SECONDS
TMP=$(mktemp -d "$CACHE/.build-sidecars.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
W=$TMP/wrapper OUT=$TMP/out
mkdir -p "$W" "$OUT/bin" "$OUT/crd"
export GOTOOLCHAIN=local CGO_ENABLED=0

pkgs=()
{
  printf 'module zebu.local/csisidecars\n\ngo 1.24.0\n\nrequire (\n'
  for s in "${SIDECARS[@]}"; do
    read -r mod ver rest <<<"$s"
    printf '\t%s %s\n' "$mod" "$ver"
    for p in $rest; do pkgs+=("$p"); done
  done
  printf ')\n\nreplace (\n'
  for m in "${STAGING[@]}"; do printf '\tk8s.io/%s => k8s.io/%s v%s\n' "$m" "$m" "$STAGING_VERSION"; done
  printf ')\n'
} > "$W/go.mod"
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for p in "${pkgs[@]}"; do printf '\t_ "%s"\n' "$p"; done
  printf ')\n'
} > "$W/tools.go"

log "building ${BINARIES[*]} with $("$GO" version)"
(cd "$W" && "$GO" mod tidy) || die "go mod tidy failed ($W/go.mod)"
(cd "$W" && nice -n 15 "$GO" build -trimpath -tags selinux,notest,grpcnotrace \
  -ldflags "-s -w" -o "$OUT/bin/" "${pkgs[@]}") || die "go build failed (see above)"
for b in "${BINARIES[@]}"; do [ -x "$OUT/bin/$b" ] || die "binary $b was not produced"; done
# The VolumeSnapshot CRDs ship in the client module, not in the snapshotter's.
client=$(cd "$W" && "$GO" list -m -f '{{.Dir}}' "$P/external-snapshotter/client/v8")
cp "$client"/config/crd/snapshot.storage.k8s.io_volumesnapshot{classes,contents,s}.yaml "$OUT/crd/"
chmod u+w "$OUT"/crd/*.yaml
mkdir -p "$OUT/src" && cp "$W/go.mod" "$W/go.sum" "$W/tools.go" "$OUT/src/"

[ -e "$DEST" ] && mv -T "$DEST" "$TMP/old"
mv -T "$OUT" "$DEST"
secs=$((SECONDS - START))
log "built into $DEST in $((secs / 60))m$((secs % 60))s"
echo "$DEST"
