"""QEMU's flattened memory map (`info mtree -f`) and region lookup.

A flat view is what QEMU dispatches with: sorted, non-overlapping ranges,
each served by one region.  Lines look like
    0000000000000cfa-0000000000000cfb (prio 0, i/o): pci-conf-idx @0000000000000002
    00000000000c0000-000000000fffffff (prio 0, ram): pc.ram @00000000000c0000 KVM
i.e. START-END (inclusive), the region's priority and type, its name (which
may contain spaces), the offset into the region when not 0, and the
accelerators that map it.
"""

import bisect
import re
from dataclasses import dataclass, field

from ..keys import Space

RANGE = re.compile(r"^  ([0-9a-f]{16})-([0-9a-f]{16}) \(prio (-?\d+), ([^)]*)\): "
                   r"(.*?)( @[0-9a-f]{16})?((?: [A-Z][A-Za-z0-9_-]*)*)$")
VIEW = re.compile(r"^FlatView #\d+$")
AS = re.compile(r'^ AS "(.*)", root: (.*)$')
ROOT = re.compile(r"^ Root memory region: (.*)$")
NO_VIEW = re.compile(r"^  No rendered FlatView$")

# The address spaces guest MMIO and PIO go through.
SPACE_OF_AS = {"memory": Space.MMIO, "I/O": Space.PIO}


@dataclass(frozen=True)
class FlatRange:
    start: int
    end: int            # inclusive, as QEMU prints it
    name: str
    offset: int = 0     # into the region
    kind: str = ""      # i/o, ram, rom, romd, ... (from info mtree)
    mr: int = 0         # QEMU's MemoryRegion address (from the mirror)


@dataclass
class FlatLayout:
    """One flat view per space: sorted ranges and region lookup."""
    ranges: dict = field(default_factory=dict)     # Space -> [FlatRange]

    def set(self, space, ranges):
        self.ranges[space] = sorted(ranges, key=lambda r: r.start)

    def region(self, space, addr):
        """The FlatRange serving `addr`, or None (unassigned)."""
        ranges = self.ranges.get(space)
        if not ranges:
            return None
        i = bisect.bisect_right([r.start for r in ranges], addr) - 1
        if i >= 0 and ranges[i].start <= addr <= ranges[i].end:
            return ranges[i]
        return None

    def same_as(self, other, space):
        mine = [(r.start, r.end, r.name, r.offset) for r in self.ranges.get(space, [])]
        theirs = [(r.start, r.end, r.name, r.offset) for r in other.ranges.get(space, [])]
        return mine == theirs


def parse(text):
    """(FlatLayout of the memory and I/O spaces, [lines not understood])."""
    layout = FlatLayout()
    unknown = []
    spaces, ranges = [], []      # the current view's address spaces and ranges

    def flush():
        for space in spaces:
            layout.set(space, ranges)

    for line in text.splitlines():
        if VIEW.match(line):
            flush()
            spaces, ranges = [], []
        elif not line.strip() or ROOT.match(line) or NO_VIEW.match(line):
            pass
        elif AS.match(line):
            space = SPACE_OF_AS.get(AS.match(line).group(1))
            if space is not None:
                spaces.append(space)
        elif RANGE.match(line):
            m = RANGE.match(line)
            offset = int(m.group(6)[2:], 16) if m.group(6) else 0
            ranges.append(FlatRange(int(m.group(1), 16), int(m.group(2), 16), m.group(5),
                                    offset, m.group(4)))
        else:
            unknown.append(line)
    flush()
    return layout, unknown
