#!/usr/bin/env python3
"""A/B of BPF sources: the BPF time per guest access of ioregtrace's program
built from each source, loaded in turn on the same demo workload, with the
floor probe and an empty program in every repeat.  For trying a change to
bpf/ioregtrace.bpf.c before `make bench`.

    bench/ab.py [--workload in-kernel|userspace] [--repeats N] [--events]
                SOURCE...

Per repeat and source: gross ns per access, net of the accounting (the
empty program's ns per run, from the same repeat, times the runs), the net
as a ratio to the floor's in that repeat (the machine's slow spells move
both), and ns per run of each program.  Then min / median / max over the
repeats.  Run as root, nothing else tracing."""

import argparse
import collections
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import floor  # noqa: E402
import run as bench  # noqa: E402
from prog_cost import bpf_stats_enabled, programs  # noqa: E402

from ioregtrace import headers, probes  # noqa: E402

# Five times one pass of the bench's mix: long enough for a stable figure.
PASSES = 5


def demo_cost(workload):
    """Run the demo once with the stats on: (ns per access, runs per access,
    {program id: (runs, ns)}) of every program this process holds."""
    before = {p[0]: p for p in programs(os.getpid())}
    bpf_stats_enabled(True)
    try:
        _, accesses, _ = bench.demo_rate(workload, PASSES)
    finally:
        bpf_stats_enabled(False)
    per_prog = {}
    for prog_id, _, cnt, ns in programs(os.getpid()):
        _, _, cnt0, ns0 = before.get(prog_id, (0, "", 0, 0))
        if cnt > cnt0:
            per_prog[prog_id] = (cnt - cnt0, ns - ns0)
    runs = sum(c for c, _ in per_prog.values())
    spent = sum(n for _, n in per_prog.values())
    return spent / accesses, runs / accesses, per_prog


def with_text(text, workload):
    from bcc import BPF
    b = BPF(text=text, cflags=["-Wno-ignored-attributes"])
    try:
        return demo_cost(workload)
    finally:
        b.cleanup()


def with_source(path, workload, events=False):
    """The cost, and {program name: ns per run} of ioregtrace's programs
    (`events`: in event mode, as `record --events` runs them)."""
    probes.BPF_SOURCE = path
    tracer = probes.Tracer(events=10**8 if events else None)
    try:
        names = {}
        for name, fn in tracer.bpf.funcs.items():
            with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                prog_id = int(dict(line.split(":", 1) for line in f if ":" in line)["prog_id"])
            names[prog_id] = name.decode().split("__")[-1]
        ns, runs, per_prog = demo_cost(workload)
    finally:
        tracer.close()
    # Programs that ran a handful of times (setup, the demo's start and end)
    # only show their first, cold runs.
    return ns, runs, {names.get(p, str(p)): n / c for p, (c, n) in per_prog.items()
                      if c >= 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(bench.WORKLOADS), default="in-kernel")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--events", action="store_true", help="event mode (record --events)")
    ap.add_argument("sources", nargs="+", help="BPF sources to compare")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ab: must run as root")
    path, _ = headers.find(build=True)
    if path and path != headers.running_build_dir():
        os.environ["BCC_KERNEL_SOURCE"] = path
    figures = collections.defaultdict(list)
    for r in range(args.repeats):
        _, _, empty = with_text(floor.EMPTY, args.workload)
        per_run = sum(n for _, n in empty.values()) / max(sum(c for c, _ in empty.values()), 1)
        ns, runs, _ = with_text(floor.PROGRAM, args.workload)
        floor_net = ns - runs * per_run
        figures["floor net"].append(floor_net)
        line = [f"accounting {per_run:.0f} ns/run, floor net {floor_net:.0f}"]
        for src in args.sources:
            ns, runs, per_prog = with_source(src, args.workload, args.events)
            net = ns - runs * per_run
            figures[f"{src} gross"].append(ns)
            figures[f"{src} net"].append(net)
            figures[f"{src} net / floor"].append(net / floor_net)
            for name, v in per_prog.items():
                figures[f"{src} {name} ns/run"].append(v)
            line.append(f"{os.path.basename(src)} {ns:.0f} gross, {net:.0f} net "
                        f"({net / floor_net:.2f} x floor), {runs:.2f} runs")
        print(f"repeat {r + 1}: " + "; ".join(line), flush=True)
    print(f"\n{args.workload}, {args.repeats} repeats: min / median / max")
    for name, v in figures.items():
        print(f"  {name:60} {min(v):8.2f} {statistics.median(v):8.2f} {max(v):8.2f}")


if __name__ == "__main__":
    main()
