"""What happened between two snapshots of the maps: the accesses, latencies
and counters of one interval of a periodic `stat`.

The maps only ever grow (counts, histogram slots, sums), so an interval is
a subtraction, key by key.  The one thing that does not subtract is a
maximum: when the overall maximum did not move during the interval, the
interval's own maximum is only known to lie in the highest histogram slot
it filled, and its upper bound is what is shown (like p50 and p99, "at
most")."""

from . import exits, histogram
from .probes import LatencyStats, RawSnapshot


def latency_since(prev, cur):
    """One key's round trips between two reads (None: no new ones)."""
    if prev is None:
        return cur
    if cur.count <= prev.count:
        return None
    slots = [a - b for a, b in zip(cur.slots, prev.slots, strict=True)]
    if cur.max_ns > prev.max_ns:
        max_ns = cur.max_ns            # the new maximum was set in this interval
    else:
        top = max(i for i, n in enumerate(slots) if n)
        max_ns = min(cur.max_ns, histogram.slot_bounds(top)[1])
    return LatencyStats(cur.count - prev.count, cur.sum_ns - prev.sum_ns, max_ns, slots)


def since(prev, cur):
    """cur - prev as a RawSnapshot (prev None: everything in cur)."""
    if prev is None:
        return cur
    out = RawSnapshot(taken=cur.taken, vms=cur.vms, registrations=cur.registrations)
    for key, n in cur.accesses.items():
        diff = n - prev.accesses.get(key, 0)
        if diff > 0:
            out.accesses[key] = diff
    for key, stats in cur.latencies.items():
        diff = latency_since(prev.latencies.get(key), stats)
        if diff is not None:
            out.latencies[key] = diff
    for key, stats in cur.exits.items():
        diff = exits.since(prev.exits.get(key), stats)
        if diff is not None:
            out.exits[key] = diff
    out.counters = {name: n - prev.counters.get(name, 0) for name, n in cur.counters.items()}
    return out
