#!/usr/bin/env bash
# Probe (GPU machine): builds scripts/probes/bus.cu with nvcc and runs it; output in
# "$1/bus.txt". See the .cu file for what it measures.
set -euo pipefail
out=${1:?usage: bus.sh OUT_DIR}
mkdir -p "$out"
export PATH=$PATH:/usr/local/cuda/bin
nvcc -O3 -std=c++17 -arch=sm_90 -o "$out/bus" scripts/probes/bus.cu -lpthread
"$out/bus" | tee "$out/bus.txt"
rm -f "$out/bus"
