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


@pytest.fixture
def top(tracing_host, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (make setup installs it)")
    status = tmp_path / "status"
    command = " ".join([f"{BIN}/ioregtop", "-i", "0.5", "--", *DEMO])
    tmux("new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24",
         f"{command}; echo EXIT=$? > {status}; sleep 30")
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

    # g: group by address, then by path only.
    tmux("send-keys", "-t", SESSION, "g")
    wait_screen(lambda t: "group: address" in t)
    tmux("send-keys", "-t", SESSION, "g")
    text = wait_screen(lambda t: "group: path" in t and data_rows(t))
    assert all(line.split()[1] == "-" for line in data_rows(text))
    tmux("send-keys", "-t", SESSION, "g")
    wait_screen(lambda t: "group: region" in t)

    # p: a pid with no VM hides every row; an empty answer shows all again.
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda t: "pid (empty: all):" in t)
    tmux("send-keys", "-t", SESSION, "1", "Enter")
    wait_screen(lambda t: "(no rows for pid 1)" in t and "pid: 1" in t)
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda t: "pid (empty: all):" in t)
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
    deadline = time.monotonic() + 20
    while not top.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert top.read_text().strip() == "EXIT=0"


def test_ioregtop_refuses_a_pipe(tracing_host):
    res = subprocess.run([f"{BIN}/ioregtop"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == ("ioregtrace: error: ioregtop needs a terminal; use "
                                  "`ioregtrace stat` for output to a pipe or file")
