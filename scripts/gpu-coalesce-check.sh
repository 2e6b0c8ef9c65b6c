#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here): the two cells the recorded run
# at 8985bf7 missed, measured with longer runs and the modes interleaved over 3 rounds:
#   - 1 thread, minimal, 8 in flight, 20,000 ops (off, fixed, persistent; the recorded run's
#     1,000 ops lasted about 6 ms);
#   - 16 threads, light, a wait per op, 3,000 ops per thread (off, persistent).
# Results: $OUT/check.tgz + summary.txt (medians and every round).
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
res=$(mktemp -d)/check && mkdir -p "$res"
b=carry/bin/multiq
q=(bench queues --backend cuda --scenario per-thread --lock none)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
for r in 1 2 3; do
  "$b" "${q[@]}" --coalesce off,fixed,persistent --inflight 8 --preset minimal --threads 1 \
    --iters 20000 --json "$res/m1-$r.json" > "$res/m1-$r.txt" 2>&1; echo "m1 round $r exit $?" >> "$res/summary.txt"
  "$b" "${q[@]}" --coalesce persistent,off --inflight 1 --preset light --threads 16 \
    --iters 3000 --json "$res/l16-$r.json" > "$res/l16-$r.txt" 2>&1; echo "l16 round $r exit $?" >> "$res/summary.txt"
done
python3 - "$res" >> "$res/summary.txt" <<'PY'
import json, sys, glob, statistics
cells = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for r in json.load(open(f))["runs"]:
        key = (r["preset"], r["threads"], r["inflight"], r["coalesce"])
        cells.setdefault(key, []).append(r["ops_per_sec"])
        print(f"{f.split('/')[-1]:<10} {r['preset']:<8} {r['threads']:>2}T if{r['inflight']} {r['coalesce']:<10} "
              f"{r['ops_per_sec']:>12,.0f} ops/s  p99 {r['latency_us']['p99']:8.1f} us  verified={r['verified']}")
for key, v in sorted(cells.items()):
    off = cells.get(key[:3] + ("off",))
    ratio = statistics.median(v) / statistics.median(off) if off else float("nan")
    print(f"median {key[0]:<8} {key[1]:>2}T if{key[2]} {key[3]:<10} {statistics.median(v):>12,.0f} ops/s  "
          f"({len(v)} rounds)  {ratio:.3f} x off")
PY
tar czf "$out/check.tgz" -C "$(dirname "$res")" check
cp "$res/summary.txt" "$out/summary.txt"
cat "$out/summary.txt"
