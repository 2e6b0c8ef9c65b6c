#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here):
#   run(command="bash scripts/gpu-chain.sh \"$OUT\"", carry=["carry"])
# The device queue's chaining (MULTIQ_QUEUE_CHAIN=1: an op whose one pending dependency is the
# previous op on its buffer runs each chunk right after that op's same chunk, on the same
# block) against the queue as it is, in one call (about 3 minutes):
#   1. the GPU tests as built (tests.txt), then their device-queue cases with chaining on, in
#      each variant below (tests-chain-*.txt);
#   2. minimal at 16 threads, a wait per op and 8 in flight, interleaved over 3 rounds (ROUNDS):
#        off        coalescing off
#        queue      the device queue (`persistent`), unchained
#        chain      chained, each block counting a chunk before it starts the successor's
#                   (MULTIQ_QUEUE_CHAIN_EARLY=0)
#        early      chained, a block starting a parked successor's chunk while it counts
#        early-c4   as early, chained ops in chunks of at least 4 tiles
#                   (MULTIQ_QUEUE_CHAIN_TILES=4: 16 chains of 16 chunks are 256 chunk
#                   streams, about one per compute block of the H200's 263; 2-tile chunks make 512)
#      and light with 8 in flight: off, queue, early, early-c4;
#   3. a queue trace of minimal, 16 threads, 8 in flight, early-c4 (scripts/queue-trace.py);
#   4. optional (MLP_LOOPS=N): the gpu_mlp test binary N times, under gdb where there is one.
# Writes bench-*.json/txt, trace*, summary.txt into OUTDIR, packed as chain.tgz.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$out/env.txt"
timeout 240 carry/tests/gpu > "$out/tests.txt" 2>&1; echo "gpu tests: exit $?" >> "$out/tests.txt"
# Each variant: its name and the environment that makes it.
variants=(
  "queue:"
  "chain:MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_EARLY=0"
  "early:MULTIQ_QUEUE_CHAIN=1"
  "early-c4:MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_TILES=4"
)
# A variant whose tests fail (or hang) is not benchmarked: its runs would fail or hang too,
# and the call's 10 minutes are better spent on the others.
declare -A passed=([queue]=1)
for v in "${variants[@]:1}"; do
  name=${v%%:*}
  env ${v#*:} timeout 60 carry/tests/gpu device_queue > "$out/tests-chain-$name.txt" 2>&1
  status=$?
  echo "gpu device_queue tests, $name: exit $status" >> "$out/tests-chain-$name.txt"
  if [ $status -eq 0 ]; then passed[$name]=1; else echo "$name: tests exit $status; not benchmarked" | tee -a "$out/errors.txt"; fi
done
grep -h -E "^test result|FAILED|panicked|exit|^chain (true|false)" "$out"/tests*.txt | tee "$out/tests-summary.txt"
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet)
# run NAME "ENV" ARGS...: one bench call, in the environment ENV (assignments; may be empty).
# Returns the call's status (after noting a failure in errors.txt).
run() {
  local name=$1 vars=$2 status; shift 2
  env $vars timeout 60 "$bin" "${q[@]}" "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1
  status=$?
  [ $status -eq 0 ] || echo "$name: exit $status" | tee -a "$out/errors.txt"
  return $status
}
minimal=(--preset minimal --threads 16 --iters 2000 --inflight 1,8)
for round in ${ROUNDS:-1 2 3}; do
  run bench-off-$round "" "${minimal[@]}" --coalesce off
  for v in "${variants[@]}"; do
    name=${v%%:*}
    [ -n "${passed[$name]:-}" ] || continue
    # A variant that fails or hangs once is not run again (nor in light or the trace).
    run "bench-$name-$round" "${v#*:}" "${minimal[@]}" --coalesce persistent ||
      { passed[$name]=""; echo "$name: dropped after a failed run" | tee -a "$out/errors.txt"; }
  done
done
light=(--preset light --threads 16 --iters 300 --inflight 8)
run bench-light-queue "" "${light[@]}" --coalesce off,persistent
[ -n "${passed[early]:-}" ] && run bench-light-early "MULTIQ_QUEUE_CHAIN=1" "${light[@]}" --coalesce persistent
[ -n "${passed[early-c4]:-}" ] && run bench-light-early-c4 "MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_TILES=4" "${light[@]}" --coalesce persistent
if [ -n "${passed[early-c4]:-}" ]; then
  MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_TILES=4 MULTIQ_QUEUE_TRACE="$out/trace-chain-if8" MULTIQ_QUEUE_TRACE_FROM=3000 timeout 100 "$bin" "${q[@]}" \
    --preset minimal --iters 4000 --coalesce persistent --threads 16 --inflight 8 --json "$out/trace-chain-if8.json" \
    > "$out/trace-chain-if8.txt" 2>&1 || echo "trace: exit $?" | tee -a "$out/errors.txt"
  python3 scripts/queue-trace.py "$out"/trace-chain-if8-[0-9].csv > "$out/trace.txt" 2>&1
fi
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
# Medians over the rounds, and the ratios the decision rests on (each variant against `off`
# and against the unchained queue, at the same depth).
python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import glob, json, re, statistics, sys
cells = {}
for f in glob.glob(sys.argv[1] + "/bench-*-[0-9].json"):
    variant = re.sub(r"-\d+$", "", f.split("/")[-1][len("bench-"):-len(".json")])
    for r in json.load(open(f))["runs"]:
        c = r.get("coalesce_stats") or {}
        cells.setdefault((variant, r["inflight"]), []).append((r["ops_per_sec"], c.get("chained", 0) / max(c.get("ops", 0), 1)))
med = {k: statistics.median(x for x, _ in v) for k, v in cells.items()}
print("\nmedian over rounds (minimal, 16 threads):")
for (variant, inflight), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    runs = cells[(variant, inflight)]
    line = f"  if{inflight} {variant:<9} {m:>11,.0f} ops/s ({len(runs)} rounds, chained {statistics.median(c for _, c in runs):4.0%})"
    off, queue = med.get(("off", inflight)), med.get(("queue", inflight))
    if off:
        line += f"  {m / off:5.2f}x off"
    if queue and variant not in ("off", "queue"):
        line += f"  {m / queue:5.2f}x queue"
    target = 2e6 if inflight == 8 else 9e5
    line += f"  ({m / target:4.2f} of the {'2M' if inflight == 8 else '900k'} target)"
    print(line)
PY
cat "$out/trace.txt" >> "$out/summary.txt" 2>/dev/null
cd "$out" && tar czf chain.tgz *.csv *.json *.txt 2>/dev/null; rm -f *.csv *.json $(ls *.txt | grep -v -e summary -e trace.txt -e errors -e tests)
