#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here): a quick look at coalescing on
# the issue's target cells (16 threads, per-thread streams, lock none), with a depth sweep,
# and the GPU tests. A few minutes; the full, recorded run is scripts/gpu-coalesce.sh.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$out/env.txt"
echo "== tests"
for t in gpu coalesce; do timeout 300 carry/tests/$t 2>&1 | tail -4; done | tee "$out/tests.txt"
nvcc -O3 -use_fast_math -arch=sm_90 -o /tmp/launch carry/anchors/launch.cu -lpthread &&
  SCHED=auto /tmp/launch > "$out/anchor-launch.txt" 2>&1
q=(bench queues --backend cuda --scenario per-thread --lock none --repeat 3)
"$bin" "${q[@]}" --preset minimal --threads 1,16 --iters 2000 --inflight 1,8 --coalesce off \
  --json "$out/off.json" > "$out/off.txt" 2>&1
for d in 1 2; do
  "$bin" "${q[@]}" --preset minimal --threads 1,16 --iters 2000 --inflight 1,8 --coalesce fixed \
    --coalesce-depth $d --json "$out/fixed-d$d.json" > "$out/fixed-d$d.txt" 2>&1
done
"$bin" "${q[@]}" --preset light,default --threads 16 --iters 300 --coalesce off,fixed,adaptive \
  --json "$out/larger.json" > "$out/larger.txt" 2>&1
"$bin" "${q[@]}" --preset minimal,light,default --threads 16 --iters 300 --coalesce fixed \
  --coalesce-depth 1 --json "$out/larger-d1.json" > "$out/larger-d1.txt" 2>&1
for w in yield; do
  "$bin" "${q[@]}" --wait $w --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce off,fixed \
    --json "$out/wait-$w.json" > "$out/wait-$w.txt" 2>&1
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for r in json.load(open(f))["runs"]:
        print(f"{f.split('/')[-1]:<14} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<6} d{r.get('coalesce_depth',0)} {r['threads']:>2}T "
              f"{r['ops_per_sec']:>11,.0f} ops/s [{r['ops_per_sec_min']:,.0f}-{r['ops_per_sec_max']:,.0f}] p50 {r['latency_us']['p50']:7.1f} p99 {r['latency_us']['p99']:7.1f} us "
              f"ops/launch {r['ops_per_launch']:5.1f} {r.get('coalesce_completion','')} {r['wait']} verified={r['verified']}")
        c = r.get("coalesce_stats")
        if c: print(f"{'':14} breakdown per batch: pending {c['pending_us']:.1f} us, launch call {c['launch_us']:.1f} us, launch->seen complete {c['complete_us']:.1f} us ({c['timed_batches']} timed)")
PY
grep -E "batch|ops/s" "$out/anchor-launch.txt" | head -20
cd "$out" && tar czf results.tgz *.json *.txt && rm -f *.json $(ls *.txt | grep -v summary)
