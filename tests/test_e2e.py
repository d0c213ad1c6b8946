"""Issue 17: a real guest OS, end to end.  The test VM boots the cheapest
workloads of e2e/ (a Linux guest's boot, and 4 KiB direct reads on NVMe,
each a nested QEMU/KVM guest under `ioregtrace stat`); `make e2e` runs
them all.  The checks themselves are e2e/check.py's, tested here too."""

import os
import sys
import warnings

import pytest

from conftest import REPO, REQUIRE_INTEGRATION

sys.path.insert(0, os.path.join(REPO, "e2e"))

import check  # noqa: E402
from workloads import BY_NAME, WORKLOADS  # noqa: E402

MAKE_TEST = [w.name for w in WORKLOADS if w.in_make_test]


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    import host
    import test_vm
    problem = test_vm._problem()
    if problem:
        if REQUIRE_INTEGRATION:
            pytest.fail(f"VM test prerequisite missing: {problem}")
        pytest.skip(problem)
    from conftest import build_kernel
    build_kernel(request)               # its progress shown, not held back
    out = host.run(MAKE_TEST, str(tmp_path_factory.mktemp("e2e")))
    for name, (run, _) in out.items():
        if run.get("retried_after"):
            warnings.warn(f"e2e: the {name} guest hung and was booted again: "
                          f"{run['retried_after'][-600:]}", stacklevel=1)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("name", MAKE_TEST)
def test_the_guest_ran_its_workload(results, name):
    run, stat = results[name]
    assert run["rc"] == 0, run["stderr"]
    assert f"E2E-END {name} 0" in run["console"], run["console"][-2000:]
    assert stat is not None


@pytest.mark.integration
@pytest.mark.parametrize("name", MAKE_TEST)
def test_qemu_dispatched_what_its_own_log_says(results, name):
    run, stat = results[name]
    assert run["log"], "QEMU logged no handler call"
    assert check.against_qemu_log(stat, run["log"]) == []


@pytest.mark.integration
@pytest.mark.parametrize("name", MAKE_TEST)
def test_the_expected_paths_and_nothing_dropped(results, name):
    _, stat = results[name]
    assert check.expected_paths(stat, BY_NAME[name].expect_paths) == []
    assert check.nothing_dropped(stat) == []


@pytest.mark.integration
def test_what_qemu_logged_that_no_guest_did_is_its_msi_delivery(results):
    """The one difference from QEMU's log that is allowed (check.QEMU_OWN):
    QEMU's NVMe sends each MSI by writing to the APIC's MSI window itself.
    The boot has no MSI device and no such write; on NVMe, QEMU wrote it at
    least once per NVMe interrupt the guest handled, and no guest access
    went there."""
    _, boot = results["boot"]
    assert check.qemu_own(boot, results["boot"][0]["log"]) == {}
    run, stat = results["nvme"]
    own = check.qemu_own(stat, run["log"])
    handled = check.msi_interrupts(run["console"], "nvme")
    assert handled > 0, run["console"][-3000:]
    assert own[("kvm-apic-msi", "write")] >= handled
    # The guest's own accesses there are its LAPIC's, in kvm.ko.
    assert {r["path"] for r in stat["rows"] if r["region"] == "kvm-apic-msi"} <= {"kernel"}


@pytest.mark.integration
def test_nvme_is_the_first_candidate_with_its_time(results):
    _, stat = results["nvme"]
    assert check.candidate_first(stat, "nvme") == []
    first = stat["candidates"][0]
    assert first["userspace_ms"] > 0 and first["count"] > 0


# -- the checks, on hand-made documents ----------------------------------------

def _stat(rows, diagnostics=None, candidates=()):
    return {"rows": rows, "diagnostics": diagnostics or {}, "candidates": list(candidates)}


def _row(region, op, path, count, calls, sizes, rejected=0):
    return {"region": region, "op": op, "path": path, "count": count, "qemu_calls": calls,
            "qemu_rejected": rejected, "sizes": {str(k): v for k, v in sizes.items()}}


def test_check_finds_calls_and_bytes_that_differ():
    stat = _stat([_row("nvme", "write", "userspace", 10, 10, {4: 10}),
                  _row("vga-lowmem", "write", "coalesced", 4, 8, {2: 4}),
                  _row("kvm-pit", "write", "kernel", 3, None, {1: 3})])
    log = {"nvme|write": [10, 40], "vga-lowmem|write": [8, 8]}
    assert check.against_qemu_log(stat, log) == []
    assert check.against_qemu_log(stat, {"nvme|write": [9, 36], "vga-lowmem|write": [8, 8]})
    assert check.against_qemu_log(stat, {**log, "nvme|write": [10, 44]})
    assert check.against_qemu_log(stat, {**log, "serial|write": [1, 1]})     # unseen by us
    unknown = _stat([_row("nvme", "read", "userspace", 1, None, {4: 1})])
    assert check.against_qemu_log(unknown, {"nvme|read": [1, 4]})


def test_check_paths_drops_and_candidates():
    stat = _stat([_row("nvme", "write", "userspace", 1, 1, {4: 1})],
                 diagnostics={"dropped_latency": 0, "lost_events": 2},
                 candidates=[{"region": "serial"}, {"region": "nvme"}])
    assert check.expected_paths(stat, [("nvme", "userspace")]) == []
    assert check.expected_paths(stat, [("nvme", "ioeventfd")])
    assert check.nothing_dropped(stat) == ["lost_events: 2"]
    assert check.candidate_first(stat, "nvme")


def test_qemu_own_msi_writes_are_told_apart():
    log = {"kvm-apic-msi|write": [5, 20], "nvme|write": [1, 4]}
    stat = _stat([_row("nvme", "write", "userspace", 1, 1, {4: 1})])
    assert check.qemu_own(stat, log) == {("kvm-apic-msi", "write"): 5}
    assert check.against_qemu_log(stat, log) == []
    # A guest access counted there would be compared like any other.
    stat["rows"].append(_row("kvm-apic-msi", "write", "userspace", 1, 1, {4: 1}))
    assert check.against_qemu_log(stat, log)
    console = """           CPU0
 24:        131   PCI-MSIX-0000:00:03.0   0-edge      nvme0q0
 25:        617   PCI-MSIX-0000:00:03.0   1-edge      nvme0q1
  8:          0   IO-APIC    8-edge      rtc0"""
    assert check.msi_interrupts(console, "nvme") == 748


def test_top_check_reads_the_last_frame_whole():
    frame = ("ioregtop  vm  kernel 6.12  {when}\naccesses/s: 0\n\n   PID VM  REGION  PATH\n"
             "{rows}\n")
    text = (frame.format(when="tracing", rows="  165 vm  nvme  userspace  W") + "\n" +
            frame.format(when="ended", rows="  165 vm  kvm-pit  kernel  RW"))
    assert check.top_final_table(text, [("kvm-pit", "kernel")]) == []
    assert check.top_final_table(text, [("nvme", "userspace")])      # not in the last
    assert check.top_final_table("", [("nvme", "userspace")]) == ["ioregtop printed nothing"]


@pytest.mark.integration
@pytest.mark.parametrize("name", MAKE_TEST)
def test_the_test_vms_kernel_did_not_complain(results, name):
    run, _ = results[name]
    assert run["kernel_complaints"] == []


def test_check_device_commands_and_console_lines():
    stat = _stat([_row("nvme", "write", "ioregionfd", 10, 10, {4: 10}),
                  _row("nvme", "read", "ioregionfd", 2, 2, {4: 1, 8: 1}),
                  _row("nvme", "write", "userspace", 5, 5, {4: 5})])
    assert check.against_device_commands(stat, {"nvme|write": [10, 40],
                                                "nvme|read": [2, 12]}) == []
    assert check.against_device_commands(stat, {"nvme|write": [9, 36], "nvme|read": [2, 12]})
    assert check.against_device_commands(stat, {"nvme|write": [10, 40]})    # reads unseen
    assert check.console_checks("E2E-CHECK a\nE2E-CHECK b\n", ["a", "b"]) == []
    assert check.console_checks("E2E-CHECK a\n", ["a", "b"]) == ["the guest never printed "
                                                                 "'E2E-CHECK b'"]
    assert check.forbidden_paths(stat, [("nvme", "ioregionfd")])
    assert check.forbidden_paths(stat, [("nvme", "kernel")]) == []
