"""Acceptance 3: `stat -p` on an already running demo VM gives the same
counts for the accesses made after the attach, and marks what it cannot
attribute (in-kernel writes to handlers registered before the attach)."""

import signal

import pytest

from conftest import IOREGTRACE, Watched, count_rows, load_json

pytestmark = pytest.mark.integration

IN_KERNEL = {"ioeventfd", "coalesced", "kernel"}


def expected_after_attach(truth):
    """The truth, as an attached tracer must report it: an in-kernel write
    can no longer be told apart by handler; reads served in the kernel can
    only be the kernel's own devices."""
    expected = {}
    for (space, addr, size, op, path), count in count_rows(truth).items():
        if op == "write" and path in IN_KERNEL:
            path = "unattributed"
        key = (space, addr, size, op, path)
        expected[key] = expected.get(key, 0) + count
    return expected


def test_attach_to_a_running_vm(tracing_host, tmp_path):
    truth_path, out = tmp_path / "truth.json", tmp_path / "stat.json"
    demo = Watched([IOREGTRACE, "demo", "--wait-signal", "--delay-us", "500",
                    "--truth", str(truth_path)])
    stat = None
    try:
        demo.wait_for("waiting for SIGUSR1")
        stat = Watched([IOREGTRACE, "stat", "-p", str(demo.proc.pid), "--json",
                        "-o", str(out)])
        stat.wait_for("tracing pid")
        demo.proc.send_signal(signal.SIGUSR1)
        assert demo.finish() == 0, demo.lines
        # -p ends by itself once every traced process has exited.
        assert stat.finish(timeout=30) == 0, stat.lines
    finally:
        demo.kill()
        if stat:
            stat.kill()
    truth, doc = load_json(truth_path), load_json(out)
    assert count_rows(doc) == expected_after_attach(truth)
    assert doc["lost_events"] == 0 and doc["dropped_keys"] == 0
    assert any(f"pid {demo.proc.pid}" in n and "unattributed" in n for n in doc["notes"])
    # The demo waited at a PIO OUT exit, which completes without an event:
    # nothing at the attach point is ambiguous.
    assert doc["diagnostics"]["attach_ambiguous"] == 0
    assert doc["diagnostics"]["unmatched_exits"] == 0
    # The vCPU's kvm_run mapping, made before the attach, was found in
    # /proc: every exit was decoded, none inferred.
    assert doc["diagnostics"]["inferred_exits"] == 0
