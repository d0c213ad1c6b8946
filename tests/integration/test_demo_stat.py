"""Acceptance: the demo VM under `ioregtrace stat --json` equals the demo's
own truth, row for row (issue 3, items 2 and 5)."""

import pytest

from conftest import IOREGTRACE, count_rows, load_json, run_cli

pytestmark = pytest.mark.integration

DELAY_US = 2000


@pytest.fixture(scope="module")
def demo_run(tracing_host, tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    out, truth = d / "stat.json", d / "truth.json"
    res = run_cli("stat", "--json", "-o", str(out), "--", IOREGTRACE, "demo", "--churn",
                  "--delay-us", str(DELAY_US), "--truth", str(truth))
    assert res.returncode == 0, res.stderr
    return load_json(out), load_json(truth)


def test_every_row_equals_the_demo_truth(demo_run):
    stat, truth = demo_run
    assert count_rows(stat) == count_rows(truth)


def test_nothing_lost_or_dropped(demo_run):
    stat, _ = demo_run
    assert stat["lost_events"] == 0
    assert stat["dropped_keys"] == 0
    assert all(v == 0 for v in stat["diagnostics"].values()), stat["diagnostics"]
    assert stat["notes"] == []


def test_the_run_covers_every_path_and_string_pio(demo_run):
    _, truth = demo_run
    paths = {r["path"] for r in truth["rows"]}
    assert {"ioeventfd", "coalesced", "kernel", "userspace"} <= paths
    rows = count_rows(truth)
    # rep outsb: 50 instructions x 64 elements, in each of the two passes.
    assert rows[("pio", 0x5004, 1, "write", "userspace")] == 2 * 50 * 64
    assert rows[("pio", 0x5005, 1, "read", "userspace")] == 2 * 50 * 32
    # --churn: after the deassign, datamatch hits exit to userspace instead.
    assert rows[("mmio", 0x10002010, 4, "write", "ioeventfd")] == 1000
    assert rows[("mmio", 0x10002010, 4, "write", "userspace")] == 200 + 1200


def _latency(doc, address):
    (row,) = [r for r in doc["rows"] if r["address"] == address and r["op"] == "read"]
    return row["latency_us"]


def test_forwarded_read_latency_bounds(demo_run):
    stat, _ = demo_run
    forwarded = _latency(stat, 0x10001000)
    assert DELAY_US <= forwarded["p50"] <= 2 * DELAY_US + 100
    inline = _latency(stat, 0x10000004)
    assert inline["p50"] < DELAY_US / 10


def test_latency_brackets_the_vmm_own_measurement(demo_run):
    """The traced interval (exit tracepoint -> next KVM_RUN syscall) contains
    the VMM's own (ioctl return -> next ioctl call), so it is never shorter;
    p50 is a bucket upper bound at most 12.5 % high."""
    stat, truth = demo_run
    traced = {(r["space"], r["address"], r["size"], r["op"]): r["latency_us"]
              for r in stat["rows"] if r["path"] == "userspace"}
    checked = 0
    for r in truth["rows"]:
        own = r["latency_us"]
        if r["path"] != "userspace" or own is None:
            continue
        got = traced[(r["space"], r["address"], r["size"], r["op"])]
        assert got["max"] >= own["max"]
        assert got["p50"] >= own["p50"]
        assert got["p50"] <= 1.125 * (own["p50"] + 50), (r, got)
        checked += 1
    assert checked >= 8


def test_rows_name_the_demo_process(demo_run):
    stat, truth = demo_run
    pids = {r["pid"] for r in truth["rows"]}
    assert len(pids) == 1
    assert {r["pid"] for r in stat["rows"]} == pids
    assert all(r["comm"] for r in stat["rows"])
    regions = {r["address"]: r["region"] for r in stat["rows"]}
    assert regions[0xFEC00000] == "ioapic"
    assert regions[0x10002000] == "ioeventfd@0x10002000"
    assert regions[0x10003000] == "coalesced@0x10003000"
    assert regions[0x10000000] == "mmio@0x10000000"


def test_pass_log_has_a_line_per_measured_pass(tmp_path):
    """make bench reads the demo's time series: a line per measured pass,
    with the accesses so far (each pass's control write included)."""
    log = tmp_path / "passes"
    res = run_cli("demo", "--scale", "0", "--set", "inline-read=10", "--set", "pio-in=5",
                  "--repeat", "3", "--pass-log", str(log))
    assert res.returncode == 0, res.stderr
    lines = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    assert [n for _, _, n in lines] == [16, 32, 48]
    assert lines[0][0] < lines[1][0] < lines[2][0]
    assert lines[0][1] <= lines[1][1] <= lines[2][1]
