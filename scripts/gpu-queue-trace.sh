#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here):
#   run(command="bash scripts/gpu-queue-trace.sh \"$OUT\"", carry=["carry"])
# The device queue's (coalescing `persistent`) timeline: one cycle of an op, leg by leg
# (scripts/queue-trace.py), for the minimal op with 1 and 16 threads waiting after every op,
# then the same cells measured next to `off` with the queue's grid as built (full occupancy)
# and with one block per multiprocessor (MULTIQ_QUEUE_BLOCKS_PER_SM=1: room for other kernels). Writes trace-*.csv, trace.txt,
# bench-*.json/txt, summary.txt into OUTDIR, packed as results.tgz.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$out/env.txt"
q=(bench queues --backend cuda --scenario per-thread --lock none --preset minimal --quiet)
for t in 1 16; do
  MULTIQ_QUEUE_TRACE="$out/trace-${t}t" MULTIQ_QUEUE_TRACE_FROM=3000 timeout 120 "$bin" "${q[@]}" \
    --threads $t --iters 4000 --coalesce persistent --json "$out/trace-${t}t.json" > "$out/trace-${t}t.txt" 2>&1 \
    || echo "trace ${t}t: exit $?" | tee -a "$out/errors.txt"
done
python3 scripts/queue-trace.py "$out"/trace-*t-*.csv | tee "$out/trace.txt"
run() { local name=$1; shift; timeout 150 "$bin" "${q[@]}" --repeat 3 "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" | tee -a "$out/errors.txt"; }
run bench-full --threads 1,4,16 --iters 2000 --inflight 1,8 --coalesce off,persistent
MULTIQ_QUEUE_BLOCKS_PER_SM=1 run bench-one-block --threads 1,4,16 --iters 2000 --inflight 1,8 --coalesce persistent
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench-*.json")):
    for r in json.load(open(f))["runs"]:
        print(f"{f.split('/')[-1]:<16} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<10} {r['threads']:>2}T "
              f"{r['ops_per_sec']:>11,.0f} ops/s [{r['ops_per_sec_min']:,.0f}-{r['ops_per_sec_max']:,.0f}] p50 {r['latency_us']['p50']:7.1f} p99 {r['latency_us']['p99']:7.1f} us verified={r['verified']}")
PY
cd "$out" && tar czf results.tgz *.csv *.json *.txt && rm -f *.csv *.json $(ls *.txt | grep -v -e summary -e trace.txt -e errors)
