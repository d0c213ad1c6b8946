"""Which QEMU region served an access, at the time it was made.

Two sources, per VM:
- the mirror: every flat view QEMU built while traced, in order, each
  starting a generation (the BPF side tags each access with the generation
  current when it was made);
- QMP snapshots of `info mtree -f`: at attach (the layout before any
  mirrored change, generation 0 for a VM already running) and at the end
  (to check the mirror against QEMU's own account).
"""

from dataclasses import dataclass, field

from ..keys import Space
from .mtree import FlatLayout, FlatRange


@dataclass
class View:
    gen: int
    space: Space
    fv: int
    ranges: list = field(default_factory=list)


class LayoutHistory:
    """The memory map of one VM over time."""

    def __init__(self):
        self.views = {Space.MMIO: [], Space.PIO: []}   # by increasing gen
        self.base = None          # FlatLayout at generation 0 (attach snapshot)
        self.final = None         # FlatLayout from QMP at the end
        self._cache = {}
        # What regions.QemuRegions looked up, kept from one refresh of a
        # live view to the next: a guest's VGA memory is tens of thousands
        # of addresses, and a region lookup is the bulk of a refresh.
        self.lookups = {}
        self.lookups_stamp = None

    # -- building ---------------------------------------------------------

    def add_section(self, gen, space, fv, start, size, name, offset, mr):
        self._cache.clear()
        self.lookups.clear()
        views = self.views[space]
        if not views or views[-1].fv != fv or views[-1].gen != gen:
            views.append(View(gen, space, fv))
        end = start + size - 1 if size else (1 << 64) - 1
        views[-1].ranges.append(FlatRange(start, end, name, offset, mr=mr))

    @property
    def mirrored(self):
        return any(self.views.values())

    @property
    def generation(self):
        return max((v[-1].gen for v in self.views.values() if v), default=0)

    # -- lookup -------------------------------------------------------------

    def layout_at(self, gen):
        """The FlatLayout that served accesses tagged `gen`."""
        cached = self._cache.get(gen)
        if cached is not None:
            return cached
        layout = self._cache[gen] = FlatLayout()
        for space, views in self.views.items():
            chosen = None
            for view in views:
                if view.gen <= gen:
                    chosen = view
                else:
                    break
            if chosen is not None:
                layout.set(space, chosen.ranges)
            elif self.base is not None and space in self.base.ranges:
                layout.set(space, self.base.ranges[space])      # as at attach
            elif not views and self.final is not None and space in self.final.ranges:
                layout.set(space, self.final.ranges[space])     # never changed
        return layout

    def region(self, space, addr, gen):
        """The FlatRange that served (space, addr) at generation `gen`."""
        return self.layout_at(gen).region(space, addr)

    def mr_for(self, rng):
        """The MemoryRegion behind a range: its own, or, for a range from a
        QMP snapshot, that of the same range in a mirrored view (else of
        the only region the mirror saw by that name)."""
        if rng.mr:
            return rng.mr
        by_name = set()
        for views in self.views.values():
            for view in views:
                for r in view.ranges:
                    if r.name != rng.name:
                        continue
                    if (r.start, r.end, r.offset) == (rng.start, rng.end, rng.offset):
                        return r.mr
                    by_name.add(r.mr)
        return by_name.pop() if len(by_name) == 1 else 0

    def regions(self):
        """Every MemoryRegion address the mirror saw, and those of a map read
        from QEMU's memory at attach (a QMP map has none)."""
        mrs = {r.mr for views in self.views.values() for v in views for r in v.ranges if r.mr}
        if self.base is not None:
            mrs |= {r.mr for ranges in self.base.ranges.values() for r in ranges if r.mr}
        return mrs

    # -- checking -----------------------------------------------------------

    def verify(self):
        """(ok, why): does the mirror's latest layout equal QEMU's own `info
        mtree -f` taken at the end?"""
        if not self.mirrored:
            return False, "no layout was mirrored"
        if self.final is None:
            return False, "QEMU's final memory map could not be read to check the mirror"
        latest = self.layout_at(self.generation)
        for space in (Space.MMIO, Space.PIO):
            if not latest.same_as(self.final, space):
                return False, (f"the mirrored {space} map differs from QEMU's own "
                               "info mtree -f")
        return True, ""
