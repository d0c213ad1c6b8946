"""The benchmark's own arithmetic (no measuring here: targets live in
`make bench`, not in tests)."""

import importlib.util
import os

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "bench", "run.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

NAMES = [t.name for t in bench.TOOLS if t.name != "untraced"]


def overheads(**medians):
    base = {n: {"min": 0.0, "median": 0.0, "max": 0.0} for n in NAMES}
    for short, value in medians.items():
        name = next(n for n in NAMES if n.startswith(short.replace("_", " ")))
        base[name] = {"min": value, "median": value, "max": value}
    return base


def extras(lost=0, events_short=0):
    out = {}
    for w in bench.WORKLOADS:
        out[w] = {n: [{"accesses": 100, "lost": lost, "dropped": 0,
                       "events": 100 - events_short}] for n in NAMES}
    return out


def checks(k, u, attach=1.0, soak=None, **kw):
    return {name: ok for name, ok, _ in bench.verdicts(
        {"in-kernel": k, "userspace": u}, extras(**kw), {"median": attach}, soak)}


def test_all_pass():
    k = overheads(floor=0.05, ioregtrace_stat=0.06, ioregtrace_record=0.10, bpftrace=0.15,
                  perf_stat=0.09, perf_record=0.33)
    u = overheads(floor=0.01, ioregtrace_stat=0.04, ioregtrace_record=0.08, bpftrace=0.08,
                  perf_stat=0.05, perf_record=0.17)
    result = checks(k, u, soak={"start": {"rss_kib": 100}, "end": {"rss_kib": 104},
                                "minutes": 1})
    assert all(result.values()), result


def test_each_target_can_fail():
    k = overheads(floor=0.05, ioregtrace_stat=0.07, ioregtrace_record=0.40, bpftrace=0.06,
                  perf_stat=0.06, perf_record=0.33)
    u = overheads(floor=0.01, ioregtrace_stat=0.06, ioregtrace_record=0.08, bpftrace=0.05,
                  perf_stat=0.05, perf_record=0.07)
    result = checks(k, u, attach=2.5, lost=1, events_short=3,
                    soak={"start": {"rss_kib": 100}, "end": {"rss_kib": 110}, "minutes": 1})
    assert not any(result.values()), result


def test_aggregate_short_count_fails():
    k = overheads(floor=0.05, ioregtrace_stat=0.06, ioregtrace_record=0.10, bpftrace=0.15,
                  perf_stat=0.09, perf_record=0.33)
    ex = extras()
    ex["userspace"]["ioregtrace stat (aggregate)"][0]["counted"] = 99
    result = {name: ok for name, ok, _ in bench.verdicts(
        {"in-kernel": k, "userspace": k}, ex, {"median": 1.0}, None)}
    assert result["aggregate: 0 lost"] is False


def test_stats_and_noise():
    assert bench.stats([3, 1, 2]) == {"min": 1, "median": 2, "max": 3}
    overheads = {w: {"untraced": bench.stats([-0.02, 0.01, 0.03])} for w in bench.WORKLOADS}
    assert bench.noise(overheads) == {w: 0.05 for w in bench.WORKLOADS}


def test_pass_log_windows(tmp_path):
    log = tmp_path / "passes"
    # time, cpu seconds, accesses so far
    log.write_text("10.0 1.0 0\n10.2 1.1 1000\n10.4 1.3 2000\n10.6 1.35 3000\n10.8 1.4")
    passes = bench.PassLog(str(log))
    assert len(passes.passes()) == 3          # a torn last line is not a pass
    rates, wall, n = passes.window(10.1, 10.7)
    assert [round(r) for r in rates] == [5000, 20000] and n == 2000
    assert [round(w) for w in wall] == [5000, 5000]
    assert passes.window(10.0, 10.1) == ([], [], 0)
