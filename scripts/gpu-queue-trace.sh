#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here):
#   run(command="bash scripts/gpu-queue-trace.sh \"$OUT\"", carry=["carry"])
# The device queue's (coalescing `persistent`) timeline: one cycle of an op, leg by leg
# (scripts/queue-trace.py), for the minimal op: 1 thread with every op queued, 16 threads with
# a wait per op, 16 threads with 8 in flight each. Then bench cells at 1, 4 and 16 threads
# next to `off`, routed as built (the queue from 8 other ops in flight) and with every op
# queued (MULTIQ_QUEUE_MIN_LOAD=0); with CHUNK_TILES="2 4" also those chunk sizes at 16
# threads (MULTIQ_QUEUE_CHUNK_TILES); light at 16 threads. With TESTS=1 it first runs the GPU
# test binaries (tests.txt). Writes trace-*.csv, trace.txt, bench-*.json/txt, summary.txt
# into OUTDIR, packed as results.tgz.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$out/env.txt"
if [ "${TESTS:-0}" = 1 ]; then
  for t in carry/tests/gpu carry/tests/coalesce carry/tests/unit; do echo "--- $t"; timeout 300 "$t" 2>&1; echo "exit $?"; done > "$out/tests.txt" 2>&1
  grep -E "^test result|FAILED|panicked|^exit" "$out/tests.txt" | tee "$out/tests-summary.txt"
fi
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet)
# 1 thread with every op queued (the router sends a lone thread's ops to launches), 16 threads
# with a wait per op, 16 threads with 8 ops in flight each.
trace() { local name=$1; shift
  MULTIQ_QUEUE_TRACE="$out/trace-$name" MULTIQ_QUEUE_TRACE_FROM=3000 timeout 120 "$bin" "${q[@]}" \
    --preset minimal --iters 4000 --coalesce persistent "$@" --json "$out/trace-$name.json" > "$out/trace-$name.txt" 2>&1 \
    || echo "trace $name: exit $?" | tee -a "$out/errors.txt"
}
MULTIQ_QUEUE_MIN_LOAD=0 trace 1t --threads 1
trace 16t --threads 16
trace 16t-if8 --threads 16 --inflight 8
python3 scripts/queue-trace.py "$out"/trace-*-[0-9].csv | tee "$out/trace.txt"
run() { local name=$1; shift; timeout 150 "$bin" "${q[@]}" --repeat 3 "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" | tee -a "$out/errors.txt"; }
run bench-full --preset minimal --threads 1,4,16 --iters 2000 --inflight 1,8 --coalesce off,persistent
MULTIQ_QUEUE_MIN_LOAD=0 run bench-all-queued --preset minimal --threads 1,4,16 --iters 2000 --inflight 1,8 --coalesce persistent
for ct in ${CHUNK_TILES:-}; do
  MULTIQ_QUEUE_CHUNK_TILES=$ct run bench-tiles-$ct --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce persistent
done
run bench-light --preset light --threads 16 --iters 300 --inflight 1 --coalesce off,persistent
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench-*.json")):
    for r in json.load(open(f))["runs"]:
        print(f"{f.split('/')[-1]:<16} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<10} {r['threads']:>2}T "
              f"{r['ops_per_sec']:>11,.0f} ops/s [{r['ops_per_sec_min']:,.0f}-{r['ops_per_sec_max']:,.0f}] p50 {r['latency_us']['p50']:7.1f} p99 {r['latency_us']['p99']:7.1f} us verified={r['verified']}")
PY
cd "$out" && tar czf results.tgz *.csv *.json *.txt && rm -f *.csv *.json $(ls *.txt | grep -v -e summary -e trace.txt -e errors)
