"""Errors that need the real host to provoke: missing privileges, missing
mounts (in a private mount namespace), no /dev/kvm."""

import os
import shutil

import pytest

from conftest import IOREGTRACE, run_cli
from test_errors import one_line_error

import subprocess

pytestmark = pytest.mark.integration


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_without_capabilities(tracing_host):
    """uid 0 but an empty capability set: what a container or a non-root
    user without CAP_BPF/CAP_PERFMON sees."""
    res = run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", IOREGTRACE,
               "stat", "-d", "1"])
    line = one_line_error(res)
    assert "privileges" in line and "CAP_BPF" in line and "sudo" in line


def _in_private_mounts(script):
    assert shutil.which("unshare")
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])


def test_unmounted_tracefs_is_named_and_doctor_fix_mounts_it(tracing_host):
    res = _in_private_mounts(
        "umount -l /sys/kernel/tracing; umount -l /sys/kernel/debug; "
        f"{IOREGTRACE} stat -d 1")
    line = one_line_error(res)
    assert "debugfs mounted at /sys/kernel/debug: not mounted" in line
    assert "mount -t debugfs none /sys/kernel/debug" in line

    res = _in_private_mounts(
        "umount -l /sys/kernel/tracing; umount -l /sys/kernel/debug; "
        f"{IOREGTRACE} doctor; echo before=$?; {IOREGTRACE} doctor --fix; echo after=$?")
    assert "before=1" in res.stdout and "after=0" in res.stdout, res.stdout
    assert "[missing] tracefs mounted at /sys/kernel/tracing" in res.stdout
    assert "[ok     ] tracefs mounted at /sys/kernel/tracing" in res.stdout


def test_demo_without_dev_kvm(tracing_host):
    res = _in_private_mounts(f"mount -t tmpfs none /dev && exec {IOREGTRACE} demo")
    line = one_line_error(res)
    assert "demo VMM needs /dev/kvm" in line


def test_doctor_reports_every_requirement(tracing_host):
    res = run([IOREGTRACE, "doctor"])
    assert res.returncode == 0, res.stdout
    for name in ("privileges", "debugfs", "tracefs", "tracepoint kvm:kvm_mmio",
                 "tracepoint kvm:kvm_pio", "tracepoint kvm:kvm_userspace_exit",
                 "tracepoint syscalls:sys_enter_ioctl", "tracepoint syscalls:sys_enter_mmap",
                 "BCC python module", "kernel headers for BCC", "/dev/kvm"):
        assert name in res.stdout


class _AsNobody:
    """This process as uid/gid 65534 for a moment (real and effective, so
    that access(2) answers for that user too; root stays the saved ids)."""

    def __enter__(self):
        os.setresgid(65534, 65534, 0)
        os.setresuid(65534, 65534, 0)

    def __exit__(self, *exc):
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def _doctor_lines():
    from ioregtrace import requirements
    return "\n".join(f"{'ok' if c.ok else 'no'} {c.name}: {c.detail} | {c.fix}"
                     for c in requirements.all_checks())


def test_a_user_who_cannot_read_tracefs_is_told_so(tracing_host, monkeypatch):
    """Issue 16, defect 9: as a non-root user, doctor said tracefs was
    mounted, then "tracefs is not mounted" for every tracepoint, the headers
    "not merged", uprobes missing and "enable KVM"; with CAP_BPF +
    CAP_PERFMON, stat failed with "tracefs is not mounted"."""
    from ioregtrace import headers, probes, requirements
    merged, _ = headers.find(build=True)
    os.chmod(merged, 0o700)                  # as an older version merged it
    with _AsNobody():
        out = _doctor_lines()
    assert "uid 65534 cannot read it" in out and "tracefs is not mounted" not in out, out
    assert "ok tracefs" not in out, out
    assert f"merged in {merged}, but uid 65534 cannot read it" in out, out
    assert "join the group that owns /dev/kvm" in out, out
    assert "CONFIG_UPROBE_EVENTS" not in out, out
    run_cli("doctor")                         # root opens the header tree up again
    with _AsNobody():
        out = _doctor_lines()
    assert f"ok kernel headers for BCC: {merged}" in out, out
    # what stat says first, for a user with the capabilities
    monkeypatch.setattr(requirements, "check_privileges",
                        lambda: requirements.Check("privileges", True, "CAP_BPF, CAP_PERFMON"))
    with _AsNobody(), pytest.raises(probes.UserError) as e:
        probes.preflight()
    assert "cannot read it" in str(e.value) and "not mounted" not in str(e.value)
