#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), for information: why one thread
# with 8 ops in flight (minimal) ran 0.81-0.96 x `off` under `persistent` in the H100 records
# of 2026-12-05, although at one thread both launch every op alone on the thread's stream.
# The two paths differ by a few atomics per op and, in a pool with a device queue, the raise of
# the device's yield word after every launch (an atomic add in page-locked memory, and a time
# stamp). Three variants, each its own process, interleaved over ROUNDS rounds (default 5, at
# most 9: scripts/variant_runs.py reads rounds 1-9 in order), each round's runs in the order
# listed:
#   as-is        --coalesce off,persistent
#   reversed     --coalesce persistent,off            (does the position in a round matter?)
#   no-raise     MULTIQ_QUEUE_YIELD=off, off,persistent (a queue that never gives the device
#                up is not counted in, so launches do not raise the word; the queue's kernel
#                never runs with one thread, so nothing else changes)
# Nothing is chosen from this call; its summary prints persistent / off per variant.
#   bash scripts/gpu-one-thread.sh OUTDIR   -> OUTDIR/one-thread.tgz (the device tool brings
#   back at most 8 files of a call, so the runs travel packed) and OUTDIR/one-thread.txt
set -u -o pipefail
out=${1:-${OUT:-out}}/one-thread
mkdir -p "$out"
bin=carry/bin/multiq
args=(bench queues --backend cuda --scenario per-thread --lock none --preset minimal --threads 1
  --inflight 1,8 --iters 10000 --repeat 1)
for round in $(seq 1 "${ROUNDS:-5}"); do
  "$bin" "${args[@]}" --coalesce off,persistent --json "$out/as-is-$round.json" > /dev/null 2>> "$out/stderr.txt"
  "$bin" "${args[@]}" --coalesce persistent,off --json "$out/reversed-$round.json" > /dev/null 2>> "$out/stderr.txt"
  MULTIQ_QUEUE_YIELD=off "$bin" "${args[@]}" --coalesce off,persistent \
    --json "$out/no-raise-$round.json" > /dev/null 2>> "$out/stderr.txt"
done
PYTHONPATH=scripts python3 - "$out" <<'PY' | tee "$out/summary.txt"
import statistics, sys
from variant_runs import load
runs, ok = load(sys.argv[1])  # each variant's runs in round order
rates = {}
for v, r in runs:
    rates.setdefault((v, r["inflight"], r["coalesce"]), []).append(r["ops_per_sec"])
print(f"verified: {ok} ({len(runs)} runs)")
for variant in ("as-is", "reversed", "no-raise"):
    for inflight in (1, 8):
        off, pers = rates.get((variant, inflight, "off"), []), rates.get((variant, inflight, "persistent"), [])
        ratios = [p / o for o, p in zip(off, pers)]  # round by round
        if ratios:
            print(f"{variant:<9} inflight {inflight}: persistent / off median {statistics.median(ratios):.3f} "
                  f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); off {[round(x) for x in off]}; "
                  f"persistent {[round(x) for x in pers]}")
        else:
            print(f"{variant:<9} inflight {inflight}: no runs")
PY
cp "$out/summary.txt" "${out%/one-thread}/one-thread.txt"
tar czf "$out.tgz" -C "${out%/one-thread}" one-thread && rm -rf "$out"
