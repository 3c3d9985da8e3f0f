#!/usr/bin/env python3
"""Aggregates the fio runs of benches/fio_compare.sh (python3 stdlib only).

Reads the manifest the script writes (one tab-separated line per setup
command, prefill and fio run) and each run's fio JSON output; writes the
results JSON (every per-run figure, medians, ratios, exact commands) and a
Markdown report, and prints the report.

Ratios are computed pair by pair within a run round (zebu-3 run 2 against
nbdkit run 2, ...), then the median over rounds is reported, with the range.
"""

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone

SYSTEMS = ["raw", "nbdkit-file", "zebu-1", "zebu-3"]
SCENARIOS = [
    # name, fio data direction, description
    ("randwrite-4k-qd1", "write", "4 KiB random write, QD1"),
    ("randwrite-4k-qd32", "write", "4 KiB random write, QD32"),
    ("randread-4k-qd32", "read", "4 KiB random read, QD32"),
    ("write-1m-qd8", "write", "1 MiB sequential write, QD8"),
]
DIRECTION = {name: d for name, d, _ in SCENARIOS}
DESCRIPTION = {name: t for name, _, t in SCENARIOS}
METRICS = ["iops", "mib_s", "p50_us", "p99_us"]

# (key, numerator system, denominator system, metric, denominator divisor, scenarios or None = all)
RATIOS = [
    ("zebu-3/nbdkit iops", "zebu-3", "nbdkit-file", "iops", 1, None),
    ("zebu-3/nbdkit p50", "zebu-3", "nbdkit-file", "p50_us", 1, None),
    ("zebu-1/nbdkit iops", "zebu-1", "nbdkit-file", "iops", 1, None),
    ("zebu-1/nbdkit p50", "zebu-1", "nbdkit-file", "p50_us", 1, None),
    ("zebu-3/(raw/3) MiB/s", "zebu-3", "raw", "mib_s", 3, ["write-1m-qd8"]),
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
    for k in ("runs", "seconds", "ramp_seconds", "size_bytes", "quick", "cpus",
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
    d = job[direction]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    clat = d.get("clat_ns", {})
    pct = clat.get("percentile", {})

    def p(key):
        v = pct.get(key)
        return None if v is None else v / 1000.0

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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--json", required=True, help="results JSON to write")
    ap.add_argument("--md", required=True, help="Markdown report to write")
    a = ap.parse_args()

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
            medians[sc][s] = {m: median([f[m] for f in ok]) for m in METRICS}
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
        "errors": errors,
    }
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")

    md = render_md(meta, systems, medians, ratios, prefill, errors, runs)
    with open(a.md, "w", encoding="utf-8") as f:
        f.write(md)
    sys.stdout.write(md)


def render_md(meta, systems, medians, ratios, prefill, errors, runs):
    out = []
    w = out.append
    size_gib = meta.get("size_bytes", 0) / 2**30
    w(f"# fio comparison — {meta.get('date', '')}{' (quick)' if meta.get('quick') else ''}\n")
    w(f"- command: `{meta.get('script_command', '')}`")
    w(f"- commit `{str(meta.get('git_commit', ''))[:12]}` (work tree: {meta.get('git_dirty_files', '?')} changed/untracked paths), "
      f"{meta.get('fio_version', '')}, {meta.get('nbdkit_version', 'no nbdkit')}, kernel {meta.get('kernel', '')}, "
      f"{meta.get('cpus', '?')} CPUs")
    w(f"- volume {size_gib:g} GiB on {meta.get('fs', '')}; prefilled once with sequential 1 MiB writes; "
      f"{meta.get('seconds')} s per run after 1 s ramp; {runs} run(s) per scenario and system, "
      f"systems interleaved per round (order rotated each round); `sync -f` before every run")
    w(f"- load average at start {meta.get('loadavg_start', '?')}, at end {meta.get('loadavg_end', '?')}; "
      f"total duration {meta.get('duration_seconds', '?')} s")
    w("- raw = fio io_uring `--direct=1` on a preallocated file; nbdkit-file = `nbdkit file` (default cache mode, "
      "i.e. through the page cache); zebu-N = zebu-engine + N zebu-replica, all on the same disk; "
      "NBD systems via fio's nbd engine on a Unix socket\n")

    w(f"## Medians over {runs} run(s)\n")
    w("| scenario | system | IOPS | MiB/s | p50 µs | p99 µs | runs ok |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for sc, _, _ in SCENARIOS:
        for s in systems:
            m = medians[sc][s]
            w(f"| {sc} | {s} | {fmt(m['iops'], 'iops')} | {fmt(m['mib_s'], 'mib_s')} | "
              f"{fmt(m['p50_us'], 'p50_us')} | {fmt(m['p99_us'], 'p99_us')} | {m['runs_ok']}/{runs} |")
    w("")

    keys = [k for k, *_ in RATIOS if any(k in ratios[sc] for sc, _, _ in SCENARIOS)]
    if keys:
        w("## Ratios (per run round, then median; [min–max] over rounds)\n")
        w("IOPS and MiB/s ratios: higher is better for Zebu; p50 ratios: lower is better "
          "(1.00 = same latency as nbdkit). zebu-3/(raw/3): 3 replicas on one disk write 3× the data, "
          "so raw/3 is the ceiling.\n")
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

    notes = []
    for k, v in meta.items():
        if k == "stop_note" or k.startswith("log_"):
            for line in v if isinstance(v, list) else [v]:
                notes.append(f"{k}: {line}")
    if errors or notes:
        w("## Errors and notes\n")
        for e in errors:
            w(f"- {e}")
        for n in notes:
            w(f"- `{n}`")
        w("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
