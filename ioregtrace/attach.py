"""VMs created before ioregtrace attached: what they registered with KVM
then (ioeventfds, coalesced zones) was never seen as an ioctl.  The tracer
holds their accesses (probes.Tracer._hold_vms) while this module reads it
from the VMM, seeds the tracer's tables with it and lets them be counted:
then every in-kernel write is attributed exactly, as for a VM created while
traced, and one matching no registration is kvm.ko's own device (kernel).

Only QEMU keeps what it registered where it can be read (see
qemu.registrations).  Any other VMM, or a QEMU whose memory does not read
as expected, is released unseeded: its in-kernel writes that match no
registration seen since the attach stay `unattributed`, and a note says
why.  Nothing is inferred from addresses: an ioeventfd or coalesced zone
may sit on any address, even on a device kvm.ko emulates elsewhere."""

import fcntl
import os
import time

from . import kvmapi
from .qemu import ops
from .qemu.registrations import StateError, read_state

# A read of QEMU's tables is used when it is the same twice, QUIET_S apart,
# and no registration ioctl (which the tracer applies as it sees it) came
# from before the first read until the seed was written.  QEMU updates its
# ioeventfd array right after the ioctls that change KVM's, under its big
# lock with nothing in between that waits; only a QEMU stalled for QUIET_S
# between the two could be read stale.
QUIET_S = 0.1
TRIES = 5


def seed_held_vms(tracer, binaries, log):
    """Seed or release every VM the tracer holds.  `binaries`: {pid:
    qemu.binary.QemuBinary} for the QEMUs among them.  Returns ({vm serial:
    why its registrations are unknown}, {pid: FlatLayout of QEMU's memory
    map at attach})."""
    unseeded, layouts = {}, {}
    for pid in list(tracer.held):
        binary, serial = binaries.get(pid), tracer.held[pid]
        if binary is None:
            tracer.release_vm(pid, complete=False)
            unseeded[serial] = (f"pid {pid}: not QEMU, so what its VM registered with KVM "
                                "before ioregtrace attached cannot be read")
            continue
        try:
            layouts[pid] = _seed_qemu(tracer, pid, binary, _coalesced_pio())
        except (StateError, OSError) as e:
            tracer.release_vm(pid, complete=False)
            unseeded[serial] = (f"pid {pid}: QEMU's registrations with KVM could not be read "
                                f"at attach: {e}")
            log(f"warning: pid {pid}: {e}")
    return unseeded, layouts


def _seed_qemu(tracer, pid, binary, coalesced_pio):
    if not binary.name_offset:            # the binary lacks what reading needs
        raise StateError(binary.why_not)
    serial = tracer.held[pid]
    mem = ops.ProcessMemory(pid)
    try:
        base = ops.load_base(pid, binary.path)

        def read():
            return read_state(mem, binary.symbols, base, binary.name_offset, coalesced_pio,
                              lambda fd: _is_eventfd(pid, fd))
        for _ in range(TRIES):
            marks = tracer.registration_generation(), tracer.layout_generation(serial)
            first = read()
            time.sleep(QUIET_S)
            state = read()
            if state != first or marks != (tracer.registration_generation(),
                                           tracer.layout_generation(serial)):
                continue
            if not tracer.seed_vm(pid, state.ioeventfds, state.zones):
                raise StateError(f"{len(state.ioeventfds)} ioeventfds and "
                                 f"{len(state.zones)} coalesced zones do not fit the "
                                 "tracer's tables")
            if tracer.registration_generation() != marks[0]:
                continue          # an ioctl raced the write: read and write again
            tracer.release_vm(pid, complete=True)
            return state.layout
        raise StateError(f"its registrations or memory map kept changing ({TRIES} reads)")
    finally:
        mem.close()


def _is_eventfd(pid, fd):
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _coalesced_pio():
    """Whether QEMU registers its coalesced PIO ranges: only when KVM has
    KVM_CAP_COALESCED_PIO (and coalesced MMIO), as QEMU asks it."""
    try:
        with kvmapi.system_fd() as fd:
            return all(fcntl.ioctl(fd, kvmapi.KVM_CHECK_EXTENSION, cap) > 0
                       for cap in (kvmapi.KVM_CAP_COALESCED_MMIO, kvmapi.KVM_CAP_COALESCED_PIO))
    except OSError as e:
        raise StateError(f"/dev/kvm cannot say whether KVM has coalesced PIO: "
                         f"{e.strerror}") from None
