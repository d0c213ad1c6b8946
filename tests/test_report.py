"""Aggregation and formatting, from hand-made snapshots (no BPF)."""

import json

from ioregtrace import histogram, report
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import LatencyStats, RawSnapshot, VmInfo
from ioregtrace.views import stat as stat_view


def key(addr, op=Op.WRITE, path=Path.USERSPACE, space=Space.MMIO, size=4, pid=42):
    return AccessKey(pid, space, addr, size, op, path)


def latency(samples_ns):
    slots = [0] * histogram.SLOTS
    for ns in samples_ns:
        slots[histogram.slot_of(ns)] += 1
    return LatencyStats(len(samples_ns), sum(samples_ns), max(samples_ns), slots)


def snapshot(**kw):
    snap = RawSnapshot(taken=0.0)
    snap.vms = {1: VmInfo(42, 1, True, "qemu")}
    snap.counters = {"lost_events": 0, "dropped_accesses": 0}
    for name, value in kw.items():
        setattr(snap, name, value)
    return snap


def test_rows_sorted_by_count_with_names_and_latency():
    slow = key(0x1000, Op.READ)
    snap = snapshot(accesses={(1, key(0xFEC00000, path=Path.KERNEL)): 5, (1, slow): 20},
                    latencies={(1, slow): latency([1_000_000] * 19 + [3_000_000])})
    rep = report.build(snap, 2.0)
    assert [r.count for r in rep.rows] == [20, 5]
    assert rep.rows[0].comm == "qemu"
    assert rep.rows[1].region == "ioapic"
    lat = rep.rows[0].latency
    assert lat.count == 20
    assert 1000.0 <= lat.p50_us <= 1125.0
    assert lat.max_us == 3000.0
    assert rep.rows[1].latency is None
    assert rep.total == 25
    assert rep.totals_by_path() == {Path.USERSPACE: 20, Path.KERNEL: 5}


def test_json_has_exactly_the_documented_shape():
    k = key(0x1000, Op.READ)
    snap = snapshot(accesses={(1, k): 3}, latencies={(1, k): latency([5000, 6000, 7000])})
    doc = stat_view.to_json(report.build(snap, 1.5))
    json.dumps(doc)
    assert {"version", "duration_s", "lost_events", "dropped_keys", "rows"} <= set(doc)
    assert doc["version"] == 1 and doc["duration_s"] == 1.5
    (row,) = doc["rows"]
    assert set(row) == {"pid", "comm", "space", "address", "size", "op", "path", "region",
                        "count", "latency_us"}
    assert row == {"pid": 42, "comm": "qemu", "space": "mmio", "address": 0x1000, "size": 4,
                   "op": "read", "path": "userspace", "region": "mmio@0x1000", "count": 3,
                   "latency_us": {"p50": row["latency_us"]["p50"],
                                  "p99": row["latency_us"]["p99"], "max": 7.0}}
    assert set(row["latency_us"]) == {"p50", "p99", "max"}


def test_counters_reach_every_output():
    snap = snapshot(accesses={(1, key(0x10)): 1})
    snap.counters = {"lost_events": 3, "dropped_accesses": 9, "attach_ambiguous": 2,
                     "unmatched_exits": 1}
    rep = report.build(snap, 1.0)
    doc = stat_view.to_json(rep)
    assert doc["lost_events"] == 3 and doc["dropped_keys"] == 9
    text = stat_view.table(rep)
    assert "Lost events: 3, dropped keys: 9" in text
    assert "2 read(s) right after attach" in text
    assert "1 userspace exit(s) had no traced access" in text


def test_vm_created_before_attach_is_explained():
    snap = snapshot(accesses={(1, key(0x10, path=Path.UNATTRIBUTED)): 4})
    snap.vms = {1: VmInfo(42, 1, False, "qemu")}
    rep = report.build(snap, 1.0)
    assert any("created before ioregtrace attached" in n and "unattributed" in n
               for n in rep.notes)


def test_registrations_name_regions():
    snap = snapshot(accesses={(1, key(0x2000, path=Path.IOEVENTFD)): 1,
                              (1, key(0x3008, path=Path.COALESCED)): 1,
                              (2, key(0x3008, path=Path.COALESCED, pid=43)): 1},
                    registrations=[(1, "ioeventfd", Space.MMIO, 0x2000, 4),
                                   (1, "coalesced", Space.MMIO, 0x3000, 0x100)])
    snap.vms[2] = VmInfo(43, 2, True, "other")
    rows = report.build(snap, 1.0).rows
    names = {(r.key.pid, r.key.address): r.region for r in rows}
    assert names[(42, 0x2000)] == "ioeventfd@0x2000"
    assert names[(42, 0x3008)] == "coalesced@0x3000"
    assert names[(43, 0x3008)] == "mmio@0x3008"       # another VM's zone


def test_table_of_nothing_says_so():
    text = stat_view.table(report.build(snapshot(), 1.0))
    assert "no guest device accesses seen" in text
    assert "Total: 0 accesses" in text


def test_table_rates_and_shares():
    snap = snapshot(accesses={(1, key(0x10)): 30, (1, key(0x20)): 10})
    text = stat_view.table(report.build(snap, 2.0))
    line = next(line for line in text.splitlines() if "0x10 " in line + " ")
    assert "75.0" in line and "15.0" in line


def test_sort_by_p99_puts_rows_without_latency_last():
    fast, slow, kern = key(0x1000, Op.READ), key(0x2000, Op.READ), key(0x3000, path=Path.KERNEL)
    snap = snapshot(accesses={(1, fast): 50, (1, slow): 2, (1, kern): 100},
                    latencies={(1, fast): latency([2000] * 50), (1, slow): latency([90_000] * 2)})
    rep = report.shape(report.build(snap, 1.0, by="address"), sort="p99")
    assert [r.key.address for r in rep.rows] == [0x2000, 0x1000, 0x3000]


def test_top_cuts_rows_but_not_totals_or_candidates():
    slow = key(0x2000, Op.READ)
    snap = snapshot(accesses={(1, key(0x1000 + 8 * i, path=Path.KERNEL)): 100 - i
                              for i in range(10)} | {(1, slow): 3},
                    latencies={(1, slow): latency([50_000] * 3)})
    full = report.build(snap, 1.0, by="address")
    rep = report.shape(full, top=4)
    assert len(rep.rows) == 4 and len(rep.hidden) == 7
    assert rep.total == full.total and rep.totals_by_path() == full.totals_by_path()
    text = stat_view.table(rep)
    assert "... 7 more row(s) with " in text
    assert "0x2000" in text            # cut from the rows, still a candidate
    doc = stat_view.to_json(rep)
    assert doc["rows_omitted"] == 7 and doc["total"] == full.total


def test_interval_max_is_the_new_max_or_a_bound_of_the_interval():
    from ioregtrace import interval
    k = key(0x1000, Op.READ)
    before = snapshot(accesses={(1, k): 2}, latencies={(1, k): latency([1000, 900_000])})
    after = snapshot(accesses={(1, k): 4},
                     latencies={(1, k): latency([1000, 900_000, 1000, 1100])})
    d = interval.since(before, after)
    assert d.accesses == {(1, k): 2}
    stats = d.latencies[(1, k)]
    assert stats.count == 2 and stats.sum_ns == 2100
    # The overall max (900 us) was before; this interval's is at most its
    # highest slot's bound, within 12.5 % of 1.1 us.
    assert 1100 <= stats.max_ns <= 1100 * 1.125
    newer = snapshot(accesses={(1, k): 5},
                     latencies={(1, k): latency([1000, 900_000, 1000, 1100, 2_000_000])})
    assert interval.since(after, newer).latencies[(1, k)].max_ns == 2_000_000
    assert interval.since(newer, newer).accesses == {}
