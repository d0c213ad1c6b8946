"""The benchmark's own arithmetic (no measuring here: targets live in
`make bench`, not in tests)."""

import importlib.util
import os

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "bench", "run.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

NAMES = [t.name for t in bench.TOOLS if t.name != "untraced"]


def overheads(noise=0.0, **medians):
    base = {n: {"min": 0.0, "median": 0.0, "max": 0.0} for n in NAMES}
    base["untraced"] = {"min": -noise / 2, "median": 0.0, "max": noise / 2}
    for short, value in medians.items():
        name = next(n for n in NAMES if n.startswith(short.replace("_", " ")))
        base[name] = {"min": value, "median": value, "max": value}
    return base


def bpf_figures(stat_k=55, floor_k=50, bpftrace_k=200, stat_u=150, bpftrace_u=300,
                hook=100, cpu_u=25000):
    """The cost phases' figures (ns) as verdicts() takes them."""
    def costs(**net):
        return {next(n for n in NAMES if n.startswith(short)): {"net_ns": v}
                for short, v in net.items()}
    return {"costs": {"in-kernel": costs(ioregtrace=stat_k, floor=floor_k, bpftrace=bpftrace_k),
                      "userspace": costs(ioregtrace=stat_u, floor=50, bpftrace=bpftrace_u)},
            "kvm_run_hook_ns": hook, "cpu_ns": {"in-kernel": 3000, "userspace": cpu_u},
            "round_trip_floor": 160}


def extras(lost=0, events_short=0):
    out = {}
    for w in bench.WORKLOADS:
        out[w] = {n: [{"accesses": 100, "lost": lost, "dropped": 0,
                       "events": 100 - events_short}] for n in NAMES}
    return out


SCRAPE = {"median": 0.2, "max": 0.3, "bytes": 1 << 20}


def verdicts(k, u, attach=1.0, soak=None, bpf=None, scrape=SCRAPE, **kw):
    return bench.verdicts({"in-kernel": k, "userspace": u}, extras(**kw), {"median": attach},
                          scrape, soak, bpf or bpf_figures())


def checks(*args, **kw):
    return {name: ok for name, ok, _ in verdicts(*args, **kw)}


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
                    scrape={"median": 0.3, "max": 0.6, "bytes": 1},
                    soak={"start": {"rss_kib": 100}, "end": {"rss_kib": 110}, "minutes": 1},
                    bpf=bpf_figures(stat_k=80, bpftrace_k=70, stat_u=800, bpftrace_u=270,
                                    hook=300, cpu_u=20000))
    assert not any(result.values()), result


def test_bpf_verdicts_read_the_cost_phase():
    k = overheads(floor=0.05, ioregtrace_stat=0.06)
    by_bpf = lambda **kw: {n: ok for n, ok in checks(k, k, bpf=bpf_figures(**kw)).items()  # noqa: E731
                          if "BPF time" in n}
    assert all(by_bpf().values())
    # 1.3 x the floor's 50 ns is 65
    assert not by_bpf(stat_k=66)["aggregate, in-kernel, BPF time: <= 1.3 x floor's"]
    # the syscall hook counts: 150 + 200 ns per exit is above the one-liner's 300
    assert not by_bpf(hook=200)[
        "aggregate below bpftrace, userspace, BPF time + KVM_RUN's syscall hook"]
    # 5 % of a 25 us exit is 1250 ns
    assert not by_bpf(stat_u=1200)[
        "aggregate, userspace exits, BPF time + KVM_RUN's syscall hook: <= 5 %"]


def test_differences_inside_the_noise_are_marked():
    figures = lambda noise: {n: f for n, _, f in verdicts(  # noqa: E731
        overheads(noise=noise, floor=0.05, ioregtrace_stat=0.06, bpftrace=0.15),
        overheads(noise=noise))}
    name = "aggregate below bpftrace, in-kernel"
    assert "noise" not in figures(0.05)[name]          # 9 points apart, spread 5
    assert "within the A/A noise, 20.0% wide" in figures(0.20)[name]


def test_round_trip_floor_takes_the_cheapest_hook_and_two_clock_reads():
    syscalls = {"untraced": (300, 250), "raw sys_enter, empty program": (340, 300),
                "ioregtrace stat (aggregate)": (500, 290)}
    assert bench.round_trip_floor(syscalls, 70) == (40 + 2 * 70, 40)
    syscalls["raw sys_enter, empty program"] = (600, 400)
    assert bench.round_trip_floor(syscalls, 70) == (200 + 2 * 70, 200)
    syscalls["sys_enter_ioctl, empty program"] = (420, 260)
    assert bench.round_trip_floor(syscalls, 70) == (120 + 2 * 70, 120)


def test_aggregate_short_count_fails():
    k = overheads(floor=0.05, ioregtrace_stat=0.06, ioregtrace_record=0.10, bpftrace=0.15,
                  perf_stat=0.09, perf_record=0.33)
    ex = extras()
    ex["userspace"]["ioregtrace stat (aggregate)"][0]["counted"] = 99
    result = {name: ok for name, ok, _ in bench.verdicts(
        {"in-kernel": k, "userspace": k}, ex, {"median": 1.0}, SCRAPE, None, bpf_figures())}
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


def test_in_kernel_bpf_ratio_is_the_median_of_the_paired_repeats():
    name = "aggregate, in-kernel, BPF time: <= 1.3 x floor's"
    k = u = overheads()

    def ratio_check(floor_ratios):
        bpf = bpf_figures(stat_k=44, floor_k=32)          # least of each: 1.375 x
        bpf["costs"]["in-kernel"]["ioregtrace stat (aggregate)"]["floor_ratios"] = floor_ratios
        return checks(k, u, bpf=bpf)[name]
    assert ratio_check([1.59, 0.92, 0.8, 1.0])            # median 0.96
    assert not ratio_check([1.59, 1.4, 1.35, 0.92])       # median 1.375
    assert not checks(k, u, bpf=bpf_figures(stat_k=44, floor_k=32))[name]   # no pairs: nets

