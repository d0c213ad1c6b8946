"""The NVMe phase's arithmetic (bench/nvme.py): what it reads off the
guests' consoles and ioregtrace's stat, and the ratios it reports."""

import importlib.util
import os

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_nvme", os.path.join(REPO, "bench", "nvme.py"))
nvme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nvme)


def console(iops_by_depth):
    """A guest console with one ioload line per run, repeats interleaved."""
    lines = ["E2E-BEGIN x"]
    for i in range(len(iops_by_depth[1])):
        for depth, iops in iops_by_depth.items():
            reads = nvme.BENCH_READS[depth]
            lines.append(f"ioload: /dev/nvme0n1 rand iodepth {depth}: {reads} reads in "
                         f"{reads / iops[i]:.3f} s, {iops[i]} IOPS")
    return "\n".join(lines) + "\nE2E-END x 0\n"


def stat(userspace_ms=0.0, paths=()):
    return {"candidates": [{"region": "nvme", "userspace_ms": userspace_ms},
                           {"region": "serial", "userspace_ms": 999.0}],
            "rows": [{"region": "nvme", "path": p} for p in paths]}


def test_ratios_per_repeat_and_the_savings():
    results = {
        "stock": ({"console": console({1: [400, 500, 450], 16: [2000, 2000, 2000]})},
                  stat(userspace_ms=1200.0, paths=["userspace"])),
        "ioeventfd": ({"console": console({1: [400, 500, 450], 16: [3000, 2000, 2500]})},
                      stat(paths=["ioeventfd", "userspace"])),
        "ioregionfd": ({"console": console({1: [800, 500, 900], 16: [4000, 4000, 4000]})},
                       stat(paths=["ioregionfd"])),
        "iothread": ({"console": console({1: [400, 500, 450], 16: [1000, 1000, 1000]})},
                     stat(paths=["ioregionfd"])),
    }
    f = nvme.summarize(results)
    assert f["ratios"]["ioregionfd"][1] == {"median": 2.0, "min": 1.0, "max": 2.0}
    assert f["ratios"]["ioregionfd"][16] == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert f["ratios"]["ioeventfd"][16] == {"median": 1.25, "min": 1.0, "max": 1.5}
    assert f["predicted_saving_ms"] == 1200.0           # the NVMe candidate only
    reads = nvme.BENCH_READS
    stock_s = sum(reads[1] / i for i in (400, 500, 450)) + 3 * reads[16] / 2000
    fd_s = sum(reads[1] / i for i in (800, 500, 900)) + 3 * reads[16] / 4000
    thread_s = sum(reads[1] / i for i in (400, 500, 450)) + 3 * reads[16] / 1000
    assert f["measured_saving_ms"]["ioregionfd"] == pytest.approx((stock_s - fd_s) * 1000, abs=5)
    assert f["measured_saving_ms"]["iothread"] == pytest.approx((stock_s - thread_s) * 1000,
                                                                abs=5)
    assert f["measured_saving_ms"]["iothread"] < 0     # slower: a negative saving
    assert f["ratios"]["iothread"][16] == {"median": 0.5, "min": 0.5, "max": 0.5}
    assert f["paths"]["ioregionfd"] == [("nvme", "ioregionfd")]
    text = nvme.report(f)
    assert "iodepth 1: x2.00 (1.00..2.00)" in text and "predicted" in text


def test_a_guest_that_ran_fewer_reads_is_an_error():
    short = {"console": console({1: [400, 500], 16: [2000, 2000]})}
    full = {"console": console({1: [400, 500, 450], 16: [2000, 2000, 2000]})}
    with pytest.raises(RuntimeError, match="2 runs at iodepth 1, expected 3"):
        nvme.summarize({"stock": (short, stat()), "ioeventfd": (full, stat()),
                        "ioregionfd": (full, stat()), "iothread": (full, stat())})
