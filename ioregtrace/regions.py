"""Fallback region names, used until a VMM tells us its own (QEMU's memory
tree): the ioeventfd or coalesced zone the address belongs to (facts from
the VM's own registrations), then the device x86 places there by convention
(the ones kvm.ko can emulate), else `mmio@0x...` / `pio@0x...`."""

from .keys import Space

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
    space, addr, size), kind "ioeventfd" or "coalesced"."""

    def __init__(self, registrations=()):
        self.doorbells = {(vm, space, addr) for vm, kind, space, addr, _ in registrations
                          if kind == "ioeventfd"}
        self.zones = [(vm, space, addr, size) for vm, kind, space, addr, size in registrations
                      if kind == "coalesced"]

    def name(self, vm, space, addr):
        if (vm, space, addr) in self.doorbells:
            return f"ioeventfd@{addr:#x}"
        for zvm, zspace, base, size in self.zones:
            if zvm == vm and zspace == space and base <= addr < base + size:
                return f"coalesced@{base:#x}"
        for dspace, base, length, name in CONVENTIONAL_DEVICES:
            if dspace == space and base <= addr < base + length:
                return name
        return f"{space}@{addr:#x}"
