"""kernel/build.sh builds the same way however it is started (issue 14).

`make test` exports MAKELEVEL=1 and MAKEFLAGS to everything below it, and
tools/testing/selftests/lib.mk sets OUTPUT only at MAKELEVEL 0: started that
way, the old build.sh linked the selftests with make's builtin rule, and
failed, on every fresh machine.  Rebuilding bzImage to show it would take 15
minutes; the selftest step alone, from the cached tree into a temporary
output, shows it in about one."""

import os
import subprocess

import pytest

from conftest import REPO, REQUIRE_INTEGRATION, build_kernel, kernel_selftests

BUILD = os.path.join(REPO, "kernel", "build.sh")

pytestmark = pytest.mark.integration

# kernel/build.sh's SELFTESTS, which the test VM runs (tests/test_vm.py)
SELFTESTS = kernel_selftests()

# What a parent make exports (MAKELEVEL, MAKEFLAGS, MFLAGS), and variables
# kbuild and the selftests' makefiles read from the environment.
HOSTILE_ENV = {"MAKELEVEL": "1", "MAKEFLAGS": "w -j1 -- V=1", "MFLAGS": "-w -j1",
               "OUTPUT": "/nonexistent", "O": "/nonexistent", "ARCH": "arm64",
               "CFLAGS": "-DIOREGTRACE_HOSTILE_ENV=1 -Wbogus-warning-flag",
               "LDFLAGS": "-lnonexistent", "CC": "false"}


def _built(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF" and os.access(path, os.X_OK)


@pytest.fixture(scope="module")
def kernel_dir(request):
    if os.geteuid() != 0:
        if REQUIRE_INTEGRATION:
            pytest.fail("the kernel build needs root (its cache is /var/cache/ioregtrace)")
        pytest.skip("needs root")
    return build_kernel(request)


def test_every_selftest_was_built(kernel_dir):
    for t in SELFTESTS:
        assert _built(os.path.join(kernel_dir, "selftests", t)), t
    assert _built(os.path.join(kernel_dir, "ioregionfd_test"))


def test_selftests_build_under_a_parent_make(kernel_dir, tmp_path):
    env = dict(os.environ, **HOSTILE_ENV)
    res = subprocess.run(["sh", BUILD, "--selftests-into", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    for t in SELFTESTS:
        assert _built(tmp_path / t), (t, res.stderr[-3000:])
    # progress lines carry the time since the start
    assert "kernel: [0:" in res.stderr, res.stderr
