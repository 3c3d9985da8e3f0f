#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl
# at a pinned version from the Go module proxy, into a version-keyed cache outside
# the repository:
#
#   ${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}/v1.34.4/bin/
#
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, client-go, ...) with
# ./staging/... paths that are not in the module zip, so it cannot be built with
# `go install`. We build it from a throw-away wrapper module that requires
# k8s.io/kubernetes and pins every staging module it requires to the matching
# v0.x tag. ldflags and build tags follow upstream hack/lib/golang.sh + version.sh.
#
# Idempotent: does nothing when the five binaries are present and report the
# pinned version. The build happens in a temp dir next to the cache and is renamed
# into place, so an interrupted build never leaves a half-filled cache.
set -euo pipefail

K8S_VERSION=1.34.4
STAGING_VERSION=0.${K8S_VERSION#1.}            # 1.34.4 -> 0.34.4
K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
CACHE=${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}
DEST=$CACHE/v$K8S_VERSION
GO=${GO:-/usr/local/go/bin/go}
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

# Every `k8s.io/<m> v0.0.0` requirement of k8s.io/kubernetes v1.34.x's go.mod.
# (sample-cli-plugin and sample-controller are replaced upstream but not required.)
# Checked against the downloaded go.mod below; a mismatch aborts the build.
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
  endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
  kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver)

die() { echo "build-k8s.sh: error: $*" >&2; exit 1; }
log() { echo "build-k8s.sh: $*" >&2; }

cache_ok() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
  [ "$("$DEST/bin/kube-apiserver" --version 2>/dev/null || true)" = "Kubernetes v$K8S_VERSION" ]
}

if cache_ok; then
  log "cache up to date: $DEST/bin ($("$DEST/bin/kube-apiserver" --version))"
  exit 0
fi

[ -x "$GO" ] || die "Go toolchain not found at $GO (set GO=/path/to/go)"
mkdir -p "$CACHE" || die "cannot create cache dir $CACHE"

# One build at a time per cache; re-check once we hold the lock.
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
  log "another build holds $CACHE/.build.lock; waiting"
  flock 9
fi
if cache_ok; then log "cache filled by a concurrent build: $DEST/bin"; exit 0; fi

# Leftovers of an interrupted earlier build (we hold the lock, so none is live).
rm -rf "$CACHE"/.build-v"$K8S_VERSION".*

START=$SECONDS
TMP=$(mktemp -d "$CACHE/.build-v$K8S_VERSION.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
W=$TMP/wrapper
OUT=$TMP/v$K8S_VERSION
mkdir -p "$W" "$OUT/bin"

export GOTOOLCHAIN=local CGO_ENABLED=0
log "building Kubernetes v$K8S_VERSION with $("$GO" version) in $TMP"

# Cross-check the staging list against the real go.mod of k8s.io/kubernetes.
gomod=$(cd "$W" && "$GO" mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p') ||
  die "cannot download k8s.io/kubernetes@v$K8S_VERSION from the module proxy"
[ -f "$gomod" ] || die "go.mod of k8s.io/kubernetes@v$K8S_VERSION not found"
want=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {sub("k8s.io/", "", $1); print $1}' "$gomod" | sort)
have=$(printf '%s\n' "${STAGING[@]}" | sort)
[ "$want" = "$have" ] || die "staging module list does not match k8s.io/kubernetes@v$K8S_VERSION go.mod:
$(diff <(echo "$have") <(echo "$want") || true)"

{
  printf 'module zebu.local/k8sbins\n\ngo 1.24.0\n\ngodebug default=go1.24\n\n'
  printf 'require k8s.io/kubernetes v%s\n\nreplace (\n' "$K8S_VERSION"
  for m in "${STAGING[@]}"; do printf '\tk8s.io/%s => k8s.io/%s v%s\n' "$m" "$m" "$STAGING_VERSION"; done
  printf ')\n'
} > "$W/go.mod"
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for b in "${BINARIES[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b"; done
  printf ')\n'
} > "$W/tools.go"

(cd "$W" && "$GO" mod tidy) || die "go mod tidy failed for the wrapper module ($W/go.mod)"

LD="-s -w"
for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  LD="$LD -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR -X $p.gitTreeState=clean"
done
pkgs=()
for b in "${BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
(cd "$W" && nice -n 15 "$GO" build -trimpath -tags selinux,notest,grpcnotrace \
  -ldflags "$LD" -o "$OUT/bin/" "${pkgs[@]}") || die "go build failed (see the output above)"

for b in "${BINARIES[@]}"; do [ -x "$OUT/bin/$b" ] || die "binary $b was not produced"; done
[ "$("$OUT/bin/kube-apiserver" --version 2>/dev/null || true)" = "Kubernetes v$K8S_VERSION" ] ||
  die "built kube-apiserver reports '$("$OUT/bin/kube-apiserver" --version)', expected v$K8S_VERSION"

# Keep the wrapper module next to the binaries as a record of what was built.
mkdir -p "$OUT/src"
cp "$W/go.mod" "$W/go.sum" "$W/tools.go" "$OUT/src/"

# Swap into place: a rename within one filesystem is atomic.
if [ -e "$DEST" ]; then mv -T "$DEST" "$TMP/old"; fi
mv -T "$OUT" "$DEST"

secs=$((SECONDS - START))
log "built ${BINARIES[*]} into $DEST/bin in $((secs / 60))m$((secs % 60))s"
