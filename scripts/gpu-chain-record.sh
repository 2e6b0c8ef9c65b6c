#!/usr/bin/env bash
# Run ON THE GPU MACHINE (after scripts/gpu-prepare.sh here), in one call of about 6 minutes:
#   run(command="bash scripts/gpu-chain-record.sh \"$OUT\"", carry=["carry"])
# 1. scripts/gpu-chain.sh into OUTDIR/chain: the device queue unchained against its chained
#    variants (chain, early, early-c4), interleaved over 3 rounds;
# 2. picks a variant by the rule below (OUTDIR/choice.txt says which, and why);
# 3. scripts/gpu-coalesce.sh into OUTDIR/record under that variant's environment: the recorded
#    run of every coalescing policy beside the anchors (its env.txt and each results file's
#    device info name the variant).
# The rule: the variant with the highest median at 8 in flight (minimal, 16 threads) among
# those whose GPU tests passed, whose runs all verified, whose median at 8 in flight is at least
# 1.05 of the unchained queue's (beyond the machine's noise within one call), and whose median
# with a wait per op is at least 0.97 of the queue's (the wait-per-op target is not traded
# away); the unchained queue if there is none. Nothing here changes the library's defaults: a variant that wins is made the
# default in the code afterwards, and recorded again from that commit.
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out/chain" "$out/record"
bash scripts/gpu-chain.sh "$out/chain"
( cd "$out/chain" && tar xzf chain.tgz --wildcards 'bench-*-[0-9].json' )
python3 - "$out/chain" <<'PY' > "$out/choice.txt"
import glob, json, re, statistics, sys
d = sys.argv[1]
env = {"queue": "", "chain": "MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_EARLY=0",
       "early": "MULTIQ_QUEUE_CHAIN=1", "early-c4": "MULTIQ_QUEUE_CHAIN=1 MULTIQ_QUEUE_CHAIN_TILES=4"}
cells, verified = {}, {}
for f in glob.glob(d + "/bench-*-[0-9].json"):
    v = re.sub(r"-\d+$", "", f.split("/")[-1][len("bench-"):-len(".json")])
    for r in json.load(open(f))["runs"]:
        cells.setdefault((v, r["inflight"]), []).append(r["ops_per_sec"])
        verified[v] = verified.get(v, True) and bool(r["verified"])
med = {k: statistics.median(x) for k, x in cells.items()}
try:
    errors = open(f"{d}/errors.txt").read()
except OSError:
    errors = ""
def tests_ok(v):
    if f"{v}: dropped after a failed run" in errors:
        return False
    if v == "queue":
        return True
    try:
        text = open(f"{d}/tests-chain-{v}.txt").read()
    except OSError:
        return False
    return "FAILED" not in text and "panicked" not in text and text.rstrip().endswith("exit 0")
base8, base1 = med.get(("queue", 8)), med.get(("queue", 1))
best, why = "queue", "the unchained queue (no variant beat it under the rule)"
for v in env:
    if v == "queue" or (v, 8) not in med or base8 is None or base1 is None:
        continue
    ok = (tests_ok(v) and verified.get(v, False) and med[(v, 8)] >= 1.05 * base8
          and med[(v, 1)] >= 0.97 * base1)
    print(f"{v:<9} if8 {med[(v, 8)]:>11,.0f} ({med[(v, 8)] / base8:4.2f}x queue)  "
          f"if1 {med[(v, 1)]:>11,.0f} ({med[(v, 1)] / base1:4.2f}x queue)  "
          f"tests {'ok' if tests_ok(v) else 'FAILED'}  verified {verified.get(v)}  eligible {ok}")
    if ok and med[(v, 8)] > med.get((best, 8), 0):
        best, why = v, f"highest median at 8 in flight among eligible variants ({med[(v, 8)]:,.0f} ops/s)"
print(f"choice: {best}: {why}")
print(f"env: {env[best]}")
PY
cat "$out/choice.txt"
vars=$(sed -n 's/^env: //p' "$out/choice.txt")
( cd "$out/chain" && rm -f bench-*-[0-9].json )  # they are in chain.tgz
env $vars bash scripts/gpu-coalesce.sh "$out/record"
