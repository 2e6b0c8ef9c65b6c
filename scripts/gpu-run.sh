#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, after scripts/gpu-prepare.sh filled carry/.
# One command does everything that must be measured side by side:
#   1. the GPU tests (and the CPU unit/pool tests) from carry/tests;
#   2. the anchor mq.cu (tuned CUDA C++), then multiq's same multi-queue test, same presets,
#      threads, scenarios, inflight and ops per thread (300);
#   3. wait policies (spin, yield, block) and CUDA_DEVICE_MAX_CONNECTIONS=32 vs the default 8;
#   4. the whole study (`multiq bench` on CUDA);
#   5. the anchor launch.cu (submission limits; the coalescing ceiling).
# Everything lands in results.tgz (plus summary.txt) under $OUT (or the folder given).
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
res=$(mktemp -d)/res && mkdir -p "$res"
bin=carry/bin/multiq
iters=${ITERS:-1000}
repeat=${REPEAT:-3}
step() { echo "== $* ($(date -u +%T))" | tee -a "$res/summary.txt"; }

step environment
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi; nvcc --version | tail -2; uname -a; nproc; } > "$res/env.txt" 2>&1

step tests
for t in carry/tests/*; do echo "--- $t"; "$t" 2>&1; echo "exit $?"; done > "$res/tests.txt" 2>&1
grep -E "^test result|SKIPPED|FAILED|panicked" "$res/tests.txt" | tee -a "$res/summary.txt"

step build anchors
nvcc -O3 -use_fast_math -arch=sm_90 -o /tmp/mq carry/anchors/mq.cu -lpthread &&
nvcc -O3 -use_fast_math -arch=sm_90 -o /tmp/launch carry/anchors/launch.cu -lpthread || echo "anchor build failed" | tee -a "$res/summary.txt"

# Short runs are noisy on both sides: the anchor runs $repeat times (the ratio table takes the
# median per configuration), and multiq repeats the light and minimal runs $repeat times.
for i in $(seq 1 "$repeat"); do
  step "anchor mq.cu ($iters ops per thread), run $i"
  /tmp/mq "$iters" > "$res/anchor-mq-$i.txt" 2>&1
done
cp "$res/anchor-mq-1.txt" "$res/anchor-mq.txt"

step "multiq bench queues, same configurations (heavy, default)"
"$bin" bench queues --backend cuda --preset heavy,default --inflight 1,8 \
  --lock per-stream,none --iters "$iters" --json "$res/queues-heavy.json" > "$res/queues-heavy.txt" 2>&1
echo "exit $?" >> "$res/summary.txt"
step "multiq bench queues, same configurations (light, minimal; median of $repeat)"
"$bin" bench queues --backend cuda --preset light,minimal --inflight 1,8 --repeat "$repeat" \
  --lock per-stream,none --iters "$iters" --json "$res/queues-light.json" > "$res/queues-light.txt" 2>&1
echo "exit $?" >> "$res/summary.txt"
python3 scripts/ratios.py "$res/queues-heavy.json" "$res/queues-light.json" \
  $(for i in $(seq 1 "$repeat"); do echo --anchor "$res/anchor-mq-$i.txt"; done) > "$res/queues.md" 2>&1
tail -n 12 "$res/queues.md" >> "$res/summary.txt"

for w in spin yield block; do
  step "wait policy $w (light, minimal; per-thread; lock none)"
  "$bin" bench queues --backend cuda --wait $w --preset light,minimal --inflight 1,8 --lock none \
    --scenario per-thread --iters "$iters" --json "$res/wait-$w.json" > "$res/wait-$w.txt" 2>&1
  echo "exit $?" >> "$res/summary.txt"
done

step "CUDA_DEVICE_MAX_CONNECTIONS=32 (light, minimal; per-thread; lock none)"
CUDA_DEVICE_MAX_CONNECTIONS=32 "$bin" bench queues --backend cuda --preset light,minimal \
  --inflight 1,8 --lock none --scenario per-thread --iters "$iters" \
  --json "$res/conn32.json" > "$res/conn32.txt" 2>&1
echo "exit $?" >> "$res/summary.txt"

step "multiq bench (the study) on CUDA"
"$bin" bench --backend cuda --json "$res/study.json" > "$res/study.txt" 2>&1
echo "exit $?" >> "$res/summary.txt"
tail -n 12 "$res/study.txt" >> "$res/summary.txt"

step "anchor launch.cu"
for s in auto spin yield block; do SCHED=$s /tmp/launch; done > "$res/anchor-launch.txt" 2>&1
CUDA_DEVICE_MAX_CONNECTIONS=32 SCHED=auto /tmp/launch >> "$res/anchor-launch.txt" 2>&1

step done
tar czf "$out/results.tgz" -C "$(dirname "$res")" res
cp "$res/summary.txt" "$out/summary.txt"
