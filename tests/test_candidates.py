"""The ioregionfd candidates ranking, from hand-made snapshots (no BPF)."""

import pytest

from ioregtrace import candidates, report
from ioregtrace.keys import Op, Path
from ioregtrace.views import stat as stat_view
from test_report import key, latency, snapshot


def test_ranked_by_time_in_userspace_round_trips():
    busy = key(0x1000, Op.READ)           # many cheap round trips
    slow = key(0x2000, Op.READ)           # few expensive ones: more time in total
    snap = snapshot(accesses={(1, busy): 100, (1, slow): 10,
                              (1, key(0x3000, path=Path.KERNEL)): 999},
                    latencies={(1, busy): latency([2_000] * 100),
                               (1, slow): latency([50_000] * 10)})
    ranked = candidates.rank(report.build(snap, 1.0))
    assert [c.region for c in ranked] == ["mmio@0x2000", "mmio@0x1000"]
    assert ranked[0].userspace_ms == pytest.approx(0.5)
    assert ranked[1].userspace_ms == pytest.approx(0.2)
    assert all(c.ioregionfd_mean_us is None and c.saving_ms is None for c in ranked)


def test_measured_ioregionfd_round_trip_stands_beside_the_same_kind_of_access():
    forwarded = key(0x1000, Op.READ)
    direct = key(0x4000, Op.READ, path=Path.IOREGIONFD)
    write = key(0x1008, Op.WRITE)         # another op: no measurement to compare
    snap = snapshot(accesses={(1, forwarded): 100, (1, direct): 50, (1, write): 10},
                    latencies={(1, forwarded): latency([30_000] * 100),
                               (1, direct): latency([10_000] * 50),
                               (1, write): latency([1_000] * 10)})
    rep = report.build(snap, 1.0)
    by_region = {c.region: c for c in candidates.rank(rep)}
    c = by_region["mmio@0x1000"]
    assert (c.count, c.ioregionfd_count) == (100, 50)
    assert c.userspace_mean_us == pytest.approx(30.0)
    assert c.ioregionfd_mean_us == pytest.approx(10.0)
    assert c.saving_ms == pytest.approx(100 * 20.0 / 1000)
    assert by_region["mmio@0x1008"].ioregionfd_mean_us is None
    # the ioregionfd rows are measurements, not candidates
    assert "mmio@0x4000" not in by_region
    # both views carry it
    assert "IOREGIONFDus" in stat_view.table(rep)
    doc = stat_view.to_json(rep)
    assert {c["region"]: c["saving_ms"] for c in doc["candidates"]}["mmio@0x1000"] == \
        pytest.approx(2.0)


def test_a_region_row_of_several_sizes_is_measured_once():
    """Region rows merge sizes: an ioregionfd row's measurement goes to its
    most frequent size, once, not once per size it holds (which would show
    the same 4 round trips as 4-byte and as 2-byte measurements)."""
    by4, by2 = key(0x1000, Op.READ), key(0x2000, Op.READ, size=2)
    four, two = key(0x4000, Op.READ, path=Path.IOREGIONFD), key(0x4004, Op.READ,
                                                                 path=Path.IOREGIONFD, size=2)
    snap = snapshot(accesses={(1, by4): 10, (1, by2): 10, (1, four): 3, (1, two): 1},
                    latencies={(1, by4): latency([30_000] * 10),
                               (1, by2): latency([30_000] * 10),
                               (1, four): latency([10_000] * 3),
                               (1, two): latency([20_000])},
                    registrations=[(1, "ioregion", four.space, 0x4000, 0x1000)])
    rep = report.build(snap, 1.0, by=report.BY_REGION)
    ranked = {c.region: c for c in candidates.rank(rep)}
    assert ranked["mmio@0x1000"].ioregionfd_count == 4
    assert ranked["mmio@0x1000"].ioregionfd_mean_us == pytest.approx(12.5)
    assert ranked["mmio@0x2000"].ioregionfd_mean_us is None
