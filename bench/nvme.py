"""make bench's NVMe phase (issue 18): QEMU's NVMe controller four ways,
each a nested Linux guest in the test VM doing 4 KiB random reads at
iodepth 1 and 16 (e2e/workloads.py BENCH):

- stock: the BAR served by vCPU threads (ioeventfd off);
- ioeventfd: ioeventfd=on, doorbells of the I/O queues by eventfd once the
  guest driver turns on shadow doorbells (Linux does);
- ioregionfd: ioregionfd=on (qemu/patches), the registers and doorbells
  sent by kvm.ko to a device thread, doorbells posted, served under the
  BQL, completions in the main loop;
- iothread: iothread= and ioregionfd=on, the controller owned by an
  IOThread: the BAR's accesses arrive there, submission and completion are
  processed there, interrupts go through a main-loop bottom half.

All on the built QEMU, in one boot of the test VM, each watched by
`ioregtrace stat` (the same tracer for all four).  The test VM is QEMU TCG
and the guest runs nested under its KVM: absolute IOPS mean nothing here,
so only ratios to the stock device are reported, with their spread over
the repeats.  Next to the measured saving stands the one ioregtrace
predicted from the stock run alone: the time the NVMe BAR's userspace round
trips took, which is the most ioregionfd can give back."""

import os
import re
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))

import host  # noqa: E402
from workloads import BENCH, BENCH_READS, BENCH_REPEATS  # noqa: E402

CONFIGS = ("stock", "ioeventfd", "ioregionfd", "iothread")
SAVERS = ("ioregionfd", "iothread")         # what the predicted saving is for
IOLOAD = re.compile(r"ioload: \S+ rand iodepth (\d+): (\d+) reads in ([\d.]+) s, (\d+) IOPS")


def parse_console(console):
    """{iodepth: [(IOPS, seconds), ...]} in the order the guest ran them."""
    out = {}
    for m in IOLOAD.finditer(console):
        out.setdefault(int(m.group(1)), []).append((int(m.group(4)), float(m.group(3))))
    return out


def nvme_userspace_ms(stat):
    """What ioregtrace's candidates ranking says the NVMe BAR's userspace
    round trips took: the most ioregionfd could save."""
    return sum(c["userspace_ms"] for c in (stat or {}).get("candidates", [])
               if c["region"] == "nvme")


def ratios(runs):
    """{config: {iodepth: {median, min, max}}}: each repeat's IOPS over the
    stock device's IOPS in the same repeat."""
    out = {}
    for config in CONFIGS[1:]:
        out[config] = {}
        for depth in BENCH_READS:
            r = [iops / base[0] for (iops, _), base in
                 zip(runs[config][depth], runs["stock"][depth], strict=True)]
            out[config][depth] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def summarize(results):
    """results: {config: (run.json, stat.json)} -> the phase's figures."""
    runs = {}
    for config in CONFIGS:
        run, _ = results[config]
        parsed = parse_console(run["console"])
        for depth in BENCH_READS:
            if len(parsed.get(depth, [])) != BENCH_REPEATS:
                raise RuntimeError(f"NVMe {config}: {len(parsed.get(depth, []))} runs at "
                                   f"iodepth {depth}, expected {BENCH_REPEATS}; console: "
                                   f"{run['console'][-800:]}")
        runs[config] = parsed
    read_s = {c: sum(s for depth in BENCH_READS for _, s in runs[c][depth]) for c in CONFIGS}
    return {"repeats": BENCH_REPEATS, "reads": BENCH_READS, "iops": runs,
            "ratios": ratios(runs), "read_s": read_s,
            "predicted_saving_ms": nvme_userspace_ms(results["stock"][1]),
            "measured_saving_ms": {c: (read_s["stock"] - read_s[c]) * 1000.0 for c in SAVERS},
            "paths": {c: sorted({(r["region"], r["path"]) for r in (results[c][1] or {})
                                 .get("rows", []) if r["region"] == "nvme"})
                      for c in CONFIGS}}


def run(log):
    names = [w.name for w in BENCH]
    with tempfile.TemporaryDirectory(prefix="ioregtrace-bench-nvme-") as share:
        results = host.run(names, share)
    figures = summarize({config: results[f"bench-nvme-{config}"] for config in CONFIGS})
    for config, per_depth in figures["ratios"].items():
        log("  nvme: " + config + ": " + ", ".join(
            f"iodepth {d} IOPS x{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f})"
            for d, r in per_depth.items()))
    log(f"  nvme: saving predicted {figures['predicted_saving_ms']:.0f} ms, measured "
        + ", ".join(f"{c} {ms:.0f} ms" for c, ms in figures["measured_saving_ms"].items()))
    return figures


def report(figures):
    lines = [f"\nQEMU's NVMe, 4 KiB random reads in a nested Linux guest, {figures['repeats']} "
             "repeats in one boot each (test VM: QEMU TCG, so ratios only; absolute IOPS mean "
             "nothing here): IOPS over the stock device's, median (min..max)"]
    for config, per_depth in figures["ratios"].items():
        lines.append(f"  {config:12} " + "   ".join(
            f"iodepth {d}: x{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f})"
            for d, r in per_depth.items()))
    lines.append("  time the reads took: " + ", ".join(
        f"{c} {s:.1f} s" for c, s in figures["read_s"].items()))
    lines.append(f"  ioregionfd saving: predicted by ioregtrace from the stock run (NVMe BAR "
                 f"userspace round trips) {figures['predicted_saving_ms']:.0f} ms, measured "
                 f"(stock's read time minus theirs) " + ", ".join(
                     f"{c} {ms:.0f} ms" for c, ms in figures["measured_saving_ms"].items()))
    lines.append("  NVMe BAR paths seen: " + "; ".join(
        f"{c}: {', '.join(p for _, p in paths) or '-'}" for c, paths in figures["paths"].items()))
    return "\n".join(lines)
