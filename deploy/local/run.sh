#!/usr/bin/env bash
# Zebu on one machine, no Kubernetes: builds the release binaries, starts the
# CSI driver in standalone mode on its embedded defaults (socket
# /run/zebu/csi.sock, state /var/lib/zebu, three disk directories under it),
# and walks through a StatefulSet's volume life with the `zebu` CLI, which
# speaks CSI to the driver exactly like Kubernetes' sidecars and kubelet:
# create, attach (ext4), write, snapshot, restore into a new volume, lose a
# replica under I/O and watch it rebuild, expand, detach, delete.
# The driver keeps running at the end until Ctrl-C (or stops right away when
# stdin is not a terminal or ZEBU_DEMO_EXIT=1); the demo's volumes are
# deleted either way.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

need=()
command -v nbdfuse >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  say "installing ${need[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

say "building zebu-csi, zebu, zebu-replica and zebu-engine (release)"
cargo build --release -q -p zebu-csi -p zebu-cli -p zebu-nbd-fuse -p zebu-replica -p zebu-engine
bin=$root/target/release
export PATH=$bin:$PATH
export ZEBU_ENDPOINT=unix:///run/zebu/csi.sock
state=/var/lib/zebu
export ZEBU_CLI_STATE=$state/cli

if zebu status >/dev/null 2>&1; then
  echo "a Zebu driver already serves $ZEBU_ENDPOINT; stop it first" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/zebu-demo.XXXXXX")
driver=""
vols=()
snaps=()
cleanup() {
  set +e
  say "cleaning up: detaching and deleting the demo's volumes, stopping the driver"
  for v in "${vols[@]}"; do zebu volume detach "$v" >/dev/null 2>&1; done
  for s in "${snaps[@]}"; do zebu snapshot delete "$s" >/dev/null; done
  for v in "${vols[@]}"; do zebu volume delete "$v" >/dev/null; done
  [[ -n $driver ]] && kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting the driver: zebu-csi standalone (log: $state/standalone.log)"
mkdir -p "$state"
zebu-csi standalone >"$work/ready" 2>>"$state/standalone.log" &
driver=$!
for _ in $(seq 300); do
  grep -q ready "$work/ready" 2>/dev/null && break
  kill -0 "$driver" 2>/dev/null || { tail -20 "$state/standalone.log"; exit 1; }
  sleep 0.1
done
cat "$work/ready"
run zebu status

say "creating a 1 GiB volume with 3 replicas (placed on the three disk directories)"
vol=$(zebu volume create demo-data --size 1G --replicas 3 --fstype ext4)
vols+=("$vol")
run zebu volume get "$vol"

say "attaching it: ControllerPublish (engine starts) → NodeStage (loop over the engine's file, mkfs.ext4, mount) → NodePublish (bind)"
run zebu volume attach "$vol" --mount "$work/data"
for i in 1 2 3; do head -c 4M /dev/urandom >"$work/data/file$i"; done
echo "written before the snapshot" >"$work/data/note"
sync -f "$work/data/note"
(cd "$work/data" && sha256sum file1 file2 file3 note) >"$work/at-snapshot.sha256"
run df -h "$work/data"

say "taking a crash-consistent snapshot, then changing the volume"
snap=$(zebu snapshot create demo-snap --volume "$vol")
snaps+=("$snap")
run zebu snapshot list --volume "$vol"
echo "written after the snapshot" >"$work/data/note"
rm "$work/data/file2"
sync -f "$work/data/note"

say "restoring the snapshot into a new volume and attaching it"
restored=$(zebu volume create demo-restored --size 1G --from-snapshot "$snap")
vols+=("$restored")
run zebu volume attach "$restored" --mount "$work/restored"
run ls -l "$work/restored"
(cd "$work/restored" && sha256sum -c "$work/at-snapshot.sha256")
echo "the restored volume holds exactly the snapshot-time files"
run zebu volume detach "$restored"

say "killing one replica of $vol (SIGKILL) while writing"
run zebu replica list "$vol"
victim=$(pgrep -f "zebu-replica --dir .*/replicas/$vol/" | head -1)
head -c 32M /dev/urandom >"$work/data/during" &
writer=$!
sleep 0.2
run kill -9 "$victim"
wait "$writer"
sync -f "$work/data/during"
echo "the writes went on; the agent restarts the replica and the controller hands it back to the engine:"
for _ in $(seq 600); do
  out=$(zebu replica list "$vol")
  if ! grep -qE ' (ERR|WO) ' <<<"$out" && [[ $(grep -c ' RW ' <<<"$out") == 3 ]]; then break; fi
  sleep 0.1
done
run zebu replica list "$vol"

say "expanding to 2 GiB (ext4 grows at the next stage; online ext4 resize needs CAP_SYS_RESOURCE)"
run zebu volume detach "$vol"
run zebu volume expand "$vol" 2G
run zebu volume attach "$vol" --mount "$work/data"
run df -h "$work/data"
run cat "$work/data/note"

run zebu volume list
if [[ -t 0 && ${ZEBU_DEMO_EXIT:-0} != 1 ]]; then
  say "the driver keeps serving $ZEBU_ENDPOINT (volume $vol mounted at $work/data); Ctrl-C to clean up and stop"
  wait "$driver" || true
fi
