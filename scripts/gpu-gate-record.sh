#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 6 minutes:
#   run(kind="nvidia-h100-x1", command="bash scripts/gpu-gate-record.sh \"$OUT\"", carry=["carry"])
# 1. The fill gate (at most 8 device-filling kernels on the device at once; src/backend/cuda/
#    fill_gate.rs) against no gate (MULTIQ_FILL_GATE=0, the default): coalescing off, light at
#    8 and 16 threads (a wait per op and 8 in flight, 3,000 ops per thread) and default at 16
#    threads (300 ops), interleaved over ROUNDS rounds (default 4).
# 2. Picks by the rule below (OUTDIR/choose/choice.txt), then scripts/gpu-coalesce.sh into
#    OUTDIR/record under the pick (tests included; without the depth and wait-yield step).
# Rule, stated before the call (the rule of scripts/gpu-gate-spin-record.sh, whose H200 call
# left the gate off): on if light at 16 threads with a wait per op gains >= 1.02 x with it and
# no other cell falls below 0.99 x; otherwise off. A pick becomes the default in the code
# afterwards. Back here, `bash scripts/land-coalesce.sh FILES_AT` lands the record.
set -u -o pipefail
out=${1:-${OUT:-out}}
res=$out/choose
mkdir -p "$res"
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet --coalesce off)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
echo "== variants ($(date -u +%T))"
. scripts/gpu-variants.sh  # go NAME JSON ENV... -- ARGS... (2 minutes at most each)
for r in $(seq "${ROUNDS:-4}"); do
  [ $hung = 0 ] || break
  for g in 0 8; do
    go "gate $g light $r" "$res/gate$g-light-$r.json" MULTIQ_FILL_GATE=$g -- "${q[@]}" \
      --preset light --threads 8,16 --inflight 1,8 --iters 3000
    go "gate $g default $r" "$res/gate$g-default-$r.json" MULTIQ_FILL_GATE=$g -- "${q[@]}" \
      --preset default --threads 16 --iters 300
  done
done
python3 scripts/runs-beside-gpu.py "$res"/*-[0-9].json > "$res/runs.txt" 2>&1
PYTHONPATH=scripts python3 - "$res" <<'PY' > "$res/choice.txt"
import statistics, sys
from variant_runs import load
runs, ok = load(sys.argv[1], "gate*-[0-9].json")
cells = {}
for v, r in runs:
    g = v[len("gate"):].split("-")[0]  # gate8-light -> 8
    cells.setdefault((g, r["preset"], r["threads"], r["inflight"]), []).append(r["ops_per_sec"])
print(f"verified: {ok} ({len(runs)} runs)")
med = {k: statistics.median(v) for k, v in cells.items()}
for k in sorted(cells):
    print(f"gate={k[0]:<2} {k[1]:<8} {k[2]:>2}T if{k[3]}  median {med[k]:>10,.0f}  rounds {', '.join(f'{x:,.0f}' for x in cells[k])}")
rel = {k[1:]: med[k] / med[("0",) + k[1:]] for k in med if k[0] == "8" and ("0",) + k[1:] in med}
for c, x in sorted(rel.items()):
    print(f"gate 8 / gate 0: {c[0]:<8} {c[1]:>2}T if{c[2]}  {x:.3f}")
pick = ok and rel.get(("light", 16, 1), 0) >= 1.02 and all(x >= 0.99 for c, x in rel.items() if c != ("light", 16, 1))
print(f"FILL_GATE={'8' if pick else '0'}")
PY
cat "$res/choice.txt"
record_under FILL_GATE MULTIQ_FILL_GATE 0
