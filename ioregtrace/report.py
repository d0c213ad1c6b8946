"""Aggregation: a RawSnapshot of the maps becomes a Report of labelled rows
(comm, region, latency quantiles) with totals and the diagnostics every view
prints.  The classification itself happened in the kernel; this only names
and sums."""

import collections
from dataclasses import dataclass, field
from typing import Optional

from . import histogram
from .keys import AccessKey, Path
from .regions import FallbackNamer


@dataclass
class Latency:
    count: int
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float


@dataclass
class Row:
    key: AccessKey
    vm: int                 # the VMM process's serial (pid reuse never merges)
    comm: str
    region: Optional[str]
    count: int
    latency: Optional[Latency]


@dataclass
class Report:
    duration_s: float
    rows: list
    lost_events: int
    dropped_keys: int
    diagnostics: dict
    notes: list = field(default_factory=list)

    @property
    def total(self):
        return sum(r.count for r in self.rows)

    def totals_by_path(self):
        totals = collections.Counter()
        for r in self.rows:
            totals[r.key.path] += r.count
        return totals


def latency_of(stats):
    if stats is None or stats.count == 0:
        return None
    us = lambda ns: ns / 1000.0   # noqa: E731
    return Latency(count=stats.count,
                   p50_us=us(histogram.quantile_ns(stats.slots, 0.50, stats.max_ns)),
                   p99_us=us(histogram.quantile_ns(stats.slots, 0.99, stats.max_ns)),
                   max_us=us(stats.max_ns), mean_us=us(stats.sum_ns / stats.count))


def build(snapshot, duration_s):
    namer = FallbackNamer(snapshot.registrations)
    rows = []
    for (vm, key), count in snapshot.accesses.items():
        info = snapshot.vms.get(vm)
        rows.append(Row(key=key, vm=vm, comm=info.comm if info else "?",
                        region=namer.name(vm, key.space, key.address), count=count,
                        latency=latency_of(snapshot.latencies.get((vm, key)))))
    rows.sort(key=lambda r: (-r.count, r.key))
    c = snapshot.counters
    return Report(duration_s=duration_s, rows=rows,
                  lost_events=c.get("lost_events", 0),
                  dropped_keys=c.get("dropped_accesses", 0),
                  diagnostics=dict(c), notes=notes_for(snapshot, rows))


# BPF counters that need a sentence when they are not zero.
COUNTER_NOTES = (
    ("attach_ambiguous", "{n} read(s) right after attach may complete exits ioregtrace "
                         "did not see; not counted"),
    ("unmatched_exits", "{n} userspace exit(s) had no traced access before them (an "
                        "access KVM split in two, or begun before attach)"),
    ("dropped_latency", "{n} latency sample(s) dropped: latency map full"),
    ("dropped_registrations", "{n} registration(s) did not fit the tracer's tables; "
                              "their accesses may show as kernel"),
    ("dropped_vms", "{n} VM process(es) did not fit the vms map; not traced"),
)


def notes_for(snapshot, rows):
    """What the numbers cannot say by themselves, in words."""
    notes = []
    seen = {r.vm for r in rows}
    for vm, info in sorted(snapshot.vms.items()):
        if not info.complete and vm in seen:
            notes.append(
                f"pid {info.pid} ({info.comm}): its VM was created before ioregtrace "
                "attached, so in-kernel writes to handlers registered before then "
                "(ioeventfd, coalesced or kvm.ko device) are shown as path "
                f"'{Path.UNATTRIBUTED}'")
    for counter, text in COUNTER_NOTES:
        n = snapshot.counters.get(counter)
        if n:
            notes.append(text.format(n=n))
    return notes
