"""Probe loading: compile bpf/ioregtrace.bpf.c with BCC, attach it, and read
its maps back as plain Python data (a RawSnapshot).  Nothing here knows
about rows or views."""

import collections
import ctypes
import dataclasses
import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import exits as exits_mod
from . import headers, histogram, keys, kvmapi, requirements
from .errors import UserError
from .qemu.layout import LayoutHistory

BPF_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "bpf", "ioregtrace.bpf.c")

# Fixed map sizes.  When one is full the BPF side counts what it dropped.
MAP_SIZES = {
    "MAX_ACCESS_KEYS": 1 << 20,
    "RUN_FLUSH": 64,              # accesses a vCPU batches before a map update
    "LATENCY_FLUSH": 16,          # round trips likewise (a power of two)
    "MAX_LATENCY_KEYS": 1 << 15,   # userspace keys; allocated as used (2 KiB each)
    "MAX_VMS": 1024,
    "THREAD_SLOTS": 4096,         # threads with array-held state (a power of two)
    "MAX_TARGETS": 8192,
    "MAX_IOEVENTFD_ADDRS": 4096,
    "IOEVENTFD_SLOTS": 16,
    "ZONE_SLOTS": 16,
    "MAX_REG_HISTORY": 8192,
    "MAX_VCPUS": 8192,
    "REGION_NAME_LEN": 64,
    "LAYOUT_RING_PAGES": 1024,
    "RAW_RING_PAGES": 16384,       # event mode: 64 MiB, ~1.2M events between polls
    "MAX_EXIT_KEYS": 16384,        # vCPU threads x exit reasons; 2 KiB each, as used
    "EXIT_FLUSH": 16,              # exits of one key a vCPU batches (a power of two)
}

# Order of the counters map (CNT_* in the BPF source).
COUNTERS = ("dropped_accesses", "dropped_latency", "lost_events", "attach_ambiguous",
            "unmatched_exits", "dropped_registrations", "dropped_vms", "inferred_exits",
            "lost_layout", "lost_raw_events", "dropped_exits")
# Counted by the agent, beside them.
AGENT_COUNTERS = ("in_flight_at_end",)

CFG_MODE, CFG_REG_GEN, CFG_VM_SERIAL, CFG_MR_NAME_OFFSET, CFG_EVENTS_LEFT = 0, 1, 2, 3, 4
CFG_STATE_GEN = 5
CFG_VCPU_MMAP_SIZE = 6
CFG_PHASE, PHASE_CLOSING, PHASE_CLOSED = 7, 1, 2   # 0: open
# How long the end of a session waits for the accesses begun before it to
# be settled by their threads (see end_tracing).  Microseconds, normally;
# a vCPU halted in the kernel after an in-kernel write never settles it.
SETTLE_WAIT_S = 0.1
MODE_ALL, MODE_TARGETS = 1, 2       # 0: setting up, nothing traced
RAW_ACCESS, RAW_LATENCY = 0, 1
# struct raw_event: ts, tid, pid, vm, layout, addr, count, space, op, path,
# size, kind, pad[7], latency_ns
RAW_EVENT = struct.Struct("<QIIIIQIBBBBB7xQ")
REG_KINDS = {1: "ioeventfd", 2: "coalesced", 3: "ioregion"}   # REG_IOEVENTFD, _ZONE, _IOREGION


def compile_flags(have_fast_mmio, events=False, mirror=False, have_ioregion=False,
                  per_vcpu=False, exits=False, have_kvm_exit=False):
    """Optional parts are compiled only when used: a third of the compile
    time, which is most of the time to attach, goes to each.  `exits`:
    count exits by reason (userspace returns; hardware exits too where the
    kernel has kvm:kvm_exit/kvm_entry, `have_kvm_exit`)."""
    flags = ["-Wno-ignored-attributes", "-Wno-unused-function"]
    if exits:
        flags.append("-DWITH_EXITS")
        if have_kvm_exit:
            flags.append("-DHAVE_KVM_EXIT")
    if per_vcpu:
        flags.append("-DPER_VCPU")
    if events:
        flags.append("-DWITH_EVENTS")
    if mirror:
        flags.append("-DWITH_QEMU_MIRROR")
    flags += keys.bpf_defines() + histogram.bpf_defines()
    flags += [f"-D{name}={value}" for name, value in MAP_SIZES.items()]
    for name in ("KVM_RUN", "KVM_IOEVENTFD", "KVM_CREATE_VM", "KVM_CREATE_VCPU",
                 "KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO",
                 "KVM_EXIT_MMIO", "KVM_EXIT_IO", "KVM_IOEVENTFD_FLAG_PIO",
                 "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_DEASSIGN",
                 "KVM_SET_IOREGION", "KVM_IOREGION_PIO", "KVM_IOREGION_DEASSIGN",
                 "KVM_EXIT_IOREGIONFD_FAILED", "KVM_RUN_X86_IOREGIONFD_PENDING"):
        flags.append(f"-D{name}={getattr(kvmapi, name):#x}U")
    if have_fast_mmio:
        flags.append("-DHAVE_KVM_FAST_MMIO")
    if have_ioregion:
        flags.append("-DHAVE_KVM_IOREGION")
    return flags


@dataclass
class LatencyStats:
    count: int
    sum_ns: int
    max_ns: int
    slots: list


@dataclass
class VmInfo:
    pid: int
    serial: int
    complete: bool     # saw KVM_CREATE_VM: every registration is known
    comm: str
    exited_ns: int = 0     # CLOCK_MONOTONIC when the process exited; 0: running


@dataclass
class RawSnapshot:
    """The maps at one instant.  Keys are (vm_serial, AccessKey)."""
    taken: float
    accesses: dict = field(default_factory=dict)
    latencies: dict = field(default_factory=dict)
    vms: dict = field(default_factory=dict)          # serial -> VmInfo
    counters: dict = field(default_factory=dict)
    # Every ioeventfd / coalesced zone registered while tracing, including
    # ones removed since: (vm serial, kind, space, addr, size).
    registrations: list = field(default_factory=list)
    # (vm serial, exits.ExitKey) -> exits.ExitStats (WITH_EXITS)
    exits: dict = field(default_factory=dict)


@dataclass
class RawEvent:
    """One access, from event mode (record --events)."""
    ts_ns: int            # CLOCK_MONOTONIC
    tid: int
    pid: int
    vm: int
    space: int
    address: int
    size: int
    op: int
    path: int
    layout: int
    count: int            # elements (string PIO)
    latency_ns: Optional[int] = None


@dataclass
class Events:
    requested: int
    lost: int = 0
    events: list = field(default_factory=list)


def preflight():
    """The checks that must pass before compiling; raises the first failure
    as one line that names the fix."""
    for check in ([requirements.check_privileges()] + requirements.check_mounts()
                  + requirements.check_tracepoints() + [requirements.check_bcc()]):
        if check.required and not check.ok:
            raise UserError(f"{check.name}: {check.detail}; fix: {check.fix} "
                            "(see `ioregtrace doctor`)")


class Tracer:
    """The loaded BPF program.  `pids`: trace only these processes and their
    children (None: every KVM VM on the host).  `events`: also send the
    first N accesses one by one (event mode).  `per_vcpu`: keys name the
    vCPU thread too (AccessKey.tid), so counts and latencies are per thread."""

    def __init__(self, pids=None, events=None, mirror=False, per_vcpu=False, exits=True):
        preflight()
        path, _ = headers.find(build=True)
        if path is None:
            check = requirements.check_headers()
            raise UserError(f"{check.name}: {check.detail}; fix: {check.fix}")
        if path != headers.running_build_dir():
            os.environ["BCC_KERNEL_SOURCE"] = path
        self.have_fast_mmio = requirements.tracepoint_exists("kvm", "kvm_fast_mmio")
        # ioregionfd exists only in patched kernels (kernel/ in this tree)
        self.have_ioregion = all(requirements.tracepoint_exists("kvm", name)
                                 for name in ("kvm_ioregion_send", "kvm_ioregion_response"))
        self.exits = exits
        # Where the CPU has neither VMX nor SVM (PVM), kvm_exit never fires:
        # its programs would cost compile time (~0.8 s) and nothing else.
        self.virt = requirements.hardware_virtualization()
        self.have_kvm_exit = exits and self.virt is not None and all(
            requirements.tracepoint_exists("kvm", name) for name in ("kvm_exit", "kvm_entry"))
        from bcc import BPF
        try:
            self.bpf = BPF(src_file=BPF_SOURCE.encode(),
                           cflags=compile_flags(self.have_fast_mmio, events=bool(events),
                                                mirror=mirror,
                                                have_ioregion=self.have_ioregion,
                                                per_vcpu=per_vcpu, exits=exits,
                                                have_kvm_exit=self.have_kvm_exit))
        except Exception as e:   # BCC raises bare Exception for compile/attach
            raise UserError(f"loading the BPF program failed: {str(e).splitlines()[0]} "
                            "(see `ioregtrace doctor`)") from None
        self.started = time.monotonic()
        self.histories = collections.defaultdict(LayoutHistory)   # vm serial -> QEMU map
        self.mirrored_binaries = {}          # path -> QemuBinary
        self._ring_open = False
        self.mirror = mirror
        self.per_vcpu = per_vcpu
        self.layout_events = 0
        self.known_vms = {}                  # vm serial -> VmInfo, kept after exit
        # Map key bytes -> (vm serial, AccessKey), made once per key: ioregtop
        # reads the maps every second, and one QEMU has tens of thousands of
        # keys, whose AccessKeys cost more to build than the map to read.
        self._access_keys = {}
        # BCC's tables and ring buffers are not thread-safe; the exporter
        # reads from its HTTP threads while the session polls.
        self.lock = threading.RLock()
        self.filtering = pids is not None
        config = self.bpf[b"config"]
        config[ctypes.c_int(CFG_REG_GEN)] = ctypes.c_uint64(1)
        config[ctypes.c_int(CFG_VCPU_MMAP_SIZE)] = ctypes.c_uint64(vcpu_mmap_size())
        self.events = None
        if events:
            self.events = Events(requested=events)
            self._raw = []                   # undecoded struct raw_event records
            self._last_userspace = {}        # tid -> index of its last userspace event
            config[ctypes.c_int(CFG_EVENTS_LEFT)] = ctypes.c_uint64(events)
            self.bpf[b"raw_events"].open_ring_buffer(self._on_raw_event)
        self.ended = False                   # end_tracing() was done
        # Programs are attached but trace nothing until this is done.
        self.held = {}                       # pid -> vm serial, see _hold_vms
        if self.filtering:
            for pid in pids:
                self.add_target(pid)
            self._hold_vms(pids)
            config[ctypes.c_int(CFG_MODE)] = ctypes.c_uint64(MODE_TARGETS)
        else:
            pids = running_pids()
            for pid in pids:
                self.learn_vcpus(pid)
            self._hold_vms(pids)
            config[ctypes.c_int(CFG_MODE)] = ctypes.c_uint64(MODE_ALL)
        self._state_changed()

    def _hold_vms(self, pids):
        """The VMs that exist already get their serial now, with their
        accesses held (vm_info.seeding: their registration ioctls are
        applied, their accesses not counted) until the agent has read what
        they registered before the attach (seed_vm) or found that it cannot
        (release_vm).  Only while nothing is traced: the BPF side hands out
        serials too, and no ioctl of theirs is missed from here on."""
        vms, config = self.bpf[b"vms"], self.bpf[b"config"]
        key = ctypes.c_int(CFG_VM_SERIAL)
        for pid in pids:
            if not holds_kvm_vm(pid):
                continue
            serial = config[key].value + 1
            config[key] = ctypes.c_uint64(serial)
            info = vms.Leaf()
            info.serial, info.seeding = serial, 1
            info.comm = process_comm(pid).encode()[:15]
            vms[ctypes.c_uint32(pid)] = info
            self.held[pid] = serial

    def registration_generation(self):
        """Bumped by every registration ioctl the BPF side applies."""
        return self.bpf[b"config"][ctypes.c_int(CFG_REG_GEN)].value

    def layout_generation(self, serial):
        """The VM's mirrored memory-map generation (0: no change seen)."""
        slot = self.bpf[b"layouts"][ctypes.c_int(serial % MAP_SIZES["MAX_VMS"])]
        return slot.gen if slot.vm == serial else 0

    def seed_vm(self, pid, ioeventfds, zones):
        """Make a held VM's registration maps exactly `ioeventfds` and `zones`
        (qemu.registrations.Ioeventfd / Zone), replacing what the BPF side
        applied so far.  False when they do not fit the tables."""
        serial = self.held[pid]
        by_address = collections.defaultdict(list)
        for e in ioeventfds:
            by_address[(e.space, e.addr)].append(e)
        if (len(zones) > MAP_SIZES["ZONE_SLOTS"]
                or len(by_address) > MAP_SIZES["MAX_IOEVENTFD_ADDRS"]
                or any(len(v) > MAP_SIZES["IOEVENTFD_SLOTS"] for v in by_address.values())):
            return False
        table, zone_table = self.bpf[b"ioeventfds"], self.bpf[b"zones"]
        with self.lock:
            for k in [k for k in table.keys() if (k.pid, k.vm) == (pid, serial)]:
                del table[k]
            for (space, addr), entries in by_address.items():
                value = table.Leaf()
                for slot, e in zip(value.slot, entries, strict=False):     # slots to spare
                    slot.len, slot.used = e.length, 1
                    slot.wildcard = e.datamatch is None
                    slot.datamatch = e.datamatch or 0
                table[table.Key(pid=pid, vm=serial, addr=addr, space=space)] = value
                self._remember(pid, serial, "ioeventfd", space, addr, entries[0].length)
            value = zone_table.Leaf()
            for slot, z in zip(value.zone, zones, strict=False):
                slot.addr, slot.size, slot.pio, slot.used = z.addr, z.size, int(z.space), 1
                self._remember(pid, serial, "coalesced", z.space, z.addr, z.size)
            zone_table[zone_table.Key(pid=pid, vm=serial)] = value
        return True

    def _remember(self, pid, serial, kind, space, addr, size):
        """As the BPF side's remember(): names by registration, and the
        bundle's list of them."""
        history = self.bpf[b"reg_history"]
        kind_id = {name: k for k, name in REG_KINDS.items()}[kind]
        history[history.Key(pid=pid, vm=serial, addr=addr, size=size, space=space,
                            kind=kind_id)] = ctypes.c_uint8(1)

    def release_vm(self, pid, complete):
        """Count a held VM's accesses from now on; `complete`: its
        registrations were seeded whole, so an in-kernel write matching
        none of them is kvm.ko's own device (path kernel)."""
        serial = self.held.pop(pid, None)
        if serial is None:
            return
        vms = self.bpf[b"vms"]
        with self.lock:
            info = vms.get(ctypes.c_uint32(pid))
            if info is not None and info.serial == serial:
                info.seeding = 0
                info.complete = info.complete or int(complete)
                vms[ctypes.c_uint32(pid)] = info
            config = self.bpf[b"config"]
            key = ctypes.c_int(CFG_REG_GEN)       # the threads' cached paths are stale
            config[key] = ctypes.c_uint64(config[key].value + 1)
            self._state_changed()

    def add_target(self, pid):
        self.bpf[b"targets"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        self.learn_vcpus(pid)
        self._state_changed()

    def _state_changed(self):
        """Threads re-read what they cache (the filter) at their next KVM_RUN."""
        config = self.bpf[b"config"]
        key = ctypes.c_int(CFG_STATE_GEN)
        config[key] = ctypes.c_uint64(config[key].value + 1)

    def learn_vcpus(self, pid):
        """vCPUs created before we attached: where each vCPU fd's kvm_run is
        mapped, so their exits can be decoded too."""
        runs = self.bpf[b"vcpu_runs"]
        for fd, addr in vcpu_run_mappings(pid).items():
            key = runs.Key(pid=pid, fd=fd)
            runs[key] = ctypes.c_uint64(addr)

    def mirror_qemu(self, binary):
        """Mirror the memory map of every traced QEMU running `binary` (a
        qemu.binary.QemuBinary whose mirror_ok is true)."""
        if binary.path in self.mirrored_binaries:
            return
        if not self.mirror:
            raise UserError("the QEMU mirror was not compiled in (no QEMU target foreseen)")
        offsets = {b.name_offset for b in self.mirrored_binaries.values()}
        if offsets and binary.name_offset not in offsets:
            raise UserError(f"{binary.path}: a second QEMU build with another MemoryRegion "
                            "layout; trace one QEMU build per session")
        self.bpf[b"config"][ctypes.c_int(CFG_MR_NAME_OFFSET)] = ctypes.c_uint64(
            binary.name_offset)
        try:
            self.bpf.attach_uprobe(name=binary.path.encode(), sym=b"flatview_add_to_dispatch",
                                   fn_name=b"qemu_flatview_section")
        except Exception as e:       # BCC raises bare Exception
            raise UserError(f"cannot attach a uprobe to {binary.path}: "
                            f"{str(e).splitlines()[0]}") from None
        if not self._ring_open:
            self.bpf[b"layout_events"].open_ring_buffer(self._on_layout_event)
            self._ring_open = True
        self.mirrored_binaries[binary.path] = binary

    def _on_layout_event(self, ctx, data, size):
        e = self.bpf[b"layout_events"].event(data)
        self.layout_events += 1
        self.histories[e.vm].add_section(e.gen, keys.Space(e.space), e.fv, e.start, e.size,
                                         e.name.decode(errors="replace"), e.offset, e.mr)

    def _on_raw_event(self, ctx, data, size):
        # Per event, only a copy: at the demo's peak rate (~300k events/s)
        # anything more in Python falls behind and the ring overflows.
        self._raw.append(ctypes.string_at(data, RAW_EVENT.size))

    def raw_events(self):
        """The event-mode events so far, parsed; each userspace access gets
        the latency that followed it on its thread."""
        events, last_userspace = self.events.events, self._last_userspace
        for (ts, tid, pid, vm, layout, addr, count, space, op, path, size, kind,
             latency) in RAW_EVENT.iter_unpack(b"".join(self._raw)):
            if kind == RAW_LATENCY:
                idx = last_userspace.pop(tid, None)
                if idx is not None:
                    events[idx].latency_ns = latency
                continue
            if path == keys.Path.USERSPACE:
                last_userspace[tid] = len(events)
            events.append(RawEvent(ts, tid, pid, vm, space, addr, size, op, path, layout,
                                   count))
        self._raw.clear()
        return self.events

    def poll(self):
        """Consume pending ring-buffer events (the mirror's and, in event
        mode, the raw accesses) and note new VMs.  Call often: the rings are
        finite, and a pid reused before the next look would hide its first
        owner."""
        with self.lock:
            if self._ring_open or self.events is not None:
                self.bpf.ring_buffer_consume()
            self.snapshot_vms()

    def vm_serial(self, pid):
        info = self.bpf[b"vms"].get(ctypes.c_uint32(pid))
        return info.serial if info is not None else None

    def remove_target(self, pid):
        try:
            del self.bpf[b"targets"][ctypes.c_uint32(pid)]
        except KeyError:
            pass
        self._state_changed()

    def attached_probes(self):
        probes = ["kvm:kvm_mmio", "kvm:kvm_pio", "kvm:kvm_userspace_exit",
                  "syscalls:sys_enter_ioctl",
                  "syscalls:sys_enter_mmap", "syscalls:sys_exit_mmap",
                  "sched:sched_process_fork", "sched:sched_process_exit"]
        if self.have_fast_mmio:
            probes.append("kvm:kvm_fast_mmio")
        if self.have_ioregion:
            probes += ["kvm:kvm_ioregion_send", "kvm:kvm_ioregion_response"]
        if self.have_kvm_exit:
            probes += ["kvm:kvm_exit", "kvm:kvm_entry"]
        return probes

    def program_stats(self):
        """{program name: (run_cnt, run_time_ns)} from the kernel's own
        accounting (non-zero only while kernel.bpf_stats_enabled is 1)."""
        out = {}
        for name, fn in self.bpf.funcs.items():
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            out[name.decode()] = (int(fields.get("run_cnt", 0)),
                                  int(fields.get("run_time_ns", 0)))
        return out

    def snapshot_vms(self):
        """Every VMM process seen, by serial, including ones whose pid has
        since been reused (the map only holds a pid's latest)."""
        with self.lock:
            items = list(self.bpf[b"vms"].items())
        for k, v in items:
            self.known_vms[v.serial] = VmInfo(k.value, v.serial, bool(v.complete),
                                              v.comm.decode(errors="replace"), v.exited_ns)
        return dict(self.known_vms)

    def snapshot(self, final=False):
        """The maps now.  `final`: the session has ended, so end the
        tracing (end_tracing()) and add what vCPU threads still hold back
        (_add_held_back()).  Once ended, every snapshot is that final one."""
        with self.lock:
            if final:
                self.end_tracing()
            ended = getattr(self, "ended", False)   # tests build Tracers without __init__
            snap = self._snapshot()
            if ended:
                self._add_held_back(snap)
            return snap

    def end_tracing(self, settle_wait_s=None):
        """Stop counting at one cut all threads agree on (CFG_PHASE in the
        BPF source).  An access whose event came before the cut is counted
        by the path it took: a thread still between such an event and the
        one that says where the access went (an MMIO read's exit to
        userspace, microseconds later) is given up to `settle_wait_s` to get
        there.  Counting it by its in-kernel candidate instead would report
        an unsatisfied read as kvm.ko's.  What a thread begins after the cut
        is not counted."""
        if getattr(self, "ended", False):
            return
        config = self.bpf[b"config"]
        config[ctypes.c_int(CFG_PHASE)] = ctypes.c_uint64(PHASE_CLOSING)
        self._state_changed()
        wait = SETTLE_WAIT_S if settle_wait_s is None else settle_wait_s
        deadline = time.monotonic() + wait
        slots = self.bpf[b"thread_slots"]
        unsettled = [getattr(k, "value", k) for k, t in _items(slots) if _unsettled(t)]
        while unsettled and time.monotonic() < deadline:
            time.sleep(0.001)
            unsettled = [i for i in unsettled if _unsettled(slots[ctypes.c_int(i)])]
        config[ctypes.c_int(CFG_PHASE)] = ctypes.c_uint64(PHASE_CLOSED)
        self._state_changed()
        # A program that read the phase before it changed finishes within
        # microseconds (tracepoint programs do not sleep); then nothing
        # moves.
        time.sleep(0.005)
        self.ended = True

    def _add_held_back(self, snap):
        """A vCPU thread batches accesses and round trips of one key before
        a map update, and flushes them when KVM_RUN returns.  One that does
        not return any more (a guest halted for good, a hung guest, a VM
        still running at -d) would keep up to RUN_FLUSH - 1 accesses and
        LATENCY_FLUSH - 1 round trips from the final count; and its last
        in-kernel access waits for its next event to be settled.  Read from
        the threads' slots (threads whose state is in task storage, only
        when two live threads' ids share a slot, are not reached)."""
        flush = MAP_SIZES["LATENCY_FLUSH"]
        in_flight = 0
        for _, t in _items(self.bpf[b"thread_slots"]):
            if not t.tid or not t.traced:
                continue
            if t.run_count:
                key = self._vm_key(t.run_key, snap.vms)
                snap.accesses[key] = snap.accesses.get(key, 0) + t.run_count
            if _unsettled(t):
                if t.pend_key.space == keys.Space.MMIO and t.pend_key.op == keys.Op.READ:
                    # READ_UNSATISFIED: no in-kernel handler; its exit (or
                    # ioregionfd command) did not come in SETTLE_WAIT_S.
                    in_flight += t.pend_count
                else:        # no exit followed it: kvm.ko served it
                    key = self._vm_key(t.pend_key, snap.vms)
                    snap.accesses[key] = snap.accesses.get(key, 0) + t.pend_count
            if getattr(self, "exits", False):
                self._add_open_exits(snap, t)
            if t.lat_n:
                slots = [0] * histogram.SLOTS
                for i in range(min(t.lat_n, flush)):
                    slots[t.lat_slot[i]] += 1
                key = self._vm_key(t.lat_key, snap.vms)
                snap.latencies[key] = merge_latency(
                    snap.latencies.get(key), LatencyStats(t.lat_n, t.lat_sum, t.lat_max, slots))
        snap.counters["in_flight_at_end"] = in_flight

    def _add_open_exits(self, snap, t):
        """A thread's exit still open (no kvm_entry yet: a halted vCPU, or
        the last exit of a VM) and its last KVM_RUN return (the VMM has not
        called KVM_RUN again): counted, untimed."""
        for b in (t.hb, t.ub):            # batches not yet in the map
            if b.n:
                slots = [0] * histogram.SLOTS
                for i in range(min(b.timed, MAP_SIZES["EXIT_FLUSH"])):
                    slots[b.slot[i]] += 1
                key = (t.vm, exits_mod.ExitKey(b.kind, b.isa, b.reason, b.err, t.tid))
                snap.exits[key] = exits_mod.merge(snap.exits.get(key), exits_mod.ExitStats(
                    b.n, b.to_user, b.sum_ns, b.min_ns if b.timed else 0, b.max_ns, slots))
        opened = []
        if t.hx_ts:
            opened.append(exits_mod.ExitKey(exits_mod.HW, t.hx_isa, t.hx_reason, 0, t.tid))
        if t.ux_ts:
            opened.append(exits_mod.ExitKey(exits_mod.USER, 0, t.ux_reason, t.ux_err, t.tid))
        for key in opened:
            snap.exits[(t.vm, key)] = exits_mod.merge(snap.exits.get((t.vm, key)),
                                                      exits_mod.ExitStats(1))

    def _snapshot(self):
        self.poll()
        snap = RawSnapshot(taken=time.monotonic())
        accesses = _items(self.bpf[b"accesses"])
        latencies = _items(self.bpf[b"latencies"])
        snap.vms = self.snapshot_vms()      # after the keys: every key's vm is in it
        for k, v in accesses:
            snap.accesses[self._vm_key(k, snap.vms)] = getattr(v, "value", v)
        for k, v in latencies:
            slots = list(v.slots)[:histogram.SLOTS]
            snap.latencies[self._vm_key(k, snap.vms)] = LatencyStats(
                sum(slots), v.sum_ns, v.max_ns, slots)
        if getattr(self, "exits", False):      # tests build Tracers without __init__
            for k, v in _items(self.bpf[b"exits"]):
                key = exits_mod.ExitKey(k.kind, k.isa, k.reason, k.err, k.tid)
                snap.exits[(k.vm, key)] = exits_mod.ExitStats(
                    v.count, v.to_user, v.sum_ns, v.min_ns, v.max_ns,
                    list(v.slots)[:histogram.SLOTS])
        for i, name in enumerate(COUNTERS):
            snap.counters[name] = sum(self.bpf[b"counters"][ctypes.c_int(i)])
        snap.counters.update(dict.fromkeys(AGENT_COUNTERS, 0))
        for k in self.bpf[b"reg_history"].keys():
            snap.registrations.append((k.vm, REG_KINDS[k.kind], keys.Space(k.space),
                                       k.addr, k.size))
        return snap

    def _vm_key(self, k, vms):
        """(vm serial, AccessKey) of a map key (both maps have the same key),
        made once per key.  A PER_VCPU key holds the vCPU thread; the
        process is its VM's."""
        raw = bytes(k)
        vk = self._access_keys.get(raw)
        if vk is None:
            key = _access_key(k)
            if self.per_vcpu:
                info = vms.get(k.vm)
                key = dataclasses.replace(key, pid=info.pid if info else 0, tid=k.pid)
                if info is None:            # not kept: its process is known later
                    return k.vm, key
            vk = self._access_keys[raw] = (k.vm, key)
        return vk

    def close(self):
        self.bpf.cleanup()


def vcpu_mmap_size():
    """The size VMMs map a vCPU fd with (0 if /dev/kvm will not say): the
    BPF side knows a vCPU's kvm_run mapping by it."""
    try:
        with kvmapi.system_fd() as fd:
            return max(fcntl.ioctl(fd, kvmapi.KVM_GET_VCPU_MMAP_SIZE, 0), 0)
    except OSError:
        return 0


def running_pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def holds_kvm_vm(pid):
    """Whether a process holds a KVM VM file descriptor right now."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vm":
                return True
    except OSError:
        pass
    return False


def process_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def vcpu_run_mappings(pid):
    """{vcpu fd: address of its kvm_run} of a running process, from
    /proc/PID/fd (anon_inode:kvm-vcpu:N) and /proc/PID/maps (the mapping of
    that inode at offset 0)."""
    fds = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("anon_inode:kvm-vcpu:"):
                fds.setdefault(target, []).append(int(fd))   # dup()s share it
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return {}
    runs = {}
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] in fds and int(parts[2], 16) == 0:
            for fd in fds[parts[5]]:
                runs.setdefault(fd, int(parts[0].split("-")[0], 16))
    return runs


def _unsettled(t):
    """A traced thread's slot holds an access begun before the end of the
    session whose path its thread has not yet settled."""
    return t.tid and t.traced and t.pending and not t.pend_late


def _items(table):
    """All entries; one syscall per batch where the kernel can (5.6+), not
    two per key."""
    try:
        return list(table.items_lookup_batch())
    except Exception:       # older kernels: EINVAL/ENOTSUPP from the batch op
        return list(table.items())


def merge_latency(a, b):
    """Two LatencyStats of one key as one (either may be None)."""
    if a is None or b is None:
        return a or b
    return LatencyStats(a.count + b.count, a.sum_ns + b.sum_ns, max(a.max_ns, b.max_ns),
                        [x + y for x, y in zip(a.slots, b.slots, strict=True)])


def _access_key(k):
    return keys.AccessKey(k.pid, keys.Space(k.space), k.addr, k.size, keys.Op(k.op),
                          keys.Path(k.path), k.layout)
