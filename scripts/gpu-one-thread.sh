#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), for information: why one thread
# with 8 ops in flight (minimal) ran 0.81-0.96 x `off` under `persistent` in the H100 records
# of 2026-12-05, although at one thread both launch every op alone on the thread's stream.
# The two paths differ by a few atomics per op and, in a pool with a device queue, the raise of
# the device's yield word after every launch (an atomic add in page-locked memory, and a time
# stamp). Three variants, each its own process, interleaved over ROUNDS rounds (default 5),
# each round's runs in the order listed:
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
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import glob, json, statistics, sys
d = sys.argv[1]
for variant in ("as-is", "reversed", "no-raise"):
    for inflight in (1, 8):
        ratios, rates = [], {"off": [], "persistent": []}
        for f in sorted(glob.glob(f"{d}/{variant}-*.json")):
            runs = {r["coalesce"]: r for r in json.load(open(f))["runs"] if r["inflight"] == inflight}
            if "off" in runs and "persistent" in runs and all(r["verified"] for r in runs.values()):
                ratios.append(runs["persistent"]["ops_per_sec"] / runs["off"]["ops_per_sec"])
                for m in rates:
                    rates[m].append(round(runs[m]["ops_per_sec"]))
        if ratios:
            print(f"{variant:<9} inflight {inflight}: persistent / off median {statistics.median(ratios):.3f} "
                  f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); off {rates['off']}; persistent {rates['persistent']}")
        else:
            print(f"{variant:<9} inflight {inflight}: no verified pair")
PY
cp "$out/summary.txt" "${out%/one-thread}/one-thread.txt"
tar czf "$out.tgz" -C "${out%/one-thread}" one-thread && rm -rf "$out"
