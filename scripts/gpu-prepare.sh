#!/usr/bin/env bash
# Run HERE (the build machine; no GPU needed) before a GPU run. The GPU machine has no Rust
# toolchain, so this builds the release binary and the GPU-relevant test binaries and copies
# them, with the anchor programs, into carry/ (ignored by git via .git/info/exclude). The
# device tool then carries that folder: run(command="bash scripts/gpu-run.sh", carry=["carry"]).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared=${SHARED:-../shared}
cargo build --release --quiet
rm -rf carry && mkdir -p carry/bin carry/tests carry/anchors
cp target/release/multiq carry/bin/
# Test binaries: the library's unit tests, the pool tests and the GPU tests. (tests/cli.rs
# runs the binary by its path on this machine, so it stays here; it needs no GPU.)
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if t["name"] in ("multiq", "pool", "gpu", "coalesce", "gpu_mlp", "tensor", "mlp") and t["kind"] != ["bin"]:
        name = "unit" if t["kind"] == ["lib"] else t["name"]
        shutil.copy(m["executable"], "carry/tests/" + name)
'
# The host probe of spinning with and without `pause` (scripts/probes/spin-gaps.c).
gcc -O2 -pthread scripts/probes/spin-gaps.c -o carry/bin/spin-gaps
strip carry/bin/* carry/tests/*  # debug info would push the carry past its 64 MiB limit
# torch_mt.py (the PyTorch peer of bench matmul/mlp) travels with the anchors: ../shared does
# not reach the GPU machine.
cp "$shared"/anchors/*.cu "$shared"/anchors/*.py carry/anchors/
test -f carry/anchors/torch_mt.py || { echo "torch_mt.py missing from $shared/anchors" >&2; exit 1; }
{ echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)"; echo "built $(date -u +%FT%TZ)"; } > carry/BUILD
du -sh carry
