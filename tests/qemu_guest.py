"""Guests and command lines for the QEMU tests.

BAR_MOVE_GUEST is a multiboot image (QEMU's -kernel) that uses one guest
address for two devices in turn: a pci-testdev's MMIO BAR, then, after
moving that BAR away, an edu device's.  It powers off through ACPI, so QEMU
reports SHUTDOWN like a real guest.
"""

import struct

from ioregtrace.demo.guestcode import GuestCode

LOAD = 0x100000
HEADER = 32

TESTDEV_BDF = 4 << 11        # 00:04.0
EDU_BDF = 5 << 11            # 00:05.0
ADDR_X = 0xE0000000          # both devices' BAR0 in turn (edu needs 1 MiB alignment)
ADDR_Y = 0xE0100000          # where the pci-testdev BAR moves
TESTDEV_EVENTFD = 2048 + 2   # pci-testdev: mmio datamatch-eventfd test register
TESTDEV_DATAMATCH = 0xFA

# How many of each the guest does; the tests check these against QEMU.
PHASE1_HEADER_READS = 40     # pci-testdev at X: userspace reads
PHASE1_DOORBELLS = 300       # pci-testdev at X: ioeventfd writes
PHASE2_EDU_READS = 60        # edu at X: userspace reads
PHASE2_EDU_WRITES = 25       # edu at X+TESTDEV_EVENTFD: userspace writes (no eventfd now)
PHASE2_TESTDEV_READS = 15    # pci-testdev at Y

QEMU_MACHINE = ["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64",
                "-display", "none", "-nodefaults", "-no-reboot", "-serial", "none",
                "-monitor", "none"]


def _config_write(code, bdf, reg, value, size=4):
    code.mov_imm(2, 0xCF8)
    code.mov_imm(0, 0x80000000 | bdf | (reg & 0xFC))
    code.out(4)
    code.mov_imm(2, 0xCFC + (reg & 3))
    code.mov_imm(0, value)
    code.out(size)


def _reads(code, addr, size, n):
    code.loop(n, lambda: code.load(addr, size))


def _writes(code, addr, size, value, n):
    code.mov_imm(0, value)
    code.loop(n, lambda: code.store(addr, size))


def bar_move_guest(keep_running=False):
    """keep_running: after both phases, keep reading the pci-testdev (about
    forever) instead of powering off, for tests that attach to a running
    QEMU: a guest that is done before the tracer attaches leaves it
    nothing to count."""
    code = GuestCode(LOAD + HEADER)
    # Phase 1: the pci-testdev's BAR0 at X.
    _config_write(code, TESTDEV_BDF, 0x04, 0)          # decode off while moving
    _config_write(code, EDU_BDF, 0x04, 0)
    _config_write(code, TESTDEV_BDF, 0x10, ADDR_X)
    _config_write(code, TESTDEV_BDF, 0x04, 2)          # memory decode on
    _writes(code, ADDR_X, 1, 2, 1)                     # select test 2: QEMU adds the eventfd
    _reads(code, ADDR_X + 4, 1, PHASE1_HEADER_READS)
    _writes(code, ADDR_X + TESTDEV_EVENTFD, 1, TESTDEV_DATAMATCH, PHASE1_DOORBELLS)
    # Phase 2: the pci-testdev moves to Y, the edu device takes X.
    _config_write(code, TESTDEV_BDF, 0x04, 0)
    _config_write(code, TESTDEV_BDF, 0x10, ADDR_Y)
    _config_write(code, EDU_BDF, 0x10, ADDR_X)
    _config_write(code, TESTDEV_BDF, 0x04, 2)
    _config_write(code, EDU_BDF, 0x04, 2)
    _reads(code, ADDR_X, 4, PHASE2_EDU_READS)
    _writes(code, ADDR_X + TESTDEV_EVENTFD, 1, TESTDEV_DATAMATCH, PHASE2_EDU_WRITES)
    _reads(code, ADDR_Y + 4, 1, PHASE2_TESTDEV_READS)
    if keep_running:
        # Say so on the debug port (running_args: a file), then read on.
        code.mov_imm(2, DEBUGCON_PORT)
        code.mov_imm(0, ord(RUNNING_MARK))
        code.out(1)
        code.loop(0xFFFFFFFF, lambda: _reads(code, ADDR_Y + 4, 1, 1000), reg=5)
    # ACPI power off: SLP_EN in PM1a_CNT (PIIX4 PM at 0x600 after SeaBIOS).
    code.mov_imm(2, 0x604)
    code.mov_imm(0, 0x2000)
    code.out(2)
    code.hlt_forever()
    return _multiboot_image(code)


SWEEP_READS = 4096           # one per byte of the pci-testdev's 4 KiB BAR0


def sweep_guest():
    """Reads every byte of the pci-testdev's BAR0 once: SWEEP_READS distinct
    addresses, each a userspace round trip (twice the latency map's old
    2048 keys), then powers off."""
    code = GuestCode(LOAD + HEADER)
    _config_write(code, TESTDEV_BDF, 0x04, 0)
    _config_write(code, TESTDEV_BDF, 0x10, ADDR_X)
    _config_write(code, TESTDEV_BDF, 0x04, 2)
    for i in range(SWEEP_READS):
        code.load(ADDR_X + i, 1)
    code.mov_imm(2, 0x604)
    code.mov_imm(0, 0x2000)
    code.out(2)
    code.hlt_forever()
    return _multiboot_image(code)


IDLE_READS = 100             # not a multiple of the tracer's batch of 64


def idle_guest():
    """IDLE_READS reads of the pci-testdev (each a userspace exit), then
    halted for good with interrupts off: KVM keeps the halted vCPU in the
    kernel, so its thread never returns from KVM_RUN again."""
    code = GuestCode(LOAD + HEADER)
    _config_write(code, TESTDEV_BDF, 0x04, 0)
    _config_write(code, TESTDEV_BDF, 0x10, ADDR_X)
    _config_write(code, TESTDEV_BDF, 0x04, 2)
    _reads(code, ADDR_X + 4, 1, IDLE_READS)
    code.hlt_forever()
    return _multiboot_image(code)


def _multiboot_image(code):
    magic, flags = 0x1BADB002, 0x00010000          # address fields valid (a.out kludge)
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         LOAD, LOAD, 0, 0, LOAD + HEADER)
    return header + code.bytes()


def bar_move_args(kernel_path):
    return QEMU_MACHINE + ["-device", "pci-testdev,addr=04.0", "-device", "edu,addr=05.0",
                           "-kernel", str(kernel_path)]


DEBUGCON_PORT = 0xE9         # isa-debugcon's default
RUNNING_MARK = "R"


def running_args(kernel_path, marker_path):
    """bar_move_args for bar_move_guest(keep_running=True): the guest
    writes RUNNING_MARK to marker_path when it starts its endless reads."""
    return bar_move_args(kernel_path) + ["-debugcon", f"file:{marker_path}"]


def seabios_args(images_dir):
    """SeaBIOS with NVMe, IDE, VGA, e1000 and virtio-blk, no bootable disk:
    it probes everything, finds nothing to boot and ends (-no-reboot)."""
    disks = {}
    for name in ("nvme", "ide", "vblk"):
        path = images_dir / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(16 << 20)
        disks[name] = path
    return QEMU_MACHINE + [
        "-vga", "std",
        "-drive", f"if=none,id=nv,file={disks['nvme']},format=raw",
        "-device", "nvme,drive=nv,serial=ioregtrace1",
        "-drive", f"if=ide,file={disks['ide']},format=raw",
        "-drive", f"if=none,id=vb,file={disks['vblk']},format=raw",
        "-device", "virtio-blk-pci,drive=vb",
        "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,romfile=",
        "-boot", "reboot-timeout=0",
        "-name", "guest=seabios-test"]


def trace_args(log_path):
    return ["-trace", "memory_region_ops_read", "-trace", "memory_region_ops_write",
            "-D", str(log_path)]


# The devices the attach guest reaches in its endless loop, and the path
# each access takes in kvm.ko (wrapped or attached, they must agree).
VGA_LOWMEM = 0xA0000         # vga-lowmem: a coalesced MMIO range (QEMU's VGA)
RTC_INDEX = 0x70             # rtc-index: a coalesced PIO range (KVM_CAP_COALESCED_PIO)
PIC_MASTER_IMR = 0x21        # kvm-pic: served by kvm.ko
IOAPIC_SELECT = 0xFEC00000   # kvm-ioapic's IOREGSEL: served by kvm.ko


def attach_guest():
    """A guest whose registrations are all made before it says it runs:
    QEMU adds the pci-testdev's datamatch ioeventfd at the test select,
    and the VGA and RTC coalesced ranges at machine creation.  Then,
    forever, one of each in-kernel write (ioeventfd, coalesced MMIO and
    PIO, the PIC and the IOAPIC) and a userspace read, so that a tracer
    attached at any time sees every path.  Interrupts stay masked (the
    PIC's IMR is written all ones)."""
    code = GuestCode(LOAD + HEADER)
    _config_write(code, TESTDEV_BDF, 0x04, 0)
    _config_write(code, TESTDEV_BDF, 0x10, ADDR_X)
    _config_write(code, TESTDEV_BDF, 0x04, 2)
    _writes(code, ADDR_X, 1, 2, 1)                     # test 2: the datamatch ioeventfd
    code.mov_imm(2, DEBUGCON_PORT)
    code.mov_imm(0, ord(RUNNING_MARK))
    code.out(1)

    def round_():
        _writes(code, ADDR_X + TESTDEV_EVENTFD, 1, TESTDEV_DATAMATCH, 10)
        _writes(code, VGA_LOWMEM, 1, 0, 10)
        code.mov_imm(2, RTC_INDEX)
        code.mov_imm(0, 0x0F)
        code.loop(10, lambda: code.out(1))
        code.mov_imm(2, PIC_MASTER_IMR)
        code.mov_imm(0, 0xFF)
        code.loop(10, lambda: code.out(1))
        _writes(code, IOAPIC_SELECT, 4, 0, 10)
        _reads(code, ADDR_X + 4, 1, 1)
    code.loop(0xFFFFFFFF, round_, reg=5)
    code.hlt_forever()
    return _multiboot_image(code)


def attach_args(kernel_path, marker_path):
    """QEMU for attach_guest(): the pci-testdev, VGA (its lowmem window) and
    the PC's RTC, PIC and IOAPIC; RUNNING_MARK goes to marker_path."""
    return QEMU_MACHINE + ["-vga", "std", "-device", "pci-testdev,addr=04.0",
                           "-kernel", str(kernel_path), "-debugcon", f"file:{marker_path}",
                           "-name", "guest=attach-test"]
