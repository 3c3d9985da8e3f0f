#!/usr/bin/env bash
# Side-by-side fio comparison: the raw disk, nbdkit's file plugin, and Zebu
# with 1, 2 and 3 replicas, all on files under /var/tmp (one disk).
#
#   benches/fio_compare.sh [--quick | --smoke] [--runs N] [--size 2G] [--seconds S]
#                          [--systems raw,nbdkit-file,zebu-1,zebu-2,zebu-3]
#                          [--bin-dir DIR | --debug] [--out-dir DIR] [--no-rebuild]
#
# Every system is started once and prefilled once (sequential 1 MiB writes
# over the whole volume, so reads hit real data). Then, for each run round,
# every scenario runs on every system before the next round starts (the order
# of the systems rotates from round to round), so the machine's noise hits all
# systems alike; ratios are taken pair by pair within a round, then the median.
#
# Scenarios: 4 KiB randwrite QD1, 4 KiB randwrite QD32, 4 KiB randread QD1,
# 4 KiB randread QD32, 1 MiB sequential write QD8, 1 MiB sequential read QD8,
# 70/30 4 KiB random read/write mix QD16. For every Zebu run the CPU time
# (utime+stime) of the engine and each replica is read before and after fio,
# giving CPU µs per I/O, and VmHWM (peak RSS) after it; so are their user
# time alone and the whole machine's busy time, which bound what making
# Zebu's own code cheaper could gain (the Targets table).
#
# Then, if zebu-3 is among the systems, a rebuild section, one round per run,
# each on a fresh volume (1 GiB, or --size if smaller; 3 replicas): write half
# of it, SIGKILL a replica, add a fresh one (full rebuild, timed); then SIGKILL
# another, write 1% of the blocks at random, restart it on its old dir and add
# it back (delta resync, timed). Each round also times the raw disk doing the
# same copies (fio reading one file while writing another, O_DIRECT): the
# bound for a rebuild on one disk. Before the fill, each round also times
# 4 KiB random reads of never-written blocks at QD1 and QD32 (no disk I/O:
# the floor of Zebu's own path), and after the copies the bound of the 4 KiB
# QD32 write target: the raw disk taking three copies (three files, QD32
# each) and nbdkit-file on a fresh file, as prefilled and again with its
# page cache dropped. --no-rebuild skips the section.
#
# The raw disk's fio jobs use buffers on 2 MiB huge pages, as Zebu's replicas
# do (from 4 KiB pages a 1 MiB request is split in two on a virtio disk): run
# as root, the script enlarges the hugetlb pool for the run and restores it.
#
# Results: benches/results/fio-compare-<date>.json
# (per-run figures, medians, ratios, exact commands), .md (tables) and .svg
# (chart: throughput of every system relative to nbdkit-file); the tables are
# printed at the end. --quick (1 run, 2 s, 512M volume) writes
# fio-compare-<date>-quick.{json,md,svg} so a quick run never replaces a full one.
#
# --smoke is the CI mode: 1 run of 1 s per scenario and system (no ramp),
# 256M volume (the rebuild section too), results into a new temp directory
# (never benches/results/; --out-dir to choose). It exits non-zero only when
# something is broken (a system does not start or dies, fio fails, the
# rebuild fails, the report cannot be written), never because of the figures.
# --debug builds and uses the dev-profile binaries (target/debug: no release
# build; CI has built them already) instead of the release ones; --bin-dir DIR
# uses the zebu-replica and zebu-engine found in DIR, building nothing.
#
# Only processes this script started are stopped (by recorded pid), and its
# work directory is removed on exit, whatever the exit path.
set -euo pipefail

orig_args=("$@")
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(cd "$here/.." && pwd)

usage() { # exit status; the text goes to stderr when it is an error
  if [[ ${1:-0} == 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  else
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  fi
  exit "${1:-0}"
}
die() { echo "fio_compare: $*" >&2; exit 1; }

# ---------------------------------------------------------------- options --
runs=3 size_arg=2G seconds=5 ramp=1 quick=0 smoke=0 debug=0 rebuild=1 bin_dir="" out_dir=""
systems_arg="raw,nbdkit-file,zebu-1,zebu-2,zebu-3"
runs_set=0 size_set=0 seconds_set=0
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --smoke) smoke=1 ;;
    --debug) debug=1 ;;
    --out-dir) [[ $# -ge 2 ]] || die "--out-dir needs a value"; out_dir=$2; shift ;;
    --out-dir=*) out_dir=${1#*=} ;;
    --no-rebuild) rebuild=0 ;;
    --runs) [[ $# -ge 2 ]] || die "--runs needs a value"; runs=$2; runs_set=1; shift ;;
    --runs=*) runs=${1#*=}; runs_set=1 ;;
    --size) [[ $# -ge 2 ]] || die "--size needs a value"; size_arg=$2; size_set=1; shift ;;
    --size=*) size_arg=${1#*=}; size_set=1 ;;
    --seconds) [[ $# -ge 2 ]] || die "--seconds needs a value"; seconds=$2; seconds_set=1; shift ;;
    --seconds=*) seconds=${1#*=}; seconds_set=1 ;;
    --systems) [[ $# -ge 2 ]] || die "--systems needs a value"; systems_arg=$2; shift ;;
    --systems=*) systems_arg=${1#*=} ;;
    --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a value"; bin_dir=$2; shift ;;
    --bin-dir=*) bin_dir=${1#*=} ;;
    -h | --help) usage 0 ;;
    *) echo "fio_compare: unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
((quick && smoke)) && die "--quick and --smoke exclude each other"
[[ -n $bin_dir ]] && ((debug)) && die "--bin-dir and --debug exclude each other"
if ((quick)); then # explicit options still win over --quick's defaults
  ((runs_set)) || runs=1
  ((seconds_set)) || seconds=2
  ((size_set)) || size_arg=512M
fi
if ((smoke)); then
  ((runs_set)) || runs=1
  ((seconds_set)) || seconds=1
  ((size_set)) || size_arg=256M
  ramp=0
fi
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer (got '$runs')"
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer (got '$seconds')"

# Same rules as zebu_proto::size::parse (binary units), so every tool gets bytes.
to_bytes() {
  local s=${1^^} n unit
  [[ $s =~ ^([0-9]+)\ *([A-Z]*)$ ]] || return 1
  n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
  case $unit in
    "" | B) echo $((n)) ;;
    K | KI | KB | KIB) echo $((n << 10)) ;;
    M | MI | MB | MIB) echo $((n << 20)) ;;
    G | GI | GB | GIB) echo $((n << 30)) ;;
    T | TI | TB | TIB) echo $((n << 40)) ;;
    *) return 1 ;;
  esac
}
size=$(to_bytes "$size_arg") || die "invalid --size '$size_arg' (use e.g. 512M, 2G)"
((size >= (64 << 20))) || die "--size must be at least 64M"
((size % (1 << 20) == 0)) || die "--size must be a multiple of 1 MiB"

all_systems=(raw nbdkit-file zebu-1 zebu-2 zebu-3)
IFS=, read -r -a systems <<<"$systems_arg"
((${#systems[@]})) || die "--systems is empty"
for s in "${systems[@]}"; do
  [[ " ${all_systems[*]} " == *" $s "* ]] || die "unknown system '$s' (known: ${all_systems[*]})"
done
has_system() { [[ " ${systems[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------- prerequisites --
missing=()
command -v fio >/dev/null || missing+=("fio (apt-get install fio)")
has_system nbdkit-file && ! command -v nbdkit >/dev/null && missing+=("nbdkit (apt-get install nbdkit)")
[[ -n $bin_dir ]] || command -v cargo >/dev/null || missing+=("cargo (the Rust toolchain)")
for t in python3 timeout fallocate sha256sum; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
  printf 'fio_compare: missing prerequisite: %s\n' "${missing[@]}" >&2
  exit 1
fi
if [[ " ${systems[*]} " =~ " "(nbdkit-file|zebu-1|zebu-2|zebu-3)" " ]] && ! fio --enghelp=nbd >/dev/null 2>&1; then
  die "this fio ($(fio --version)) has no nbd ioengine (Debian's fio >= 3.33 has it)"
fi
if has_system nbdkit-file && ! nbdkit file --version >/dev/null 2>&1; then
  die "nbdkit has no file plugin (apt-get install nbdkit)"
fi
base=${FIO_COMPARE_TMP:-/var/tmp}
[[ -d $base && -w $base ]] || die "$base is not a writable directory"
nfiles=0
for s in "${systems[@]}"; do
  case $s in raw | nbdkit-file | zebu-1) nfiles=$((nfiles + 1)) ;; zebu-2) nfiles=$((nfiles + 2)) ;; zebu-3) nfiles=$((nfiles + 3)) ;; esac
done
rb_size=$((size < (1 << 30) ? size : (1 << 30))) # the rebuild section's volume
has_system zebu-3 && ((rebuild)) && nfiles=$((nfiles + 6 * rb_size / size + 1))
need_kb=$(((size * nfiles + (1 << 30)) / 1024))
avail_kb=$(df -Pk "$base" | awk 'NR == 2 {print $4}')
((avail_kb >= need_kb)) || die "$base has $((avail_kb >> 20)) GiB free; this run needs about $((need_kb >> 20)) GiB"

# ------------------------------------------------------------------ build --
t_start=$(date +%s)
date_tag=$(date +%F)
if [[ -z $bin_dir ]]; then
  if ((debug)); then
    profile=debug build=(cargo build -p zebu-replica -p zebu-engine)
  else
    profile=release build=(cargo build --release -p zebu-replica -p zebu-engine)
  fi
  echo "== building zebu-replica and zebu-engine ($profile): ${build[*]}"
  if ! (cd "$root" && "${build[@]}"); then
    die "the $profile build failed: '${build[*]}' in $root"
  fi
  tdir=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null) || tdir=$root/target
  bin_dir=$tdir/$profile
fi
for b in zebu-replica zebu-engine; do
  [[ -x $bin_dir/$b ]] || die "no executable $bin_dir/$b"
done

# --------------------------------------------------------------- work dir --
work=$(mktemp -d "$base/zebu-fio-compare.XXXXXX")
declare -A pid_of=()     # label -> pid, for every long-running process we start
declare -a pid_order=()  # labels in start order
fio_pid=""
stop_notes=()

alive() { # pid: running (not a zombie)
  local st
  [[ -r /proc/$1/stat ]] || return 1
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $st && $st != Z ]]
}
stop_pid() { # label pid grace_seconds
  local label=$1 pid=$2 grace=${3:-30} i rc=0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      stop_notes+=("$label (pid $pid) did not stop within ${grace}s of SIGTERM; sent SIGKILL")
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || rc=$?
  case $rc in
    0) ;;
    *) stop_notes+=("$label (pid $pid) exited with status $rc") ;;
  esac
}
stop_all() {
  local l
  # the engines first (they flush to their replicas), then replicas and nbdkit
  for l in "${pid_order[@]}"; do
    [[ $l == engine-* && -n ${pid_of[$l]:-} ]] && { stop_pid "$l" "${pid_of[$l]}" 60; unset "pid_of[$l]"; }
  done
  for l in "${pid_order[@]}"; do
    [[ -n ${pid_of[$l]:-} ]] && { stop_pid "$l" "${pid_of[$l]}" 60; unset "pid_of[$l]"; }
  done
  return 0
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n $fio_pid ]]; then
    kill -TERM "$fio_pid" 2>/dev/null
    wait "$fio_pid" 2>/dev/null
  fi
  stop_all
  give_back_huge_pages
  if ((${#stop_notes[@]})); then printf 'fio_compare: note: %s\n' "${stop_notes[@]}" >&2; fi
  rm -rf "$work"
  exit "$rc"
}

# Buffers for the raw disk's fio jobs. fio's default buffers are 4 KiB pages:
# a 1 MiB O_DIRECT request from them is more scatter-gather segments than a
# virtio disk takes (254) and reaches the disk as two requests, which here
# halves the disk's 1 MiB throughput. Zebu's replicas keep their buffers on
# huge pages (one segment per 1 MiB), so the raw baseline does too, or it
# would understate the disk: fio's --iomem=mmaphuge (MAP_HUGETLB), from a
# hugetlb pool this script enlarges for the run and shrinks back on exit.
# Where that cannot be done (not root, no 2 MiB huge pages, memory too
# fragmented), the raw jobs use fio's default buffers and the report says so.
# A run killed outright (SIGKILL) cannot shrink the pool back; its pid and
# the pages it added stay in $huge_state, and the next run takes them back.
huge_pool=/proc/sys/vm/nr_hugepages huge_orig="" raw_mem=()
huge_state=/run/zebu-fio-compare.hugepages
raw_buffers="fio's default buffers (4 KiB pages)"
give_back_huge_pages() {
  [[ -n $huge_orig ]] && echo "$huge_orig" >"$huge_pool" 2>/dev/null && rm -f "$huge_state"
  huge_orig=""
}
reclaim_stale_huge_pages() { # the pages a run that died without cleaning up added
  local pid added now
  [[ -f $huge_state && -w $huge_pool ]] || return 0
  read -r pid added <"$huge_state" || return 0
  [[ $pid =~ ^[0-9]+$ && $added =~ ^[0-9]+$ ]] || { rm -f "$huge_state"; return 0; }
  if [[ $pid != "$$" ]] && kill -0 "$pid" 2>/dev/null; then return 0; fi # still running
  now=$(cat "$huge_pool")
  echo $((now > added ? now - added : 0)) >"$huge_pool" 2>/dev/null || return 0
  rm -f "$huge_state"
  echo "fio_compare: gave back $added huge pages left reserved by an earlier run (pid $pid) that did not finish" >&2
}
reserve_huge_pages() { # count
  local want=$1 have
  if ! grep -Eq '^Hugepagesize: +2048 kB' /proc/meminfo; then
    raw_buffers+=": this kernel has no 2 MiB huge pages"
    return
  fi
  if [[ ! -w $huge_pool ]]; then
    raw_buffers+=": $huge_pool is not writable (run as root for the huge-page baseline)"
    return
  fi
  reclaim_stale_huge_pages
  huge_orig=$(cat "$huge_pool")
  echo "$$ $want" >"$huge_state" 2>/dev/null || true
  echo $((huge_orig + want)) >"$huge_pool" 2>/dev/null || true
  have=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
  if ((have >= want)); then
    raw_mem=(--iomem=mmaphuge)
    raw_buffers="2 MiB huge pages (fio --iomem=mmaphuge; $want pages reserved in $huge_pool for the run)"
  else
    give_back_huge_pages
    raw_buffers+=": only ${have:-0} of $want huge pages could be reserved"
  fi
}
trap cleanup EXIT
trap 'echo "fio_compare: interrupted" >&2; exit 130' INT TERM
# The rebuild section's depth-128 copy: two jobs of 128 x 1 MiB buffers.
if has_system raw || { has_system zebu-3 && ((rebuild)); }; then reserve_huge_pages 160; fi

# Copy the binaries so a concurrent rebuild cannot swap them mid-run.
mkdir -p "$work/bin" "$work/out" "$work/logs"
cp "$bin_dir/zebu-replica" "$bin_dir/zebu-engine" "$work/bin/"
bin=$work/bin
manifest=$work/manifest.tsv
meta=$work/meta.tsv
cpu_tsv=$work/cpu.tsv       # system scenario run process ticks_before ticks_after vmhwm_kb
rebuild_tsv=$work/rebuild.tsv # key value
: >"$manifest"
: >"$meta"
: >"$cpu_tsv"
: >"$rebuild_tsv"
q() { local s; printf -v s '%q ' "$@"; printf '%s' "${s% }"; }
meta_put() { printf '%s\t%s\n' "$1" "$2" >>"$meta"; }
# kind system scenario run position rc json log t0 t1 sync_s cmd
man_put() { local IFS=$'\t'; printf '%s\n' "$*" >>"$manifest"; }

meta_put date "$date_tag"
meta_put started "$(date -Is)"
meta_put host "$(hostname)"
meta_put kernel "$(uname -r)"
meta_put cpus "$(nproc)"
meta_put mem_total_kb "$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
meta_put loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
meta_put fio_version "$(fio --version)"
has_system nbdkit-file && meta_put nbdkit_version "$(nbdkit --version 2>&1 | head -1)"
meta_put fs "$(df -PT "$base" | awk 'NR == 2 {print $1" "$2}') at $base"
meta_put git_commit "$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
meta_put git_dirty_files "$(git -C "$root" --no-optional-locks status --porcelain 2>/dev/null | wc -l)"
meta_put bin_dir "$bin_dir"
meta_put build_profile "${profile:-given with --bin-dir}"
meta_put zebu_replica_sha256 "$(sha256sum "$bin/zebu-replica" | cut -d' ' -f1)"
meta_put zebu_engine_sha256 "$(sha256sum "$bin/zebu-engine" | cut -d' ' -f1)"
meta_put script_command "$(q "$0" ${orig_args[@]+"${orig_args[@]}"}) (parsed: --runs $runs --size $size_arg --seconds $seconds --systems ${systems[*]}$( ((quick)) && echo ' --quick')$( ((smoke)) && echo ' --smoke'))"
meta_put runs "$runs"
meta_put seconds "$seconds"
meta_put ramp_seconds "$ramp"
meta_put size_bytes "$size"
meta_put size_arg "$size_arg"
meta_put quick "$quick"
meta_put smoke "$smoke"
meta_put systems "${systems[*]}"
meta_put workdir "$work"
meta_put clk_tck "$(getconf CLK_TCK)"
meta_put raw_buffers "$raw_buffers"
meta_put between_runs "sync -f on the work dir's filesystem before every fio run, so one system's dirty page cache is not written back during another's run"

# ---------------------------------------------------------------- systems --
declare -A uri_of=() target_of=()

start_proc() { # label ready_regex timeout_s cmd... ; logs in $work/logs/label.{out,err}
  local label=$1 ready=$2 limit=$3 i
  shift 3
  man_put setup "$label" - - - - - - - - - "$(q "$@")"
  "$@" >"$work/logs/$label.out" 2>"$work/logs/$label.err" &
  pid_of[$label]=$!
  pid_order+=("$label")
  wait_ready "${pid_of[$label]}" "$work/logs/$label.out" "$ready" "$limit" "fio_compare: $label" || exit 1
}

start_zebu() { # system nreplicas
  local sys=$1 n=$2 i addrs=() a
  mkdir -p "$work/$sys"
  for ((i = 1; i <= n; i++)); do
    start_proc "replica-$sys-r$i" "$REPLICA_READY" 120 \
      "$bin/zebu-replica" --dir "$work/$sys/r$i" --listen 127.0.0.1:0 --size "$size"
    a=$(replica_address "$work/logs/replica-$sys-r$i.out")
    [[ -n $a ]] || die "cannot read replica-$sys-r$i's address from: $(cat "$work/logs/replica-$sys-r$i.out")"
    addrs+=(--replica "$a")
  done
  local vol=${sys//-/}
  start_proc "engine-$sys" "$(engine_ready "$vol")" 300 \
    "$bin/zebu-engine" --volume "$vol" --size "$size" "${addrs[@]}" \
    --nbd "unix:$work/$sys/nbd.sock" --listen 127.0.0.1:0
  uri_of[$sys]="nbd+unix:///$vol?socket=$work/$sys/nbd.sock"
}

start_nbdkit() { # label image socket: `nbdkit file` on image, serving on socket; 1 if it did not start
  local label=$1 img=$2 sock=$3 i
  man_put setup "$label" - - - - - - - - - "$(q nbdkit file "$img" --unix "$sock" --foreground)"
  nbdkit file "$img" --unix "$sock" --foreground >"$work/logs/$label.out" 2>"$work/logs/$label.err" &
  pid_of[$label]=$!
  pid_order+=("$label")
  # nbdkit prints nothing when ready: wait for its socket instead.
  for ((i = 0; i < 300; i++)); do
    [[ -S $sock ]] && return 0
    alive "${pid_of[$label]}" || break
    sleep 0.1
  done
  [[ -S $sock ]]
}
start_system() {
  case $1 in
    raw)
      fallocate -l "$size" "$work/raw.img"
      man_put setup raw - - - - - - - - - "$(q fallocate -l "$size" "$work/raw.img")"
      target_of[raw]=$work/raw.img
      ;;
    nbdkit-file)
      fallocate -l "$size" "$work/nbdkit.img"
      man_put setup nbdkit-file - - - - - - - - - "$(q fallocate -l "$size" "$work/nbdkit.img")"
      start_nbdkit nbdkit "$work/nbdkit.img" "$work/nbdkit.sock" ||
        { cat "$work/logs/nbdkit.err" >&2; die "nbdkit did not start"; }
      uri_of[nbdkit-file]="nbd+unix:///?socket=$work/nbdkit.sock"
      ;;
    zebu-1) start_zebu zebu-1 1 ;;
    zebu-2) start_zebu zebu-2 2 ;;
    zebu-3) start_zebu zebu-3 3 ;;
  esac
}

procs_of() { # system -> labels of its processes
  case $1 in
    raw) ;;
    nbdkit-file) echo nbdkit ;;
    zebu-1) echo replica-zebu-1-r1 engine-zebu-1 ;;
    zebu-2) echo replica-zebu-2-r1 replica-zebu-2-r2 engine-zebu-2 ;;
    zebu-3) echo replica-zebu-3-r1 replica-zebu-3-r2 replica-zebu-3-r3 engine-zebu-3 ;;
  esac
}
system_alive() {
  local l
  for l in $(procs_of "$1"); do
    alive "${pid_of[$l]}" || { dead_label=$l; return 1; }
  done
  return 0
}

# CPU ticks (utime + stime, fields 14 and 15 of /proc/PID/stat) and VmHWM (kB)
cpu_ticks() { # pid
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}' || echo -
}
# User-space ticks alone (utime, field 14).
user_ticks() { # pid
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12}' || echo -
}
# Busy ticks of the whole machine (user + nice + system + irq + softirq of
# /proc/stat's cpu line; idle, iowait and steal excluded).
machine_busy() {
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat 2>/dev/null || echo -
}
vm_hwm() { # pid
  awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo -
}
declare -A ticks_before=()
cpu_snap_before() { # system
  local l
  ticks_before=()
  for l in $(procs_of "$1"); do
    ticks_before[$l]=$(cpu_ticks "${pid_of[$l]}")
    ticks_before[user:$l]=$(user_ticks "${pid_of[$l]}")
  done
  ticks_before[machine:busy]=$(machine_busy)
}
cpu_snap_after() { # system scenario run ; one line per process in $cpu_tsv
  local l after
  for l in $(procs_of "$1"); do
    after=$(cpu_ticks "${pid_of[$l]}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$l" "${ticks_before[$l]:--}" "${after:--}" \
      "$(vm_hwm "${pid_of[$l]}")" >>"$cpu_tsv"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t-\n' "$1" "$2" "$3" "user:$l" "${ticks_before[user:$l]:--}" \
      "$(user_ticks "${pid_of[$l]}")" >>"$cpu_tsv"
  done
  printf '%s\t%s\t%s\tmachine:busy\t%s\t%s\t-\n' "$1" "$2" "$3" "${ticks_before[machine:busy]:--}" \
    "$(machine_busy)" >>"$cpu_tsv"
}

fio_target_args() { # system -> fio engine/target options
  if [[ $1 == raw ]]; then
    printf '%s\n' --ioengine=io_uring --direct=1 ${raw_mem[@]+"${raw_mem[@]}"} "--filename=${target_of[raw]}"
  else
    printf '%s\n' --ioengine=nbd "--uri=${uri_of[$1]}"
  fi
}

# Runs fio under a hard time limit; sets fio_rc. The pid is recorded for cleanup.
run_fio() { # limit_s json log fio-args...
  local limit=$1 json=$2 log=$3
  shift 3
  fio_rc=0
  timeout -k 15 "$limit" fio "$@" --output-format=json "--output=$json" >"$log" 2>&1 &
  fio_pid=$!
  wait "$fio_pid" || fio_rc=$?
  fio_pid=""
}

sync_fs() { # prints seconds taken
  local t0 t1
  t0=$(date +%s.%N)
  sync -f "$work" 2>/dev/null || sync
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}

echo "== work dir $work; volume $size_arg ($size bytes); ${seconds}s per run (+${ramp}s ramp); $runs run(s); systems: ${systems[*]}"
for s in "${systems[@]}"; do
  echo "== starting $s"
  start_system "$s"
done

# --------------------------------------------------------------- prefill --
for s in "${systems[@]}"; do
  mapfile -t targs < <(fio_target_args "$s")
  args=(fio --name=prefill-seq-1m --rw=write --bs=1M --iodepth=8 --numjobs=1 "--size=$size"
    --group_reporting "${targs[@]}")
  sync_s=$(sync_fs)
  echo "== prefill $s: sequential 1 MiB writes over the whole $size_arg volume"
  json=$work/out/prefill-$s.json log=$work/out/prefill-$s.log
  t0=$(date +%s.%N)
  run_fio $((size / (1 << 20) + 600)) "$json" "$log" "${args[@]:1}"
  t1=$(date +%s.%N)
  man_put prefill "$s" prefill-seq-1m 0 0 "$fio_rc" "$json" "$log" "$t0" "$t1" "$sync_s" \
    "$(q "${args[@]}" --output-format=json "--output=$json")"
  if ((fio_rc != 0)); then
    echo "fio_compare: prefill of $s failed (fio exit $fio_rc):" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  python3 - "$json" <<'EOF'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(f"   {w['bw_bytes'] / 2**20:.1f} MiB/s, {w['runtime'] / 1000:.1f} s")
EOF
done

# ------------------------------------------------------------ the rounds --
# name rw bs iodepth [extra fio option]
scenarios=(
  "randwrite-4k-qd1 randwrite 4k 1"
  "randwrite-4k-qd32 randwrite 4k 32"
  "randread-4k-qd1 randread 4k 1"
  "randread-4k-qd32 randread 4k 32"
  "write-1m-qd8 write 1M 8"
  "read-1m-qd8 read 1M 8"
  "randrw70-4k-qd16 randrw 4k 16 --rwmixread=70"
)
nsys=${#systems[@]}
total=$((runs * ${#scenarios[@]} * nsys))
n=0 failed=0
declare -A skip=()
for ((r = 1; r <= runs; r++)); do
  for sc in "${scenarios[@]}"; do
    read -r name rw bs qd extra <<<"$sc"
    extra_args=()
    [[ -n $extra ]] && extra_args=("$extra")
    for ((k = 0; k < nsys; k++)); do
      s=${systems[$(((k + r - 1) % nsys))]} # rotate the order each round
      n=$((n + 1))
      json=$work/out/$s-$name-run$r.json log=$work/out/$s-$name-run$r.log
      mapfile -t targs < <(fio_target_args "$s")
      args=(fio "--name=$name" "--rw=$rw" ${extra_args[@]+"${extra_args[@]}"} "--bs=$bs" "--iodepth=$qd" --numjobs=1 "--size=$size"
        --time_based "--runtime=$seconds" "--ramp_time=$ramp" --group_reporting "${targs[@]}")
      fullcmd=$(q "${args[@]}" --output-format=json "--output=$json")
      if [[ -n ${skip[$s]:-} ]]; then
        echo "[$n/$total] $s $name run $r: skipped (${skip[$s]})"
        man_put run "$s" "$name" "$r" "$k" skipped "$json" "$log" - - - "$fullcmd"
        failed=$((failed + 1))
        continue
      fi
      if ! system_alive "$s"; then
        skip[$s]="$dead_label exited"
        echo "fio_compare: $s: $dead_label is no longer running; its last log lines:" >&2
        tail -n 20 "$work/logs/$dead_label.err" >&2
        echo "[$n/$total] $s $name run $r: skipped (${skip[$s]})"
        man_put run "$s" "$name" "$r" "$k" skipped "$json" "$log" - - - "$fullcmd"
        failed=$((failed + 1))
        continue
      fi
      sync_s=$(sync_fs)
      echo "[$n/$total] $s $name run $r"
      cpu_snap_before "$s"
      t0=$(date +%s.%N)
      run_fio $((seconds + 120)) "$json" "$log" "${args[@]:1}"
      t1=$(date +%s.%N)
      cpu_snap_after "$s" "$name" "$r"
      man_put run "$s" "$name" "$r" "$k" "$fio_rc" "$json" "$log" "$t0" "$t1" "$sync_s" "$fullcmd"
      if ((fio_rc != 0)); then
        failed=$((failed + 1))
        echo "fio_compare: fio failed on $s $name run $r (exit $fio_rc$( ((fio_rc == 124)) && echo ', timed out')):" >&2
        tail -n 10 "$log" >&2
      fi
    done
  done
done

# ------------------------------------------------------------ shut down --
meta_put loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"
echo "== stopping every system"
stop_all

# ---------------------------------------------------------------- rebuild --
# zebu-3 only, on a fresh volume per round so the fio rounds' data does not
# count. Each round also times the raw disk doing the same copy (fio reading
# one file while writing another, concurrently, O_DIRECT, at depths 16 and
# 128; the faster counts): the bound a rebuild on this one disk can reach,
# measured side by side.
rb_put() { printf '%s\t%s\n' "$rb_round.$1" "$2" >>"$rebuild_tsv"; }
rb_fail() { # message: recorded, the section stops, the script goes on
  echo "fio_compare: rebuild section: $*" >&2
  rb_put error "$*"
  failed=$((failed + 1))
  return 1
}
replica_addr() { # label
  replica_address "$work/logs/$1.out"
}
kill_replica() { # label: SIGKILL, expected; no stop note
  local p=${pid_of[$1]}
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "pid_of[$1]"
}
ctl() { # args... ; the engine's control address in $rb_ctl
  man_put setup rebuild - - - - - - - - - "$(q "$bin/zebu-engine" ctl --engine "$rb_ctl" "$@")"
  timeout -k 10 1800 "$bin/zebu-engine" ctl --engine "$rb_ctl" "$@"
}
rb_fio() { # name json log fio-args... (fio_rc set); an NBD run on the volume
  local name=$1 json=$2 log=$3
  shift 3
  local args=(fio "--name=$name" "$@" --numjobs=1 --group_reporting --ioengine=nbd "--uri=$rb_uri")
  man_put setup rebuild - - - - - - - - - "$(q "${args[@]}" --output-format=json "--output=$json")"
  run_fio 900 "$json" "$log" "${args[@]:1}"
}
rb_raw() { # json log fio-args... (fio_rc set); raw-disk jobs, run concurrently
  local json=$1 log=$2
  shift 2
  man_put setup rebuild - - - - - - - - - "$(q fio "$@" --output-format=json "--output=$json")"
  run_fio 900 "$json" "$log" "$@"
}
timed_add() { # phase address: `replica add --wait`, wall time recorded
  local t0 t1
  t0=$(date +%s.%N)
  ctl replica add "$2" --wait >"$work/out/$rb_round-rebuild-$1.json" 2>"$work/logs/$rb_round-rebuild-$1.err" ||
    { rb_fail "$1 rebuild: replica add failed: $(tail -3 "$work/logs/$rb_round-rebuild-$1.err")"; return 1; }
  t1=$(date +%s.%N)
  rb_put "$1_wall_s" "$(python3 -c "print(f'{$t1 - $t0:.3f}')")"
  rb_put "$1_status_json" "$work/out/$rb_round-rebuild-$1.json"
  rb_put "$1_address" "$2"
}
run_rebuild() {
  local d=$work/rebuild-$rb_round i a addrs=() p=rebuild-$rb_round
  local fill=$((rb_size / 2)) blocks=$((rb_size / 4096)) io
  io=$(((blocks / 100) * 4096))
  mkdir -p "$d"
  rb_put size_bytes "$rb_size"
  for ((i = 1; i <= 3; i++)); do
    start_proc "replica-$p-r$i" ' on [0-9.]+:[0-9]+ ' 120 \
      "$bin/zebu-replica" --dir "$d/r$i" --listen 127.0.0.1:0 --size "$rb_size"
    a=$(replica_addr "replica-$p-r$i")
    [[ -n $a ]] || { rb_fail "cannot read replica-$p-r$i's address"; return 1; }
    addrs+=(--replica "$a")
  done
  start_proc "engine-$p" "$(engine_ready "$p")" 300 \
    "$bin/zebu-engine" --volume "$p" --size "$rb_size" "${addrs[@]}" \
    --nbd "unix:$d/nbd.sock" --listen 127.0.0.1:0
  rb_ctl=$(sed -n 's/.*; control \([0-9.]*:[0-9]*\);.*/\1/p' "$work/logs/engine-$p.out" | head -1)
  [[ -n $rb_ctl ]] || { rb_fail "cannot read the engine's control address"; return 1; }
  rb_uri="nbd+unix:///$p?socket=$d/nbd.sock"

  # 0. the path's floor: 4 KiB random reads of never-written blocks need no
  # disk I/O, so they time NBD + engine + gRPC + replica alone
  echo "== rebuild round $rb_round: path floor (reads of never-written blocks, no disk I/O)"
  for qd in 1 32; do
    rb_fio "path-floor-qd$qd" "$work/out/$p-floor-qd$qd.json" "$work/out/$p-floor-qd$qd.log" \
      --rw=randread --bs=4k "--iodepth=$qd" "--size=$rb_size" --time_based "--runtime=$((seconds < 2 ? seconds : 2))"
    ((fio_rc == 0)) || { rb_fail "the path-floor reads failed (fio exit $fio_rc)"; return 1; }
    rb_put "floor_qd${qd}_json" "$work/out/$p-floor-qd$qd.json"
  done

  # 1. half the volume holds data
  echo "== rebuild round $rb_round: writing $((fill >> 20)) MiB (half the volume) sequentially"
  rb_fio rebuild-fill "$work/out/$p-fill.json" "$work/out/$p-fill.log" \
    --rw=write --bs=1M --iodepth=8 "--size=$fill"
  ((fio_rc == 0)) || { rb_fail "the fill write failed (fio exit $fio_rc)"; return 1; }
  rb_put fill_bytes "$fill"

  # 2. full rebuild: SIGKILL r1, drop it, add a fresh replica
  local dead
  dead=$(replica_addr "replica-$p-r1")
  echo "== rebuild round $rb_round: SIGKILL replica r1 ($dead), full rebuild onto a fresh replica"
  kill_replica "replica-$p-r1"
  ctl replica remove "$dead" >"$work/logs/$p-remove.out" 2>&1 ||
    rb_put note "replica remove $dead: $(tail -1 "$work/logs/$p-remove.out")"
  start_proc "replica-$p-r4" ' on [0-9.]+:[0-9]+ ' 120 \
    "$bin/zebu-replica" --dir "$d/r4" --listen 127.0.0.1:0 --size "$rb_size"
  timed_add full "$(replica_addr "replica-$p-r4")" || return 1

  # 3. delta resync: SIGKILL r2, write 1% of the blocks, restart r2 on its dir
  echo "== rebuild round $rb_round: SIGKILL replica r2, random 4 KiB writes over 1% of the blocks ($((io >> 10)) KiB, ≤10 s)"
  kill_replica "replica-$p-r2"
  rb_fio rebuild-delta-writes "$work/out/$p-delta-writes.json" "$work/out/$p-delta-writes.log" \
    --rw=randwrite --bs=4k --iodepth=16 "--size=$rb_size" "--io_size=$io" --runtime=10
  ((fio_rc == 0)) || { rb_fail "the delta writes failed (fio exit $fio_rc)"; return 1; }
  rb_put delta_writes_json "$work/out/$p-delta-writes.json"
  rb_put delta_blocks_target $((io / 4096))
  start_proc "replica-$p-r2b" ' on [0-9.]+:[0-9]+ ' 120 \
    "$bin/zebu-replica" --dir "$d/r2" --listen 127.0.0.1:0
  echo "== rebuild round $rb_round: replica r2 back, delta resync"
  timed_add delta "$(replica_addr "replica-$p-r2b")" || return 1
  echo "== rebuild round $rb_round: stopping the volume"
  stop_all

  # 4. the raw disk doing the same copies: read one file while writing
  # another, $((fill >> 20)) MiB sequentially, then the delta's blocks at random
  echo "== rebuild round $rb_round: raw disk baseline (concurrent read + write, O_DIRECT)"
  local raw=(--ioengine=io_uring --direct=1 ${raw_mem[@]+"${raw_mem[@]}"})
  rb_raw "$work/out/$p-raw-prep.json" "$work/out/$p-raw-prep.log" --name=raw-prep \
    "--filename=$d/raw-src" --rw=write --bs=1M --iodepth=8 "--size=$rb_size" "${raw[@]}"
  ((fio_rc == 0)) || { rb_fail "the raw baseline's file could not be written (fio exit $fio_rc)"; return 1; }
  # the full copy at depths 16 and 128 (this disk mixes reads and writes
  # better at some depths than others); the faster of the two is the bound
  local qd key
  for qd in 16 128; do
    key=raw_full_json
    ((qd == 16)) || key=raw_full_deep_json
    rm -f "$d/raw-dst"
    sync_fs >/dev/null
    rb_raw "$work/out/$p-raw-full-qd$qd.json" "$work/out/$p-raw-full-qd$qd.log" \
      --name=raw-full-read "--filename=$d/raw-src" --rw=read --bs=1M "--iodepth=$qd" "--size=$fill" "${raw[@]}" \
      --name=raw-full-write "--filename=$d/raw-dst" --rw=write --bs=1M "--iodepth=$qd" "--size=$fill" "${raw[@]}"
    ((fio_rc == 0)) || { rb_fail "the raw full-copy baseline at depth $qd failed (fio exit $fio_rc)"; return 1; }
    rb_put "$key" "$work/out/$p-raw-full-qd$qd.json"
  done
  sync_fs >/dev/null
  rb_raw "$work/out/$p-raw-delta.json" "$work/out/$p-raw-delta.log" \
    --name=raw-delta-read "--filename=$d/raw-src" --rw=randread --bs=4k --iodepth=32 "--size=$rb_size" "--io_size=$io" "${raw[@]}" \
    --name=raw-delta-write "--filename=$d/raw-dst" --rw=randwrite --bs=4k --iodepth=32 "--size=$fill" "--io_size=$io" "${raw[@]}"
  ((fio_rc == 0)) || { rb_fail "the raw delta-copy baseline failed (fio exit $fio_rc)"; return 1; }
  rb_put raw_delta_json "$work/out/$p-raw-delta.json"
  rm -rf "$d"
  write_bound || return 1
  return 0
}
# The 4 KiB QD32 write target's bound, in the same round: the disk alone
# taking three copies (three files written at once by one fio job each,
# 4 KiB random at QD32 per file, as each of zebu-3's replicas gets the
# writes), and nbdkit-file on a fresh file as prefilled (its file cached in
# the large folios the sequential writes left, where ext4 walks every block
# of a folio for each 4 KiB write) and again once its cached pages are
# written back and dropped (the random writes then cache it in 4 KiB folios).
write_bound() {
  local d=$work/bound-$rb_round p=bound-$rb_round i files=() jobs=()
  mkdir -p "$d"
  local raw=(--ioengine=io_uring --direct=1 ${raw_mem[@]+"${raw_mem[@]}"})
  echo "== rebuild round $rb_round: 4 KiB write bound: the raw disk writing three copies, QD32 each"
  for i in 1 2 3; do
    files+=("$d/copy$i")
    jobs+=("--name=copy$i" "--filename=$d/copy$i")
  done
  rb_raw "$work/out/$p-raw3-prep.json" "$work/out/$p-raw3-prep.log" --name=raw3-prep \
    "--filename=$(IFS=:; echo "${files[*]}")" --rw=write --bs=1M --iodepth=8 "--size=$((3 * rb_size))" "${raw[@]}"
  ((fio_rc == 0)) || { rb_fail "the three-copy bound's files could not be written (fio exit $fio_rc)"; return 1; }
  sync_fs >/dev/null
  # Global options first: they apply to each of the three jobs.
  rb_raw "$work/out/$p-raw3.json" "$work/out/$p-raw3.log" --rw=randwrite --bs=4k --iodepth=32 \
    "--size=$rb_size" --time_based "--runtime=$seconds" "${raw[@]}" "${jobs[@]}"
  ((fio_rc == 0)) || { rb_fail "the three-copy bound failed (fio exit $fio_rc)"; return 1; }
  rb_put raw3_qd32_json "$work/out/$p-raw3.json"
  rm -f "${files[@]}"

  echo "== rebuild round $rb_round: 4 KiB write bound: nbdkit-file as prefilled, then with its page cache dropped"
  fallocate -l "$rb_size" "$d/nbdkit.img"
  local label=nbdkit-$p
  start_nbdkit "$label" "$d/nbdkit.img" "$d/nbdkit.sock" ||
    { rb_fail "nbdkit did not start: $(tail -3 "$work/logs/$label.err")"; return 1; }
  local nbd=(--ioengine=nbd "--uri=nbd+unix:///?socket=$d/nbdkit.sock")
  rb_raw "$work/out/$p-nbdkit-prep.json" "$work/out/$p-nbdkit-prep.log" --name=nbdkit-prep \
    --rw=write --bs=1M --iodepth=8 "--size=$rb_size" "${nbd[@]}"
  ((fio_rc == 0)) || { rb_fail "nbdkit's prefill failed (fio exit $fio_rc)"; return 1; }
  local state
  for state in prefilled evicted; do
    if [[ $state == evicted ]]; then
      man_put setup "$label" - - - - - - - - - "$(q python3 "$here/drop_page_cache.py" "$d/nbdkit.img")"
      python3 "$here/drop_page_cache.py" "$d/nbdkit.img" || { rb_fail "could not drop the page cache of nbdkit's file"; return 1; }
    fi
    sync_fs >/dev/null
    rb_raw "$work/out/$p-nbdkit-$state.json" "$work/out/$p-nbdkit-$state.log" "--name=nbdkit-$state" \
      --rw=randwrite --bs=4k --iodepth=32 "--size=$rb_size" --time_based "--runtime=$seconds" "${nbd[@]}"
    ((fio_rc == 0)) || { rb_fail "nbdkit's 4 KiB writes ($state) failed (fio exit $fio_rc)"; return 1; }
    rb_put "nbdkit_${state}_qd32_json" "$work/out/$p-nbdkit-$state.json"
  done
  stop_pid "$label" "${pid_of[$label]}" 30
  unset "pid_of[$label]"
  rm -rf "$d"
}
if has_system zebu-3 && ((rebuild)); then
  for ((rb_round = 1; rb_round <= runs; rb_round++)); do
    run_rebuild || true
    stop_all
    rm -rf "$work/rebuild-$rb_round"
  done
fi
for note in "${stop_notes[@]}"; do meta_put stop_note "$note"; done
for l in "${pid_order[@]}"; do
  # zebu's stderr: keep warnings and errors for the report
  sed 's/\x1b\[[0-9;]*m//g' "$work/logs/$l.err" 2>/dev/null | grep -E ' (WARN|ERROR) ' | tail -n 5 | while IFS= read -r line; do
    meta_put "log_$l" "$line"
  done || true
done
t_end=$(date +%s)
meta_put duration_seconds $((t_end - t_start))
meta_put finished "$(date -Is)"

# ---------------------------------------------------------------- report --
if [[ -z $out_dir ]]; then
  if ((smoke)); then
    out_dir=$(mktemp -d "${TMPDIR:-/tmp}/zebu-fio-smoke.XXXXXX")
  else
    out_dir=$here/results
  fi
fi
suffix=""
((quick)) && suffix="-quick"
((smoke)) && suffix="-smoke"
mkdir -p "$out_dir" || die "cannot create the results directory $out_dir"
out_json=$out_dir/fio-compare-$date_tag$suffix.json
out_md=$out_dir/fio-compare-$date_tag$suffix.md
out_svg=$out_dir/fio-compare-$date_tag$suffix.svg
python3 "$here/fio_compare.py" --manifest "$manifest" --meta "$meta" \
  --json "$out_json" --md "$out_md" --svg "$out_svg" \
  --cpu "$cpu_tsv" --rebuild "$rebuild_tsv" ||
  die "writing the report failed (python3 $here/fio_compare.py)"
for f in "$out_json" "$out_md" "$out_svg"; do
  [[ -s $f ]] || die "the report $f was not written"
done
echo
echo "results: $out_json"
echo "         $out_md"
echo "         $out_svg"
echo "total duration: $((t_end - t_start)) s"
if ((failed)); then
  echo "fio_compare: $failed of $total fio runs failed or were skipped (see the results)" >&2
  exit 2
fi
