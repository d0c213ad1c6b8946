#!/usr/bin/env python3
"""The floor probe: the cheapest useful tracer of guest MMIO, one raw
tracepoint on kvm_mmio with one BPF hash increment (keyed by gpa).  Every
other tool's overhead is compared with this one's, from the same run.
Prints "attached" once it is; Ctrl-C/SIGTERM to stop.

    floor.py --empty: the same tracepoint with a program that does nothing,
    whose BPF time is what the kernel's accounting itself adds to each run."""

import signal
import sys
import threading

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from ioregtrace import headers  # noqa: E402

PROGRAM = r"""
BPF_HASH(counts, u64, u64, 65536);
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	u64 gpa = ctx->args[2];
	counts.increment(gpa);
	return 0;
}
"""


EMPTY = r"""
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	return 0;
}
"""


def main():
    import os
    path, _ = headers.find(build=True)
    if path and path != headers.running_build_dir():
        os.environ["BCC_KERNEL_SOURCE"] = path
    from bcc import BPF
    empty = "--empty" in sys.argv[1:]
    b = BPF(text=EMPTY if empty else PROGRAM, cflags=["-Wno-ignored-attributes"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("attached", flush=True)
    stop.wait()
    if not empty:
        print(sum(v.value for v in b["counts"].values()), flush=True)


if __name__ == "__main__":
    main()
