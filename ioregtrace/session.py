"""A tracing session: what to trace (-p PIDs, -- CMD, or every VM), for how
long, and stopping cleanly on the end of CMD, -d, the targets' exit, Ctrl-C
or SIGTERM.  Shared by every command that traces."""

import os
import shutil
import signal
import subprocess
import sys
import time

from .errors import UserError
from .probes import Tracer


class Stop(Exception):
    """SIGTERM, handled like Ctrl-C: stop tracing, still report."""


def validate_pids(pids):
    for pid in pids:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise UserError(f"no process with pid {pid}")


def is_kvm_vm(pid):
    """Whether a process holds a KVM VM file descriptor right now."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vm":
                return True
    except OSError:
        pass
    return False


def validate_command(cmd):
    exe = cmd[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise UserError(f"command not found or not executable: {exe}")
    elif shutil.which(exe) is None:
        raise UserError(f"command not found: {exe}")


class Session:
    def __init__(self, pids=(), cmd=(), duration=None, log=None):
        self.pids = list(pids)
        self.cmd = list(cmd)
        self.duration = duration
        self.log = log or (lambda msg: print(f"ioregtrace: {msg}", file=sys.stderr))
        validate_pids(self.pids)
        if self.cmd:
            validate_command(self.cmd)
        if duration is not None and duration <= 0:
            raise UserError("-d/--duration must be > 0 seconds")
        for pid in self.pids:
            if not is_kvm_vm(pid):
                self.log(f"warning: pid {pid} has no KVM VM open (yet)")
        self.tracer = None
        self.child = None
        self.started = None
        self.stopped = None
        self.exit_status = 0

    def start(self):
        filtered = bool(self.pids or self.cmd)
        # With -- CMD, trace ourselves until the child is forked: the BPF
        # side follows forks of traced processes, so the child is traced
        # from its first instruction, before it can create its VM.
        initial = self.pids + ([os.getpid()] if self.cmd else [])
        self.tracer = Tracer(pids=initial if filtered else None)
        self.started = time.monotonic()
        what = (f"pid(s) {', '.join(map(str, self.pids))}" if self.pids else "")
        if self.cmd:
            try:
                self.child = subprocess.Popen(self.cmd)
            except OSError as e:
                self.tracer.close()
                raise UserError(f"cannot run {self.cmd[0]}: {e.strerror}") from None
            self.tracer.remove_target(os.getpid())
            what = " and ".join(filter(None, [what, f"{self.cmd[0]} (pid {self.child.pid})"]))
        self.log(f"tracing {what or 'every KVM VM on this host'}"
                 f"{f' for {self.duration:g} s' if self.duration else ''}; Ctrl-C to stop")
        return self

    def _done(self):
        if self.duration is not None and time.monotonic() - self.started >= self.duration:
            return True
        if self.child is not None:
            return self.child.poll() is not None
        if self.pids:
            return not any(os.path.exists(f"/proc/{pid}") for pid in self.pids)
        return False

    def wait(self, tick=None, interval=0.1):
        """Block until the session ends; `tick()` is called every interval
        (live views).  Returns normally on Ctrl-C and SIGTERM too."""
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            while not self._done():
                time.sleep(interval)
                if tick:
                    tick()
        except (KeyboardInterrupt, Stop):
            self.log("stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.stopped = time.monotonic()

    def finish(self):
        """After reporting: collect CMD's exit status (CMD got the same
        Ctrl-C from the terminal; give it a moment to exit)."""
        if self.child is not None:
            try:
                self.exit_status = self.child.wait(timeout=None if self.duration else 10)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.exit_status = 130
            if self.exit_status < 0:      # killed by a signal: shell convention
                self.exit_status = 128 - self.exit_status
        if self.tracer is not None:
            self.tracer.close()
        return self.exit_status

    @property
    def elapsed(self):
        end = self.stopped if self.stopped is not None else time.monotonic()
        return end - self.started


def _raise_stop(signum, frame):
    raise Stop()
