"""Reading what a QEMU registered with KVM from its memory
(qemu/registrations.py), on a synthetic image laid out as QEMU 7.2's
structures are: the facts come from the layouts, not from the reader."""

import struct

import pytest

from ioregtrace.keys import Space
from ioregtrace.qemu.registrations import StateError, read_state

NAME_OFFSET = 0x110           # MemoryRegion.name (the binary's code says where)
BASE = 0x5550_0000_0000       # where the binary is loaded
SYMBOLS = {"address_space_memory": (0x1000, None), "address_space_io": (0x1060, None),
           "kvm_eventfds_allowed": (0x10C0, None)}
EVENTFDS = {12, 13}


class Image:
    """A sparse address space: read() of bytes put() there, else OSError."""

    def __init__(self):
        self.chunks = {}
        self.next = 0x7F00_0000_0000

    def put(self, addr, data):
        self.chunks[addr] = bytes(data)
        return addr

    def alloc(self, data):
        addr = self.next
        self.next += (len(data) + 0xFFF) & ~0xFFF
        return self.put(addr, data)

    def read(self, addr, n):
        for start, data in self.chunks.items():
            if start <= addr and addr + n <= start + len(data):
                return data[addr - start:addr - start + n]
        raise OSError("unmapped")

    def patch(self, addr, data):
        for start, chunk in self.chunks.items():
            if start <= addr < start + len(chunk):
                off = addr - start
                self.chunks[start] = chunk[:off] + data + chunk[off + len(data):]
                return
        raise KeyError(addr)


def _int128(v):
    return struct.pack("<QQ", v & (2**64 - 1), v >> 64)


def _region(img, name, coalesced=()):
    """A MemoryRegion with `name` and a coalesced list of (offset, size)."""
    mr = img.alloc(bytes(0x200))
    head = mr + NAME_OFFSET - 16
    img.patch(mr + NAME_OFFSET, struct.pack("<Q", img.alloc(name.encode() + b"\0")))
    elems = [img.alloc(bytes(48)) for _ in coalesced]
    prev_link = head
    for elem, (offset, size) in zip(elems, coalesced, strict=True):
        img.patch(elem, _int128(offset) + _int128(size))
        img.patch(elem + 40, struct.pack("<Q", prev_link))         # link.tql_prev
        img.patch(prev_link, struct.pack("<Q", elem))               # previous next
        prev_link = elem + 32
    img.patch(head, struct.pack("<Q", elems[0] if elems else 0))
    img.patch(head + 8, struct.pack("<Q", prev_link))               # head's last link
    return mr


def _flat_view(img, root, ranges):
    """ranges: (mr, offset_in_region, start, size)."""
    array = img.alloc(b"".join(struct.pack("<QQ", mr, off) + _int128(start) + _int128(size)
                               + bytes(16) for mr, off, start, size in ranges))
    fv = img.alloc(bytes(56))
    img.patch(fv + 24, struct.pack("<QII", array, len(ranges), len(ranges)))
    img.patch(fv + 48, struct.pack("<Q", root))
    return fv


def _ioeventfds(img, entries):
    """entries: (start, size, match, data, fd)."""
    blob = b""
    for start, size, match, data, fd in entries:
        notifier = img.alloc(struct.pack("<ii?", fd, fd, True))
        blob += _int128(start) + _int128(size) + struct.pack("<?7xQQ8x", match, data, notifier)
    return img.alloc(blob) if blob else 0


def qemu_image():
    img = Image()
    img.put(BASE, bytes(0x2000))
    system, io = _region(img, "system"), _region(img, "io")
    vga = _region(img, "vga-lowmem", coalesced=[(0, 0x20000)])
    testdev = _region(img, "pci-testdev-mmio")
    rtc = _region(img, "rtc-index", coalesced=[(0, 1)])
    cut = _region(img, "half", coalesced=[(0x800, 0x1000)])  # only partly mapped
    mem_fv = _flat_view(img, system, [(vga, 0, 0xA0000, 0x20000),
                                      (testdev, 0, 0xE0000000, 0x1000),
                                      (cut, 0x1000, 0xF0000000, 0x1000)])
    io_fv = _flat_view(img, io, [(rtc, 0, 0x70, 1)])
    mem_fds = _ioeventfds(img, [(0xE0000802, 1, True, 0x1_0000_00FA, 12)])
    io_fds = _ioeventfds(img, [(0xC010, 2, True, 0x12345, 13), (0xC020, 0, False, 7, 13)])
    for sym, name, root, fv, nb, fds in (("address_space_memory", b"memory", system, mem_fv, 1,
                                          mem_fds),
                                         ("address_space_io", b"I/O", io, io_fv, 2, io_fds)):
        addr = BASE + SYMBOLS[sym][0]
        img.patch(addr + 16, struct.pack("<QQQi4xQ", img.alloc(name + b"\0"), root, fv, nb, fds))
    img.patch(BASE + SYMBOLS["kvm_eventfds_allowed"][0], b"\1")
    return img


def read(img, coalesced_pio=True):
    return read_state(img, SYMBOLS, BASE, NAME_OFFSET, coalesced_pio, EVENTFDS.__contains__)


def test_registrations_as_qemu_gave_them_to_kvm():
    state = read(qemu_image())
    assert [(e.space, e.addr, e.length, e.datamatch, e.fd) for e in state.ioeventfds] == [
        (Space.MMIO, 0xE0000802, 1, 0xFA, 12),          # data cut to 32 bits
        (Space.PIO, 0xC010, 2, 0x2345, 13),             # data cut to 16 bits
        (Space.PIO, 0xC020, 0, None, 13)]               # no datamatch: any value
    assert [(z.space, z.addr, z.size) for z in state.zones] == [
        (Space.MMIO, 0xA0000, 0x20000),
        (Space.MMIO, 0xF0000000, 0x800),                # the mapped part of 0x800..0x1800
        (Space.PIO, 0x70, 1)]


def test_the_memory_map_at_attach_has_qemu_names():
    layout = read(qemu_image()).layout
    assert layout.region(Space.MMIO, 0xE0000802).name == "pci-testdev-mmio"
    assert layout.region(Space.MMIO, 0xF0000000).offset == 0x1000
    assert layout.region(Space.PIO, 0x70).name == "rtc-index"
    assert layout.region(Space.MMIO, 0xD0000000) is None


def test_no_coalesced_pio_without_the_capability():
    assert all(z.space == Space.MMIO for z in read(qemu_image(), coalesced_pio=False).zones)


def test_no_ioeventfds_when_qemu_passes_none_to_kvm():
    img = qemu_image()
    img.patch(BASE + SYMBOLS["kvm_eventfds_allowed"][0], b"\0")
    assert read(img).ioeventfds == []


@pytest.mark.parametrize("damage, why", [
    (lambda img: img.patch(BASE + 0x1000 + 16, struct.pack("<Q", 0)), "memory"),
    (lambda img: img.patch(BASE + 0x1060 + 40, struct.pack("<i", -1)), "ioeventfds"),
])
def test_what_does_not_hold_together_is_refused(damage, why):
    img = qemu_image()
    damage(img)
    with pytest.raises(StateError, match=why):
        read(img)


def test_an_fd_that_is_no_eventfd_is_refused():
    with pytest.raises(StateError, match="ioeventfd 0"):
        read_state(qemu_image(), SYMBOLS, BASE, NAME_OFFSET, True, lambda fd: fd == 13)


def test_a_wrong_name_offset_is_refused():
    """Another QEMU build, another MemoryRegion: the roots do not read
    "system" and "io", or their coalesced lists do not link up."""
    with pytest.raises(StateError):
        read_state(qemu_image(), SYMBOLS, BASE, NAME_OFFSET + 8, True, EVENTFDS.__contains__)
