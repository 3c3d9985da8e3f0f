#!/usr/bin/env python3
"""Tests of user_path.py's CPU and sleep accounting, its by-process tables
and the kernel's CPU per write read from fio's output, on inputs made here;
and the baselines' CPU latency request (`awake`), against the kernel.
Run: python3 benches/user_path_test.py"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import user_path


def snapshot(dirname, name, procs):
    """Writes a `cpu` snapshot: procs is {pid: (kind, ticks, start, sleeps)}."""
    path = os.path.join(dirname, name)
    snap = {str(pid): {"kind": k, "ticks": t, "start": st, **({} if sl is None else {"sleeps": sl})}
            for pid, (k, t, st, sl) in procs.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"clk_tck": 100, "procs": snap}, f)
    return path


class CpuDelta(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def delta(self, before, after):
        return user_path.cpu_delta(snapshot(self.dir.name, "a", before), snapshot(self.dir.name, "b", after))

    def test_counts_cpu_and_sleeps_by_kind(self):
        us, by_kind, sleeps, gone, n = self.delta(
            {1: ("zebu-replica", 100, "5", 10), 2: ("zebu-replica", 50, "5", 4), 3: ("zebu-engine", 7, "6", 1)},
            {1: ("zebu-replica", 101, "5", 30), 2: ("zebu-replica", 52, "5", 24), 3: ("zebu-engine", 9, "6", 31)})
        self.assertEqual(by_kind, {"zebu-replica": 30_000.0, "zebu-engine": 20_000.0})
        self.assertEqual(us, 50_000.0)
        self.assertEqual(sleeps, {"zebu-replica": 40, "zebu-engine": 30})
        self.assertEqual((gone, n), ([], 3))

    def test_a_restarted_pid_counts_from_zero_and_a_gone_one_is_named(self):
        # pid 1 was reused by a new process (another start time); pid 2 ended
        _, by_kind, sleeps, gone, _ = self.delta(
            {1: ("zebu-engine", 500, "5", 900), 2: ("zebu-replica", 10, "5", 3)},
            {1: ("zebu-engine", 3, "8", 12)})
        self.assertEqual(by_kind, {"zebu-engine": 30_000.0})
        self.assertEqual(sleeps, {"zebu-engine": 12})
        self.assertEqual(gone, ["zebu-replica 2"])

    def test_sleeps_never_go_negative_when_a_thread_ended(self):
        # a thread's count leaves the sum with the thread
        _, _, sleeps, _, _ = self.delta({1: ("zebu-replica", 1, "5", 50)}, {1: ("zebu-replica", 2, "5", 20)})
        self.assertEqual(sleeps, {"zebu-replica": 0})

    def test_snapshots_without_sleeps_give_none(self):
        _, by_kind, sleeps, _, _ = self.delta({1: ("zebu-replica", 1, "5", None)}, {1: ("zebu-replica", 3, "5", 8)})
        self.assertEqual(by_kind, {"zebu-replica": 20_000.0})
        self.assertIsNone(sleeps)


class ByProcessTable(unittest.TestCase):
    def row(self, rnd, sleeps):
        return {"ok": True, "scenario": "write-qd1", "system": "zebu-3", "round": rnd, "ios": 100,
                "sleeps_by_kind": sleeps, "sleeps_per_io": sum(sleeps.values()) / 100}

    def test_medians_per_io_by_kind(self):
        rows = [self.row(0, {"zebu-replica": 600, "zebu-engine": 300}),
                self.row(1, {"zebu-replica": 500, "zebu-engine": 400}),
                self.row(2, {"zebu-replica": 700, "zebu-engine": 200})]
        out = user_path.by_process_table(rows, "sleeps_by_kind", "sleeps_per_io", "T", "C")
        self.assertEqual(out[0], "## T")
        self.assertIn("| scenario | system | zebu-replica | zebu-engine | all |", out)
        self.assertIn("| write-qd1 | zebu-3 | 6.00 | 3.00 | 9.00 |", out)

    def test_runs_without_the_field_give_no_table(self):
        rows = [{"ok": True, "scenario": "write-qd1", "system": "zebu-3", "round": 0, "ios": 100}]
        self.assertEqual(user_path.by_process_table(rows, "sleeps_by_kind", "sleeps_per_io", "T", "C"), [])


class KernelBound(unittest.TestCase):
    def fio_json(self, jobs):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        path = os.path.join(d.name, "fio.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"jobs": [{"jobname": f"j{i}", "error": 0, "sys_cpu": sys_cpu, "job_runtime": ms,
                                 "write": {"iops": ios / (ms / 1000), "total_ios": ios, "runtime": ms,
                                           "clat_ns": {"percentile": {"50.000000": 100_000}}}}
                                for i, (sys_cpu, ms, ios) in enumerate(jobs)]}, f)
        return path

    def test_system_time_per_write_counts_every_copy(self):
        # --group_reporting: one job whose runtime is the three jobs' sum;
        # 30% of 15 s is 4.5 s of system time over 150,000 copies = 50,000 writes
        fig = user_path.fio_figures(self.fio_json([(30.0, 15_000, 150_000)]), 3)
        self.assertAlmostEqual(fig["kernel_us_per_io"], 90.0)
        fig = user_path.fio_figures(self.fio_json([(10.0, 5_000, 50_000)]), 1)
        self.assertAlmostEqual(fig["kernel_us_per_io"], 10.0)

    def test_the_bound_names_both_and_the_target(self):
        summary = {"local": {"kernel_us_per_io": user_path.spread([9.0, 8.0, 10.0])},
                   "three-copies": {"kernel_us_per_io": user_path.spread([27.0])}}
        (line,) = user_path.kernel_bound(summary)
        self.assertIn("9.00 [8.00–10.0] µs for one copy (local)", line)
        self.assertIn("27.0 µs for three (three-copies)", line)
        self.assertIn(f"target of {user_path.CPU_TARGET_US} µs", line)
        self.assertEqual(user_path.kernel_bound({"local": summary["local"]}), [])


class Floor(unittest.TestCase):
    """The floor's figures: its JSON, the client's CPU added to its
    replicas', and its ratios beside Zebu's."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def record(self, system, scenario, rnd, result, kind, cpu=True):
        raw = os.path.join(self.dir.name, "raw.jsonl")
        args = ["record", raw, "--system", system, "--scenario", scenario, "--round", str(rnd),
                "--kind", kind, "--result", result]
        if cpu:
            args += ["--cpu-before", snapshot(self.dir.name, "a", {7: ("replication-floor", 100, "5", 0)}),
                     "--cpu-after", snapshot(self.dir.name, "b", {7: ("replication-floor", 130, "5", 60)})]
        a = user_path.build_parser().parse_args(args)
        a.fn(a)
        with open(raw, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def result(self, name, text):
        path = os.path.join(self.dir.name, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_the_client_cpu_counts_with_the_replicas(self):
        out = self.result("floor.json", '{"ops": 300, "per_second": 30.0, "p50_us": 350, "p99_us": 900, '
                                        '"client_cpu_us": 60000}\n')
        [row] = self.record("floor-3", "fsync-qd1", 1, out, "floor")
        self.assertTrue(row["ok"], row)
        self.assertEqual((row["value"], row["ios"], row["p50_us"]), (30.0, 300, 350.0))
        # 30 ticks of the replicas (300,000 µs) + the client's 60,000 µs, over 300 commits
        self.assertEqual(row["cpu_us_by_kind"], {"replication-floor": 300_000.0, "client": 60_000.0})
        self.assertEqual(row["cpu_us_per_io"], 1200.0)
        self.assertNotIn("sleeps_per_io", row)  # its threads per connection are gone by then

    def test_no_operation_is_a_failed_run(self):
        out = self.result("floor.json", '{"ops": 0, "per_second": 0, "p50_us": 0, "p99_us": 0, "client_cpu_us": 1}')
        with self.assertRaises(SystemExit) as e:
            self.record("floor-3", "write-qd1", 1, out, "floor", cpu=False)
        self.assertIn("no operation", str(e.exception))

    def test_ratios_and_the_report_name_the_floor(self):
        rows = [{"ok": True, "scenario": "fsync-qd1", "system": s, "round": 1, "unit": "IOPS", "value": v,
                 "ios": 100, "p50_us": p} for s, v, p in
                (("local", 5000, 8), ("zebu-3", 1000, 17), ("zebu-3-nbd", 1200, 500), ("floor-3", 2500, 350))]
        summary, ratios = user_path.summarize(rows)
        self.assertEqual(ratios["fsync-qd1"]["zebu-3/floor-3"]["median"], 0.4)
        self.assertEqual(ratios["fsync-qd1"]["zebu-3-nbd/floor-3"]["median"], 0.48)
        md = user_path.render_md({"pgbench": False}, summary, ratios, rows)
        self.assertIn("| floor-3 | 2,500 | - | - | - | 0.50 |", md)
        self.assertIn("floor-3's commit (write, then flush) p50: 350 µs", md)
        self.assertIn("| fsync-qd1 | 0.20 | 0.83 | - | 0.40 |", md)


READ_LIMIT = ("import struct; print(struct.unpack('i', open('/dev/cpu_dma_latency', 'rb').read(4))[0])")


@unittest.skipUnless(os.access(user_path.QOS_DEVICE, os.W_OK), "needs root and /dev/cpu_dma_latency")
class Awake(unittest.TestCase):
    def run_awake(self, *cmd):
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run([sys.executable, os.path.join(here, "user_path.py"), "awake", "--", *cmd],
                              capture_output=True, text=True, check=False)

    def test_the_command_runs_with_the_limit_at_zero_and_its_status_comes_back(self):
        r = self.run_awake(sys.executable, "-c", READ_LIMIT + "; raise SystemExit(3)")
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertEqual(r.stdout.strip(), "0")

    def test_no_command_is_an_error(self):
        r = self.run_awake()
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no command", r.stderr)


if __name__ == "__main__":
    unittest.main()
