"""Acceptance 4 (issue 4): when QEMU's side channel fails, one clear line
says so and the counts still print."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import qemu_guest as g
from conftest import load_json, run_cli

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"


def no_traceback(res):
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout


def test_qemu_that_exits_before_qmp_answers(tracing_host, tmp_path):
    out = tmp_path / "stat.json"
    res = run_cli("stat", "--json", "-o", str(out), "--", QEMU, "-machine",
                  "no-such-machine-ioregtrace")
    no_traceback(res)
    assert res.returncode == 1                      # QEMU's own status
    warnings = [line for line in res.stderr.splitlines() if line.startswith("ioregtrace: warn")]
    assert len(warnings) == 1 and "QEMU exited before its QMP socket" in warnings[0], res.stderr
    doc = load_json(out)                            # the counts still print
    assert doc["rows"] == [] and doc["lost_events"] == 0
    assert any("QMP unavailable" in n for n in doc["notes"])


@pytest.fixture
def running_qemu(tracing_host, tmp_path):
    """A QEMU running the BAR-move guest, still making accesses when a
    tracer attaches to it."""
    kernel, marker = tmp_path / "guest.bin", tmp_path / "running"
    kernel.write_bytes(g.bar_move_guest(keep_running=True))
    vm = subprocess.Popen([QEMU, *g.running_args(kernel, marker)], stderr=subprocess.DEVNULL)
    # A loaded machine can take seconds to get QEMU to the guest's loop, and
    # a tracer attached for 2 s before that sees nothing.
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and g.RUNNING_MARK in marker.read_text()):
            assert vm.poll() is None and time.monotonic() < deadline, "the guest never ran"
            time.sleep(0.05)
        yield vm
    finally:
        vm.kill()
        vm.wait()


def test_qmp_socket_that_refuses(running_qemu, tmp_path):
    path = tmp_path / "refuses.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()                                       # the file stays; nobody listens
    out = tmp_path / "stat.json"
    res = run_cli("stat", "-p", str(running_qemu.pid), "--qmp", str(path), "-d", "3",
                  "--json", "-o", str(out))
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Connection refused" in warnings[0], res.stderr
    doc = load_json(out)
    assert doc["rows"], "the counts still print"
    assert any("Connection refused" in n for n in doc["notes"])


class FakeQmp:
    """A QMP server whose `info mtree -f` has a line ioregtrace cannot parse."""

    MTREE = ("FlatView #0\n"
             ' AS "I/O", root: io\n'
             " Root memory region: io\n"
             "  0000000000000000-000000000000ffff (prio 0, i/o): io\n"
             "  a line from a future QEMU\n"
             "\n")

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        f = conn.makefile("rwb")
        f.write(b'{"QMP": {"version": {"qemu": {"major": 99}}, "capabilities": []}}\n')
        f.flush()
        for line in f:
            cmd = json.loads(line)["execute"]
            ret = self.MTREE if cmd == "human-monitor-command" else {}
            f.write(json.dumps({"return": ret}).encode() + b"\n")
            f.flush()


def test_mtree_line_the_parser_does_not_know(tracing_host, tmp_path):
    path = tmp_path / "fake.sock"
    FakeQmp(path)
    out = tmp_path / "stat.json"
    pid = os.getpid()              # any process: only the QMP side matters here
    res = run_cli("stat", "-p", str(pid), "--qmp", str(path), "-d", "1", "--json",
                  "-o", str(out))
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    doc = load_json(out)
    assert any("does not understand" in n and "a line from a future QEMU" in n
               for n in doc["notes"]), doc["notes"]


def test_qmp_requires_exactly_one_pid(tracing_host):
    res = run_cli("stat", "--qmp", "/nonexistent.sock", "-d", "1")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "ioregtrace: error: --qmp needs exactly one -p PID (the QEMU it belongs to)"]


def test_attach_without_qmp_reads_names_and_handlers_from_qemu(running_qemu, tmp_path):
    """Without --qmp, QEMU's map and its regions' access rules are read from
    its memory (issue 16, defect 8): names and handler calls as with QMP."""
    out = tmp_path / "stat.json"
    res = run_cli("stat", "-p", str(running_qemu.pid), "-d", "2", "--json", "-o", str(out))
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    doc = load_json(out)
    (row,) = [r for r in doc["rows"] if r["path"] == "userspace"]
    assert row["region"] == "pci-testdev-mmio" and row["qemu_calls"] == row["count"], row
    assert not any("no --qmp socket given" in n for n in doc["notes"]), doc["notes"]


def test_sigterm_to_ioregtrace_quits_a_wrapped_qemu(tracing_host, tmp_path):
    """Issue 16, defect 1: `kill` of `ioregtrace stat -- qemu ...` used to
    leave QEMU running, paused at the guest's shutdown forever (our
    -no-shutdown) with our QMP socket gone.  Now the counts are written with
    QEMU's region names, QEMU is quit over QMP, and the status is 143."""
    from conftest import Watched, IOREGTRACE
    kernel, marker, out = tmp_path / "guest.bin", tmp_path / "running", tmp_path / "stat.json"
    kernel.write_bytes(g.bar_move_guest(keep_running=True))
    stat = Watched([IOREGTRACE, "stat", "--json", "-o", str(out), "--", QEMU,
                    *g.running_args(kernel, marker)], start_new_session=True)
    try:
        line = stat.wait_for("tracing ", timeout=60)
        qemu_pid = int(line.split("(pid ")[1].split(")")[0])
        deadline = time.monotonic() + 60
        while not (marker.exists() and g.RUNNING_MARK in marker.read_text()):
            assert time.monotonic() < deadline, "the guest never ran"
            time.sleep(0.05)
        stat.proc.terminate()
        assert stat.finish(timeout=60) == 143, stat.lines
    finally:
        stat.kill()
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = os.path.exists(f"/proc/{qemu_pid}")
    if survived:
        # a VM left running would be traced by every later test
        os.kill(qemu_pid, signal.SIGKILL)
    assert not survived, "QEMU outlived ioregtrace"
    doc = load_json(out)
    assert any(r["region"] == "pci-testdev-mmio" for r in doc["rows"]), doc["rows"][:5]
