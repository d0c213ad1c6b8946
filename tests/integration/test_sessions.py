"""How `stat` starts and stops: CMD's exit status, children of CMD,
Ctrl-C / SIGTERM still printing what was gathered, -d."""

import collections
import signal
import time
import subprocess

import pytest

from conftest import IOREGTRACE, Watched, count_rows, load_json, run_cli

pytestmark = pytest.mark.integration


def test_exit_status_of_cmd_is_returned_after_printing(tracing_host):
    res = run_cli("stat", "--", "sh", "-c", "echo child-output; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout.startswith("child-output\n")
    assert "Total: 0 accesses" in res.stdout


def test_vmm_started_by_a_wrapper_is_traced_from_its_start(tracing_host, tmp_path):
    truth, out = tmp_path / "truth.json", tmp_path / "stat.json"
    script = f"{IOREGTRACE} demo --scale 0.3 --delay-us 100 --truth {truth} && exit 0"
    res = run_cli("stat", "--json", "-o", str(out), "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    stat, truth = load_json(out), load_json(truth)
    assert count_rows(stat) == count_rows(truth)
    assert stat["notes"] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_still_prints_what_was_gathered(tracing_host, tmp_path, sig):
    """Tracing every VM on the host (no -p, no CMD) until interrupted."""
    truth, out = tmp_path / "truth.json", tmp_path / "stat.json"
    stat = Watched([IOREGTRACE, "stat", "--json", "-o", str(out)])
    try:
        stat.wait_for("tracing every KVM VM")
        demo = run_cli("demo", "--scale", "0.3", "--delay-us", "100", "--truth", str(truth))
        assert demo.returncode == 0, demo.stderr
        stat.proc.send_signal(sig)
        assert stat.finish() == 0, stat.lines
    finally:
        stat.kill()
    truth = load_json(truth)
    pid = truth["rows"][0]["pid"]
    assert count_rows(load_json(out), pid) == count_rows(truth)


def test_duration_ends_the_session(tracing_host, tmp_path):
    out = tmp_path / "stat.json"
    res = run_cli("stat", "-d", "1", "--json", "-o", str(out), timeout=60)
    assert res.returncode == 0, res.stderr
    assert 1.0 <= load_json(out)["duration_s"] < 5.0


def test_a_reused_pid_is_a_new_vm(tracing_host, tmp_path):
    """Two demo VMs, one after the other, on the same pid (forced through
    ns_last_pid): two VMs in the output, each with its own exact counts."""
    out, t1, t2 = tmp_path / "stat.json", tmp_path / "t1.json", tmp_path / "t2.json"
    stat = Watched([IOREGTRACE, "stat", "--json", "-o", str(out)])
    try:
        stat.wait_for("tracing every KVM VM")
        demo = [IOREGTRACE, "demo", "--scale", "0.1", "--delay-us", "100", "--truth"]
        assert subprocess.run(demo + [str(t1)], capture_output=True).returncode == 0
        pid = load_json(t1)["rows"][0]["pid"]
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            second = subprocess.Popen(demo + [str(t2)], stderr=subprocess.DEVNULL)
            second.wait()
            if second.pid == pid:
                break
        else:
            pytest.fail(f"pid {pid} could not be reused")
        stat.proc.send_signal(signal.SIGINT)
        assert stat.finish() == 0
    finally:
        stat.kill()
    rows = [r for r in load_json(out)["rows"] if r["pid"] == pid]
    per_key = collections.defaultdict(list)
    for r in rows:
        per_key[(r["space"], r["address"], r["size"], r["op"], r["path"])].append(r["count"])
    assert count_rows(load_json(t1)) == count_rows(load_json(t2))
    for key, count in count_rows(load_json(t1)).items():
        assert sorted(per_key[key]) == [count, count], key     # two VMs, never merged


def test_other_vms_are_not_counted(tracing_host, tmp_path):
    """A VM that is not a target stays out, even one that never leaves the
    guest (it was once seen before the filter was set up, see CFG_MODE)."""
    busy = subprocess.Popen([IOREGTRACE, "demo", "--scale", "0", "--set", "doorbell=100000",
                             "--repeat", "100000"], stderr=subprocess.DEVNULL)
    try:
        truth, out = tmp_path / "truth.json", tmp_path / "stat.json"
        res = run_cli("stat", "--json", "-o", str(out), "--", IOREGTRACE, "demo",
                      "--scale", "0.2", "--delay-us", "100", "--truth", str(truth))
        assert res.returncode == 0, res.stderr
        doc = load_json(out)
        assert {r["pid"] for r in doc["rows"]} == {load_json(truth)["rows"][0]["pid"]}
        assert count_rows(doc) == count_rows(load_json(truth))
    finally:
        busy.kill()
        busy.wait()


def _process_gone(pid, timeout=15):
    """True once `pid` has exited (reaped or a zombie of a gone parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_ioregtrace_alone_ends_cmd_too(tracing_host, tmp_path, sig):
    """A signal sent to ioregtrace only (as a service manager or `kill`
    does, unlike Ctrl-C at a terminal, which reaches CMD too): the table is
    still written, CMD does not outlive ioregtrace, and the exit status is
    128 + the signal.  CMD used to be left running, and ioregtrace exited
    130 after waiting 10 s."""
    out = tmp_path / "stat.json"
    stat = Watched([IOREGTRACE, "stat", "--json", "-o", str(out), "--",
                    IOREGTRACE, "demo", "--scale", "0", "--set", "doorbell=100000",
                    "--repeat", "100000"], start_new_session=True)
    try:
        line = stat.wait_for("tracing ")
        demo_pid = int(line.split("(pid ")[1].split(")")[0])
        time.sleep(3)              # the demo's VM runs its doorbells by then
        stat.proc.send_signal(sig)
        assert stat.finish() == 128 + sig, stat.lines
    finally:
        stat.kill()
    assert _process_gone(demo_pid), f"the demo (pid {demo_pid}) outlived ioregtrace"
    rows = load_json(out)["rows"]
    assert any(r["pid"] == demo_pid and r["path"] == "ioeventfd" for r in rows), rows


def test_duration_with_cmd_reports_then_ends_cmd(tracing_host, tmp_path):
    """Issue 16, defect 3: `-d` with `-- CMD` reports at -d, then ends CMD
    (it used to wait, silent, for CMD to exit by itself)."""
    out = tmp_path / "stat.json"
    started = time.monotonic()
    res = run_cli("stat", "-d", "3", "--json", "-o", str(out), "--", IOREGTRACE, "demo",
                  "--scale", "0", "--set", "doorbell=100000", "--repeat", "100000", timeout=60)
    took = time.monotonic() - started
    assert res.returncode == 128 + signal.SIGTERM, res.stderr     # CMD's: it got SIGTERM
    assert "-d elapsed: ending" in res.stderr, res.stderr
    assert took < 20, took
    doc = load_json(out)
    assert 3.0 <= doc["duration_s"] < 6.0 and doc["rows"], doc["duration_s"]
    demo_pid = doc["rows"][0]["pid"]
    assert _process_gone(demo_pid), f"the demo (pid {demo_pid}) outlived ioregtrace"
