#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here): cross-thread coalescing measured
# side by side with the anchors, in one command. Results: $OUT/coalesce.tgz + summary
# ($OUT/coalesce/ unpacked if the call ran out of time before the end).
#   1. multiq, stream per thread, lock none: coalesce off / fixed / adaptive / persistent,
#      inflight 1 and 8, 1-16 threads: minimal, then light, each the median of SMALL_REPEAT
#      (default 3) interleaved rounds of SMALL_ITERS ops per thread (default 10,000), merged
#      into coalesce-small.json; then heavy and default at 1 and 16 threads;
#   2. anchors: mq.cu (one launch per op) and launch.cu (the coalesced-launch ceiling);
#   3. tests (GPU + CPU unit/pool/coalesce) from carry/tests (or TESTS_DONE's output);
#   4. depth 1 (fixed) and wait yield (off, fixed, persistent) at 16 threads (EXTRA=0 skips it).
# Why this order: in three H100 calls of 2026-12-05 the hypervisor's steal grew through the
# call under sustained load (clean for the first minute or so, then hundreds of ms per run at
# 16 threads: bench/results/h100/README.md), and a 16-thread run lasts until its last thread,
# so a stolen CPU lowers the whole run. The short minimal cells, the targets closest to the
# device's limit, go first. (A host with steal from the start, as in the call at d418b7c, is
# not helped.) Within each grid the modes stay interleaved round by round, so every ratio
# compares runs made side by side.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
# Written straight under OUTDIR, so a call that runs out of time still brings back every step
# done so far (OUTDIR/coalesce/); the finished call packs it into OUTDIR/coalesce.tgz.
res=$out/coalesce && mkdir -p "$res"
bin=carry/bin/multiq
# Ops per thread for minimal and light. At 1,000 a cell could last 6 ms (1 thread, minimal,
# 8 in flight), and its off/persistent ratio moved between 0.81 and 1.15 from call to call
# although both modes launch a lone thread's ops the same way. 10,000 makes every cell last
# about 50 ms or more.
small_iters=${SMALL_ITERS:-10000}
step() { echo "== $* ($(date -u +%T))" | tee -a "$res/summary.txt"; }

step environment
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi
  echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2> /dev/null)"; } > "$res/env.txt" 2>&1
common=(--backend cuda --scenario per-thread --lock none --coalesce off,fixed,adaptive,persistent --inflight 1,8)
step "multiq minimal, then light (median of ${SMALL_REPEAT:-3} each)"
. scripts/gpu-clocks.sh
gpu_clocks_start "$res/gpu-clocks.csv"
for preset in minimal light; do
  timeout 300 "$bin" bench queues "${common[@]}" --preset $preset --iters "$small_iters" --repeat "${SMALL_REPEAT:-3}" \
    --json "$res/small-$preset.json" > "$res/small-$preset.txt" 2>&1; echo "exit $?" >> "$res/summary.txt"
done
gpu_clocks_stop
python3 scripts/merge-runs.py "$res/small-minimal.json" "$res/small-light.json" > "$res/coalesce-small.json"
cat "$res/small-minimal.txt" "$res/small-light.txt" > "$res/coalesce-small.txt"
# Every repeat beside the host's counters and the GPU's clocks while it ran.
python3 scripts/runs-beside-gpu.py --clocks "$res/gpu-clocks.csv" "$res/coalesce-small.json" > "$res/runs.txt" 2>&1
step "multiq heavy, default (1 and 16 threads)"
timeout 150 "$bin" bench queues "${common[@]}" --preset heavy,default --threads 1,16 --iters 300 \
  --json "$res/coalesce-large.json" > "$res/coalesce-large.txt" 2>&1; echo "exit $?" >> "$res/summary.txt"
step anchors
nvcc -O3 -use_fast_math -arch=sm_90 -o /tmp/mq carry/anchors/mq.cu -lpthread
nvcc -O3 -use_fast_math -arch=sm_90 -o /tmp/launch carry/anchors/launch.cu -lpthread
/tmp/mq 1000 > "$res/anchor-mq.txt" 2>&1
SCHED=auto /tmp/launch > "$res/anchor-launch.txt" 2>&1
cat "$res/anchor-launch.txt" >> "$res/summary.txt"

step tests
if [ -n "${TESTS_DONE:-}" ]; then
  # The calling script ran them first in the same call (TESTS_DONE names their output).
  cp "$TESTS_DONE" "$res/tests.txt"
else
  bash scripts/gpu-tests.sh > "$res/tests.txt" 2>&1
fi
grep -E "^test result|FAILED|panicked|^exit [^0]" "$res/tests.txt" | tee -a "$res/summary.txt"

if [ "${EXTRA:-1}" = 1 ]; then  # EXTRA=0 skips this step (a call short of device time)
step "depth 1, and wait yield (minimal, light, default; 16 threads)"
for d in 1; do
  "$bin" bench queues --backend cuda --scenario per-thread --lock none --coalesce fixed --coalesce-depth $d \
    --inflight 1,8 --preset minimal,light,default --threads 16 --iters 1000 --repeat 3 \
    --json "$res/depth-$d.json" > "$res/depth-$d.txt" 2>&1; echo "exit $?" >> "$res/summary.txt"
done
"$bin" bench queues --backend cuda --wait yield --scenario per-thread --lock none --coalesce off,fixed,persistent \
  --inflight 1,8 --preset minimal,light --threads 16 --iters 1000 --repeat 3 \
  --json "$res/wait-yield.json" > "$res/wait-yield.txt" 2>&1; echo "exit $?" >> "$res/summary.txt"
fi
# Optional (CHUNK_TILES="1 2 4"): the device queue's chunk size on a busy device, minimal at 16
# threads, the variants interleaved over 3 rounds (MULTIQ_QUEUE_CHUNK_TILES, diagnostics).
for round in 1 2 3; do
  for ct in ${CHUNK_TILES:-}; do
    MULTIQ_QUEUE_CHUNK_TILES=$ct "$bin" bench queues --backend cuda --scenario per-thread --lock none \
      --coalesce persistent --inflight 1,8 --preset minimal --threads 16 --iters 2000 \
      --json "$res/tiles-$ct-$round.json" > "$res/tiles-$ct-$round.txt" 2>&1; echo "exit $?" >> "$res/summary.txt"
  done
done
python3 - "$res" >> "$res/summary.txt" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for r in json.load(open(f))["runs"]:
        if r["threads"] in (1, 16):
            print(f"{f.split('/')[-1]:<22} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<8} {r['threads']:>2}T "
                  f"{r['ops_per_sec']:>12,.0f} ops/s  p50 {r['latency_us']['p50']:8.1f}  p99 {r['latency_us']['p99']:8.1f} us  ops/launch {r['ops_per_launch']:5.1f} d{r.get('coalesce_depth', 0)} {r['wait']} verified={r['verified']}")
            c = r.get("coalesce_stats")
            if c:
                print(f"{'':24} per batch: pending {c['pending_us']:.1f} us, launch call {c['launch_us']:.1f} us, launch to seen complete {c['complete_us']:.1f} us")
PY
cp "$res/summary.txt" "$out/summary.txt"
tar czf "$out/coalesce.tgz" -C "$out" coalesce && rm -rf "$res"
