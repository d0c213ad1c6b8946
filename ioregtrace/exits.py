"""Exits by reason: the BPF `exits` map's keys and values, and the rows of
`stat --exits` built from them (per VM, or per vCPU thread).

Two kinds of exit (bpf/ioregtrace.bpf.c, "Exits by reason"):
- hardware: every kvm:kvm_exit, by ISA and reason; its time is kvm.ko's
  handling (kvm_exit -> next kvm_entry), for the exits that stayed in the
  kernel; those that went to the VMM are counted (to_user), not timed;
- userspace: every return from KVM_RUN, by kvm_run.exit_reason; its time
  is the VMM's round trip (the return -> its next KVM_RUN).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from . import exitcodes, histogram

HW, USER = 0, 1          # EXIT_HW / EXIT_USER in the BPF source
KIND_NAMES = {HW: "hardware", USER: "userspace"}


@dataclass(frozen=True, order=True)
class ExitKey:
    kind: int
    isa: int          # hardware: exitcodes.ISA_*; userspace: 0
    reason: int
    err: int = 0      # userspace: errno of a failed KVM_RUN
    tid: int = 0      # the vCPU thread (0 once summed per VM)

    @property
    def name(self):
        if self.kind == HW:
            return exitcodes.hw_reason_name(self.isa, self.reason)
        return exitcodes.user_reason_name(self.reason, self.err)


@dataclass
class ExitStats:
    count: int                      # every exit
    to_user: int = 0                # hardware exits that went to the VMM (untimed)
    sum_ns: int = 0                 # of the timed ones
    min_ns: int = 0                 # 0: none timed
    max_ns: int = 0
    slots: list = field(default_factory=lambda: [0] * histogram.SLOTS)

    @property
    def timed(self):
        return sum(self.slots)


def merge(a, b):
    """Two ExitStats as one (either may be None)."""
    if a is None or b is None:
        return a or b
    mins = [m for m in (a.min_ns, b.min_ns) if m]
    return ExitStats(a.count + b.count, a.to_user + b.to_user, a.sum_ns + b.sum_ns,
                     min(mins) if mins else 0, max(a.max_ns, b.max_ns),
                     [x + y for x, y in zip(a.slots, b.slots, strict=True)])


def since(prev, cur):
    """One key's exits between two reads (None: no new ones).  The minimum
    and maximum of the interval are known only when it set a new one;
    otherwise they are the bounds of the lowest and highest slots filled
    (like interval.latency_since's maximum)."""
    if prev is None:
        return cur
    if cur.count <= prev.count:
        return None
    slots = [a - b for a, b in zip(cur.slots, prev.slots, strict=True)]
    filled = [i for i, n in enumerate(slots) if n]
    min_ns = max_ns = 0
    if filled:
        max_ns = cur.max_ns if cur.max_ns > prev.max_ns else \
            min(cur.max_ns, histogram.slot_bounds(filled[-1])[1])
        min_ns = cur.min_ns if cur.min_ns < prev.min_ns or not prev.min_ns else \
            max(cur.min_ns, histogram.slot_bounds(filled[0])[0])
    return ExitStats(cur.count - prev.count, cur.to_user - prev.to_user,
                     cur.sum_ns - prev.sum_ns, min_ns, max_ns, slots)


@dataclass
class ExitRow:
    key: ExitKey
    vm: int
    pid: int
    comm: str
    stats: ExitStats
    vm_name: Optional[str] = None

    @property
    def name(self):
        return self.key.name

    def quantile_us(self, q):
        ns = histogram.quantile_ns(self.stats.slots, q, self.stats.max_ns)
        return None if ns is None else ns / 1000.0

    @property
    def mean_us(self):
        t = self.stats.timed
        return self.stats.sum_ns / t / 1000.0 if t else None


@dataclass
class ExitTable:
    """The exits of one kind (hardware or userspace), as rows."""
    kind: int
    rows: list
    duration_s: float

    @property
    def total(self):
        return sum(r.stats.count for r in self.rows)

    @property
    def total_ns(self):
        return sum(r.stats.sum_ns for r in self.rows)


def rows(snapshot, kind, per_vcpu=False, vm_names=None):
    """ExitRows of one kind: per VM and reason, or per vCPU thread too."""
    vm_names = vm_names or {}
    out = {}
    for (vm, key), stats in snapshot.exits.items():
        if key.kind != kind:
            continue
        k = key if per_vcpu else dataclasses.replace(key, tid=0)
        row = out.get((vm, k))
        if row is None:
            info = snapshot.vms.get(vm)
            out[(vm, k)] = ExitRow(k, vm, info.pid if info else 0,
                                   info.comm if info else "?", stats, vm_names.get(vm))
        else:
            row.stats = merge(row.stats, stats)
    return list(out.values())


# --sort for exit tables: each breaks ties by count, then reason.
def _by(field_fn):
    def key(row):
        value = field_fn(row)
        return (value is None, -(value or 0), -row.stats.count, row.vm, row.key)
    return key


SORTS = {
    "count": lambda r: (-r.stats.count, r.vm, r.key),
    "time": _by(lambda r: r.stats.sum_ns if r.stats.timed else None),
    "p50": _by(lambda r: r.quantile_us(0.50)),
    "p99": _by(lambda r: r.quantile_us(0.99)),
    "max": _by(lambda r: r.stats.max_ns if r.stats.timed else None),
    "reason": lambda r: (r.vm, r.name, r.key.tid),
}


def fired(snapshot):
    """Whether any hardware exit was seen (kvm:kvm_exit fires here)."""
    return any(key.kind == HW for _, key in snapshot.exits)


def tables(snapshot, duration_s, per_vcpu=False, vm_names=None, sort="count", vm=None):
    """(hardware ExitTable or None when kvm_exit did not fire, userspace
    ExitTable, notes)."""
    notes = []
    hw = None
    selected = lambda r: vm is None or vm in (r.vm_name, r.comm, str(r.pid))  # noqa: E731
    order = SORTS.get(sort, SORTS["count"])
    if fired(snapshot):
        hw = ExitTable(HW, sorted(filter(selected, rows(snapshot, HW, per_vcpu, vm_names)),
                                  key=order), duration_s)
    user = ExitTable(USER, sorted(filter(selected, rows(snapshot, USER, per_vcpu, vm_names)),
                                  key=order), duration_s)
    if hw is None and user.rows:
        notes.append("kvm:kvm_exit did not fire on this host (its KVM backend does not "
                     "emit it, e.g. PVM): only the returns to userspace are shown, by "
                     "kvm_run.exit_reason")
    return hw, user, notes
