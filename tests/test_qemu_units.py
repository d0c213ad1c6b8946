"""The QEMU side, piece by piece: mtree parsing, the binary inspection,
QEMU's access splitting, command-line wrapping, the layout history, and
naming in reports."""

import os
import re
import shutil
import stat
import subprocess

import pytest

from ioregtrace import report
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import RawSnapshot, VmInfo
from ioregtrace.qemu import binary, control, mtree, ops
from ioregtrace.qemu.layout import LayoutHistory
from ioregtrace.regions import QemuRegions
from ioregtrace.views import stat as stat_view

MTREE = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000008-0000000000000cf7 (prio 0, i/o): io @0000000000000008
  0000000000000cf8-0000000000000cf8 (prio 0, i/o): pci-conf-idx
  0000000000000cfa-0000000000000cfb (prio 0, i/o): pci-conf-idx @0000000000000002
  0000000000000cfc-0000000000000cff (prio 0, i/o): pci-conf-data

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000febf4400-00000000febf441f (prio 0, i/o): vga ioports remapped
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM

FlatView #2
 AS "e1000", root: bus master container
 Root memory region: (none)
  No rendered FlatView
"""


def test_mtree_parses_names_offsets_and_accelerators():
    layout, unknown = mtree.parse(MTREE)
    assert unknown == []
    io = layout.ranges[Space.PIO]
    assert [r.name for r in io] == ["dma-chan", "io", "pci-conf-idx", "pci-conf-idx",
                                    "pci-conf-data"]
    assert io[3] == mtree.FlatRange(0xCFA, 0xCFB, "pci-conf-idx", 2, "i/o")
    mem = layout.ranges[Space.MMIO]
    assert mem[0].name == "pc.ram" and mem[0].kind == "ram"
    assert mem[2].name == "vga ioports remapped"       # spaces in names
    assert mem[3] == mtree.FlatRange(0xFFFC0000, 0xFFFFFFFF, "pc.bios", 0, "rom")


def test_mtree_lookup_and_holes():
    layout, _ = mtree.parse(MTREE)
    assert layout.region(Space.PIO, 0xCF9) is None              # a hole in the view
    assert layout.region(Space.PIO, 0xCFB).name == "pci-conf-idx"
    assert layout.region(Space.MMIO, 0xBFFFF).name == "vga-lowmem"
    assert layout.region(Space.MMIO, 0xC0000) is None
    assert layout.region(Space.MMIO, 0xFFFFFFFF).name == "pc.bios"


def test_mtree_reports_lines_it_does_not_know():
    text = MTREE.replace("  0000000000000cfc-0000000000000cff (prio 0, i/o): pci-conf-data",
                         "  0000000000000cfc-0000000000000cff [prio 0]: pci-conf-data")
    layout, unknown = mtree.parse(text + "something new\n")
    assert unknown == ["  0000000000000cfc-0000000000000cff [prio 0]: pci-conf-data",
                       "something new"]
    assert layout.region(Space.PIO, 0xCF8).name == "pci-conf-idx"


@pytest.mark.parametrize("code,offset", [
    (bytes.fromhex("488b87e8000000" + "4885c0"), 0xE8),
    (bytes.fromhex("488b4770c3"), 0x70),
    (bytes.fromhex("488b47f8c3"), -8),
    (bytes.fromhex("554889e5"), None),
])
def test_name_offset_from_code(code, offset):
    assert binary.name_offset_from_code(code) == offset


def test_qemu_names():
    assert binary.looks_like_qemu("/usr/bin/qemu-system-x86_64")
    assert binary.looks_like_qemu("qemu-system-aarch64")
    assert binary.looks_like_qemu("/usr/libexec/qemu-kvm")
    assert not binary.looks_like_qemu("/usr/bin/qemu-img")
    assert not binary.looks_like_qemu("crosvm")


def test_a_binary_without_the_symbols_says_why(tmp_path):
    why = binary.inspect("/bin/true").why_not
    assert "has no symbol flatview_add_to_dispatch, memory_region_name" in why
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf")
    assert "not a 64-bit little-endian ELF" in binary.inspect(str(junk)).why_not
    assert "cannot read" in binary.inspect(str(tmp_path / "missing")).why_not


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("objdump") is None,
                    reason="needs qemu-system-x86 and binutils (make setup)")
def test_installed_qemu_matches_objdump():
    """The offset read off memory_region_name() agrees with objdump's view
    of the same instruction."""
    path = os.path.realpath(shutil.which("qemu-system-x86_64"))
    info = binary.inspect(path)
    assert info.mirror_ok, info.why_not
    vaddr = info.symbols["memory_region_name"][0]
    out = subprocess.run(["objdump", "-d", f"--start-address={vaddr:#x}",
                          f"--stop-address={vaddr + 8:#x}", path],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"mov\s+(0x[0-9a-f]+)\(%rdi\),%rax", out)
    assert m and int(m.group(1), 16) == info.name_offset


def test_dynamic_symbols_of_a_shared_object(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (make setup installs it)")
    src = tmp_path / "lib.c"
    src.write_text("long the_answer(void) { return 42; }\nint some_data = 7;\n")
    lib = tmp_path / "lib.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True)
    found, data = binary.dynamic_symbols(str(lib), {"the_answer", "some_data", "absent"})
    assert set(found) == {"the_answer", "some_data"}
    vaddr, offset = found["the_answer"]
    nm = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    assert f"{vaddr:016x} T the_answer" in nm
    assert data[offset:offset + 1] != b""


def O(valid=(0, 0), valid_unaligned=False, impl=(0, 0), impl_unaligned=False, accepts=False):
    return ops.RegionOps(valid[0], valid[1], valid_unaligned, accepts, impl[0], impl[1],
                         impl_unaligned)


@pytest.mark.parametrize("size,offset,region,expected", [
    (2, 0, O(impl=(1, 1)), (2, 0)),            # vga-lowmem: a 1-byte handler
    (2, 1, O(impl=(1, 1)), (2, 0)),            # unaligned: split by alignment first
    (4, 0, O(), (1, 0)),                       # no constraints: one call
    (8, 0, O(), (2, 0)),                       # default max 4 bytes per dispatch
    (8, 0, O(valid=(4, 8), impl=(4, 8)), (1, 0)),
    (1, 0, O(valid=(4, 8), impl=(4, 8)), (0, 1)),   # edu: refused, handler not called
    (4, 2, O(valid=(1, 4)), (2, 0)),           # misaligned 4 bytes: two 2-byte pieces
    (4, 2, O(valid=(1, 4), impl_unaligned=True, valid_unaligned=True), (1, 0)),
    (4, 0, O(impl=(1, 2)), (2, 0)),
    (1, 0, O(impl=(2, 4)), (1, 0)),            # widened to the minimum: still one call
])
def test_handler_calls_follow_qemu(size, offset, region, expected):
    assert ops.handler_calls(size, offset, region) == expected


def test_wrap_adds_a_private_monitor_and_keeps_user_arguments():
    user = ["qemu-system-x86_64", "-m", "256", "-qmp", "unix:/run/mine.sock,server=on",
            "-name", "guest=web1,debug-threads=on"]
    cmd, ctl = control.QemuControl.wrap(user)
    try:
        assert cmd[:len(user)] == user
        extra = cmd[len(user):]
        assert extra[0] == "-qmp" and extra[1].startswith(f"unix:{ctl.tmpdir}/")
        assert extra[2:] == ["-no-shutdown"] and ctl.owns_shutdown
        assert stat.S_IMODE(os.stat(ctl.tmpdir).st_mode) == 0o700
        assert ctl.vm_name == "web1"
    finally:
        ctl.close()
    assert not os.path.exists(ctl.tmpdir)


def test_wrap_respects_the_users_no_shutdown_and_ignores_other_commands():
    cmd, ctl = control.QemuControl.wrap(["qemu-system-x86_64", "--no-shutdown"])
    try:
        assert cmd.count("--no-shutdown") == 1 and "-no-shutdown" not in cmd
        assert not ctl.owns_shutdown
    finally:
        ctl.close()
    assert control.QemuControl.wrap(["crosvm", "run"]) == (["crosvm", "run"], None)


@pytest.mark.parametrize("args,name", [
    (["-name", "vm1"], "vm1"),
    (["-name", "guest=vm2,process=q"], "vm2"),
    (["-name", "process=q,guest=vm3"], "vm3"),
    (["-name", "process=q"], None),
    (["-m", "1G"], None),
])
def test_vm_name_from_args(args, name):
    assert control.vm_name_from_args(args) == name


def history_with_move():
    """A pci-testdev BAR at 0x1000 in generation 1, then edu there from 3."""
    h = LayoutHistory()
    h.add_section(1, Space.MMIO, 0xA, 0x1000, 0x1000, "testdev", 0, 0x100)
    h.add_section(2, Space.PIO, 0xB, 0x0, 0x10000, "io", 0, 0x200)
    h.add_section(3, Space.MMIO, 0xC, 0x1000, 0x1000, "edu", 0, 0x300)
    h.add_section(3, Space.MMIO, 0xC, 0x8000, 0x1000, "testdev", 0, 0x100)
    return h


def test_layout_history_names_by_generation():
    h = history_with_move()
    assert h.region(Space.MMIO, 0x1004, 1).name == "testdev"
    assert h.region(Space.MMIO, 0x1004, 2).name == "testdev"
    assert h.region(Space.MMIO, 0x1004, 3).name == "edu"
    assert h.region(Space.MMIO, 0x8000, 2) is None
    assert h.region(Space.PIO, 0x70, 3).name == "io"
    assert h.layout_at(0).ranges == {}                 # nothing known before the first view
    assert h.generation == 3


def test_layout_history_base_and_final():
    h = history_with_move()
    base, _ = mtree.parse(MTREE)
    h.base = base                   # the map at attach: generation 0
    assert h.region(Space.MMIO, 0xA0000, 0).name == "vga-lowmem"
    assert h.region(Space.PIO, 0xCFC, 0).name == "pci-conf-data"
    assert h.region(Space.PIO, 0xCFC, 1).name == "pci-conf-data"   # io not mirrored yet
    assert h.verify() == (False, "QEMU's final memory map could not be read to check "
                                 "the mirror")
    final = mtree.FlatLayout()
    final.set(Space.MMIO, h.layout_at(3).ranges[Space.MMIO])
    final.set(Space.PIO, h.layout_at(3).ranges[Space.PIO])
    h.final = final
    assert h.verify() == (True, "")
    final.set(Space.PIO, [mtree.FlatRange(0, 0xFFFF, "io-renamed")])
    ok, why = h.verify()
    assert not ok and "pio map differs" in why


def test_mr_for_snapshot_ranges():
    h = history_with_move()
    assert h.mr_for(mtree.FlatRange(0x1000, 0x1FFF, "edu")) == 0x300
    assert h.mr_for(mtree.FlatRange(0x5000, 0x5FFF, "testdev")) == 0x100   # only one by name
    assert h.mr_for(mtree.FlatRange(0, 1, "unknown")) == 0


def snapshot_for(accesses):
    snap = RawSnapshot(taken=0.0)
    snap.vms = {1: VmInfo(50, 1, True, "qemu-system-x86")}
    snap.counters = {"lost_events": 0, "dropped_accesses": 0}
    snap.accesses = {(1, k): n for k, n in accesses.items()}
    return snap


def key(addr, gen, op=Op.READ, path=Path.USERSPACE, size=4):
    return AccessKey(50, Space.MMIO, addr, size, op, path, gen)


def test_report_names_each_access_by_its_generation_and_groups_by_region():
    h = history_with_move()
    qemu = QemuRegions(h, {0x100: O(impl=(1, 1)), 0x300: O(valid=(4, 8), impl=(4, 8))})
    snap = snapshot_for({key(0x1004, 1): 10, key(0x1004, 3): 7, key(0x1008, 3): 3,
                         key(0x8004, 3): 2, key(0x1000, 3, Op.WRITE, size=1): 5,
                         key(0x1000, 1, Op.WRITE, Path.IOEVENTFD): 9,
                         key(0x9000, 3): 1})
    rep = report.build(snap, 1.0, vm_regions={1: qemu}, vm_names={1: "web1"})
    assert rep.by == "region"
    rows = {(r.region, r.key.op, r.key.path): r for r in rep.rows}
    assert rows[("testdev", Op.READ, Path.USERSPACE)].count == 12
    assert rows[("testdev", Op.READ, Path.USERSPACE)].qemu_calls == 12 * 4     # 1-byte handler
    assert rows[("edu", Op.READ, Path.USERSPACE)].count == 10
    assert rows[("edu", Op.READ, Path.USERSPACE)].addresses == {0x1004, 0x1008}
    assert rows[("edu", Op.WRITE, Path.USERSPACE)].qemu_rejected == 5
    assert rows[("testdev", Op.WRITE, Path.IOEVENTFD)].qemu_calls is None  # QEMU never sees it
    assert rows[(None, Op.READ, Path.USERSPACE)].count == 1                 # unassigned
    doc = stat_view.to_json(rep)
    assert {r["vm_name"] for r in doc["rows"]} == {"web1"}
    assert any("QEMU split 12 read(s) of testdev into 48 calls" in n for n in rep.notes)
    assert any("QEMU refused 5 piece(s) of 5 write(s) of edu" in n for n in rep.notes)
    text = stat_view.table(rep)
    assert "50/qemu-system-x86 (web1)" in text and "(unassigned)" in text and "CALLS" in text


def test_report_by_address_keeps_one_row_per_address_and_region():
    h = history_with_move()
    snap = snapshot_for({key(0x1004, 1): 10, key(0x1004, 3): 7})
    rep = report.build(snap, 1.0, vm_regions={1: QemuRegions(h)}, by="address")
    assert sorted((r.region, r.count) for r in rep.rows) == [("edu", 7), ("testdev", 10)]
    assert all(r.qemu_calls is None for r in rep.rows)      # ops unknown: not guessed


def test_one_note_per_region_and_cause_with_only_the_sizes_concerned():
    """Issue 16, defect 5: `stat --by address` on SeaBIOS printed a note per
    address (16,617 for vga-lowmem), and named 1-byte accesses to a 1-byte
    handler among those "wider than it implements"."""
    h = history_with_move()
    qemu = QemuRegions(h, {0x100: O(impl=(1, 1)), 0x300: O(valid=(4, 8), impl=(4, 8))})
    accesses = {}
    for i in range(100):            # testdev (1-byte handler): 1- and 2-byte writes
        accesses[key(0x1000 + 2 * i, 1, Op.WRITE, size=1)] = 3
        accesses[key(0x1000 + 2 * i, 1, Op.WRITE, size=2)] = 2
    accesses[key(0x1000, 3, Op.WRITE, size=1)] = 5      # edu refuses 1-byte writes
    accesses[key(0x1001, 3, Op.WRITE, size=1)] = 4
    for by in ("address", "region"):
        rep = report.build(snapshot_for(accesses), 1.0, vm_regions={1: qemu}, by=by)
        split = [n for n in rep.notes if n.startswith("QEMU split")]
        assert split == ["QEMU split 500 write(s) of testdev into 700 calls of its handler "
                         "(access sizes {2: 200} wider than it implements)"], split
        refused = [n for n in rep.notes if n.startswith("QEMU refused")]
        assert refused == ["QEMU refused 9 piece(s) of 9 write(s) of edu without calling its "
                           "handler (access sizes {1: 9} not accepted)"], refused


def test_symbols_of_an_executable_that_exports_none(tmp_path):
    """A QEMU built from source without modules exports nothing
    (qemu/build.sh's): its symbol table still names the functions, and the
    mirror must work on it. Static (local) symbols are not taken: two files
    may each have one of a name."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (make setup installs it)")
    src = tmp_path / "prog.c"
    src.write_text("long __attribute__((noinline)) flatview_add_to_dispatch(long x)"
                   " { return x + 1; }\n"
                   "static long __attribute__((noinline, used)) local_helper(long x)"
                   " { return x * 3; }\n"
                   "int main(int argc, char **argv) { return flatview_add_to_dispatch(argc); }\n")
    prog = tmp_path / "prog"
    subprocess.run(["gcc", "-O2", "-o", str(prog), str(src)], check=True)
    nm = subprocess.run(["nm", "-D", str(prog)], capture_output=True, text=True).stdout
    assert "flatview_add_to_dispatch" not in nm      # not exported
    found, _ = binary.dynamic_symbols(str(prog), {"flatview_add_to_dispatch", "local_helper"})
    assert set(found) == {"flatview_add_to_dispatch"}
    vaddr, _ = found["flatview_add_to_dispatch"]
    nm = subprocess.run(["nm", str(prog)], capture_output=True, text=True).stdout
    assert f"{vaddr:016x} T flatview_add_to_dispatch" in nm
