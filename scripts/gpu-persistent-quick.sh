#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here): a first look at the device queue
# (coalescing `persistent`) next to `off` and `fixed` on the issue's cells, plus the GPU tests
# that cover it. Every command has a timeout, so a hang shows as a timeout, not a lost call.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
{ cat carry/BUILD; date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$out/env.txt"
echo "== tests"
timeout 240 carry/tests/gpu --test-threads 1 2>&1 | tail -15 | tee "$out/tests.txt"
q=(bench queues --backend cuda --scenario per-thread --lock none --repeat 3)
run() { local name=$1; shift; timeout 150 "$bin" "${q[@]}" "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" | tee -a "$out/errors.txt"; }
run minimal --preset minimal --threads 1,16 --iters 2000 --inflight 1,8 --coalesce off,fixed,persistent
for m in 2 8; do
  MULTIQ_QUEUE_MIN_TILES=$m run minimal-tiles$m --preset minimal --threads 1,16 --iters 2000 --inflight 1,8 --coalesce persistent
done
export MULTIQ_QUEUE_PIPELINE=1
run minimal-pipe --preset minimal --threads 1,16 --iters 2000 --inflight 1,8 --coalesce persistent
run larger-pipe --preset light,default --threads 16 --iters 300 --coalesce persistent
run heavy-pipe --preset heavy --threads 16 --iters 40 --coalesce persistent
unset MULTIQ_QUEUE_PIPELINE
run larger --preset light,default --threads 16 --iters 300 --coalesce off,fixed,persistent
run heavy --preset heavy --threads 16 --iters 40 --coalesce off,persistent
run minimal-yield --wait yield --preset minimal --threads 16 --iters 2000 --inflight 1,8 --coalesce persistent
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for r in json.load(open(f))["runs"]:
        print(f"{f.split('/')[-1]:<18} {r['preset']:<8} if{r['inflight']} {r['coalesce']:<10} {r['threads']:>2}T "
              f"{r['ops_per_sec']:>11,.0f} ops/s [{r['ops_per_sec_min']:,.0f}-{r['ops_per_sec_max']:,.0f}] p50 {r['latency_us']['p50']:7.1f} p99 {r['latency_us']['p99']:7.1f} us "
              f"ops/launch {r['ops_per_launch']:7.1f} {r.get('coalesce_completion','')} {r['wait']} verified={r['verified']}")
PY
cd "$out" && tar czf results.tgz *.json *.txt && rm -f *.json $(ls *.txt | grep -v -e summary -e tests -e errors)
