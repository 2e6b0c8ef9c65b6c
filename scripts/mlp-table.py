#!/usr/bin/env python3
"""matmul.md and mlp.md: multiq's bench matmul / bench mlp beside PyTorch's torch_mt.py output,
measured in the same run, with the ratios and issue 5's targets checked from the numbers.

usage: mlp-table.py --matmul matmul.json --mlp mlp.json --anchor anchor-torch.txt --out-dir DIR

Every figure comes from the files given (multiq's JSON rows, torch_mt.py's lines); a target
line says PASS or FAIL with the numbers that decide it. Prints a short summary on stdout.
"""
import argparse
import json
import re
import sys

THREADS = [1, 2, 4, 8, 16]


def parse_torch(path):
    mm, sweep, mlp_threads, header = {}, {}, {}, ""
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("torch "):
            header = line
        m = re.match(r"matmul(\d+) (per-thread-stream|default-stream)\s+(.*?)\s+max-scaling", line)
        if m:
            vals = dict((int(k), float(v)) for k, v in re.findall(r"(\d+)T=([\d.]+)", m.group(3)))
            mm[(int(m.group(1)), m.group(2))] = vals
            continue
        m = re.match(r"mlp batch=\s*(\d+) latency=([\d.]+)ms throughput=([\d.]+) samples/s", line)
        if m:
            sweep[int(m.group(1))] = (float(m.group(2)) * 1000.0, float(m.group(3)))
            continue
        m = re.match(r"mlp batch1 per-thread-stream\s+(.*?)\s+max-scaling", line)
        if m:
            mlp_threads = dict((int(k), float(v)) for k, v in re.findall(r"(\d+)T=([\d.]+)", m.group(1)))
    return header, mm, sweep, mlp_threads


def rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, data.get("runs", []) + data.get("workloads", [])


def fmt(v):
    return "-" if v is None else f"{v:,.0f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


def verdict(ok):
    return "PASS" if ok else "FAIL"


def matmul_md(data, runs, header, torch_mm):
    out = [f"# matmul: multiq vs PyTorch, fp32 C = A·B, a wait per product (same GPU, same run)", "",
           f"multiq: `{data.get('command', '')}` at {data.get('git_commit', '')} on {data.get('device', '')}, "
           f"{data.get('started_at', '')}. PyTorch: `python3 torch_mt.py` ({header}).", "",
           "ops/s. per-thread = a stream per thread, shared = one stream (PyTorch: default stream), "
           "coalesced = multiq's coalescer (products merged into batched launches), limit = one thread "
           "launching large batches of products (the device's GEMM rate for that size, measured here). "
           "Ratio = best multiq / PyTorch per-thread-stream.", ""]
    sizes = sorted({r["size"] for r in runs if r.get("workload") == "matmul" and r.get("size")})
    targets = []
    for n in sizes:
        def get(scenario, t):
            for r in runs:
                if r.get("workload") == "matmul" and r.get("size") == n and r["scenario"] == scenario and r["threads"] == t:
                    return r
            return None
        limit = next((r for r in runs if r.get("workload") == "matmul" and r.get("size") == n and r["scenario"] == "limit"), None)
        tp = torch_mm.get((n, "per-thread-stream"), {})
        td = torch_mm.get((n, "default-stream"), {})
        out.append(f"## {n}×{n}" + (f" (limit: {fmt(limit['ops_per_sec'])} ops/s, {limit['ops_per_launch']:.0f} per launch, "
                                     f"{limit['flops_per_sec'] / 1e12:.1f} TFLOP/s)" if limit else ""))
        out.append("")
        out.append("| threads | torch per-thread | torch default | multiq per-thread | multiq shared | multiq coalesced (per launch) | p99 µs (coalesced) | best / torch |")
        out.append("|---|---|---|---|---|---|---|---|")
        for t in THREADS:
            p, s, c = get("per-thread", t), get("shared", t), get("coalesced", t)
            best = max([r["ops_per_sec"] for r in (p, s, c) if r] or [0]) or None
            co = "-" if not c else f"{fmt(c['ops_per_sec'])} ({c['ops_per_launch']:.1f})"
            p99 = "-" if not c else f"{c['latency_us']['p99']:.0f}"
            out.append(f"| {t} | {fmt(tp.get(t))} | {fmt(td.get(t))} | {fmt(p and p['ops_per_sec'])} | "
                       f"{fmt(s and s['ops_per_sec'])} | {co} | {p99} | {ratio(best, tp.get(t))} |")
        unverified = [r for r in runs if r.get("workload") == "matmul" and r.get("size") == n and not r.get("verified", True)]
        if unverified:
            out.append(f"\n**{len(unverified)} run(s) of this size failed the float64 check.**")
        errs = [r["max_error"] for r in runs if r.get("workload") == "matmul" and r.get("size") == n]
        if errs:
            bound = next(r["error_bound"] for r in runs if r.get("workload") == "matmul" and r.get("size") == n)
            out.append(f"\nNumerics: largest |C − C64| / (|A|·|B|) over the sampled rows of every run: {max(errs):.2e} "
                       f"(bound {bound:.2e} = 2·k·2⁻²⁴).")
        out.append("")
        best16 = max([r["ops_per_sec"] for r in (get("per-thread", 16), get("shared", 16), get("coalesced", 16)) if r] or [0])
        t16 = tp.get(16)
        if n == 64:
            targets.append((f"64²: ≥ 380,000 ops/s at 16 threads", best16 >= 380_000, f"{best16:,.0f}"))
        if n == 256:
            targets.append((f"256²: ≥ 325,000 ops/s at 16 threads (≥ 10× PyTorch)", best16 >= 325_000,
                            f"{best16:,.0f}; PyTorch {fmt(t16)} ({ratio(best16, t16)}x)"))
        if n == 1024:
            lim = limit["ops_per_sec"] if limit else None
            ok = lim is not None and best16 >= 0.95 * lim and (t16 is None or best16 >= t16)
            targets.append((f"1024²: ≥ 0.95 × the GEMM limit and ≥ PyTorch at 16 threads", ok,
                            f"{best16:,.0f} = {ratio(best16, lim)} of limit {fmt(lim)}; PyTorch {fmt(t16)}"))
        if n == 4096:
            targets.append((f"4096²: ≥ PyTorch at 16 threads", t16 is not None and best16 >= t16,
                            f"{best16:,.0f} vs {fmt(t16)}"))
    out.append("## Targets (16 threads, a wait per product)")
    out.append("")
    for name, ok, why in targets:
        out.append(f"- {verdict(ok)}: {name}: {why}")
    return "\n".join(out) + "\n", targets


def mlp_md(data, runs, header, sweep, mlp_threads):
    out = [f"# MLP 512→1024→1024→512: multiq vs PyTorch (same GPU, same run)", "",
           f"multiq: `{data.get('command', '')}` at {data.get('git_commit', '')} on {data.get('device', '')}, "
           f"{data.get('started_at', '')}. PyTorch: `python3 torch_mt.py` ({header}).", "",
           "## Batch sweep (one thread, input on the device, a wait per forward)", "",
           "| batch | torch latency ms | torch samples/s | multiq latency ms (mean) | multiq p99 ms | multiq samples/s | ratio |",
           "|---|---|---|---|---|---|---|"]
    targets = []
    worst = None
    for r in sorted((r for r in runs if r.get("workload") == "mlp" and r["scenario"] == "sweep"), key=lambda r: r["batch"]):
        bs = r["batch"]
        tl, ts = sweep.get(bs, (None, None))
        ours = r["samples_per_sec"]
        out.append(f"| {bs} | {'-' if tl is None else f'{tl / 1000:.3f}'} | {fmt(ts)} | {r['latency_mean_us'] / 1000:.3f} | "
                   f"{r['latency_us']['p99'] / 1000:.3f} | {fmt(ours)} | {ratio(ours, ts)} |")
        if ts:
            worst = min(worst, ours / ts) if worst is not None else ours / ts
            targets.append((f"sweep batch {bs}: ≥ PyTorch", ours >= ts, f"{ours:,.0f} vs {ts:,.0f}"))
    out += ["", "## Batch-1 requests from many threads (Model::infer; host input and output)", "",
            "PyTorch: a stream per thread, `mlp(x)` with x on the device, synchronize per request. multiq: "
            "each request copies its row to the device and its output back; dynamic batching merges "
            "concurrent requests into one forward (rows per forward in brackets).", "",
            "| threads | torch samples/s | multiq off | p50/p99 µs | multiq on (rows/forward) | p50/p99 µs | on / torch |",
            "|---|---|---|---|---|---|---|"]

    def get(c, t):
        return next((r for r in runs if r.get("workload") == "mlp" and r["scenario"] == "threads" and r["coalesce"] == c and r["threads"] == t), None)

    for t in THREADS:
        off, on = get("off", t), get("on", t)
        tt = mlp_threads.get(t)
        cell = lambda r: "-" if not r else f"{r['latency_us']['p50']:.0f} / {r['latency_us']['p99']:.0f}"
        on_cell = "-" if not on else f"{fmt(on['samples_per_sec'])} ({on['ops_per_launch']:.1f})"
        out.append(f"| {t} | {fmt(tt)} | {fmt(off and off['samples_per_sec'])} | {cell(off)} | "
                   f"{on_cell} | {cell(on)} | {ratio(on and on['samples_per_sec'], tt)} |")
    on16 = get("on", 16)
    if on16:
        ok = on16["samples_per_sec"] >= 265_000 and on16["latency_us"]["p99"] <= 1000
        targets.insert(0, ("batch-1 requests from 16 threads, dynamic batching: ≥ 265,000 samples/s with p99 ≤ 1 ms", ok,
                           f"{on16['samples_per_sec']:,.0f} samples/s, p99 {on16['latency_us']['p99']:.0f} µs; "
                           f"PyTorch {fmt(mlp_threads.get(16))} ({ratio(on16['samples_per_sec'], mlp_threads.get(16))}x)"))
    bad = [r for r in runs if r.get("workload") == "mlp" and not r.get("verified", True)]
    errs = [r["max_error"] for r in runs if r.get("workload") == "mlp"]
    if errs:
        out.append(f"\nNumerics: largest normwise relative error against float64 over every run's checked rows: "
                   f"{max(errs):.2e} (bound {runs[0].get('error_bound', 0):.0e}); {len(bad)} run(s) failed.")
    out += ["", "## Targets", ""]
    for name, ok, why in targets:
        out.append(f"- {verdict(ok)}: {name}: {why}")
    return "\n".join(out) + "\n", targets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matmul", required=True)
    ap.add_argument("--mlp", required=True)
    ap.add_argument("--anchor", required=True)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    header, torch_mm, sweep, mlp_threads = parse_torch(a.anchor)
    if not torch_mm and not sweep:
        print(f"warning: no PyTorch figures found in {a.anchor}", file=sys.stderr)
    data, runs = rows(a.matmul)
    md, t1 = matmul_md(data, runs, header, torch_mm)
    open(f"{a.out_dir}/matmul.md", "w").write(md)
    data, runs = rows(a.mlp)
    md, t2 = mlp_md(data, runs, header, sweep, mlp_threads)
    open(f"{a.out_dir}/mlp.md", "w").write(md)
    for name, ok, why in t1 + t2:
        print(f"{verdict(ok)}: {name}: {why}")


if __name__ == "__main__":
    main()
