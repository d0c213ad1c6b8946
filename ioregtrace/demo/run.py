"""`ioregtrace demo`: run the built-in VM once and report its own truth."""

import json
import os
import signal
import sys

from ..views.stat import JSON_VERSION
from .mix import build_mix
from .vmm import DemoVM


def _comm():
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def truth_document(vm, elapsed):
    return {"version": JSON_VERSION, "duration_s": elapsed, "lost_events": 0,
            "dropped_keys": 0, "rows": vm.truth.rows(_comm()),
            # KVM_RUN returns by kvm_run.exit_reason, as the VMM saw them
            "exits": {str(reason): n for reason, n in sorted(vm.exit_reasons.items())},
            "cpuid": vm.cpuid}


def run(scale=1.0, counts=None, delay_us=1000, wait_signal=False, churn=False, repeat=1,
        truth_path=None, pass_log=None, log=None, cpuid=0):
    log = log or (lambda msg: print(f"ioregtrace demo: {msg}", file=sys.stderr, flush=True))
    sync = None
    if wait_signal:
        # Blocked before any thread exists, so every thread inherits the
        # mask and the signal waits for sigwait instead of killing us.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

        def sync():
            log(f"pid {os.getpid()} ready; warm-up done, waiting for SIGUSR1")
            signal.sigwait({signal.SIGUSR1})
            log("measuring")
    mix = build_mix(scale, counts)
    passes = open(pass_log, "a", buffering=1) if pass_log else None
    vm = DemoVM(mix, delay_s=delay_us / 1e6, sync=sync, churn=churn, repeat=repeat,
                pass_log=passes, cpuid=cpuid)
    try:
        vm.load_program()
        elapsed = vm.run_guest()
    finally:
        vm.close()
        if passes:
            passes.close()
    doc = truth_document(vm, elapsed)
    total = sum(r["count"] for r in doc["rows"])
    log(f"{total} accesses in {elapsed:.3f} s ({total / max(elapsed, 1e-9):.0f}/s), "
        f"{vm.exits} exits to userspace, {vm.cpu_s:.3f} s vCPU CPU time "
        f"({total / max(vm.cpu_s, 1e-9):.0f}/CPU-s)")
    if truth_path:
        with open(truth_path, "w") as f:
            json.dump(doc, f, indent=1)
    return doc
