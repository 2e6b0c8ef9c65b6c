#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, after scripts/gpu-prepare.sh built the
# binary here and staged it in carry/ (the device tool carries that folder):
#   run(command="bash scripts/gpu-stress.sh \"$OUT\"", carry=["carry"])
# The long stress on CUDA: 10,000 rounds or SECONDS (default 450) of rounds, whichever comes
# first (no round starts after that; a round in progress then finishes, a hung one within its
# 45 s deadline), so with the default the command ends well inside the 10-minute call limit.
# A run longer than one call is several calls with different seeds (STRESS_SEED=N), each
# stored as its own file. Writes into OUTDIR (default $OUT or out):
#   stress.json  the results (copy to bench/results/<device>/stress.json)
#   stress.log   everything multiq printed: failing rounds with their seeds and replay
#                commands, progress lines, the summary line
#   env.txt      build stamp, date, MULTIQ_* variables set, nvidia-smi, host
# Exit status: multiq's (0 clean, 1 any crash/hang/mismatch/leak/error, 2 usage).
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
bin=carry/bin/multiq
[ -x "$bin" ] || bin=carry/multiq
if [ ! -x "$bin" ]; then
  echo "no multiq binary in carry/ (run scripts/gpu-prepare.sh on the build machine)" >&2
  exit 2
fi
{ cat carry/BUILD 2>/dev/null; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi; uname -a; nproc; } > "$out/env.txt" 2>&1
# A last guard only: multiq ends by itself well before this (and writes stress.json then).
seconds=${STRESS_SECONDS:-450}
seed_args=()
[ -n "${STRESS_SEED:-}" ] && seed_args=(--seed "$STRESS_SEED")
timeout -k 10 $((seconds + 120)) "$bin" stress --backend cuda --rounds 10000 --seconds "$seconds" \
  --round-timeout 45 "${seed_args[@]}" --json "$out/stress.json" > "$out/stress.log" 2>&1
status=$?
echo "exit $status" >> "$out/stress.log"
grep -E "^(FAILED|  replay)" "$out/stress.log" | head -n 20
tail -n 3 "$out/stress.log"
exit "$status"
