#!/usr/bin/env python3
"""One recorded coalescing run (scripts/gpu-coalesce.sh) as bench/results/<device>/coalesce.json:
the runs of coalesce-small.json and coalesce-large.json with their commands, and the anchors'
output (mq.cu, launch.cu) verbatim, all from the same GPU call.

usage: coalesce-json.py DIR > coalesce.json
"""
import json
import sys

d = sys.argv[1]
small = json.load(open(d + "/coalesce-small.json"))
large = json.load(open(d + "/coalesce-large.json"))
out = {k: v for k, v in small.items() if k not in ("runs", "command", "skipped")}
out["command"] = [small["command"], large["command"]]
out["runs"] = small["runs"] + large["runs"]
out["skipped"] = small.get("skipped", []) + large.get("skipped", [])
out["anchors"] = {
    "mq.cu": open(d + "/anchor-mq.txt").read(),
    "launch.cu": open(d + "/anchor-launch.txt").read(),
}
json.dump(out, sys.stdout, indent=1)
print()
