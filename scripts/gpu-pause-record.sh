#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 8 minutes (tests, host probe, variants, record):
#   run(kind="nvidia-h100-x1", command="bash scripts/gpu-pause-record.sh \"$OUT\"", carry=["carry"])
# 0. The tests (scripts/gpu-tests.sh, OUTDIR/tests.txt; the record carries them).
# 1. The device queue's spinning waiters with the CPU's spin-wait hint between polls (x86
#    `pause`, the default) against without it (MULTIQ_QUEUE_PAUSE=off), and, for reference,
#    wait policy `yield`: persistent, minimal at 4, 15 and 16 threads, a wait per op and 8 in
#    flight, 10,000 ops per thread, interleaved over 4 rounds; and the queue kernel kept on the
#    device whatever else is launched (MULTIQ_QUEUE_YIELD=off, "stay-x"), to see what giving
#    it up costs where nothing else runs; and with each thread pinned to its own CPU
#    (--pin-threads, "pin-x": diagnostic only, the record runs unpinned as mq.cu does).
#    (The GPU machine is a virtual
#    machine with 16 cores; a long run of `pause` can make the hypervisor take the CPU away.)
#    Before them, scripts/probes/spin-gaps.c spins 15 and 16 threads with and without `pause`
#    on the host alone (choose/spin-gaps.txt): time taken from spinning threads, each way.
# 2. Picks by the rule below (OUTDIR/choose/choice.txt), then scripts/gpu-coalesce.sh into
#    OUTDIR/record under the pick (without its depth and wait-yield step: EXTRA=0).
# Rule, stated before the call: no pause if, at 16 threads with 8 in flight, its median is
# >= 1.05 x the pause's and none of its other cells is below 0.97 x; otherwise the pause stays.
# Nothing here changes the library's defaults: a pick becomes the default in the code
# afterwards. Back here, `bash scripts/land-coalesce.sh FILES_AT` lands the record and variants. runs.txt lists every run with the host's counters (steal, preemptions, CPU per op)
# and the GPU's SM clock while it ran (scripts/gpu-clocks.sh samples it, read-only). ROUNDS (default 4) sets the rounds; RECORD=0 stops after the pick (a call short
# of device time), and then also runs the fill gate against none (light, 16 threads, a wait
# per op and 8 in flight, 3,000 ops per thread) in the same rounds.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out/choose" "$out/record"
res=$out/choose
q=(bench queues --backend cuda --scenario per-thread --lock none --quiet --coalesce persistent
   --preset minimal --threads 4,15,16 --inflight 1,8 --iters 10000)
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; } > "$res/env.txt"
# The tests first: the device queue's code changed since the last call, and a variant that
# hangs would otherwise say nothing about where. The record carries this output (TESTS_DONE).
echo "== tests ($(date -u +%T))"
bash scripts/gpu-tests.sh > "$out/tests.txt" 2>&1
grep -E "^test result|FAILED|panicked|^exit [^0]" "$out/tests.txt"
# The host alone (about 20 s): do threads that spin with `pause` lose their CPU to the
# hypervisor, and those that spin without it not? (scripts/probes/spin-gaps.c; one line each)
echo "== spin-gaps ($(date -u +%T))"
for r in 1 2; do for t in 16 15; do for p in 1 0; do
  timeout 30 carry/bin/spin-gaps $t $p 2 >> "$res/spin-gaps.txt" 2>&1 || echo "spin-gaps $t $p: exit $?" >> "$res/spin-gaps.txt"
done; done; done
cat "$res/spin-gaps.txt"
echo "== variants ($(date -u +%T))"
# Which CPUs take the machine's interrupts (a submitting thread on one of them has less of its
# CPU): the counts before and after the variants.
cat /proc/interrupts /proc/softirqs > "$res/interrupts-before.txt" 2>&1
. scripts/gpu-clocks.sh
gpu_clocks_start "$res/gpu-clocks.csv"
. scripts/gpu-variants.sh  # go NAME JSON ENV... -- ARGS... (2 minutes at most each)
for r in $(seq "${ROUNDS:-4}"); do
  [ $hung = 0 ] || break
  go "pause-on $r" "$res/pause-on-$r.json" MULTIQ_QUEUE_PAUSE=on -- "${q[@]}"
  go "pause-off $r" "$res/pause-off-$r.json" MULTIQ_QUEUE_PAUSE=off -- "${q[@]}"
  go "yield $r" "$res/yield-x-$r.json" -- "${q[@]}" --wait yield
  # The queue kernel giving the device up to other kernels (on by default since cd2fd34) against
  # staying on it: its cost where nothing else runs (direct launches at a run's start and end).
  go "stay $r" "$res/stay-x-$r.json" MULTIQ_QUEUE_YIELD=off -- "${q[@]}"
  # Each submitting thread pinned to its own CPU: if the slow runs are threads the scheduler
  # moved or doubled up on a CPU, pinned runs do not have them (diagnostic only: the record runs
  # unpinned, as the peer mq.cu does).
  go "pin $r" "$res/pin-x-$r.json" -- "${q[@]}" --pin-threads
  if [ "${RECORD:-1}" = 0 ]; then
    for g in 0 8; do
      go "gate $g $r" "$res/gate$g-light-$r.json" MULTIQ_FILL_GATE=$g -- bench queues --backend cuda \
        --scenario per-thread --lock none --quiet --coalesce off --preset light --threads 16 --inflight 1,8 --iters 3000
    done
  fi
done
gpu_clocks_stop
cat /proc/interrupts /proc/softirqs > "$res/interrupts-after.txt" 2>&1
python3 scripts/interrupts-by-cpu.py "$res/interrupts-before.txt" "$res/interrupts-after.txt" > "$res/interrupts.txt" 2>&1
# Every run beside the host's counters and the GPU's clocks while it ran (runs.txt).
python3 scripts/runs-beside-gpu.py --clocks "$res/gpu-clocks.csv" "$res"/*-[0-9].json > "$res/runs.txt" 2>&1
PYTHONPATH=scripts python3 - "$res" <<'PY' > "$res/choice.txt"
import statistics, sys
from variant_runs import load
runs, ok = load(sys.argv[1])
cells = {}
for v, r in runs:
    cells.setdefault((v, r["threads"], r["inflight"]), []).append(r["ops_per_sec"])
med = {k: statistics.median(x) for k, x in cells.items()}
print(f"verified: {ok} ({len(runs)} runs)")
for k in sorted(med):
    print(f"{k[0]:<10} {k[1]:>2}T if{k[2]}  median {med[k]:>12,.0f}  rounds {', '.join(f'{x:,.0f}' for x in cells[k])}")
for v in ("pause-off", "yield-x", "stay-x", "pin-x"):
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
record_under PAUSE MULTIQ_QUEUE_PAUSE on TESTS_DONE="$out/tests.txt"
