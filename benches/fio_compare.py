#!/usr/bin/env python3
"""Aggregates the fio runs of benches/fio_compare.sh (python3 stdlib only).

Reads the manifest the script writes (one tab-separated line per setup
command, prefill and fio run) and each run's fio JSON output; writes the
results JSON (every per-run figure, medians, ratios, exact commands) and a
Markdown report, and prints the report.

Ratios are computed pair by pair within a run round (zebu-3 run 2 against
nbdkit run 2, ...), then the median over rounds is reported, with the range.

Also writes a chart (--svg): hand-written SVG, grouped bars per scenario, each
system's median throughput relative to nbdkit-file's (= 1.0).
--chart-only RESULTS.json re-renders that chart from an existing results JSON
(next to it, same name with .svg, or --svg PATH).
"""

import argparse
import json
import os
import statistics
import sys
from html import escape
from datetime import datetime, timezone

SYSTEMS = ["raw", "nbdkit-file", "zebu-1", "zebu-2", "zebu-3"]
SCENARIOS = [
    # name, fio data direction, description
    ("randwrite-4k-qd1", "write", "4 KiB random write, QD1"),
    ("randwrite-4k-qd32", "write", "4 KiB random write, QD32"),
    ("randread-4k-qd1", "read", "4 KiB random read, QD1"),
    ("randread-4k-qd32", "read", "4 KiB random read, QD32"),
    ("write-1m-qd8", "write", "1 MiB sequential write, QD8"),
    ("read-1m-qd8", "read", "1 MiB sequential read, QD8"),
    # "mixed": IOPS and MiB/s are read + write; p50/p99 are the reads' (the
    # writes' are in write_p50_us/write_p99_us)
    ("randrw70-4k-qd16", "mixed", "4 KiB random 70% read / 30% write, QD16"),
]
DIRECTION = {name: d for name, d, _ in SCENARIOS}
DESCRIPTION = {name: t for name, _, t in SCENARIOS}
METRICS = ["iops", "mib_s", "p50_us", "p99_us", "read_p50_us", "read_p99_us", "write_p50_us", "write_p99_us"]

# (key, numerator system, denominator system, metric, denominator divisor, scenarios or None = all)
RATIOS = [
    ("zebu-3/nbdkit iops", "zebu-3", "nbdkit-file", "iops", 1, None),
    ("zebu-3/nbdkit p50", "zebu-3", "nbdkit-file", "p50_us", 1, None),
    ("zebu-2/nbdkit iops", "zebu-2", "nbdkit-file", "iops", 1, None),
    ("zebu-2/nbdkit p50", "zebu-2", "nbdkit-file", "p50_us", 1, None),
    ("zebu-1/nbdkit iops", "zebu-1", "nbdkit-file", "iops", 1, None),
    ("zebu-1/nbdkit p50", "zebu-1", "nbdkit-file", "p50_us", 1, None),
    ("zebu-3/(raw/3) MiB/s", "zebu-3", "raw", "mib_s", 3, ["write-1m-qd8"]),
    ("zebu-2/(raw/2) MiB/s", "zebu-2", "raw", "mib_s", 2, ["write-1m-qd8"]),
]

MANIFEST_COLUMNS = [
    "kind", "system", "scenario", "run", "position", "rc",
    "json", "log", "t0", "t1", "sync_s", "command",
]


def read_manifest(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t", len(MANIFEST_COLUMNS) - 1)
            parts += ["-"] * (len(MANIFEST_COLUMNS) - len(parts))
            rows.append(dict(zip(MANIFEST_COLUMNS, parts)))
    return rows


def read_meta(path):
    meta = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" not in line:
                continue
            k, v = line.split("\t", 1)
            if k in meta:  # repeated keys (notes, log lines) become lists
                if not isinstance(meta[k], list):
                    meta[k] = [meta[k]]
                meta[k].append(v)
            else:
                meta[k] = v
    for k in ("runs", "seconds", "ramp_seconds", "size_bytes", "quick", "smoke", "cpus", "clk_tck",
              "duration_seconds", "git_dirty_files", "mem_total_kb"):
        if isinstance(meta.get(k), str) and meta[k].lstrip("-").isdigit():
            meta[k] = int(meta[k])
    return meta


def tail(path, n=8):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def fio_figures(path, direction):
    """The figures of one fio JSON output, or raises ValueError."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"no fio output: {e}") from e
    # fio may print warnings before the JSON document
    start = text.find("{")
    if start < 0:
        raise ValueError("fio output holds no JSON")
    doc = json.loads(text[start:])
    job = doc["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")

    def pct_of(d, key):
        v = d.get("clat_ns", {}).get("percentile", {}).get(key)
        return None if v is None else v / 1000.0

    if direction == "mixed":
        rd, wr = job["read"], job["write"]
        return {
            "iops": rd["iops"] + wr["iops"],
            "mib_s": (rd["bw_bytes"] + wr["bw_bytes"]) / 2**20,
            "p50_us": pct_of(rd, "50.000000"),
            "p99_us": pct_of(rd, "99.000000"),
            "read_iops": rd["iops"],
            "write_iops": wr["iops"],
            "read_p50_us": pct_of(rd, "50.000000"),
            "read_p99_us": pct_of(rd, "99.000000"),
            "write_p50_us": pct_of(wr, "50.000000"),
            "write_p99_us": pct_of(wr, "99.000000"),
            "total_ios": (rd.get("total_ios") or 0) + (wr.get("total_ios") or 0),
            "io_mib": (rd.get("io_bytes", 0) + wr.get("io_bytes", 0)) / 2**20,
            "runtime_ms": max(rd.get("runtime") or 0, wr.get("runtime") or 0),
            "usr_cpu_pct": job.get("usr_cpu"),
            "sys_cpu_pct": job.get("sys_cpu"),
            "fio_version": doc.get("fio version"),
        }
    d = job[direction]
    clat = d.get("clat_ns", {})

    def p(key):
        return pct_of(d, key)

    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / 2**20,
        "p50_us": p("50.000000"),
        "p99_us": p("99.000000"),
        "p99_9_us": p("99.900000"),
        "clat_mean_us": clat.get("mean", 0) / 1000.0,
        "clat_max_us": clat.get("max", 0) / 1000.0,
        "total_ios": d.get("total_ios"),
        "io_mib": d.get("io_bytes", 0) / 2**20,
        "runtime_ms": d.get("runtime"),
        "usr_cpu_pct": job.get("usr_cpu"),
        "sys_cpu_pct": job.get("sys_cpu"),
        "fio_version": doc.get("fio version"),
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, kind):
    if v is None:
        return "—"
    if kind == "iops":
        return f"{v:,.0f}"
    if kind == "mib_s":
        return f"{v:,.1f}"
    if kind in ("p50_us", "p99_us"):
        return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"
    if kind == "ratio":
        return f"{v:.2f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest")
    ap.add_argument("--meta")
    ap.add_argument("--json", help="results JSON to write")
    ap.add_argument("--md", help="Markdown report to write")
    ap.add_argument("--svg", help="chart to write (with --chart-only: default RESULTS.json's name with .svg)")
    ap.add_argument("--cpu", help="per-run CPU ticks and VmHWM of the systems' processes (tsv)")
    ap.add_argument("--rebuild", help="the rebuild section's key/value tsv")
    ap.add_argument("--chart-only", metavar="RESULTS.json",
                    help="only render the chart of an existing results JSON")
    a = ap.parse_args()
    if a.chart_only:
        chart_only(a.chart_only, a.svg)
        return
    for opt in ("manifest", "meta", "json", "md"):
        if not getattr(a, opt):
            ap.error(f"--{opt} is required (unless --chart-only)")

    meta = read_meta(a.meta)
    rows = read_manifest(a.manifest)
    systems = [s for s in SYSTEMS if s in str(meta.get("systems", "")).split()]
    runs = int(meta.get("runs", 1))

    setup = [{"what": r["system"], "command": r["command"]} for r in rows if r["kind"] == "setup"]
    prefill = {}
    per_run = []
    errors = []
    for r in rows:
        if r["kind"] not in ("prefill", "run"):
            continue
        entry = {
            "system": r["system"],
            "scenario": r["scenario"],
            "run": int(r["run"]),
            "position_in_round": None if r["position"] == "-" else int(r["position"]),
            "fio_exit": None if r["rc"] in ("-", "skipped") else int(r["rc"]),
            "command": r["command"],
        }
        if r["t0"] != "-":
            entry["started"] = datetime.fromtimestamp(float(r["t0"]), timezone.utc).isoformat(timespec="seconds")
            entry["wall_s"] = round(float(r["t1"]) - float(r["t0"]), 2)
        if r["sync_s"] != "-":
            entry["sync_before_s"] = float(r["sync_s"])
        direction = "write" if r["kind"] == "prefill" else DIRECTION[r["scenario"]]
        if r["rc"] == "skipped":
            entry["error"] = "skipped: the system's process had exited"
        elif r["rc"] != "0":
            entry["error"] = f"fio exit status {r['rc']}" + (" (timed out)" if r["rc"] == "124" else "")
            entry["fio_log_tail"] = tail(r["log"])
        else:
            try:
                entry["figures"] = fio_figures(r["json"], direction)
            except (ValueError, KeyError, IndexError, json.JSONDecodeError) as e:
                entry["error"] = f"unreadable fio output: {e}"
                entry["fio_log_tail"] = tail(r["log"])
        log_tail = tail(r["log"], 5)
        if log_tail and "error" not in entry:
            entry["fio_stderr"] = log_tail
        if "error" in entry:
            errors.append(f"{entry['system']} {entry['scenario']} run {entry['run']}: {entry['error']}")
        if r["kind"] == "prefill":
            prefill[r["system"]] = entry
        else:
            per_run.append(entry)

    def fig(system, scenario, run):
        for e in per_run:
            if e["system"] == system and e["scenario"] == scenario and e["run"] == run:
                return e.get("figures")
        return None

    medians = {}
    for sc, _, _ in SCENARIOS:
        medians[sc] = {}
        for s in systems:
            figs = [fig(s, sc, r) for r in range(1, runs + 1)]
            ok = [f for f in figs if f]
            medians[sc][s] = {m: median([f.get(m) for f in ok]) for m in METRICS}
            medians[sc][s]["runs_ok"] = len(ok)

    ratios = {}
    for sc, _, _ in SCENARIOS:
        ratios[sc] = {}
        for key, num, den, metric, div, only in RATIOS:
            if only and sc not in only:
                continue
            if num not in systems or den not in systems:
                continue
            per = []
            for r in range(1, runs + 1):
                fn, fd = fig(num, sc, r), fig(den, sc, r)
                if fn and fd and fn[metric] is not None and fd[metric]:
                    per.append(fn[metric] / (fd[metric] / div))
                else:
                    per.append(None)
            ok = [v for v in per if v is not None]
            mn, md = medians[sc][num][metric], medians[sc][den][metric]
            ratios[sc][key] = {
                "median_of_per_run": median(ok),
                "per_run": per,
                "min": min(ok) if ok else None,
                "max": max(ok) if ok else None,
                "ratio_of_medians": (mn / (md / div)) if mn is not None and md else None,
            }

    cpu = cpu_usage(a.cpu, meta, per_run, systems, runs) if a.cpu else None
    rebuild = read_rebuild(a.rebuild) if a.rebuild else None
    if rebuild and rebuild.get("error"):
        errors.append(f"rebuild section: {rebuild['error']}")

    result = {
        "benchmark": "fio_compare",
        "meta": meta,
        "units": {"iops": "IO/s", "mib_s": "MiB/s (2^20 bytes)", "p50_us": "µs, completion latency (clat) median",
                  "p99_us": "µs, clat 99th percentile"},
        "ratio_definitions": {
            k: f"{num} {m} / ({den} {m}" + (f" / {div})" if div != 1 else ")") +
               ", per run round, median over rounds" + (f"; only {', '.join(only)}" if only else "")
            for k, num, den, m, div, only in RATIOS
        },
        "scenarios": {name: {"description": DESCRIPTION[name], "fio_direction": DIRECTION[name]}
                      for name, _, _ in SCENARIOS},
        "setup_commands": setup,
        "prefill": prefill,
        "runs": per_run,
        "medians": medians,
        "ratios": ratios,
        "cpu_and_memory": cpu,
        "rebuild": rebuild,
        "errors": errors,
    }
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")

    md = render_md(meta, systems, medians, ratios, prefill, errors, runs, cpu, rebuild,
                   chart=os.path.basename(a.svg) if a.svg else None)
    with open(a.md, "w", encoding="utf-8") as f:
        f.write(md)
    if a.svg:
        with open(a.svg, "w", encoding="utf-8") as f:
            f.write(render_svg(meta, systems, medians))
    sys.stdout.write(md)


def cpu_usage(path, meta, per_run, systems, runs):
    """CPU µs per I/O (per process group, per run, median) and peak RSS."""
    tck = int(meta.get("clk_tck") or 100)
    ramp, secs = float(meta.get("ramp_seconds", 1) or 0), float(meta.get("seconds", 1) or 1)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) == 7:
                    rows.append(p)
    except OSError:
        return None
    fig = {(e["system"], e["scenario"], e["run"]): e.get("figures") for e in per_run}
    per = {}   # (system, scenario, run) -> {"engine": s, "replicas": s, ...}
    hwm = {}   # (system, process) -> max VmHWM kB
    busy = {}  # (system, scenario, run) -> the machine's busy CPU seconds
    user = {}  # (system, scenario, run) -> user-space CPU seconds of Zebu's processes
    for system, scenario, run, proc, before, after, vm in rows:
        key = (system, scenario, int(run))
        if proc == "machine:busy" or proc.startswith("user:"):
            if before.isdigit() and after.isdigit():
                v = (int(after) - int(before)) / tck
                if proc == "machine:busy":
                    busy[key] = v
                elif proc.startswith(("user:engine-", "user:replica-")):
                    user[key] = user.get(key, 0.0) + v
            continue
        if before.isdigit() and after.isdigit():
            group = "engine" if proc.startswith("engine-") else "replicas" if proc.startswith("replica-") else "server"
            d = per.setdefault(key, {})
            d[group] = d.get(group, 0.0) + (int(after) - int(before)) / tck
        if vm.isdigit():
            hwm[(system, proc)] = max(hwm.get((system, proc), 0), int(vm))
    runs_out = []
    for (system, scenario, run), d in sorted(per.items()):
        f = fig.get((system, scenario, run))
        ios = f.get("total_ios") if f else None
        e = {"system": system, "scenario": scenario, "run": run,
             "cpu_s": {k: round(v, 3) for k, v in d.items()}, "total_ios": ios}
        if ios:
            total = sum(d.values())
            e["cpu_us_per_io"] = {k: v * 1e6 / ios for k, v in d.items()}
            e["cpu_us_per_io"]["total"] = total * 1e6 / ios
            # the CPU window also holds the ramp (fio does not count its I/Os)
            e["cpu_us_per_io_ramp_adjusted_total"] = total * 1e6 / (ios * (secs + ramp) / secs)
            # Everything the machine did per I/O except Zebu's own user-space
            # code: the kernel's work for the sockets and the disk, fio, and
            # the kernel threads. Ramp-adjusted like the total above.
            b, u = busy.get((system, scenario, run)), user.get((system, scenario, run), 0.0)
            if b is not None:
                e["machine_busy_s"], e["zebu_user_s"] = round(b, 3), round(u, 3)
                e["cpu_us_per_io"]["machine_minus_zebu_user"] = (b - u) * 1e6 / (ios * (secs + ramp) / secs)
        runs_out.append(e)
    med = {}
    for sc, _, _ in SCENARIOS:
        for s in systems:
            ok = [e["cpu_us_per_io"] for e in runs_out
                  if e["system"] == s and e["scenario"] == sc and "cpu_us_per_io" in e]
            if ok:
                med.setdefault(sc, {})[s] = {k: median([o.get(k) for o in ok])
                                             for k in ("engine", "replicas", "server", "total",
                                                       "machine_minus_zebu_user")}
    peak = {}
    for (s, proc), kb in sorted(hwm.items()):
        peak.setdefault(s, {})[proc] = round(kb / 1024, 1)
    return {
        "definition": "CPU = utime+stime (/proc/PID/stat fields 14+15) of the system's processes, read before "
                      f"and after each fio run (the window includes fio's {meta.get('ramp_seconds', 1)} s ramp and setup); CPU µs per I/O = "
                      "that delta / fio's total I/Os of the run (reads + writes); peak RSS = VmHWM after the last run; "
                      "machine_minus_zebu_user = the machine's busy time (/proc/stat user+nice+system+irq+softirq) "
                      "less the utime of Zebu's processes, per I/O, ramp-adjusted",
        "clk_tck": tck,
        "per_run": runs_out,
        "median_us_per_io": med,
        "peak_rss_mib": peak,
    }


def concurrent_jobs(path):
    """The jobs of one fio JSON output whose jobs ran at once; raises
    ValueError when there is none or one of them failed."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    jobs = json.loads(text[text.find("{"):])["jobs"]
    if not jobs or any(j.get("error") for j in jobs):
        raise ValueError("a concurrent fio job failed")
    return jobs


def raw_copy_seconds(path):
    """Seconds the raw disk took for a copy: the longest of the concurrent
    fio jobs (reader and writer) of one fio JSON output."""
    return max(j["job_runtime"] for j in concurrent_jobs(path)) / 1000.0


def copies_iops(path):
    """IOPS of copies written at once: the sum of the concurrent fio jobs'
    write IOPS over the number of jobs (one job per copy)."""
    jobs = concurrent_jobs(path)
    return sum(j["write"]["iops"] for j in jobs) / len(jobs)


def read_rebuild_round(kv):
    """One round of the rebuild section from its key/value pairs."""
    out = {"size_bytes": int(kv["size_bytes"]) if "size_bytes" in kv else None}
    if "fill_bytes" in kv:
        out["fill_bytes"] = int(kv["fill_bytes"])
    for k in ("error", "note"):
        if k in kv:
            out[k] = kv[k]

    def progress(status_path, address):
        try:
            with open(status_path, encoding="utf-8") as f:
                st = json.loads(f.read())
        except (OSError, ValueError):
            return None
        for r in st.get("replicas", []):
            if r.get("address") == address:
                return r.get("rebuild")
        return None

    for phase in ("full", "delta"):
        if f"{phase}_wall_s" not in kv:
            continue
        wall = float(kv[f"{phase}_wall_s"])
        p = progress(kv.get(f"{phase}_status_json", ""), kv.get(f"{phase}_address")) or {}
        e = {"address": kv.get(f"{phase}_address"), "wall_s": wall, "engine_progress": p}
        bd = p.get("bytes_done")
        if bd is not None:
            e["mib_s_wall"] = bd / 2**20 / wall if wall else None
        if p.get("rate_bytes_per_sec") is not None:
            e["mib_s_engine"] = p["rate_bytes_per_sec"] / 2**20
        e["blocks_copied"] = p.get("blocks_copied")
        for k in ("plan_seconds", "copy_seconds", "finish_seconds"):
            e[k] = p.get(k)
        # The raw disk's copy; for the full copy, the faster of the depths run.
        raws = []
        for key in (f"raw_{phase}_json", f"raw_{phase}_deep_json"):
            try:
                raws.append(raw_copy_seconds(kv[key]))
            except (KeyError, OSError, ValueError, IndexError):
                pass
        if raws:
            e["raw_s"] = min(raws)
            e["raw_s_each"] = raws
            e["over_raw"] = wall / e["raw_s"] if e["raw_s"] else None
        out[phase] = e
    for qd in (1, 32):
        try:
            f = fio_figures(kv[f"floor_qd{qd}_json"], "read")
            out[f"floor_qd{qd}"] = {"iops": f["iops"], "p50_us": f["p50_us"], "p99_us": f["p99_us"]}
        except (KeyError, ValueError, IndexError, json.JSONDecodeError):
            pass
    bound = {}
    try:
        bound["raw3_iops"] = copies_iops(kv["raw3_qd32_json"])
    except (KeyError, OSError, ValueError, IndexError):
        pass
    for state in ("prefilled", "evicted"):
        try:
            bound[f"nbdkit_{state}_iops"] = fio_figures(kv[f"nbdkit_{state}_qd32_json"], "write")["iops"]
        except (KeyError, ValueError, IndexError, json.JSONDecodeError):
            pass
    if bound:
        out["write_bound"] = bound
    if "delta_blocks_target" in kv:
        out.setdefault("delta_writes", {})["blocks_target"] = int(kv["delta_blocks_target"])
        try:
            w = fio_figures(kv.get("delta_writes_json", ""), "write")
            out.setdefault("delta_writes", {}).update(
                {"total_ios": w["total_ios"], "io_mib": w["io_mib"], "runtime_ms": w["runtime_ms"]})
        except (ValueError, KeyError, IndexError, json.JSONDecodeError):
            pass
    if "full" in out and "delta" in out and out["full"]["wall_s"]:
        out["delta_over_full_time"] = out["delta"]["wall_s"] / out["full"]["wall_s"]
        rf, rd = out["full"].get("raw_s"), out["delta"].get("raw_s")
        if rf and rd:
            out["raw_delta_over_full_time"] = rd / rf
    return out


def read_rebuild(path):
    """Every round of the rebuild section (keys `ROUND.key`) and the medians
    of the per-round figures."""
    rounds = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if "\t" in line:
                    k, v = line.rstrip("\n").split("\t", 1)
                    rnd, _, key = k.partition(".")
                    rounds.setdefault(rnd, {})[key] = v
    except OSError:
        return None
    if not rounds:
        return None
    per_round = [read_rebuild_round(rounds[r]) for r in sorted(rounds, key=int)]
    out = {"rounds": per_round, "size_bytes": per_round[0].get("size_bytes"),
           "fill_bytes": per_round[0].get("fill_bytes")}
    errs = [f"round {i + 1}: {r[k]}" for i, r in enumerate(per_round) for k in ("error",) if r.get(k)]
    if errs:
        out["error"] = "; ".join(errs)
    notes = [f"round {i + 1}: {r['note']}" for i, r in enumerate(per_round) if r.get("note")]
    if notes:
        out["note"] = "; ".join(notes)
    for phase in ("full", "delta"):
        es = [r[phase] for r in per_round if phase in r]
        if not es:
            continue
        med = {}
        for k in ("wall_s", "mib_s_wall", "mib_s_engine", "plan_seconds", "copy_seconds",
                  "finish_seconds", "raw_s", "over_raw", "blocks_copied"):
            vals = [e[k] for e in es if e.get(k) is not None]
            med[k] = median(vals) if vals else None
        med["bytes_done"] = median([e["engine_progress"]["bytes_done"] for e in es
                                    if e.get("engine_progress", {}).get("bytes_done") is not None] or [None])
        out[phase] = med
    for qd in (1, 32):
        fl = [r[f"floor_qd{qd}"] for r in per_round if r.get(f"floor_qd{qd}")]
        if fl:
            out[f"floor_qd{qd}"] = {k: median([f[k] for f in fl]) for k in ("iops", "p50_us", "p99_us")}
    for k in ("delta_over_full_time", "raw_delta_over_full_time"):
        vals = [r[k] for r in per_round if r.get(k) is not None]
        if vals:
            out[k] = median(vals)
    bounds = [r["write_bound"] for r in per_round if r.get("write_bound")]
    if bounds:
        wb = {}
        for k in ("raw3_iops", "nbdkit_prefilled_iops", "nbdkit_evicted_iops"):
            vals = [b[k] for b in bounds if b.get(k) is not None]
            if vals:
                wb[k] = median(vals)
        per = [b["raw3_iops"] / b["nbdkit_evicted_iops"] for b in bounds
               if b.get("raw3_iops") and b.get("nbdkit_evicted_iops")]
        if per:
            wb["raw3_over_nbdkit_evicted"] = median(per)
        out["write_bound"] = wb
    dws = [r["delta_writes"] for r in per_round if r.get("delta_writes")]
    if dws:
        out["delta_writes"] = dws[0]
    return out
def target_rows(meta, medians, ratios, cpu, rebuild):
    """Each target of issue 5: (name, measured, goal, met, bound)."""
    rows = []

    def ratio(sc, key):
        return ((ratios.get(sc) or {}).get(key) or {}).get("median_of_per_run")

    def med(sc, system, metric):
        return ((medians.get(sc) or {}).get(system) or {}).get(metric)

    rb = rebuild or {}
    f1, f32 = rb.get("floor_qd1") or {}, rb.get("floor_qd32") or {}
    r = ratio("randwrite-4k-qd32", "zebu-3/nbdkit iops")
    if r is not None:
        cw = ((cpu or {}).get("median_us_per_io") or {}).get("randwrite-4k-qd32") or {}
        z, n = (cw.get("zebu-3") or {}).get("total"), (cw.get("nbdkit-file") or {}).get("total")
        b = (f"CPU-bound: {z:,.0f} µs of CPU per write (engine + 3 replicas) against nbdkit's {n:,.0f}"
             if z and n else "—")
        rest = (cw.get("zebu-3") or {}).get("machine_minus_zebu_user")
        nbd_iops = med("randwrite-4k-qd32", "nbdkit-file", "iops")
        ncpu = float(meta.get("cpus") or 0)
        if rest and nbd_iops and ncpu:
            cap = ncpu * 1e6 / rest
            b += (f"; ≤ {cap / nbd_iops:.2f} even if Zebu's own user-space code cost nothing: the rest of "
                  f"the machine's work (kernel, fio) takes {rest:,.0f} µs per write, {cap:,.0f} IOPS on "
                  f"{ncpu:g} CPUs")
        wb = rb.get("write_bound") or {}
        if wb.get("raw3_over_nbdkit_evicted") is not None and wb.get("nbdkit_evicted_iops"):
            b = (f"≤ {wb['raw3_over_nbdkit_evicted']:.2f} against nbdkit-file at its best: the disk alone takes "
                 f"three copies at {wb['raw3_iops']:,.0f} IOPS (three files, QD32 each), while nbdkit-file "
                 f"writes {wb['nbdkit_evicted_iops']:,.0f} once its file's page cache is dropped "
                 f"({fmt(wb.get('nbdkit_prefilled_iops'), 'iops')} as prefilled; see *4 KiB write bound*). {b}")
        rows.append(("4 KiB random write QD32 IOPS ≥ 1.0 × nbdkit-file", f"{r:.2f}", 1.0, r >= 1.0, b))
    r = ratio("randwrite-4k-qd1", "zebu-3/nbdkit p50")
    nbd, raw = med("randwrite-4k-qd1", "nbdkit-file", "p50_us"), med("randwrite-4k-qd1", "raw", "p50_us")
    if r is not None:
        b = "—"
        if f1.get("p50_us") and nbd and raw:
            b = (f"≥ {(f1['p50_us'] + raw) / nbd:.2f}: path floor p50 {f1['p50_us']:,.0f} µs + raw write p50 "
                 f"{raw:,.0f} µs, over nbdkit's {nbd:,.0f} µs")
        rows.append(("4 KiB random write QD1 p50 ≤ 1.5 × nbdkit-file", f"{r:.2f}", 1.5, r <= 1.5, b))
    r = ratio("randread-4k-qd32", "zebu-3/nbdkit iops")
    nbd = med("randread-4k-qd32", "nbdkit-file", "iops")
    if r is not None:
        b = "—"
        if f32.get("iops") and nbd:
            b = (f"≤ {f32['iops'] / nbd:.2f}: the path floor (no disk I/O) does {f32['iops']:,.0f} IOPS; nbdkit "
                 f"{nbd:,.0f} from the page cache")
        rows.append(("4 KiB random read QD32 IOPS ≥ 1.0 × nbdkit-file", f"{r:.2f}", 1.0, r >= 1.0, b))
    r = ratio("write-1m-qd8", "zebu-3/(raw/3) MiB/s")
    raw_w = med("write-1m-qd8", "raw", "mib_s")
    if r is not None:
        b = "—"
        c = (((cpu or {}).get("median_us_per_io") or {}).get("write-1m-qd8") or {}).get("zebu-3") or {}
        ncpu = float(meta.get("cpus") or 0)
        secs, ramp = float(meta.get("seconds", 1) or 1), float(meta.get("ramp_seconds", 0) or 0)
        if c.get("total") and ncpu and raw_w:
            per_io = c["total"] * secs / (secs + ramp)
            cap = ncpu * 1e6 / per_io
            b = (f"≤ {cap / (raw_w / 3):.2f} at today's CPU cost: {per_io:,.0f} µs of CPU per MiB "
                 f"(engine + replicas) caps {ncpu:g} CPUs at {cap:,.0f} MiB/s")
            rest = c.get("machine_minus_zebu_user")
            if rest:
                cap0 = ncpu * 1e6 / rest
                b += (f"; ≤ {cap0 / (raw_w / 3):.2f} even if Zebu's own user-space code cost nothing: the "
                      f"kernel's socket and disk work and fio take {rest:,.0f} µs of CPU per MiB, "
                      f"{cap0:,.0f} MiB/s on {ncpu:g} CPUs")
        rows.append(("1 MiB write QD8 ≥ 0.8 × raw/3", f"{r:.2f}", 0.8, r >= 0.8, b))
    full = rb.get("full") or {}
    if full.get("mib_s_wall") and raw_w:
        v = full["mib_s_wall"] / (raw_w / 2)
        b = "—"
        if full.get("raw_s") and rb.get("fill_bytes"):
            bound = rb['fill_bytes'] / 2**20 / full['raw_s'] / (raw_w / 2)
            b = (f"≤ {bound:.2f}: the raw disk's own concurrent read + write of the same "
                 f"{rb['fill_bytes'] >> 20} MiB (the faster of depths 16 and 128)")
            if v > bound:
                b += ("; Zebu's rebuild was faster than that in this run, so the disk's figure "
                      "moves too much between runs to bound it")
        rows.append(("full rebuild ≥ 0.8 × raw/2", f"{v:.2f}", 0.8, v >= 0.8, b))
    if rb.get("delta_over_full_time") is not None:
        v = rb["delta_over_full_time"]
        b = "—"
        if rb.get("raw_delta_over_full_time") is not None:
            b = f"≥ {rb['raw_delta_over_full_time']:.2f}: the raw disk doing the same two copies"
        rows.append(("delta resync < 0.05 × full rebuild time", f"{v:.3f}", 0.05, v < 0.05, b))
    return rows


def render_md(meta, systems, medians, ratios, prefill, errors, runs, cpu=None, rebuild=None, chart=None):
    out = []
    w = out.append
    size_gib = meta.get("size_bytes", 0) / 2**30
    mode = " (quick)" if meta.get("quick") else " (smoke)" if meta.get("smoke") else ""
    w(f"# fio comparison — {meta.get('date', '')}{mode}\n")
    w(f"- command: `{meta.get('script_command', '')}`")
    w(f"- commit `{str(meta.get('git_commit', ''))[:12]}` (work tree: {meta.get('git_dirty_files', '?')} changed/untracked paths), "
      f"{meta.get('fio_version', '')}, {meta.get('nbdkit_version', 'no nbdkit')}, kernel {meta.get('kernel', '')}, "
      f"{meta.get('cpus', '?')} CPUs" +
      (f"; binaries: {meta['build_profile']}" if meta.get("build_profile") else ""))
    w(f"- volume {size_gib:g} GiB on {meta.get('fs', '')}; prefilled once with sequential 1 MiB writes; "
      f"{meta.get('seconds')} s per run after {meta.get('ramp_seconds', 1)} s ramp; {runs} run(s) per scenario and system, "
      f"systems interleaved per round (order rotated each round); `sync -f` before every run")
    w(f"- load average at start {meta.get('loadavg_start', '?')}, at end {meta.get('loadavg_end', '?')}; "
      f"total duration {meta.get('duration_seconds', '?')} s")
    w("- raw = fio io_uring `--direct=1` on a preallocated file, buffers: "
      f"{meta.get('raw_buffers', 'fio default')}; nbdkit-file = `nbdkit file` (default cache mode, "
      "i.e. through the page cache); zebu-N = zebu-engine + N zebu-replica, all on the same disk; "
      "NBD systems via fio's nbd engine on a Unix socket\n")
    if chart:
        w(f"![median throughput relative to nbdkit-file]({chart})\n")

    w(f"## Medians over {runs} run(s)\n")
    w("| scenario | system | IOPS | MiB/s | p50 µs | p99 µs | runs ok |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for sc, _, _ in SCENARIOS:
        for s in systems:
            m = medians[sc][s]
            if DIRECTION[sc] == "mixed":
                p50 = f"r {fmt(m['read_p50_us'], 'p50_us')} / w {fmt(m['write_p50_us'], 'p50_us')}"
                p99 = f"r {fmt(m['read_p99_us'], 'p99_us')} / w {fmt(m['write_p99_us'], 'p99_us')}"
            else:
                p50, p99 = fmt(m['p50_us'], 'p50_us'), fmt(m['p99_us'], 'p99_us')
            w(f"| {sc} | {s} | {fmt(m['iops'], 'iops')} | {fmt(m['mib_s'], 'mib_s')} | "
              f"{p50} | {p99} | {m['runs_ok']}/{runs} |")
    w("")
    if any(DIRECTION[sc] == "mixed" for sc, _, _ in SCENARIOS):
        w("Mixed scenarios: IOPS and MiB/s are reads + writes; latencies are given for reads (r) and writes (w); "
          "their p50 ratios below use the reads' p50.\n")

    keys = [k for k, *_ in RATIOS if any(k in ratios[sc] for sc, _, _ in SCENARIOS)]
    if keys:
        w("## Ratios (per run round, then median; [min–max] over rounds)\n")
        w("IOPS and MiB/s ratios: higher is better for Zebu; p50 ratios: lower is better "
          "(1.00 = same latency as nbdkit). zebu-N/(raw/N): N replicas on one disk write N× the data, "
          "so raw/N is the ceiling.\n")
        w("| scenario | " + " | ".join(keys) + " |")
        w("|---|" + "---:|" * len(keys))
        for sc, _, _ in SCENARIOS:
            cells = []
            for k in keys:
                r = ratios[sc].get(k)
                if not r or r["median_of_per_run"] is None:
                    cells.append("—" if r is None else "n/a")
                elif runs > 1:
                    cells.append(f"{fmt(r['median_of_per_run'], 'ratio')} [{fmt(r['min'], 'ratio')}–{fmt(r['max'], 'ratio')}]")
                else:
                    cells.append(fmt(r["median_of_per_run"], "ratio"))
            w(f"| {sc} | " + " | ".join(cells) + " |")
        w("")

    if prefill:
        w("## Prefill (sequential 1 MiB writes, QD8, whole volume, once)\n")
        w("| system | MiB/s | seconds |")
        w("|---|---:|---:|")
        for s in systems:
            e = prefill.get(s, {})
            f = e.get("figures")
            if f:
                w(f"| {s} | {fmt(f['mib_s'], 'mib_s')} | {f['runtime_ms'] / 1000:.1f} |")
            else:
                w(f"| {s} | {e.get('error', 'missing')} | |")
        w("")

    if cpu and cpu.get("median_us_per_io"):
        w(f"## CPU time per I/O (median over runs, µs; utime+stime of the system's processes)\n")
        w(f"Measured around each whole fio run (including its {meta.get('ramp_seconds', 1)} s ramp, whose I/Os fio does not count), "
          "divided by the run's I/Os; an upper bound. replicas = sum over the replicas; "
          "nbdkit-file's server is nbdkit, for reference.\n")
        w("| scenario | system | engine | replicas | server | total |")
        w("|---|---|---:|---:|---:|---:|")
        for sc, _, _ in SCENARIOS:
            for s in systems:
                m = cpu["median_us_per_io"].get(sc, {}).get(s)
                if not m:
                    continue
                cells = [("—" if m.get(k) is None else f"{m[k]:.1f}") for k in ("engine", "replicas", "server", "total")]
                w(f"| {sc} | {s} | " + " | ".join(cells) + " |")
        w("")
    if cpu and cpu.get("peak_rss_mib"):
        w("## Peak RSS (VmHWM after the last run, MiB)\n")
        w("| system | process | peak RSS MiB |")
        w("|---|---|---:|")
        for s in systems:
            for proc, mib in cpu["peak_rss_mib"].get(s, {}).items():
                w(f"| {s} | {proc} | {mib:,.1f} |")
        w("")
    if rebuild:
        sz = (rebuild.get("size_bytes") or 0) / 2**20
        nr = len(rebuild.get("rounds", []))
        w(f"## Rebuild (zebu-3, fresh {sz:g} MiB volume per round, {(rebuild.get('fill_bytes') or 0) / 2**20:g} MiB "
          f"written; medians of {nr} round(s))\n")
        w("full = SIGKILL a replica, `replica add --wait` of a fresh one; delta = SIGKILL a replica, random 4 KiB "
          "writes over 1% of the blocks, restart it on its old dir, `replica add --wait`. Seconds = wall clock "
          "around that command; plan/copy/finish = the engine's phases (CRC comparison, the copy the new replica "
          "pulls from a healthy one, promotion and folding the rebuild snapshot). raw = the same copy on the raw "
          "disk in the same round: fio reading the amount from one file while writing it to another, concurrently "
          "(1 MiB at QD16 and at QD128 for full, the faster counting; 4 KiB random QD32 for delta), O_DIRECT.\n")
        w("| phase | seconds | plan s | copy s | finish s | MiB/s (wall) | bytes done | blocks copied | raw s | seconds / raw |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def sec(v):
            return "—" if v is None else f"{v:.3f}"

        for ph in ("full", "delta"):
            e = rebuild.get(ph)
            if not e:
                w(f"| {ph} | — | — | — | — | — | — | — | — | — |")
                continue
            bd = e.get("bytes_done")
            bc = e.get("blocks_copied")
            w(f"| {ph} | {sec(e.get('wall_s'))} | {sec(e.get('plan_seconds'))} | {sec(e.get('copy_seconds'))} | "
              f"{sec(e.get('finish_seconds'))} | {fmt(e.get('mib_s_wall'), 'mib_s')} | "
              f"{'—' if bd is None else f'{bd:.0f}'} | {'—' if bc is None else f'{bc:.0f}'} | "
              f"{sec(e.get('raw_s'))} | {fmt(e.get('over_raw'), 'ratio')} |")
        w("")
        dw = rebuild.get("delta_writes")
        if dw:
            w(f"- delta writes: {dw.get('total_ios', '?')} I/Os of 4 KiB (target {dw.get('blocks_target', '?')} blocks = 1%)")
        if rebuild.get("delta_over_full_time") is not None:
            w(f"- delta_time / full_rebuild_time = **{rebuild['delta_over_full_time']:.3f}** "
              f"(target < 0.05); the raw disk's same copies: "
              f"{fmt(rebuild.get('raw_delta_over_full_time'), 'ratio')}")
        raw_w = (medians.get("write-1m-qd8", {}).get("raw") or {}).get("mib_s")
        full = rebuild.get("full") or {}
        if raw_w and full.get("mib_s_wall"):
            w(f"- full rebuild {full['mib_s_wall']:,.1f} MiB/s = **{full['mib_s_wall'] / (raw_w / 2):.2f} × (raw 1 MiB "
              f"write {raw_w:,.0f} MiB/s / 2)** (target ≥ 0.8); the raw disk's own concurrent copy reaches "
              f"{(rebuild.get('fill_bytes') or 0) / 2**20 / full['raw_s'] / (raw_w / 2):.2f} × of it"
              if full.get("raw_s") else
              f"- full rebuild {full['mib_s_wall']:,.1f} MiB/s = **{full['mib_s_wall'] / (raw_w / 2):.2f} × (raw/2)**")
        for k in ("note", "error"):
            if rebuild.get(k):
                w(f"- {k}: {rebuild[k]}")
        w("")
        wb = rebuild.get("write_bound")
        if wb:
            w("## 4 KiB write bound (medians of the rebuild rounds)\n")
            w("4 KiB random writes at QD32, each round: the raw disk taking three copies (three files written "
              "at once by one fio job each, QD32 per file, O_DIRECT; IOPS = the jobs' sum / 3), and nbdkit-file "
              "on a fresh file, first as prefilled with sequential 1 MiB writes (ext4 then caches the file in "
              "large folios and walks every block of a folio for each 4 KiB write into it), then again once its "
              "cached pages were written back and dropped (fsync + POSIX_FADV_DONTNEED: the random writes then "
              "cache it in 4 KiB folios). The scenario runs above use nbdkit-file as prefilled.\n")
            w("| raw disk, three copies | nbdkit-file as prefilled | nbdkit-file, page cache dropped | three copies / nbdkit-file dropped |")
            w("|---:|---:|---:|---:|")
            w(f"| {fmt(wb.get('raw3_iops'), 'iops')} | {fmt(wb.get('nbdkit_prefilled_iops'), 'iops')} | "
              f"{fmt(wb.get('nbdkit_evicted_iops'), 'iops')} | {fmt(wb.get('raw3_over_nbdkit_evicted'), 'ratio')} |")
            w("")
        f1, f32 = rebuild.get("floor_qd1"), rebuild.get("floor_qd32")
        if f1 or f32:
            w("## Zebu's path floor (zebu-3, reads of never-written blocks: no disk I/O)\n")
            w("4 KiB random reads on the fresh rebuild volume before it is written: the engine asks one replica, "
              "which holds no data there and answers zeros without touching the disk. This is the cost of the "
              "path alone (NBD, engine, gRPC, replica, and back), a floor under every Zebu I/O.\n")
            w("| QD | IOPS | p50 µs | p99 µs |")
            w("|---:|---:|---:|---:|")
            for qd, f in ((1, f1), (32, f32)):
                if f:
                    w(f"| {qd} | {fmt(f['iops'], 'iops')} | {fmt(f['p50_us'], 'p50_us')} | {fmt(f['p99_us'], 'p99_us')} |")
            w("")
            nbd_w = (medians.get("randwrite-4k-qd1", {}).get("nbdkit-file") or {}).get("p50_us")
            raw_w1 = (medians.get("randwrite-4k-qd1", {}).get("raw") or {}).get("p50_us")
            if f1 and nbd_w and raw_w1 and f1.get("p50_us"):
                w(f"- QD1 write bound: floor p50 {f1['p50_us']:,.0f} µs + raw disk write p50 {raw_w1:,.0f} µs = "
                  f"{(f1['p50_us'] + raw_w1) / nbd_w:.2f} × nbdkit-file's write p50 ({nbd_w:,.0f} µs), "
                  f"before the write is sent to more than one replica (target ≤ 1.5)")
            nbd_r = (medians.get("randread-4k-qd32", {}).get("nbdkit-file") or {}).get("iops")
            if f32 and nbd_r and f32.get("iops"):
                w(f"- QD32 read bound: the floor's {f32['iops']:,.0f} IOPS with no disk at all = "
                  f"{f32['iops'] / nbd_r:.2f} × nbdkit-file's random reads ({nbd_r:,.0f} IOPS, served from the page cache) "
                  f"(target ≥ 1.0)")
            w("")

    targets = target_rows(meta, medians, ratios, cpu, rebuild)
    if targets:
        w("## Targets (zebu-3; issue 5)\n")
        w("measured = median of the per-round ratios of this run; bound = what this machine allows, measured "
          "in the same run (see the sections above).\n")
        w("| target | measured | met | bound on this machine |")
        w("|---|---:|:---:|---|")
        for name, val, goal, ok, bound in targets:
            w(f"| {name} | {val} | {'yes' if ok else 'no'} | {bound} |")
        w("")

    notes, expected = [], 0
    for k, v in meta.items():
        if k == "stop_note" or k.startswith("log_"):
            for line in v if isinstance(v, list) else [v]:
                # The rebuild section SIGKILLs replicas on purpose: its
                # engines' reports of those losses are expected.
                if k.startswith("log_engine-rebuild") and (
                        "replica data stream lost" in line or "ejecting replica" in line):
                    expected += 1
                    continue
                notes.append(f"{k}: {line}")
    if errors or notes or expected:
        w("## Errors and notes\n")
        for e in errors:
            w(f"- {e}")
        for n in notes:
            w(f"- `{n}`")
        if expected:
            w(f"- {expected} expected warnings of the rebuild section's engines (replica stream lost, replica "
              "ejected) after it SIGKILLed a replica; they are in the JSON's meta")
        w("")
    return "\n".join(out)


# ---------------------------------------------------------------- chart --

CHART_COLORS = {
    "raw": "#9e9e9e",
    "nbdkit-file": "#4e79a7",
    "zebu-1": "#f1c232",
    "zebu-2": "#f28e2b",
    "zebu-3": "#c0392b",
}
CHART_LABELS = {
    "randwrite-4k-qd1": ("4 KiB rand write", "QD1"),
    "randwrite-4k-qd32": ("4 KiB rand write", "QD32"),
    "randread-4k-qd1": ("4 KiB rand read", "QD1"),
    "randread-4k-qd32": ("4 KiB rand read", "QD32"),
    "write-1m-qd8": ("1 MiB seq write", "QD8"),
    "read-1m-qd8": ("1 MiB seq read", "QD8"),
    "randrw70-4k-qd16": ("4 KiB 70/30 r/w", "QD16"),
}
CHART_CAP = 2.0  # the y axis stops here; taller bars are cut and labelled


def chart_metric(scenario):
    """IOPS for 4 KiB scenarios, MiB/s for 1 MiB ones (the same ratio either way)."""
    return "mib_s" if "-1m-" in scenario else "iops"


def fmt_abs(v, metric):
    if v is None:
        return "—"
    if metric == "mib_s":
        return f"{v:,.0f} MiB/s"
    return f"{v / 1000:,.1f}k IOPS" if v >= 1000 else f"{v:,.0f} IOPS"


def render_svg(meta, systems, medians):
    """Grouped bars, one group per scenario, one bar per system: the system's
    median throughput divided by nbdkit-file's (or the first system's if
    nbdkit-file was not measured). Hand-written SVG, no dependency."""
    scenarios = [sc for sc, _, _ in SCENARIOS if sc in medians]
    ref = "nbdkit-file" if "nbdkit-file" in systems else (systems[0] if systems else None)
    vals = {}
    for sc in scenarios:
        m = chart_metric(sc)
        rv = (medians[sc].get(ref) or {}).get(m)
        for s in systems:
            v = (medians[sc].get(s) or {}).get(m)
            vals[(sc, s)] = (v / rv) if (v is not None and rv) else None
    present = [v for v in vals.values() if v is not None]
    top = max(present) if present else 1.0
    ymax = min(max(top, 1.0), CHART_CAP)
    step = 0.5 if ymax > 2 else 0.25
    ymax = step * -(-ymax // step)  # round up to a grid step
    if ymax < top:
        ymax = max(ymax, CHART_CAP)

    n = max(len(systems), 1)
    bw, gpad = 20, 14
    gw = n * bw + 2 * gpad
    left, right = 58, 18
    title_h, legend_h = 58, 30
    plot_top = title_h + legend_h + 34  # room for the value labels above bars
    plot_h = 300
    base = plot_top + plot_h
    width = left + gw * max(len(scenarios), 1) + right
    height = base + 94
    font = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'

    def y(v):
        return base - plot_h * min(v, ymax) / ymax

    o = []
    w = o.append
    w(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
      f'viewBox="0 0 {width} {height}" {font} font-size="12">')
    w(f'<rect width="{width}" height="{height}" fill="#ffffff"/>')
    date = meta.get("date", "")
    mode = " (quick)" if meta.get("quick") else " (smoke)" if meta.get("smoke") else ""
    w(f'<text x="{left}" y="24" font-size="16" font-weight="bold" fill="#222">'
      f'Throughput relative to {escape(str(ref))} (= 1.0), higher is better — fio {escape(str(date))}{mode}</text>')
    size_gib = (meta.get("size_bytes") or 0) / 2**30
    sub = (f"bar = median of {meta.get('runs', '?')} run(s) of {meta.get('seconds', '?')} s ÷ {ref}'s; "
           f"{size_gib:g} GiB volume; "
           f"4 KiB scenarios: IOPS, 1 MiB: MiB/s; commit {str(meta.get('git_commit', ''))[:12]}; "
           f"{meta.get('cpus', '?')} CPUs, one disk")
    w(f'<text x="{left}" y="44" font-size="12" fill="#555">{escape(sub)}</text>')
    # legend
    lx = left
    ly = title_h + 8
    for s in systems:
        w(f'<rect x="{lx}" y="{ly}" width="14" height="14" fill="{CHART_COLORS.get(s, "#777")}"/>')
        w(f'<text x="{lx + 19}" y="{ly + 12}" fill="#222">{escape(s)}</text>')
        lx += 30 + 8 * len(s)
    # grid and y axis
    g = 0.0
    while g <= ymax + 1e-9:
        yy = y(g)
        w(f'<line x1="{left}" y1="{yy:.1f}" x2="{width - right}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        w(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#555">{g:.2f}</text>')
        g += step
    w(f'<line x1="{left}" y1="{y(1.0):.1f}" x2="{width - right}" y2="{y(1.0):.1f}" '
      f'stroke="#4e79a7" stroke-dasharray="5,4" stroke-width="1.2"/>')
    w(f'<line x1="{left}" y1="{plot_top - 10}" x2="{left}" y2="{base}" stroke="#888"/>')
    w(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#888"/>')
    w(f'<text transform="translate(16,{plot_top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" '
      f'fill="#555">× {escape(str(ref))}</text>')
    # bars
    for i, sc in enumerate(scenarios):
        gx = left + i * gw
        if i:
            w(f'<line x1="{gx}" y1="{plot_top - 10}" x2="{gx}" y2="{base}" stroke="#f0f0f0"/>')
        for k, s in enumerate(systems):
            v = vals[(sc, s)]
            x = gx + gpad + k * bw
            cx = x + bw / 2
            if v is None:
                w(f'<text x="{cx:.1f}" y="{base - 4}" text-anchor="middle" font-size="9" fill="#999">n/a</text>')
                continue
            yt = y(v)
            color = CHART_COLORS.get(s, "#777")
            m = chart_metric(sc)
            absv = (medians[sc].get(s) or {}).get(m)
            w(f'<rect x="{x + 1}" y="{yt:.1f}" width="{bw - 2}" height="{base - yt:.1f}" fill="{color}">'
              f'<title>{escape(s)} {escape(sc)}: {v:.2f}× {escape(str(ref))} ({escape(fmt_abs(absv, m))})</title></rect>')
            if v > ymax:  # cut bar: a white zigzag near the top
                zy = yt + 10
                w(f'<polyline points="{x},{zy + 4} {x + bw / 3:.1f},{zy - 2} {x + 2 * bw / 3:.1f},{zy + 4} {x + bw},{zy - 2}" '
                  f'fill="none" stroke="#fff" stroke-width="3"/>')
            label = f"{v:.2f}"
            bold = ' font-weight="bold"' if v > ymax else ""
            w(f'<text transform="translate({cx + 3.5:.1f},{yt - 4:.1f}) rotate(-90)" font-size="10" '
              f'fill="#222"{bold}>{label}</text>')
        l1, l2 = CHART_LABELS.get(sc, (sc, ""))
        mid = gx + gw / 2
        w(f'<text x="{mid:.1f}" y="{base + 17}" text-anchor="middle" fill="#222">{escape(l1)}</text>')
        w(f'<text x="{mid:.1f}" y="{base + 31}" text-anchor="middle" fill="#222">{escape(l2)}</text>')
        rv = (medians[sc].get(ref) or {}).get(chart_metric(sc))
        w(f'<text x="{mid:.1f}" y="{base + 46}" text-anchor="middle" font-size="10" fill="#4e79a7">'
          f'1.0 = {escape(fmt_abs(rv, chart_metric(sc)))}</text>')
    notes = [f"Bars above {ymax:g}× are cut (zigzag); their label is the full value. Hover a bar for its absolute figure.",
             "raw = fio io_uring O_DIRECT on a file; nbdkit-file = nbdkit file plugin; "
             "zebu-N = zebu-engine + N zebu-replica; all on one disk."]
    for j, note in enumerate(notes):
        w(f'<text x="{left}" y="{height - 26 + 14 * j}" font-size="10" fill="#777">{escape(note)}</text>')
    w("</svg>")
    return "\n".join(o) + "\n"


def chart_only(results_path, svg_path=None):
    with open(results_path, encoding="utf-8") as f:
        res = json.load(f)
    meta = res.get("meta", {})
    medians = res.get("medians") or {}
    listed = str(meta.get("systems", "")).split()
    systems = [s for s in SYSTEMS if s in listed] + [s for s in listed if s not in SYSTEMS]
    if not medians or not systems:
        sys.exit(f"fio_compare.py: {results_path} holds no medians/systems (not a fio_compare results JSON?)")
    if not svg_path:
        root, _ = os.path.splitext(results_path)
        svg_path = root + ".svg"
    with open(svg_path, "w", encoding="utf-8") as f:
        f.write(render_svg(meta, systems, medians))
    print(f"chart: {svg_path}")


if __name__ == "__main__":
    main()
