"""A minimal 32-bit x86 code generator for the demo guest.

The guest runs in flat 32-bit protected mode with interrupts off, so every
device access it makes is one instruction we emitted.  Each block of the demo
mix becomes a counted loop around one access instruction; EBX is the loop
counter because ECX belongs to the rep-prefixed string instructions.
"""

import struct


class GuestCode:
    def __init__(self, base):
        self.base = base
        self.buf = bytearray()

    @property
    def here(self):
        return self.base + len(self.buf)

    def _emit(self, *parts):
        for part in parts:
            self.buf += part if isinstance(part, (bytes, bytearray)) else bytes([part])

    def mov_imm(self, reg, value):
        """mov r32, imm32 (reg: 0=eax 1=ecx 2=edx 3=ebx 6=esi 7=edi)."""
        self._emit(0xB8 + reg, struct.pack("<I", value & 0xFFFFFFFF))

    def store(self, addr, size):
        """mov [addr], al/ax/eax: one guest write of `size` bytes."""
        if size == 1:
            self._emit(0xA2, struct.pack("<I", addr))
        elif size == 2:
            self._emit(0x66, 0xA3, struct.pack("<I", addr))
        elif size == 4:
            self._emit(0xA3, struct.pack("<I", addr))
        else:
            raise ValueError(f"32-bit guest cannot make a {size}-byte access")

    def load(self, addr, size):
        """mov al/ax/eax, [addr]: one guest read of `size` bytes."""
        if size == 1:
            self._emit(0xA0, struct.pack("<I", addr))
        elif size == 2:
            self._emit(0x66, 0xA1, struct.pack("<I", addr))
        elif size == 4:
            self._emit(0xA1, struct.pack("<I", addr))
        else:
            raise ValueError(f"32-bit guest cannot make a {size}-byte access")

    def out(self, size):
        """out dx, al/ax/eax."""
        self._emit({1: b"\xEE", 2: b"\x66\xEF", 4: b"\xEF"}[size])

    def in_(self, size):
        """in al/ax/eax, dx."""
        self._emit({1: b"\xEC", 2: b"\x66\xED", 4: b"\xED"}[size])

    def rep_outs(self, size):
        """rep outsb/outsw/outsd: ECX elements from [ESI] to port DX."""
        self._emit({1: b"\xF3\x6E", 2: b"\x66\xF3\x6F", 4: b"\xF3\x6F"}[size])

    def rep_ins(self, size):
        """rep insb/insw/insd: ECX elements from port DX to [EDI]."""
        self._emit({1: b"\xF3\x6C", 2: b"\x66\xF3\x6D", 4: b"\xF3\x6D"}[size])

    def loop(self, count, body, reg=3):
        """Run body() `count` times, counting down in EBX (or `reg`: EBP=5
        for an outer loop around loops)."""
        if count <= 0:
            return
        self.mov_imm(reg, count)
        top = self.here
        body()
        self._emit(0x48 + reg)                # dec r32
        rel = top - (self.here + 6)
        self._emit(0x0F, 0x85, struct.pack("<i", rel))   # jnz top

    def cpuid(self, leaf=0):
        """cpuid with EAX = leaf (clobbers EAX, EBX, ECX, EDX: the loop
        around it must count in another register)."""
        self.mov_imm(0, leaf)
        self._emit(0x0F, 0xA2)

    def hlt_forever(self):
        top = self.here
        self._emit(0xF4)                      # hlt
        self._emit(0xEB, (top - (self.here + 2)) & 0xFF)  # jmp top

    def bytes(self):
        return bytes(self.buf)
