#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here). Why 16 threads lose against 8:
# light at 16 threads ran at ~179k ops/s in every mode (and mq.cu's), 8 threads at ~193k;
# minimal with 8 in flight at 16 threads (persistent) no faster than at 8.
#   1. the host's CPUs (16 worker threads spinning on how many cores?);
#   2. light, 16 threads, a wait per op, coalescing off: a stream each (lock none) against
#      16 threads over 8 and over 4 streams (two/four threads share a stream, lock per-stream:
#      at most 8/4 light kernels on the device at once);
#   3. minimal, 8 in flight, persistent, 10,000 ops per thread: 8, 12, 15 and 16 threads,
#      wait spin and yield;
#   4. light, 16 threads, persistent with light ops sent to the device queue
#      (MULTIQ_QUEUE_MAX_ELEMENTS; by default an op that fills the device launches alone),
#      a wait per op and 8 in flight, against off.
# Results: $OUT/probe.tgz + summary.txt.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
res=$(mktemp -d)/probe && mkdir -p "$res"
b=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; nproc; lscpu; nvidia-smi -q | grep -i -A3 "clocks\b" | head -20; } > "$res/env.txt" 2>&1
q=(bench queues --backend cuda --scenario per-thread --quiet)
for r in 1 2 3; do
  "$b" "${q[@]}" --lock none --coalesce off --preset light --threads 8,16 --iters 3000 \
    --json "$res/light-s16-$r.json" > /dev/null 2>&1 || echo "light-s16 $r exit $?" >> "$res/summary.txt"
  for s in 8 4; do
    "$b" "${q[@]}" --lock per-stream --streams $s --coalesce off --preset light --threads 16 --iters 3000 \
      --json "$res/light-s$s-$r.json" > /dev/null 2>&1 || echo "light-s$s $r exit $?" >> "$res/summary.txt"
  done
  "$b" "${q[@]}" --lock none --coalesce off --preset light --threads 16 --iters 3000 --inflight 1,8 \
    --json "$res/light-off-$r.json" > /dev/null 2>&1 || echo "light-off $r exit $?" >> "$res/summary.txt"
  MULTIQ_QUEUE_MAX_ELEMENTS=1000000000 "$b" "${q[@]}" --lock none --coalesce persistent --preset light \
    --threads 16 --iters 3000 --inflight 1,8 \
    --json "$res/light-queued-$r.json" > /dev/null 2>&1 || echo "light-queued $r exit $?" >> "$res/summary.txt"
  for w in spin yield; do
    "$b" "${q[@]}" --lock none --wait $w --coalesce persistent --inflight 8 --preset minimal \
      --threads 8,12,15,16 --iters 10000 --json "$res/min8-$w-$r.json" > /dev/null 2>&1 || echo "min8-$w $r exit $?" >> "$res/summary.txt"
  done
done
python3 - "$res" >> "$res/summary.txt" <<'PY'
import json, sys, glob, statistics, re
cells = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    name = re.sub(r"-\d+\.json$", "", f.split("/")[-1])
    for r in json.load(open(f))["runs"]:
        key = (name, r["threads"], r["inflight"], r["wait"], r["coalesce"])
        cells.setdefault(key, []).append((r["ops_per_sec"], r["latency_us"]["p50"], r.get("streams_used")))
for key, v in sorted(cells.items()):
    ops = [x[0] for x in v]
    print(f"{key[0]:<12} {key[1]:>2}T if{key[2]} {key[3]:<5} {key[4]:<10} median {statistics.median(ops):>11,.0f} ops/s  "
          f"rounds {', '.join(f'{o:,.0f}' for o in ops)}  p50 {statistics.median(x[1] for x in v):.1f} us  streams {v[0][2]}")
PY
tar czf "$out/probe.tgz" -C "$(dirname "$res")" probe
cp "$res/summary.txt" "$res/env.txt" "$out/"
cat "$out/summary.txt"
