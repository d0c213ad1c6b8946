"""Run commands inside a VM booted from the ioregionfd kernel.

The kernel (kernel/build.sh) boots under QEMU TCG (one host thread for
both vCPUs) with `-cpu EPYC,+svm`: this machine's own KVM cannot boot
Linux, but TCG's emulated SVM lets the guest run nested KVM guests of its
own.  The host's root is shared read-only over 9p and becomes the guest's
root (a busybox initramfs mounts it and chroots), so the guest runs the
host's Python, BCC and this checkout as they are.  The command comes in as
a file on the host (its path on the kernel command line); the files it
leaves in /run/vmtest come back on the serial console as a base64 tarball,
with its exit status.  (Not a writable 9p share: a guest writing to one
hung once in ~50 runs, idle, with QEMU 7.2's 9p server under TCG.)

    python3 kernel/vm.py [--timeout S] [--monitor SOCKET] -- COMMAND...   (as root)
"""

import argparse
import base64
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("IOREGTRACE_CACHE", "/var/cache/ioregtrace")
BUSYBOX = "/bin/busybox"
EXIT_MARK = "VMTEST-EXIT"
FILES_BEGIN, FILES_END = "VMTEST-FILES-BEGIN", "VMTEST-FILES-END"



def init_head(param, var):
    """The start of a busybox /init: the applets, /proc, /sys and /dev, and
    the kernel argument PARAM=VALUE's value in shell variable VAR."""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for arg in $(cat /proc/cmdline); do
	case "$arg" in {param}=*) {var}="${{arg#{param}=}}" ;; esac
done
"""


# The guest's /init.  /run is the only writable place (TMPDIR points
# there); everything else is the host's file system, read-only, /tmp
# included, so a checkout under the host's /tmp works in the guest too.
INIT = init_head("vmtest", "command") + f"""mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host
mount -t tmpfs run /host/run
mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t tracefs tracefs /host/sys/kernel/tracing
mkdir -p /host/run/vmtest /host/run/tmp
chroot /host /bin/sh "$command"
rc=$?
echo "{FILES_BEGIN}"
tar -C /host/run/vmtest -cf - . | gzip | base64
echo "{FILES_END}"
echo "{EXIT_MARK} $rc"
reboot -f
"""


class VmError(Exception):
    pass


class VmTimeout(VmError):
    """The VM did not finish in time: a hang in the command, or the whole
    guest stalled (seen with multi-threaded TCG; kernel/NOTES.md, "The test
    VM's rare stall")."""


def tsc_args():
    """Kernel arguments that give the guest its TSC frequency.

    TCG's RDTSC reads the host's TSC.  The guest would calibrate it against
    the emulated PIT, which fails when the host is busy: the guest then has
    no TSC frequency, and KVM inside it none to give its own guests
    (KVM_GET_TSC_KHZ returns 0, and the KVM selftests stop there)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return f" tsc_early_khz={int(float(line.split(':')[1]) * 1000)} tsc=reliable"
    except (OSError, ValueError):
        pass
    return ""


def build_kernel():
    """The kernel build directory (bzImage, ioregionfd_test, src/)."""
    res = subprocess.run(["sh", os.path.join(HERE, "build.sh")], stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        raise VmError(f"kernel build failed (exit {res.returncode})")
    return res.stdout.strip().splitlines()[-1]


def _cpio_newc(entries):
    """A newc cpio archive of (name, mode, data) entries."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        out.write(b"\0" * (-(110 + len(name_b)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def cached_initramfs(subdir, key_material, entries):
    """CACHE/SUBDIR/initramfs-KEY.cpio.gz, KEY a hash of `key_material`
    (everything the archive is made from); `entries()`, the (name, mode,
    data) of its files, is called only when it is not there yet."""
    key = hashlib.sha256(key_material).hexdigest()[:16]
    path = os.path.join(CACHE, subdir, f"initramfs-{key}.cpio.gz")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as out:
            out.write(gzip.compress(_cpio_newc(entries()), 6))
        os.replace(path + ".tmp", path)
    return path


def initramfs():
    """busybox + /init, cached by content."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    d, x = 0o40755, 0o100755
    return cached_initramfs("vm", busybox + INIT.encode(), lambda: [
        ("bin", d, b""), ("dev", d, b""), ("proc", d, b""), ("sys", d, b""),
        ("bin/busybox", x, busybox), ("init", x, INIT.encode())])


def _unpack_files(console, share):
    """The guest's /run/vmtest, from between the console markers, into
    `share`; returns the console without them."""
    lines = console.splitlines()
    try:
        begin, end = lines.index(FILES_BEGIN), lines.index(FILES_END)
    except ValueError:
        return console
    data = base64.b64decode("".join(lines[begin + 1:end]))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():     # our own guest's files, still: no escapes
            if member.name.startswith("/") or ".." in member.name.split("/") or not (
                    member.isfile() or member.isdir()):
                raise VmError(f"unexpected file from the guest: {member.name}")
        tar.extractall(share)
    return "\n".join(lines[:begin] + lines[end + 1:]) + "\n"


# What the test kernel must never print: WARNs, BUGs, oopses, lockdep and
# atomic-sleep splats, hung tasks, list corruption (its config turns them on).
KERNEL_COMPLAINT = re.compile(r"WARNING:|BUG:|Oops|general protection|INFO: task .* blocked"
                              r"|list_(add|del) corruption")


def kernel_complaints(dmesg):
    """The lines of `dmesg` where the kernel complained."""
    return [line for line in dmesg.splitlines() if KERNEL_COMPLAINT.search(line)]


def run(command, kernel_dir=None, timeout=900, cwd=None, env=None, share=None,
        monitor=None):
    """Run a shell command in a fresh VM: (exit status, console text).

    The command finds /run/vmtest empty and writable; what it leaves there
    is copied into the host directory `share` (when given).  `monitor`: a
    unix socket path for QEMU's human monitor (`info lapic 0`, `info
    registers -a`: where a stalled guest's CPUs are)."""
    if shutil.which("qemu-system-x86_64") is None:
        raise VmError("qemu-system-x86_64 is not installed (make setup)")
    if not os.path.exists(BUSYBOX):
        raise VmError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    kernel_dir = kernel_dir or build_kernel()
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    # Read by the guest through its view of the host's root.
    os.makedirs(os.path.join(CACHE, "vm"), exist_ok=True)
    inbox = tempfile.mkdtemp(prefix="run-", dir=os.path.join(CACHE, "vm"))
    command_file = os.path.join(inbox, "command.sh")
    with open(command_file, "w") as f:
        f.write("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                "export HOME=/run/tmp TMPDIR=/run/tmp\n" + exports +
                (f"cd {shlex.quote(cwd)} || exit 125\n" if cwd else "") + command + "\n")
    # One host thread runs both vCPUs (thread=single): with a thread per
    # vCPU, QEMU 7.2 now and then leaves a halted vCPU asleep with APIC
    # interrupts pending and the whole guest stalls (kernel/NOTES.md).
    argv = ["qemu-system-x86_64", "-accel", "tcg,thread=single", "-cpu", "EPYC,+svm",
            "-smp", "2", "-m", "2048", "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(kernel_dir, "bzImage"), "-initrd", initramfs(),
            "-append", f"console=ttyS0 panic=-1 quiet vmtest={command_file}"
            # the ioregionfd selftest reaches the emulator with forced emulation
            " kvm.force_emulation_prefix=1" + tsc_args(),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
            "-serial", "stdio"]
    if monitor:
        argv += ["-monitor", f"unix:{monitor},server,nowait"]
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        console = (e.stdout or b"").decode(errors="replace")
        raise VmTimeout(f"VM did not finish in {timeout} s; console tail:\n"
                        f"{console[-3000:]}") from None
    finally:
        shutil.rmtree(inbox, ignore_errors=True)
    console = res.stdout.decode(errors="replace").replace("\r\n", "\n")
    if share is not None:
        console = _unpack_files(console, share)
    for line in reversed(console.splitlines()):
        if line.startswith(EXIT_MARK):
            return int(line.split()[1]), console
    raise VmError(f"VM ended without an exit status (qemu exit {res.returncode}); "
                  f"console tail:\n{console[-3000:]}\n{res.stderr.decode()[-1000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--monitor", metavar="SOCKET", help="QEMU's monitor on this unix socket")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        rc, console = run(shlex.join(command) if command else "uname -a", timeout=args.timeout,
                          cwd=os.getcwd(), monitor=args.monitor)
    except VmError as e:
        sys.exit(f"vm: {e}")
    sys.stdout.write(console)
    sys.exit(rc)


if __name__ == "__main__":
    main()
