#!/usr/bin/env python3
"""Numerics check of multiq's MLP against PyTorch, for the same weights file.

usage: mlp_check.py WEIGHTS.safetensors OUT.safetensors [OUT2.safetensors ...]

WEIGHTS is the file `multiq weights` wrote (nn.Sequential state-dict names); each OUT is what
`multiq mlp-run` wrote: `input` [rows, 512] and multiq's `output` [rows, 512]. The script loads
the weights into torch.nn.Sequential(Linear(512,1024), ReLU(), Linear(1024,1024), ReLU(),
Linear(1024,512)) with load_state_dict (so every name and shape must match PyTorch's own), runs
the same input in fp32 on the GPU (TF32 off) and in float64 on the CPU, and compares:
  normwise relative error = max|multiq - torch| / max|torch|   (must be <= 1e-4)
Exit 0 when every file passes, 1 otherwise. Needs only torch (safetensors is parsed here).
"""
import copy
import json
import struct
import sys

import torch

TOLERANCE = 1e-4


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(body[a:b]), dtype=torch.float32).reshape(info["shape"])
        out[name] = t
    return out


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    state = load_safetensors(sys.argv[1])
    mlp = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 512))
    mlp.load_state_dict(state, strict=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mlp32 = mlp.to(dev).eval()
    mlp64 = copy.deepcopy(mlp).to("cpu").double().eval()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}; "
          f"{sum(p.numel() for p in mlp.parameters()):,} parameters; tolerance {TOLERANCE:g} (normwise relative)")
    ok = True
    for path in sys.argv[2:]:
        t = load_safetensors(path)
        x, y = t["input"], t["output"]
        with torch.no_grad():
            ref32 = mlp32(x.to(dev)).float().cpu()
            ref64 = mlp64(x.double())
        scale = ref32.abs().max().item()
        err32 = (y - ref32).abs().max().item() / scale
        err64 = (y.double() - ref64).abs().max().item() / ref64.abs().max().item()
        torch_vs_64 = (ref32.double() - ref64).abs().max().item() / ref64.abs().max().item()
        elem = ((y - ref32).abs() / ref32.abs().clamp_min(1e-3 * scale)).max().item()
        passed = err32 <= TOLERANCE
        ok &= passed
        print(f"{path}: rows {x.shape[0]}: multiq vs torch fp32 {err32:.3e} (elementwise, floor 1e-3·max: "
              f"{elem:.3e}); multiq vs float64 {err64:.3e}; torch fp32 vs float64 {torch_vs_64:.3e}: "
              f"{'PASS' if passed else 'FAIL'}")
    print("numerics:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
