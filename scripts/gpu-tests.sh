#!/usr/bin/env bash
# Run ON THE GPU MACHINE: every test binary in carry/tests (scripts/gpu-prepare.sh copies the
# library's unit tests and the pool, GPU, coalescing, tensor and MLP tests there), each with 3
# minutes at most (a hang must not eat the call: `exit 124` says it ran out), then the GPU
# test of the fill gate with the gate off (it is on by default). Output on stdout; each binary ends with `exit N`.
set -u -o pipefail
for t in carry/tests/*; do
  echo "--- $t"
  timeout 180 "$t" 2>&1
  echo "exit $?"
done
echo "--- carry/tests/gpu with the fill gate off"
MULTIQ_FILL_GATE=0 timeout 120 carry/tests/gpu device_filling 2>&1
echo "exit $?"
