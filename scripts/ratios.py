#!/usr/bin/env python3
"""multiq vs the anchor mq.cu, from files of one GPU run.

usage: ratios.py QUEUES.json [QUEUES2.json ...] --anchor anchor-mq.txt [--anchor more.txt ...]
                 [--wait-dir DIR] > queues.md

Each anchor file is mq.cu's verbatim output; with several (repeated runs), the per-configuration
median is used. multiq rows with repeats > 1 are already medians. Prints Markdown: per preset,
scenario and inflight, the anchor's and multiq's ops/s and their ratio at every thread count,
for each lock mode measured, then whether the issue's targets hold.
"""
import json, re, statistics, sys
from collections import defaultdict

def parse_args(argv):
    q, a, wait = [], [], None
    it = iter(argv)
    for x in it:
        if x == "--anchor": a.append(next(it))
        elif x == "--wait-dir": wait = next(it)
        else: q.append(x)
    return q, a, wait

queues_files, anchor_files, wait_dir = parse_args(sys.argv[1:])
anchor = defaultdict(list)  # (inflight, preset, scenario, threads) -> [ops/s]
line_re = re.compile(r"^mq inflight=(\d+) (\w+)\s+(\S+)\s+(.*?)\s+max-scaling")
for f in anchor_files:
    for line in open(f):
        m = line_re.match(line)
        if not m: continue
        inflight, preset, scenario, rest = int(m[1]), m[2], m[3], m[4]
        for t, v in re.findall(r"(\d+)T=(\d+)", rest):
            anchor[(inflight, preset, scenario, int(t))].append(float(v))
anchor = {k: statistics.median(v) for k, v in anchor.items()}

runs, meta = [], []
for f in queues_files:
    d = json.load(open(f))
    meta.append(d)
    runs += d["runs"]
mq = {(r["inflight"], r["preset"], r["scenario"], r["lock"], r["threads"]): r for r in runs}
locks = sorted({r["lock"] for r in runs})
threads = sorted({r["threads"] for r in runs})

m0 = meta[0]
print("# multiq vs the tuned CUDA anchor (mq.cu), multi-queue test\n")
print(f"- device: {m0['device']} ({m0['device_info'].get('driver')}); wait policy {m0['device_info']['wait']}")
print(f"- multiq commit: {m0['git_commit']}; started {m0['started_at']}")
for d in meta:
    print(f"- command: `{d['command']}`")
print(f"- anchor: `mq.cu` built with `nvcc -O3 -use_fast_math -arch=sm_90`, output verbatim in "
      f"{', '.join(f.split('/')[-1] for f in anchor_files)}; with several runs the median per configuration")
print("- cells: ops/s, anchor / multiq, and the ratio multiq ÷ anchor (≥ 1.00 = multiq as fast or faster)")
print()
misses = []
for preset in ["heavy", "default", "light", "minimal"]:
    for inflight in [1, 8]:
        for scenario in ["per-thread", "shared"]:
            have = [t for t in threads if (inflight, preset, scenario, t) in anchor]
            if not have: continue
            print(f"### {preset}, {scenario}, inflight {inflight}\n")
            print("| lock | " + " | ".join(f"{t}T" for t in have) + " |")
            print("|---|" + "---|" * len(have))
            print("| anchor | " + " | ".join(f"{anchor[(inflight, preset, scenario, t)]:,.0f}" for t in have) + " |")
            for lock in locks:
                cells = []
                for t in have:
                    r = mq.get((inflight, preset, scenario, lock, t))
                    if r is None:
                        cells.append("—"); continue
                    a = anchor[(inflight, preset, scenario, t)]
                    ratio = r["ops_per_sec"] / a
                    cells.append(f"{r['ops_per_sec']:,.0f} (**{ratio:.2f}**)")
                    if scenario == "per-thread":
                        need = 0.99 if preset in ("heavy", "default") and inflight == 1 else 1.0
                        if ratio < need:
                            misses.append(f"{preset} {scenario} inflight {inflight} lock {lock} {t}T: "
                                          f"{ratio:.2f} × anchor (target {need:.2f}; "
                                          f"range over repeats {r.get('ops_per_sec_min', 0):,.0f}–{r.get('ops_per_sec_max', 0):,.0f})")
                if any(c != "—" for c in cells):
                    print(f"| multiq {lock} | " + " | ".join(cells) + " |")
            print()

print("## Targets (stream per thread)\n")
collapse = []
for preset in ["light", "minimal"]:
    for lock in locks:
        one = mq.get((1, preset, "per-thread", lock, 1))
        if not one: continue
        low = [t for t in threads if (r := mq.get((1, preset, "per-thread", lock, t))) and r["ops_per_sec"] < one["ops_per_sec"]]
        if low: collapse.append(f"{preset} lock {lock}: below the 1-thread figure at {low}")
print("- no collapse (light, minimal, wait per op, no thread count below 1 thread): " +
      ("holds" if not collapse else "MISSED: " + "; ".join(collapse)))
# The targets name "lock per-stream or none": per cell, the better of the two.
best_miss = []
for preset in ["heavy", "default", "light", "minimal"]:
    for inflight in [1, 8]:
        for t in threads:
            a = anchor.get((inflight, preset, "per-thread", t))
            rs = [mq[k] for k in [(inflight, preset, "per-thread", l, t) for l in locks] if k in mq]
            if not a or not rs: continue
            need = 0.99 if preset in ("heavy", "default") and inflight == 1 else 1.0
            ratio = max(r["ops_per_sec"] for r in rs) / a
            if ratio < need: best_miss.append(f"{preset} inflight {inflight} {t}T: {ratio:.2f}")
print("- with the better of the two lock modes per cell (the targets say \"lock per-stream or none\"): " +
      ("every cell holds" if not best_miss else "MISSED in " + "; ".join(best_miss)))
if misses:
    print(f"- each lock mode on its own: ratio targets missed in {len(misses)} cell(s):")
    for m in misses: print(f"  - {m}")
else:
    print("- ratio targets (heavy/default ≥ 0.99, light/minimal ≥ 1.00, inflight 8 ≥ 1.00): hold in every per-thread cell")
print(f"- all runs verified: {all(r['verified'] for r in runs)}")
