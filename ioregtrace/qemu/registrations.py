"""What a running QEMU has registered with KVM, read from QEMU's memory, for
a VM created before ioregtrace attached (its ioctls were never seen).

QEMU keeps it all (softmmu/memory.c, accel/kvm/kvm-all.c, 7.2):
- ioeventfds: each of the two address spaces KVM listens to,
  `address_space_memory` and `address_space_io` (exported symbols), holds
  the sorted array of ioeventfds it has passed to KVM's eventfd_add
  listener (as->ioeventfds, as->ioeventfd_nb); QEMU aborts if KVM refuses
  one.  kvm_set_ioeventfd_mmio/_pio truncate the datamatch value to 32 and
  16 bits, and a PIO address to 16.  Without `kvm_eventfds_allowed` there
  is no such listener and nothing is registered.
- coalesced zones: never kept as such.  QEMU registers, for each range of
  an address space's current flat view, the part of each coalesced range
  of the range's MemoryRegion (mr->coalesced) that falls inside it, and
  unregisters exactly that when either changes; so the zones KVM holds are
  those of the current flat views: MMIO ones from `memory`, PIO ones from
  `I/O` when KVM has KVM_CAP_COALESCED_PIO.
- region names: the same flat views give the memory map at attach, with
  QEMU's names, as the mirror would have (no QMP needed).

No debug information is needed: the layouts below are those of QEMU's
headers, and each is checked against invariants QEMU itself maintains
before it is trusted (see read_state); a mismatch is an error that says
which, never a guess.

  AddressSpace   rcu_head (2 pointers), name, root, current_map,
                 int ioeventfd_nb, ioeventfds, ...
                 `name` is found, not assumed: the word that points to
                 "memory" (and, at the same offset, "I/O").
  FlatView       rcu_head, unsigned ref, ranges @24, unsigned nr @32,
                 nr_allocated @36, dispatch @40, root @48
  FlatRange      mr @0, offset_in_region @8, AddrRange addr @16 (two
                 16-byte Int128s: start, size), flags @48; 64 bytes
  MemoryRegionIoeventfd   AddrRange addr @0, bool match_data @32,
                 u64 data @40, EventNotifier *e @48; 64 bytes
  EventNotifier  int rfd @0 (the fd KVM was given)
  MemoryRegion   ... coalesced (QTAILQ_HEAD: first, last-link) right
                 before name (whose offset the binary's code gives)
  CoalescedMemoryRange    AddrRange addr @0, QTAILQ_ENTRY link @32
"""

import struct
from dataclasses import dataclass, field

from ..keys import Space
from .mtree import FlatLayout, FlatRange

SYMBOLS = ("address_space_memory", "address_space_io", "kvm_eventfds_allowed")

AS_SCAN_BYTES = 96            # sizeof(AddressSpace) is 88 in 7.2
AS_NAMES = {Space.MMIO: (b"memory", b"system"), Space.PIO: (b"I/O", b"io")}  # AS, root MR

FV_RANGES, FV_NR, FV_NR_ALLOCATED, FV_ROOT = 24, 32, 36, 48
FR_SIZE, FR_OFFSET_IN_REGION, FR_ADDR = 64, 8, 16
IOEVENTFD_SIZE, IOEVENTFD_MATCH, IOEVENTFD_DATA, IOEVENTFD_E = 64, 32, 40, 48
CMR_LINK = 32
COALESCED_BEFORE_NAME = 16     # QTAILQ_HEAD(, CoalescedMemoryRange) coalesced; then name

# Bounds no sane QEMU reaches; beyond them the memory read is taken as wrong.
MAX_RANGES = 1 << 16
MAX_IOEVENTFDS = 1 << 16
MAX_COALESCED = 1 << 10
NAME_MAX = 256
IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)


class StateError(Exception):
    """QEMU's memory does not hold what this module expects: the seed
    would not be known to be whole."""


@dataclass(frozen=True, order=True)
class Ioeventfd:
    space: Space
    addr: int
    length: int             # 0: any access length
    datamatch: object       # int, or None: any value
    fd: int


@dataclass(frozen=True, order=True)
class Zone:
    space: Space
    addr: int
    size: int


@dataclass
class QemuState:
    ioeventfds: list = field(default_factory=list)
    zones: list = field(default_factory=list)
    layout: FlatLayout = field(default_factory=FlatLayout)


class _Reader:
    """Typed reads of another process's memory (anything with read(addr, n))."""

    def __init__(self, mem):
        self.mem = mem

    def bytes(self, addr, n):
        try:
            return self.mem.read(addr, n)
        except (OSError, ValueError, OverflowError) as e:
            raise StateError(f"cannot read QEMU's memory at {addr:#x}: {e}") from None

    def u64(self, addr):
        return struct.unpack("<Q", self.bytes(addr, 8))[0]

    def u32(self, addr):
        return struct.unpack("<I", self.bytes(addr, 4))[0]

    def i32(self, addr):
        return struct.unpack("<i", self.bytes(addr, 4))[0]

    def int128(self, addr):
        lo, hi = struct.unpack("<QQ", self.bytes(addr, 16))
        return lo | hi << 64

    def cstring(self, addr):
        if not addr:
            return None
        out = b""
        while len(out) < NAME_MAX:
            try:
                chunk = self.mem.read(addr + len(out), 16)
            except (OSError, ValueError, OverflowError):
                chunk = self.bytes(addr + len(out), 1)    # near the end of a mapping
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out += chunk
        raise StateError(f"no string at {addr:#x}")


def _find_name_offset(r, as_addrs):
    """The offset of AddressSpace.name: the word that points to "memory" in
    address_space_memory and to "I/O" in address_space_io."""
    for off in range(0, AS_SCAN_BYTES, 8):
        if all(_string_at(r, r.u64(as_addrs[space] + off)) == AS_NAMES[space][0]
               for space in (Space.MMIO, Space.PIO)):
            return off
    raise StateError('no AddressSpace.name reads "memory" and "I/O"')


def _string_at(r, addr):
    if addr < 0x1000:
        return None
    try:
        return r.cstring(addr)
    except StateError:
        return None


def _region_name(r, mr, name_offset):
    """mr->name; "" until QEMU has made one up for an unnamed region (as the
    mirror reads it)."""
    name = r.cstring(r.u64(mr + name_offset))
    return name.decode(errors="replace") if name is not None else ""


def _flat_view(r, space, fv, root, name_offset):
    """[(FlatRange, mr)] of a FlatView, checked: its root is the address
    space's, and its ranges are sorted, disjoint and within 64 bits."""
    if r.u64(fv + FV_ROOT) != root:
        raise StateError(f"the {space} flat view's root is not its address space's")
    nr, allocated = r.u32(fv + FV_NR), r.u32(fv + FV_NR_ALLOCATED)
    if nr > allocated or nr > MAX_RANGES:
        raise StateError(f"the {space} flat view holds {nr} of {allocated} ranges")
    ranges = r.u64(fv + FV_RANGES)
    out, end = [], 0
    names = {}
    for i in range(nr):
        fr = ranges + i * FR_SIZE
        mr = r.u64(fr)
        offset = r.u64(fr + FR_OFFSET_IN_REGION)
        start, size = r.int128(fr + FR_ADDR), r.int128(fr + FR_ADDR + 16)
        if not mr or not size or start < end or start + size > 1 << 64:
            raise StateError(f"range {i} of the {space} flat view is not a valid range")
        end = start + size
        if mr not in names:
            names[mr] = _region_name(r, mr, name_offset)
        out.append(FlatRange(start, end - 1, names[mr], offset, mr=mr))
    return out


def _coalesced_ranges(r, mr, name_offset):
    """[(offset, size)] of a MemoryRegion's coalesced list, walked and
    checked link by link (a QTAILQ's every prev pointer is known)."""
    head = mr + name_offset - COALESCED_BEFORE_NAME
    first, last_link = r.u64(head), r.u64(head + 8)
    out = []
    prev_link, elem = head, first
    while elem:
        if len(out) >= MAX_COALESCED:
            raise StateError(f"MemoryRegion {mr:#x}: coalesced list does not end")
        link = elem + CMR_LINK
        if r.u64(link + 8) != prev_link:
            raise StateError(f"MemoryRegion {mr:#x}: coalesced list links do not match")
        out.append((r.int128(elem), r.int128(elem + 16)))
        prev_link, elem = link, r.u64(link)
    if last_link != prev_link:
        raise StateError(f"MemoryRegion {mr:#x}: no coalesced list where one was expected")
    return out


def _zones(r, space, ranges, name_offset):
    """The zones QEMU's coalesced_io_add gave KVM for this flat view: each
    coalesced range, moved to where the flat range maps its region, cut to
    the flat range."""
    zones, lists = [], {}
    for fr in ranges:
        if fr.mr not in lists:
            lists[fr.mr] = _coalesced_ranges(r, fr.mr, name_offset)
        for offset, size in lists[fr.mr]:
            start = offset + fr.start - fr.offset
            lo, hi = max(start, fr.start), min(start + size, fr.end + 1)
            if lo < hi:
                zones.append(Zone(space, lo, hi - lo))
    return zones


def _ioeventfds(r, space, as_addr, nb_off, array_off, is_eventfd):
    nb = r.i32(as_addr + nb_off)
    if not 0 <= nb <= MAX_IOEVENTFDS:
        raise StateError(f"the {space} address space claims {nb} ioeventfds")
    array = r.u64(as_addr + array_off) if nb else 0
    out, last = [], None
    for i in range(nb):
        e = array + i * IOEVENTFD_SIZE
        start, length = r.int128(e), r.int128(e + 16)
        match = r.bytes(e + IOEVENTFD_MATCH, 1)[0]
        data = r.u64(e + IOEVENTFD_DATA)
        fd = r.i32(r.u64(e + IOEVENTFD_E))
        if length not in IOEVENTFD_LENGTHS or start >> 64 or match > 1 or not is_eventfd(fd):
            raise StateError(f"ioeventfd {i} of the {space} address space is not valid")
        if last is not None and (start, length) < last:
            raise StateError(f"the {space} address space's ioeventfds are not sorted")
        last = (start, length)
        if space == Space.PIO:
            addr, datamatch = start & 0xFFFF, data & 0xFFFF if match else None
        else:
            addr, datamatch = start, data & 0xFFFFFFFF if match else None
        out.append(Ioeventfd(space, addr, length, datamatch, fd))
    return out


def read_state(mem, symbols, load_base, name_offset, coalesced_pio, is_eventfd):
    """QemuState of a running QEMU: what it registered with KVM, and its
    memory map now.  `symbols`: {name: (vaddr, _)} with SYMBOLS; `load_base`:
    where the binary is mapped; `name_offset`: MemoryRegion.name;
    `coalesced_pio`: KVM has KVM_CAP_COALESCED_PIO; `is_eventfd(fd)`: fd is
    an eventfd of that process.  Raises StateError when anything read does
    not hold together."""
    missing = [s for s in SYMBOLS if s not in symbols]
    if missing:
        raise StateError(f"QEMU does not export {', '.join(missing)}")
    r = _Reader(mem)
    as_addrs = {Space.MMIO: load_base + symbols["address_space_memory"][0],
                Space.PIO: load_base + symbols["address_space_io"][0]}
    name_off = _find_name_offset(r, as_addrs)
    root_off, map_off, nb_off, array_off = name_off + 8, name_off + 16, name_off + 24, \
        name_off + 32
    eventfds = r.bytes(load_base + symbols["kvm_eventfds_allowed"][0], 1)[0]
    state = QemuState()
    for space, as_addr in as_addrs.items():
        root = r.u64(as_addr + root_off)
        if _string_at(r, r.u64(root + name_offset)) != AS_NAMES[space][1]:
            raise StateError(f"the {space} address space's root is not the "
                             f"{AS_NAMES[space][1].decode()!r} region")
        ranges = _flat_view(r, space, r.u64(as_addr + map_off), root, name_offset)
        state.layout.set(space, ranges)
        if space == Space.MMIO or coalesced_pio:
            state.zones += _zones(r, space, ranges, name_offset)
        if eventfds:
            state.ioeventfds += _ioeventfds(r, space, as_addr, nb_off, array_off, is_eventfd)
    return state
