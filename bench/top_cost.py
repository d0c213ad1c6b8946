#!/usr/bin/env python3
"""What ioregtop's own Python costs per minute on a big snapshot, without
BPF or a terminal: a QEMU-like VM whose guest touched KEYS distinct keys
(VGA memory over a few memory-map generations, as a SeaBIOS boot does),
of which only a handful change between refreshes.

    bench/top_cost.py [--keys 20000] [--group region|address] [--minutes 1]

Per simulated minute: 60 refreshes (-i 1) and 600 screens (the view
redraws every 100 ms).  Only the model's refresh and the screen's text
are timed (process CPU time); building the synthetic snapshots is not.
Prints CPU seconds per minute."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ioregtrace import histogram  # noqa: E402
from ioregtrace.keys import AccessKey, Op, Path, Space  # noqa: E402
from ioregtrace.probes import LatencyStats, RawSnapshot, VmInfo  # noqa: E402
from ioregtrace.qemu.layout import LayoutHistory  # noqa: E402
from ioregtrace.recording import Recording, VmFacts  # noqa: E402
from ioregtrace.views import top  # noqa: E402

VM, PID = 1, 4242
GENERATIONS = 8          # memory maps the keys were made under
RANGES = 300             # flat ranges per map (a PC guest has a few hundred)
CHANGING = 20            # keys whose count moves between two refreshes


def history():
    """A mirrored map of GENERATIONS flat views: VGA's low memory at
    0xa0000 among RANGES small device regions, and a few port ranges."""
    h = LayoutHistory()
    for gen in range(1, GENERATIONS + 1):
        fv = 0x1000 + gen
        h.add_section(gen, Space.MMIO, fv, 0, 0xa0000, "pc.ram", 0, 0x10)
        h.add_section(gen, Space.MMIO, fv, 0xa0000, 0x20000, "vga-lowmem", 0, 0x20)
        for i in range(RANGES):
            h.add_section(gen, Space.MMIO, fv, 0xfe000000 + i * 0x1000, 0x1000,
                          f"dev{i}-mmio", 0, 0x100 + i)
        h.add_section(gen, Space.PIO, fv + 0x100, 0x3c0, 0x20, "vga", 0, 0x30)
        h.add_section(gen, Space.PIO, fv + 0x100, 0x70, 2, "rtc", 0, 0x40)
    return h


def keys(n):
    """n distinct VGA keys, spread over the generations and both ops."""
    out = []
    for i in range(n):
        addr = 0xa0000 + (i // (2 * GENERATIONS)) % 0x20000
        op = Op.WRITE if i % 2 else Op.READ
        gen = 1 + (i // 2) % GENERATIONS
        out.append(AccessKey(PID, Space.MMIO, addr, 1, op, Path.USERSPACE, gen))
    return out


def latency(count):
    slots = [0] * histogram.SLOTS
    slots[histogram.slot_of(20_000)] = count
    return LatencyStats(count, count * 20_000, 20_000, slots)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--group", choices=top.GROUPS, default="region")
    ap.add_argument("--minutes", type=float, default=1.0)
    args = ap.parse_args()

    all_keys = keys(args.keys)
    counts = {(VM, k): 1 + i % 7 for i, k in enumerate(all_keys)}
    lats = {(VM, k): latency(n) for (vm, k), n in list(counts.items())[:500]}
    facts = {VM: VmFacts(VM, name="seabios", history=history())}
    model = top.TopModel(group=args.group)
    refreshes = int(60 * args.minutes)
    cpu = 0.0
    for t in range(1, refreshes + 1):
        for j in range(CHANGING):                       # a few keys move
            k = all_keys[(t * 7919 + j * 104729) % len(all_keys)]
            counts[(VM, k)] += 3
            if (VM, k) in lats:
                lats[(VM, k)] = latency(lats[(VM, k)].count + 3)
        snap = RawSnapshot(taken=float(t), accesses=dict(counts), latencies=dict(lats),
                           vms={VM: VmInfo(PID, VM, True, "qemu-system-x86")},
                           counters={"lost_events": 0, "dropped_accesses": 0})
        rec = Recording(snapshot=snap, duration_s=float(t), vms=facts)
        start = time.process_time()
        model.refresh(rec, float(t), 1)
        for _ in range(10):
            top.lines(model, 80, 24, "tracing")
        cpu += time.process_time() - start
    print(f"{args.keys} keys, group {args.group}: {cpu / args.minutes:.2f} CPU s per minute "
          f"({1000 * cpu / refreshes:.1f} ms per refresh and its 10 screens)")


if __name__ == "__main__":
    main()
