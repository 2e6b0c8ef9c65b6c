#!/usr/bin/env bash
# Sourced by the GPU variant scripts (scripts/gpu-*-record.sh): runs one variant of a
# benchmark with a time limit.
#   go NAME JSON ENV... -- ARGS...
# runs `env ENV... carry/bin/multiq ARGS... --json JSON` for at most 2 minutes (a run takes
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
