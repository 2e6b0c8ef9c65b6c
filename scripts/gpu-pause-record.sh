#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 5 minutes:
#   run(command="bash scripts/gpu-pause-record.sh \"$OUT\"", carry=["carry"])
# 1. The device queue's spinning waiters with the CPU's spin-wait hint between polls (x86
#    `pause`, the default) against without it (MULTIQ_QUEUE_PAUSE=off), and, for reference,
#    wait policy `yield`: persistent, minimal at 4, 15 and 16 threads, a wait per op and 8 in
#    flight, 10,000 ops per thread, interleaved over 4 rounds. (The GPU machine is a virtual
#    machine with 16 cores; a long run of `pause` can make the hypervisor take the CPU away.)
# 2. Picks by the rule below (OUTDIR/choose/choice.txt), then scripts/gpu-coalesce.sh into
#    OUTDIR/record under the pick (without its depth and wait-yield step: EXTRA=0).
# Rule, stated before the call: no pause if, at 16 threads with 8 in flight, its median is
# >= 1.05 x the pause's and none of its other cells is below 0.97 x; otherwise the pause stays.
# Nothing here changes the library's defaults: a pick becomes the default in the code
# afterwards. runs.txt lists every run with the host's counters (steal, preemptions, CPU per op)
# and the GPU's SM clock while it ran (scripts/gpu-clocks.sh samples it, read-only). ROUNDS (default 4) sets the rounds; RECORD=0 stops after the pick (a call short
# of device time), and then also runs the fill gate against none (light, 16 threads, a wait
# per op and 8 in flight, 3,000 ops per thread) in the same rounds.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out/choose" "$out/record"
res=$out/choose
b=carry/bin/multiq
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet --coalesce persistent
   --preset minimal --threads 4,15,16 --inflight 1,8 --iters 10000)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
echo "== variants ($(date -u +%T))"
. scripts/gpu-clocks.sh
gpu_clocks_start "$res/gpu-clocks.csv"
for r in $(seq "${ROUNDS:-4}"); do
  MULTIQ_QUEUE_PAUSE=on "$b" "${q[@]}" --json "$res/pause-on-$r.json" > /dev/null 2>&1 || echo "pause-on $r: exit $?" >> "$res/errors.txt"
  MULTIQ_QUEUE_PAUSE=off "$b" "${q[@]}" --json "$res/pause-off-$r.json" > /dev/null 2>&1 || echo "pause-off $r: exit $?" >> "$res/errors.txt"
  "$b" "${q[@]}" --wait yield --json "$res/yield-x-$r.json" > /dev/null 2>&1 || echo "yield $r: exit $?" >> "$res/errors.txt"
  if [ "${RECORD:-1}" = 0 ]; then
    for g in 0 8; do
      MULTIQ_FILL_GATE=$g "$b" bench queues --backend cuda --scenario per-thread --lock none --quiet --coalesce off \
        --preset light --threads 16 --inflight 1,8 --iters 3000 --json "$res/gate$g-light-$r.json" > /dev/null 2>&1 \
        || echo "gate $g $r: exit $?" >> "$res/errors.txt"
    done
  fi
done
gpu_clocks_stop
# Every run beside the host's counters and the GPU's clocks while it ran (runs.txt).
python3 scripts/runs-beside-gpu.py --clocks "$res/gpu-clocks.csv" "$res"/*-[0-9].json > "$res/runs.txt" 2>&1
python3 - "$res" <<'PY' > "$res/choice.txt"
import glob, json, re, statistics, sys
d = sys.argv[1]
cells, ok = {}, True
for f in glob.glob(d + "/*-[0-9].json"):
    v = re.match(r"(.*)-\d+\.json$", f.split("/")[-1])[1]
    for r in json.load(open(f))["runs"]:
        ok &= bool(r["verified"])
        cells.setdefault((v, r["threads"], r["inflight"]), []).append(r["ops_per_sec"])
med = {k: statistics.median(x) for k, x in cells.items()}
print("verified:", ok)
for k in sorted(med):
    print(f"{k[0]:<10} {k[1]:>2}T if{k[2]}  median {med[k]:>12,.0f}  rounds {', '.join(f'{x:,.0f}' for x in cells[k])}")
for v in ("pause-off", "yield-x"):
    rel = {k[1:]: med[k] / med[("pause-on",) + k[1:]] for k in med if k[0] == v}
    print(f"{v} / pause-on: " + ", ".join(f"{t}T if{i} {x:.3f}" for (t, i), x in sorted(rel.items())))
gate = {k[1:]: med[k] / med[("gate0-light",) + k[1:]] for k in med if k[0] == "gate8-light"}
if gate:
    print("gate 8 / gate 0 (light): " + ", ".join(f"{t}T if{i} {x:.3f}" for (t, i), x in sorted(gate.items())))
rel = {k[1:]: med[k] / med[("pause-on",) + k[1:]] for k in med if k[0] == "pause-off"}
pick = ok and rel.get((16, 8), 0) >= 1.05 and all(x >= 0.97 for c, x in rel.items() if c != (16, 8))
print(f"PAUSE={'off' if pick else 'on'}")
PY
cat "$res/choice.txt"
if [ "${RECORD:-1}" = 0 ]; then tar czf "$out/choose.tgz" -C "$out" choose && rm -rf "$res"; exit 0; fi
pause=$(sed -n 's/^PAUSE=//p' "$res/choice.txt")
echo "== record under MULTIQ_QUEUE_PAUSE=${pause:-on} ($(date -u +%T))"
MULTIQ_QUEUE_PAUSE=${pause:-on} EXTRA=0 bash scripts/gpu-coalesce.sh "$out/record" > "$out/record.log" 2>&1
tail -3 "$out/record.log"
grep -E " 16T | 1T " "$out/record/summary.txt" | grep -E "coalesce-small" | grep -E "persistent|off" | grep minimal
tar czf "$out/choose.tgz" -C "$out" choose && rm -rf "$res"
