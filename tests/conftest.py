import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "kernel"))
BIN = os.path.dirname(sys.executable)
IOREGTRACE = os.path.join(BIN, "ioregtrace")

# The console scripts import whichever checkout `make setup` installed; a
# second worktree's tests must run that worktree's code, so the tree these
# tests belong to comes first for every process they start.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# `make test` sets this: there, a missing prerequisite fails the
# integration tests instead of skipping them.
REQUIRE_INTEGRATION = os.environ.get("IOREGTRACE_REQUIRE_INTEGRATION") == "1"


def run_cli(*args, timeout=120, **kwargs):
    """Run the installed ioregtrace console script."""
    return subprocess.run([IOREGTRACE, *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def _integration_problem():
    from ioregtrace import requirements
    if not os.path.exists(IOREGTRACE):
        return f"{IOREGTRACE} is not installed (make setup)"
    checks = ([requirements.check_privileges()] + requirements.check_mounts()
              + requirements.check_tracepoints()
              + [requirements.check_bcc(), requirements.check_kvm_device()])
    for check in checks:
        if check.required and not check.ok or check.name.startswith("/dev/kvm") and not check.ok:
            return f"{check.name}: {check.detail}"
    return None


def kernel_selftests():
    """The KVM selftests kernel/build.sh builds (paths under
    tools/testing/selftests/kvm), from its SELFTESTS list."""
    with open(os.path.join(REPO, "kernel", "build.sh")) as f:
        listed = re.search(r'^SELFTESTS="([^"]*)"', f.read(), re.M)
    return tuple(listed.group(1).split())


def build_kernel(request):
    """kernel/build.sh (through kernel/vm.py), its progress shown as it
    comes: pytest would hold it back, and a first build takes ~15 minutes."""
    import vm
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return vm.build_kernel()


@pytest.fixture(scope="session")
def tracing_host():
    """The machine can load the tracer and run the demo VM."""
    problem = _integration_problem()
    if problem:
        if REQUIRE_INTEGRATION:
            pytest.fail(f"integration prerequisite missing: {problem}")
        pytest.skip(problem)


class Watched:
    """A child process whose stderr lines are collected as they come, so a
    test can wait for "tracing ..." or "ready" without deadlocking."""

    def __init__(self, argv, **kwargs):
        import queue
        import threading
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, **kwargs)
        self.lines = []
        self._queue = queue.Queue()

        def pump():
            for line in self.proc.stderr:
                self._queue.put(line)
            self._queue.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, text, timeout=60):
        import queue
        import time
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if text in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on stderr in {timeout} s: {self.lines}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"process ended without {text!r}: {self.lines}")
            self.lines.append(line)

    def finish(self, timeout=60):
        rc = self.proc.wait(timeout=timeout)
        while True:
            line = self._queue.get(timeout=5)
            if line is None:
                return rc
            self.lines.append(line)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def count_rows(doc, pid=None):
    """{(space, address, size, op, path): count} of a stat/truth document."""
    return {(r["space"], r["address"], r["size"], r["op"], r["path"]): r["count"]
            for r in doc["rows"] if pid is None or r["pid"] == pid}


def pytest_sessionfinish(session, exitstatus):
    """Under `make test` a skipped test is a failure: CI must run them all."""
    if not REQUIRE_INTEGRATION:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped under make test: failing the run",
                            red=True)
        session.exitstatus = 1
