#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, after scripts/gpu-prepare.sh filled carry/
# (device tool: run(command="bash scripts/gpu-mlp.sh \"$OUT\"", carry=["carry"])).
# Issue 5 side by side with PyTorch, in one command (about 4 minutes; every step is bounded):
#   1. the GPU tests of products and the MLP (and the CPU tensor/MLP tests);
#   2. numerics: seeded weights, multiq's MLP output (unbatched and dynamically batched) vs
#      PyTorch's for the same file (scripts/mlp_check.py, 1e-4 relative), matmul vs float64 in
#      the tests;
#   3. multiq bench matmul and bench mlp (JSON), a TF32 matmul run (labelled), batching-depth
#      variants, the same benches with recorded programs (CUDA graphs) off, and batched
#      requests with leadership passed on at launch (MULTIQ_PIPELINE=1);
#   4. the anchor torch_mt.py, its output kept verbatim as anchor-torch.txt;
#   5. matmul.md and mlp.md: ratios and the issue's targets, from the JSON and torch's output.
# Everything lands in OUTDIR/results.tgz (plus summary.txt, matmul.md, mlp.md beside it).
set -u -o pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
# Results are named after the GPU (bench/results/<device>/): "NVIDIA H200" -> h200.
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
  sed -E 's/^NVIDIA //; s/ .*//' | tr 'A-Z' 'a-z')
res=$(mktemp -d)/${dev:-gpu} && mkdir -p "$res"
bin=carry/bin/multiq
step() { echo "== $* ($(date -u +%T))" | tee -a "$res/summary.txt"; }
# cuBLAS/cuBLASLt are loaded at run time; make the toolkit's copies findable.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done

step environment
{ cat carry/BUILD; date -u +%FT%TZ; env | grep "^MULTIQ_" | sort; nvidia-smi; nvcc --version | tail -2; uname -a; nproc;
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)';
  ls /usr/local/cuda/lib64/libcublas* 2>/dev/null; } > "$res/env.txt" 2>&1

step tests
{ echo "--- unit backend::"; timeout 150 carry/tests/unit backend:: --nocapture 2>&1; echo "exit $?"
for t in gpu_mlp tensor mlp; do
  [ -x "carry/tests/$t" ] || { echo "missing carry/tests/$t"; continue; }
  echo "--- $t"; timeout 150 "carry/tests/$t" --nocapture 2>&1; echo "exit $?"
done; } > "$res/tests.txt" 2>&1
grep -E "^test result|SKIPPED|FAILED|panicked|^gpu_mlp:" "$res/tests.txt" | tee -a "$res/summary.txt"

step "numerics: multiq vs PyTorch on the same weights file"
"$bin" weights --out "$res/weights.safetensors" --seed 0 > "$res/numerics.txt" 2>&1
timeout 120 "$bin" mlp-run --backend cuda --weights "$res/weights.safetensors" --rows 64 --seed 1 \
  --out "$res/mlp-out.safetensors" >> "$res/numerics.txt" 2>&1
timeout 120 "$bin" mlp-run --backend cuda --weights "$res/weights.safetensors" --rows 64 --seed 1 \
  --batching --out "$res/mlp-out-batched.safetensors" >> "$res/numerics.txt" 2>&1
timeout 120 python3 scripts/mlp_check.py "$res/weights.safetensors" "$res/mlp-out.safetensors" \
  "$res/mlp-out-batched.safetensors" >> "$res/numerics.txt" 2>&1
echo "mlp_check exit $?" >> "$res/numerics.txt"
tail -n 6 "$res/numerics.txt" | tee -a "$res/summary.txt"

step "multiq bench matmul"
timeout 240 "$bin" bench matmul --backend cuda --json "$res/matmul.json" > "$res/matmul.txt" 2>&1
echo "exit $?" | tee -a "$res/summary.txt"

step "multiq bench mlp"
timeout 120 "$bin" bench mlp --backend cuda --json "$res/mlp.json" > "$res/mlp.txt" 2>&1
echo "exit $?" | tee -a "$res/summary.txt"

step "anchor torch_mt.py (PyTorch, same GPU)"
timeout 240 python3 carry/anchors/torch_mt.py > "$res/anchor-torch.txt" 2>&1
echo "exit $?" | tee -a "$res/summary.txt"

step "variants: TF32 matmul (labelled tf32), request runs with batching depth 1, 2, 3, 6, 8 (default 4)"
timeout 60 "$bin" bench matmul --backend cuda --tf32 --sizes 1024,4096 --threads 1,16 --coalesce off \
  --scenario per-thread --json "$res/matmul-tf32.json" > "$res/matmul-tf32.txt" 2>&1
for d in 1 2 3 6 8; do
  timeout 60 "$bin" bench mlp --backend cuda --batches '' --threads 4,8,16 --batching on --depth $d \
    --json "$res/mlp-depth$d.json" > "$res/mlp-depth$d.txt" 2>&1
done
for d in 2 8; do
  timeout 60 "$bin" bench matmul --backend cuda --sizes 64,256 --threads 16 --coalesce on --depth $d \
    --limit-batch 0 --json "$res/matmul-depth$d.json" > "$res/matmul-depth$d.txt" 2>&1
done
grep -E "^  (threads|coalesced) " "$res"/mlp-depth*.txt "$res"/matmul-depth*.txt | sed "s|^$res/||" | tee -a "$res/summary.txt"

step "variants: recorded programs (CUDA graphs) off, MULTIQ_GRAPHS=0"
MULTIQ_GRAPHS=0 timeout 60 "$bin" bench mlp --backend cuda --batches 1,8,64 --threads 16 \
  --json "$res/mlp-nographs.json" > "$res/mlp-nographs.txt" 2>&1
MULTIQ_GRAPHS=0 timeout 60 "$bin" bench matmul --backend cuda --sizes 64,256 --threads 16 \
  --coalesce on --limit-batch 0 --json "$res/matmul-nographs.json" > "$res/matmul-nographs.txt" 2>&1
grep -h -E "^  (sweep|threads|coalesced) " "$res"/mlp-nographs.txt "$res"/matmul-nographs.txt | sort -u | tee -a "$res/summary.txt"

step "variant: batch leaders pass leadership on as soon as their forward is queued, MULTIQ_PIPELINE=1"
MULTIQ_PIPELINE=1 timeout 60 "$bin" bench mlp --backend cuda --batches '' --threads 4,8,16 \
  --batching on --json "$res/mlp-pipeline.json" > "$res/mlp-pipeline.txt" 2>&1
grep -h -E "^  threads " "$res"/mlp-pipeline.txt | sort -u | tee -a "$res/summary.txt"

step "variant: small-batch products launched in stream order, not as programmatic dependents, MULTIQ_PDL=0"
MULTIQ_PDL=0 timeout 60 "$bin" bench mlp --backend cuda --batches 1,8,16,32 --threads 16 \
  --json "$res/mlp-nopdl.json" > "$res/mlp-nopdl.txt" 2>&1
grep -h -E "^  (sweep|threads) " "$res"/mlp-nopdl.txt | sort -u | tee -a "$res/summary.txt"

step "tables"
python3 scripts/mlp-table.py --matmul "$res/matmul.json" --mlp "$res/mlp.json" \
  --anchor "$res/anchor-torch.txt" --numerics "$res/numerics.txt" --out-dir "$res" >> "$res/summary.txt" 2>&1
cp "$res/matmul.md" "$res/mlp.md" "$out/" 2>/dev/null

step done
tar czf "$out/results.tgz" -C "$(dirname "$res")" "$(basename "$res")"
cp "$res/summary.txt" "$out/summary.txt"
