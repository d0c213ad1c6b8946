"""A tracing session: what to trace (-p PIDs, -- CMD, or every VM), for how
long, and stopping cleanly on the end of CMD, -d, the targets' exit, Ctrl-C
or SIGTERM.  Shared by every command that traces.

QEMU targets get more: the BPF mirror of QEMU's memory map on their binary,
and a QMP side channel (our own monitor in wrapper mode, --qmp in attach
mode) for the map at attach and at the end."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from .attach import seed_held_vms
from .errors import UserError
from .probes import Tracer, holds_kvm_vm
from .qemu import binary as qemu_binary
from .qemu import control as qemu_control
from .qemu.control import QemuControl
from .qemu.layout import LayoutHistory
from .recording import Recording, VmFacts


def validate_pids(pids):
    for pid in pids:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise UserError(f"no process with pid {pid}")


def resolve_command(cmd):
    """The executable CMD runs, or a one-line error."""
    exe = cmd[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise UserError(f"command not found or not executable: {exe}")
        return os.path.realpath(exe)
    found = shutil.which(exe)
    if found is None:
        raise UserError(f"command not found: {exe}")
    return os.path.realpath(found)


def process_exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


class Session:
    def __init__(self, pids=(), cmd=(), duration=None, qmp=None, events=None, log=None,
                 child_stdio=None, per_vcpu=False, exits=True):
        """events: event mode, the first N accesses one by one (record).
        per_vcpu: count and time per vCPU thread (stat --per-vcpu).
        exits: count exits by reason too (off: --no-exits).
        child_stdio: where CMD's stdin/stdout/stderr go (None: ours; a
        full-screen view passes DEVNULL)."""
        self.pids = list(pids)
        self.events = events
        self.per_vcpu = per_vcpu
        self.exits = exits
        self.child_stdio = child_stdio
        self.cmd = list(cmd)
        self.duration = duration
        self.qmp = qmp
        self.log = log or (lambda msg: print(f"ioregtrace: {msg}", file=sys.stderr))
        validate_pids(self.pids)
        self.exe = resolve_command(self.cmd) if self.cmd else None
        if duration is not None and duration <= 0:
            raise UserError("-d/--duration must be > 0 seconds")
        if qmp is not None and len(self.pids) != 1:
            raise UserError("--qmp needs exactly one -p PID (the QEMU it belongs to)")
        for pid in self.pids:
            if not holds_kvm_vm(pid):
                self.log(f"warning: pid {pid} has no KVM VM open (yet)")
        self.tracer = None
        self.child = None
        self.controls = []           # QemuControl per QEMU target
        self.notes = []
        self.unseeded = {}           # vm serial -> why its registrations at attach are unknown
        self._layout_mark = None
        self.started = None
        self.stopped = None
        self.stop_signal = None        # the signal that ended the session, if one did
        self.end_reason = "-d elapsed"   # why CMD is ended when no signal did it
        self._names = {}                 # vm serial -> QEMU's -name (None: none)
        self.exit_status = 0

    # -- starting -----------------------------------------------------------

    def _qemu_foreseen(self, filtered):
        """Whether a QEMU may be traced (so the map mirror is worth compiling)."""
        candidates = [self.exe] + [process_exe(pid) for pid in self.pids]
        if not filtered:
            candidates += [process_exe(pid) for pid in _running_qemus()]
            candidates += [shutil.which(n) for n in ("qemu-system-x86_64", "qemu-kvm")]
        return any(path and qemu_binary.looks_like_qemu(path) for path in candidates)

    def _qemu_binary(self, path):
        """Mirror QEMU's memory map when the binary allows it; say why not."""
        if path is None or not qemu_binary.looks_like_qemu(path):
            return None
        binary = qemu_binary.inspect(path)
        if binary.mirror_ok:
            try:
                self.tracer.mirror_qemu(binary)
                return binary
            except UserError as e:
                binary.why_not = str(e)
        self.notes.append(f"QEMU memory map not mirrored: {binary.why_not}; region names "
                          "come from QEMU's map at attach and at the end only")
        return binary

    def start(self):
        filtered = bool(self.pids or self.cmd)
        # With -- CMD, trace ourselves until the child is forked: the BPF
        # side follows forks of traced processes, so the child is traced
        # from its first instruction, before it can create its VM.
        initial = self.pids + ([os.getpid()] if self.cmd else [])
        if self.events is not None and self.events <= 0:
            raise UserError("--events must be > 0")
        self.tracer = Tracer(pids=initial if filtered else None, events=self.events,
                             mirror=self._qemu_foreseen(filtered), per_vcpu=self.per_vcpu,
                             exits=self.exits)
        try:
            self._start_targets(filtered)
        except BaseException:
            self.tracer.close()
            raise
        self.started = time.monotonic()
        return self

    def _start_targets(self, filtered):
        binaries = {}            # pid -> QemuBinary, for QEMUs running already
        for pid in self.pids:
            binary = binaries[pid] = self._qemu_binary(process_exe(pid))
            if binary is not None or self.qmp is not None:
                self.controls.append(QemuControl.attach(pid, self.qmp, binary, log=self.log))
        if not filtered:
            for pid in _running_qemus():
                binaries[pid] = self._qemu_binary(process_exe(pid))
        # VMs created before now: their registrations, then their accesses.
        self.unseeded, layouts = seed_held_vms(
            self.tracer, {p: b for p, b in binaries.items() if b}, self.log)
        for control in self.controls:
            control.snapshot_at_attach(self._layout_stable, layouts.pop(control.pid, None))
        for pid, layout in layouts.items():        # every VM mode: no QemuControl
            serial = self.tracer.vm_serial(pid)
            if serial is not None:
                self.tracer.histories[serial].base = layout
        what = f"pid(s) {', '.join(map(str, self.pids))}" if self.pids else ""
        if self.cmd:
            binary = self._qemu_binary(self.exe)
            cmd, control = QemuControl.wrap(self.cmd, binary, log=self.log)
            try:
                stdio = self.child_stdio
                self.child = subprocess.Popen(cmd, stdin=stdio, stdout=stdio, stderr=stdio)
            except OSError as e:
                raise UserError(f"cannot run {self.cmd[0]}: {e.strerror}") from None
            self.tracer.remove_target(os.getpid())
            if control is not None:
                self.controls.append(control)
                control.started(self.child.pid, alive=lambda: self.child.poll() is None)
            what = " and ".join(filter(None, [what, f"{self.cmd[0]} (pid {self.child.pid})"]))
        self.log(f"tracing {what or 'every KVM VM on this host'}"
                 f"{f' for {self.duration:g} s' if self.duration else ''}; Ctrl-C to stop")

    def _layout_stable(self):
        """No QEMU flat view was built since the last call."""
        self.tracer.poll()
        mark, self._layout_mark = self._layout_mark, self.tracer.layout_events
        return mark == self._layout_mark

    # -- running ------------------------------------------------------------

    def done(self):
        if self.duration is not None and time.monotonic() - self.started >= self.duration:
            return True
        if any(c.shutdown_seen.is_set() for c in self.controls):
            return True          # QEMU is paused for us at the guest's shutdown
        if self.child is not None:
            return self.child.poll() is not None
        if self.pids:
            return not any(os.path.exists(f"/proc/{pid}") for pid in self.pids)
        return False

    @contextlib.contextmanager
    def stop_signals(self):
        """An Event that Ctrl-C or SIGTERM sets, while inside the block.

        The handlers only set a flag: an exception raised from a signal can
        land anywhere, including inside BCC's ring-buffer callback, where
        ctypes swallows it and the Ctrl-C would be lost."""
        stop = threading.Event()

        def handler(signum, frame):
            self.stop_signal = signum
            stop.set()
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield stop
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def wait(self, interval=0.1):
        """Block until the session ends.  Ctrl-C and SIGTERM end it too, and
        it still reports."""
        named_at = 0.0
        with self.stop_signals() as stop:
            while not self.done() and not stop.wait(interval):
                self.tracer.poll()
                if time.monotonic() - named_at >= 1.0:     # before a VM exits
                    self.learn_names(self.tracer.snapshot_vms())
                    named_at = time.monotonic()
        if stop.is_set():
            self.log("stopping")
        self.stop()

    def learn_names(self, vms):
        """The -name of every traced QEMU, read from its command line while
        it runs: a QEMU we neither started nor were given (-p) has no QMP
        channel or control of ours, yet the user knows it by that name."""
        for serial, info in vms.items():
            if serial in self._names or info.exited_ns:
                continue
            exe = process_exe(info.pid)
            args = qemu_control.cmdline_of(info.pid) if exe else None
            if args is None:
                continue
            self._names[serial] = (qemu_control.vm_name_from_args(args[1:])
                                   if qemu_binary.looks_like_qemu(exe) else None)

    def stop(self):
        if self.stopped is None:
            self.stopped = time.monotonic()

    def end_command(self):
        """Ask CMD to end (a live view was quit while it still ran)."""
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    # -- reporting ----------------------------------------------------------

    def recording(self, live=False):
        """Everything gathered so far, as a Recording.  Unless `live` (a
        periodic refresh), this also concludes the QEMU side channels (final
        map; lets a paused QEMU exit)."""
        snapshot = self.tracer.snapshot(final=not live)
        vms = {serial: VmFacts(serial, history=history)
               for serial, history in self.tracer.histories.items()}
        notes = list(self.notes)
        traced = {vm for vm, _ in snapshot.accesses}
        notes += [why for serial, why in sorted(self.unseeded.items()) if serial in traced]
        for control in self.controls:
            serial = self.tracer.vm_serial(control.pid) if control.pid else None
            facts = vms.setdefault(serial, VmFacts(serial)) if serial else None
            if facts is not None and facts.history is None:
                facts.history = LayoutHistory()
            if facts is not None:           # before concluding: its regions are read
                facts.history.base = control.base
            if not live:
                control.conclude(facts.history if facts else None)
            notes.extend(control.problems)
            if facts is not None:
                facts.history.base, facts.history.final = control.base, control.final
                facts.name = control.vm_name
                facts.region_ops = control.region_ops
                facts.qemu_version = control.version_string()
                facts.cmdline = control.cmdline
        self.learn_names(snapshot.vms)
        for serial in snapshot.vms:
            facts = vms.get(serial)
            if self._names.get(serial) and (facts is None or facts.name is None):
                vms.setdefault(serial, VmFacts(serial)).name = self._names[serial]
        self.tracer.poll()
        events = self.tracer.raw_events() if self.tracer.events is not None else None
        if events is not None:
            events.lost = snapshot.counters.get("lost_raw_events", 0)
        programs = {name: v for name, v in self.tracer.program_stats().items() if v[0]}
        return Recording(snapshot=snapshot, duration_s=self.elapsed, vms=vms, notes=notes,
                         events=events, probes=self.probe_facts(), bpf_programs=programs)

    def vms_alive(self):
        """How many traced VMM processes are running now."""
        return sum(1 for info in self.tracer.snapshot_vms().values() if not info.exited_ns)

    def probe_facts(self):
        attached = list(self.tracer.attached_probes())
        attached += [f"uprobe:{path}:flatview_add_to_dispatch"
                     for path in self.tracer.mirrored_binaries]
        unavailable = {}
        if not self.tracer.have_fast_mmio:
            unavailable["kvm:kvm_fast_mmio"] = "absent from this kernel (VMX fast path only)"
        if not self.tracer.exits:
            unavailable["kvm:kvm_exit"] = "not attached (--no-exits)"
        elif self.tracer.virt is None:
            unavailable["kvm:kvm_exit"] = ("not attached: the CPU has neither VMX nor SVM, so "
                                           "KVM here (e.g. PVM) never emits it")
        elif not self.tracer.have_kvm_exit:
            unavailable["kvm:kvm_exit"] = "absent from this kernel"
        if not self.tracer.have_ioregion:
            for name in ("kvm:kvm_ioregion_send", "kvm:kvm_ioregion_response"):
                unavailable[name] = ("absent from this kernel (ioregionfd is not upstream; "
                                     "kernel/ has the patches)")
        for note in self.notes:
            if note.startswith("QEMU memory map not mirrored"):
                unavailable["uprobe:flatview_add_to_dispatch"] = note
        return {"attached": attached, "unavailable": unavailable}

    # How long CMD may take to end by itself after a stop (Ctrl-C at a
    # terminal reaches it too), and then after we end it, before SIGKILL.
    GRACE_S = 2.0
    END_S = 10.0

    def finish(self):
        """After reporting: CMD never outlives the session.  When the session
        ended before CMD did (a signal, -d), CMD gets a moment to end by
        itself (Ctrl-C at a terminal reached it too), then is ended: a QEMU
        we wrapped is quit over QMP (with our -no-shutdown it would otherwise
        wait, paused, for a QMP socket that is about to go away), anything
        else gets the signal that stopped us (SIGTERM after -d), and SIGKILL
        if it is still there after END_S.  The exit status is CMD's, or
        128 + the signal that stopped us."""
        if self.child is not None:
            if self.child.poll() is None:
                self._end_command()
            try:
                self.exit_status = self.child.wait()
            except KeyboardInterrupt:
                self.child.kill()
                self.exit_status = self.child.wait()
            if self.exit_status < 0:      # killed by a signal: shell convention
                self.exit_status = 128 - self.exit_status
            if self.stop_signal is not None:
                self.exit_status = 128 + self.stop_signal
        for control in self.controls:
            control.close()
        if self.tracer is not None:
            self.tracer.close()
        return self.exit_status

    def _end_command(self):
        try:
            self.child.wait(timeout=self.GRACE_S)
            return
        except subprocess.TimeoutExpired:
            pass
        why = "interrupted" if self.stop_signal is not None else self.end_reason
        self.log(f"{why}: ending {self.cmd[0]} (pid {self.child.pid})")
        if not any(c.pid == self.child.pid and c.quit() for c in self.controls):
            self.child.send_signal(self.stop_signal or signal.SIGTERM)
        try:
            self.child.wait(timeout=self.END_S)
        except subprocess.TimeoutExpired:
            self.log(f"{self.cmd[0]} (pid {self.child.pid}) did not end in "
                     f"{self.END_S:g} s; killing it")
            self.child.kill()

    @property
    def elapsed(self):
        end = self.stopped if self.stopped is not None else time.monotonic()
        return end - self.started


def _running_qemus():
    for name in os.listdir("/proc"):
        if name.isdigit():
            exe = process_exe(int(name))
            if exe and qemu_binary.looks_like_qemu(exe):
                yield int(name)


