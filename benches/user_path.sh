#!/usr/bin/env bash
# What a user of Zebu feels: a filesystem on a volume attached by the real
# driver, side by side with the local disk, in the same run.
#
#   benches/user_path.sh [--quick | --smoke] [--bin-dir DIR | --debug]
#                        [--out-dir DIR] [--no-pgbench]
#
# Systems (every one measured in every round; the order rotates per round):
#   local         a directory on the filesystem holding the work dir
#   zebu-3        ext4 on a 3-replica volume: `zebu-csi standalone` (replicas
#                 on three directories of that same disk), `zebu volume create
#                 --replicas 3 --fstype ext4`, `zebu volume attach --mount`
#                 (the engine's file, loop device, ext4, as a Kubernetes node does)
#   zebu-3-nbd    fio's nbd engine on the engine's NBD socket of a second
#                 3-replica volume (created --block, attached with `zebu volume
#                 attach --block` so the driver starts its engine; the socket
#                 is the nbd-uri of its publish context); no filesystem,
#                 file or loop device in the path. fio scenarios only.
#   three-copies  the local filesystem taking three copies: the same fio job
#                 on three files at once (three jobs, --group_reporting); its
#                 figure is per copy (total / 3). fio scenarios only.
#   floor-3       the floor of the design's hops: `replication-floor` (benches/
#                 src/replication_floor) sends each 4 KiB write (and flush) over
#                 loopback TCP to three processes that pwrite it O_DIRECT (and
#                 fdatasync) into files on this disk, blocking threads, nothing
#                 of Zebu. write-qd1 (one replicated write) and fsync-qd1 (a
#                 replicated write, then a replicated flush) only.
# Scenarios (one fio job or one pgbench run each):
#   randwrite-qd32  4 KiB random writes, O_DIRECT, libaio, QD32, on a file
#                   written once beforehand (256M; --smoke 32M)
#   write-qd1       4 KiB random writes, O_DIRECT, psync (QD1), on the same
#                   file: the latency of one write; the report gives each
#                   system's p50 minus local's, round by round
#   fsync-qd1       4 KiB sequential writes, each followed by fdatasync, QD1
#                   (psync; 64M file; the nbd system: NBD WRITE then FLUSH)
#   pgbench         PostgreSQL (Debian's; installed with apt-get when
#                   missing) run as the postgres user: a cluster initdb'ed in
#                   the system's directory, listening on a Unix socket in the
#                   work dir only; `pgbench -i -s 20` once, then per round a
#                   server start, `pgbench -c 8 -j 2 -T 20`, a stop. local and
#                   zebu-3 only; --no-pgbench skips it.
# For every Zebu run, utime + stime of every Zebu process (zebu-csi, replicas,
# engines, bridges where one runs; read by pid from /proc around the run) over the writes
# (transactions) completed: CPU µs per I/O; and their threads' voluntary context
# switches (sleeps) per I/O. For local and three-copies, fio's own system time
# per write: the kernel's CPU for writing one copy, and three, before any of
# Zebu's work.
#
# Modes: default 3 rounds x 10 s per fio run, pgbench scale 20 for 20 s;
# --quick 1 round x 5 s, pgbench scale 5 for 5 s; --smoke (CI) 1 round x 2 s,
# pgbench scale 1 for 3 s, small files, report into a new temp dir.
# --bin-dir DIR uses the binaries in DIR; --debug builds and uses the dev
# profile; otherwise the release binaries are built.
#
# Results: benches/results/user-path-<date>[-quick].{md,json} (--out-dir DIR
# to choose), the Markdown also printed. Exit status non-zero when something
# is broken (a system does not start, a run fails, teardown leaves something
# behind), never because of the figures.
#
# The work dir is made under ${USER_PATH_TMP:-/var/tmp} with mktemp -d. On
# exit, however it exits, the script stops PostgreSQL, detaches and deletes
# its volumes, stops the driver, kills by pid the processes it started and
# any process whose command line names the work dir (the driver's replicas,
# engines and bridges outlive it by design), unmounts what is mounted under
# the work dir, detaches loop devices backed by files in it, and removes it.
set -euo pipefail

orig_args=("$@")
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(cd "$here/.." && pwd)
helper=$here/user_path.py

usage() {
  if [[ ${1:-0} == 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  else
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  fi
  exit "${1:-0}"
}
die() { echo "user_path: $*" >&2; exit 1; }
say() { echo "== $*"; }

# ---------------------------------------------------------------- options --
quick=0 smoke=0 debug=0 pgbench=1 bin_dir="" out_dir=""
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --smoke) smoke=1 ;;
    --debug) debug=1 ;;
    --no-pgbench) pgbench=0 ;;
    --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a value"; bin_dir=$2; shift ;;
    --bin-dir=*) bin_dir=${1#*=} ;;
    --out-dir) [[ $# -ge 2 ]] || die "--out-dir needs a value"; out_dir=$2; shift ;;
    --out-dir=*) out_dir=${1#*=} ;;
    -h | --help) usage 0 ;;
    *) echo "user_path: unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
((quick && smoke)) && die "--quick and --smoke exclude each other"
[[ -n $bin_dir ]] && ((debug)) && die "--bin-dir and --debug exclude each other"

rounds=3 seconds=10 pg_scale=20 pg_seconds=20 file_mb=256 fsync_mb=64 vol_size=2G nbd_vol_size=1G
if ((quick)); then
  rounds=1 seconds=5 pg_scale=5 pg_seconds=5
fi
if ((smoke)); then
  rounds=1 seconds=2 pg_scale=1 pg_seconds=3 file_mb=32 fsync_mb=8 vol_size=1G nbd_vol_size=256M
fi
systems=(local zebu-3 zebu-3-nbd three-copies floor-3)
scenarios=(randwrite-qd32 write-qd1 fsync-qd1)
((pgbench)) && scenarios+=(pgbench)

# ---------------------------------------------------------- prerequisites --
missing=()
for t in fio python3 timeout losetup mkfs.ext4 blkid nbdinfo fusermount3 findmnt mountpoint; do
  command -v "$t" >/dev/null || missing+=("$t")
done
((pgbench)) && ! command -v runuser >/dev/null && missing+=(runuser)
[[ -n $bin_dir ]] || command -v cargo >/dev/null || missing+=("cargo (the Rust toolchain)")
((${#missing[@]} == 0)) || die "missing prerequisite(s): ${missing[*]} (Debian: fio python3 coreutils util-linux e2fsprogs libnbd-bin fuse3)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio ($(fio --version)) has no nbd ioengine (Debian's fio >= 3.33 has it)"
[[ $(id -u) == 0 ]] || die "run as root (the driver mounts filesystems and sets up loop devices)"
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

find_pgbin() { # the newest /usr/lib/postgresql/*/bin with every tool used
  local d
  while read -r d; do
    [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres && -x $d/pgbench && -x $d/psql ]] && { echo "$d"; return 0; }
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
  return 1
}
pgbin=""
if ((pgbench)); then
  if ! pgbin=$(find_pgbin); then
    say "installing PostgreSQL: apt-get install -y postgresql"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/tmp/user-path-apt.$$.log 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get update -q >>/tmp/user-path-apt.$$.log 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >>/tmp/user-path-apt.$$.log 2>&1 ||
        { tail -n 20 /tmp/user-path-apt.$$.log >&2; die "apt-get install postgresql failed"; }
    fi
    rm -f /tmp/user-path-apt.$$.log
    pgbin=$(find_pgbin) || die "PostgreSQL installed, but no /usr/lib/postgresql/*/bin has initdb, pg_ctl, postgres, pgbench and psql"
  fi
  id postgres >/dev/null 2>&1 || die "no postgres user (the postgresql package makes it)"
fi

base=${USER_PATH_TMP:-/var/tmp}
[[ -d $base && -w $base ]] || die "$base is not a writable directory"
base=$(cd "$base" && pwd)
[[ -z $out_dir || $out_dir == /* ]] || out_dir=$PWD/$out_dir # the script works from its work dir
# A rough bound: the test files on every system (zebu's three times), and
# PostgreSQL's data and WAL on local and zebu-3 (three times).
need_mb=$(((file_mb + fsync_mb) * 10 + (pgbench ? (pg_scale * 16 + 1024) * 4 : 0) + 1024))
avail_mb=$(($(df -Pk "$base" | awk 'NR == 2 {print $4}') / 1024))
((avail_mb >= need_mb)) || die "$base has $avail_mb MiB free; this run needs about $need_mb MiB"

# ------------------------------------------------------------------ build --
t_start=$(date +%s)
date_tag=$(date +%F)
profile="given with --bin-dir"
if [[ -z $bin_dir ]]; then
  pkgs=(-p zebu-csi -p zebu-cli -p zebu-nbd-fuse -p zebu-replica -p zebu-engine -p zebu-benches)
  if ((debug)); then
    profile=debug build=(cargo build "${pkgs[@]}")
  else
    profile=release build=(cargo build --release "${pkgs[@]}")
  fi
  say "building ($profile): ${build[*]}"
  (cd "$root" && "${build[@]}") || die "the $profile build failed: '${build[*]}' in $root"
  tdir=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null) || tdir=$root/target
  bin_dir=$tdir/$profile
fi
bin=$(cd "$bin_dir" 2>/dev/null && pwd) || die "no directory $bin_dir"
for b in zebu-csi zebu zebu-nbd-fuse zebu-replica zebu-engine replication-floor; do
  [[ -x $bin/$b ]] || die "no executable $bin/$b"
done

# --------------------------------------------------------------- work dir --
work=$(mktemp -d "$base/zebu-user-path.XXXXXX")
# The engine's NBD socket is STATE/agent/engines/<volume id>.sock; a longer
# path than a Unix socket takes would put it outside the work dir.
((${#work} <= 46)) || { rmdir "$work"; die "the work dir $work is too long for the engine's socket path: set USER_PATH_TMP to a shorter directory"; }
chmod 711 "$work" # the postgres user reaches its directories through it
if ((pgbench)) && ! runuser -u postgres -- test -x "$work"; then
  rmdir "$work"
  die "the postgres user cannot reach $work (a directory above it is not searchable by others): chmod o+x it, or set USER_PATH_TMP to a directory postgres can reach"
fi
cd "$work"        # a directory the postgres user may be in
mkdir -p "$work/logs" "$work/out" "$work/local" "$work/three" "$work/mnt" "$work/disk0" "$work/disk1" "$work/disk2"
raw=$work/out/raw.jsonl meta=$work/out/meta.tsv
: >"$raw"
: >"$meta"

driver_pid="" cur_pid="" floor_pids=() floor_addrs=()
vols=() attached=() pg_running=() failed=0
declare -A pg_data=() pg_run=()
pg_port=55432

meta_put() { printf '%s\t%s\n' "$1" "${2//[$'\t\n']/ }" >>"$meta"; }
alive() { # pid: running, not a zombie
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $st && $st != Z ]]
}
start_of() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
zcli() { timeout -k 10 600 "$bin/zebu" --endpoint "unix://$work/csi.sock" --state-dir "$work/cli" "$@"; }
as_pg=(runuser -u postgres --)
pg_as() { "${as_pg[@]}" "$@"; }
pg_ctl_stop() { # system mode
  pg_as "$pgbin/pg_ctl" -D "${pg_data[$1]}" -m "$2" -w -t 120 stop >>"${pg_run[$1]}/ctl.log" 2>&1
}
# Mount points under the work dir, newest first: "MOUNTPOINT FSTYPE".
mounts_under_work() {
  awk -v w="$work/" '{
    for (i = 7; i <= NF; i++) if ($i == "-") { fs = $(i + 1); break }
    if (index($5 "/", w) == 1) print $5, fs
  }' /proc/self/mountinfo | tac
}
loops_under_work() { losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v w="$work/" 'index($2, w) == 1 {print $1}'; }
# Our processes still running: those whose command line names the work dir,
# and (while the driver runs) the driver's descendants. "PID START" lines.
leftovers() {
  local args=("$work")
  [[ -n $driver_pid ]] && alive "$driver_pid" && args+=(--driver "$driver_pid")
  python3 "$helper" procs "${args[@]}" | while IFS=$'\t' read -r pid _kind _cmd; do
    echo "$pid $(start_of "$pid")"
  done
}
kill_recorded() { # file of "PID START" lines: TERM, then KILL after 10 s; only if still the same process
  local f=$1 pid start i left
  [[ -s $f ]] || return 0
  while read -r pid start; do
    if [[ -n $pid && $(start_of "$pid") == "$start" ]] && alive "$pid"; then
      echo "user_path: stopping leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-200)" >&2
      kill -TERM "$pid" 2>/dev/null
    fi
  done <"$f"
  for ((i = 0; i < 100; i++)); do
    left=0
    while read -r pid start; do
      [[ -n $pid && $(start_of "$pid") == "$start" ]] && alive "$pid" && left=1
    done <"$f"
    ((left)) || return 0
    sleep 0.1
  done
  while read -r pid start; do
    [[ -n $pid && $(start_of "$pid") == "$start" ]] && kill -KILL "$pid" 2>/dev/null
  done <"$f"
  return 0
}
stop_driver() {
  local i
  [[ -n $driver_pid ]] || return 0
  if alive "$driver_pid"; then
    kill -TERM "$driver_pid" 2>/dev/null
    for ((i = 0; i < 300; i++)); do alive "$driver_pid" || break; sleep 0.1; done
    alive "$driver_pid" && { echo "user_path: zebu-csi did not stop within 30 s of SIGTERM; SIGKILL" >&2; kill -KILL "$driver_pid"; }
  fi
  wait "$driver_pid" 2>/dev/null || true
  driver_pid=""
}
unmount_under_work() { # all | nonfuse
  local mp fs
  while read -r mp fs; do
    [[ -n $mp ]] || continue
    [[ $1 == nonfuse && $fs == fuse* ]] && continue
    umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || echo "user_path: cannot unmount $mp" >&2
  done < <(mounts_under_work)
}
# Tears down everything this run made; what it finds left afterwards (a
# process, a mount, a loop device) is reported and makes the exit status 1.
teardown() {
  local v l bad=0 kids=$work/out/kids
  if [[ -n $cur_pid ]]; then
    kill -TERM "$cur_pid" 2>/dev/null
    wait "$cur_pid" 2>/dev/null
    cur_pid=""
  fi
  for l in ${pg_running[@]+"${pg_running[@]}"}; do
    pg_ctl_stop "$l" immediate || echo "user_path: pg_ctl stop of $l failed (see ${pg_run[$l]}/ctl.log)" >&2
  done
  pg_running=()
  if [[ -n $driver_pid ]] && alive "$driver_pid"; then
    for v in ${attached[@]+"${attached[@]}"}; do
      zcli volume detach "$v" >>"$work/logs/teardown.log" 2>&1 ||
        { echo "user_path: zebu volume detach $v failed: $(tail -n 3 "$work/logs/teardown.log")" >&2; bad=1; }
    done
    attached=()
    for v in ${vols[@]+"${vols[@]}"}; do
      zcli volume delete "$v" >>"$work/logs/teardown.log" 2>&1 ||
        { echo "user_path: zebu volume delete $v failed: $(tail -n 3 "$work/logs/teardown.log")" >&2; bad=1; }
    done
    vols=()
  fi
  for l in ${floor_pids[@]+"${floor_pids[@]}"}; do kill -TERM "$l" 2>/dev/null; wait "$l" 2>/dev/null; done
  floor_pids=()
  leftovers >"$kids" 2>/dev/null
  unmount_under_work nonfuse
  for l in $(loops_under_work); do losetup -d "$l" 2>/dev/null || echo "user_path: cannot detach $l" >&2; done
  stop_driver
  kill_recorded "$kids"
  leftovers >"$kids.2" 2>/dev/null
  if [[ -s $kids.2 ]]; then
    kill_recorded "$kids.2"
  fi
  unmount_under_work all
  # What is left now is a failure of the teardown.
  if [[ -n $(leftovers 2>/dev/null) ]]; then
    echo "user_path: processes naming $work are still running:" >&2
    python3 "$helper" procs "$work" >&2
    bad=1
  fi
  [[ -n $(mounts_under_work) ]] && { echo "user_path: still mounted under $work: $(mounts_under_work | tr '\n' ' ')" >&2; bad=1; }
  [[ -n $(loops_under_work) ]] && { echo "user_path: loop devices still backed by files in $work: $(loops_under_work | tr '\n' ' ')" >&2; bad=1; }
  return "$bad"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -d $work ]]; then
    teardown || { ((rc)) || rc=1; }
    if [[ -z $(mounts_under_work) ]]; then
      rm -rf --one-file-system "$work"
    else
      echo "user_path: left $work in place (something is still mounted under it)" >&2
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "user_path: interrupted" >&2; exit 130' INT TERM

# ------------------------------------------------------------------- meta --
cmdline=$(printf '%q ' bash "benches/user_path.sh" ${orig_args[@]+"${orig_args[@]}"})
meta_put command "${cmdline% }"
meta_put date "$(date -Is)"
meta_put nproc "$(nproc)"
meta_put kernel "$(uname -r)"
meta_put cpu_model "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta_put disk_source "$(findmnt -n -o SOURCE -T "$work")"
meta_put disk_fs "$(findmnt -n -o FSTYPE -T "$work")"
meta_put loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
meta_put cpuidle "$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)/$(cat /sys/devices/system/cpu/cpuidle/current_governor_ro 2>/dev/null || echo none): $(cat /sys/devices/system/cpu/cpu0/cpuidle/state*/name 2>/dev/null | paste -sd, -)"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$root" status --porcelain 2>/dev/null) ]] && commit+=" (with uncommitted changes)"
meta_put commit "$commit"
meta_put bin_dir "$bin"
meta_put profile "$profile"
meta_put fio_version "$(fio --version)"
((pgbench)) && meta_put postgres_version "$("$pgbin/postgres" --version)"
meta_put pgbench "$pgbench"
meta_put rounds "$rounds"
meta_put seconds "$seconds"
meta_put pg_scale "$pg_scale"
meta_put pg_seconds "$pg_seconds"
meta_put file_size "${file_mb}M"
meta_put fsync_size "${fsync_mb}M"
meta_put volume_size "$vol_size (zebu-3), $nbd_vol_size (zebu-3-nbd)"
meta_put work "$work"

# ---------------------------------------------------------------- systems --
say "work dir $work; ${rounds} round(s) of ${seconds} s; binaries $bin"
say "starting zebu-csi standalone (state $work/state, disks $work/disk0..2)"
"$bin/zebu-csi" standalone --endpoint "unix://$work/csi.sock" --state "$work/state" --node-id bench \
  --disk "$work/disk0" --disk "$work/disk1" --disk "$work/disk2" \
  >"$work/logs/driver.out" 2>"$work/logs/driver.err" &
driver_pid=$!
wait_ready "$driver_pid" "$work/logs/driver.out" '^zebu-csi standalone ready: ' 120 "user_path: zebu-csi standalone" ||
  die "the driver did not start"

say "zebu-3: zebu volume create --size $vol_size --replicas 3 --fstype ext4; attach --mount $work/mnt"
vol_fs=$(zcli volume create user-path-fs --size "$vol_size" --replicas 3 --fstype ext4 2>"$work/logs/create-fs.err") ||
  die "zebu volume create failed: $(cat "$work/logs/create-fs.err")"
vols+=("$vol_fs")
attached+=("$vol_fs")
zcli volume attach "$vol_fs" --mount "$work/mnt" >"$work/logs/attach-fs.log" 2>&1 ||
  die "zebu volume attach $vol_fs --mount failed: $(tail -n 5 "$work/logs/attach-fs.log")"
mountpoint -q "$work/mnt" || die "$work/mnt is not a mount point after the attach"
meta_put zebu3_mount "$(findmnt -n -o SOURCE,FSTYPE,OPTIONS "$work/mnt")"
mkdir -p "$work/mnt/bench"

say "zebu-3-nbd: zebu volume create --size $nbd_vol_size --replicas 3 --block; attach --block $work/blockdev"
vol_nbd=$(zcli volume create user-path-nbd --size "$nbd_vol_size" --replicas 3 --block 2>"$work/logs/create-nbd.err") ||
  die "zebu volume create --block failed: $(cat "$work/logs/create-nbd.err")"
vols+=("$vol_nbd")
attached+=("$vol_nbd")
zcli volume attach "$vol_nbd" --block "$work/blockdev" >"$work/logs/attach-nbd.log" 2>&1 ||
  die "zebu volume attach $vol_nbd --block failed: $(tail -n 5 "$work/logs/attach-nbd.log")"
nbd_uri=$(python3 "$helper" nbd-uri "$work/cli" "$vol_nbd") || die "cannot find the NBD URI of $vol_nbd"
[[ $nbd_uri == *"socket=$work/"* ]] || die "the engine's NBD socket is outside the work dir: $nbd_uri"
meta_put nbd_uri "$nbd_uri"
say "zebu-3-nbd: fio's nbd engine on $nbd_uri"

say "floor-3: three replication-floor replicas on $work/floor (loopback TCP, O_DIRECT files of ${file_mb}M)"
mkdir -p "$work/floor"
for i in 1 2 3; do
  "$bin/replication-floor" replica --listen 127.0.0.1:0 --file "$work/floor/$i.dat" --size "${file_mb}M" \
    >"$work/logs/floor-$i.out" 2>"$work/logs/floor-$i.err" &
  floor_pids+=($!)
done
for i in 1 2 3; do
  wait_ready "${floor_pids[i - 1]}" "$work/logs/floor-$i.out" '^replication-floor replica: serving .* on ' 120 \
    "user_path: replication-floor replica $i" || die "a replication-floor replica did not start"
  floor_addrs+=("$(sed -n 's/^replication-floor replica: serving .* on //p' "$work/logs/floor-$i.out" | head -1)")
done
meta_put floor_replicas "${floor_addrs[*]}"

declare -A dir_of=([local]=$work/local [zebu-3]=$work/mnt/bench [three-copies]=$work/three)
file_of() { # scenario -> file name
  case $1 in randwrite-qd32 | write-qd1) echo randwrite.dat ;; fsync-qd1) echo fsync.dat ;; esac
}
size_of() { # scenario -> MiB
  case $1 in randwrite-qd32 | write-qd1) echo "$file_mb" ;; fsync-qd1) echo "$fsync_mb" ;; esac
}

run_logged() { # log cmd...: runs cmd (recorded as cur_pid for the EXIT trap), returns its status
  local log=$1 rc=0
  shift
  "$@" >"$log" 2>&1 &
  cur_pid=$!
  wait "$cur_pid" || rc=$?
  cur_pid=""
  return "$rc"
}
sync_all() {
  sync -f "$work" 2>/dev/null || true
  mountpoint -q "$work/mnt" && { sync -f "$work/mnt" 2>/dev/null || true; }
  return 0
}

# Every fio file is written once, sequentially, before the runs: the runs
# overwrite data that exists (as a database does), on every system alike.
say "writing the fio files once (sequential 1 MiB writes)"
layout=(--bs=1M --iodepth=8 --rw=write --end_fsync=1)
for sc in randwrite-qd32 fsync-qd1; do
  f=$(file_of "$sc") mb=$(size_of "$sc")
  for target in "${dir_of[local]}/$f" "${dir_of[zebu-3]}/$f" "$work/three/1-$f" "$work/three/2-$f" "$work/three/3-$f"; do
    run_logged "$work/logs/layout.log" timeout -k 10 1200 fio --name=layout "${layout[@]}" --ioengine=libaio --direct=1 \
      "--filename=$target" "--size=${mb}M" || die "writing $target failed: $(tail -n 5 "$work/logs/layout.log")"
  done
done
run_logged "$work/logs/layout.log" timeout -k 10 1200 fio --name=layout "${layout[@]}" --ioengine=nbd "--uri=$nbd_uri" \
  "--size=$((file_mb + fsync_mb))M" || die "writing the NBD volume failed: $(tail -n 5 "$work/logs/layout.log")"

pg_setup() { # system directory
  local s=$1 d=$2
  pg_data[$s]=$d/pgdata
  pg_run[$s]=$work/pg-$s
  mkdir -p "${pg_data[$s]}" "${pg_run[$s]}"
  chown postgres:postgres "${pg_data[$s]}" "${pg_run[$s]}"
  chmod 700 "${pg_data[$s]}"
  say "pgbench on $s: initdb in ${pg_data[$s]}, pgbench -i -s $pg_scale"
  run_logged "${pg_run[$s]}/initdb.log" pg_as "$pgbin/initdb" -D "${pg_data[$s]}" -U postgres -A trust -E UTF8 --locale=C ||
    die "initdb on $s failed: $(tail -n 5 "${pg_run[$s]}/initdb.log")"
  printf "listen_addresses = ''\nunix_socket_directories = '%s'\nport = %s\n" "${pg_run[$s]}" "$pg_port" \
    >>"${pg_data[$s]}/postgresql.conf"
  pg_start "$s" || die "PostgreSQL did not start on $s: $(tail -n 5 "${pg_run[$s]}/server.log")"
  run_logged "${pg_run[$s]}/init.log" timeout -k 10 3600 \
    "${as_pg[@]}" "$pgbin/pgbench" -i -s "$pg_scale" -h "${pg_run[$s]}" -p "$pg_port" -U postgres postgres ||
    die "pgbench -i on $s failed: $(tail -n 5 "${pg_run[$s]}/init.log")"
  pg_stop "$s" || die "pg_ctl stop on $s failed: $(tail -n 5 "${pg_run[$s]}/ctl.log")"
}
pg_start() {
  pg_running+=("$1")
  pg_as "$pgbin/pg_ctl" -D "${pg_data[$1]}" -l "${pg_run[$1]}/server.log" -w -t 300 start >>"${pg_run[$1]}/ctl.log" 2>&1
}
pg_stop() {
  local l keep=()
  pg_ctl_stop "$1" fast || return 1
  for l in ${pg_running[@]+"${pg_running[@]}"}; do [[ $l == "$1" ]] || keep+=("$l"); done
  pg_running=(${keep[@]+"${keep[@]}"})
}
if ((pgbench)); then
  pg_setup local "$work/local"
  pg_setup zebu-3 "$work/mnt"
fi

# ------------------------------------------------------------------- runs --
zebu_check() { # the Zebu side still stands
  alive "$driver_pid" || die "zebu-csi exited: $(tail -n 5 "$work/logs/driver.err")"
  mountpoint -q "$work/mnt" || die "$work/mnt is no longer mounted"
}
fio_args() { # system scenario -> fio arguments, one per line (output options excluded)
  local s=$1 sc=$2 f mb i
  f=$(file_of "$sc") mb=$(size_of "$sc")
  local common=(--bs=4k --time_based "--runtime=$seconds" --lat_percentiles=1 "--size=${mb}M")
  case $sc in
    randwrite-qd32) common+=(--rw=randwrite --iodepth=32) ;;
    write-qd1) common+=(--rw=randwrite --iodepth=1) ;;
    fsync-qd1) common+=(--rw=write --iodepth=1) ;;
  esac
  local fs
  case $sc in
    write-qd1) fs=(--ioengine=psync --direct=1) ;;
    fsync-qd1) fs=(--ioengine=psync --fdatasync=1) ;;
    *) fs=(--ioengine=libaio --direct=1) ;;
  esac
  case $s in
    local | zebu-3) printf '%s\n' "--name=$sc" "${common[@]}" "${fs[@]}" "--filename=${dir_of[$s]}/$f" ;;
    zebu-3-nbd)
      # fio's nbd engine has no fdatasync; --fsync=1 sends NBD FLUSH after each write.
      printf '%s\n' "--name=$sc" "${common[@]}" --ioengine=nbd "--uri=$nbd_uri"
      if [[ $sc == fsync-qd1 ]]; then printf '%s\n' --fsync=1 "--offset=${file_mb}M"; fi
      ;;
    three-copies)
      printf '%s\n' "${common[@]}" "${fs[@]}" --group_reporting
      for i in 1 2 3; do printf '%s\n' "--name=$sc-$i" "--filename=$work/three/$i-$f"; done
      ;;
  esac
}
run_one() { # system scenario round
  local s=$1 sc=$2 r=$3 tag=$1-$2-r$3 rc=0 copies=1 cpu=() args
  local out=$work/out/$tag
  [[ $s == zebu-3* ]] && zebu_check
  [[ $s == three-copies ]] && copies=3
  sync_all
  if [[ $s == floor-3 ]]; then
    args=(client --mode "$([[ $sc == fsync-qd1 ]] && echo commit || echo write)" --seconds "$seconds"
      --span "$(size_of "$sc")M" --output "$out.json")
    for a in "${floor_addrs[@]}"; do args+=(--replica "$a"); done
  elif [[ $sc == pgbench ]]; then
    pg_start "$s" || die "PostgreSQL did not start on $s: $(tail -n 5 "${pg_run[$s]}/server.log")"
    # what pgbench does before a run without -n, done before the CPU snapshot
    pg_as "$pgbin/psql" -X -q -h "${pg_run[$s]}" -p "$pg_port" -U postgres -d postgres \
      -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' -c 'TRUNCATE pgbench_history' \
      >"$out.prep.log" 2>&1 || die "preparing pgbench on $s failed: $(tail -n 5 "$out.prep.log")"
    args=(-n -c 8 -j 2 -T "$pg_seconds" -h "${pg_run[$s]}" -p "$pg_port" -U postgres postgres)
  else
    mapfile -t args < <(fio_args "$s" "$sc")
  fi
  # Whose CPU counts: Zebu's processes, or the floor's replicas.
  local whose=()
  [[ $s == zebu-3* ]] && whose=(--driver "$driver_pid")
  [[ $s == floor-3 ]] && whose=(--kind replication-floor)
  if ((${#whose[@]})); then
    python3 "$helper" cpu "$work" "$out.cpu0" "${whose[@]}"
    cpu=(--cpu-before "$out.cpu0" --cpu-after "$out.cpu1")
  fi
  # The baselines hold the CPUs as awake as Zebu's processes do during I/O
  # (--keep-cpus-awake), so neither side gains from the other's idle states.
  local awake=()
  [[ $s == local || $s == three-copies || $s == floor-3 ]] && awake=(python3 "$helper" awake --)
  echo "-- round $r: $s $sc"
  if [[ $s == floor-3 ]]; then
    run_logged "$out.log" ${awake[@]+"${awake[@]}"} timeout -k 10 $((seconds + 300)) "$bin/replication-floor" "${args[@]}" || rc=$?
  elif [[ $sc == pgbench ]]; then
    run_logged "$out.log" ${awake[@]+"${awake[@]}"} timeout -k 10 $((pg_seconds + 300)) "${as_pg[@]}" "$pgbin/pgbench" "${args[@]}" || rc=$?
    cp "$out.log" "$out.txt"
  else
    run_logged "$out.log" ${awake[@]+"${awake[@]}"} timeout -k 10 $((seconds + 300)) fio "${args[@]}" --output-format=json "--output=$out.json" || rc=$?
  fi
  ((${#whose[@]})) && python3 "$helper" cpu "$work" "$out.cpu1" "${whose[@]}"
  if [[ $s == floor-3 ]]; then
    python3 "$helper" record "$raw" --system "$s" --scenario "$sc" --round "$r" --kind floor \
      --result "$out.json" --rc "$rc" --command "$(printf '%q ' replication-floor "${args[@]}")" "${cpu[@]}" || {
      failed=$((failed + 1))
      tail -n 5 "$out.log" >&2
    }
  elif [[ $sc == pgbench ]]; then
    pg_stop "$s" || die "pg_ctl stop on $s failed: $(tail -n 5 "${pg_run[$s]}/ctl.log")"
    python3 "$helper" record "$raw" --system "$s" --scenario "$sc" --round "$r" --kind pgbench \
      --result "$out.txt" --rc "$rc" --command "$(printf '%q ' pgbench "${args[@]}")" ${cpu[@]+"${cpu[@]}"} || {
      failed=$((failed + 1))
      tail -n 5 "$out.log" >&2
    }
  else
    python3 "$helper" record "$raw" --system "$s" --scenario "$sc" --round "$r" --kind fio \
      --result "$out.json" --rc "$rc" --copies "$copies" --command "$(printf '%q ' fio "${args[@]}")" \
      ${cpu[@]+"${cpu[@]}"} || {
      failed=$((failed + 1))
      tail -n 5 "$out.log" >&2
    }
  fi
  python3 "$helper" show "$raw"
}

for ((round = 1; round <= rounds; round++)); do
  k=$(((round - 1) % ${#systems[@]}))
  order=("${systems[@]:k}" "${systems[@]:0:k}")
  say "round $round of $rounds: ${order[*]}"
  for sc in "${scenarios[@]}"; do
    for s in "${order[@]}"; do
      [[ $sc == pgbench && $s != local && $s != zebu-3 ]] && continue
      [[ $s == floor-3 && $sc != write-qd1 && $sc != fsync-qd1 ]] && continue
      run_one "$s" "$sc" "$round"
    done
  done
done

# --------------------------------------------------------------- teardown --
say "teardown: detach and delete the volumes, stop the driver"
teardown || die "the teardown left something behind (see above)"
t_end=$(date +%s)
meta_put loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"
meta_put duration_s $((t_end - t_start))

# ---------------------------------------------------------------- report --
if [[ -z $out_dir ]]; then
  if ((smoke)); then
    out_dir=$(mktemp -d "${TMPDIR:-/tmp}/zebu-user-path-smoke.XXXXXX")
  else
    out_dir=$here/results
  fi
fi
suffix=""
((quick)) && suffix=-quick
((smoke)) && suffix=-smoke
mkdir -p "$out_dir" || die "cannot create $out_dir"
out_base=$out_dir/user-path-$date_tag$suffix
echo
python3 "$helper" report "$raw" "$meta" "$out_base" || die "writing the report failed"
for f in "$out_base.md" "$out_base.json"; do [[ -s $f ]] || die "the report $f was not written"; done
echo
echo "results: $out_base.md"
echo "         $out_base.json"
echo "total duration: $((t_end - t_start)) s"
((failed == 0)) || die "$failed run(s) failed (see the report)"
