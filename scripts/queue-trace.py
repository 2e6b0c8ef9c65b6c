#!/usr/bin/env python3
"""Time breakdown of the device queue's op cycle from MULTIQ_QUEUE_TRACE files.

Usage: queue-trace.py TRACE.csv [TRACE.csv ...]  (each file: one queue; see src/backend/cuda/queue.rs)

Per op, the legs of one cycle (host stamps: CLOCK_REALTIME; device stamps: %globaltimer):
  host -> device     published on the host .. the dispatcher saw it (bus read + poll phase)
  dispatch           seen .. forwarded to the chunk queue
  claim + deps       forwarded .. its first chunk started (a block claimed it, its
                     dependencies were done)
  run                first chunk started .. op completed (all chunks, the completion fence)
  device -> host     completed .. the host first saw its done word (bus write + poll phase)
  total              published .. seen done (host clock only: exact)
  host gap           seen done .. the next op published, when ops are back to back on one
                     thread (1-thread runs): the caller's own time between ops
The two cross-clock legs depend on how closely %globaltimer follows CLOCK_REALTIME; their
sum with the device legs equals the total exactly, so the pair is reliable even if the split
between them is not.
"""
import csv
import statistics
import sys


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main(paths):
    for path in paths:
        rows = []
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append({k: int(v) for k, v in r.items()})
        if not rows:
            print(f"{path}: no complete ops traced")
            continue
        legs = {
            "host -> device": [r["device_seen"] - r["host_published"] for r in rows],
            "dispatch": [r["device_forwarded"] - r["device_seen"] for r in rows],
            "claim + deps": [r["device_started"] - r["device_forwarded"] for r in rows],
            "run": [r["device_completed"] - r["device_started"] for r in rows],
            "device -> host": [r["host_seen_done"] - r["device_completed"] for r in rows],
            "total": [r["host_seen_done"] - r["host_published"] for r in rows],
        }
        rows.sort(key=lambda r: r["op"])
        gaps = [b["host_published"] - a["host_seen_done"] for a, b in zip(rows, rows[1:])
                if b["op"] == a["op"] + 1 and b["host_published"] >= a["host_seen_done"]]
        if len(gaps) > len(rows) // 2:
            legs["host gap"] = gaps
        span = (rows[-1]["host_seen_done"] - rows[0]["host_published"]) / 1e9
        print(f"{path}: {len(rows)} ops over {span * 1e3:.2f} ms ({len(rows) / span:,.0f} ops/s while traced)")
        print(f"  {'leg':<16} {'median us':>10} {'p10 us':>8} {'p90 us':>8}")
        for k, v in legs.items():
            print(f"  {k:<16} {statistics.median(v) / 1e3:>10.2f} {q(v, 0.1) / 1e3:>8.2f} {q(v, 0.9) / 1e3:>8.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1:])
