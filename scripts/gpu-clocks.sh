#!/usr/bin/env bash
# Samples the GPU's clocks, power and temperature every 20 ms into a CSV, read-only (nothing
# about the GPU is changed), until killed; scripts/runs-beside-gpu.py lines the samples up with
# each run. Source it and call:
#   gpu_clocks_start FILE   # starts the sampler in the background (no-op without nvidia-smi)
#   gpu_clocks_stop         # stops it
# The clock-event reasons (why clocks are held down: power, thermal, idle…) are recorded where
# the driver knows the field. On stopping, FILE.cpu gets the sampler's own CPU time: the
# benchmark's threads share the host's cores with it, so that is what it may have cost them.
gpu_clocks_start() {
  GPU_CLOCKS_PID= GPU_CLOCKS_FILE=$1 GPU_CLOCKS_T0=$(date +%s.%N)
  command -v nvidia-smi > /dev/null 2>&1 || { echo "gpu-clocks: no nvidia-smi" > "$1"; return 0; }
  local base=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu q=
  for try in "$base,clocks_event_reasons.active" "$base,clocks_throttle_reasons.active" "$base"; do
    if nvidia-smi -i 0 --query-gpu="$try" --format=csv,noheader,nounits > /dev/null 2>&1; then q=$try; break; fi
  done
  [ -n "$q" ] || { echo "gpu-clocks: nvidia-smi answers no query" > "$1"; return 0; }
  # Written by nvidia-smi itself (-f), so nothing sits in a pipe's buffer when it is stopped.
  nvidia-smi -i 0 --query-gpu="$q" --format=csv,nounits -lms 20 -f "$1" 2> /dev/null &
  GPU_CLOCKS_PID=$!
}

gpu_clocks_stop() {
  if [ -n "${GPU_CLOCKS_PID:-}" ]; then
    # utime and stime (fields 14 and 15 of /proc/PID/stat, after the parenthesized name).
    local ticks hz
    ticks=$(sed 's/.*) //' "/proc/$GPU_CLOCKS_PID/stat" 2> /dev/null | awk '{print $12 + $13}')
    hz=$(getconf CLK_TCK)
    [ -n "$ticks" ] && awk -v t="$ticks" -v hz="$hz" -v t0="$GPU_CLOCKS_T0" -v t1="$(date +%s.%N)" \
      'BEGIN { s = t1 - t0; printf "sampler cpu_ms=%.0f wall_s=%.1f share_of_one_core=%.2f%%\n", t * 1000 / hz, s, t * 100 / hz / s }' \
      > "$GPU_CLOCKS_FILE.cpu"
    kill "$GPU_CLOCKS_PID" 2> /dev/null; wait "$GPU_CLOCKS_PID" 2> /dev/null
  fi
  GPU_CLOCKS_PID=
}
