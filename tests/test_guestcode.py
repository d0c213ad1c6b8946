"""The demo guest's code generator, checked against GNU as (binutils)."""

import os
import shutil
import subprocess
import tempfile

import pytest

from ioregtrace.demo.guestcode import GuestCode

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                                reason="binutils (as, objcopy) not installed")


def assemble(source):
    """32-bit machine code for `source`, by GNU as."""
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, raw = (os.path.join(tmp, n) for n in ("a.s", "a.o", "a.bin"))
        with open(src, "w") as f:
            f.write(".code32\n.intel_syntax noprefix\n" + source + "\n")
        subprocess.run(["as", "--32", "-o", obj, src], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
        with open(raw, "rb") as f:
            return f.read()


CASES = [
    (lambda c: c.mov_imm(0, 0x12345678), "mov eax, 0x12345678"),
    (lambda c: c.mov_imm(3, 7), "mov ebx, 7"),
    (lambda c: c.mov_imm(6, 0x8000), "mov esi, 0x8000"),
    (lambda c: c.store(0x10002000, 1), "mov byte ptr ds:[0x10002000], al"),
    (lambda c: c.store(0x10002000, 2), "mov word ptr ds:[0x10002000], ax"),
    (lambda c: c.store(0x10002000, 4), "mov dword ptr ds:[0x10002000], eax"),
    (lambda c: c.load(0xfee00030, 1), "mov al, byte ptr ds:[0xfee00030]"),
    (lambda c: c.load(0xfee00030, 2), "mov ax, word ptr ds:[0xfee00030]"),
    (lambda c: c.load(0xfee00030, 4), "mov eax, dword ptr ds:[0xfee00030]"),
    (lambda c: c.out(1), "out dx, al"),
    (lambda c: c.out(2), "out dx, ax"),
    (lambda c: c.out(4), "out dx, eax"),
    (lambda c: c.in_(1), "in al, dx"),
    (lambda c: c.in_(2), "in ax, dx"),
    (lambda c: c.in_(4), "in eax, dx"),
    (lambda c: c.rep_outs(1), "rep outsb"),
    (lambda c: c.rep_outs(2), "rep outsw"),
    (lambda c: c.rep_ins(1), "rep insb"),
    (lambda c: c.rep_ins(2), "rep insw"),
    (lambda c: c.rep_ins(4), "rep insd"),
]


@pytest.mark.parametrize("emit,source", CASES, ids=[s for _, s in CASES])
def test_instruction_matches_gnu_as(emit, source):
    code = GuestCode(0x1000)
    emit(code)
    assert code.bytes() == assemble(source)


def test_loop_matches_gnu_as():
    code = GuestCode(0x1000)
    code.loop(5, lambda: code.out(1))
    expected = assemble("mov ebx, 5\ntop:\nout dx, al\ndec ebx\njnz.d32 top")
    assert code.bytes() == expected


def test_zero_count_loop_emits_nothing():
    code = GuestCode(0x1000)
    code.loop(0, lambda: code.out(1))
    assert code.bytes() == b""


def test_eight_byte_access_is_refused():
    with pytest.raises(ValueError):
        GuestCode(0).store(0x1000, 8)


def test_outer_loop_on_ebp_matches_gnu_as():
    code = GuestCode(0x1000)
    code.loop(3, lambda: code.loop(2, lambda: code.out(1)), reg=5)
    expected = assemble("mov ebp, 3\nouter:\nmov ebx, 2\ninner:\nout dx, al\ndec ebx\n"
                        "jnz.d32 inner\ndec ebp\njnz.d32 outer")
    assert code.bytes() == expected
