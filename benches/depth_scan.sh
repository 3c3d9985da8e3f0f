#!/usr/bin/env bash
# Where 4 KiB random writes spend their time as the queue depth grows: fio's
# 4 KiB random writes at several depths on each system, and beside each run
# what the machine and the disk did meanwhile.
#
#   benches/depth_scan.sh [--systems zebu-3,nbdkit-file,nbdkit-file-evicted,raw-3]
#                         [--depths 16,32,64,128] [--runs 3] [--seconds 5] [--size 1G]
#                         [--bin-dir DIR | --debug] [--smoke]
#
# A system is one of:
#   nbdkit-file: `nbdkit file`, one copy through the page cache;
#   nbdkit-file-evicted: the same, but once prefilled its file's cached pages
#     are written back and dropped (fsync + POSIX_FADV_DONTNEED). The
#     sequential prefill leaves the file cached in large folios, and ext4 then
#     walks every block of a folio for each 4 KiB write into it; after the
#     drop, the random writes cache the file in 4 KiB folios. Same server,
#     same file, only the page cache differs;
#   zebu-N: an engine and N replicas (N = 1..3);
#   raw-3: the disk alone taking three copies: three files written at once
#     by one fio job each (io_uring, O_DIRECT, the depth per file), as
#     zebu-3's replicas each get the depth's writes; its IOPS are the
#     three jobs' sum / 3, the most three copies of each write can reach on
#     this disk (it has no server process: no CPU figure).
# Each is started once on files under $DEPTH_SCAN_TMP (default /var/tmp) and
# prefilled once with sequential 1 MiB writes. Then each round runs every depth on every system, one run at
# a time (`sync -f` before each; the order of the systems rotates from round
# to round, so the machine's noise hits them alike). Per run:
#   IOPS and p50 latency (fio's nbd engine on a Unix socket);
#   CPU µs per write: utime + stime of the system's processes over the run,
#     divided by the writes fio completed;
#   idle %: the machine's idle + iowait share of /proc/stat over the run;
#   disk: writes it completed per write fio completed, their mean latency
#     (ms) and the mean queue (requests in flight, over the run's wall time)
#     of the block device holding the files, from /proc/diskstats.
# Printed at the end, as Markdown: the medians over the rounds, and, for
# each nbdkit system among them, every other system's IOPS over that one's,
# taken round by round (median [min-max]).
# Building: release binaries (cargo build --release) unless --bin-dir or
# --debug. --smoke (what CI runs): depths 1,4, 1 run of 1 s, 64M.
set -euo pipefail

die() { echo "depth_scan: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

systems_arg=zebu-3,nbdkit-file,nbdkit-file-evicted,raw-3 depths=16,32,64,128 runs=3 seconds=5 size=1G bin_dir="" debug=0 smoke=0
while (($#)); do
  case $1 in
    --systems) [[ $# -ge 2 ]] || die "--systems needs a value"; systems_arg=$2; shift ;;
    --depths) [[ $# -ge 2 ]] || die "--depths needs a value"; depths=$2; shift ;;
    --runs) [[ $# -ge 2 ]] || die "--runs needs a value"; runs=$2; shift ;;
    --seconds) [[ $# -ge 2 ]] || die "--seconds needs a value"; seconds=$2; shift ;;
    --size) [[ $# -ge 2 ]] || die "--size needs a value"; size=$2; shift ;;
    --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a value"; bin_dir=$2; shift ;;
    --debug) debug=1 ;;
    --smoke) smoke=1 ;;
    -h | --help) usage 0 ;;
    *) echo "depth_scan: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
  shift
done
((smoke)) && depths=1,4 runs=1 seconds=1 size=64M
[[ -n $bin_dir ]] && ((debug)) && die "--bin-dir and --debug exclude each other"
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer (got '$runs')"
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer (got '$seconds')"
[[ $depths =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--depths must be a comma-separated list of positive integers (got '$depths')"
[[ $size =~ ^[1-9][0-9]*[MG]$ ]] || die "--size must be a number of MiB or GiB, like 512M or 2G (got '$size')"
IFS=, read -ra systems <<<"$systems_arg"
((${#systems[@]})) || die "--systems needs at least one system"
zebu=0
declare -A seen=()
for s in "${systems[@]}"; do
  case $s in
    nbdkit-file | nbdkit-file-evicted | raw-3) ;;
    zebu-[123]) zebu=1 ;;
    *) die "unknown system '$s': use nbdkit-file, nbdkit-file-evicted, zebu-1, zebu-2, zebu-3 or raw-3" ;;
  esac
  [[ -z ${seen[$s]:-} ]] || die "system '$s' is listed twice"
  seen[$s]=1
done

command -v fio >/dev/null || die "fio is missing (apt-get install fio)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio >= 3.33 needed)"
command -v python3 >/dev/null || die "python3 is missing"
[[ -z ${seen[nbdkit-file]:-}${seen[nbdkit-file-evicted]:-} ]] || command -v nbdkit >/dev/null ||
  die "nbdkit is missing (apt-get install nbdkit)"

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$root/benches/lib.sh"
if ((zebu)) && [[ -z $bin_dir ]]; then
  profile=release build=(cargo build --release -p zebu-replica -p zebu-engine)
  ((debug)) && profile=debug build=(cargo build -p zebu-replica -p zebu-engine)
  echo "== building ($profile): ${build[*]}" >&2
  (cd "$root" && "${build[@]}") || die "the build failed: '${build[*]}' in $root"
  bin_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$profile
fi
if ((zebu)); then
  for b in zebu-replica zebu-engine; do [[ -x $bin_dir/$b ]] || die "no executable $bin_dir/$b"; done
fi

base=${DEPTH_SCAN_TMP:-/var/tmp}
work=$(mktemp -d "$base/zebu-depth-scan.XXXXXX")
all_pids=()
declare -A pids_of=() uri_of=()
cleanup() {
  local p
  for p in "${all_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${all_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The block device under the work dir, for /proc/diskstats (none on tmpfs).
dev=$(df --output=source "$work" | tail -1)
dev=${dev#/dev/}
grep -q " $dev " /proc/diskstats || dev=""

started() { # system pid: records a process of the system
  all_pids+=("$2")
  pids_of[$1]="${pids_of[$1]:-} $2"
}
wait_for() { # pid file regex what
  wait_ready "$1" "$2" "$3" 120 "depth_scan: $4" || exit 1
}
start_system() { # system
  local s=$1 d=$work/$1 i addrs=()
  mkdir -p "$d"
  case $s in
    zebu-*)
      for ((i = 1; i <= ${s#zebu-}; i++)); do
        "$bin_dir/zebu-replica" --dir "$d/r$i" --listen 127.0.0.1:0 --size "$size" \
          >"$d/r$i.out" 2>"$d/r$i.err" &
        started "$s" $!
        wait_for $! "$d/r$i.out" "$REPLICA_READY" "$s's replica $i"
        addrs+=(--replica "$(replica_address "$d/r$i.out")")
      done
      "$bin_dir/zebu-engine" --volume scan --size "$size" "${addrs[@]}" \
        --nbd "unix:$d/nbd.sock" --listen 127.0.0.1:0 >"$d/e.out" 2>"$d/e.err" &
      started "$s" $!
      wait_for $! "$d/e.out" "$(engine_ready scan)" "$s's engine"
      uri_of[$s]="nbd+unix:///scan?socket=$d/nbd.sock"
      ;;
    nbdkit-file | nbdkit-file-evicted)
      fallocate -l "$size" "$d/nbdkit.img"
      nbdkit file "$d/nbdkit.img" --unix "$d/nbdkit.sock" --foreground \
        >"$d/nbdkit.out" 2>"$d/nbdkit.err" &
      started "$s" $!
      for ((i = 0; i < 300; i++)); do [[ -S $d/nbdkit.sock ]] && break; sleep 0.1; done
      [[ -S $d/nbdkit.sock ]] || die "nbdkit did not start: $(tail -5 "$d/nbdkit.err")"
      uri_of[$s]="nbd+unix:///?socket=$d/nbdkit.sock"
      ;;
    raw-3)
      for i in 1 2 3; do fallocate -l "$size" "$d/raw$i.img"; done
      ;;
  esac
  echo "== $s: prefilling $size with sequential 1 MiB writes" >&2
  if [[ $s == raw-3 ]]; then
    # One job per file: --size is then each file's (with one job over the
    # three files it would be their total).
    fio --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 --size="$size" \
      --name=prefill1 --filename="$d/raw1.img" --name=prefill2 --filename="$d/raw2.img" \
      --name=prefill3 --filename="$d/raw3.img" >"$d/prefill.log" 2>&1 ||
      die "$s's prefill failed: $(tail -5 "$d/prefill.log")"
    return
  fi
  fio --name=prefill --ioengine=nbd --uri="${uri_of[$s]}" --rw=write --bs=1M --iodepth=8 \
    --size="$size" >"$d/prefill.log" 2>&1 || die "$s's prefill failed: $(tail -5 "$d/prefill.log")"
  if [[ $s == nbdkit-file-evicted ]]; then
    python3 "$root/benches/drop_page_cache.py" "$d/nbdkit.img" || die "could not drop the page cache of $d/nbdkit.img"
  fi
}
for s in "${systems[@]}"; do start_system "$s"; done

check_alive() { # system: dies, with the logs' last lines, when one of its processes has exited
  local p
  for p in ${pids_of[$1]:-}; do
    kill -0 "$p" 2>/dev/null && [[ $(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f1) != Z ]] && continue
    tail -n 5 "$work/$1"/*.err >&2 2>/dev/null || true
    die "a process of $1 (pid $p) exited during the scan"
  done
}
ticks() { # system: summed utime + stime of its processes
  local p t=0
  for p in ${pids_of[$1]:-}; do
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
cpu_line() { awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6}' /proc/stat; }
disk_line() { # writes, write ms, weighted ms in queue
  if [[ -n $dev ]]; then awk -v d="$dev" '$3 == d {print $8, $11, $14}' /proc/diskstats; else echo "- - -"; fi
}

results=$work/runs.tsv
IFS=, read -ra qds <<<"$depths"
nsys=${#systems[@]}
for ((r = 1; r <= runs; r++)); do
  for qd in "${qds[@]}"; do
    for ((k = 0; k < nsys; k++)); do
      s=${systems[$(((k + r - 1) % nsys))]} # rotate the order each round
      check_alive "$s"
      sync -f "$work"
      t0=$(ticks "$s") c0=$(cpu_line) d0=$(disk_line) s0=$(date +%s%N)
      if [[ $s == raw-3 ]]; then
        target=(--ioengine=io_uring --direct=1
          --name=copy1 --filename="$work/$s/raw1.img" --name=copy2 --filename="$work/$s/raw2.img"
          --name=copy3 --filename="$work/$s/raw3.img")
      else
        target=(--name=scan --ioengine=nbd --uri="${uri_of[$s]}")
      fi
      # Global options first: with raw-3 they apply to each of its three jobs.
      fio --rw=randwrite --bs=4k --iodepth="$qd" --size="$size" --time_based --runtime="$seconds" \
        --output-format=json "${target[@]}" >"$work/fio.json" 2>"$work/fio.err" ||
        die "fio failed on $s at depth $qd: $(tail -5 "$work/fio.err")"
      check_alive "$s"
      t1=$(ticks "$s") c1=$(cpu_line) d1=$(disk_line) s1=$(date +%s%N)
      line=$(python3 - "$work/fio.json" "$s" "$qd" "$r" "$((t1 - t0))" "$(getconf CLK_TCK)" \
        "$c0" "$c1" "$d0" "$d1" "$(((s1 - s0) / 1000000))" <<'PY'
import json, sys
f, system, qd, r, dticks, hz, c0, c1, d0, d1, ms = sys.argv[1:]
text = open(f).read()
jobs = [j["write"] for j in json.loads(text[text.index("{"):])["jobs"]]
# raw-3's three jobs each write one copy: a write is three of their writes.
copies = len(jobs)
ios = sum(w["total_ios"] for w in jobs) / copies
if min(w["total_ios"] for w in jobs) == 0:
    sys.exit(f"depth_scan: fio completed no write on {system} at depth {qd}")
iops = sum(w["iops"] for w in jobs) / copies
p50 = sorted(w["clat_ns"]["percentile"]["50.000000"] for w in jobs)[copies // 2] / 1000
cpu = f"{int(dticks) * 1e6 / int(hz) / ios:.1f}" if system != "raw-3" else "-"
(ct0, ci0), (ct1, ci1) = map(int, c0.split()), map(int, c1.split())
idle = 100 * (ci1 - ci0) / max(ct1 - ct0, 1)
cells = [system, qd, r, f"{iops:.0f}", f"{p50:.0f}", cpu, f"{idle:.0f}"]
if "-" in d0:
    cells += ["-", "-", "-"]
else:
    (w0, wt0, q0), (w1, wt1, q1) = map(int, d0.split()), map(int, d1.split())
    n = w1 - w0
    cells += [f"{n / ios:.2f}", f"{(wt1 - wt0) / n:.2f}" if n else "-",
              f"{(q1 - q0) / int(ms):.1f}"]
print("\t".join(cells))
PY
      ) || exit 1
      echo "$line" >>"$results"
      echo "[round $r] $(echo "$line" | awk -F'\t' '{printf "%s QD%s: %s IOPS, p50 %s us, %s us CPU per write, %s%% idle, %s disk writes per write", $1, $2, $4, $5, $6, $7, $8}')" >&2
    done
  done
done

python3 - "$results" "$size" "$seconds" "$runs" "${dev:-none}" <<'PY'
import statistics, sys
path, size, seconds, runs, dev = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
systems = list(dict.fromkeys(r[0] for r in rows))
depths = list(dict.fromkeys(r[1] for r in rows))
def med(vals):
    nums = [float(v) for v in vals if v != "-"]
    return statistics.median(nums) if nums else None
fmt = ["{:,.0f}", "{:,.0f}", "{:.1f}", "{:.0f}", "{:.2f}", "{:.2f}", "{:.1f}"]
print(f"4 KiB random writes, {size} volume, {seconds} s per run, medians of {runs} run(s); disk {dev}\n")
print("| system | QD | IOPS | p50 µs | CPU µs per write | machine idle % | disk writes per write | disk write ms | disk queue |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in systems:
    for qd in depths:
        sel = [r for r in rows if r[0] == s and r[1] == qd]
        m = [med([r[i] for r in sel]) for i in range(3, 10)]
        print(f"| {s} | {qd} | " + " | ".join("-" if v is None else f.format(v) for f, v in zip(fmt, m)) + " |")
others = [s for s in systems if not s.startswith("nbdkit")]
for baseline in [s for s in systems if s.startswith("nbdkit")]:
    if not others:
        break
    print(f"\nIOPS over {baseline}'s, round by round: median [min-max]\n")
    print("| QD | " + " | ".join(others) + " |")
    print("|---:|" + "---:|" * len(others))
    for qd in depths:
        base = {r[2]: float(r[3]) for r in rows if r[0] == baseline and r[1] == qd}
        cells = []
        for s in others:
            q = [float(r[3]) / base[r[2]] for r in rows if r[0] == s and r[1] == qd and base.get(r[2])]
            cells.append(f"{statistics.median(q):.2f} [{min(q):.2f}-{max(q):.2f}]" if q else "-")
        print(f"| {qd} | " + " | ".join(cells) + " |")
PY
