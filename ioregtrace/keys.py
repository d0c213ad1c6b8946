"""Typed keys for guest device accesses, shared by the tracer, the demo VMM
and every view.

The numeric values are the ones the BPF program stores in its map keys (they
are passed to the compiler as -D defines), so this file is the one place
where "2 means coalesced" is written down.
"""

import enum
from dataclasses import dataclass


class Space(enum.IntEnum):
    MMIO = 0
    PIO = 1

    def __str__(self):
        return self.name.lower()


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1

    def __str__(self):
        return self.name.lower()


class Path(enum.IntEnum):
    """Which code path served an access.  Exactly one per access."""
    # In kvm.ko, but its handler was registered before ioregtrace attached
    # and could not be read from the VMM (only QEMU's can, see attach.py),
    # so ioeventfd / coalesced / kernel cannot be told apart.
    UNATTRIBUTED = 0
    IOEVENTFD = 1      # signalled an eventfd, no exit to the VMM
    COALESCED = 2      # appended to the coalesced MMIO/PIO ring
    KERNEL = 3         # emulated by a device model inside kvm.ko
    USERSPACE = 4      # KVM_RUN returned KVM_EXIT_MMIO / KVM_EXIT_IO
    IOREGIONFD = 5     # sent to a device task over an ioregionfd

    def __str__(self):
        return self.name.lower()

    @classmethod
    def parse(cls, text):
        return cls[text.upper()]


@dataclass(frozen=True, order=True)
class AccessKey:
    """One row of every view: who accessed what, how, and by which path."""
    pid: int
    space: Space
    address: int
    size: int
    op: Op
    path: Path
    layout: int = 0    # the VMM's memory-map generation when it was made (QEMU)
    tid: int = 0       # the vCPU thread that made it (--per-vcpu), else 0

    def short(self):
        """perf-kvm-stat style label: 0xfebf0000:4:W or 0x60:1:R."""
        return f"{self.address:#x}:{self.size}:{'W' if self.op == Op.WRITE else 'R'}"


def bpf_defines():
    """-D flags that give the BPF program the same numbering as this module."""
    flags = []
    for enum_cls, prefix in ((Space, "SPACE"), (Op, "OP"), (Path, "PATH")):
        for member in enum_cls:
            flags.append(f"-D{prefix}_{member.name}={int(member)}")
    return flags
