"""ioregtop: the live, top-like view.

TopModel holds everything but the screen (interval deltas, grouping,
sorting, the pid filter) so it can be tested without a terminal; draw()
and run() are the curses part.  Every `interval` the maps are read once;
rates and latency quantiles are for the last interval, totals since start.
"""

import curses
import dataclasses
import os
import platform
import time

from ..keys import Path
from ..probes import LatencyStats, RawSnapshot
from ..recording import render

SORTS = ("rate", "total", "p99", "name")
GROUPS = ("region", "address", "path")
HELP = (
    "ioregtop keys",
    "",
    "  q      quit",
    "  s      sort by the next column: rate, total, p99, name",
    "  g      group rows by region, address, or path only",
    "  p      show one pid only (empty: all)",
    "  space  pause / resume",
    "  h      this help (any key closes it)",
    "",
    "Rows: one per VM x region x path.  RATE/s and P50/P99 (userspace and",
    "ioregionfd round trips, microseconds, upper bounds) are for the last interval;",
    "TOTAL and % since start.",
)


@dataclasses.dataclass
class TopRow:
    pid: int
    who: str
    label: str            # region, address, or "-" when grouped by path
    path: str
    ops: str              # R, W or RW
    rate: float
    total: int
    share: float
    p50_us: float = None
    p99_us: float = None


def delta(cur, prev):
    """cur - prev, key by key (new keys count in full)."""
    d = RawSnapshot(taken=cur.taken, vms=cur.vms, counters=cur.counters,
                    registrations=cur.registrations)
    for k, n in cur.accesses.items():
        diff = n - prev.accesses.get(k, 0)
        if diff > 0:
            d.accesses[k] = diff
    for k, s in cur.latencies.items():
        p = prev.latencies.get(k)
        if p is None:
            d.latencies[k] = s
        elif s.count > p.count:
            d.latencies[k] = LatencyStats(s.count - p.count, s.sum_ns - p.sum_ns, s.max_ns,
                                          [a - b for a, b in zip(s.slots, p.slots, strict=True)])
    return d


class TopModel:
    def __init__(self, group="region", sort="rate"):
        self.group = group
        self.sort = sort
        self.pid = None
        self.paused = False
        self.rows = []
        self.rate = 0.0
        self.total = 0
        self.lost = self.dropped = 0
        self.vms = 0
        self._prev = None
        self._prev_t = None

    def refresh(self, recording, now, vms_alive=None):
        cur = recording.snapshot
        if self._prev is None:
            interval, recent = max(recording.duration_s, 1e-3), cur
        else:
            interval, recent = max(now - self._prev_t, 1e-3), delta(cur, self._prev)
        by = f"top-{self.group}"
        totals = render(recording, by=by)
        last = {r.group: r for r in render(dataclasses.replace(
            recording, snapshot=recent, duration_s=interval), by=by).rows}
        grand = totals.total or 1
        self.rows = []
        for r in totals.rows:
            i = last.get(r.group)
            lat = i.latency if i is not None else None
            if self.group == "path":
                label = "-"
            elif self.group == "address":
                label = f"{r.key.space}@{r.key.address:#x}"
            else:
                label = r.region if r.region is not None else "(unassigned)"
            self.rows.append(TopRow(
                pid=r.key.pid, who=r.vm_name or r.comm, label=label, path=str(r.key.path),
                ops="".join(sorted(str(op)[0].upper() for op in r.ops)),
                rate=(i.count / interval) if i is not None else 0.0, total=r.count,
                share=100.0 * r.count / grand,
                p50_us=lat.p50_us if lat else None, p99_us=lat.p99_us if lat else None))
        self.rate = sum(r.rate for r in self.rows)
        self.total = totals.total
        self.lost, self.dropped = totals.lost_events, totals.dropped_keys
        self.vms = vms_alive if vms_alive is not None else len(cur.vms)
        self._prev, self._prev_t = cur, now

    def visible(self):
        rows = [r for r in self.rows if self.pid is None or r.pid == self.pid]
        key = {"rate": lambda r: (-r.rate, -r.total, r.label),
               "total": lambda r: (-r.total, -r.rate, r.label),
               "p99": lambda r: (-(r.p99_us or -1), -r.rate, r.label),
               "name": lambda r: (r.label, r.path, r.pid)}[self.sort]
        return sorted(rows, key=key)

    def cycle_sort(self):
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]

    def cycle_group(self):
        self.group = GROUPS[(GROUPS.index(self.group) + 1) % len(GROUPS)]
        self._prev = None          # rates restart with the new grouping


# -- the screen -----------------------------------------------------------------

NUMERIC = (("RATE/s", 8), ("TOTAL", 9), ("%", 5), ("P50us", 7), ("P99us", 7))
# The PATH column holds the longest path name (`unattributed`), so that no
# row pushes the numbers out of their columns.
PATH_WIDTH = max(len(str(p)) for p in Path)


def _fit(text, width):
    """`text` in `width` columns.  A long name is cut in the middle, not at
    the end: region names differ at the end (ioeventfd@0x10002000 and
    ioeventfd@0x10002004), and cut there two rows would read the same."""
    text = str(text)
    if len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "~" + text[len(text) - tail:]


def _us(v):
    return "-" if v is None else f"{v:.1f}"


def layout(width):
    """Column widths for a terminal `width` wide: numbers fixed, REGION gets
    what is left; the VM name column only when there is room for both (the
    header names the VMs anyway)."""
    fixed = 7 + PATH_WIDTH + 1 + 3 + sum(n + 1 for _, n in NUMERIC)   # pid, path, op, numbers
    left = max(8, width - 1 - fixed)
    who = min(16, left // 3) if left >= 40 else 0
    return {"who": who, "label": left - who - (1 if who else 0)}


def lines(model, width, height, status):
    """The screen as text lines (the curses part only paints them)."""
    w = layout(width)
    host, kernel = platform.node(), platform.release()
    names = ", ".join(f"{pid} {who}" for pid, who in sorted({(r.pid, r.who)
                                                               for r in model.rows}))
    out = [f"ioregtop  {host}  kernel {kernel}  {status}  {time.strftime('%H:%M:%S')}",
           f"accesses/s: {model.rate:.0f}  total: {model.total}  lost: {model.lost}  "
           f"dropped: {model.dropped}  VMs: {model.vms} ({names or 'none yet'})",
           f"group: {model.group}  sort: {model.sort}  pid: {model.pid or 'all'}"
           "   h help  q quit", ""]
    who = lambda text: f"{_fit(text, w['who']):<{w['who']}} " if w["who"] else ""  # noqa: E731
    header = (f"{'PID':>6} {who('VM')}{'REGION':<{w['label']}} {'PATH':<{PATH_WIDTH}} "
              f"{'OP':<2} " + " ".join(f"{name:>{n}}" for name, n in NUMERIC))
    out.append(header)
    rows = model.visible()
    for r in rows[:max(0, height - len(out) - 1)]:
        out.append(f"{r.pid:>6} {who(r.who)}{_fit(r.label, w['label']):<{w['label']}} "
                   f"{r.path:<{PATH_WIDTH}} {r.ops:<2} {r.rate:>8.1f} {r.total:>9} {r.share:>5.1f} "
                   f"{_us(r.p50_us):>7} {_us(r.p99_us):>7}")
    if not rows:
        out.append("(no guest device accesses yet)" if model.pid is None
                   else f"(no rows for pid {model.pid})")
    return [line[:max(0, width - 1)] for line in out[:height]]


def draw(scr, model, status, message="", help_shown=False):
    height, width = scr.getmaxyx()
    scr.erase()
    text = HELP if help_shown else lines(model, width, height - 1, status)
    for y, line in enumerate(text[:height - 1]):
        attr = curses.A_REVERSE if (not help_shown and y == 4) else curses.A_NORMAL
        scr.addstr(y, 0, line[:max(0, width - 1)], attr)
    if message:
        scr.addstr(height - 1, 0, message[:max(0, width - 1)])
    scr.refresh()


def _ask_pid(scr):
    height, width = scr.getmaxyx()
    prompt = "pid (empty: all): "
    scr.addstr(height - 1, 0, " " * (width - 1))
    scr.addstr(height - 1, 0, prompt)
    curses.echo()
    scr.timeout(-1)
    try:
        text = scr.getstr(height - 1, len(prompt), 12).decode(errors="replace").strip()
    finally:
        curses.noecho()
    if not text:
        return None, ""
    if text.isdigit():
        return int(text), ""
    return "keep", f"not a pid: {text}"


def run(session, interval):
    """The live view until q, Ctrl-C, or the end of the session.  Returns
    True when the user quit."""
    model = TopModel()
    quit_pressed = [False]

    def loop(scr):
        curses.curs_set(0)
        scr.timeout(100)
        next_refresh, message, help_shown = 0.0, "", False
        with session.stop_signals() as stop:
            while not stop.is_set() and not session.done():
                now = time.monotonic()
                if now >= next_refresh and not model.paused:
                    model.refresh(session.recording(live=True), now, session.vms_alive())
                    next_refresh = now + interval
                session.tracer.poll()
                status = "PAUSED" if model.paused else "tracing"
                draw(scr, model, status, message, help_shown)
                ch = scr.getch()
                if ch == -1 or ch == curses.KEY_RESIZE:
                    continue
                message = ""
                if help_shown:
                    help_shown = False
                elif ch in (ord("q"), ord("Q")):
                    quit_pressed[0] = True
                    return
                elif ch == ord("s"):
                    model.cycle_sort()
                elif ch == ord("g"):
                    model.cycle_group()
                    next_refresh = 0.0
                elif ch == ord(" "):
                    model.paused = not model.paused
                elif ch == ord("h"):
                    help_shown = True
                elif ch == ord("p"):
                    pid, message = _ask_pid(scr)
                    if pid != "keep":
                        model.pid = pid
                    scr.timeout(100)

    os.environ.setdefault("ESCDELAY", "25")
    # Follow the terminal's real size as it changes, not LINES/COLUMNS
    # inherited from whatever started us.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    curses.wrapper(loop)
    return quit_pressed[0]
