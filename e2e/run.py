"""Run end-to-end workloads under `ioregtrace stat`, inside the test VM.

For each workload: a fresh QEMU/KVM boot of the guest (the test VM's own
kernel, e2e/guest.py's initramfs) with the workload's devices, wrapped by
`ioregtrace stat --json`, and with QEMU's own trace of every call of a
region's handler (memory_region_ops_read/write).  The trace stays here,
summarized per region and op (handler calls and bytes, every thread:
vCPUs and the main loop draining coalesced writes), next to ioregtrace's
JSON in OUT/NAME/: what e2e/check.py compares.

    python3 e2e/run.py --kernel BZIMAGE --initrd CPIO --out DIR NAME...
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "kernel"))

import vm  # noqa: E402  (kernel/vm.py: tsc_args, kernel_complaints)

from workloads import BY_NAME  # noqa: E402

IOREGTRACE = os.path.join(REPO, ".venv", "bin", "ioregtrace")
IOREGTOP = os.path.join(REPO, ".venv", "bin", "ioregtop")
# A workload still running then is interrupted: ioregtrace still writes
# what it saw and ends QEMU, and the check says the workload did not finish.
# (One takes under a minute.)
TIMEOUT_S = 180
RETRIES = 2            # boots after a hung one (see main)
# The guest's clock: its TSC, at the frequency this VM was given (nested
# under TCG, calibrating against the PIT fails as it does one level up).
# Left to itself the guest picks QEMU's HPET and reads it on every clock
# read, a userspace exit each, more than any device it drives.  (kvm-clock,
# CONFIG_KVM_GUEST, would be the usual answer: not tried beyond one boot,
# e2e/NOTES.md.)
CLOCK = "clocksource=tsc" + vm.tsc_args()
LOG_LINE = re.compile(r"memory_region_ops_(read|write) cpu (-?\d+) mr \S+ addr \S+ "
                      r"value \S+ size (\d+) name '(.*)'$")
# The built QEMU's account of each command its ioregionfd regions received
# (qemu/patches: softmmu/ioregionfd.c), before it dispatches it.
IOREGIONFD_LINE = re.compile(r"ioregionfd_(read|write) (\S+) addr \S+ size (\d+) ")


def qemu_argv(workload, kernel, initrd, disk, console, log, built_qemu=None):
    devices = [a.format(disk=disk) for a in workload.devices]
    if workload.qemu == "built" and not built_qemu:
        raise SystemExit(f"e2e: {workload.name} needs the QEMU of qemu/build.sh (--qemu)")
    binary = built_qemu if workload.qemu == "built" else "qemu-system-x86_64"
    return [binary, "-accel", workload.accel, "-cpu", "host", "-m", "256", "-smp", "1",
            "-nodefaults", *([] if workload.reboot else ["-no-reboot"]),
            "-display", "none", "-name", f"guest={workload.name}",
            "-serial", f"file:{console}", "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 quiet panic=-1 {CLOCK} e2e={workload.name}", *devices,
            "-trace", "memory_region_ops_read", "-trace", "memory_region_ops_write",
            *(["-trace", "ioregionfd_*"] if workload.qemu == "built" else []),
            "-D", log]


def summarize_log(path):
    """{"region|op": [handler calls, bytes]} of QEMU's trace, all threads,
    and {"region|op": [commands, bytes]} its ioregionfd regions received."""
    out = collections.defaultdict(lambda: [0, 0])
    commands = collections.defaultdict(lambda: [0, 0])
    with open(path, errors="replace") as f:
        for line in f:
            m = LOG_LINE.search(line.rstrip("\n"))
            if m:
                entry = out[f"{m.group(4)}|{m.group(1)}"]
                entry[0] += 1
                entry[1] += int(m.group(3))
                continue
            m = IOREGIONFD_LINE.search(line)
            if m:
                entry = commands[f"{m.group(2)}|{m.group(1)}"]
                entry[0] += 1
                entry[1] += int(m.group(3))
    return dict(out), dict(commands)


def run_one(workload, kernel, initrd, out_dir, built_qemu=None):
    os.makedirs(out_dir, exist_ok=True)
    scratch = os.environ.get("TMPDIR", "/tmp")
    disk = os.path.join(scratch, f"e2e-{workload.name}.img")
    with open(disk, "wb") as f:
        f.truncate(workload.disk_mb << 20)
    console = os.path.join(scratch, f"e2e-{workload.name}.console")
    log = os.path.join(scratch, f"e2e-{workload.name}.qemu.log")
    stat_json = os.path.join(out_dir, "stat.json")
    bundle = os.path.join(scratch, f"e2e-{workload.name}.bundle")
    top_out = os.path.join(scratch, f"e2e-{workload.name}.top")
    tool = {"stat": [IOREGTRACE, "stat", "--json", "-o", stat_json],
            "record": [IOREGTRACE, "record", "-o", bundle],
            "top": [IOREGTOP, "-b", "-i", "10"]}[workload.tool]
    t0 = time.monotonic()
    proc = subprocess.Popen([*tool, "--", *qemu_argv(workload, kernel, initrd, disk, console,
                                                     log, built_qemu)],
                            stdout=open(top_out, "w") if workload.tool == "top" else None,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    # When the tracer is attached: the rest is the guest's.
    lines, attached = [], None
    timer = threading.Timer(TIMEOUT_S, proc.send_signal, (signal.SIGINT,))
    timer.start()
    for line in proc.stderr:
        lines.append(line)
        if attached is None and line.startswith("ioregtrace: tracing"):
            attached = time.monotonic() - t0
    rc = proc.wait()
    timer.cancel()
    wall = time.monotonic() - t0
    top_text = ""
    if workload.tool == "record" and os.path.exists(bundle):
        subprocess.run([IOREGTRACE, "report", "--json", "-o", stat_json, bundle], check=False)
        os.unlink(bundle)
    if workload.tool == "top" and os.path.exists(top_out):
        with open(top_out) as f:
            top_text = f.read()
        os.unlink(top_out)
    text = open(console, errors="replace").read() if os.path.exists(console) else ""
    result = {"name": workload.name, "rc": rc, "wall_s": round(wall, 2),
              "attach_s": None if attached is None else round(attached, 2),
              "timed_out": wall >= TIMEOUT_S, "stderr": "".join(lines)[-2000:],
              "console": text[-12000:], "top": top_text[top_text.rfind("ioregtop "):],
              "log": {}, "ioregionfd_log": {}}
    if os.path.exists(log):
        result["log"], result["ioregionfd_log"] = summarize_log(log)
    # The test VM's kernel (kernel/patches) while this guest ran: a guest
    # must never make it warn.  Read and cleared, so each run has its own.
    dmesg = subprocess.run(["dmesg", "-c"], capture_output=True, text=True).stdout
    result["kernel_complaints"] = vm.kernel_complaints(dmesg)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(result, f, indent=1)
    for path in (disk, log):
        if os.path.exists(path):
            os.unlink(path)
    print(f"e2e: {workload.name}: exit {rc} in {wall:.1f} s (tracer attached after "
          f"{attached} s); guest console tail:\n{text[-1500:]}", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--qemu", help="qemu-system-x86_64 of qemu/build.sh, for the "
                    "workloads that need it")
    ap.add_argument("names", nargs="+", choices=sorted(BY_NAME))
    args = ap.parse_args()
    for name in args.names:
        out = os.path.join(args.out, name)
        result = run_one(BY_NAME[name], args.kernel, args.initrd, out, args.qemu)
        hung = []
        while f"E2E-END {name}" not in result["console"] and len(hung) < RETRIES:
            # The nested guest now and then takes an interrupt with them
            # disabled and hangs (lockdep: "possible recursive locking" in
            # an interrupt handler; e2e/NOTES.md): about one boot in five,
            # so a workload that boots twice is booted again up to twice,
            # said in the result.
            print(f"e2e: {name}: the guest did not finish; booting it once more",
                  flush=True)
            hung.append(result["console"][-1500:])
            result = run_one(BY_NAME[name], args.kernel, args.initrd, out, args.qemu)
        if hung:
            result["retried_after"] = hung[-1]
            result["hangs"] = len(hung)
            with open(os.path.join(out, "run.json"), "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
