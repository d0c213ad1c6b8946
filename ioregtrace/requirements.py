"""What ioregtrace needs from the machine, how to check each piece, and how
to fix the ones a program can fix.  `ioregtrace doctor` prints these; the
tracer runs the same checks before loading and fails with the first one
missing, naming the fix."""

import errno
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

from . import headers

DEBUGFS = "/sys/kernel/debug"
TRACEFS = "/sys/kernel/tracing"

# (subsystem, event, required): the tracepoints the BPF program attaches to.
TRACEPOINTS = (
    ("kvm", "kvm_mmio", True),
    ("kvm", "kvm_pio", True),
    ("kvm", "kvm_userspace_exit", True),
    ("kvm", "kvm_fast_mmio", False),      # VMX's EPT-misconfig fast path only
    ("kvm", "kvm_ioregion_send", False),  # ioregionfd: kernels with kernel/patches
    ("kvm", "kvm_ioregion_response", False),
    ("syscalls", "sys_enter_ioctl", True),
    ("syscalls", "sys_enter_mmap", True),
    ("syscalls", "sys_exit_mmap", True),
    ("sched", "sched_process_fork", True),
    ("sched", "sched_process_exit", True),
)

# Why an optional tracepoint may be absent, in `doctor`'s words.
_IOREGION_WHY = "optional: only kernels with the ioregionfd series of kernel/ have it"
OPTIONAL_WHY = {
    "kvm_fast_mmio": "optional: fires only on VMX's EPT-misconfig fast MMIO path",
    "kvm_ioregion_send": _IOREGION_WHY,
    "kvm_ioregion_response": _IOREGION_WHY,
}

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""                           # what the user can do
    fixer: Optional[Callable[[], None]] = None   # what `doctor --fix` does
    required: bool = True


def _effective_caps():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges():
    caps = _effective_caps()
    has = lambda cap: bool(caps >> cap & 1)   # noqa: E731
    ok = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    detail = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return Check("privileges (CAP_BPF + CAP_PERFMON, or root)", ok,
                 detail if ok else f"{detail} without CAP_BPF/CAP_PERFMON",
                 fix="run as root (sudo ioregtrace ...), or grant CAP_BPF and CAP_PERFMON")


def _is_mounted(path, fstype):
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == path and line.split()[2] == fstype
                       for line in f if len(line.split()) > 2)
    except OSError:
        return False


def _mount(fstype, path):
    subprocess.run(["mount", "-t", fstype, "none", path], check=True,
                   capture_output=True)


def tracing_root():
    """Where tracepoint formats live.  BCC reads them below debugfs."""
    for root in (os.path.join(DEBUGFS, "tracing"), TRACEFS):
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def _unreadable(path):
    """A mounted debugfs/tracefs this user may not read (both are root-only,
    mode 0700, by default): BCC cannot read the tracepoints' formats."""
    return not os.access(path, os.R_OK | os.X_OK)


def _tracefs_unreadable():
    """tracefs is mounted but this user cannot read it (so tracing_root()
    finds nothing, for a reason other than a missing mount)."""
    return _is_mounted(TRACEFS, "tracefs") and _unreadable(TRACEFS)


# What the tracefs-dependent checks say when this user cannot read it.
_UNREADABLE_DETAIL = "cannot tell: this user cannot read tracefs"
_UNREADABLE_FIX = "run as root, or make tracefs readable (see its check above)"


def _who_cannot(path):
    st = os.stat(path)
    return (f"mounted, but uid {os.getuid()} cannot read it (mode {st.st_mode & 0o777:04o}, "
            f"owner uid {st.st_uid})")


def check_mounts():
    checks = []
    for fstype, path in (("debugfs", DEBUGFS), ("tracefs", TRACEFS)):
        mounted = _is_mounted(path, fstype)
        if mounted and _unreadable(path):
            checks.append(Check(f"{fstype} mounted at {path}", False, _who_cannot(path),
                                fix=f"run as root, or let this user read it "
                                    f"(mount -o remount,mode=0755 {path})"))
            continue
        checks.append(Check(f"{fstype} mounted at {path}", mounted,
                            "mounted" if mounted else "not mounted",
                            fix=f"mount -t {fstype} none {path}",
                            fixer=None if mounted else (lambda t=fstype, p=path: _mount(t, p))))
    return checks


def tracepoint_exists(subsystem, event):
    root = tracing_root()
    return bool(root) and os.path.isdir(os.path.join(root, "events", subsystem, event))


def check_tracepoints():
    checks = []
    root = tracing_root()
    unreadable = not root and _tracefs_unreadable()
    for subsystem, event, required in TRACEPOINTS:
        ok = bool(root) and tracepoint_exists(subsystem, event)
        if ok:
            detail = "present"
        elif unreadable:
            detail = _UNREADABLE_DETAIL
        elif not root:
            detail = "cannot tell: tracefs is not mounted"
        else:
            detail = "absent from this kernel"
        fix = (_UNREADABLE_FIX if unreadable else
               "mount debugfs/tracefs (ioregtrace doctor --fix)" if not root else
               "a kernel built from kernel/ (make kernel)" if event.startswith("kvm_ioregion")
               else "nothing to do on this host" if event in OPTIONAL_WHY else
               "load kvm (modprobe kvm_intel or kvm_amd)" if subsystem == "kvm" else
               "a kernel built with CONFIG_FTRACE_SYSCALLS" if subsystem == "syscalls" else
               "a kernel with tracepoints enabled")
        if not required and not ok:
            detail += f" ({OPTIONAL_WHY[event]})"
        checks.append(Check(f"tracepoint {subsystem}:{event}", ok, detail,
                            fix=fix, required=required))
    return checks


def check_bcc():
    try:
        import bcc  # noqa: F401
        version = getattr(bcc, "__version__", "unknown version")
        return Check("BCC python module", True, f"bcc {version}")
    except ImportError as e:
        return Check("BCC python module", False, str(e),
                     fix="apt-get install python3-bpfcc, and use /usr/bin/python3 "
                         "(or a venv made with --system-site-packages)")


def _install_headers():
    package = headers.newest_debian_package()
    if package is None:
        raise RuntimeError("apt knows no linux-headers-6.12.*-amd64 package")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package],
                   check=True, capture_output=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    headers.find(build=True)


def check_headers():
    path, how = headers.find(build=False)
    if path:
        return Check("kernel headers for BCC", True, f"{path} ({how}){_other_kernel(path)}")
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return Check("kernel headers for BCC", False, how,
                     fix="unset BCC_KERNEL_SOURCE, or point it at a kernel header tree")
    if "cannot read it" in how:
        return Check("kernel headers for BCC", False, how,
                     fix="run as root, or as root: ioregtrace doctor --fix (makes it readable)",
                     fixer=lambda: headers.find(build=True))
    if headers.installed_debian_pairs():
        return Check("kernel headers for BCC", False, how,
                     fix="ioregtrace doctor --fix (merges the installed packages)",
                     fixer=lambda: headers.find(build=True))
    return Check("kernel headers for BCC", False, how,
                 fix="apt-get install linux-headers-6.12.<N>+deb12-amd64 "
                     "(ioregtrace doctor --fix does it)",
                 fixer=_install_headers)


def _other_kernel(path):
    """Say so when the header tree is of another kernel than the running
    one: it works (the program reads tracepoint arguments only), but a user
    comparing versions should not have to wonder."""
    found = re.search(r"(\d+\.\d+)\.", os.path.basename(path.rstrip("/")))
    running = re.match(r"(\d+\.\d+)", platform.release())
    if found and running and found.group(1) != running.group(1):
        return (f"; headers of Linux {found.group(1)}, running {running.group(1)}: fine, "
                "the program uses tracepoint arguments only")
    return ""


def hardware_virtualization(cpuinfo="/proc/cpuinfo"):
    """"vmx", "svm", or None when the CPU has neither: then /dev/kvm is not
    kvm_intel's or kvm_amd's (on this project's hosts it is PVM's) and
    kvm:kvm_exit/kvm_entry never fire."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return next((f for f in ("vmx", "svm") if f in flags), None)
    except OSError:
        pass
    return None


def check_kvm_device():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        return Check("/dev/kvm (for the demo VM)", True, "usable", required=False)
    except OSError as e:
        fix = ("run as root, or join the group that owns /dev/kvm (usually kvm)"
               if e.errno == errno.EACCES else
               "enable KVM in the host (kvm module, nested virtualisation)")
        return Check("/dev/kvm (for the demo VM)", False, e.strerror, fix=fix, required=False)


def check_uprobes():
    """QEMU's region names as they change need one uprobe on QEMU."""
    root = tracing_root()
    ok = bool(root) and os.path.exists(os.path.join(root, "uprobe_events"))
    if not root and _tracefs_unreadable():
        return Check("uprobes (QEMU memory-map mirror)", False, _UNREADABLE_DETAIL,
                     fix=_UNREADABLE_FIX, required=False)
    return Check("uprobes (QEMU memory-map mirror)", ok,
                 "available" if ok else "no uprobe_events in tracefs",
                 fix="a kernel with CONFIG_UPROBE_EVENTS (names then come from QMP "
                     "snapshots only)", required=False)


def all_checks():
    return ([check_privileges()] + check_mounts() + check_tracepoints()
            + [check_bcc(), check_headers(), check_uprobes(), check_kvm_device()])
