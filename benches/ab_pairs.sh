#!/usr/bin/env bash
# Alternating pairs: two builds of Zebu's engine and replica, A (before a
# change) and B (after), measured one after the other on the same scratch
# volume setup, the order flipping every pair, so that a noisy, shared
# machine moves both sides of a pair alike.
#
#   benches/ab_pairs.sh --a DIR --b DIR [--pairs 8] [--seconds 6]
#                       [--work DIR] [SCENARIO...]
#
# DIR holds zebu-replica and zebu-engine. For each measurement a fresh
# volume is set up at the same paths and ports: three replicas (--size 1G)
# on directories under the work dir, an engine serving the volume as its
# FUSE file (--file), a loop device with direct I/O on the file, ext4, and
# a 256M file written once; then torn down. (Two volumes set up side by
# side and measured in turn differed by 7% at QD1 for the same build, and
# the bias flipped when the builds swapped volumes: hence one at a time.)
# Scenarios (default: qd1 qd32 fsync), fio on the file in the filesystem:
#   qd1     4 KiB random writes, O_DIRECT, psync
#   qd2     the same with libaio at QD2
#   qd32    the same with libaio at QD32
#   fsync   4 KiB sequential writes, each followed by fdatasync
#   fsync2  the same in two jobs at once
# Prints, per scenario, the medians [min-max] over the pairs of B/A for
# IOPS, p50 latency and CPU per I/O (utime + stime of the engine and the
# three replicas around the fio run, over the I/Os it completed), with A's
# median IOPS and CPU. The raw lines are kept in WORK/pairs.txt. Needs
# root (loop devices, mount), fio, mkfs.ext4. Ports 19300-19303.
set -euo pipefail

a="" b="" pairs=8 seconds=6 work=/var/tmp/zebu-ab
scenarios=()
while (($#)); do
  case $1 in
    --a) a=$2; shift 2 ;;
    --b) b=$2; shift 2 ;;
    --pairs) pairs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "ab_pairs: unknown flag $1" >&2; exit 2 ;;
    *) scenarios+=("$1"); shift ;;
  esac
done
((${#scenarios[@]})) || scenarios=(qd1 qd32 fsync)
for s in "${scenarios[@]}"; do
  case $s in qd1 | qd2 | qd32 | fsync | fsync2) ;; *) echo "ab_pairs: unknown scenario $s" >&2; exit 2 ;; esac
done
for d in "$a" "$b"; do
  [[ -n $d && -x $d/zebu-replica && -x $d/zebu-engine ]] ||
    { echo "ab_pairs: --a and --b must be directories holding zebu-replica and zebu-engine" >&2; exit 2; }
done
[[ $pairs =~ ^[1-9][0-9]*$ && $seconds =~ ^[1-9][0-9]*$ ]] ||
  { echo "ab_pairs: --pairs and --seconds take positive integers" >&2; exit 2; }

# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
vol=$work/vol
pids=() loop=""
down() {
  if mountpoint -q "$vol/mnt" 2>/dev/null; then umount "$vol/mnt"; fi
  if [[ -n $loop ]]; then losetup -d "$loop" 2>/dev/null || true; fi
  loop=""
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  pids=()
  rm -rf "$vol"
}
trap down EXIT

up() { # BINDIR
  mkdir -p "$vol/fm" "$vol/mnt"
  local i
  for i in 1 2 3; do
    "$1/zebu-replica" --dir "$vol/r$i" --listen "127.0.0.1:1930$i" --size 1G \
      >"$vol/r$i.out" 2>"$vol/r$i.err" &
    pids+=($!)
  done
  for i in 1 2 3; do
    wait_ready "${pids[i - 1]}" "$vol/r$i.out" "$REPLICA_READY" 60 "ab_pairs: replica $i" || exit 1
  done
  # The engine mounts its file before its ready line.
  "$1/zebu-engine" --volume ab --size 1G --replica 127.0.0.1:19301 --replica 127.0.0.1:19302 \
    --replica 127.0.0.1:19303 --nbd "unix:$vol/nbd.sock" --file "$vol/fm/disk" \
    --listen 127.0.0.1:19300 >"$vol/engine.out" 2>"$vol/engine.err" &
  pids+=($!)
  wait_ready "${pids[3]}" "$vol/engine.out" "$(engine_ready ab)" 60 "ab_pairs: the engine" || exit 1
  loop=$(losetup --direct-io=on -f --show "$vol/fm/disk")
  mkfs.ext4 -q "$loop"
  mount "$loop" "$vol/mnt"
  fio --name=layout --filename="$vol/mnt/f" --size=256M --rw=write --bs=1M --direct=1 \
    --ioengine=psync >/dev/null
}

cpu_ticks() {
  local p t=0
  for p in "${pids[@]}"; do
    read -r -a st <"/proc/$p/stat"
    # utime and stime, fields 14 and 15 (no spaces in these commands' names)
    t=$((t + st[13] + st[14]))
  done
  echo "$t"
}

measure() { # SCENARIO -> "IOPS P50_US CPU_US_PER_IO"
  local args
  case $1 in
    qd1) args=(--rw=randwrite --direct=1 --ioengine=psync) ;;
    qd2) args=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=2) ;;
    qd32) args=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=32) ;;
    fsync) args=(--rw=write --fdatasync=1 --ioengine=psync) ;;
    fsync2) args=(--rw=write --fdatasync=1 --ioengine=psync --numjobs=2 --group_reporting) ;;
  esac
  local before after
  before=$(cpu_ticks)
  fio --name=ab --filename="$vol/mnt/f" --size=256M --bs=4k "${args[@]}" --time_based \
    --runtime="$seconds" --output-format=json >"$work/fio.json"
  after=$(cpu_ticks)
  python3 - "$work/fio.json" "$before" "$after" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
cpu_us = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4]) * 1e6
print("%.0f %.0f %.1f" % (w["iops"], w["clat_ns"]["percentile"]["50.000000"] / 1000,
                          cpu_us / max(w["total_ios"], 1)))
EOF
}

mkdir -p "$work"
: >"$work/pairs.txt"
for ((i = 1; i <= pairs; i++)); do
  order=(A B)
  ((i % 2)) || order=(B A)
  for side in "${order[@]}"; do
    dir=$a
    [[ $side == B ]] && dir=$b
    up "$dir"
    for s in "${scenarios[@]}"; do
      echo "$i $s $side $(measure "$s")" | tee -a "$work/pairs.txt"
    done
    down
  done
done

python3 - "$work/pairs.txt" <<'EOF'
import collections, statistics as st, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    i, s, side, iops, p50, cpu = line.split()
    runs[(s, i)][side] = (float(iops), float(p50), float(cpu))
for s in dict.fromkeys(k[0] for k in runs):
    pairs = [v for k, v in runs.items() if k[0] == s and len(v) == 2]
    ratio = lambda j: [p["B"][j] / p["A"][j] for p in pairs if p["A"][j] > 0]
    fmt = lambda r: "%.3f [%.2f-%.2f]" % (st.median(r), min(r), max(r))
    print(f"{s}: B/A over {len(pairs)} pairs: IOPS {fmt(ratio(0))}, p50 {fmt(ratio(1))}, "
          f"CPU per I/O {fmt(ratio(2))}; A: {st.median(p['A'][0] for p in pairs):.0f} IOPS, "
          f"{st.median(p['A'][2] for p in pairs):.0f} us CPU per I/O")
EOF
