#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 6 minutes:
#   run(command="bash scripts/gpu-gate-spin-record.sh \"$OUT\"", carry=["carry"])
# 1. The fill gate (at most 8 device-filling kernels on the device at once; src/backend/cuda/
#    fill_gate.rs) against no gate (MULTIQ_FILL_GATE=0): coalescing off, light at 8 and 16
#    threads (a wait per op and 8 in flight, 3,000 ops per thread) and default at 16 threads
#    (300 ops), interleaved over 3 rounds.
# 2. The device queue's spin before yielding (MULTIQ_QUEUE_SPIN_US): 200 µs (the default), 20
#    and 0 (yield from the first poll): persistent, minimal at 4 and 16 threads, a wait per op
#    and 8 in flight, 10,000 ops per thread, interleaved over 3 rounds.
# 3. Picks by the rules below (OUTDIR/choice.txt), then scripts/gpu-coalesce.sh into
#    OUTDIR/record under the picked environment (its env.txt names it).
# Rules, stated before the call:
#   gate: kept on if light at 16 threads with a wait per op gains >= 1.02 x with it and no
#         other gate cell falls below 0.99 x; otherwise off;
#   spin: the variant with the highest geometric mean over the four minimal cells, if none of
#         its cells is below 0.97 x the 200 µs default's; otherwise 200 µs.
# Nothing here changes the library's defaults: the picked values become the defaults in the
# code afterwards (the record then ran the code the defaults describe).
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out/choose" "$out/record"
res=$out/choose
b=carry/bin/multiq
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
echo "== tests ($(date -u +%T))"
for t in carry/tests/*; do echo "--- $t"; timeout 300 "$t" 2>&1; echo "exit $?"; done > "$res/tests.txt" 2>&1
grep -E "^test result|FAILED|panicked" "$res/tests.txt"
echo "== variants ($(date -u +%T))"
for r in 1 2 3; do
  for g in 0 8; do
    MULTIQ_FILL_GATE=$g "$b" "${q[@]}" --coalesce off --preset light --threads 8,16 --inflight 1,8 --iters 3000 \
      --json "$res/gate-$g-light-$r.json" > /dev/null 2>&1 || echo "gate-$g light $r: exit $?" >> "$res/errors.txt"
    MULTIQ_FILL_GATE=$g "$b" "${q[@]}" --coalesce off --preset default --threads 16 --iters 300 \
      --json "$res/gate-$g-default-$r.json" > /dev/null 2>&1 || echo "gate-$g default $r: exit $?" >> "$res/errors.txt"
  done
  for s in 200 20 0; do
    MULTIQ_QUEUE_SPIN_US=$s "$b" "${q[@]}" --coalesce persistent --preset minimal --threads 4,16 --inflight 1,8 \
      --iters 10000 --json "$res/spin-$s-$r.json" > /dev/null 2>&1 || echo "spin-$s $r: exit $?" >> "$res/errors.txt"
  done
done
python3 - "$res" <<'PY' > "$res/choice.txt"
import glob, json, math, re, statistics, sys
d = sys.argv[1]
cells, ok = {}, True
for f in glob.glob(d + "/*-[0-9].json"):
    name = f.split("/")[-1]
    m = re.match(r"(gate|spin)-(\d+)-", name)
    for r in json.load(open(f))["runs"]:
        ok &= bool(r["verified"])
        cells.setdefault((m[1], int(m[2]), r["preset"], r["threads"], r["inflight"]), []).append(r["ops_per_sec"])
med = {k: statistics.median(v) for k, v in cells.items()}
print("verified:", ok)
for k in sorted(med):
    print(f"{k[0]}={k[1]:<4} {k[2]:<8} {k[3]:>2}T if{k[4]}  median {med[k]:>12,.0f}  rounds {', '.join(f'{x:,.0f}' for x in cells[k])}")
# gate
ratios = {k[2:]: med[k] / med[("gate", 0) + k[2:]] for k in med if k[:2] == ("gate", 8) and ("gate", 0) + k[2:] in med}
for c, x in sorted(ratios.items()):
    print(f"gate 8 / gate 0: {c[0]:<8} {c[1]:>2}T if{c[2]}  {x:.3f}")
key = ("light", 16, 1)
gate = 8 if ok and ratios.get(key, 0) >= 1.02 and all(x >= 0.99 for c, x in ratios.items() if c != key) else 0
print(f"FILL_GATE={gate}")
# spin
base = {k[2:]: v for k, v in med.items() if k[:2] == ("spin", 200)}
best, best_gm = 200, None
for s in (200, 20, 0):
    mine = {k[2:]: v for k, v in med.items() if k[:2] == ("spin", s)}
    if set(mine) != set(base) or not mine:
        continue
    rel = [mine[c] / base[c] for c in base]
    gm = math.exp(sum(math.log(x) for x in rel) / len(rel))
    print(f"spin {s}: geometric mean {gm:.3f} x the 200 us default; cells {', '.join(f'{x:.3f}' for x in rel)}")
    if ok and min(rel) >= 0.97 and (best_gm is None or gm > best_gm):
        best, best_gm = s, gm
print(f"SPIN_US={best}")
PY
cat "$res/choice.txt"
gate=$(sed -n 's/^FILL_GATE=//p' "$res/choice.txt"); spin=$(sed -n 's/^SPIN_US=//p' "$res/choice.txt")
echo "== record under MULTIQ_FILL_GATE=${gate:-8} MULTIQ_QUEUE_SPIN_US=${spin:-200} ($(date -u +%T))"
MULTIQ_FILL_GATE=${gate:-8} MULTIQ_QUEUE_SPIN_US=${spin:-200} bash scripts/gpu-coalesce.sh "$out/record" > "$out/record.log" 2>&1
tail -3 "$out/record.log"
grep -E " 16T | 1T " "$out/record/summary.txt" | grep -E "coalesce-(small|large)" | grep -E "persistent|off"
tar czf "$out/choose.tgz" -C "$out" choose && rm -rf "$res"
