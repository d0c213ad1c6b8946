#!/usr/bin/env python3
"""Inside the ioregionfd VM (bench/run.py starts it): what one access costs
when the demo's forwarded device answers it through the VMM (KVM_EXIT_MMIO,
the vCPU thread asks the device thread, KVM_RUN again) and when kvm.ko sends
it to the same kind of device thread over ioregionfd.

Two figures, both as ioregionfd / userspace ratios from this one run:
- guest-visible: wall time per access of the demo running only that
  device's reads (the device threads answer at once: --delay-us 0);
- ioregtrace's round-trip latencies of a run with both (userspace: exit to
  next KVM_RUN; ioregionfd: command sent to response received).

    vm_round_trip.py OUT.json [--reads N]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

BIN = os.path.dirname(sys.executable)
IOREGTRACE = os.path.join(BIN, "ioregtrace")
FORWARD_MMIO, IOREGION_MMIO = 0x10001000, 0x10004000


def demo_wall_per_access(block, reads):
    res = subprocess.run([IOREGTRACE, "demo", "--scale", "0", "--delay-us", "0",
                          "--set", f"{block}={reads}"], capture_output=True, text=True)
    m = re.search(r"(\d+) accesses in ([\d.]+) s", res.stderr)
    if res.returncode != 0 or not m:
        sys.exit(f"vm_round_trip: demo failed: {res.stderr[-500:]}")
    # the program's control writes are a handful of exits among `reads`
    return float(m.group(2)) / int(m.group(1))


def traced_means(reads):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "stat.json")
        res = subprocess.run([IOREGTRACE, "stat", "--json", "-o", out, "--", IOREGTRACE,
                              "demo", "--scale", "0", "--delay-us", "0",
                              "--set", f"forward-read={reads}",
                              "--set", f"ioregionfd-read={reads}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"vm_round_trip: stat failed: {res.stderr[-500:]}")
        with open(out) as f:
            doc = json.load(f)
    rows = {(r["address"], r["path"]): r for r in doc["rows"]}
    fwd, direct = rows[(FORWARD_MMIO, "userspace")], rows[(IOREGION_MMIO, "ioregionfd")]
    cand = [c for c in doc["candidates"] if c["region"] == f"mmio@{FORWARD_MMIO:#x}"][0]
    return {"userspace_p50_us": fwd["latency_us"]["p50"],
            "ioregionfd_p50_us": direct["latency_us"]["p50"],
            "userspace_mean_us": cand["userspace_mean_us"],
            "ioregionfd_mean_us": cand["ioregionfd_mean_us"],
            "counts": [fwd["count"], direct["count"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--reads", type=int, default=2000)
    args = ap.parse_args()
    userspace = demo_wall_per_access("forward-read", args.reads)
    ioregionfd = demo_wall_per_access("ioregionfd-read", args.reads)
    traced = traced_means(args.reads)
    result = {"reads": args.reads,
              "guest_visible_us": {"userspace": userspace * 1e6, "ioregionfd": ioregionfd * 1e6},
              "guest_visible_ratio": ioregionfd / userspace,
              "traced": traced,
              "traced_ratio_mean": traced["ioregionfd_mean_us"] / traced["userspace_mean_us"],
              "traced_ratio_p50": traced["ioregionfd_p50_us"] / traced["userspace_p50_us"]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
