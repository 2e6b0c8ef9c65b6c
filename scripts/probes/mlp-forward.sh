#!/usr/bin/env bash
# Probe (GPU machine): builds scripts/probes/mlp_forward.cu with nvcc and runs it; output in
# "$1/mlp-forward.txt". See the .cu file for what it measures.
set -euo pipefail
out=${1:?usage: mlp-forward.sh OUT_DIR}
mkdir -p "$out"
export PATH=$PATH:/usr/local/cuda/bin
nvcc -O3 -std=c++17 -arch=sm_90 -o "$out/mlp_forward" scripts/probes/mlp_forward.cu
"$out/mlp_forward" | tee "$out/mlp-forward.txt"
rm -f "$out/mlp_forward"
