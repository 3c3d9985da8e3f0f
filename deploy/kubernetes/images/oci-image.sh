#!/usr/bin/env bash
# Pack layers into an OCI image archive that `ctr images import` (and
# `skopeo copy oci-archive:...`) accept, without a container engine:
#
#   oci-image.sh NAME:TAG OUT.tar ENTRYPOINT-JSON LAYER.tar [LAYER.tar ...]
#
# Layers are plain (uncompressed) tar files of root filesystem trees, lowest
# first. The output depends only on the inputs: no timestamps, sorted JSON,
# so the same layers give the same image digest.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 NAME:TAG OUT.tar ENTRYPOINT-JSON LAYER.tar..." >&2; exit 2; }
ref=$1 out=$2 entrypoint=$3
shift 3
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/blobs/sha256"

blob() { # FILE -> moves it into blobs/, prints "sha size"
  local sha size
  sha=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$w/blobs/sha256/$sha"
  echo "$sha $size"
}

diff_ids=() layers=()
for l in "$@"; do
  [ -f "$l" ] || { echo "oci-image.sh: no layer $l" >&2; exit 1; }
  cp "$l" "$w/layer"
  read -r sha size < <(blob "$w/layer")
  diff_ids+=("\"sha256:$sha\"")
  layers+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$sha\",\"size\":$size}")
done
join() { local IFS=,; echo "$*"; }

printf '{"architecture":"amd64","config":{"Entrypoint":%s,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"},"os":"linux","rootfs":{"diff_ids":[%s],"type":"layers"}}' \
  "$entrypoint" "$(join "${diff_ids[@]}")" > "$w/config"
read -r csha csize < <(blob "$w/config")
printf '{"config":{"digest":"sha256:%s","mediaType":"application/vnd.oci.image.config.v1+json","size":%s},"layers":[%s],"mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2}' \
  "$csha" "$csize" "$(join "${layers[@]}")" > "$w/manifest"
read -r msha msize < <(blob "$w/manifest")
printf '{"manifests":[{"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"},"digest":"sha256:%s","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"amd64","os":"linux"},"size":%s}],"schemaVersion":2}' \
  "$ref" "${ref##*:}" "$msha" "$msize" > "$w/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$w/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
echo "$ref sha256:$msha"
