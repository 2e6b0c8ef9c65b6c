#!/usr/bin/env python3
"""Compiles multiq's CUDA kernels with NVRTC, as the CUDA backend does at run time, on a machine
without a GPU: a compile check for kernel edits, and ptxas's resource report (registers,
shared memory) for the architecture asked for.

NVRTC comes from PyPI's nvidia-cuda-nvrtc-cu12 wheel (no GPU or driver needed):
    pip download --no-deps nvidia-cuda-nvrtc-cu12 -d /tmp/nvrtc && cd /tmp/nvrtc && unzip -q *.whl
    python3 scripts/nvrtc-check.py --nvrtc /tmp/nvrtc            # or NVRTC_LIB=.../libnvrtc.so.12
Options: --arch sm_90 (default; the H100/H200), --verbose (ptxas's full report).
Exit status: 0 when every source compiles, 1 otherwise, 2 when NVRTC cannot be found.
"""
import argparse
import ctypes
import glob
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CUDA = os.path.join(ROOT, "src", "backend", "cuda")


def read(name):
    with open(os.path.join(CUDA, name)) as f:
        return f.read()


def kernels_rs_source():
    """The `SOURCE` raw string of kernels.rs (its element-wise kernels)."""
    text = read("kernels.rs")
    m = re.search(r'const SOURCE: &str = r#"(.*?)"#;', text, re.S)
    if not m:
        sys.exit("nvrtc-check: SOURCE not found in kernels.rs")
    return m.group(1)


def find_nvrtc(hint):
    candidates = []
    if os.environ.get("NVRTC_LIB"):
        candidates.append(os.environ["NVRTC_LIB"])
    if hint:
        candidates += glob.glob(os.path.join(hint, "**", "libnvrtc.so*"), recursive=True)
    candidates += ["libnvrtc.so", "libnvrtc.so.12"]
    for c in candidates:
        if "builtins" in os.path.basename(c):
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def compile_one(lib, name, src, opts):
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if r != 0:
        print(f"{name}: nvrtcCreateProgram failed ({r})")
        return 1
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    r = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    print(f"{name}: {'ok' if r == 0 else 'FAILED'}")
    if text:
        print("  " + text.replace("\n", "\n  "))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return 0 if r == 0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", help="folder holding libnvrtc.so* (searched recursively)")
    ap.add_argument("--arch", default="sm_90", help="real architecture to compile for (default sm_90)")
    ap.add_argument("--verbose", action="store_true", help="ptxas's full resource report")
    args = ap.parse_args()
    lib = find_nvrtc(args.nvrtc)
    if lib is None:
        print("nvrtc-check: libnvrtc not found (see --help)", file=sys.stderr)
        return 2
    # As kernels.rs and skinny.rs build them (a real architecture instead of compute_XY, so
    # ptxas runs and reports resources).
    opts = ["--use_fast_math", f"--gpu-architecture={args.arch}"]
    if args.verbose:
        opts.append("--ptxas-options=-v")
    pdl = read("pdl.cuh")
    units = [
        ("kernels+queue", pdl + kernels_rs_source() + read("queue_kernel.cu")),
        ("skinny", pdl + read("skinny_kernel.cu")),
    ]
    rc = 0
    for name, src in units:
        rc |= compile_one(lib, name, src, opts)
    return rc


if __name__ == "__main__":
    sys.exit(main())
