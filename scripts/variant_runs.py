"""The runs of a GPU variant call's folder (scripts/gpu-*-record.sh), for their choice rules.

    from variant_runs import load
    runs, ok = load(folder)   # [(variant, run)], True if there was a run and all verified

A file `NAME-R.json` holds round R of variant NAME; `run` is one entry of its "runs".
"""
import glob
import json
import re


def load(folder, pattern="*-[0-9].json"):
    out, ok = [], True
    for f in sorted(glob.glob(folder + "/" + pattern)):
        variant = re.match(r"(.*)-\d+\.json$", f.split("/")[-1])[1]
        for r in json.load(open(f))["runs"]:
            ok &= bool(r["verified"])
            out.append((variant, r))
    return out, ok and bool(out)
