"""The end-to-end guest's initramfs: busybox, e2e/ioload.c built static,
every workload's script, and an /init that runs the one named on the
kernel command line (e2e=NAME), reports on the serial line and powers off.
Cached by content, like the test VM's own (kernel/vm.py)."""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "kernel"))

import vm  # noqa: E402  (kernel/vm.py: the cache and the cpio writer)

from workloads import BY_NAME  # noqa: E402

BEGIN, END = "E2E-BEGIN", "E2E-END"

INIT = vm.init_head("e2e", "workload") + f"""echo "{BEGIN} $workload"
sh "/w/$workload.sh"
rc=$?
# The interrupts the guest handled, per device (e2e/check.py), and its clock.
cat /proc/interrupts
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "{END} $workload $rc"
poweroff -f
"""


def _ioload(out_dir):
    source = os.path.join(HERE, "ioload.c")
    binary = os.path.join(out_dir, "ioload")
    subprocess.run(["gcc", "-O2", "-Wall", "-static", "-pthread", "-o", binary, source],
                   check=True)
    with open(binary, "rb") as f:
        return f.read()


def initramfs():
    """The path of the cached initramfs, built if missing."""
    with open(vm.BUSYBOX, "rb") as f:
        busybox = f.read()
    with open(os.path.join(HERE, "ioload.c"), "rb") as f:
        source = f.read()
    scripts = {w.name: w.script.encode() for w in BY_NAME.values()}

    def entries():
        with tempfile.TemporaryDirectory() as tmp:
            ioload = _ioload(tmp)
        d, x, r = 0o40755, 0o100755, 0o100644
        return ([("bin", d, b""), ("dev", d, b""), ("proc", d, b""), ("sys", d, b""),
                 ("w", d, b""), ("bin/busybox", x, busybox), ("bin/ioload", x, ioload),
                 ("init", x, INIT.encode())]
                + [(f"w/{name}.sh", r, script) for name, script in sorted(scripts.items())])
    return vm.cached_initramfs("e2e", busybox + source + INIT.encode() +
                               repr(sorted(scripts.items())).encode(), entries)


if __name__ == "__main__":
    print(initramfs())
