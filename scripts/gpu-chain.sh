#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here):
#   run(command="bash scripts/gpu-chain.sh \"$OUT\"", carry=["carry"])
# The device queue's chaining (MULTIQ_QUEUE_CHAIN=1: an op whose one pending dependency is the
# previous op on its buffer runs each chunk right after that op's same chunk, on the same
# block) against the queue as it is, in one call (about 2 minutes):
#   1. the GPU tests' device-queue cases with chaining on (tests-chain.txt), after the whole
#      GPU test binary as built (tests.txt);
#   2. minimal at 16 threads, a wait per op and 8 in flight, `off` / `persistent` /
#      `persistent` chained, interleaved over 3 rounds (chunks of CHUNK_TILES tiles, default
#      "2 4"), and light with 8 in flight;
#   3. a queue trace of minimal, 16 threads, 8 in flight, chained (scripts/queue-trace.py);
#   4. optional (MLP_LOOPS=N): the gpu_mlp test binary N times, under gdb where there is one.
# Writes bench-*.json/txt, trace*, summary.txt into OUTDIR, packed as chain.tgz.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$out/env.txt"
timeout 240 carry/tests/gpu > "$out/tests.txt" 2>&1; echo "gpu tests: exit $?" >> "$out/tests.txt"
MULTIQ_QUEUE_CHAIN=1 timeout 120 carry/tests/gpu device_queue > "$out/tests-chain.txt" 2>&1
echo "gpu device_queue tests, chained: exit $?" >> "$out/tests-chain.txt"
grep -h -E "^test result|FAILED|panicked|exit|^chain (true|false)" "$out/tests.txt" "$out/tests-chain.txt" | tee "$out/tests-summary.txt"
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet)
run() { local name=$1; shift; timeout 100 "$bin" "${q[@]}" "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" | tee -a "$out/errors.txt"; }
for round in 1 2 3; do
  run bench-off-$round --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce off
  for ct in ${CHUNK_TILES:-2 4}; do
    MULTIQ_QUEUE_CHUNK_TILES=$ct run bench-queue-t$ct-$round --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce persistent
    MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHUNK_TILES=$ct run bench-chain-t$ct-$round --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce persistent
  done
done
run bench-light-queue --preset light --threads 16 --iters 300 --inflight 8 --coalesce off,persistent
MULTIQ_QUEUE_CHAIN=1 run bench-light-chain --preset light --threads 16 --iters 300 --inflight 8 --coalesce persistent
MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_TRACE="$out/trace-chain-if8" MULTIQ_QUEUE_TRACE_FROM=3000 timeout 100 "$bin" "${q[@]}" \
  --preset minimal --iters 4000 --coalesce persistent --threads 16 --inflight 8 --json "$out/trace-chain-if8.json" \
  > "$out/trace-chain-if8.txt" 2>&1 || echo "trace: exit $?" | tee -a "$out/errors.txt"
python3 scripts/queue-trace.py "$out"/trace-chain-if8-[0-9].csv > "$out/trace.txt" 2>&1
# Optional (MLP_LOOPS=N): the gpu_mlp test binary N times in a row, each under gdb where the
# machine has it (a backtrace of every thread on a crash): it crashed once (SIGSEGV) in 2026-12.
for i in $(seq 1 "${MLP_LOOPS:-0}"); do
  if command -v gdb > /dev/null; then
    timeout 120 gdb -q -batch -ex run -ex "thread apply all bt 12" --args carry/tests/gpu_mlp > "$out/mlp-$i.txt" 2>&1
  else
    timeout 120 carry/tests/gpu_mlp > "$out/mlp-$i.txt" 2>&1
  fi
  echo "gpu_mlp run $i: exit $? $(grep -c -e SIGSEGV -e 'signal' "$out/mlp-$i.txt") signal lines" | tee -a "$out/tests-summary.txt"
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench-*.json")):
    for r in json.load(open(f))["runs"]:
        c = r.get("coalesce_stats") or {}
        print(f"{f.split('/')[-1]:<24} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<10} {r['threads']:>2}T "
              f"{r['ops_per_sec']:>11,.0f} ops/s p50 {r['latency_us']['p50']:7.1f} p99 {r['latency_us']['p99']:7.1f} us "
              f"chained {c.get('chained', 0):>7} of {c.get('ops', 0):>7} verified={r['verified']}")
PY
# Medians over the rounds, and the ratios the decision rests on (chained against the queue as
# it is and against `off`, each at the same chunk size and depth).
python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import glob, json, re, statistics, sys
cells = {}
for f in glob.glob(sys.argv[1] + "/bench-*-[0-9].json"):
    variant = re.sub(r"-\d+$", "", f.split("/")[-1][len("bench-"):-len(".json")])
    for r in json.load(open(f))["runs"]:
        cells.setdefault((variant, r["inflight"]), []).append(r["ops_per_sec"])
med = {k: statistics.median(v) for k, v in cells.items()}
print("\nmedian over rounds (minimal, 16 threads):")
for (variant, inflight), m in sorted(med.items()):
    line = f"  {variant:<10} if{inflight}: {m:>11,.0f} ops/s ({len(cells[(variant, inflight)])} rounds)"
    off = med.get(("off", inflight))
    if off:
        line += f"  {m / off:5.2f}x off"
    if variant.startswith("chain-"):
        queue = med.get(("queue-" + variant[len("chain-"):], inflight))
        if queue:
            line += f"  {m / queue:5.2f}x the queue unchained"
    if inflight == 8:
        line += f"  ({m / 2e6:4.2f} of the 2M target)"
    elif inflight == 1:
        line += f"  ({m / 9e5:4.2f} of the 900k target)"
    print(line)
PY
cat "$out/trace.txt" >> "$out/summary.txt"
cd "$out" && tar czf chain.tgz *.csv *.json *.txt 2>/dev/null; rm -f *.csv *.json $(ls *.txt | grep -v -e summary -e trace.txt -e errors -e tests)
