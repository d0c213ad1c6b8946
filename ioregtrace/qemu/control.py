"""ioregtrace's side channel to one QEMU process.

Wrapper mode (`-- qemu-system-x86_64 ARGS`): ioregtrace appends its own QMP
monitor (a unix socket in a private 0700 directory, removed afterwards) and,
unless the user asked for it already, `-no-shutdown`: when the guest shuts
down, QEMU then pauses instead of exiting, ioregtrace reads the final memory
map (and how QEMU splits accesses) and sends `quit` itself.  So a guest that
exits within a second still gets its map read.  The user's own arguments,
monitors and sockets are left as they are.

Attach mode (`-p PID --qmp SOCKET`): the user's QMP socket, read at attach
(the layout before any mirrored change) and at the end.
"""

import os
import shutil
import tempfile
import threading

from . import mtree, ops
from .binary import looks_like_qemu
from .qmp import Qmp, QmpError


def _has_option(args, name):
    return any(a in (f"-{name}", f"--{name}") for a in args)


def cmdline_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def vm_name_from_args(args):
    """-name NAME or -name guest=NAME,...: what the user calls the VM."""
    for i, a in enumerate(args[:-1]):
        if a in ("-name", "--name"):
            value = args[i + 1]
            for part in value.split(","):
                if part.startswith("guest="):
                    return part[len("guest="):]
            first = value.split(",")[0]
            return None if "=" in first else first
    return None


class QemuControl:
    def __init__(self, pid=None, qmp_path=None, owns_shutdown=False, tmpdir=None,
                 binary=None, log=None):
        self.pid = pid
        self.qmp_path = qmp_path
        self.owns_shutdown = owns_shutdown
        self.tmpdir = tmpdir
        self.binary = binary          # qemu.binary.QemuBinary, or None
        self.log = log or (lambda msg: None)
        self.qmp = None
        self.vm_name = None
        self.version = None           # QMP greeting's {"major", "minor", "micro"}
        self.cmdline = None           # QEMU's argv, when known
        self.base = None              # FlatLayout at attach (before mirrored changes)
        self.final = None             # FlatLayout when tracing stopped
        self.problems = []            # one line each, for the report's notes
        self.region_ops = {}          # region name -> ops.RegionOps
        self.shutdown_seen = threading.Event()
        self._concluded = False
        self._lock = threading.Lock()

    # -- wrapper mode -------------------------------------------------------

    @classmethod
    def wrap(cls, cmd, binary=None, log=None):
        """(command to run, QemuControl) for a QEMU command line; (cmd, None)
        for anything else."""
        if not looks_like_qemu(cmd[0]):
            return cmd, None
        tmpdir = tempfile.mkdtemp(prefix="ioregtrace-qmp-")     # mode 0700
        sock = os.path.join(tmpdir, "qmp.sock")
        extra = ["-qmp", f"unix:{sock},server=on,wait=off"]
        owns = not _has_option(cmd[1:], "no-shutdown")
        if owns:
            extra.append("-no-shutdown")
        control = cls(qmp_path=sock, owns_shutdown=owns, tmpdir=tmpdir, binary=binary,
                      log=log)
        control.vm_name = vm_name_from_args(cmd[1:])
        control.cmdline = list(cmd) + extra
        return list(cmd) + extra, control

    def started(self, pid, alive):
        """QEMU runs as `pid`: connect, and watch for the guest's shutdown."""
        self.pid = pid
        if not self._connect(alive):
            return
        threading.Thread(target=self._watch_shutdown, name="qemu-shutdown",
                         daemon=True).start()

    def _watch_shutdown(self):
        """With our -no-shutdown, QEMU pauses at the guest's shutdown (and at
        a host signal) and waits for us.  The session notices shutdown_seen
        and concludes; if it has already stopped tracing (-d), let QEMU go
        from here."""
        event = self.qmp.wait_event({"SHUTDOWN"})
        if event is None:
            return
        with self._lock:
            self.shutdown_seen.set()
            if self._concluded and self.owns_shutdown:
                self._quit()

    # -- attach mode --------------------------------------------------------

    @classmethod
    def attach(cls, pid, qmp_path, binary=None, log=None):
        control = cls(pid=pid, qmp_path=qmp_path, binary=binary, log=log)
        control.cmdline = cmdline_of(pid)
        if control.cmdline:
            control.vm_name = vm_name_from_args(control.cmdline[1:])
        if qmp_path is None:
            return control
        # The user's socket exists already: no need to wait for it to appear.
        control._connect(alive=lambda: os.path.exists(f"/proc/{pid}"), timeout=2.0)
        return control

    def snapshot_at_attach(self, stable, read=None):
        """The memory map as it is now, for accesses made before the first
        mirrored change.  `stable()` says whether no flat view was built
        since it was last asked (QMP answers under QEMU's big lock, so a
        change in flight finishes first); retried until one is clean.
        Without QMP, `read`: the map read from QEMU's memory at attach
        (attach.seed_held_vms), if it could be."""
        if self.qmp is None:
            self.base = read
            if read is None:
                self.problems.append(
                    f"pid {self.pid}: no --qmp socket given and QEMU's memory map could not "
                    "be read at attach, so its region names are only known for changes "
                    "made after attach")
            return
        for _ in range(5):
            stable()
            layout = self._snapshot("at attach")
            if layout is None or stable():
                self.base = layout
                return
        self.problems.append("QEMU's memory map kept changing while ioregtrace read it at "
                             "attach; accesses before the first change are named by address")

    # -- common -------------------------------------------------------------

    def _connect(self, alive, timeout=10.0):
        try:
            self.qmp = Qmp(self.qmp_path, connect_timeout=timeout, alive=alive)
        except QmpError as e:
            self.problems.append(f"QEMU region names from QMP unavailable: {e}")
            self.log(f"warning: {e}")
            return False
        self.version = self.qmp.version
        try:
            name = (self.qmp.command("query-name") or {}).get("name")
            self.vm_name = name or self.vm_name
        except QmpError:
            pass
        return True

    def _snapshot(self, when):
        try:
            text = self.qmp.hmp("info mtree -f")
        except QmpError as e:
            self.problems.append(f"QEMU's memory map {when} could not be read: {e}")
            return None
        layout, unknown = mtree.parse(text)
        if unknown:
            self.problems.append(
                f"QEMU's info mtree -f {when} has {len(unknown)} line(s) ioregtrace does "
                f"not understand, first: {unknown[0].strip()!r}")
        return layout

    def conclude(self, history):
        """The session stops tracing: read the final map and how QEMU splits
        accesses while QEMU still runs; if the guest has shut down, let QEMU
        exit.  `history`: this VM's mirrored layouts, with the last events
        consumed."""
        with self._lock:
            if self._concluded:
                return
            self._concluded = True
            if self.qmp is None or self.qmp.closed:
                if self.qmp is not None:
                    self.problems.append("QEMU exited before its final memory map was "
                                         "read; the mirror is unchecked")
                elif os.path.exists(f"/proc/{self.pid}"):
                    self._read_region_ops(history)     # attached: QEMU's memory only
                return
            self.final = self._snapshot("at the end")
            self._read_region_ops(history)
            if self.shutdown_seen.is_set() and self.owns_shutdown:
                self._quit()

    def _read_region_ops(self, history):
        """How QEMU splits and refuses accesses, region by region, read from
        its memory (the regions of `history`)."""
        if self.binary is not None and self.pid and history is not None:
            self.region_ops = ops.read_region_ops(self.pid, self.binary, history,
                                                  self.problems)

    def _quit(self):
        try:
            self.qmp.command("quit")
        except QmpError:
            pass          # it is exiting either way

    def quit(self):
        """Make QEMU exit now (the session was stopped before it).  False
        if there is no QMP connection to ask over."""
        with self._lock:
            if self.qmp is None or self.qmp.closed:
                return False
            self._quit()
            return True

    def version_string(self):
        v = self.version or {}
        return "{major}.{minor}.{micro}".format(**v) if {"major", "minor", "micro"} <= set(v) \
            else None

    def close(self):
        if self.qmp is not None:
            self.qmp.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
