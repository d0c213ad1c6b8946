"""Fallback region names, used until a VMM tells us its own (QEMU's memory
tree): the ioeventfd, coalesced zone or ioregion the address belongs to
(facts from the VM's own registrations), then the device x86 places there
by convention (the ones kvm.ko can emulate), else `mmio@0x...` / `pio@0x...`."""

from .keys import Space
from .qemu.ops import handler_calls

# (space, base, length, name): x86 conventional addresses of the devices
# kvm.ko emulates (arch/x86/kvm: lapic.c, ioapic.h, i8254.c, i8259.c).
CONVENTIONAL_DEVICES = (
    (Space.MMIO, 0xFEE00000, 0x1000, "lapic"),
    (Space.MMIO, 0xFEC00000, 0x100, "ioapic"),
    (Space.PIO, 0x20, 2, "pic-master"),
    (Space.PIO, 0xA0, 2, "pic-slave"),
    (Space.PIO, 0x4D0, 2, "elcr"),
    (Space.PIO, 0x40, 4, "pit"),
    (Space.PIO, 0x61, 1, "pit-speaker"),
)


class FallbackNamer:
    """Names from the registrations a snapshot holds: (vm serial, kind,
    space, addr, size), kind "ioeventfd", "coalesced" or "ioregion"."""

    def __init__(self, registrations=()):
        self.doorbells = {(vm, space, addr) for vm, kind, space, addr, _ in registrations
                          if kind == "ioeventfd"}
        self.zones = [(vm, space, addr, size) for vm, kind, space, addr, size in registrations
                      if kind == "coalesced"]
        self.ioregions = [(vm, space, addr, size) for vm, kind, space, addr, size
                          in registrations if kind == "ioregion"]

    def name(self, vm, space, addr):
        if (vm, space, addr) in self.doorbells:
            return f"ioeventfd@{addr:#x}"
        for zvm, zspace, base, size in self.zones:
            if zvm == vm and zspace == space and base <= addr < base + size:
                return f"coalesced@{base:#x}"
        for rvm, rspace, base, size in self.ioregions:
            if rvm == vm and rspace == space and base <= addr < base + max(size, 1):
                return f"ioregionfd@{base:#x}"
        for dspace, base, length, name in CONVENTIONAL_DEVICES:
            if dspace == space and base <= addr < base + length:
                return name
        return f"{space}@{addr:#x}"


class QemuRegions:
    """QEMU's own region names for one VM, at the time of each access: the
    mirrored layout of the access's generation, checked against QEMU's final
    `info mtree -f`; if the check fails, QEMU's final map for everything."""

    def __init__(self, history, region_ops=None):
        self.history = history
        self.region_ops = region_ops if region_ops is not None else {}
        self.mirror_ok, self.why = history.verify()
        self._mirrored = history.mirrored
        # The history's lookups stay valid while what they were made from
        # does: its sections (add_section clears them), the QMP maps, the
        # check's verdict and the region ops.
        stamp = (id(history.base), id(history.final), self.mirror_ok, id(self.region_ops),
                 len(self.region_ops))
        if history.lookups_stamp != stamp:
            history.lookups.clear()
            history.lookups_stamp = stamp
        self._lookups = history.lookups
        self.notes = []
        self.assumed = set()      # regions whose accepts() callback was taken to accept
        if history.mirrored and not self.mirror_ok:
            if history.final is not None:
                self.notes.append(f"{self.why}: names come from QEMU's final memory map")
            else:
                self.notes.append(f"region names unchecked: {self.why}")

    def layout(self, gen):
        """The FlatLayout that served generation `gen`, or None."""
        h = self.history
        if self._mirrored and (self.mirror_ok or h.final is None):
            return h.layout_at(gen)
        return h.final or h.base

    def flat_range(self, key):
        """(known, FlatRange or None): whether the map of the access's space
        is known, and the range serving it (None: unassigned)."""
        where = (key.space, key.layout, key.address)
        found = self._lookups.get(where)
        if found is None:
            layout = self.layout(key.layout)
            if layout is None or not layout.ranges.get(key.space):
                found = False, None
            else:
                found = True, layout.region(key.space, key.address)
            self._lookups[where] = found
        return found

    def handler_calls(self, key, rng, count):
        """(calls, rejected): how often QEMU called the region's handler for
        `count` such accesses, and how many pieces it refused; None when
        QEMU's access constraints are unknown.  Regions with an accepts()
        callback are collected in `assumed` (it is taken to accept)."""
        if rng is None:
            return None
        where = ("calls", key.space, key.layout, key.address, key.size)
        found = self._lookups.get(where)
        if found is None:
            ops = self.region_ops.get(self.history.mr_for(rng))
            found = (None if ops is None else
                     (ops.has_accepts,
                      handler_calls(key.size, key.address - rng.start + rng.offset, ops)))
            self._lookups[where] = found or (False, None)
        if not found or found[1] is None:
            return None
        has_accepts, (calls, rejected) = found
        if has_accepts:
            self.assumed.add(rng.name)
        return count * calls, count * rejected
