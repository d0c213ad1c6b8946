"""A small QMP client: commands with timeouts, and events kept for whoever
waits on them.  One reader thread owns the socket."""

import json
import queue
import socket
import threading
import time


class QmpError(Exception):
    """QMP could not be reached or refused a command; str() is one line."""


class Qmp:
    def __init__(self, path, connect_timeout=10.0, alive=None):
        """Connect to a QMP unix socket, retrying until it appears (a QEMU
        just started creates it a moment later) or `alive()` says the QEMU
        process is gone."""
        self.path = path
        self.events = []
        self._cond = threading.Condition()
        self._replies = queue.Queue()
        self._closed = False
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if alive is not None and not alive():
                    raise QmpError(f"QEMU exited before its QMP socket {path} answered") \
                        from None
                if time.monotonic() >= deadline:
                    raise QmpError(f"QMP socket {path}: {e.strerror}") from None
                time.sleep(0.02)
            except OSError as e:
                sock.close()
                raise QmpError(f"QMP socket {path}: {e.strerror}") from None
        self.sock = sock
        self._file = sock.makefile("rb")
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader",
                                        daemon=True)
        self._reader.start()
        greeting = self._reply(connect_timeout)
        if "QMP" not in greeting:
            raise QmpError(f"{path} is not a QMP socket (no greeting)")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.command("qmp_capabilities")

    def _read_loop(self):
        try:
            for line in self._file:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    with self._cond:
                        self.events.append(msg)
                        self._cond.notify_all()
                else:
                    self._replies.put(msg)
        except (OSError, ValueError):
            pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._replies.put(None)

    def _reply(self, timeout):
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise QmpError(f"QMP socket {self.path}: no answer in {timeout:g} s") from None
        if msg is None:
            raise QmpError(f"QMP socket {self.path} closed (QEMU exited?)")
        return msg

    def command(self, name, timeout=10.0, **arguments):
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP socket {self.path}: {e.strerror}") from None
        reply = self._reply(timeout)
        if "error" in reply:
            err = reply["error"]
            raise QmpError(f"QMP {name}: {err.get('class', 'error')}: {err.get('desc', '')}")
        return reply.get("return")

    def hmp(self, command_line, timeout=10.0):
        return self.command("human-monitor-command", timeout=timeout,
                            **{"command-line": command_line})

    def wait_event(self, names, timeout=None):
        """The first event in `names` not yet consumed, or None on timeout or
        when the socket closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for i, ev in enumerate(self.events):
                    if ev["event"] in names:
                        return self.events.pop(i)
                if self._closed:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    @property
    def closed(self):
        return self._closed

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
