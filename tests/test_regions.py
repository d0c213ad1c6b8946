from ioregtrace.keys import Space
from ioregtrace.regions import FallbackNamer


def test_conventional_kvm_devices():
    n = FallbackNamer()
    assert n.name(1, Space.MMIO, 0xFEE00030) == "lapic"
    assert n.name(1, Space.MMIO, 0xFEC00010) == "ioapic"
    assert n.name(1, Space.MMIO, 0xFEC00100) == "mmio@0xfec00100"
    assert n.name(1, Space.PIO, 0x43) == "pit"
    assert n.name(1, Space.PIO, 0x44) == "pio@0x44"
    assert n.name(1, Space.PIO, 0x21) == "pic-master"
    assert n.name(1, Space.PIO, 0xA1) == "pic-slave"
    assert n.name(1, Space.PIO, 0x4D1) == "elcr"


def test_space_matters():
    assert FallbackNamer().name(1, Space.MMIO, 0x40) == "mmio@0x40"


def test_registrations_are_per_vm_and_win_over_conventions():
    n = FallbackNamer([(1, "ioeventfd", Space.PIO, 0x40, 1),
                       (2, "coalesced", Space.MMIO, 0x1000, 0x10)])
    assert n.name(1, Space.PIO, 0x40) == "ioeventfd@0x40"
    assert n.name(2, Space.PIO, 0x40) == "pit"
    assert n.name(2, Space.MMIO, 0x100F) == "coalesced@0x1000"
    assert n.name(2, Space.MMIO, 0x1010) == "mmio@0x1010"
    assert n.name(1, Space.MMIO, 0x1000) == "mmio@0x1000"


def test_ioregions_name_their_whole_range():
    n = FallbackNamer([(1, "ioregion", Space.MMIO, 0x10004000, 0x1000),
                       (1, "ioregion", Space.PIO, 0x6000, 0)])     # zero size: one port
    assert n.name(1, Space.MMIO, 0x10004000) == "ioregionfd@0x10004000"
    assert n.name(1, Space.MMIO, 0x10004ffc) == "ioregionfd@0x10004000"
    assert n.name(1, Space.MMIO, 0x10005000) == "mmio@0x10005000"
    assert n.name(1, Space.PIO, 0x6000) == "ioregionfd@0x6000"
    assert n.name(1, Space.PIO, 0x6001) == "pio@0x6001"
    assert n.name(2, Space.MMIO, 0x10004000) == "mmio@0x10004000"   # another VM
