"""Static checks that catch real bugs (undefined names, unused imports,
late-binding closures), run with the tests so CI enforces them."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

RUFF = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff not installed (make setup installs it)")
def test_ruff_finds_nothing():
    res = subprocess.run([RUFF, "check", "--no-cache", "--select", "F,E9,B",
                          "--line-length", "100", "ioregtrace", "tests", "dashboards", "kernel",
                          "bench"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
