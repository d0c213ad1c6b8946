#!/usr/bin/env python3
"""The floor probe: the cheapest useful tracer of guest MMIO, one raw
tracepoint on kvm_mmio with one BPF hash increment (keyed by gpa).  Every
other tool's overhead is compared with this one's, from the same run.
Prints "attached" once it is; Ctrl-C/SIGTERM to stop.

    floor.py --empty: the same tracepoint with a program that does nothing,
    whose BPF time is what the kernel's accounting itself adds to each run.
    floor.py --clock: a program that only reads the clock, once.
    floor.py --sys-enter: a program that does nothing on the raw sys_enter
    tracepoint, the cheapest way to see every syscall (registrations).
    floor.py --ioctl: a program that does nothing on syscalls:sys_enter_ioctl,
    the hook ioregtrace uses: what the hook costs before its program runs."""

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

# The helper is a call through a pointer to LLVM: kept although unused.
CLOCK = r"""
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	bpf_ktime_get_ns();
	return 0;
}
"""

SYS_ENTER = r"""
RAW_TRACEPOINT_PROBE(sys_enter)
{
	return 0;
}
"""

IOCTL = r"""
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
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
    modes = {"--empty": EMPTY, "--clock": CLOCK, "--sys-enter": SYS_ENTER, "--ioctl": IOCTL}
    text = modes.get(sys.argv[1], PROGRAM) if sys.argv[1:] else PROGRAM
    b = BPF(text=text, cflags=["-Wno-ignored-attributes"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("attached", flush=True)
    stop.wait()
    if text is PROGRAM:
        print(sum(v.value for v in b["counts"].values()), flush=True)


if __name__ == "__main__":
    main()
