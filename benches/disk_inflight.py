#!/usr/bin/env python3
"""How many requests a disk holds over time, from the kernel's block
tracepoints: shows whether a load keeps the disk busy or comes in waves.

    perf record -e block:block_rq_issue -e block:block_rq_complete -a -o blk.data -- sleep 1
    perf script -i blk.data -F time,event,trace | python3 benches/disk_inflight.py

(run the load meanwhile). A request counts from its issue to the driver to
its completion; only requests whose issue and completion both fell in the
trace count, and the first and last 50 ms are left out. Prints the share of
time the disk held no request, the time shares by number in flight, and the
number in flight every 50 µs over 5 ms from the middle of the trace."""
import bisect
import re
import sys

EVENT = re.compile(r"([\d.]+):\s+block:(block_rq_issue|block_rq_complete):\s+(\d+),(\d+)\s.*?(\d+) \+ \d+")


def analyse(lines):
    """(requests counted, seconds covered, {in flight: share of time},
    in flight every 50 µs over 5 ms from the middle) of a trace's lines;
    raises ValueError when the trace holds too little."""
    issued, spans = {}, []
    for line in lines:
        m = EVENT.search(line)
        if not m:
            continue
        t, event, key = float(m.group(1)), m.group(2), (m.group(3), m.group(4), m.group(5))
        if event == "block_rq_issue":
            issued[key] = t
        elif key in issued:
            spans.append((issued.pop(key), t))
    if len(spans) < 2:
        raise ValueError("no request was both issued and completed in the trace")
    t0 = min(a for a, _ in spans) + 0.05
    t1 = max(b for _, b in spans) - 0.05
    if t1 <= t0:
        raise ValueError("the trace is shorter than 100 ms")
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    shares, timeline, n, last = {}, [], 0, None
    for t, d in events:
        if last is not None and t0 <= t <= t1 and t > max(last, t0):
            shares[n] = shares.get(n, 0.0) + t - max(last, t0)
        n += d
        last = t
        timeline.append((t, n))
    total = sum(shares.values()) or 1.0
    shares = {k: v / total for k, v in shares.items()}
    times = [t for t, _ in timeline]
    mid = (t0 + t1) / 2
    row = [timeline[max(bisect.bisect_right(times, mid + i * 50e-6) - 1, 0)][1] for i in range(100)]
    return len(spans), t1 - t0, shares, row


def main():
    try:
        count, seconds, shares, row = analyse(sys.stdin)
    except ValueError as e:
        sys.exit(f"disk_inflight: {e}")
    print(f"{count} requests over {seconds:.3f} s; no request in flight {100 * shares.get(0, 0):.0f}% of the time")
    buckets = {}
    for k, v in shares.items():
        b = 0 if k == 0 else (k - 1) // 16 * 16 + 1
        buckets[b] = buckets.get(b, 0.0) + v
    print("in flight (share of time): " + ", ".join(
        f"{'0' if b == 0 else f'{b}-{b + 15}'}: {100 * v:.0f}%" for b, v in sorted(buckets.items())))
    print("in flight every 50 µs over 5 ms: " + " ".join(map(str, row)))


if __name__ == "__main__":
    main()
