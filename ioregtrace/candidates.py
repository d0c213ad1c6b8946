"""Where ioregionfd would save the most.

Every access on the userspace path costs a round trip: KVM_RUN returns, the
VMM handles the exit (often by asking a device thread and waiting), KVM_RUN
is called again.  ioregionfd would send the same access from kvm.ko straight
to the device task.  Regions are ranked by the time their userspace round
trips took (count x mean latency): that is the most ioregionfd could give
back.  Where the same VM already uses ioregionfd for accesses of the same
kind (operation and size), its measured round trip stands next to the
userspace one, and the saving is the difference, measured, not assumed."""

import collections
from dataclasses import dataclass
from typing import Optional

from .keys import Path
from .report import merge_stats


@dataclass
class Candidate:
    vm: int
    pid: int
    comm: str
    region: Optional[str]
    op: str
    size: int                      # the most frequent access size
    count: int
    userspace_mean_us: float
    ioregionfd_mean_us: Optional[float] = None
    ioregionfd_count: int = 0

    @property
    def userspace_ms(self):
        return self.count * self.userspace_mean_us / 1000.0

    @property
    def saving_ms(self):
        """Measured saving, when the VM's ioregionfd round trip is known."""
        if self.ioregionfd_mean_us is None:
            return None
        return self.count * (self.userspace_mean_us - self.ioregionfd_mean_us) / 1000.0

    def as_dict(self):
        return {"pid": self.pid, "comm": self.comm, "region": self.region, "op": self.op,
                "size": self.size, "count": self.count,
                "userspace_mean_us": self.userspace_mean_us,
                "userspace_ms": self.userspace_ms,
                "ioregionfd_mean_us": self.ioregionfd_mean_us,
                "ioregionfd_count": self.ioregionfd_count,
                "saving_ms": self.saving_ms}


def _mean_us(stats):
    return stats.sum_ns / stats.count / 1000.0


def rank(report, limit=10):
    """The report's userspace regions with measured round trips, most
    time first.  A row's accesses take its most frequent size (the one a
    region row is compared by)."""
    userspace = {}        # (vm, region, op) -> [first row, LatencyStats, sizes]
    ioregionfd = {}       # (vm, op, size) -> LatencyStats
    for row in report.all_rows:
        if row.stats is None or row.stats.count == 0:
            continue
        if row.key.path == Path.IOREGIONFD:
            group = (row.vm, row.key.op, row.sizes.most_common(1)[0][0])
            ioregionfd[group] = merge_stats(ioregionfd.get(group), row.stats)
        elif row.key.path == Path.USERSPACE:
            entry = userspace.setdefault((row.vm, row.region, row.key.op),
                                         [row, None, collections.Counter()])
            entry[1] = merge_stats(entry[1], row.stats)
            entry[2].update(row.sizes)
    out = []
    for (vm, region, op), (row, stats, sizes) in userspace.items():
        size = sizes.most_common(1)[0][0]
        c = Candidate(vm=vm, pid=row.key.pid, comm=row.comm, region=region, op=str(op),
                      size=size, count=sum(sizes.values()), userspace_mean_us=_mean_us(stats))
        measured = ioregionfd.get((vm, op, size))
        if measured is not None:
            c.ioregionfd_count = measured.count
            c.ioregionfd_mean_us = _mean_us(measured)
        out.append(c)
    out.sort(key=lambda c: (-c.userspace_ms, c.pid, c.region or ""))
    return out[:limit]
