"""ioregtop's loop, keys and command line, driven by a scripted screen and
a session that needs no BPF (tests/integration/test_top.py has the real
terminal)."""

import contextlib
import io
import re
import sys
import threading

import pytest

from ioregtrace import cli, session as session_mod
from ioregtrace.errors import UserError
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import RawSnapshot, VmInfo
from ioregtrace.recording import Recording
from ioregtrace.views import top

KEY = AccessKey(10, Space.MMIO, 0x1000, 4, Op.READ, Path.USERSPACE)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSession:
    """A VM (pid 10) whose guest makes 100 accesses per refresh."""

    def __init__(self, clock, end_at=None):
        self.clock = clock
        self.end_at = end_at
        self.refreshed_at = []
        self.tracer = type("Tracer", (), {"poll": lambda self: None})()

    def recording(self, live=False):
        if live:
            self.refreshed_at.append(self.clock.now)
        snap = RawSnapshot(taken=self.clock.now, vms={1: VmInfo(10, 1, True, "qemu")},
                           accesses={(1, KEY): 100 * (len(self.refreshed_at) + 1)},
                           counters={"lost_events": 0, "dropped_accesses": 0})
        return Recording(snapshot=snap, duration_s=max(self.clock.now, 0.1))

    def vms_alive(self):
        return 1

    def done(self):
        return self.end_at is not None and self.clock.now >= self.end_at

    @contextlib.contextmanager
    def stop_signals(self):
        stop = threading.Event()
        # Waiting is the clock's 100 ms step (batch mode waits on it).
        stop.wait = lambda timeout: self.clock.__setattr__("now", self.clock.now + 0.1)
        yield stop


class Screen:
    """80x24; getch() plays `script` (None: no key for the 100 ms timeout)
    and moves the clock.  getstr() types the script's keys up to Enter as a
    blocking curses getstr() would, the clock running on meanwhile."""

    def __init__(self, clock, script):
        self.clock, self.script = clock, list(script)
        self.rows = [""] * 24
        self.bottoms = []            # (time, bottom line) of every screen drawn
        self.keys = []               # (time, key) of every key played
        self.filters = []            # the group/sort/pid line of every screen drawn

    def getmaxyx(self):
        return 24, 80

    def erase(self):
        self.rows = [""] * 24

    def addstr(self, y, x, text, attr=0):
        self.rows[y] = self.rows[y][:x] + text

    def refresh(self):
        self.bottoms.append((self.clock.now, self.rows[23]))
        self.filters.append(self.rows[2])

    def timeout(self, ms):
        pass

    def _next(self):
        self.clock.now += 0.1
        if not self.script:
            return ord("q")
        ch = self.script.pop(0)
        ch = -1 if ch is None else (ord(ch) if isinstance(ch, str) else ch)
        self.keys.append((self.clock.now, ch))
        return ch

    def getch(self):
        return self._next()

    def getstr(self, y, x, n):
        typed = ""
        while True:
            ch = self._next()
            if ch in (10, 13):
                return typed.encode()
            if ch != -1:
                typed += chr(ch)


@pytest.fixture
def fake_curses(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(top.time, "monotonic", clock)
    for name in ("curs_set", "echo", "noecho"):
        monkeypatch.setattr(top.curses, name, lambda *a: None)
    screens = []
    monkeypatch.setattr(top.curses, "wrapper", lambda fn: fn(screens[-1]))
    return clock, screens


def test_the_view_goes_on_while_the_pid_prompt_is_open(fake_curses):
    """Issue 16, defect 12: while the `p` prompt was open the screen froze
    (a blocking getstr)."""
    clock, screens = fake_curses
    session = FakeSession(clock)
    typing = ["p", "1"] + [None] * 20 + ["0", 10]     # 2 s to type "10", then Enter
    screens.append(Screen(clock, [None] * 5 + typing))
    view = top.run(session, interval=1.0)
    opened = next(t for t, ch in screens[0].keys if ch == ord("p"))
    entered = next(t for t, ch in screens[0].keys if ch == 10)
    assert [t for t in session.refreshed_at if opened < t < entered], "refreshed while typing"
    assert any("pid (empty: all, Esc: cancel): 1_" in line for _, line in screens[0].bottoms)
    assert view.model.pid == 10 and view.quit_pressed


def test_a_pid_no_traced_vm_has_is_refused_in_words(fake_curses):
    """Issue 16, defect 12: input that names no traced VM was taken
    silently, hiding every row (and pid 0 showed `pid: all`)."""
    clock, screens = fake_curses
    for answer, message in (("99", "pid 99 is not a traced VM (traced: 10 qemu)"),
                            ("0", "not a pid: '0'"), ("abc", "not a pid: 'abc'")):
        screens.append(Screen(clock, [None] * 3 + ["p", "1", "0", 10, "p", *answer, 10,
                                                   None]))
        top.run(FakeSession(clock), interval=1.0)
        assert "pid: 10 " in screens[-1].filters[-1], answer    # the filter as it was
        assert any(line == message for _, line in screens[-1].bottoms), (answer, message)

    screens.append(Screen(clock, [None] * 3 + ["p", "1", "0", 10, "p", 27, None]))
    top.run(FakeSession(clock), interval=1.0)
    assert "pid: 10 " in screens[-1].filters[-1]                # Esc: as it was
    screens.append(Screen(clock, [None] * 3 + ["p", "1", "0", 10, "p", 10, None]))
    top.run(FakeSession(clock), interval=1.0)
    assert "pid: all " in screens[-1].filters[-1]               # empty: all


def frames_of(text):
    """Batch output as its frames (each starts with the ioregtop line)."""
    return [f for f in re.split(r"(?m)^(?=ioregtop )", text) if f]


def run_main(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv, command=cli.top, prog_name="ioregtop")
    return e.value.code


def test_batch_frames_and_the_final_table(monkeypatch, capsys):
    """Issue 16, defect 7: `ioregtop -b` writes plain-text frames without a
    terminal, -n N of them; when CMD ends by itself the final table is
    printed (it vanished with the view)."""
    clock = Clock()
    monkeypatch.setattr(top.time, "monotonic", clock)
    sessions = []

    class Session(FakeSession):
        def __init__(self, **kwargs):
            super().__init__(clock, end_at=kwargs.pop("end_at", None))
            self.ended = False
            sessions.append(self)

        def start(self):
            return self

        def end_command(self):
            self.ended = True

        def stop(self):
            pass

        def finish(self):
            return 3                         # CMD's exit status

    monkeypatch.setattr(session_mod, "Session", Session)
    monkeypatch.setattr(sys, "stdout", io.StringIO())      # not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert run_main(["-b", "-i", "0.5", "-n", "3", "--", "true"]) == 0
    text = sys.stdout.getvalue()
    frames = frames_of(text)
    assert len(frames) == 3 and all(f.endswith("\n\n") for f in frames[:2])
    assert all(len(line) < 100 for line in text.splitlines())
    assert [line.split()[1] for line in frames[2].splitlines()[5:]] == ["mmio@0x1000"]
    assert sessions[0].ended, "-n ends CMD, as q does"
    assert "ended after" not in text

    # CMD ends at 1.2 s: frames, then the final table, and CMD's status.
    sys.stdout = io.StringIO()
    monkeypatch.setattr(session_mod, "Session",
                        lambda **kw: Session(end_at=clock.now + 1.2, **kw))
    assert run_main(["-b", "-i", "0.5", "--", "true"]) == 3
    frames = frames_of(sys.stdout.getvalue())
    assert "ended after" in frames[-1].splitlines()[0] and len(frames) >= 3
    assert not sessions[-1].ended


def test_the_final_table_follows_the_live_view(fake_curses, monkeypatch):
    clock, screens = fake_curses

    class Session(FakeSession):
        def __init__(self, **kwargs):
            super().__init__(clock, end_at=clock.now + 1.5)

        def start(self):
            return self

        def stop(self):
            pass

        def finish(self):
            return 0

    out = io.StringIO()
    out.isatty = lambda: True
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(session_mod, "Session", Session)
    screens.append(Screen(clock, [None] * 100))
    assert run_main(["--", "true"]) == 0
    text = out.getvalue()
    assert text.startswith("ioregtop ") and "ended after" in text.splitlines()[0]
    assert "mmio@0x1000" in text


def test_it_says_it_is_compiling_before_the_seconds_that_takes(monkeypatch, capsys):
    """Issue 16, defect 7: the screen stayed blank for the 15 s the BPF
    compile takes on a loaded machine."""
    class Session:
        def __init__(self, **kwargs):
            pass

        def start(self):
            print("SESSION STARTS", file=sys.stderr)
            raise UserError("no tracer in this test")

    monkeypatch.setattr(session_mod, "Session", Session)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_main(["--", "true"]) == 1
    err = capsys.readouterr().err
    assert "compiling and attaching the tracer" in err
    assert err.index("compiling") < err.index("SESSION STARTS")
