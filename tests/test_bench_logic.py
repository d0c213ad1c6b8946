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


def test_stats_and_noise():
    assert bench.stats([3, 1, 2]) == {"min": 1, "median": 2, "max": 3}
    results = {w: {"untraced": [90, 100, 110]} for w in bench.WORKLOADS}
    assert bench.noise(results) == {w: 0.2 for w in bench.WORKLOADS}
