#!/usr/bin/env python3
"""Helpers and report writer of benches/user_path.sh (python3 stdlib only).

Subcommands (the shell script calls them; none needs to be run by hand):

  procs WORK [--driver PID]     pid, kind and command line of every process
                                whose command line mentions WORK, or that is a
                                descendant of PID (never this process or its
                                parent)
  cpu WORK OUT [--driver PID] [--kind K]...
                                CPU snapshot of the Zebu processes among them
                                (zebu-replica, zebu-engine, zebu-nbd-fuse,
                                zebu-csi; or of the executables named with
                                --kind): utime + stime and the sleeps
                                (voluntary context switches) of its threads
                                per pid, as JSON
  nbd-uri CLI_STATE VOLUME_ID   the NBD URI ControllerPublishVolume returned
                                for an attached volume (its publish context,
                                as `zebu volume attach` recorded it)
  record RAW ...                parses one run (fio JSON, pgbench output or
                                replication-floor's JSON),
                                appends one JSON line of raw results to RAW
  awake -- CMD...               runs CMD holding a CPU latency request of 0 us
                                (/dev/cpu_dma_latency), as Zebu's engines and
                                replicas do while they have I/O, so the
                                baselines run with the CPUs as awake as Zebu's
                                (without access, CMD runs anyway and it says so)
  show RAW                      prints one line about the last run in RAW
  report RAW META OUT_BASE      medians, ratios; writes OUT_BASE.json and
                                OUT_BASE.md and prints the Markdown (META:
                                KEY<tab>VALUE lines, `note` repeatable)

Ratios are taken round by round (zebu-3 in round 2 over local in round 2),
then the median over the rounds is reported with the range.
"""

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys

ZEBU_KINDS = ("zebu-replica", "zebu-engine", "zebu-nbd-fuse", "zebu-csi")
SYSTEMS = ["local", "zebu-3", "zebu-3-nbd", "three-copies", "floor-3"]
SCENARIOS = ["randwrite-qd32", "write-qd1", "fsync-qd1", "pgbench"]
# The latency target: a QD1 write through the filesystem at most
# this much slower (p50) than the local disk's.
QD1_EXTRA_TARGET_US = 150
# The issue's CPU target: all Zebu processes' CPU per replicated 4 KiB write
# at QD32, at most this.
CPU_TARGET_US = 25
NBD_URI_KEY = "zebu.csi.dev/nbd-uri"


# ------------------------------------------------------------ processes --
def _read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (field 3 first)."""
    s = _read(f"/proc/{pid}/stat")
    if not s or ")" not in s:
        return None
    return s[s.rindex(")") + 2:].split()


def _sleeps(pid):
    """Voluntary context switches of the threads `pid` has now: each one is
    the thread going to sleep to wait for something. A thread that ended is
    no longer counted (Zebu's long-lived threads do the I/O)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        m = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", _read(f"/proc/{pid}/task/{tid}/status") or "", re.M)
        if m:
            total += int(m.group(1))
    return total


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def matching_processes(work, driver=None):
    """{pid: (kind, cmdline)} of the processes whose command line mentions
    `work`, or that descend from `driver`; never this process or its parent."""
    me = {os.getpid(), os.getppid()}
    parents, cmdlines = {}, {}
    for pid in _all_pids():
        raw = _read(f"/proc/{pid}/cmdline", "rb")
        st = _stat_fields(pid)
        if raw is None or st is None:
            continue
        parents[pid] = int(st[1])
        cmdlines[pid] = raw.rstrip(b"\0").split(b"\0") if raw else []
    out = {}
    for pid, argv in cmdlines.items():
        if pid in me or not argv:
            continue
        line = b" ".join(argv).decode("utf-8", "replace")
        hit = work in line
        if not hit and driver:
            p, seen = parents.get(pid), 0
            while p and p > 1 and seen < 64:
                if p == driver:
                    hit = True
                    break
                p, seen = parents.get(p), seen + 1
        if driver and pid == driver:
            hit = True
        if hit:
            kind = os.path.basename(argv[0].decode("utf-8", "replace"))
            out[pid] = (kind, line)
    return out


def cmd_procs(a):
    for pid, (kind, line) in sorted(matching_processes(a.work, a.driver).items()):
        print(f"{pid}\t{kind}\t{line}")


def cmd_cpu(a):
    snap = {}
    kinds = a.kind or ZEBU_KINDS
    for pid, (kind, _) in matching_processes(a.work, a.driver).items():
        if kind not in kinds:
            continue
        st = _stat_fields(pid)
        if st is None:
            continue
        # fields 14 (utime), 15 (stime), 22 (starttime); st[0] is field 3
        snap[str(pid)] = {"kind": kind, "ticks": int(st[11]) + int(st[12]), "start": st[19],
                          "sleeps": _sleeps(pid)}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"clk_tck": os.sysconf("SC_CLK_TCK"), "procs": snap}, f)


QOS_DEVICE = "/dev/cpu_dma_latency"


def cmd_awake(a):
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        sys.exit("user_path.py awake: no command given")
    fd = None
    try:
        fd = os.open(QOS_DEVICE, os.O_WRONLY)
        os.write(fd, struct.pack("i", 0))
    except OSError as e:
        print(f"user_path: the baseline runs with the CPUs free to idle: cannot hold {QOS_DEVICE} ({e})",
              file=sys.stderr)
    try:
        rc = subprocess.call(cmd)
    finally:
        if fd is not None:
            os.close(fd)
    sys.exit(rc)


def cmd_nbd_uri(a):
    name = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02X}" for c in a.volume)
    path = os.path.join(a.cli_state, "attachments", f"{name}.json")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"user_path: cannot read the attachment record {path}: {e}")
    uri = rec.get("publish_context", {}).get(NBD_URI_KEY)
    if not uri:
        sys.exit(f"user_path: {path} has no publish_context {NBD_URI_KEY}")
    print(uri)


# ---------------------------------------------------------------- record --
def cpu_delta(before_path, after_path):
    """CPU µs and sleeps of the Zebu processes between two snapshots, by kind.
    A process started in between counts from zero; one gone by the second is
    lost. Sleeps are None when a snapshot predates them."""
    with open(before_path, encoding="utf-8") as f:
        before = json.load(f)
    with open(after_path, encoding="utf-8") as f:
        after = json.load(f)
    tck = after["clk_tck"]
    by_kind, sleeps, gone = {}, {}, []
    for pid, a in after["procs"].items():
        b = before["procs"].get(pid)
        if b is None or b["start"] != a["start"]:
            b = {"ticks": 0, "sleeps": 0}  # started in between: from zero
        kind = a["kind"]
        by_kind[kind] = by_kind.get(kind, 0) + (a["ticks"] - b["ticks"]) * 1e6 / tck
        if sleeps is not None and a.get("sleeps") is not None and b.get("sleeps") is not None:
            sleeps[kind] = sleeps.get(kind, 0) + max(a["sleeps"] - b["sleeps"], 0)
        else:
            sleeps = None
    for pid, b in before["procs"].items():
        if pid not in after["procs"]:
            gone.append(f"{b['kind']} {pid}")
    return sum(by_kind.values()), by_kind, sleeps, gone, len(after["procs"])


def load_fio_json(path):
    """fio's JSON output; fio's nbd engine prints lines before it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    m = re.search(r"^\{", text, re.M)
    if not m:
        raise ValueError(f"no JSON in {path}")
    return json.loads(text[m.start():])


def p50_us(d):
    """The median of a fio latency block (lat_ns, else clat_ns), in µs."""
    for key in ("lat_ns", "clat_ns"):
        v = (d.get(key) or {}).get("percentile", {}).get("50.000000")
        if v:
            return v / 1000.0
    return None


def fio_figures(path, copies):
    j = load_fio_json(path)
    jobs = j.get("jobs") or []
    if not jobs:
        raise ValueError("fio reported no job")
    for job in jobs:
        if job.get("error"):
            raise ValueError(f"fio job {job.get('jobname')} failed with error {job['error']}")
    iops = sum(job["write"]["iops"] for job in jobs)
    ios = sum(job["write"]["total_ios"] for job in jobs)
    runtime = max(job["write"].get("runtime", 0) for job in jobs) / 1000.0
    first = jobs[0]
    sync = first.get("sync") or {}
    # fio's system time: the kernel's CPU for its own jobs' I/O (sys_cpu is a
    # share of job_runtime, which --group_reporting sums over the jobs).
    try:
        kernel_us = sum(job["sys_cpu"] / 100 * job["job_runtime"] * 1000 for job in jobs)
    except (KeyError, TypeError):
        kernel_us = None
    return {
        "value": iops / copies,
        "total_iops": iops,
        "ios": ios / copies,
        "total_ios": ios,
        "runtime_s": runtime,
        "p50_us": p50_us(first["write"]),
        "sync_p50_us": p50_us(sync) if sync else None,
        "fio_jobs": len(jobs),
        "kernel_us_per_io": kernel_us / (ios / copies) if kernel_us is not None and ios else None,
    }


def floor_figures(path):
    """replication-floor client's JSON: operations (writes, or commits of a
    write and a flush) per second, p50, and the client's own CPU."""
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    if not j.get("ops"):
        raise ValueError(f"replication-floor reported no operation in {path}")
    return {
        "value": float(j["per_second"]),
        "ios": int(j["ops"]),
        "total_ios": int(j["ops"]),
        "p50_us": float(j["p50_us"]),
        "client_cpu_us": float(j["client_cpu_us"]),
    }


def pgbench_figures(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tps = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", text, re.M)
    n = re.search(r"^number of transactions actually processed: ([0-9]+)", text, re.M)
    lat = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
    failed = re.search(r"^number of failed transactions: ([0-9]+)", text, re.M)
    if not tps or not n:
        raise ValueError(f"no 'tps =' or transaction count in the pgbench output {path}")
    return {
        "value": float(tps.group(1)),
        "ios": int(n.group(1)),
        "total_ios": int(n.group(1)),
        "mean_latency_us": float(lat.group(1)) * 1000 if lat else None,
        "failed_transactions": int(failed.group(1)) if failed else None,
    }


def cmd_record(a):
    row = {"system": a.system, "scenario": a.scenario, "round": a.round,
           "unit": "TPS" if a.kind == "pgbench" else "IOPS", "copies": a.copies,
           "rc": a.rc, "command": a.command.strip(), "output": a.result, "ok": False}
    err = None
    if a.rc != 0:
        err = f"exit status {a.rc}"
    else:
        try:
            figures = {"pgbench": pgbench_figures, "floor": floor_figures}.get(a.kind)
            row.update(figures(a.result) if figures else fio_figures(a.result, a.copies))
        except (OSError, ValueError, KeyError, TypeError) as e:
            err = str(e)
    if err is None and a.cpu_before and a.cpu_after:
        try:
            us, by_kind, sleeps, gone, nprocs = cpu_delta(a.cpu_before, a.cpu_after)
            if a.kind == "floor":
                # The floor's client is gone by the second snapshot: its own
                # figure. Its replicas' threads per connection are too, and
                # their sleeps with them: none are reported.
                by_kind["client"] = row["client_cpu_us"]
                us += row["client_cpu_us"]
                sleeps = None
            row["cpu_us"] = us
            row["cpu_us_by_kind"] = by_kind
            if sleeps is not None:
                row["sleeps_by_kind"] = sleeps
                row["sleeps_per_io"] = sum(sleeps.values()) / row["ios"] if row.get("ios") else None
            row["zebu_processes"] = nprocs
            if gone:
                row["cpu_processes_gone"] = gone
            row["cpu_us_per_io"] = us / row["ios"] if row.get("ios") else None
        except (OSError, ValueError, KeyError) as e:
            err = f"CPU snapshot: {e}"
    if err is None:
        row["ok"] = True
    else:
        row["error"] = err
    with open(a.raw, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if err is not None:
        sys.exit(f"user_path: {a.system} {a.scenario} round {a.round}: {err}")


def cmd_show(a):
    """One line about the last run recorded in RAW."""
    with open(a.raw, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    r = json.loads(lines[-1])
    if not r.get("ok"):
        print(f"    FAILED: {r.get('error')}")
        return
    text = f"    {r['value']:,.0f} {r['unit']}"
    if r.get("copies", 1) > 1:
        text += " per copy"
    if r.get("p50_us") is not None:
        text += f", p50 {r['p50_us']:,.0f} µs"
    if r.get("sync_p50_us") is not None:
        text += f", sync p50 {r['sync_p50_us']:,.0f} µs"
    if r.get("cpu_us_per_io") is not None:
        text += f", Zebu CPU {r['cpu_us_per_io']:.1f} µs per I/O"
    print(text)


# ---------------------------------------------------------------- report --
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "per_round": values}


def fnum(v, digits=None):
    if v is None:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def fspan(r, fmt):
    """A spread as its median [min–max], each figure formatted by fmt."""
    if not r:
        return "-"
    if len(r["per_round"]) == 1:
        return fmt(r["median"])
    return f"{fmt(r['median'])} [{fmt(r['min'])}–{fmt(r['max'])}]"


def fratio(r):
    return fspan(r, lambda v: f"{v:.2f}")


def fspread(r):
    """A spread of plain figures (not ratios), in whole units."""
    return fspan(r, lambda v: fnum(v, 0))


def summarize(rows):
    ok = [r for r in rows if r.get("ok")]
    by = {}
    for r in ok:
        by.setdefault(r["scenario"], {}).setdefault(r["system"], {})[r["round"]] = r

    def per_round(sc, num, den, f):
        """f(num's run, den's run) for every round both ran, as a spread (None: skipped)."""
        a, b = by.get(sc, {}).get(num, {}), by.get(sc, {}).get(den, {})
        return spread([f(a[k], b[k]) for k in sorted(a) if k in b])

    def ratio(sc, num, den):
        return per_round(sc, num, den, lambda x, y: x["value"] / y["value"] if y["value"] else None)

    def p50_over_local(sc, sys_):
        return per_round(sc, sys_, "local", lambda x, y: x["p50_us"] - y["p50_us"]
                         if x.get("p50_us") is not None and y.get("p50_us") is not None else None)

    summary, ratios = {}, {}
    for sc in SCENARIOS:
        if sc not in by:
            continue
        summary[sc] = {}
        for sys_ in SYSTEMS:
            runs = by[sc].get(sys_)
            if not runs:
                continue
            rs = [runs[k] for k in sorted(runs)]
            summary[sc][sys_] = {
                "unit": rs[0]["unit"],
                "rounds": len(rs),
                "value": spread([r["value"] for r in rs]),
                "p50_us": median([r.get("p50_us") for r in rs]),
                "sync_p50_us": median([r.get("sync_p50_us") for r in rs]),
                "mean_latency_us": median([r.get("mean_latency_us") for r in rs]),
                "cpu_us_per_io": median([r.get("cpu_us_per_io") for r in rs]),
                "sleeps_per_io": median([r.get("sleeps_per_io") for r in rs]),
                "kernel_us_per_io": spread([r.get("kernel_us_per_io") for r in rs]),
                "vs_local": ratio(sc, sys_, "local") if sys_ != "local" else None,
                "p50_over_local_us": p50_over_local(sc, sys_) if sys_ != "local" else None,
            }
        ratios[sc] = {
            "zebu-3/local": ratio(sc, "zebu-3", "local"),
            "zebu-3/zebu-3-nbd": ratio(sc, "zebu-3", "zebu-3-nbd"),
            "zebu-3/three-copies": ratio(sc, "zebu-3", "three-copies"),
            "zebu-3/floor-3": ratio(sc, "zebu-3", "floor-3"),
            "zebu-3-nbd/floor-3": ratio(sc, "zebu-3-nbd", "floor-3"),
        }
    return summary, ratios


def by_process_table(rows, field, total_field, title, caption):
    """A table of `field` ({kind: amount}) per I/O by Zebu process, medians
    over the rounds, per scenario and Zebu system; empty when no run has it."""
    kinds = [k for k in ZEBU_KINDS if any(k in (r.get(field) or {}) for r in rows if r.get("ok"))]
    if not kinds:
        return []
    out = [f"## {title}", "", caption, "",
           "| scenario | system | " + " | ".join(kinds) + " | all |",
           "|---|---|" + "---:|" * (len(kinds) + 1)]
    for sc in SCENARIOS:
        for sys_ in ("zebu-3", "zebu-3-nbd"):
            rs = [r for r in rows if r.get("ok") and r["scenario"] == sc and r["system"] == sys_
                  and r.get(field) is not None and r.get("ios")]
            if not rs:
                continue
            cells = [fnum(median([r[field].get(k, 0) / r["ios"] for r in rs])) for k in kinds]
            out.append(f"| {sc} | {sys_} | " + " | ".join(cells) + f" | {fnum(median([r.get(total_field) for r in rs]))} |")
    out.append("")
    return out


def kernel_bound(sc_summary):
    """The kernel's CPU per write in fio's own jobs (its system time) for
    `local` and `three-copies`: what writing the copies costs before any of
    Zebu's work, beside the CPU target for all of Zebu."""
    copies = (sc_summary.get("three-copies") or {}).get("kernel_us_per_io")
    if not copies:
        return []
    one = (sc_summary.get("local") or {}).get("kernel_us_per_io")
    text = "the kernel's CPU per write in fio's own jobs (system time): "
    if one:
        text += f"{fspan(one, fnum)} µs for one copy (local), "
    return [text + f"{fspan(copies, fnum)} µs for three (three-copies), against a target of "
            f"{CPU_TARGET_US} µs for all of Zebu's processes"]


def render_md(meta, summary, ratios, rows):
    m = meta
    out = ["# User path: a filesystem on a Zebu volume against the local disk", ""]
    out.append(f"Command: `{m.get('command', '?')}`")
    out.append("")
    out.append(f"- Machine: {m.get('nproc', '?')} CPUs ({m.get('cpu_model', '?')}), kernel {m.get('kernel', '?')}, "
               f"work dir on {m.get('disk_source', '?')} ({m.get('disk_fs', '?')}); load average at start {m.get('loadavg_start', '?')}, "
               f"at end {m.get('loadavg_end', '?')}; CPU idle driver/governor: states {m.get('cpuidle', '?')}")
    out.append(f"- Commit {m.get('commit', '?')}; binaries {m.get('bin_dir', '?')} ({m.get('profile', '?')}); "
               f"{m.get('fio_version', '?')}; {m.get('postgres_version', 'no PostgreSQL')}")
    out.append(f"- {m.get('date', '?')}: {m.get('rounds', '?')} round(s) of {m.get('seconds', '?')} s per fio run; "
               f"fio files {m.get('file_size', '?')} (randwrite-qd32, write-qd1), {m.get('fsync_size', '?')} (fsync); "
               + (f"pgbench scale {m.get('pg_scale')}, {m.get('pg_seconds')} s, 8 clients, 2 threads; " if m.get("pgbench") else "no pgbench; ")
               + f"Zebu volumes {m.get('volume_size', '?')}, 3 replicas; {m.get('duration_s', '?')} s in all")
    out.append("")
    out.append("Systems: `local` a directory on the work dir's filesystem; `zebu-3` ext4 on a Zebu volume "
               "attached by `zebu-csi standalone` through the `zebu` CLI (the engine's FUSE file, loop device, ext4); "
               "`zebu-3-nbd` fio's nbd engine on the engine's NBD socket of a second 3-replica volume, "
               "attached `--block` (no filesystem, FUSE file or loop device in the path); `three-copies` the local "
               "filesystem taking three copies (three fio jobs on three files at once), per-copy rate = total / 3; "
               "`floor-3` the floor of the design's hops: `replication-floor` sending each 4 KiB write (write-qd1), "
               "or a write and then a flush (fsync-qd1: one commit per I/O), over loopback TCP to three processes "
               "that `pwrite` it O_DIRECT (and `fdatasync`) into files on the same disk, with blocking threads and "
               "none of Zebu's code; its CPU is theirs and the client's. "
               "Zebu's engines and replicas keep the CPUs out of idle states while they have I/O (`--keep-cpus-awake`, "
               "default 2ms); fio and pgbench on `local` and `three-copies` run holding the same request, so both sides "
               "meet CPUs equally awake. "
               "CPU: utime + stime of every Zebu process of the run (driver, replicas, engines, and bridges where one runs) "
               "around the fio or pgbench command, over the writes (transactions) it completed; the loop "
               "device's and FUSE's kernel work in kernel threads is not counted. Ratios: per round, then the "
               "median [min–max] over rounds.")
    out.append("")
    titles = {
        "randwrite-qd32": "randwrite-qd32: fio 4 KiB random write, O_DIRECT, libaio, QD32",
        "write-qd1": "write-qd1: fio 4 KiB random write, O_DIRECT, psync, QD1",
        "fsync-qd1": "fsync-qd1: fio 4 KiB sequential write + fdatasync each, QD1 (nbd: write + NBD FLUSH)",
        "pgbench": "pgbench: TPC-B-like, 8 clients, 2 threads",
    }
    for sc in SCENARIOS:
        if sc not in summary:
            continue
        out.append(f"## {titles[sc]}")
        out.append("")
        if sc == "pgbench":
            out.append("| system | TPS | mean latency µs | CPU µs per transaction | × local |")
            out.append("|---|---:|---:|---:|---:|")
        elif sc == "fsync-qd1":
            out.append("| system | IOPS | write p50 µs | fdatasync / flush p50 µs | CPU µs per write | × local |")
            out.append("|---|---:|---:|---:|---:|---:|")
        elif sc == "write-qd1":
            out.append("| system | IOPS | p50 µs | p50 − local's, µs | CPU µs per write | × local |")
            out.append("|---|---:|---:|---:|---:|---:|")
        else:
            out.append("| system | IOPS | p50 µs | CPU µs per write | × local |")
            out.append("|---|---:|---:|---:|---:|")
        for sys_ in SYSTEMS:
            s = summary[sc].get(sys_)
            if not s:
                continue
            v = fnum(s["value"]["median"], 0)
            vs = fratio(s["vs_local"]) if sys_ != "local" else "1"
            cpu = fnum(s["cpu_us_per_io"])
            if sc == "pgbench":
                out.append(f"| {sys_} | {v} | {fnum(s['mean_latency_us'], 0)} | {cpu} | {vs} |")
            elif sc == "fsync-qd1" and sys_ == "floor-3":
                # its p50 is of a whole commit, the write and the flush: said below
                out.append(f"| {sys_} | {v} | - | - | {cpu} | {vs} |")
            elif sc == "fsync-qd1":
                out.append(f"| {sys_} | {v} | {fnum(s['p50_us'], 0)} | {fnum(s['sync_p50_us'], 0)} | {cpu} | {vs} |")
            elif sc == "write-qd1":
                extra_us = fspread(s["p50_over_local_us"]) if sys_ != "local" else "0"
                out.append(f"| {sys_} | {v} | {fnum(s['p50_us'], 0)} | {extra_us} | {cpu} | {vs} |")
            else:
                out.append(f"| {sys_} | {v} | {fnum(s['p50_us'], 0)} | {cpu} | {vs} |")
        r = ratios.get(sc, {})
        extra = [f"{k}: {fratio(v)}" for k, v in r.items() if k != "zebu-3/local" and v]
        if sc == "write-qd1" and summary[sc].get("zebu-3", {}).get("p50_over_local_us"):
            extra.append(f"zebu-3's p50 over local's: {fspread(summary[sc]['zebu-3']['p50_over_local_us'])} µs "
                         f"(target: at most {QD1_EXTRA_TARGET_US} µs)")
        if sc == "randwrite-qd32":
            extra.extend(kernel_bound(summary[sc]))
        if sc == "fsync-qd1" and summary[sc].get("floor-3", {}).get("p50_us") is not None:
            extra.append(f"floor-3's commit (write, then flush) p50: {fnum(summary[sc]['floor-3']['p50_us'], 0)} µs")
        if extra:
            out.append("")
            out.append("; ".join(extra) + ".")
        out.append("")
    out.extend(by_process_table(rows, "cpu_us_by_kind", "cpu_us_per_io", "Zebu CPU µs per I/O by process",
                                "Medians over the rounds; per write (fio) or per transaction (pgbench)."))
    out.extend(by_process_table(
        rows, "sleeps_by_kind", "sleeps_per_io", "Zebu sleeps per I/O by process",
        "Voluntary context switches of the processes' threads (each a thread going to sleep to wait, "
        "and being woken again), medians over the rounds, per write or transaction. On a virtual machine "
        "each one can cost an exit to the hypervisor when the CPU idles; benches/README.md has what that "
        "costs here."))
    out.append("## Ratios")
    out.append("")
    out.append("| scenario | zebu-3 / local | zebu-3 / zebu-3-nbd | zebu-3 / three-copies | zebu-3 / floor-3 |")
    out.append("|---|---:|---:|---:|---:|")
    for sc in SCENARIOS:
        if sc in ratios:
            r = ratios[sc]
            out.append(f"| {sc} | {fratio(r['zebu-3/local'])} | {fratio(r['zebu-3/zebu-3-nbd'])} | "
                       f"{fratio(r['zebu-3/three-copies'])} | {fratio(r['zebu-3/floor-3'])} |")
    out.append("")
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        out.append("## Failed runs")
        out.append("")
        for r in failed:
            out.append(f"- {r['system']} {r['scenario']} round {r['round']}: {r.get('error', '?')}")
        out.append("")
    notes = m.get("notes") or []
    if notes:
        out.append("## Notes")
        out.append("")
        out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


def cmd_report(a):
    rows = []
    with open(a.raw, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    meta = {"notes": []}
    with open(a.meta, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            if key == "note":
                meta["notes"].append(value)
            elif key:
                meta[key] = value
    meta["pgbench"] = meta.get("pgbench") == "1"
    summary, ratios = summarize(rows)
    md = render_md(meta, summary, ratios, rows)
    with open(a.out_base + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "summary": summary, "ratios": ratios, "runs": rows}, f, indent=1)
        f.write("\n")
    with open(a.out_base + ".md", "w", encoding="utf-8") as f:
        f.write(md + "\n")
    print(md)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("procs")
    p.add_argument("work")
    p.add_argument("--driver", type=int)
    p.set_defaults(fn=cmd_procs)
    p = sub.add_parser("cpu")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--driver", type=int)
    p.add_argument("--kind", action="append", help="executable name to count (default: Zebu's)")
    p.set_defaults(fn=cmd_cpu)
    p = sub.add_parser("nbd-uri")
    p.add_argument("cli_state")
    p.add_argument("volume")
    p.set_defaults(fn=cmd_nbd_uri)
    p = sub.add_parser("record")
    p.add_argument("raw")
    p.add_argument("--system", required=True, choices=SYSTEMS)
    p.add_argument("--scenario", required=True, choices=SCENARIOS)
    p.add_argument("--round", required=True, type=int)
    p.add_argument("--kind", required=True, choices=["fio", "pgbench", "floor"])
    p.add_argument("--result", required=True, help="fio JSON output, pgbench stdout or replication-floor JSON")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--command", default="")
    p.add_argument("--cpu-before")
    p.add_argument("--cpu-after")
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("awake")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_awake)
    p = sub.add_parser("show")
    p.add_argument("raw")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("report")
    p.add_argument("raw")
    p.add_argument("meta")
    p.add_argument("out_base", help="writes OUT_BASE.json and OUT_BASE.md")
    p.set_defaults(fn=cmd_report)
    return ap


def main():
    a = build_parser().parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
