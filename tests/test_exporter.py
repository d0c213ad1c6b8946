"""The exporter's series rules, on hand-made recordings (no BPF)."""

import json
import os
import subprocess
import sys
import threading

from conftest import REPO
from ioregtrace import histogram
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import LatencyStats, RawSnapshot, VmInfo
from ioregtrace.recording import Recording
from ioregtrace.views import exporter


class FakeTracer:
    lock = threading.RLock()


class FakeSession:
    """What the exporter uses of a Session: recording(live=True)."""

    def __init__(self):
        self.tracer = FakeTracer()
        self.vms = {}
        self.accesses = {}
        self.latencies = {}
        self.counters = {"lost_events": 0, "dropped_accesses": 0}

    def recording(self, live=False):
        snap = RawSnapshot(taken=0.0, vms=dict(self.vms), accesses=dict(self.accesses),
                           latencies=dict(self.latencies), counters=dict(self.counters),
                           exits=dict(getattr(self, "exits", {})))
        return Recording(snapshot=snap, duration_s=1.0)


def key(addr, pid=7, path=Path.USERSPACE, op=Op.READ):
    return AccessKey(pid, Space.MMIO, addr, 4, op, path)


def scrape(exp):
    exp._families = None          # no cache between the steps of a test
    out = {}
    for fam in exp.collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def counters(samples):
    return {dict(labels)["vm"] + " " + dict(labels)["region"]: v
            for (name, labels), v in samples.items() if name == "ioregtrace_accesses_total"}


def series(samples):
    """{(vm, pid, region): count} of the access counters."""
    return {(dict(labels)["vm"], dict(labels)["pid"], dict(labels)["region"]): v
            for (name, labels), v in samples.items() if name == "ioregtrace_accesses_total"}


def test_a_restarted_vm_continues_its_series():
    """Issue 16, defect 13: every series carried the pid, so each restart of
    a VM made new series.  Now a VM is its name: the series of a restarted
    VM go on growing from the last count of the one before, with the
    counts it made between the last scrape and its exit."""
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "qemu")}
    s.accesses = {(1, key(0x1000)): 10}
    exp = exporter.Exporter(s, grace_s=10**9)
    assert series(scrape(exp)) == {("qemu", "", "mmio@0x1000"): 10}
    s.vms[1] = VmInfo(7, 1, True, "qemu", exited_ns=1)
    s.accesses[(1, key(0x1000))] = 12                   # its last two, then it exited
    s.vms[2] = VmInfo(9, 2, True, "qemu")                # restarted, another pid
    s.accesses[(2, key(0x1000, pid=9))] = 3
    assert series(scrape(exp)) == {("qemu", "", "mmio@0x1000"): 15}
    s.accesses[(2, key(0x1000, pid=9))] = 5
    assert series(scrape(exp)) == {("qemu", "", "mmio@0x1000"): 17}
    # The same pid again (reused), same name: a restart like any other.
    s.vms[2] = VmInfo(9, 2, True, "qemu", exited_ns=2)
    s.vms[3] = VmInfo(9, 3, True, "qemu")
    s.accesses[(3, key(0x1000, pid=9))] = 1
    assert series(scrape(exp)) == {("qemu", "", "mmio@0x1000"): 18}


def test_two_running_vms_of_one_name_are_told_apart_by_pid():
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "demo"), 2: VmInfo(8, 2, True, "demo")}
    s.accesses = {(1, key(0x1000)): 4, (2, key(0x1000, pid=8)): 6}
    exp = exporter.Exporter(s)
    assert series(scrape(exp)) == {("demo", "", "mmio@0x1000"): 4,
                                   ("demo", "8", "mmio@0x1000"): 6}


def test_exited_vm_leaves_after_grace_and_other_never_shrinks(monkeypatch):
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "a"), 2: VmInfo(8, 2, True, "b")}
    # The first label set seen (rows come largest first) is admitted.
    s.accesses = {(1, key(0x1000)): 50, (1, key(0x2000)): 6, (2, key(0x3000, pid=8)): 7}
    exp = exporter.Exporter(s, max_series=1, grace_s=5)
    first = counters(scrape(exp))
    assert first == {"a mmio@0x1000": 50, "other other": 13}
    monkeypatch.setattr(exporter.time, "monotonic", lambda: 100.0)
    s.vms[1] = VmInfo(7, 1, True, "a", exited_ns=int(99e9))       # exited 1 s ago
    assert counters(scrape(exp)) == first
    s.vms[1] = VmInfo(7, 1, True, "a", exited_ns=int(90e9))       # 10 s ago: gone
    s.accesses[(2, key(0x3000, pid=8))] = 9
    after = counters(scrape(exp))
    assert "a mmio@0x1000" not in after
    assert after["other other"] >= first["other other"]
    assert after["other other"] == 6 + 9         # a's folded share stays, b grew


def test_latency_histogram_from_kernel_slots():
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "a")}
    k = key(0x1000)
    samples = [1500, 3000, 3000, 1_000_000]
    slots = [0] * histogram.SLOTS
    for ns in samples:
        slots[histogram.slot_of(ns)] += 1
    s.accesses = {(1, k): 4}
    s.latencies = {(1, k): LatencyStats(4, sum(samples), max(samples), slots)}
    out = scrape(exporter.Exporter(s))
    buckets = {dict(labels)["le"]: v for (name, labels), v in out.items()
               if name == "ioregtrace_userspace_dispatch_seconds_bucket"}
    assert buckets["+Inf"] == 4
    les = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
    assert all(a[1] <= b[1] for a, b in zip(les, les[1:], strict=False))   # cumulative
    assert [n for le, n in les if le <= 2.048e-6][-1] == 1            # 1.5 us
    assert [n for le, n in les if le <= 4.096e-6][-1] == 3
    assert [n for le, n in les if le <= 1.048576e-3][-1] == 4
    total = [v for (name, _), v in out.items()
             if name == "ioregtrace_userspace_dispatch_seconds_sum"][0]
    assert abs(total - sum(samples) / 1e9) < 1e-12


def test_ioregionfd_round_trips_have_their_own_histogram():
    """Same region, both paths: each latency goes to its own family, so no
    two samples share a label set."""
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "a")}
    user, direct = key(0x1000), key(0x1000, path=Path.IOREGIONFD)
    slots, direct_slots = [0] * histogram.SLOTS, [0] * histogram.SLOTS
    slots[histogram.slot_of(5000)] = 2
    direct_slots[histogram.slot_of(2000)] = 3
    s.accesses = {(1, user): 2, (1, direct): 3}
    s.latencies = {(1, user): LatencyStats(2, 10_000, 5000, slots),
                   (1, direct): LatencyStats(3, 6_000, 2000, direct_slots)}
    out = scrape(exporter.Exporter(s))
    count = lambda fam: [v for (name, _), v in out.items()   # noqa: E731
                         if name == fam + "_count"]
    assert count("ioregtrace_userspace_dispatch_seconds") == [2]
    assert count("ioregtrace_ioregionfd_round_trip_seconds") == [3]
    assert [v for (name, _), v in out.items()
            if name == "ioregtrace_ioregionfd_round_trip_seconds_sum"] == [6e-6]
    paths = {dict(labels)["path"]: v for (name, labels), v in out.items()
             if name == "ioregtrace_accesses_total"}
    assert paths == {"userspace": 2, "ioregionfd": 3}


def test_dashboard_json_is_what_build_py_generates():
    out = subprocess.run([sys.executable, "-c", "import build; print(build.render(), end='')"],
                         cwd=os.path.join(REPO, "dashboards"), capture_output=True, text=True,
                         check=True).stdout
    with open(os.path.join(REPO, "dashboards", "ioregtrace.json")) as f:
        assert f.read() == out, "run: python3 dashboards/build.py"
    dash = json.loads(out)
    assert {v["name"] for v in dash["templating"]["list"]} >= {"vm", "region"}
    titles = " ".join(p["title"] for p in dash["panels"])
    for needed in ("by dispatch path", "by region", "Userspace share", "p50 / p99",
                   "heatmap", "ioregionfd candidates", "Lost events"):
        assert needed in titles


def test_every_counter_of_the_tracer_is_exported():
    """Issue 16, defect 4: dropped latency samples (and the other drops)
    were not exported at all."""
    from ioregtrace.probes import AGENT_COUNTERS, COUNTERS
    names = COUNTERS + AGENT_COUNTERS
    session = FakeSession()
    session.counters = {name: i + 1 for i, name in enumerate(names)}
    samples = scrape(exporter.Exporter(session))
    got = {dict(labels)["counter"]: v for (name, labels), v in samples.items()
           if name == "ioregtrace_diagnostics_total"}
    assert got == {name: float(i + 1) for i, name in enumerate(names)}


def test_address_labels_are_capped_by_default():
    """Issue 16, defect 6: `serve --by address` had no default cap (one
    QEMU gave 20,851 series); by region none is needed."""
    from ioregtrace import cli
    assert cli.series_cap("address", None) == cli.ADDRESS_SERIES_CAP == 1000
    assert cli.series_cap("address", 50) == 50
    assert cli.series_cap("region", None) is None
    session = FakeSession()
    session.vms = {1: VmInfo(7, 1, True, "qemu")}
    session.accesses = {(1, key(0xA0000 + i)): 1 for i in range(3000)}
    exp = exporter.Exporter(session, by="address", max_series=cli.series_cap("address", None))
    samples = scrape(exp)
    series = [labels for (name, labels), _ in samples.items()
              if name == "ioregtrace_accesses_total"]
    assert len(series) == 1000 + 1                  # and one `other`
    assert sum(v for (name, _), v in samples.items()
               if name == "ioregtrace_accesses_total") == 3000


def test_a_scrape_looks_up_only_keys_it_has_not_named(monkeypatch):
    """Issue 16, defect 6: one QEMU's VGA memory is ~20,000 keys, and every
    scrape named each of them again (0.4-3 s a scrape).  The names of a key
    stay while the memory map it was made in does: a scrape looks up only
    keys it has not seen, and a change of the map starts over."""
    from ioregtrace.qemu.layout import LayoutHistory
    from ioregtrace.qemu.mtree import FlatLayout
    from ioregtrace.recording import VmFacts
    lookups = []
    region = FlatLayout.region
    monkeypatch.setattr(FlatLayout, "region",
                        lambda self, *a: lookups.append(a) or region(self, *a))
    history = LayoutHistory()
    history.add_section(1, Space.MMIO, 0xA, 0xA0000, 0x20000, "vga-lowmem", 0, 0x100)
    s = FakeSession()
    s.vms = {1: VmInfo(7, 1, True, "qemu")}
    s.accesses = {(1, AccessKey(7, Space.MMIO, 0xA0000 + i, 1, Op.WRITE, Path.COALESCED, 1)): 2
                  for i in range(20000)}
    facts = {1: VmFacts(1, history=history)}
    recording = s.recording
    s.recording = lambda live=False: Recording(recording().snapshot, 1.0, vms=facts)
    exp = exporter.Exporter(s, by="address", max_series=100)
    first = scrape(exp)
    assert len(lookups) == 20000
    s.accesses[(1, AccessKey(7, Space.MMIO, 0xC0000, 1, Op.WRITE, Path.COALESCED, 1))] = 1
    again = scrape(exp)
    assert len(lookups) == 20001                  # the new key alone
    total = lambda samples: sum(v for (name, _), v in samples.items()  # noqa: E731
                                if name == "ioregtrace_accesses_total")
    assert total(first) == 40000 and total(again) == 40001
    history.add_section(2, Space.MMIO, 0xB, 0xA0000, 0x20000, "vga-lowmem", 0, 0x100)
    scrape(exp)
    assert len(lookups) == 40002                  # a new map: every key named again


def test_dashboard_never_merges_two_vms_regions():
    """Issue 16, defect 13: the latency panels summed by region alone, so two
    VMs' regions of one name (two demos' `pio@0x5004`) were one line."""
    import re
    with open(os.path.join(REPO, "dashboards", "ioregtrace.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    groupings = [g for e in exprs for g in re.findall(r"by \(([^)]*)\)", e)]
    by_region = [g for g in groupings if "region" in g]
    assert by_region, exprs
    for g in by_region:
        assert "vm" in [x.strip() for x in g.split(",")], g


def test_exits_by_reason_per_vm_with_their_handling_time():
    """ioregtrace_exits_total{vm,pid,kind,isa,reason} sums the vCPUs of a VM
    (bounded labels); the histogram holds only the timed exits; a restart
    under the same name continues the counter."""
    from ioregtrace import exits
    sess = FakeSession()
    sess.vms = {1: VmInfo(10, 1, True, "vm1")}

    def hw(times, untimed=0):
        slots = [0] * histogram.SLOTS
        for ns in times:
            slots[histogram.slot_of(ns)] += 1
        return exits.ExitStats(len(times) + untimed, untimed, sum(times),
                               min(times), max(times), slots)
    sess.exits = {(1, exits.ExitKey(exits.HW, 2, 0x7B, tid=11)): hw([2000] * 3, untimed=2),
                  (1, exits.ExitKey(exits.HW, 2, 0x7B, tid=12)): hw([5000]),
                  (1, exits.ExitKey(exits.USER, 0, 2, tid=11)): hw([80000] * 2)}
    exp = exporter.Exporter(sess)
    out = scrape(exp)
    labels = (("isa", "svm"), ("kind", "hardware"), ("pid", ""), ("reason", "IOIO"),
              ("vm", "vm1"))
    assert out[("ioregtrace_exits_total", labels)] == 6
    assert out[("ioregtrace_exit_handling_seconds_count", labels)] == 4
    assert out[("ioregtrace_exit_handling_seconds_sum", labels)] == 11000 / 1e9
    bucket = lambda le: ("ioregtrace_exit_handling_seconds_bucket",  # noqa: E731
                         tuple(sorted(labels + (("le", le),))))
    assert out[bucket("1.024e-06")] == 0
    assert out[bucket("2.048e-06")] == 3           # the 2 us ones
    assert out[bucket("4.096e-06")] == 3
    assert out[bucket("8.192e-06")] == 4           # and the 5 us one
    user = (("isa", ""), ("kind", "userspace"), ("pid", ""), ("reason", "IO"), ("vm", "vm1"))
    assert out[("ioregtrace_exits_total", user)] == 2
    # the VM exits and another starts under its name: the series goes on
    import time
    sess.vms = {1: VmInfo(10, 1, True, "vm1", exited_ns=int(time.monotonic() * 1e9)),
                2: VmInfo(20, 2, True, "vm1")}
    sess.exits = dict(sess.exits)
    sess.exits[(2, exits.ExitKey(exits.HW, 2, 0x7B, tid=21))] = hw([1000])
    assert scrape(exp)[("ioregtrace_exits_total", labels)] == 7
    sess.vms = {2: VmInfo(20, 2, True, "vm1")}
    sess.exits = {(2, exits.ExitKey(exits.HW, 2, 0x7B, tid=21)): hw([1000] * 2)}
    assert scrape(exp)[("ioregtrace_exits_total", labels)] == 8
