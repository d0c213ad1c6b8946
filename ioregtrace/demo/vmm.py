"""The built-in demo VMM: one vCPU on raw /dev/kvm ioctls, like a KVM
selftest, running guest code generated from the demo mix.

It records its own truth, independently of any tracer:
- ioeventfd: the eventfd counters (each signal adds one);
- coalesced: the entries it drains from the coalesced ring;
- userspace: the KVM_EXIT_MMIO / KVM_EXIT_IO exits it handles (string PIO
  counts each element), with its own handling time per exit;
- kernel: what the guest program executed (kvm.ko answers those without
  telling anyone, so the program is the only witness);
- ioregionfd: the commands its device thread received from kvm.ko.
"""

import collections
import ctypes
import fcntl
import math
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import replace

from .. import kvmapi as kvm
from ..errors import UserError
from ..keys import AccessKey, Op, Path, Space
from .guestcode import GuestCode
from .mix import (CODE_ADDR, COALESCED_MMIO, COALESCED_MMIO_SIZE, CONTROL_CHURN,
                  CONTROL_DONE, CONTROL_PASS, CONTROL_SYNC, DOORBELL_DATAMATCH,
                  DOORBELL_DM_MMIO, DOORBELL_MMIO, FORWARD_MMIO, INS_BUF, IOREGION_MMIO,
                  OUTS_BUF, PIO_COALESCED, PIO_CONTROL, PIO_DOORBELL,
                  PIO_DOORBELL_DATAMATCH, RAM_SIZE)

PAGE_SIZE = mmap.PAGESIZE


def _ioctl(fd, request, arg=0):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise UserError(f"demo VMM: ioctl {request:#x} failed: {e.strerror}") from None


def _flat_segment(selector, code):
    return kvm.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector,
                          type=11 if code else 3, present=1, dpl=0, db=1, s=1,
                          l=0, g=1)


class ForwardingDevice:
    """A device model on its own thread, like a QEMU IOThread or a
    vhost-user backend: the vCPU thread sends each read and waits for the
    answer, which comes after `delay_s`."""

    def __init__(self, delay_s):
        self.delay_s = delay_s
        self.req_r, self.req_w = os.pipe()
        self.resp_r, self.resp_w = os.pipe()
        self.thread = threading.Thread(target=self._serve, name="demo-device",
                                       daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            req = os.read(self.req_r, 12)
            if len(req) < 12:
                return
            addr, size = struct.unpack("<QI", req)
            time.sleep(self.delay_s)
            os.write(self.resp_w, struct.pack("<Q", forwarded_register(addr, size)))

    def read(self, addr, size):
        os.write(self.req_w, struct.pack("<QI", addr, size))
        return struct.unpack("<Q", os.read(self.resp_r, 8))[0]

    def close(self):
        os.close(self.req_w)
        self.thread.join(timeout=5)
        for fd in (self.req_r, self.resp_r, self.resp_w):
            os.close(fd)


def forwarded_register(addr, size):
    """What the forwarded device's register at `addr` reads as."""
    return (addr ^ 0xA5A5A5A5) & ((1 << (8 * size)) - 1)


class IoregionDevice:
    """The forwarded device's registers served over ioregionfd: kvm.ko
    sends each access of the guest to IOREGION_MMIO as a 32-byte command on
    a socket and waits for the answer; no exit to this VMM.  The thread
    answers like ForwardingDevice, after the same delay, and counts what it
    received (the demo's truth for the ioregionfd path)."""

    def __init__(self, vm_fd, delay_s):
        self.delay_s = delay_s
        self.received = collections.Counter()   # (addr, size, op) -> commands
        self.lock = threading.Lock()
        self.kvm_end, self.dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        region = kvm.KvmIoregion(guest_paddr=IOREGION_MMIO, memory_size=PAGE_SIZE,
                                 user_data=FORWARD_MMIO, read_fd=self.kvm_end.fileno(),
                                 write_fd=self.kvm_end.fileno(), flags=0)
        _ioctl(vm_fd, kvm.KVM_SET_IOREGION, region)
        self.thread = threading.Thread(target=self._serve, name="demo-ioregionfd",
                                       daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                cmd = self.dev_end.recv(kvm.IOREGIONFD_CMD.size)
            except OSError:
                return
            if len(cmd) != kvm.IOREGIONFD_CMD.size:
                return
            op, info, user_data, offset, _ = kvm.IOREGIONFD_CMD.unpack(cmd)
            size = 1 << (info & kvm.IOREGIONFD_SIZE_MASK)
            with self.lock:
                self.received[(IOREGION_MMIO + offset, size,
                               Op.WRITE if op == kvm.IOREGIONFD_CMD_WRITE else Op.READ)] += 1
            if info & kvm.IOREGIONFD_RESP:
                time.sleep(self.delay_s)
                # user_data is the forwarded window's base: the same registers
                value = forwarded_register(user_data + offset, size)
                self.dev_end.send(kvm.IOREGIONFD_RESP_FORMAT.pack(value))

    def take_counts(self):
        with self.lock:
            counts, self.received = self.received, collections.Counter()
        return counts

    def close(self):
        self.dev_end.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)
        self.dev_end.close()
        self.kvm_end.close()


def _nearest_rank(ordered, q):
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Truth:
    """The VMM's own account, keyed like ioregtrace's rows."""

    def __init__(self, pid):
        self.pid = pid
        self.counts = collections.Counter()
        self.latency_ns = collections.defaultdict(list)

    def add(self, space, address, size, op, path, count=1):
        if count:
            self.counts[AccessKey(self.pid, space, address, size, op, path)] += count

    def add_latency(self, key, ns):
        self.latency_ns[key].append(ns)

    def reset(self):
        self.counts.clear()
        self.latency_ns.clear()

    def rows(self, comm):
        rows = []
        for key in sorted(self.counts):
            samples = sorted(self.latency_ns.get(key, ()))
            latency = None
            if samples:
                latency = {"p50": _nearest_rank(samples, 0.50) / 1000.0,
                           "p99": _nearest_rank(samples, 0.99) / 1000.0,
                           "max": samples[-1] / 1000.0}
            rows.append({"pid": key.pid, "comm": comm, "space": str(key.space),
                         "address": key.address, "size": key.size, "op": str(key.op),
                         "path": str(key.path), "region": None,
                         "count": self.counts[key], "latency_us": latency})
        return rows


class DemoVM:
    def __init__(self, mix, delay_s=0.001, sync=None, churn=False, repeat=1, pass_log=None,
                 cpuid=0):
        """sync: None, or a callable run when the guest reaches the end of
        its warm-up pass (the demo's attach point); the truth is reset there
        so it covers only the measured pass.
        churn: after the measured pass, deassign the datamatch ioeventfd and
        unregister the coalesced zones, then run the mix a second time (its
        writes there now exit to userspace).
        pass_log: None, or a text file that gets a line at the end of every
        measured pass: the time, the vCPU thread's CPU time, and the
        accesses made so far (the benchmark's time series).
        cpuid: the guest executes CPUID this many times at the start of
        the measured pass (kvm.ko handles each, no device access: a
        workload of known shape for exit timing)."""
        self.mix = mix
        self.sync = sync
        self.churn = churn
        self.repeat = repeat
        self.pass_log = pass_log
        self.passes_done = self.pass_accesses = 0
        self.truth = Truth(os.getpid())
        self.eventfds = {}        # (space, addr, size) -> eventfd for that doorbell
        self.kernel_program = collections.Counter()
        self.exits = 0
        self.cpuid = cpuid
        # KVM_RUN returns by kvm_run.exit_reason, counted here (the truth
        # of `stat --exits`'s userspace table)
        self.exit_reasons = collections.Counter()
        self.kvm_fd = self.vm_fd = self.vcpu_fd = -1
        self.device = self.ioregion_device = None
        try:
            self.kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"demo VMM needs /dev/kvm: {e.strerror}"
                            " (is KVM enabled, and are you root or in group kvm?)") from None
        if _ioctl(self.kvm_fd, kvm.KVM_GET_API_VERSION) != kvm.KVM_API_VERSION:
            raise UserError("demo VMM: unexpected KVM API version")
        self.has_coalesced_pio = _ioctl(self.kvm_fd, kvm.KVM_CHECK_EXTENSION,
                                        kvm.KVM_CAP_COALESCED_PIO) > 0
        self.has_ioregionfd = _ioctl(self.kvm_fd, kvm.KVM_CHECK_EXTENSION,
                                     kvm.KVM_CAP_IOREGIONFD) > 0
        if not self.has_ioregionfd:
            # Nothing would serve those reads but this VMM: leave them out
            # rather than count userspace exits under an ioregionfd name.
            self.mix = tuple(b if all(a.expect != Path.IOREGIONFD for a in b.body)
                             else replace(b, count=0) for b in self.mix)
        self._create_vm()
        self.device = ForwardingDevice(delay_s)
        if self.has_ioregionfd:
            self.ioregion_device = IoregionDevice(self.vm_fd, delay_s)

    # -- machine set-up ---------------------------------------------------

    def _create_vm(self):
        self.vm_fd = _ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0)
        self.ram = mmap.mmap(-1, RAM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
        region = kvm.KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0,
                                              memory_size=RAM_SIZE,
                                              userspace_addr=ram_addr)
        _ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
        # In-kernel LAPIC, IOAPIC, PIC and PIT: the "kernel" path.
        _ioctl(self.vm_fd, kvm.KVM_CREATE_IRQCHIP)
        _ioctl(self.vm_fd, kvm.KVM_CREATE_PIT2,
               kvm.KvmPitConfig(flags=kvm.KVM_PIT_SPEAKER_DUMMY))
        self._register_doorbells()
        self._register_coalesced()

        self.vcpu_fd = _ioctl(self.vm_fd, kvm.KVM_CREATE_VCPU, 0)
        run_size = _ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        self.run = mmap.mmap(self.vcpu_fd, run_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.run[0] = 0    # request_interrupt_window = 0, as a VMM sets it before KVM_RUN
        # KVM_CAP_COALESCED_MMIO answers with the ring's page offset in the
        # vCPU mapping (2 on x86: page 1 holds the PIO data).
        ring_page = _ioctl(self.kvm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_COALESCED_MMIO)
        if ring_page <= 0:
            raise UserError("demo VMM: this KVM has no coalesced MMIO")
        self.ring_offset = ring_page * PAGE_SIZE
        self.ring_max = kvm.coalesced_ring_max(PAGE_SIZE)
        self._set_cpu_state()

    def _ioeventfd_args(self, space, addr, size, datamatch, efd, deassign=False):
        flags = kvm.KVM_IOEVENTFD_FLAG_PIO if space == Space.PIO else 0
        if datamatch is not None:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DEASSIGN
        return kvm.KvmIoeventfd(datamatch=datamatch or 0, addr=addr, len=size, fd=efd,
                                flags=flags)

    def _register_doorbells(self):
        doorbells = [
            (Space.MMIO, DOORBELL_MMIO, 4, None),
            (Space.MMIO, DOORBELL_DM_MMIO, 4, DOORBELL_DATAMATCH),
            (Space.PIO, PIO_DOORBELL, 2, PIO_DOORBELL_DATAMATCH),
        ]
        for space, addr, size, datamatch in doorbells:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _ioctl(self.vm_fd, kvm.KVM_IOEVENTFD,
                   self._ioeventfd_args(space, addr, size, datamatch, efd))
            self.eventfds[(space, addr, size)] = efd

    def _zones(self):
        zones = [kvm.KvmCoalescedMmioZone(addr=COALESCED_MMIO,
                                          size=COALESCED_MMIO_SIZE, pio=0)]
        if self.has_coalesced_pio:
            zones.append(kvm.KvmCoalescedMmioZone(addr=PIO_COALESCED, size=1, pio=1))
        return zones

    def _register_coalesced(self):
        for zone in self._zones():
            _ioctl(self.vm_fd, kvm.KVM_REGISTER_COALESCED_MMIO, zone)

    def _churn_registrations(self):
        """Take the datamatch doorbell and the coalesced zones away.  A
        zone is named by one byte inside it: KVM removes every zone that
        contains the range it is given (a larger, enclosing range would
        remove nothing, and still succeed)."""
        key = (Space.MMIO, DOORBELL_DM_MMIO, 4)
        _ioctl(self.vm_fd, kvm.KVM_IOEVENTFD,
               self._ioeventfd_args(*key, DOORBELL_DATAMATCH, self.eventfds[key],
                                    deassign=True))
        for zone in self._zones():
            zone.size = 1
            _ioctl(self.vm_fd, kvm.KVM_UNREGISTER_COALESCED_MMIO, zone)

    def _set_cpu_state(self):
        sregs = kvm.KvmSregs()
        _ioctl(self.vcpu_fd, kvm.KVM_GET_SREGS, sregs)
        sregs.cs = _flat_segment(8, code=True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat_segment(16, code=False))
        sregs.cr0 |= 1   # protected mode, no paging
        _ioctl(self.vcpu_fd, kvm.KVM_SET_SREGS, sregs)
        regs = kvm.KvmRegs(rip=CODE_ADDR, rflags=0x2, rsp=0x7000)
        _ioctl(self.vcpu_fd, kvm.KVM_SET_REGS, regs)

    # -- guest program ----------------------------------------------------

    def _emit_pass(self, code, blocks, record, repeat=1):
        """`repeat` passes over the mix; `record` says whether they are
        measured (the kernel-path truth is what the program did in them)."""
        if record and self.cpuid:
            code.loop(self.cpuid, code.cpuid, reg=6)      # ESI: CPUID writes EBX

        def one_pass():
            for block in blocks:
                if block.count:
                    code.loop(block.count, lambda b=block: [self._emit_access(code, a)
                                                            for a in b.body])
            if record and self.pass_log is not None:
                self._control(code, CONTROL_PASS)
        code.loop(repeat, one_pass, reg=5)
        if not record:
            return
        self.pass_accesses = 1 + sum(block.count * a.rep for block in blocks for a in block.body)
        for block in blocks:
            for a in block.body:
                if a.expect == Path.KERNEL:
                    self.kernel_program[(a.space, a.address, a.size, a.op)] \
                        += repeat * block.count * a.rep

    @staticmethod
    def _emit_access(code, a):
        if a.space == Space.MMIO:
            if a.op == Op.WRITE:
                code.mov_imm(0, a.value)
                code.store(a.address, a.size)
            else:
                code.load(a.address, a.size)
            return
        code.mov_imm(2, a.address)
        if a.rep > 1:
            code.mov_imm(1, a.rep)
            if a.op == Op.WRITE:
                code.mov_imm(6, OUTS_BUF)
                code.rep_outs(a.size)
            else:
                code.mov_imm(7, INS_BUF)
                code.rep_ins(a.size)
        elif a.op == Op.WRITE:
            code.mov_imm(0, a.value)
            code.out(a.size)
        else:
            code.in_(a.size)

    def _control(self, code, value):
        code.mov_imm(2, PIO_CONTROL)
        code.mov_imm(0, value)
        code.out(4)

    def load_program(self):
        code = GuestCode(CODE_ADDR)
        if self.sync is not None:
            self._emit_pass(code, self.mix, record=False)
            self._control(code, CONTROL_SYNC)
        self._emit_pass(code, self.mix, record=True, repeat=self.repeat)
        if self.churn:
            self._control(code, CONTROL_CHURN)
            self._emit_pass(code, self.mix, record=True)
        self._control(code, CONTROL_DONE)
        code.hlt_forever()
        image = code.bytes()
        if CODE_ADDR + len(image) > OUTS_BUF:
            raise UserError("demo program too large for the guest's code area")
        self.ram[CODE_ADDR:CODE_ADDR + len(image)] = image
        self.ram[OUTS_BUF:OUTS_BUF + 256] = bytes(range(256))

    # -- run loop ---------------------------------------------------------

    def _drain_coalesced_ring(self):
        first, last = kvm.COALESCED_RING_HEADER.unpack_from(self.run, self.ring_offset)
        while first != last:
            off = (self.ring_offset + kvm.COALESCED_RING_HEADER.size
                   + first * kvm.COALESCED_RING_ENTRY.size)
            addr, length, pio, _ = kvm.COALESCED_RING_ENTRY.unpack_from(self.run, off)
            self.truth.add(Space.PIO if pio else Space.MMIO, addr, length, Op.WRITE,
                           Path.COALESCED)
            first = (first + 1) % self.ring_max
        struct.pack_into("<I", self.run, self.ring_offset, first)

    def _handle_mmio(self):
        addr, data, length, is_write = kvm.RUN_MMIO.unpack_from(self.run, kvm.RUN_EXIT_UNION)
        op = Op.WRITE if is_write else Op.READ
        if not is_write:
            if FORWARD_MMIO <= addr < FORWARD_MMIO + PAGE_SIZE:
                value = self.device.read(addr, length)
            else:
                value = addr & 0xFFFFFFFF
            self.run[kvm.RUN_MMIO_DATA:kvm.RUN_MMIO_DATA + 8] = struct.pack("<Q", value)
        self.truth.add(Space.MMIO, addr, length, op, Path.USERSPACE)
        return AccessKey(self.truth.pid, Space.MMIO, addr, length, op, Path.USERSPACE)

    def _handle_io(self):
        direction, size, port, count, data_offset = kvm.RUN_IO.unpack_from(
            self.run, kvm.RUN_EXIT_UNION)
        if port == PIO_CONTROL and direction == kvm.KVM_EXIT_IO_OUT:
            value = struct.unpack_from("<I", self.run, data_offset)[0]
            return "control", value
        op = Op.WRITE if direction == kvm.KVM_EXIT_IO_OUT else Op.READ
        if op == Op.READ:
            self.run[data_offset:data_offset + size * count] = bytes([port & 0xFF]) * (size * count)
        self.truth.add(Space.PIO, port, size, op, Path.USERSPACE, count)
        return AccessKey(self.truth.pid, Space.PIO, port, size, op, Path.USERSPACE), None

    def run_guest(self):
        """Run until the guest's CONTROL_DONE; return the wall time of the
        measured pass in seconds (its vCPU thread's CPU time: self.cpu_s)."""
        pending = None           # (key, t_exit_ns) of the last userspace exit
        started = time.monotonic()
        cpu_started = time.thread_time()
        while True:
            if pending is not None:
                # The VMM's own view of the interval ioregtrace times: from
                # KVM_RUN's return to the next KVM_RUN call on this thread.
                key, t_exit = pending
                self.truth.add_latency(key, time.perf_counter_ns() - t_exit)
                pending = None
            try:
                fcntl.ioctl(self.vcpu_fd, kvm.KVM_RUN, 0)
            except InterruptedError:
                continue
            except OSError as e:
                raise UserError(f"demo VMM: KVM_RUN failed: {e.strerror}") from None
            t_exit = time.perf_counter_ns()
            self.exits += 1
            self.exit_reasons[struct.unpack_from("<I", self.run, kvm.RUN_EXIT_REASON)[0]] += 1
            self._drain_coalesced_ring()
            reason = struct.unpack_from("<I", self.run, kvm.RUN_EXIT_REASON)[0]
            if reason == kvm.KVM_EXIT_MMIO:
                pending = (self._handle_mmio(), t_exit)
            elif reason == kvm.KVM_EXIT_IO:
                key, control = self._handle_io()
                if key == "control":
                    # The control port is a userspace PIO write like any other.
                    self.truth.add(Space.PIO, PIO_CONTROL, 4, Op.WRITE, Path.USERSPACE)
                    if control == CONTROL_DONE:
                        break
                    if control == CONTROL_SYNC:
                        self._read_eventfds()   # discard warm-up signals
                        if self.ioregion_device is not None:
                            self.ioregion_device.take_counts()
                        self.truth.reset()
                        self.exits = 0
                        self.exit_reasons.clear()
                        self.sync()
                        started = time.monotonic()
                        cpu_started = time.thread_time()
                    elif control == CONTROL_CHURN:
                        self._churn_registrations()
                    elif control == CONTROL_PASS:
                        self._log_pass()
                    continue
                pending = (key, t_exit)
            else:
                name = kvm.EXIT_REASON_NAMES.get(reason, str(reason))
                raise UserError(f"demo VMM: unexpected exit KVM_EXIT_{name}")
        elapsed = time.monotonic() - started
        # The vCPU thread's CPU time: guest execution, KVM, the VMM's own
        # handling, and any tracer's BPF programs, without steal time.
        self.cpu_s = time.thread_time() - cpu_started
        self._drain_coalesced_ring()
        for (space, addr, size), count in self._read_eventfds().items():
            if count:
                self.truth.add(space, addr, size, Op.WRITE, Path.IOEVENTFD, count)
        for (space, addr, size, op), count in self.kernel_program.items():
            self.truth.add(space, addr, size, op, Path.KERNEL, count)
        if self.ioregion_device is not None:
            for (addr, size, op), count in self.ioregion_device.take_counts().items():
                self.truth.add(Space.MMIO, addr, size, op, Path.IOREGIONFD, count)
        return elapsed

    def _log_pass(self):
        """Accesses so far: every pass makes the same ones (the mix is
        deterministic), its control write included."""
        self.passes_done += 1
        made = self.passes_done * self.pass_accesses
        self.pass_log.write(f"{time.monotonic():.6f} {time.thread_time():.6f} {made}\n")

    def _read_eventfds(self):
        counts = {}
        for doorbell, efd in self.eventfds.items():
            try:
                counts[doorbell] = struct.unpack("<Q", os.read(efd, 8))[0]
            except BlockingIOError:
                counts[doorbell] = 0
        return counts

    def close(self):
        if self.device is not None:
            self.device.close()
        if self.ioregion_device is not None:
            self.ioregion_device.close()
        for efd in self.eventfds.values():
            os.close(efd)
        for fd in (self.vcpu_fd, self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
