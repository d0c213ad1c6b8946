"""Acceptance 1 (issue 5): ioregtop in a real terminal (tmux) against the
demo VM: the rows, and the keys."""

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import BIN, IOREGTRACE

pytestmark = pytest.mark.integration

SESSION = "ioregtop-test"
# A tmux server of our own: one shared with other test runs (another
# worktree's) would clash on the session name and would start the command
# with that server's environment, not ours (PYTHONPATH, see conftest).
SOCKET = f"ioregtop-test-{os.getpid()}"
DEMO = [IOREGTRACE, "demo", "--scale", "0", "--set", "inline-read=20000",
        "--set", "forward-read=100", "--set", "pio-out=5000", "--set", "doorbell=20000",
        "--delay-us", "2000", "--repeat", "1000"]


def tmux(*args):
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True,
                          check=True).stdout


def screen():
    return tmux("capture-pane", "-p", "-t", SESSION)


def wait_screen(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        text = screen()
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"screen never matched:\n{text}")
        time.sleep(0.2)


def data_rows(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("PID"))
    return [line for line in lines[start + 1:] if re.match(r"\s*\d+ ", line)]


def start_in_tmux(status, demo):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (make setup installs it)")
    command = " ".join([f"{BIN}/ioregtop", "-i", "0.5", "--", *demo])
    tmux("new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24",
         f"{command}; echo EXIT=$? > {status}; sleep 30")


def wait_exit(status, timeout=30):
    deadline = time.monotonic() + timeout
    while not status.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return status.read_text().strip()


@pytest.fixture
def top(tracing_host, tmp_path):
    status = tmp_path / "status"
    start_in_tmux(status, DEMO)
    yield status
    subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True)


def test_ioregtop_rows_and_keys(top):
    text = wait_screen(lambda t: "mmio@0x10001000" in t and "pio@0x5000" in t)
    lines = text.splitlines()
    assert all(len(line) < 80 for line in lines), "fits 80 columns"
    assert lines[0].startswith("ioregtop") and "tracing" in lines[0]
    assert "group: region" in text and "sort: rate" in text
    rows = data_rows(text)
    regions = {line.split()[1] for line in rows}
    assert {"mmio@0x10000004", "mmio@0x10001000", "pio@0x5000"} <= regions
    assert any("ioeventfd" in line for line in rows)

    # s: cycle the sort column until p99; the slow forwarded reads come first.
    for sort in ("total", "p99"):
        tmux("send-keys", "-t", SESSION, "s")
        text = wait_screen(lambda t, s=sort: f"sort: {s}" in t)
    text = wait_screen(lambda t: data_rows(t) and "mmio@0x10001000" in data_rows(t)[0])
    p99_first = data_rows(text)[0]
    tmux("send-keys", "-t", SESSION, "s", "s")          # name, then rate again
    text = wait_screen(lambda t: "sort: rate" in t)
    text = wait_screen(lambda t: "mmio@0x10001000" not in data_rows(t)[0])
    assert data_rows(text)[0] != p99_first

    # g: group by address, then by path only, then exits by reason.
    tmux("send-keys", "-t", SESSION, "g")
    wait_screen(lambda t: "group: address" in t)
    tmux("send-keys", "-t", SESSION, "g")
    text = wait_screen(lambda t: "group: path" in t and data_rows(t))
    assert all(line.split()[1] == "-" for line in data_rows(text))
    tmux("send-keys", "-t", SESSION, "g")
    # The demo's forwarded MMIO and its port I/O return to the VMM: on any
    # host the userspace exits by kvm_run.exit_reason are there.
    exits = wait_screen(lambda t: "group: exits" in t and data_rows(t)
                        and {"MMIO", "IO"} <= {line.split()[1] for line in data_rows(t)})
    assert "EXIT REASON" in exits
    tmux("send-keys", "-t", SESSION, "g")
    wait_screen(lambda t: "group: region" in t)

    # p: a pid no traced VM has is refused in words; the VM's pid shows its
    # rows only; an empty answer shows all again.
    pid = data_rows(text)[0].split()[0]
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda t: "pid (empty: all" in t)
    tmux("send-keys", "-t", SESSION, "1", "Enter")
    wait_screen(lambda t: f"pid 1 is not a traced VM (traced: {pid} " in t and "pid: all" in t)
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda t: "pid (empty: all" in t)
    tmux("send-keys", "-t", SESSION, *pid, "Enter")
    wait_screen(lambda t: f"pid: {pid} " in t and data_rows(t))
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda t: "pid (empty: all" in t)
    tmux("send-keys", "-t", SESSION, "Enter")
    wait_screen(lambda t: "pid: all" in t and data_rows(t))

    # space pauses, h shows help.
    tmux("send-keys", "-t", SESSION, "Space")
    wait_screen(lambda t: "PAUSED" in t)
    tmux("send-keys", "-t", SESSION, "Space")
    wait_screen(lambda t: "tracing" in t)
    tmux("send-keys", "-t", SESSION, "h")
    wait_screen(lambda t: "ioregtop keys" in t)
    tmux("send-keys", "-t", SESSION, "x")
    wait_screen(lambda t: "PID" in t)

    # It follows the terminal's size.
    tmux("resize-window", "-t", SESSION, "-x", "120", "-y", "30")
    text = wait_screen(lambda t: " VM " in t.splitlines()[4] if len(t.splitlines()) > 4 else 0)
    assert max(len(line) for line in text.splitlines()) > 80

    # q quits, exit status 0.
    tmux("send-keys", "-t", SESSION, "q")
    assert wait_exit(top) == "EXIT=0"
    assert "ended after" not in screen()            # no final table after q


def test_ioregtop_refuses_a_pipe(tracing_host):
    res = subprocess.run([f"{BIN}/ioregtop"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == ("ioregtrace: error: ioregtop needs a terminal; use "
                                  "`ioregtop -b` or `ioregtrace stat` for output to a pipe "
                                  "or file")


SHORT_DEMO = [IOREGTRACE, "demo", "--scale", "0", "--set", "inline-read=2000",
              "--set", "pio-out=500", "--delay-us", "2000", "--repeat", "3"]


def test_ioregtop_batch_frames(tracing_host):
    """Issue 16, defect 7: `ioregtop -b` writes -n frames of every row to a
    pipe, then ends CMD (as q does) and exits 0."""
    res = subprocess.run([f"{BIN}/ioregtop", "-b", "-i", "0.5", "-n", "3", "--", *DEMO],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "132"})
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("ioregtop: compiling and attaching the tracer")
    frames = re.split(r"(?m)^(?=ioregtop )", res.stdout)[1:]
    assert len(frames) == 3 and all("group: region" in f for f in frames)
    assert all(len(line) < 132 for line in res.stdout.splitlines())
    assert "mmio@0x10000004" in frames[-1] and "ended after" not in res.stdout


def test_ioregtop_prints_the_final_table_when_cmd_exits(tracing_host, tmp_path):
    """Issue 16, defect 7: the view vanished when CMD exited; it was blank
    while the tracer compiled."""
    status = tmp_path / "status"
    try:
        start_in_tmux(status, SHORT_DEMO)
        wait_screen(lambda t: "compiling and attaching the tracer" in t or "PID" in t)
        assert wait_exit(status) == "EXIT=0"
        text = screen()
        assert "compiling and attaching the tracer" in text
        final = text[text.index("ioregtop  "):]
        assert "ended after" in final.splitlines()[0]
        rows = {line.split()[1]: line.split() for line in data_rows(final)}
        assert rows["mmio@0x10000004"][-4] == "6000"      # TOTAL: 3 passes x 2000 reads
        assert rows["pio@0x5000"][-4] == "1500"
    finally:
        subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True)
