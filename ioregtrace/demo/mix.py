"""The demo guest's access mix: which device registers it touches, how often,
and which dispatch path each block is built to take.

Every path this kernel offers has a block: ioeventfd with and without
datamatch (MMIO and PIO), coalesced MMIO/PIO, kvm.ko's own LAPIC, IOAPIC,
PIT and PIC, userspace MMIO/PIO handled inline by the vCPU thread, MMIO reads
forwarded to a device thread (the slow path ioregionfd targets), the same
reads sent to a device thread by kvm.ko over ioregionfd (patched kernels),
and string PIO.  The expected path is only the design intent: the truth the demo
reports is what the VMM observed (eventfd counters, ring entries, exits).
"""

from dataclasses import dataclass, replace

from ..keys import Op, Path, Space

# Guest-physical layout of the demo machine.
RAM_SIZE = 1 << 20
CODE_ADDR = 0x1000
OUTS_BUF = 0x8000          # source of rep outs
INS_BUF = 0x9000           # destination of rep ins

INLINE_MMIO = 0x10000000    # userspace MMIO, answered by the vCPU thread
FORWARD_MMIO = 0x10001000   # userspace MMIO reads, answered by a device thread
DOORBELL_MMIO = 0x10002000  # ioeventfd, any value
DOORBELL_DM_MMIO = 0x10002010  # ioeventfd with datamatch
COALESCED_MMIO = 0x10003000  # coalesced MMIO zone (one page)
COALESCED_MMIO_SIZE = 0x1000
# The forwarded device's registers again, served by the same kind of device
# thread, but dispatched by kvm.ko over ioregionfd (kernels with
# KVM_CAP_IOREGIONFD, see kernel/): the two paths side by side.
IOREGION_MMIO = 0x10004000
LAPIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000

PIO_INLINE = 0x5000
PIO_DOORBELL = 0x6010       # ioeventfd with datamatch, like legacy virtio notify
PIO_COALESCED = 0x6020      # coalesced PIO zone, like QEMU's RTC index port
PIO_CONTROL = 0x5FF0        # demo control: sync and done

DOORBELL_DATAMATCH = 7
PIO_DOORBELL_DATAMATCH = 3
CONTROL_SYNC = 1
CONTROL_DONE = 2
CONTROL_CHURN = 3           # deassign/unregister, then run the mix again
CONTROL_PASS = 4            # end of one measured pass (--pass-log)


@dataclass(frozen=True)
class Access:
    """One guest instruction: one access, or `rep` elements of string PIO."""
    space: Space
    address: int
    size: int
    op: Op
    expect: Path
    value: int = 0
    rep: int = 1


@dataclass(frozen=True)
class Block:
    """A loop run `count` times over `body` (usually one access; two for an
    index/data pattern like the RTC's, where an in-kernel write is followed
    by a read that exits)."""
    name: str
    count: int
    body: tuple

    @property
    def accesses(self):
        return self.count * sum(a.rep for a in self.body)


def one(name, space, address, size, op, count, expect, value=0, rep=1):
    return Block(name, count, (Access(space, address, size, op, expect, value, rep),))


DEFAULT_MIX = (
    one("doorbell", Space.MMIO, DOORBELL_MMIO, 4, Op.WRITE, 2000, Path.IOEVENTFD, 1),
    one("doorbell-dm", Space.MMIO, DOORBELL_DM_MMIO, 4, Op.WRITE, 1000,
        Path.IOEVENTFD, DOORBELL_DATAMATCH),
    # Same register, a value the datamatch rejects: KVM sends it to userspace.
    one("doorbell-dm-miss", Space.MMIO, DOORBELL_DM_MMIO, 4, Op.WRITE, 200,
        Path.USERSPACE, DOORBELL_DATAMATCH + 1),
    one("pio-doorbell", Space.PIO, PIO_DOORBELL, 2, Op.WRITE, 1000,
        Path.IOEVENTFD, PIO_DOORBELL_DATAMATCH),
    # More writes than the ring holds: the overflow exits to userspace.
    one("coalesced", Space.MMIO, COALESCED_MMIO, 4, Op.WRITE, 1000, Path.COALESCED, 5),
    one("coalesced-pio", Space.PIO, PIO_COALESCED, 1, Op.WRITE, 100, Path.COALESCED, 9),
    one("lapic-version", Space.MMIO, LAPIC_BASE + 0x30, 4, Op.READ, 500, Path.KERNEL),
    one("lapic-tpr", Space.MMIO, LAPIC_BASE + 0x80, 4, Op.WRITE, 500, Path.KERNEL, 0),
    one("ioapic-select", Space.MMIO, IOAPIC_BASE, 4, Op.WRITE, 500, Path.KERNEL, 1),
    one("ioapic-window", Space.MMIO, IOAPIC_BASE + 0x10, 4, Op.READ, 500, Path.KERNEL),
    one("pit-latch", Space.PIO, 0x43, 1, Op.WRITE, 300, Path.KERNEL, 0),
    one("pit-counter", Space.PIO, 0x40, 1, Op.READ, 300, Path.KERNEL),
    one("pic-imr", Space.PIO, 0x21, 1, Op.READ, 300, Path.KERNEL),
    one("inline-write", Space.MMIO, INLINE_MMIO, 4, Op.WRITE, 1000, Path.USERSPACE, 0x55),
    one("inline-read", Space.MMIO, INLINE_MMIO + 4, 4, Op.READ, 1000, Path.USERSPACE),
    one("inline-write8", Space.MMIO, INLINE_MMIO + 8, 1, Op.WRITE, 300, Path.USERSPACE, 0x66),
    one("inline-read16", Space.MMIO, INLINE_MMIO + 12, 2, Op.READ, 300, Path.USERSPACE),
    one("forward-read", Space.MMIO, FORWARD_MMIO, 4, Op.READ, 100, Path.USERSPACE),
    # Skipped (count 0) where the kernel has no ioregionfd.
    one("ioregionfd-read", Space.MMIO, IOREGION_MMIO, 4, Op.READ, 100, Path.IOREGIONFD),
    one("pio-out", Space.PIO, PIO_INLINE, 1, Op.WRITE, 1000, Path.USERSPACE, 0x11),
    one("pio-in", Space.PIO, PIO_INLINE + 2, 2, Op.READ, 1000, Path.USERSPACE),
    one("string-out", Space.PIO, PIO_INLINE + 4, 1, Op.WRITE, 50, Path.USERSPACE, rep=64),
    one("string-in", Space.PIO, PIO_INLINE + 5, 1, Op.READ, 50, Path.USERSPACE, rep=32),
    # An in-kernel write right before a read that exits, with no event in
    # between: the read's exit must not be taken for the write's.
    Block("index-data", 300, (
        Access(Space.PIO, PIO_COALESCED, 1, Op.WRITE, Path.COALESCED, 3),
        Access(Space.PIO, PIO_INLINE + 6, 1, Op.READ, Path.USERSPACE))),
    Block("latch-read", 300, (
        Access(Space.PIO, 0x43, 1, Op.WRITE, Path.KERNEL, 0),
        Access(Space.MMIO, INLINE_MMIO + 16, 4, Op.READ, Path.USERSPACE))),
    Block("ring-then-io", 300, (
        Access(Space.MMIO, COALESCED_MMIO + 8, 4, Op.WRITE, Path.COALESCED, 7),
        Access(Space.PIO, PIO_INLINE + 8, 2, Op.READ, Path.USERSPACE))),
)

BLOCK_NAMES = tuple(b.name for b in DEFAULT_MIX)


def build_mix(scale=1.0, counts=None):
    """The default mix with every count multiplied by `scale`, then the
    per-block overrides in `counts` ({name: count}) applied."""
    counts = dict(counts or {})
    unknown = set(counts) - set(BLOCK_NAMES)
    if unknown:
        raise ValueError(f"unknown demo block {sorted(unknown)[0]!r}; "
                         f"blocks are: {', '.join(BLOCK_NAMES)}")
    mix = []
    for block in DEFAULT_MIX:
        count = counts.get(block.name, int(round(block.count * scale)))
        if count < 0:
            raise ValueError(f"demo block {block.name!r}: count must be >= 0")
        mix.append(replace(block, count=count))
    return tuple(mix)
