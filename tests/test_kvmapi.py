"""ioregtrace's copy of the KVM ABI, checked against <linux/kvm.h> as a C
compiler sees it (linux-libc-dev)."""

import ctypes
import os
import shutil
import subprocess
import tempfile

import pytest

from ioregtrace import kvmapi

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not os.path.exists("/usr/include/linux/kvm.h"),
    reason="gcc and linux-libc-dev are needed")

CONSTANTS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
             "KVM_GET_VCPU_MMAP_SIZE", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
             "KVM_CREATE_IRQCHIP", "KVM_REGISTER_COALESCED_MMIO",
             "KVM_UNREGISTER_COALESCED_MMIO", "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_RUN",
             "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
             "KVM_API_VERSION", "KVM_CAP_COALESCED_MMIO", "KVM_CAP_IOEVENTFD",
             "KVM_CAP_COALESCED_PIO", "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO",
             "KVM_IOEVENTFD_FLAG_DEASSIGN", "KVM_PIT_SPEAKER_DUMMY", "KVM_EXIT_IO",
             "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY",
             "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT"]

LAYOUT = {
    "sizeof_sregs": "sizeof(struct kvm_sregs)",
    "sizeof_regs": "sizeof(struct kvm_regs)",
    "sizeof_ioeventfd": "sizeof(struct kvm_ioeventfd)",
    "sizeof_zone": "sizeof(struct kvm_coalesced_mmio_zone)",
    "sizeof_memory_region": "sizeof(struct kvm_userspace_memory_region)",
    "sizeof_pit_config": "sizeof(struct kvm_pit_config)",
    "run_exit_reason": "offsetof(struct kvm_run, exit_reason)",
    "run_io": "offsetof(struct kvm_run, io)",
    "run_mmio": "offsetof(struct kvm_run, mmio)",
    "run_mmio_data": "offsetof(struct kvm_run, mmio.data)",
    "run_mmio_len": "offsetof(struct kvm_run, mmio.len)",
    "run_mmio_is_write": "offsetof(struct kvm_run, mmio.is_write)",
    "run_io_count": "offsetof(struct kvm_run, io.count)",
    "run_io_data_offset": "offsetof(struct kvm_run, io.data_offset)",
    "ring_entry": "sizeof(struct kvm_coalesced_mmio)",
    "ring_header": "offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio)",
    "ring_max_4k": "(4096 - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio)",
    "sregs_efer": "offsetof(struct kvm_sregs, efer)",
    "regs_rip": "offsetof(struct kvm_regs, rip)",
}


def c_values(prelude, exprs):
    """{name: value} of C expressions, as gcc compiles them after `prelude`."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", *prelude, "int main(void) {"]
    lines += [f'  printf("{k} %llu\\n", (unsigned long long)({v}));' for k, v in exprs.items()]
    lines.append("  return 0; }")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "k.c"), os.path.join(tmp, "k")
        with open(src, "w") as f:
            f.write("\n".join(lines))
        subprocess.run(["gcc", "-o", exe, src], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.fixture(scope="module")
def header_values():
    return c_values(["#include <linux/kvm.h>"], {**{n: n for n in CONSTANTS}, **LAYOUT})


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(header_values, name):
    assert getattr(kvmapi, name) == header_values[name]


def test_struct_sizes_match_header(header_values):
    assert ctypes.sizeof(kvmapi.KvmSregs) == header_values["sizeof_sregs"]
    assert ctypes.sizeof(kvmapi.KvmRegs) == header_values["sizeof_regs"]
    assert ctypes.sizeof(kvmapi.KvmIoeventfd) == header_values["sizeof_ioeventfd"]
    assert ctypes.sizeof(kvmapi.KvmCoalescedMmioZone) == header_values["sizeof_zone"]
    assert (ctypes.sizeof(kvmapi.KvmUserspaceMemoryRegion)
            == header_values["sizeof_memory_region"])
    assert ctypes.sizeof(kvmapi.KvmPitConfig) == header_values["sizeof_pit_config"]
    assert kvmapi.KvmSregs.efer.offset == header_values["sregs_efer"]
    assert kvmapi.KvmRegs.rip.offset == header_values["regs_rip"]


def test_kvm_run_layout_matches_header(header_values):
    assert kvmapi.RUN_EXIT_REASON == header_values["run_exit_reason"]
    assert kvmapi.RUN_EXIT_UNION == header_values["run_io"] == header_values["run_mmio"]
    assert kvmapi.RUN_MMIO_DATA == header_values["run_mmio_data"]
    # {u64 phys_addr; u8 data[8]; u32 len; u8 is_write} and
    # {u8 direction; u8 size; u16 port; u32 count; u64 data_offset}
    assert header_values["run_mmio_len"] - header_values["run_mmio"] == 16
    assert header_values["run_mmio_is_write"] - header_values["run_mmio"] == 20
    assert kvmapi.RUN_MMIO.size == 21
    assert header_values["run_io_count"] - header_values["run_io"] == 4
    assert header_values["run_io_data_offset"] - header_values["run_io"] == 8
    assert kvmapi.RUN_IO.size == 16


def test_coalesced_ring_layout_matches_header(header_values):
    assert kvmapi.COALESCED_RING_ENTRY.size == header_values["ring_entry"]
    assert kvmapi.COALESCED_RING_HEADER.size == header_values["ring_header"]
    assert kvmapi.coalesced_ring_max(4096) == header_values["ring_max_4k"]


def _ioregion_uapi():
    """The C lines the kernel/ series adds to <linux/kvm.h>."""
    import glob
    added, current = [], None
    for patch in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "kernel",
                                               "patches", "*.patch"))):
        with open(patch) as f:
            for line in f.read().splitlines():
                if line.startswith("+++ "):
                    current = line[4:].split("/", 1)[-1]
                elif line.startswith("+") and current == "include/uapi/linux/kvm.h":
                    added.append(line[1:])
    assert added, "kernel/patches adds nothing to include/uapi/linux/kvm.h"
    return added


def test_ioregionfd_abi_matches_the_patch_series():
    added = _ioregion_uapi()
    values = {"KVM_SET_IOREGION": "KVM_SET_IOREGION", "KVM_CAP_IOREGIONFD": "KVM_CAP_IOREGIONFD",
              "KVM_IOREGION_PIO": "KVM_IOREGION_PIO",
              "KVM_IOREGION_POSTED_WRITES": "KVM_IOREGION_POSTED_WRITES",
              "KVM_IOREGION_DEASSIGN": "KVM_IOREGION_DEASSIGN",
              "IOREGIONFD_RESP": "KVM_IOREGIONFD_RESP",
              "IOREGIONFD_SIZE_MASK": "KVM_IOREGIONFD_SIZE_MASK",
              "IOREGIONFD_CMD_WRITE": "KVM_IOREGIONFD_CMD_WRITE",
              "sizeof_ioregion": "sizeof(struct kvm_ioregion)",
              "sizeof_cmd": "sizeof(struct kvm_ioregionfd_cmd)",
              "sizeof_resp": "sizeof(struct kvm_ioregionfd_resp)",
              "cmd_user_data": "offsetof(struct kvm_ioregionfd_cmd, user_data)",
              "cmd_offset": "offsetof(struct kvm_ioregionfd_cmd, offset)",
              "cmd_data": "offsetof(struct kvm_ioregionfd_cmd, data)",
              "ioregion_flags": "offsetof(struct kvm_ioregion, flags)",
              "KVM_EXIT_IOREGIONFD_FAILED": "KVM_EXIT_IOREGIONFD_FAILED"}
    got = c_values(["#include <linux/types.h>", "#include <linux/ioctl.h>",
                    "#define KVMIO 0xAE", *added], values)
    for name in ("KVM_SET_IOREGION", "KVM_CAP_IOREGIONFD", "KVM_IOREGION_PIO",
                 "KVM_IOREGION_POSTED_WRITES", "KVM_IOREGION_DEASSIGN", "IOREGIONFD_RESP",
                 "IOREGIONFD_SIZE_MASK", "IOREGIONFD_CMD_WRITE", "KVM_EXIT_IOREGIONFD_FAILED"):
        assert getattr(kvmapi, name) == got[name], name
    assert ctypes.sizeof(kvmapi.KvmIoregion) == got["sizeof_ioregion"] == 64
    assert kvmapi.KvmIoregion.flags.offset == got["ioregion_flags"]
    assert kvmapi.IOREGIONFD_CMD.size == got["sizeof_cmd"] == 32
    assert kvmapi.IOREGIONFD_RESP_FORMAT.size == got["sizeof_resp"] == 32
    assert (got["cmd_user_data"], got["cmd_offset"], got["cmd_data"]) == (8, 16, 24)
