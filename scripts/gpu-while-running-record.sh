#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 6 minutes:
#   run(kind="nvidia-h100-x1", command="bash scripts/gpu-while-running-record.sh \"$OUT\"", carry=["carry"])
# 1. The pool's routing with MULTIQ_QUEUE_WHILE_RUNNING=on (small ops join the device queue
#    while its kernel is on the device and another stream has an op in flight, whatever the
#    load) against off (the default: fewer than 8 ops of other streams in flight launch alone,
#    and each such launch makes a busy queue kernel give the device up): persistent, minimal at
#    1, 4, 8, 15 and 16 threads, a wait per op and 8 in flight, 10,000 ops per thread,
#    interleaved over ROUNDS rounds (default 6).
# 2. Picks by the rule below (OUTDIR/choose/choice.txt), then scripts/gpu-coalesce.sh into
#    OUTDIR/record under the pick (tests included; without the depth and wait-yield step).
# Rule, stated before the call: on if, at 16 threads, its medians with a wait per op and with
# 8 in flight are both >= 1.03 x off's, and none of its other cells is below 0.97 x off's;
# otherwise off stays. A pick becomes the default in the code afterwards. Back here,
# `bash scripts/land-coalesce.sh FILES_AT` lands the record and the variants.
set -u -o pipefail
out=${1:-${OUT:-out}}
res=$out/choose
mkdir -p "$res"
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet --coalesce persistent
   --preset minimal --threads 1,4,8,15,16 --inflight 1,8 --iters 10000)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
echo "== variants ($(date -u +%T))"
. scripts/gpu-clocks.sh
gpu_clocks_start "$res/gpu-clocks.csv"
. scripts/gpu-variants.sh  # go NAME JSON ENV... -- ARGS... (2 minutes at most each)
for r in $(seq "${ROUNDS:-6}"); do
  [ $hung = 0 ] || break
  go "off $r" "$res/wr-off-$r.json" MULTIQ_QUEUE_WHILE_RUNNING=off -- "${q[@]}"
  go "on $r" "$res/wr-on-$r.json" MULTIQ_QUEUE_WHILE_RUNNING=on -- "${q[@]}"
done
gpu_clocks_stop
python3 scripts/runs-beside-gpu.py --clocks "$res/gpu-clocks.csv" "$res"/*-[0-9].json > "$res/runs.txt" 2>&1
PYTHONPATH=scripts python3 - "$res" <<'PY' > "$res/choice.txt"
import statistics, sys
from variant_runs import load
runs, ok = load(sys.argv[1])
cells = {}
for v, r in runs:
    per = r.get("per_thread") or {}
    # What the threads ran at, each over its own time (a run lasts until its last thread).
    fin = per.get("finished_ms") or []
    rate = sum(r["ops"] / r["threads"] / (x / 1e3) for x in fin if x > 0)
    cells.setdefault((v, r["threads"], r["inflight"]), []).append((r["ops_per_sec"], rate, r["coalesce_stats"]["launches"]))
print(f"verified: {ok} ({len(runs)} runs)")
med = {k: statistics.median(x[0] for x in v) for k, v in cells.items()}
for k in sorted(cells):
    x = cells[k]
    print(f"{k[0]:<7} {k[1]:>2}T if{k[2]}  median {med[k]:>11,.0f}  threads' own rates (median) {statistics.median(y[1] for y in x):>11,.0f}  "
          f"kernel launches {statistics.median(y[2] for y in x):>5.0f}  rounds {', '.join(f'{y[0]:,.0f}' for y in x)}")
rel = {k[1:]: med[k] / med[("wr-off",) + k[1:]] for k in med if k[0] == "wr-on" and ("wr-off",) + k[1:] in med}
print("on / off: " + ", ".join(f"{t}T if{i} {x:.3f}" for (t, i), x in sorted(rel.items())))
pick = ok and rel.get((16, 1), 0) >= 1.03 and rel.get((16, 8), 0) >= 1.03 and all(
    x >= 0.97 for c, x in rel.items() if c[0] != 16)
print(f"WHILE_RUNNING={'on' if pick else 'off'}")
PY
cat "$res/choice.txt"
record_under WHILE_RUNNING MULTIQ_QUEUE_WHILE_RUNNING off
