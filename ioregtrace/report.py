"""Aggregation: a RawSnapshot of the maps becomes a Report of labelled rows
(comm, region, latency quantiles) with totals and the diagnostics every view
prints.  The classification itself happened in the kernel; this only names,
groups and sums."""

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from . import histogram
from .keys import AccessKey, Path
from .probes import LatencyStats
from .probes import merge_latency as merge_stats
from .regions import FallbackNamer

BY_ADDRESS = "address"
BY_REGION = "region"

# Which accesses share a row, by grouping: (vm serial, key, region) -> group.
GROUPS = {
    BY_ADDRESS: lambda vm, k, region: (vm, k.pid, k.space, k.address, k.size, k.op, k.path,
                                       region),
    BY_REGION: lambda vm, k, region: (vm, k.pid, k.space, region, k.op, k.path),
    # The live view: one row per VM x region (or address, or nothing) x path.
    "top-region": lambda vm, k, region: (vm, k.pid, region, k.path),
    "top-address": lambda vm, k, region: (vm, k.pid, k.space, k.address, region, k.path),
    "top-path": lambda vm, k, region: (vm, k.pid, k.path),
}

# Paths whose accesses QEMU's device models are called for (so QEMU's own
# memory_region_ops trace sees them): a QEMU with ioregionfd (qemu/patches)
# dispatches each command its device thread receives the same way.
QEMU_DISPATCHED = (Path.USERSPACE, Path.COALESCED, Path.IOREGIONFD)


@dataclass
class Latency:
    count: int
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float


@dataclass
class Row:
    key: AccessKey           # a region row: its lowest address and largest size
    vm: int                  # the VMM process's serial (pid reuse never merges)
    comm: str
    region: Optional[str]
    count: int
    stats: Optional[LatencyStats] = None
    vm_name: Optional[str] = None
    addresses: set = field(default_factory=set)
    sizes: collections.Counter = field(default_factory=collections.Counter)
    qemu_calls: Optional[int] = None
    qemu_rejected: Optional[int] = None
    group: tuple = ()                 # what the row's accesses share
    ops: set = field(default_factory=set)

    @property
    def latency(self):
        return latency_of(self.stats)


@dataclass
class Report:
    duration_s: float
    rows: list
    lost_events: int
    dropped_keys: int
    diagnostics: dict
    notes: list = field(default_factory=list)
    by: str = BY_ADDRESS
    hidden: list = field(default_factory=list)    # rows past --top: still in every total

    @property
    def per_vcpu(self):
        """Rows are per vCPU thread (--per-vcpu)."""
        return any(r.key.tid for r in self.all_rows)

    @property
    def all_rows(self):
        return self.rows + self.hidden

    @property
    def total(self):
        return sum(r.count for r in self.all_rows)

    def totals_by_path(self):
        totals = collections.Counter()
        for r in self.all_rows:
            totals[r.key.path] += r.count
        return totals


def _latency_field(name):
    def key(row):
        lat = row.latency
        value = getattr(lat, name) if lat is not None else None
        return (value is None, -(value or 0), -row.count, row.key)
    return key


# --sort: the order of a table's rows (each breaks ties by count, then key).
SORTS = {
    # AccessKey's own order, field by field: comparing the dataclasses
    # themselves costs ten times as much (tens of thousands of rows).
    "count": lambda r: (-r.count, r.key.pid, r.key.space, r.key.address, r.key.size,
                        r.key.op, r.key.path, r.key.layout, r.key.tid, r.region or ""),
    "p50": _latency_field("p50_us"),
    "p99": _latency_field("p99_us"),
    "max": _latency_field("max_us"),
    "region": lambda r: (r.region is None, r.region or "", r.vm, -r.count, r.key),
    "address": lambda r: (r.vm, r.key.space, r.key.address, r.key.op, r.key.path,
                          r.key.tid),
    "path": lambda r: (r.key.path, -r.count, r.key),
}


def matches_vm(row, name):
    """--vm NAME: QEMU's -name, else the process name, else the pid."""
    return name in (row.vm_name, row.comm, str(row.key.pid))


def shape(report, sort="count", top=None, vm=None):
    """The report as a table shows it: only --vm's rows (its totals are
    that VM's), ordered by --sort, the first --top of them shown and the
    rest kept in `hidden`, so totals and candidates still count them."""
    rows, notes = report.all_rows, report.notes
    if vm is not None:
        rows = [r for r in rows if matches_vm(r, vm)]
        if not rows and report.all_rows:
            seen = sorted({r.vm_name or r.comm for r in report.all_rows})
            notes = notes + [f"--vm {vm}: no access by a VM of that name, process name or "
                             f"pid; seen: {', '.join(seen)}"]
    rows = sorted(rows, key=SORTS[sort])
    cut = len(rows) if top is None else top
    return dataclasses.replace(report, rows=rows[:cut], hidden=rows[cut:], notes=notes)


def latency_of(stats):
    if stats is None or stats.count == 0:
        return None
    us = lambda ns: ns / 1000.0   # noqa: E731
    return Latency(count=stats.count,
                   p50_us=us(histogram.quantile_ns(stats.slots, 0.50, stats.max_ns)),
                   p99_us=us(histogram.quantile_ns(stats.slots, 0.99, stats.max_ns)),
                   max_us=us(stats.max_ns), mean_us=us(stats.sum_ns / stats.count))


def _add(a, b):
    return None if a is None or b is None else a + b


def region_of(vm, key, qemu, fallback):
    """(region name or None, QEMU's FlatRange or None, map_unknown) of one
    access key: QEMU's name (None: unassigned) when `qemu` (its
    regions.QemuRegions) knows the map of the key's space, else the
    fallback name; map_unknown says a QEMU's map was not known."""
    if qemu is not None:
        known, rng = qemu.flat_range(key)
        if known:
            return (rng.name if rng is not None else None), rng, False
    return fallback.name(vm, key.space, key.address), None, qemu is not None


def name_accesses(snapshot, vm_regions):
    """([(vm, key, count, region, (calls, rejected))], {vm: accesses named by
    address because QEMU's map was unknown}): every counted key with the
    name of the region that served it and, for the paths QEMU dispatches,
    how often its handler ran."""
    fallback = FallbackNamer(snapshot.registrations)
    unknown_maps = collections.Counter()
    named = []
    for (vm, key), count in snapshot.accesses.items():
        qemu = vm_regions.get(vm)
        region, rng, map_unknown = region_of(vm, key, qemu, fallback)
        calls = (None, None)
        if map_unknown:
            unknown_maps[vm] += count
        elif key.path in QEMU_DISPATCHED and rng is not None:
            calls = qemu.handler_calls(key, rng, count) or (None, None)
        named.append((vm, key, count, region, calls))
    return named, unknown_maps


def build(snapshot, duration_s, vm_regions=None, vm_names=None, by="auto", notes=()):
    """vm_regions: {vm serial: regions.QemuRegions} for VMs whose QEMU
    memory map is known; vm_names: {vm serial: name}; by: "address",
    "region" or "auto" (region rows when QEMU's names are known)."""
    vm_regions = vm_regions or {}
    vm_names = vm_names or {}
    named, unknown_maps = name_accesses(snapshot, vm_regions)

    mode = by if by != "auto" else (BY_REGION if vm_regions else BY_ADDRESS)
    grouping = GROUPS[mode]
    rows = {}
    for vm, key, count, region, calls in named:
        group = grouping(vm, key, region) + (key.tid,)    # tid: 0 unless --per-vcpu
        stats = snapshot.latencies.get((vm, key))
        row = rows.get(group)
        if row is None:
            info = snapshot.vms.get(vm)
            row = rows[group] = Row(
                key=AccessKey(key.pid, key.space, key.address, key.size, key.op, key.path,
                              tid=key.tid),
                vm=vm, comm=info.comm if info else "?", region=region, count=0,
                vm_name=vm_names.get(vm), qemu_calls=calls[0], qemu_rejected=calls[1],
                group=group)
        else:
            k = row.key
            row.key = AccessKey(k.pid, k.space, min(k.address, key.address),
                                max(k.size, key.size), k.op, k.path, tid=k.tid)
            row.qemu_calls = _add(row.qemu_calls, calls[0])
            row.qemu_rejected = _add(row.qemu_rejected, calls[1])
        row.count += count
        row.stats = merge_stats(row.stats, stats)
        row.addresses.add(key.address)
        row.sizes[key.size] += count
        row.ops.add(key.op)
    rows = sorted(rows.values(), key=SORTS["count"])
    c = snapshot.counters
    all_notes = list(notes) + notes_for(snapshot, rows)
    for vm, n in sorted(unknown_maps.items()):
        info = snapshot.vms.get(vm)
        all_notes.append(f"pid {info.pid if info else '?'}: {n} access(es) made while QEMU's "
                         "memory map was unknown are named by address")
    for qemu in vm_regions.values():
        all_notes.extend(qemu.notes)
        if qemu.assumed:
            all_notes.append("QEMU handler calls for " + ", ".join(sorted(qemu.assumed)) +
                             " assume the region's accepts() callback let each access in")
    all_notes.extend(_handler_notes(named))
    # Raw events lost in event mode are lost events too.
    return Report(duration_s=duration_s, rows=rows,
                  lost_events=c.get("lost_events", 0) + c.get("lost_raw_events", 0),
                  dropped_keys=c.get("dropped_accesses", 0), diagnostics=dict(c),
                  notes=all_notes, by=mode)


def _handler_notes(named):
    """One note per VM, region, op and cause where QEMU's handler calls
    differ from the accesses: the sizes it refused, and the sizes it split
    (only those: a 1-byte access to a 1-byte handler is not split), however
    many addresses or rows (`--by address`) the accesses spread over."""
    seen = {}
    for vm, key, count, region, calls in named:
        if calls[0] is None:
            continue
        n = seen.setdefault((vm, region, key.op), {
            "count": 0, "calls": 0, "rejected": 0,
            "refused": collections.Counter(), "split": collections.Counter()})
        rejected = calls[1] or 0
        n["count"] += count
        n["calls"] += calls[0]
        n["rejected"] += rejected
        if rejected:
            n["refused"][key.size] += count
        if calls[0] > count - rejected:
            n["split"][key.size] += count
    notes = []
    for (_vm, region, op), n in sorted(seen.items(), key=lambda i: (i[0][0], str(i[0][1]),
                                                                 i[0][2])):
        what = f"{n['count']} {op}(s) of {region}"
        if n["refused"]:
            notes.append(f"QEMU refused {n['rejected']} piece(s) of {what} without calling "
                         f"its handler (access sizes {dict(sorted(n['refused'].items()))} "
                         "not accepted)")
        if n["split"]:
            notes.append(f"QEMU split {what} into {n['calls']} calls of its handler (access "
                         f"sizes {dict(sorted(n['split'].items()))} wider than it implements)")
    return notes


# BPF counters that need a sentence when they are not zero.
COUNTER_NOTES = (
    ("attach_ambiguous", "{n} read(s) right after attach may complete exits ioregtrace "
                         "did not see; not counted"),
    ("unmatched_exits", "{n} userspace exit(s) had no traced access before them (an "
                        "access KVM split in two, or begun before attach)"),
    ("in_flight_at_end", "{n} MMIO read(s) had left the guest but not yet reached "
                         "userspace or an ioregion when tracing ended; not counted"),
    ("dropped_latency", "{n} latency sample(s) dropped: latency map full"),
    ("dropped_registrations", "{n} registration(s) did not fit the tracer's tables; "
                              "their accesses may show as kernel"),
    ("dropped_vms", "{n} VM process(es) did not fit the vms map; not traced"),
    ("lost_layout", "{n} QEMU memory-map event(s) lost (ring buffer full); names of "
                    "accesses in those layouts may be wrong"),
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
