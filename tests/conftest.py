import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
IOREGTRACE = os.path.join(BIN, "ioregtrace")

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


@pytest.fixture(scope="session")
def tracing_host():
    """The machine can load the tracer and run the demo VM."""
    problem = _integration_problem()
    if problem:
        if REQUIRE_INTEGRATION:
            pytest.fail(f"integration prerequisite missing: {problem}")
        pytest.skip(problem)
