"""What ioregtrace needs to know about a QEMU binary, read from its ELF file:
whether it exports the memory-API functions the layout mirror probes, and
where `MemoryRegion.name` sits (read off the code of memory_region_name()).

Debian's QEMU exports its symbols (module support); a QEMU built from
source without modules exports none, but its symbol table names them
(qemu/build.sh's, for issue 18).  A stripped build has neither, and then
the mirror is simply not available (names come from QMP snapshots
alone)."""

import os
import re
import struct
from dataclasses import dataclass

from . import registrations

# The functions the mirror needs, and why.
MIRROR_SYMBOLS = (
    "flatview_add_to_dispatch",   # called once per section of every new flat view
    "memory_region_name",         # its first load gives MemoryRegion.name's offset
)
DATA_SYMBOLS = ("unassigned_mem_ops",     # every MemoryRegion's ops until set
                ) + registrations.SYMBOLS  # what it registered with KVM, at attach

QEMU_NAME = re.compile(r"^qemu-system-[\w.-]+$|^qemu-kvm$")


def looks_like_qemu(path):
    return bool(QEMU_NAME.match(os.path.basename(path)))


class ElfError(Exception):
    pass


def dynamic_symbols(path, wanted):
    """{name: (vaddr, file offset)} for the wanted defined symbols of an
    ELF64 little-endian file: its dynamic ones, else global ones of its
    symbol table (a local symbol's name may be taken twice)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path}: not a 64-bit little-endian ELF file")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        sections.append(sh)   # name, type, flags, addr, offset, size, link, info, align, entsize
    SHT_SYMTAB, SHT_DYNSYM = 2, 11
    STB_LOCAL = 0
    found = {}
    for kind in (SHT_DYNSYM, SHT_SYMTAB):
        for sh in sections:
            if sh[1] != kind:
                continue
            strtab = sections[sh[6]]
            for off in range(sh[4], sh[4] + sh[5], 24):
                st_name, st_info, _, st_shndx, st_value, _ = struct.unpack_from(
                    "<IBBHQQ", data, off)
                if st_shndx == 0 or st_value == 0 or (st_info >> 4) == STB_LOCAL:
                    continue
                start = strtab[4] + st_name
                name = data[start:data.index(b"\0", start)].decode(errors="replace")
                if name in wanted and name not in found:
                    found[name] = (st_value, _vaddr_to_offset(sections, st_value))
    return found, data


def _vaddr_to_offset(sections, vaddr):
    for sh in sections:
        addr, offset, size = sh[3], sh[4], sh[5]
        if sh[1] != 8 and addr and addr <= vaddr < addr + size:   # 8: SHT_NOBITS
            return offset + (vaddr - addr)
    return None


# mov disp(%rdi),%rax: 48 8b 87 disp32, or 48 8b 47 disp8
_LOAD_NAME = (re.compile(rb"\x48\x8b\x87(.{4})", re.S), "<i"), \
             (re.compile(rb"\x48\x8b\x47(.)", re.S), "<b")


def name_offset_from_code(code):
    """MemoryRegion.name's offset: memory_region_name() begins by loading
    mr->name (it is `return mr->name ?: <compute and cache it>`)."""
    for pattern, fmt in _LOAD_NAME:
        m = pattern.match(code)
        if m:
            return struct.unpack(fmt, m.group(1))[0]
    return None


@dataclass
class QemuBinary:
    path: str
    symbols: dict          # name -> (vaddr, file offset)
    name_offset: int       # MemoryRegion.name
    why_not: str = ""      # set when the mirror cannot be used

    @property
    def mirror_ok(self):
        return not self.why_not


def inspect(path):
    """Read what the mirror needs from a QEMU binary; never raises for a
    binary that merely lacks it (why_not says what is missing)."""
    try:
        symbols, data = dynamic_symbols(path, set(MIRROR_SYMBOLS) | set(DATA_SYMBOLS))
    except (OSError, ElfError, struct.error, ValueError) as e:
        return QemuBinary(path, {}, 0, f"cannot read {path}: {e}")
    missing = [s for s in MIRROR_SYMBOLS if s not in symbols]
    if missing:
        return QemuBinary(path, symbols, 0,
                          f"{path} has no symbol {', '.join(missing)} (stripped build?)")
    _, code_off = symbols["memory_region_name"]
    offset = name_offset_from_code(data[code_off:code_off + 16]) if code_off else None
    if offset is None:
        return QemuBinary(path, symbols, 0,
                          "memory_region_name() does not start with the expected load")
    return QemuBinary(path, symbols, offset)
