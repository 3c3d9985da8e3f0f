#!/usr/bin/env python3
"""Tests of user_path.py's CPU and sleep accounting and its by-process
tables, on snapshots made here. Run: python3 benches/user_path_test.py"""
import json
import os
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


if __name__ == "__main__":
    unittest.main()
