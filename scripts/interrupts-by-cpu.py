#!/usr/bin/env python3
"""Interrupts and softirqs taken by each CPU between two snapshots of /proc/interrupts and
/proc/softirqs (scripts/gpu-pause-record.sh takes them around its variant runs): which CPUs the
machine's interrupt work lands on, and so which CPU leaves a submitting thread less of itself.

usage: interrupts-by-cpu.py BEFORE AFTER
Prints one line per CPU: interrupts, softirqs, and the sources that took most of its interrupts.
"""
import sys


def parse(path):
    """{(table, source): [count per CPU]} from a file holding both tables one after another."""
    counts, cpus, table = {}, 0, "irq"
    for line in open(path):
        fields = line.split()
        if not fields:
            continue
        if fields[0].startswith("CPU"):
            cpus = len(fields)
            table = "softirq" if table == "irq" and counts else table
            continue
        if not fields[0].endswith(":") or cpus == 0:
            continue
        values = []
        for f in fields[1:1 + cpus]:
            if not f.isdigit():
                break
            values.append(int(f))
        if len(values) == cpus:
            name = fields[0].rstrip(":")
            label = " ".join(fields[1 + cpus:])[-40:] if table == "irq" else ""
            counts[(table, f"{name} {label}".strip())] = values
    return counts, cpus


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    before, _ = parse(argv[0])
    after, cpus = parse(argv[1])
    for cpu in range(cpus):
        irq, soft, top = 0, 0, []
        for key, values in after.items():
            old = before.get(key, [0] * cpus)
            d = values[cpu] - (old[cpu] if cpu < len(old) else 0)
            if key[0] == "irq":
                irq += d
                top.append((d, key[1]))
            else:
                soft += d
        top = ", ".join(f"{name} {d:,}" for d, name in sorted(top, reverse=True)[:3] if d > 0)
        print(f"CPU{cpu:<3} interrupts {irq:>10,}  softirqs {soft:>10,}  most: {top}")


if __name__ == "__main__":
    main(sys.argv[1:])
