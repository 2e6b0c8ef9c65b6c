#!/usr/bin/env bash
# Long fuzzing run of multiq's property suites (proptest): tests/fuzz.rs (the public API's
# shapes and limits, weights files, launch shapes against the serial reference, round plans)
# and the command-line parser's properties (src/cli.rs). Runs them again and again, each time
# with fresh random seeds and PROPTEST_CASES cases per property, until SECONDS_TOTAL has
# passed; stops at the first failure (proptest prints the minimal failing input and saves it
# under proptest-regressions/). Usage:
#   bash scripts/fuzz.sh [SECONDS_TOTAL=3600] [LOG=fuzz.log]
# The last line is `fuzz: runs=… cases≈… failures=… seconds=…`. Exit 0 only if nothing failed.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
total=${1:-3600}
log=${2:-fuzz.log}
cases=${PROPTEST_CASES:-2000}
bins=$(cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        if (t["name"] == "fuzz" and t["kind"] == ["test"]) or (t["name"] == "multiq" and t["kind"] == ["bin"] and m["profile"]["test"]):
            print(t["kind"][0] + " " + m["executable"])
')
fuzz=$(echo "$bins" | awk '$1=="test"{print $2}')
cli=$(echo "$bins" | awk '$1=="bin"{print $2}')
[ -x "$fuzz" ] && [ -x "$cli" ] || { echo "fuzz: test binaries not found" >&2; exit 2; }
# Copies, so that builds during the run do not swap the binaries under it.
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp "$fuzz" "$tmp/fuzz"; cp "$cli" "$tmp/cli"; fuzz=$tmp/fuzz; cli=$tmp/cli
props_fuzz=$("$fuzz" --list 2>/dev/null | grep -c ': test$')
props_cli=$("$cli" --list 2>/dev/null | grep -c 'proptest\|any_argument' || true)
start=$(date +%s)
runs=0 failures=0
{ echo "fuzz: started $(date -u +%FT%TZ) commit $(git rev-parse --short=12 HEAD) cases/property=$cases"
  echo "fuzz: $props_fuzz tests in tests/fuzz.rs, CLI properties: src/cli.rs any_argument_list_*"; } | tee "$log"
while [ $(( $(date +%s) - start )) -lt "$total" ]; do
  runs=$((runs + 1))
  # Output is kept only when a run fails (it then holds proptest's minimal failing input).
  if ! PROPTEST_CASES=$cases "$fuzz" --test-threads 1 > "$log.run" 2>&1; then
    failures=$((failures + 1)); cat "$log.run" >> "$log"; echo "fuzz: run $runs: tests/fuzz.rs FAILED" | tee -a "$log"; break
  fi
  if ! PROPTEST_CASES=$((cases * 10)) "$cli" any_argument --test-threads 1 > "$log.run" 2>&1; then
    failures=$((failures + 1)); cat "$log.run" >> "$log"; echo "fuzz: run $runs: CLI parser FAILED" | tee -a "$log"; break
  fi
  echo "fuzz: run $runs passed at $(( $(date +%s) - start )) s" >> "$log"
done
rm -f "$log.run"
echo "fuzz: runs=$runs cases/property/run=$cases (CLI $((cases * 10))) failures=$failures seconds=$(( $(date +%s) - start )) ended $(date -u +%FT%TZ)" | tee -a "$log"
[ "$failures" -eq 0 ]
