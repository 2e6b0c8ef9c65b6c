#!/usr/bin/env python3
"""Several results files of `multiq bench queues` from one call as one: the first file's
header (device, commit, start), every file's runs in order, the commands joined with "; "
(each ran as written), skipped runs and notes concatenated.

usage: merge-runs.py A.json B.json ... > merged.json
"""
import json
import sys

if len(sys.argv) < 2:
    sys.exit(__doc__)
files = [json.load(open(p)) for p in sys.argv[1:]]
out = dict(files[0])
out["command"] = "; ".join(f["command"] for f in files)
for key in ("runs", "skipped", "notes"):
    out[key] = [x for f in files for x in f.get(key, [])]
json.dump(out, sys.stdout, indent=1)
print()
