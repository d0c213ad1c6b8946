#!/usr/bin/env python3
"""Per-event cost of the BPF programs a process holds, from the kernel's
own accounting (kernel.bpf_stats_enabled: run_time_ns / run_cnt in each
program fd's fdinfo).  It moves far less than throughput with the noise of
a shared machine.

    bench/prog_cost.py PID     -> one line per program that ran
"""

import os
import sys


def bpf_stats_enabled(on=None):
    path = "/proc/sys/kernel/bpf_stats_enabled"
    if on is not None:
        with open(path, "w") as f:
            f.write("1" if on else "0")
    with open(path) as f:
        return f.read().strip() == "1"


def programs(pid):
    """[(prog_id, name, run_cnt, run_time_ns)] of the programs `pid` holds."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if "prog_type" not in fields:
            continue
        out.append((int(fields["prog_id"]), fields.get("prog_tag", "").strip(),
                    int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))))
    return out


if __name__ == "__main__":
    for prog_id, tag, cnt, ns in sorted(programs(int(sys.argv[1]))):
        if cnt:
            print(f"prog {prog_id} {tag}: {cnt} runs, {ns / cnt:.0f} ns/run")
