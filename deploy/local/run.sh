#!/usr/bin/env bash
# Zebu on one machine, no Kubernetes: builds the release binaries, starts three
# replicas and an engine on loopback, and walks through what a volume does
# (write, snapshot, lose a replica, rebuild, revert), printing each step.
# The volume keeps serving at the end until Ctrl-C (or exits right away when
# stdin is not a terminal or ZEBU_DEMO_EXIT=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

need=()
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
if ((${#need[@]})); then
  say "installing ${need[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

say "building zebu-replica and zebu-engine (release)"
cargo build --release -q -p zebu-replica -p zebu-engine
bin=$root/target/release

work=$(mktemp -d "${TMPDIR:-/var/tmp}/zebu-demo.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

addr=""
start_replica() { # name -> sets $addr; the pid goes to $pids
  local n=$1
  "$bin/zebu-replica" --dir "$work/$n" --listen 127.0.0.1:0 --size 1G >"$work/$n.out" 2>"$work/$n.log" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q ' on ' "$work/$n.out" 2>/dev/null && break
    sleep 0.1
  done
  addr=$(sed -n 's/.* on \([0-9.:]*\) .*/\1/p' "$work/$n.out")
  [[ -n $addr ]] || { echo "replica $n did not start:"; cat "$work/$n.log"; exit 1; }
}

say "starting three replicas (1 GiB each) in $work"
start_replica r1; r1=$addr
start_replica r2; r2=$addr
start_replica r3; r3=$addr
echo "replicas: $r1 $r2 $r3"

say "starting the engine for volume 'demo' (NBD on $work/nbd.sock)"
"$bin/zebu-engine" --volume demo --size 1G --replica "$r1" --replica "$r2" --replica "$r3" \
  --nbd "unix:$work/nbd.sock" --listen 127.0.0.1:0 >"$work/engine.out" 2>"$work/engine.log" &
pids+=($!)
engine_pid=$!
for _ in $(seq 100); do grep -q ready "$work/engine.out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$work/engine.out" || { echo "the engine did not start:"; cat "$work/engine.log"; exit 1; }
cat "$work/engine.out"
ctl=$(sed -n 's/.*control \([0-9.:]*\);.*/\1/p' "$work/engine.out")
uri="nbd+unix:///demo?socket=$work/nbd.sock"
zctl() { "$bin/zebu-engine" ctl --engine "$ctl" "$@"; }

say "nbdinfo $uri"
nbdinfo "$uri" | head -6

say "writing 64 MiB of random data with nbdcopy"
head -c 64M /dev/urandom >"$work/a.img"
nbdcopy "$work/a.img" "$uri"
zctl status

say "snapshot s1, then overwrite the first 64 MiB with other data"
zctl snapshot create s1
head -c 64M /dev/urandom >"$work/b.img"
nbdcopy "$work/b.img" "$uri"
zctl snapshot list

say "killing replica r1 (SIGKILL) while writing: I/O goes on, the volume is degraded"
kill -9 "${pids[0]}"
nbdcopy "$work/b.img" "$uri"
zctl status

say "adding a fresh replica r4: it joins write-only and is rebuilt from a healthy one"
start_replica r4; r4=$addr
zctl replica add "$r4" --wait >/dev/null
zctl status

say "reverting to s1 (no NBD client connected): the first data comes back"
zctl revert s1
nbdcopy "$uri" "$work/after.img"
if cmp -n $((64 << 20)) "$work/after.img" "$work/a.img"; then
  echo "data after revert == data at snapshot time"
else
  echo "data after revert differs from the snapshot!" >&2
  exit 1
fi

say "done: volume 'demo' is served at $uri"
echo "try: nbdinfo '$uri'   or   $bin/zebu-engine ctl --engine $ctl status"
if [[ -t 0 && "${ZEBU_DEMO_EXIT:-0}" != 1 ]]; then
  echo "Ctrl-C stops everything and removes $work"
  wait "$engine_pid" || true
fi
