#!/usr/bin/env python3
"""Every run of multiq results files beside what the host and the GPU did while it ran.

usage: runs-beside-gpu.py [--clocks gpu-clocks.csv] RESULTS.json...

Per run (each repeat of a row with --repeat, in the order they ran): ops/s; the host's counters
from the row's "host" (hypervisor steal over the machine, times the scheduler took a submitting
thread's CPU, the submitting threads' CPU time per op); the threads one by one (how much later than
the median thread the last one finished, and that thread's median latency, CPU time and
preemptions beside the median thread's: a run lasts until its last thread finishes); and, with --clocks, the GPU's SM clock
(mean, min and max of the samples inside the run's "when" span) and its clock-event reasons.
The clock file is what scripts/gpu-clocks.sh records: nvidia-smi's CSV with a header, its first
column `timestamp` in the machine's local time (so read this on the machine that sampled, or in
the same time zone).
"""
import csv, json, sys, time


def load_clocks(path):
    rows = list(csv.reader(open(path)))
    if not rows:
        return []
    head = [h.strip().split(" ")[0] for h in rows[0]]
    out = []
    for r in rows[1:]:
        if len(r) != len(head):
            continue
        rec = dict(zip(head, (c.strip() for c in r)))
        try:
            stamp, ms = rec["timestamp"].rsplit(".", 1)
            t = time.mktime(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) * 1e3 + float(ms)
            reasons = rec.get("clocks_event_reasons.active", rec.get("clocks_throttle_reasons.active", ""))
            out.append((t, float(rec["clocks.sm"]), reasons))
        except (KeyError, ValueError):
            continue
    return out


def during(clocks, when):
    if not clocks or not when:
        return ""
    inside = [c for c in clocks if when["start_unix_ms"] <= c[0] <= when["end_unix_ms"]]
    if not inside:
        return "; SM clock: no sample inside the run"
    sm = [c[1] for c in inside]
    reasons = sorted({c[2] for c in inside if c[2] and c[2].strip("0x") != ""})
    why = f", reasons {'/'.join(reasons)}" if reasons else ""
    return f"; SM clock {sum(sm) / len(sm):,.0f} MHz (min {min(sm):,.0f}, max {max(sm):,.0f}, {len(sm)} samples{why})"


def threads(per):
    """The run's threads: how much later than the median thread the last one finished, and
    that thread against the median one (its median latency, CPU time, preemptions)."""
    if not per or not per.get("finished_ms"):
        return ""
    f = per["finished_ms"]
    order = sorted(range(len(f)), key=lambda i: f[i])
    last, mid = order[-1], order[(len(order) - 1) // 2]
    if f[mid] <= 0:
        return ""
    def at(key, i):
        v = per.get(key, [None] * len(f))[i]
        return "-" if v is None else f"{v:g}"
    return (f"; last thread {f[last] / f[mid]:.2f} x the median's finish (thread {last}: p50 {at('p50_us', last)} us, "
            f"cpu {at('cpu_ms', last)} ms, preempted {at('involuntary_switches', last)}; median thread: "
            f"p50 {at('p50_us', mid)} us, cpu {at('cpu_ms', mid)} ms, preempted {at('involuntary_switches', mid)})")


def launches(stats):
    """The coalescer's launches in the repeat (for the device queue: its kernel's launches,
    relaunches after it left included), where recorded."""
    if not stats:
        return ""
    exits = stats.get("queue_exits")
    why = "" if not exits else " (left: " + ", ".join(f"{k} {v}" for k, v in exits.items()) + ")"
    return f", launches {stats.get('launches')}{why}"


def describe(rate, host, when, clocks, per=None, stats=None):
    h = host or {}
    return (f"{rate:>12,.0f} ops/s; steal {h.get('steal_ms')} ms, preempted {h.get('involuntary_switches')}, "
            f"cpu/op {h.get('cpu_per_op_us')} us" + launches(stats) + threads(per) + during(clocks, when))


def main(argv):
    clocks = []
    if len(argv) > 1 and argv[0] == "--clocks":
        try:
            clocks = load_clocks(argv[1])
        except OSError as e:
            print(f"(no GPU clocks: {e})")
        argv = argv[2:]
    if not argv:
        sys.exit(__doc__)
    for path in argv:
        for r in json.load(open(path))["runs"]:
            name = (f"{path.split('/')[-1]}: {r.get('coalesce', '')} {r['preset']} {r['threads']}T "
                    f"if{r['inflight']} wait {r.get('wait', '')}")
            each = r.get("each_repeat") or [{"ops_per_sec": r["ops_per_sec"], "host": r.get("host"),
                                              "when": r.get("when"), "per_thread": r.get("per_thread"),
                                              "coalesce_stats": r.get("coalesce_stats")}]
            print(name)
            for e in each:
                print("  " + describe(e["ops_per_sec"], e.get("host"), e.get("when"), clocks, e.get("per_thread"),
                                      e.get("coalesce_stats")))


if __name__ == "__main__":
    main(sys.argv[1:])
