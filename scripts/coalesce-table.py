#!/usr/bin/env python3
"""Coalescing results (one GPU run of scripts/gpu-coalesce.sh) as Markdown, with the targets.

usage: coalesce-table.py DIR > coalesce.md   (DIR holds coalesce-*.json, maxbatch-*.json,
anchor-mq.txt and anchor-launch.txt from the same run)
"""
import glob, json, re, sys

d = sys.argv[1]
runs, cmds, meta = [], [], None
extra = sorted(glob.glob(d + "/depth-*.json")) + sorted(glob.glob(d + "/wait-*.json"))
for f in sorted(glob.glob(d + "/coalesce-*.json")) + sorted(glob.glob(d + "/maxbatch-*.json")) + extra:
    j = json.load(open(f))
    meta = meta or j
    cmds.append(j["command"])
    tag = f.split("/")[-1].replace(".json", "")
    for r in j["runs"]:
        r["file"] = tag
        runs.append(r)

def row(preset, inflight, coalesce, threads, file_prefix="coalesce"):
    for r in runs:
        if (r["preset"], r["inflight"], r["coalesce"], r["threads"]) == (preset, inflight, coalesce, threads) and r["file"].startswith(file_prefix):
            return r

anchor = open(d + "/anchor-mq.txt").read()
def mq(inflight, preset, threads):
    m = re.search(rf"mq inflight={inflight} {preset}\s+per-thread\s+(.*)", anchor)
    return float(re.search(rf"\b{threads}T=(\d+)", m[1])[1]) if m else None
launch = open(d + "/anchor-launch.txt").read()
ceiling16 = float(re.search(r"B16=(\d+)", launch)[1])

gpu = re.sub(r"^NVIDIA ", "", meta["device"]).split(" ")[0]
print(f"# Cross-thread coalescing on the {gpu} (stream per thread, lock none)\n")
print(f"- device: {meta['device']}; multiq commit {meta['git_commit']}; started {meta['started_at']}")
chain = dict(meta.get("device_info", {}).get("extra", [])).get("queue_chain")
if chain is not None:
    chained = sum((r.get("coalesce_stats") or {}).get("chained", 0) for r in runs)
    print(f"- device queue chaining: {chain} ({chained:,} ops chained over all runs)")
for c in cmds:
    print(f"- command: `{c}`")
print("- anchors from the same GPU run, verbatim: `anchor-mq.txt` (`mq 1000`), `anchor-launch.txt` (`SCHED=auto launch`)")
small = sorted({r.get("repeats", 1) for r in runs if r["preset"] in ("minimal", "light") and r["file"] == "coalesce-small"})
print(f"- minimal and light rows are the median of {'/'.join(map(str, small)) or 'the'} repeats; every run verified against the host reference\n")
print("`fixed` and `adaptive` batch on the host (one grouped launch per batch); `persistent` publishes each op to a kernel that stays on the device (no launch per op).\n")
print("| preset | inflight | threads | off ops/s | fixed ops/s | adaptive ops/s | persistent ops/s | fixed ÷ off | persistent ÷ off | p50 / p99 µs (fixed) | p50 / p99 µs (persistent) | anchor mq.cu |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for preset in ["minimal", "light", "default", "heavy"]:
    for inflight in [1, 8]:
        for t in [1, 2, 4, 8, 16]:
            off, fx, ad, pe = (row(preset, inflight, c, t) for c in ("off", "fixed", "adaptive", "persistent"))
            if not (off and fx and ad and pe):
                continue
            a = mq(inflight, preset, t)
            print(f"| {preset} | {inflight} | {t} | {off['ops_per_sec']:,.0f} | {fx['ops_per_sec']:,.0f} | {ad['ops_per_sec']:,.0f} | {pe['ops_per_sec']:,.0f} | "
                  f"{fx['ops_per_sec']/off['ops_per_sec']:.2f} | {pe['ops_per_sec']/off['ops_per_sec']:.2f} | "
                  f"{fx['latency_us']['p50']:.0f} / {fx['latency_us']['p99']:.0f} | {pe['latency_us']['p50']:.0f} / {pe['latency_us']['p99']:.0f} | {a:,.0f} |" if a else "")
print("\n## Depth and wait policy (16 threads, median of 3)\n")
print("Depth: batches queued on the device before new ops wait for a fuller batch (default 2). "
      "The breakdown is per batch: first op's submission to launch, the launch call itself, and "
      "launch end to the first waiter seeing completion.\n")
print("| run | preset | inflight | wait | policy, depth | ops/s | ÷ off (same file or coalesce-*) | ops/launch | p50 / p99 µs | pending / launch call / to completion µs |")
print("|---|---|---|---|---|---|---|---|---|---|")
def off_for(r):
    for o in runs:
        if (o["file"], o["preset"], o["inflight"], o["threads"], o["coalesce"]) == (r["file"], r["preset"], r["inflight"], r["threads"], "off"):
            return o
    return row(r["preset"], r["inflight"], "off", r["threads"])
cands = [r for r in runs if r["threads"] == 16 and r["coalesce"] in ("fixed", "persistent") and (r["file"].startswith(("depth", "wait")) or (r["file"].startswith("coalesce")))]
for r in sorted(cands, key=lambda r: (["minimal", "light", "default", "heavy"].index(r["preset"]), r["inflight"], r["file"])):
    o = off_for(r); c = r.get("coalesce_stats") or {}
    print(f"| {r['file']} | {r['preset']} | {r['inflight']} | {r['wait']} | {r['coalesce']} {r.get('coalesce_depth', '')} | {r['ops_per_sec']:,.0f} | "
          f"{r['ops_per_sec']/o['ops_per_sec']:.2f} | {r['ops_per_launch']:.1f} | {r['latency_us']['p50']:.0f} / {r['latency_us']['p99']:.0f} | "
          f"{c.get('pending_us', 0):.1f} / {c.get('launch_us', 0):.1f} / {c.get('complete_us', 0):.1f} |")

def judge(policy):
    print(f"\n### {policy}\n")
    def at(preset, inflight, threads, c=policy):
        return row(preset, inflight, c, threads)["ops_per_sec"]
    for name, got, want in [
        ("minimal, 16 threads, wait per op ≥ 900,000 ops/s", at("minimal", 1, 16), 900000),
        ("minimal, 16 threads, inflight 8 ≥ 2,000,000 ops/s", at("minimal", 8, 16), 2000000),
        ("light, 16 threads ≥ 180,000 ops/s", at("light", 1, 16), 180000)]:
        print(f"- {name}: {got:,.0f} — {'holds' if got >= want else f'MISSED ({got/want:.2f} of the target)'}")
    for preset in ["heavy", "default"]:
        for inflight in [1, 8]:
            ratio = at(preset, inflight, 16) / at(preset, inflight, 16, "off")
            print(f"- {preset}, inflight {inflight}, 16 threads ≥ 0.99 × off: {ratio:.4f} — {'holds' if ratio >= 0.99 else 'MISSED'}")
    # Every 1-thread cell the run measured (each preset and in-flight depth).
    cells = [(p, i) for p in ("minimal", "light", "default", "heavy") for i in (1, 8) if row(p, i, policy, 1) and row(p, i, "off", 1)]
    for preset, inflight in cells:
        r1 = at(preset, inflight, 1) / at(preset, inflight, 1, "off")
        print(f"- 1 thread ≥ 0.95 × off ({preset}, inflight {inflight}): {r1:.2f} — {'holds' if r1 >= 0.95 else 'MISSED'}")
    p99 = row("minimal", 1, policy, 16)["latency_us"]["p99"]
    print(f"- p99 ≤ 100 µs (minimal, 16 threads, wait per op): {p99:.0f} µs — {'holds' if p99 <= 100 else 'MISSED'}")
print("\n## Targets (issue 4), per policy\n")
for policy in ("fixed", "adaptive", "persistent"):
    judge(policy)
def best_any(preset, inflight):
    rs = [r for r in runs if (r["preset"], r["inflight"], r["threads"]) == (preset, inflight, 16) and r["coalesce"] != "off"]
    return max(rs, key=lambda r: r["ops_per_sec"])
print("\nBest of every coalescing configuration measured in this run (policy, depth, wait policy):\n")
for preset, inflight, want in [("minimal", 1, 900000), ("minimal", 8, 2000000), ("light", 1, 180000)]:
    b = best_any(preset, inflight)
    print(f"- {preset}, inflight {inflight}: {b['ops_per_sec']:,.0f} ({b['file']}, {b['coalesce']}, wait {b['wait']}, depth {b.get('coalesce_depth')}, "
          f"{b['ops_per_sec']/want:.2f} of the target; p99 {b['latency_us']['p99']:.0f} µs)")
print(f"- for reference, launch.cu in the same run: 16 minimal ops coalesced per launch from one thread: {ceiling16:,.0f} ops/s")
hosted = [r for r in runs if r.get("each_repeat") and r["file"] == "coalesce-small" and r["threads"] == 16]
if hosted:
    print("\n## The host's CPUs, per repeat (16 threads, minimal and light)\n")
    print("Steal: CPU time the hypervisor took from the machine during the run (all CPUs, at the kernel's 10 ms tick); "
          "preempted: times the scheduler took a submitting thread's CPU away; CPU/op: the submitting threads' CPU time per op.\n")
    print("| preset | inflight | coalesce | ops/s, each repeat (steal ms, preempted, CPU/op µs) |")
    print("|---|---|---|---|")
    for r in hosted:
        cells = []
        for e in r["each_repeat"]:
            h = e.get("host") or {}
            cells.append(f"{e['ops_per_sec']:,.0f} ({h.get('steal_ms')}, {h.get('involuntary_switches')}, {h.get('cpu_per_op_us')})")
        print(f"| {r['preset']} | {r['inflight']} | {r['coalesce']} | {'; '.join(cells)} |")
