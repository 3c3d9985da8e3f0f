#!/usr/bin/env python3
"""Tests of disk_inflight.py on traces made here, in `perf script -F
time,event,trace`'s format. Run: python3 benches/disk_inflight_test.py"""
import unittest

from disk_inflight import analyse


def trace(spans):
    """perf script lines for requests (issue time, completion time, sector)."""
    events = []
    for issue, done, sector in spans:
        events.append((issue, f"{issue:.6f}:   block:block_rq_issue: 254,0 WS 4096 () {sector} + 8 [zebu-replica]"))
        events.append((done, f"{done:.6f}:   block:block_rq_complete: 254,0 WS () {sector} + 8 0x2,0,4 [0]"))
    return [line for _, line in sorted(events)]


class Analyse(unittest.TestCase):
    def test_a_busy_disk_is_never_idle(self):
        # one request always in flight: each issued as the previous completes
        spans = [(i * 1e-3, (i + 1) * 1e-3, 8 * i) for i in range(1000)]
        count, seconds, shares, row = analyse(trace(spans))
        self.assertEqual(count, 1000)
        self.assertAlmostEqual(seconds, 0.9, places=3)
        self.assertAlmostEqual(shares.get(1, 0), 1.0, places=3)
        self.assertNotIn(0, shares)
        self.assertEqual(set(row), {1})

    def test_waves_leave_the_disk_idle(self):
        # every 2 ms a wave of 10 requests issued at once and held 1 ms
        spans = [(w * 2e-3, w * 2e-3 + 1e-3, 8 * (10 * w + k)) for w in range(500) for k in range(10)]
        _, _, shares, row = analyse(trace(spans))
        self.assertAlmostEqual(shares[0], 0.5, places=2)
        self.assertAlmostEqual(shares[10], 0.5, places=2)
        self.assertEqual(set(row), {0, 10})

    def test_requests_on_two_disks_are_told_apart(self):
        # the same sector on two devices, overlapping: two requests in flight
        lines = trace([(i * 1e-3, (i + 1) * 1e-3, 0) for i in range(300)])
        lines += [l.replace("254,0", "254,16") for l in lines]
        _, _, shares, _ = analyse(sorted(lines))
        self.assertAlmostEqual(shares.get(2, 0), 1.0, places=3)

    def test_a_trace_without_requests_is_refused(self):
        with self.assertRaises(ValueError):
            analyse(["nothing here"])


if __name__ == "__main__":
    unittest.main()
