#!/usr/bin/env bash
# Sourced by the GPU variant scripts (scripts/gpu-*-record.sh): runs one variant of a
# benchmark with a time limit.
#   go NAME JSON ENV... -- ARGS...
# go runs `env ENV... carry/bin/multiq ARGS... --json JSON` for at most 2 minutes (a run takes
# seconds). A failure is noted in $res/errors.txt; one that runs out of time also sets
# hung=1, and the caller skips the rest of the call (its results so far are kept).
# Expects $res (the results folder) to be set.
hung=0
go() {
  local name=$1 json=$2; shift 2
  local envs=(); while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" timeout 120 carry/bin/multiq "$@" --json "$json" > /dev/null 2>&1
  local rc=$?
  [ $rc = 0 ] || echo "$name: exit $rc" >> "$res/errors.txt"
  [ $rc = 124 ] && hung=1
  return 0
}

# After a variant call's rule wrote its pick as `KEY=VALUE` into $res/choice.txt:
#   record_under KEY VARIABLE DEFAULT [ENV...]
# ends the call with no record if RECORD=0 or a run hung; otherwise runs scripts/gpu-coalesce.sh
# into $out/record with VARIABLE set to the pick (DEFAULT if none) and ENV..., prints its test
# lines and 16- and 1-thread cells, and packs $res into $out/choose.tgz. Expects $out and $res.
record_under() {
  local key=$1 var=$2 default=$3; shift 3
  if [ "${RECORD:-1}" = 0 ] || [ $hung = 1 ]; then
    [ $hung = 0 ] || echo "A run ran out of time: no record (errors.txt)."
    tar czf "$out/choose.tgz" -C "$out" choose && rm -rf "$res"
    return 0
  fi
  local pick
  pick=$(sed -n "s/^$key=//p" "$res/choice.txt")
  echo "== record under $var=${pick:-$default} ($(date -u +%T))"
  env "$var=${pick:-$default}" EXTRA=0 "$@" bash scripts/gpu-coalesce.sh "$out/record" > "$out/record.log" 2>&1
  tail -3 "$out/record.log"
  grep -E "^test result|FAILED|panicked|^exit [^0]" "$out/record/summary.txt" | head -12
  grep -E " 16T | 1T " "$out/record/summary.txt" | grep -E "coalesce-small" | grep -E "persistent|off"
  tar czf "$out/choose.tgz" -C "$out" choose && rm -rf "$res"
}
