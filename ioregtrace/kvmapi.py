"""The slice of the KVM userspace ABI (include/uapi/linux/kvm.h, x86) that
ioregtrace uses: ioctl numbers, exit reasons and struct layouts.

The tracer needs the ioctl numbers to recognise registrations in
sys_enter_ioctl; the demo VMM needs all of it to run a guest.  Keeping both in
one module means the BPF program's constants are generated from here.
"""

import contextlib
import ctypes
import os
import struct

KVMIO = 0xAE

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(0, nr, 0)


def _iow(nr, size):
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr, size):
    return _ioc(_IOC_READ, nr, size)


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [(name, KvmSegment) for name in
                ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [("datamatch", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 36)]


class KvmCoalescedMmioZone(ctypes.Structure):
    # The last word is "pad" in old headers and "pio" since KVM_CAP_COALESCED_PIO.
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint32),
                ("pio", ctypes.c_uint32)]


class KvmIoregion(ctypes.Structure):
    """KVM_SET_IOREGION's argument: ioregionfd, from the kernel/ patch
    series (not upstream)."""
    _fields_ = [("guest_paddr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("user_data", ctypes.c_uint64), ("read_fd", ctypes.c_int32),
                ("write_fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 28)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmIoeventfd) == 64
assert ctypes.sizeof(KvmCoalescedMmioZone) == 16
assert ctypes.sizeof(KvmIoregion) == 64

# /dev/kvm ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, ctypes.sizeof(KvmCoalescedMmioZone))
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, ctypes.sizeof(KvmCoalescedMmioZone))
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(KvmPitConfig))
KVM_IOEVENTFD = _iow(0x79, ctypes.sizeof(KvmIoeventfd))
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))

KVM_API_VERSION = 12

KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_IOEVENTFD = 36
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_IOREGIONFD = 239     # kernel/patches: the next free number of Linux 6.12

# ioregionfd (kernel/patches): the vm ioctl, its flags, and the 32-byte
# command KVM writes to the device task and the response it reads back.
KVM_SET_IOREGION = _iow(0xD6, ctypes.sizeof(KvmIoregion))
KVM_IOREGION_PIO = 1 << 0
KVM_IOREGION_POSTED_WRITES = 1 << 1
KVM_IOREGION_DEASSIGN = 1 << 2
IOREGIONFD_CMD_READ, IOREGIONFD_CMD_WRITE = 0, 1
IOREGIONFD_SIZE_MASK = 0xF          # info: log2 of the access size
IOREGIONFD_RESP = 1 << 4            # info: a response is awaited
# {u8 cmd; u8 info; u8 pad[6]; u64 user_data; u64 offset; u64 data}
IOREGIONFD_CMD = struct.Struct("<BB6xQQQ")
# {u64 data; u8 pad[24]}
IOREGIONFD_RESP_FORMAT = struct.Struct("<Q24x")

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_PIT_SPEAKER_DUMMY = 1

# kvm_run.exit_reason values (the ones ioregtrace and the demo care about)
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IOREGIONFD_FAILED = 40   # kernel/patches
EXIT_REASON_NAMES = {
    KVM_EXIT_IO: "IO", KVM_EXIT_HLT: "HLT", KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_IOREGIONFD_FAILED: "IOREGIONFD_FAILED",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.flags (x86): an ioregionfd access is unfinished (kernel/patches)
KVM_RUN_X86_IOREGIONFD_PENDING = 1 << 3

# struct kvm_run: offsets of the fields read by the demo VMM.
RUN_EXIT_REASON = 8
RUN_EXIT_UNION = 32
# .io = {u8 direction; u8 size; u16 port; u32 count; u64 data_offset}
RUN_IO = struct.Struct("<BBHIQ")
# .mmio = {u64 phys_addr; u8 data[8]; u32 len; u8 is_write}
RUN_MMIO = struct.Struct("<Q8sIB")
RUN_MMIO_DATA = RUN_EXIT_UNION + 8

# The coalesced MMIO ring lives in the vCPU mapping at this page offset
# (KVM_COALESCED_MMIO_PAGE_OFFSET on x86); header {u32 first, last} then
# entries {u64 phys_addr; u32 len; u32 pio; u8 data[8]}.
COALESCED_RING_HEADER = struct.Struct("<II")
COALESCED_RING_ENTRY = struct.Struct("<QII8s")


def coalesced_ring_max(page_size):
    """KVM_COALESCED_MMIO_MAX: entries that fit in one page after the header."""
    return (page_size - COALESCED_RING_HEADER.size) // COALESCED_RING_ENTRY.size


@contextlib.contextmanager
def system_fd():
    """/dev/kvm, open for system ioctls (KVM_CHECK_EXTENSION and the like)
    and closed after; OSError if it cannot be opened."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
