"""Issue 16, "missing": the options users of bcc's tools, perf kvm stat and
kvm_stat expect, checked against the demo's own truth: `stat INTERVAL
[COUNT]`, --csv, --sort, --top, --vm."""

import collections
import csv
import io
import json

import pytest

from conftest import IOREGTRACE, count_rows, load_json, run_cli

pytestmark = pytest.mark.integration


def _demo(*args):
    return ["--", IOREGTRACE, "demo", *args]


def _sum_rows(docs):
    total = collections.Counter()
    for doc in docs:
        total.update(count_rows(doc))
    return dict(total)


def test_intervals_add_up_to_the_truth(tracing_host, tmp_path):
    """Every access is in exactly one interval: the JSON lines of a
    periodic stat add up, key by key, to what the demo made."""
    out, truth = tmp_path / "series.jsonl", tmp_path / "truth.json"
    res = run_cli("stat", "0.25", "--json", "-o", str(out),
                  *_demo("--repeat", "6", "--delay-us", "200", "--truth", str(truth)))
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) >= 3, f"{len(docs)} interval(s)"
    assert [d["interval"] for d in docs] == list(range(1, len(docs) + 1))
    times = [d["time_s"] for d in docs]
    assert times == sorted(times)
    assert sum(1 for d in docs if d["rows"]) >= 2      # the accesses really are spread
    assert _sum_rows(docs) == count_rows(load_json(truth))
    assert all(d["lost_events"] == 0 and d["dropped_keys"] == 0 for d in docs)


def test_count_ends_the_series_and_the_command(tracing_host, tmp_path):
    """After COUNT intervals the series ends and CMD with it (as after -d),
    with exactly COUNT tables printed."""
    res = run_cli("stat", "0.5", "2", *_demo("--repeat", "100000"), timeout=60)
    assert res.stdout.count(" interval ") == 2, res.stdout
    assert "interval 1: " in res.stdout and "interval 2: " in res.stdout
    assert "2 intervals printed: ending" in res.stderr, res.stderr
    assert res.returncode == 128 + 15, res.stderr        # the demo ended by SIGTERM


def test_csv_equals_the_truth(tracing_host, tmp_path):
    out, truth = tmp_path / "stat.csv", tmp_path / "truth.json"
    res = run_cli("stat", "--csv", "--by", "address", "-o", str(out),
                  *_demo("--truth", str(truth)))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    got = {(r["space"], int(r["address"], 16), int(r["size"]), r["op"], r["path"]):
           int(r["count"]) for r in rows}
    assert got == count_rows(load_json(truth))
    assert all(r["comm"] == "ioregtrace" for r in rows)


def test_sort_top_and_vm_against_the_truth(tracing_host, tmp_path):
    """--top cuts the rows, not the totals; --sort orders them; --vm keeps
    one VM (by process name here) or none, and says why."""
    truth, top, other = tmp_path / "truth.json", tmp_path / "top.json", tmp_path / "no.json"
    res = run_cli("stat", "--json", "--by", "address", "--sort", "address", "--top", "5",
                  "--vm", "ioregtrace", "-o", str(top), *_demo("--truth", str(truth)))
    assert res.returncode == 0, res.stderr
    doc, expected = load_json(top), count_rows(load_json(truth))
    assert len(doc["rows"]) == 5
    assert doc["rows_omitted"] == len(expected) - 5
    assert doc["total"] == sum(expected.values())
    keys = [(r["space"], r["address"]) for r in doc["rows"]]
    assert keys == sorted(keys, key=lambda k: (k[0] != "mmio", k[1]))
    # The five shown are the five lowest addresses of the truth (MMIO first).
    lowest = sorted(expected, key=lambda k: (k[0] != "mmio", k[1]))[:5]
    assert [(r["space"], r["address"]) for r in doc["rows"]] == [(k[0], k[1]) for k in lowest]

    res = run_cli("stat", "--json", "--vm", "no-such-vm", "-o", str(other), *_demo())
    assert res.returncode == 0, res.stderr
    doc = load_json(other)
    assert doc["rows"] == [] and doc["total"] == 0
    assert any("--vm no-such-vm" in n and "seen: ioregtrace" in n for n in doc["notes"])


def test_sigterm_prints_the_interval_in_progress_and_leaves_nothing(tracing_host, tmp_path):
    import signal
    import subprocess
    import time
    proc = subprocess.Popen([IOREGTRACE, "stat", "0.5", "--json",
                             *_demo("--repeat", "100000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()         # a line per interval, as it ends
    assert json.loads(first)["interval"] == 1
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    docs = [json.loads(first)] + [json.loads(line) for line in out.splitlines()]
    assert [d["interval"] for d in docs] == list(range(1, len(docs) + 1))
    assert docs[-1]["duration_s"] < 0.5 + 0.2 and docs[-1]["rows"], docs[-1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    demo = subprocess.run(["pgrep", "-f", "ioregtrace demo --repeat 100000"],
                          capture_output=True, text=True)
    assert demo.stdout == "", "the demo outlived ioregtrace"


def test_per_vcpu_rows_add_up_to_the_truth(tracing_host, tmp_path):
    """The demo's one vCPU runs in its main thread: every row names it."""
    out, truth = tmp_path / "stat.json", tmp_path / "truth.json"
    res = run_cli("stat", "--json", "--per-vcpu", "--by", "address", "-o", str(out),
                  *_demo("--truth", str(truth)))
    assert res.returncode == 0, res.stderr
    doc = load_json(out)
    assert {r["tid"] for r in doc["rows"]} == {r["pid"] for r in doc["rows"]}
    assert count_rows(doc) == count_rows(load_json(truth))


# One VMM process, two vCPU threads running the demo's guest at different
# scales (each its own VM: the demo VMM has one vCPU), each thread's own
# truth kept by its native thread id.
TWO_VCPU_THREADS = """
import json, sys, threading
from ioregtrace.demo.mix import build_mix
from ioregtrace.demo.run import truth_document
from ioregtrace.demo.vmm import DemoVM

truths = {}
def vcpu(scale):
    vm = DemoVM(build_mix(scale, None), delay_s=0.0002)
    try:
        vm.load_program()
        elapsed = vm.run_guest()
    finally:
        vm.close()
    truths[threading.get_native_id()] = truth_document(vm, elapsed)
threads = [threading.Thread(target=vcpu, args=(s,)) for s in (0.2, 0.5)]
for t in threads: t.start()
for t in threads: t.join()
json.dump({str(tid): doc for tid, doc in truths.items()}, open(sys.argv[1], "w"))
"""


def test_per_vcpu_rows_equal_each_thread_truth(tracing_host, tmp_path):
    import sys
    out, truth = tmp_path / "stat.json", tmp_path / "truth.json"
    res = run_cli("stat", "--json", "--per-vcpu", "--by", "address", "-o", str(out), "--",
                  sys.executable, "-c", TWO_VCPU_THREADS, str(truth))
    assert res.returncode == 0, res.stderr
    doc, truths = load_json(out), load_json(truth)
    assert len(truths) == 2 and len({r["pid"] for r in doc["rows"]}) == 1
    for tid, expected in truths.items():
        rows = {"rows": [r for r in doc["rows"] if r["tid"] == int(tid)]}
        assert count_rows(rows) == count_rows(expected), tid
    assert {r["tid"] for r in doc["rows"]} == {int(tid) for tid in truths}
