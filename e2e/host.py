"""`make e2e`: the end-to-end workloads in one boot of the test VM, checked
and tabulated on the host.

    python3 e2e/host.py [--make-test] [NAME...]     (as root)

Exit 1 when any check fails (e2e/check.py); every problem is listed."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "kernel"))

import check  # noqa: E402
import guest  # noqa: E402
import vm  # noqa: E402
from workloads import BY_NAME, WORKLOADS  # noqa: E402

# The test VM boots in ~15 s; each workload is a nested boot (~30 s) plus
# its I/O, under ioregtrace (whose BPF compile, under TCG, is the rest); a
# hung guest costs 180 s and is booted again (e2e/run.py).
TIMEOUT_S = 2400


def build_qemu():
    """The directory of qemu/build.sh's QEMU (cached; built if missing), or
    $IOREGTRACE_QEMU_DIR's, a tree being worked on (qemu/NOTES.md)."""
    if os.environ.get("IOREGTRACE_QEMU_DIR"):
        return os.environ["IOREGTRACE_QEMU_DIR"]
    res = subprocess.run([os.path.join(REPO, "qemu", "build.sh")], stdout=subprocess.PIPE,
                         text=True, check=False)
    if res.returncode != 0:
        raise vm.VmError(f"qemu build failed (exit {res.returncode})")
    return res.stdout.strip().splitlines()[-1]


def run(names, share):
    """{name: (run.json, stat.json or None)} of one test VM running `names`."""
    kdir = vm.build_kernel()
    initrd = guest.initramfs()
    qemu = ""
    if any(BY_NAME[n].qemu == "built" for n in names):
        qemu = f"--qemu {shlex.quote(build_qemu())}/qemu-system-x86_64 "
    command = (f".venv/bin/python e2e/run.py --kernel {shlex.quote(kdir)}/bzImage "
               f"--initrd {shlex.quote(initrd)} {qemu}--out /run/vmtest {' '.join(names)}")
    rc, console = vm.run(command, kernel_dir=kdir, cwd=REPO, share=share, timeout=TIMEOUT_S)
    with open(os.path.join(share, "console.log"), "w") as f:
        f.write(console)
    out = {}
    for name in names:
        d = os.path.join(share, name)
        try:
            with open(os.path.join(d, "run.json")) as f:
                result = json.load(f)
        except OSError:
            raise vm.VmError(f"e2e: {name} left no result (VM exit {rc}); console tail:\n"
                             f"{console[-3000:]}") from None
        stat = None
        if os.path.exists(os.path.join(d, "stat.json")):
            with open(os.path.join(d, "stat.json")) as f:
                stat = json.load(f)
        out[name] = (result, stat)
    return out


def table(results):
    from tabulate import tabulate
    rows = []
    for name, (result, stat) in results.items():
        n, wall, total, paths, first = check.summary_row(BY_NAME[name], result, stat)
        rows.append([n, f"{wall:.0f}", "-" if total is None else total,
                     ", ".join(f"{p} {c}" for p, c in sorted(paths.items())), first])
    return tabulate(rows, headers=["WORKLOAD", "WALL s", "ACCESSES", "PATHS",
                                   "FIRST CANDIDATE (userspace time)"],
                    disable_numparse=True, colalign=["left", "right", "right", "left", "left"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-test", action="store_true",
                    help="only the workloads `make test` runs")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep each workload's stat.json and run.json (and the test VM's "
                         "console) in DIR")
    ap.add_argument("names", nargs="*", choices=[[]] + sorted(BY_NAME), default=[])
    args = ap.parse_args()
    names = args.names or [w.name for w in WORKLOADS if w.in_make_test or not args.make_test]
    t0 = time.monotonic()
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        results = run(names, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="ioregtrace-e2e-") as share:
            results = run(names, share)
    print(table(results))
    failed = False
    for name, (result, stat) in results.items():
        for problem in check.problems(BY_NAME[name], result, stat):
            print(f"e2e: {name}: {problem}")
            failed = True
    print(f"e2e: {len(names)} workload(s) in {time.monotonic() - t0:.0f} s: "
          f"{'FAILED' if failed else 'ok'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
