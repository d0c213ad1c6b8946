"""How many times QEMU calls a region's handler for one guest access.

QEMU may split an access before its device model sees it, or refuse it
(softmmu/memory.c, physmem.c): flatview_read/write cut it to the region's
`valid` maximum and alignment (memory_access_size); memory_region_access_valid
rejects a piece whose size or alignment the region does not accept (the
handler is never called); access_with_adjusted_size cuts an accepted piece
to the `impl` sizes the handler supports.  A 2-byte write to VGA's 1-byte
lowmem handler is two handler calls, two lines in QEMU's
memory_region_ops_write trace; a 1-byte write to edu's 4/8-byte registers is
none.  ioregtrace reports accesses, handler calls and rejections.

The constraints live in each region's MemoryRegionOps, a public struct
(include/exec/memory.h):
    read, write, read_with_attrs, write_with_attrs   4 pointers      0..31
    enum device_endian endianness                                    32
    struct { unsigned min, max; bool unaligned; accepts* } valid     40..63
    struct { unsigned min, max; bool unaligned; } impl               64..75
MemoryRegion.ops is found by calibration: every region starts with
ops = &unassigned_mem_ops (an exported symbol) and RAM regions keep it.
"""

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class RegionOps:
    valid_min: int
    valid_max: int
    valid_unaligned: bool
    has_accepts: bool       # a valid.accepts() callback: QEMU decides case by case
    impl_min: int
    impl_max: int
    impl_unaligned: bool


def _pow2floor(n):
    return 1 << (n.bit_length() - 1)


def _accepted(size, offset, ops):
    """memory_region_access_valid, without the accepts() callback."""
    if not ops.valid_unaligned and offset & (size - 1):
        return False
    if not ops.valid_max:
        return True
    return ops.valid_min <= size <= ops.valid_max


def handler_calls(size, offset, ops):
    """(handler calls, pieces rejected) QEMU makes for one `size`-byte access
    at `offset` into the region.  A region's valid.accepts() callback, if it
    has one, cannot be run from here: it is taken to accept (callers say so
    in the output, see RegionOps.has_accepts)."""
    calls = rejected = 0
    while size > 0:
        limit = ops.valid_max or 4
        if not ops.impl_unaligned:
            align = offset & -offset
            if align and align < limit:
                limit = align
        piece = _pow2floor(min(size, limit))
        if _accepted(piece, offset, ops):
            access = max(min(piece, ops.impl_max or 4), ops.impl_min or 1)
            calls += -(-piece // access)
        else:
            rejected += 1
        offset += piece
        size -= piece
    return calls, rejected


class ProcessMemory:
    def __init__(self, pid):
        self.f = open(f"/proc/{pid}/mem", "rb", buffering=0)

    def read(self, addr, n):
        self.f.seek(addr)
        data = self.f.read(n)
        if len(data) != n:
            raise OSError("short read")
        return data

    def u64(self, addr):
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def close(self):
        self.f.close()


def load_base(pid, path):
    """Where the binary's first segment is mapped (PIE); 0 if it is not
    position independent."""
    with open(path, "rb") as f:
        header = f.read(18)
    if struct.unpack_from("<H", header, 16)[0] != 3:     # ET_DYN
        return 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and int(parts[2], 16) == 0 and parts[5].strip() in (
                    path, path + " (deleted)"):
                return int(parts[0].split("-")[0], 16)
    raise OSError(f"{path} is not mapped in pid {pid}")


MAX_OPS_OFFSET = 0x200


def ops_offset(mem, mrs, unassigned):
    """The offset in MemoryRegion where `ops` holds &unassigned_mem_ops for
    the most regions (the RAM ones), checked to be unique."""
    votes = {}
    for mr in mrs:
        try:
            words = struct.unpack(f"<{MAX_OPS_OFFSET // 8}Q", mem.read(mr, MAX_OPS_OFFSET))
        except OSError:
            continue
        for i, w in enumerate(words):
            if w == unassigned:
                votes[i * 8] = votes.get(i * 8, 0) + 1
    if not votes:
        return None
    best = max(votes.values())
    winners = [off for off, n in votes.items() if n == best]
    return winners[0] if len(winners) == 1 else None


def read_region_ops(pid, binary, history, problems):
    """{MemoryRegion address: RegionOps} for the regions in the mirrored
    layouts; {} (and a line in `problems`) when QEMU's memory cannot be read."""
    mrs = history.regions()
    if not mrs or "unassigned_mem_ops" not in binary.symbols:
        return {}
    try:
        mem = ProcessMemory(pid)
    except OSError as e:
        problems.append(f"QEMU's access splitting unknown: /proc/{pid}/mem: {e.strerror}")
        return {}
    try:
        unassigned = load_base(pid, binary.path) + binary.symbols["unassigned_mem_ops"][0]
        offset = ops_offset(mem, mrs, unassigned)
        if offset is None:
            problems.append("QEMU's access splitting unknown: MemoryRegion.ops not found")
            return {}
        result = {}
        for mr in mrs:
            try:
                ops_addr = mem.u64(mr + offset)
                raw = mem.read(ops_addr + 40, 40)
            except OSError:
                continue
            valid_min, valid_max, valid_unaligned = struct.unpack_from("<IIB", raw, 0)
            (accepts,) = struct.unpack_from("<Q", raw, 16)
            impl_min, impl_max, impl_unaligned = struct.unpack_from("<IIB", raw, 24)
            result[mr] = RegionOps(valid_min, valid_max, bool(valid_unaligned), bool(accepts),
                                   impl_min, impl_max, bool(impl_unaligned))
        return result
    except OSError as e:
        problems.append(f"QEMU's access splitting unknown: {e}")
        return {}
    finally:
        mem.close()
