"""Errors a user can cause or fix: one line on stderr, exit 1 (usage
errors: 2), never a traceback.  These need no BPF."""

import os

import pytest

from conftest import IOREGTRACE, run_cli
from ioregtrace import cli, requirements

pytestmark = pytest.mark.skipif(not os.path.exists(IOREGTRACE),
                                reason="console script not installed (make setup)")


def one_line_error(res, code=1):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ioregtrace: error: ")
    return lines[0]


def free_pid():
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_unknown_pid():
    pid = free_pid()
    assert f"no process with pid {pid}" in one_line_error(run_cli("stat", "-p", str(pid)))


def test_command_not_found_on_path():
    line = one_line_error(run_cli("stat", "--", "no-such-command-ioregtrace"))
    assert "command not found: no-such-command-ioregtrace" in line


def test_command_path_not_executable(tmp_path):
    script = tmp_path / "vmm.sh"
    script.write_text("#!/bin/sh\n")
    line = one_line_error(run_cli("stat", "--", str(script)))
    assert f"not executable: {script}" in line


def test_bad_duration():
    assert "must be > 0" in one_line_error(run_cli("stat", "-d", "0"))


def test_usage_errors_are_one_line_with_a_pointer_to_help():
    line = one_line_error(run_cli("stat", "--bogus"), code=2)
    assert "--bogus" in line and "ioregtrace stat --help" in line
    line = one_line_error(run_cli("stat", "--"), code=2)
    assert "must be followed by a command" in line
    line = one_line_error(run_cli("demo", "--set", "inline-read=x"), code=2)
    assert "expected NAME=COUNT" in line


def test_unknown_demo_block():
    line = one_line_error(run_cli("demo", "--set", "nosuch=5"))
    assert "unknown demo block 'nosuch'" in line and "forward-read" in line


def test_explicit_header_tree_without_includes(tmp_path):
    env = dict(os.environ, BCC_KERNEL_SOURCE=str(tmp_path))
    res = run_cli("stat", "-d", "1", env=env)
    if res.returncode == 1 and "privileges" in res.stderr:
        pytest.skip("not root: the privilege check comes first")
    line = one_line_error(res)
    assert f"BCC_KERNEL_SOURCE={tmp_path} has no include/" in line
    assert "unset BCC_KERNEL_SOURCE" in line


def test_missing_tracepoint_names_it_and_doctor(monkeypatch, capsys):
    ok = requirements.Check("x", True, "")
    monkeypatch.setattr(requirements, "check_privileges", lambda: ok)
    monkeypatch.setattr(requirements, "check_mounts", lambda: [ok])
    monkeypatch.setattr(requirements, "tracing_root", lambda: "/nonexistent")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stat", "-d", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "tracepoint kvm:kvm_mmio: absent from this kernel" in err[0]
    assert "modprobe" in err[0] and "ioregtrace doctor" in err[0]


def test_missing_bcc_says_how_to_get_it(monkeypatch, capsys):
    ok = requirements.Check("x", True, "")
    monkeypatch.setattr(requirements, "check_privileges", lambda: ok)
    monkeypatch.setattr(requirements, "check_mounts", lambda: [ok])
    monkeypatch.setattr(requirements, "check_tracepoints", lambda: [ok])
    monkeypatch.setitem(__import__("sys").modules, "bcc", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stat", "-d", "1"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "BCC python module" in line and "python3-bpfcc" in line


# -o into a place that cannot be written: refused before anything is traced
# (it used to fail with a traceback after tracing, and lose the result).

@pytest.mark.parametrize("command", [("stat", "--json"), ("record",)])
def test_unwritable_output_is_refused_before_tracing(tmp_path, command):
    marker = tmp_path / "cmd-ran"
    for target in (tmp_path / "no-such-dir" / "out", "/proc/ioregtrace-out"):
        res = run_cli(*command, "-o", str(target), "--", "touch", str(marker))
        assert f"cannot write {target}" in one_line_error(res)
        assert not marker.exists(), "CMD ran although the output could not be written"


def test_report_to_unwritable_output(tmp_path):
    from test_bundle import sample_recording
    from ioregtrace import bundle
    path = tmp_path / "b.bundle"
    bundle.write(str(path), sample_recording())
    target = tmp_path / "no-such-dir" / "report.txt"
    line = one_line_error(run_cli("report", str(path), "-o", str(target)))
    assert f"cannot write {target}" in line


def test_a_result_that_cannot_be_written_after_all_goes_to_stdout(tmp_path, capsys):
    target = tmp_path / "gone" / "out.json"
    cli._write("the result\n", str(target))        # its directory went away meanwhile
    out, err = capsys.readouterr()
    assert out == "the result\n"
    assert f"cannot write {target}" in err and "stdout" in err


def test_a_bundle_that_cannot_be_written_after_all_goes_to_a_file_of_ours(tmp_path, capsys):
    from test_bundle import sample_recording
    from ioregtrace import bundle
    target = tmp_path / "gone" / "x.bundle"
    written = cli._write_bundle(bundle, str(target), sample_recording(), redact=False)
    try:
        assert written != str(target) and bundle.read(written).snapshot.accesses
        assert f"wrote the bundle to {written}" in capsys.readouterr().err
    finally:
        os.unlink(written)


def test_doctor_says_why_optional_tracepoints_may_be_absent(monkeypatch):
    """Issue 16, defect 10: the ioregionfd tracepoints were described as
    "VMX fast MMIO path only, modprobe kvm_intel"."""
    monkeypatch.setattr(requirements, "tracing_root", lambda: "/sys/kernel/tracing")
    monkeypatch.setattr(requirements, "tracepoint_exists",
                        lambda subsystem, event: not event.startswith("kvm_ioregion"))
    checks = {c.name: c for c in requirements.check_tracepoints()}
    for name in ("kvm_ioregion_send", "kvm_ioregion_response"):
        c = checks[f"tracepoint kvm:{name}"]
        assert not c.ok and not c.required
        assert "ioregionfd series of kernel/" in c.detail and "VMX" not in c.detail, c.detail
        assert "kernel/" in c.fix and "modprobe" not in c.fix, c.fix


def test_doctor_says_when_headers_are_of_another_kernel(monkeypatch):
    monkeypatch.setattr(requirements.platform, "release", lambda: "6.18.44-custom")
    note = requirements._other_kernel("/var/cache/x/linux-headers-6.12.117+deb12-amd64")
    assert "Linux 6.12, running 6.18" in note
    assert requirements._other_kernel("/var/cache/x/linux-headers-6.18.1-amd64") == ""


@pytest.mark.parametrize("command", ["stat", "record", "serve", "top"])
def test_usage_shows_the_command_to_run(command):
    """Issue 16, defect 14: the usage lines did not show `-- CMD`, and a
    command without `--` got "Got unexpected extra arguments" alone."""
    res = run_cli(command, "--help")
    assert res.returncode == 0
    periodic = " [INTERVAL [COUNT]]" if command == "stat" else ""
    assert res.stdout.splitlines()[0] == \
        f"Usage: ioregtrace {command} [OPTIONS]{periodic} [-- CMD [ARGS]...]", res.stdout
    extra = ["-o", "x.bundle"] if command == "record" else []
    line = one_line_error(run_cli(command, *extra, "qemu-system-x86_64"), code=2)
    assert "a command to run goes after `--`" in line


def test_ioregtop_help_says_ioregtop():
    ioregtop = os.path.join(os.path.dirname(IOREGTRACE), "ioregtop")
    import subprocess
    res = subprocess.run([ioregtop, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.splitlines()[0] == "Usage: ioregtop [OPTIONS] [-- CMD [ARGS]...]"
    res = subprocess.run([ioregtop, "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "(see `ioregtop --help`)" in res.stderr, res.stderr


def test_metrics_url_brackets_an_ipv6_address():
    """Issue 16, defect 13: `serve --listen [::1]:9860` printed
    http://::1:9860/metrics."""
    assert cli.metrics_url("::1", 9860) == "http://[::1]:9860/metrics"
    assert cli.metrics_url("127.0.0.1", 9860) == "http://127.0.0.1:9860/metrics"
    assert cli._listen_address("[::1]:9861") == ("::1", 9861)
