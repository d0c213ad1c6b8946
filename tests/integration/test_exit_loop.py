"""bench/exit_loop.c, the C VMM the per-exit figures are set against: it
runs, and ioregtrace counts a VMM that is not the demo exactly (its guest
makes a known number of accesses of each kind)."""

import os
import subprocess

import pytest

from conftest import REPO, count_rows, load_json, run_cli

pytestmark = pytest.mark.integration

DEVICE, DOORBELL, PORT, BATCH = 0xD0000000, 0xD0001000, 0x510, 20000


@pytest.fixture(scope="module")
def exit_loop(tracing_host, tmp_path_factory):
    binary = tmp_path_factory.mktemp("exit_loop") / "exit_loop"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    os.path.join(REPO, "bench", "exit_loop.c")], check=True)
    return str(binary)


def traced(exit_loop, tmp_path, *args):
    out = tmp_path / "stat.json"
    res = run_cli("stat", "--json", "-o", str(out), "--", exit_loop, *args)
    assert res.returncode == 0, res.stderr
    doc = load_json(out)
    assert doc["lost_events"] == 0 and doc["dropped_keys"] == 0
    assert all(v == 0 for v in doc["diagnostics"].values()), doc["diagnostics"]
    return count_rows(doc)


def test_each_pass_prints_the_cost_of_an_access(exit_loop):
    for mode in ("userspace", "in-kernel"):
        res = subprocess.run([exit_loop, mode, "3", "40000"], capture_output=True, text=True,
                             check=True)
        assert len(res.stdout.split()) == 3
        assert all(float(ns) > 0 for ns in res.stdout.split())


def test_userspace_exits_are_counted_exactly(exit_loop, tmp_path):
    # 2 passes of 1000 exits: 500 turns of the loop's four accesses.
    rows = traced(exit_loop, tmp_path, "userspace", "2", "1000")
    assert rows == {("mmio", DEVICE, 4, "write", "userspace"): 500,
                    ("mmio", DEVICE + 4, 4, "read", "userspace"): 500,
                    ("pio", PORT, 1, "write", "userspace"): 500,
                    ("pio", PORT, 1, "read", "userspace"): 500}


def test_doorbells_are_counted_exactly(exit_loop, tmp_path):
    rows = traced(exit_loop, tmp_path, "in-kernel", "2", str(2 * BATCH))
    assert rows == {("mmio", DOORBELL, 4, "write", "ioeventfd"): 4 * BATCH,
                    ("pio", PORT, 1, "write", "userspace"): 4}
