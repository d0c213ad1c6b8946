"""ioregtop: the live, top-like view.

TopModel holds everything but the screen (interval deltas, grouping,
sorting, the pid filter) and LiveView what the clock and the keys do, so
both can be tested without a terminal; draw() and run() are the curses
part, batch() the plain-text frames of `ioregtop -b`.  Every `interval`
the maps are read once; rates and latency quantiles are for the last
interval, totals since start.
"""

import collections
import curses
import dataclasses
import os
import platform
import time

from .. import exits as exits_mod
from .. import histogram
from ..keys import Path, Space
from ..interval import latency_since
from ..recording import naming
from ..regions import FallbackNamer
from ..report import latency_of, merge_stats, region_of

SORTS = ("rate", "total", "p99", "name")
GROUPS = ("region", "address", "path", "exits")
HELP = (
    "ioregtop keys",
    "",
    "  q      quit",
    "  s      sort by the next column: rate, total, p99, name",
    "  g      group rows by region, address, path only, or exits by reason",
    "  p      show one VM's pid only (empty: all, Esc: cancel)",
    "  space  pause / resume",
    "  h      this help (any key closes it)",
    "",
    "Rows: one per VM x region x path.  RATE/s and P50/P99 (userspace and",
    "ioregionfd round trips, microseconds, upper bounds) are for the last interval;",
    "TOTAL and % since start.  Grouped by exits: a row per VM x exit reason,",
    "PATH hardware (kvm:kvm_exit; P50/P99: in-kernel handling) or userspace",
    "(KVM_RUN returns; P50/P99: the VMM's round trip).",
)


@dataclasses.dataclass
class TopRow:
    pid: int
    who: str
    label: str            # region, address, or "-" when grouped by path
    path: str
    ops: str              # R, W or RW
    rate: float = 0.0
    total: int = 0
    p50_us: float = None
    p99_us: float = None
    vm: int = 0
    keep: int = 0         # leading characters of `label` never cut (an address)


def _group_of(mode, vm, key, region):
    """Which accesses share a row of the live view."""
    if mode == "region":
        return (vm, key.pid, region, key.path)
    if mode == "address":
        return (vm, key.pid, key.space, key.address, region, key.path)
    return (vm, key.pid, key.path)


def address_label(space, address, sizes, region):
    """`0xa0004:1,2 vga-lowmem`: the address (`pio@0x3c0` for a port),
    the access sizes, and the region's name unless it is only the address
    again (a fallback name).  MMIO goes bare: an 80-column screen leaves the
    column 15 characters.  Returns (label, how many leading characters
    must never be cut)."""
    where = f"{address:#x}" if space == Space.MMIO else f"{space}@{address:#x}"
    text = f"{where}:{','.join(str(s) for s in sorted(sizes))}"
    name = region if region is not None else "(unassigned)"
    same = name in (where, f"{space}@{address:#x}")
    return (text + ("" if same else f" {name}")), len(text)


class RegionNames:
    """Region names of access keys, each key named once.  A key carries its
    memory-map generation, so its name only changes when what names it
    changes: its VM's QEMU map grows (new generations: only keys of those
    generations are named again), a QEMU map arrives over QMP (at attach, at
    the end: all of the VM's keys), or the VM registers an ioeventfd,
    coalesced zone or ioregion (fallback names: all of the VM's keys).
    `calls` counts the keys named, the work that used to be done for every
    key at every refresh."""

    def __init__(self):
        self.calls = 0
        self._names = {}            # vm -> {generation: {key: region name}}
        self._inputs = {}           # vm -> _state() when its names were made
        self._qemu = {}             # vm -> regions.QemuRegions, this refresh's
        self._facts = {}
        self._regs = {}
        self._fallback = FallbackNamer()

    def follow(self, recording):
        """Take a new recording's naming facts; returns the (vm, key)s whose
        names were dropped (to be named again)."""
        self._qemu, _ = naming(recording)
        self._facts = recording.vms
        regs = recording.snapshot.registrations
        self._fallback = FallbackNamer(regs)
        by_vm = collections.defaultdict(set)
        for reg in regs:
            by_vm[reg[0]].add(reg)
        self._regs = {vm: frozenset(r) for vm, r in by_vm.items()}
        dropped = []
        for vm, by_gen in self._names.items():
            old, new = self._inputs.get(vm), self._state(vm)
            if old == new:
                continue
            self._inputs[vm] = new
            if old is None:
                continue
            first = 0 if old[:2] != new[:2] else self._first_changed(vm, old[2])
            for gen in [g for g in by_gen if g >= first]:
                dropped.extend((vm, key) for key in by_gen.pop(gen))
        return dropped

    def _state(self, vm):
        """What the names of the VM's keys are made from, cheaply compared:
        its registrations, which QEMU maps are known, and the length of the
        mirrored history (it only grows)."""
        facts = self._facts.get(vm)
        h = facts.history if facts is not None else None
        if h is None:
            return self._regs.get(vm), None, None
        maps = (vm in self._qemu, id(h.base) if h.base else None,
                id(h.final) if h.final else None)
        shape = tuple((len(v), len(v[-1].ranges) if v else 0) for v in h.views.values())
        return self._regs.get(vm), maps, shape

    def _first_changed(self, vm, old_shape):
        """The first generation whose layout the mirror changed since
        `old_shape` (a new view, or more ranges in the last one)."""
        if old_shape is None:
            return 0
        gens = []
        for views, (n, last) in zip(self._facts[vm].history.views.values(), old_shape,
                                    strict=True):
            if len(views) == n and (n == 0 or len(views[-1].ranges) == last):
                continue
            i = n - 1 if n and len(views[n - 1].ranges) != last else n
            gens.append(views[i].gen)
        return min(gens, default=0)

    def name(self, vm, key):
        names = self._names.setdefault(vm, {}).setdefault(key.layout, {})
        if key not in names:
            self.calls += 1
            names[key] = region_of(vm, key, self._qemu.get(vm), self._fallback)[0]
            if vm not in self._inputs:
                self._inputs[vm] = self._state(vm)
        return names[key]


class _Tally:
    """One row's sums, kept from refresh to refresh."""

    def __init__(self, row):
        self.row = row
        self.ops = collections.Counter()      # op -> accesses
        self.sizes = collections.Counter()    # size -> accesses
        self.interval = 0                     # accesses in the last interval
        self.stats = None                     # round trips in the last interval

    def add(self, key, n):
        self.row.total += n
        self.ops[key.op] += n
        self.sizes[key.size] += n
        for counter in (self.ops, self.sizes):
            for k in [k for k, v in counter.items() if v <= 0]:
                del counter[k]


class TopModel:
    """The rows, updated incrementally: a refresh only looks again at the
    keys whose counts moved since the last one (the maps of one QEMU booting
    SeaBIOS hold tens of thousands of keys, VGA memory over many memory-map
    generations, and few of them move in one interval)."""

    def __init__(self, group="region", sort="rate"):
        self.group = group
        self.sort = sort
        self.pid = None
        self.paused = False
        self.rate = 0.0
        self.total = 0
        self.lost = self.dropped = 0
        self.vms = 0
        self.names = RegionNames()
        self.traced = []              # [(pid, name)] of the VMs with rows
        self._counts = {}             # (vm, key) -> accesses at the last refresh
        self._latencies = {}          # (vm, key) -> LatencyStats at the last refresh
        self._moved = {}              # (vm, key) -> accesses in the last interval
        self._moved_stats = {}        # (vm, key) -> LatencyStats of the last interval
        self._interval = 1.0
        self._prev_t = None
        self._tallies = {}            # group -> _Tally
        self._where = {}              # (vm, key) -> its group
        self._live = set()            # groups with accesses in the last interval
        self._who = {}                # vm -> (pid, name shown)
        self._vm_rows = collections.Counter()   # vm -> its rows
        self._visible = None          # the sorted rows, until something changes
        self._exits = {}              # (vm, ExitKey) -> ExitStats at the last refresh
        self._exit_rows = []          # TopRows of the exits grouping
        self.exit_total = 0

    @property
    def rows(self):
        return [t.row for t in self._tallies.values()]

    def refresh(self, recording, now, vms_alive=None):
        cur = recording.snapshot
        first = self._prev_t is None
        self._interval = max(recording.duration_s if first else now - self._prev_t, 1e-3)
        self._prev_t = now
        self._follow_vms(recording)
        for vk in self.names.follow(recording):
            if vk in self._where:
                self._place(vk, self._counts[vk], -1)
                self._place(vk, self._counts[vk], +1)
        # What moved since the last refresh: a set difference done in C;
        # only these keys are looked at again.
        moved = {}
        for vk, n in cur.accesses.items() - self._counts.items():
            diff = n - self._counts.get(vk, 0)
            self._counts[vk] = n
            if diff > 0:
                moved[vk] = diff
        moved_stats = {}
        for vk, s in cur.latencies.items():
            d = latency_since(self._latencies.get(vk), s)
            if d is not None:
                moved_stats[vk] = d
        self._latencies = cur.latencies
        for vk, n in moved.items():
            self._place(vk, n, +1)
        self.total += sum(moved.values())
        self._moved, self._moved_stats = moved, moved_stats
        self._apply_interval()
        c = cur.counters
        self.lost = c.get("lost_events", 0) + c.get("lost_raw_events", 0)
        self.dropped = c.get("dropped_accesses", 0)
        self.vms = vms_alive if vms_alive is not None else len(cur.vms)
        self._refresh_exits(cur.exits)

    def _refresh_exits(self, cur, whole_session=None):
        """The exits grouping's rows: per VM, kind and reason (vCPUs summed),
        rate and quantiles of the last interval (or, `whole_session`
        seconds, of everything)."""
        totals, moved = {}, {}
        for (vm, key), st in cur.items():
            group = (vm, dataclasses.replace(key, tid=0))
            totals[group] = exits_mod.merge(totals.get(group), st)
            d = st if whole_session else exits_mod.since(self._exits.get((vm, key)), st)
            if d is not None:
                moved[group] = exits_mod.merge(moved.get(group), d)
        self._exits = dict(cur)
        seconds = whole_session or self._interval
        rows = []
        for (vm, key), st in totals.items():
            pid, who = self._who.get(vm, (0, "?"))
            d = moved.get((vm, key))
            row = TopRow(pid=pid, who=who, label=key.name, path=exits_mod.KIND_NAMES[key.kind],
                         ops="", vm=vm, total=st.count,
                         rate=(d.count if d else 0) / seconds)
            if d is not None and d.timed:
                row.p50_us = histogram_us(d, 0.50)
                row.p99_us = histogram_us(d, 0.99)
            rows.append(row)
        self._exit_rows = rows
        self.exit_total = sum(r.total for r in rows)
        self._visible = None

    def conclude(self, recording, now, vms_alive=None):
        """The final table: a last refresh, then every row's rate and
        round-trip quantiles over the whole session (the last interval may
        be a fraction of one)."""
        self.refresh(recording, now, vms_alive)
        duration = max(recording.duration_s, 1e-3)
        stats = {}
        for vk, s in self._latencies.items():
            group = self._where.get(vk)
            if group in self._tallies:
                stats[group] = merge_stats(stats.get(group), s)
        for group, t in self._tallies.items():
            lat = latency_of(stats.get(group))
            t.row.rate = t.row.total / duration
            t.row.p50_us = lat.p50_us if lat else None
            t.row.p99_us = lat.p99_us if lat else None
        self.rate = self.total / duration
        self._refresh_exits(recording.snapshot.exits, whole_session=duration)

    def _follow_vms(self, recording):
        """Who each VM is: its name (from QMP, may come late), else its comm."""
        _, vm_names = naming(recording)
        who = {vm: (info.pid, vm_names.get(vm) or info.comm)
               for vm, info in recording.snapshot.vms.items()}
        if who != self._who:
            for t in self._tallies.values():
                t.row.who = who.get(t.row.vm, (t.row.pid, "?"))[1]
            self._who = who
            self._visible = None

    def _place(self, vk, n, sign):
        """Count n accesses of (vm, key) into their row (sign -1: take them
        out again, before the key is named again or regrouped)."""
        vm, key = vk
        if sign > 0:
            group = _group_of(self.group, vm, key, self.names.name(vm, key))
            self._where[vk] = group
        else:
            group = self._where.pop(vk)
        t = self._tallies.get(group)
        if t is None:
            region = group[-2] if self.group != "path" else None
            self._vm_rows[vm] += 1
            t = self._tallies[group] = _Tally(TopRow(
                pid=key.pid, vm=vm, who=self._who.get(vm, (key.pid, "?"))[1], label="-",
                path=str(key.path), ops=""))
            if self.group == "region":
                t.row.label = region if region is not None else "(unassigned)"
        t.add(key, sign * n)
        if t.row.total <= 0:
            del self._tallies[group]
            self._live.discard(group)
            self._vm_rows[vm] -= 1
            if not self._vm_rows[vm]:
                del self._vm_rows[vm]
        else:
            self._relabel(t, group)
        self._visible = None

    def _relabel(self, t, group):
        t.row.ops = "".join(sorted(str(op)[0].upper() for op in t.ops))
        if self.group == "address":
            _vm, _pid, space, address, region, _path = group
            t.row.label, t.row.keep = address_label(space, address, t.sizes, region)

    def _apply_interval(self):
        """Rates and round-trip quantiles of the last interval: the rows that
        had some then or have some now, not every row."""
        before, self._live = self._live, set()
        for group in before:
            t = self._tallies.get(group)
            if t is not None:
                t.interval, t.stats = 0, None
        for vk, n in self._moved.items():
            group = self._where[vk]
            self._tallies[group].interval += n
            self._live.add(group)
        for vk, d in self._moved_stats.items():
            group = self._where.get(vk)
            if group in self._tallies:
                t = self._tallies[group]
                t.stats = merge_stats(t.stats, d)
                self._live.add(group)
        for group in before | self._live:
            t = self._tallies.get(group)
            if t is None:
                continue
            lat = latency_of(t.stats)
            t.row.rate = t.interval / self._interval
            t.row.p50_us = lat.p50_us if lat else None
            t.row.p99_us = lat.p99_us if lat else None
        self.rate = sum(self._tallies[g].interval for g in self._live) / self._interval
        self.traced = sorted({self._who.get(vm, (0, "?")) for vm in self._vm_rows})
        self._visible = None

    def visible(self):
        if self._visible is None or self._visible[0] != (self.sort, self.pid):
            source = (self._exit_rows if self.group == "exits"
                      else [t.row for t in self._tallies.values()])
            rows = [r for r in source if self.pid is None or r.pid == self.pid]
            key = {"rate": lambda r: (-r.rate, -r.total, r.label),
                   "total": lambda r: (-r.total, -r.rate, r.label),
                   "p99": lambda r: (-(r.p99_us or -1), -r.rate, r.label),
                   "name": lambda r: (r.label, r.path, r.pid)}[self.sort]
            self._visible = ((self.sort, self.pid), sorted(rows, key=key))
        return self._visible[1]

    def cycle_sort(self):
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]

    def cycle_group(self):
        """The same counts and last interval, grouped the next way (keys are
        not named again)."""
        self.group = GROUPS[(GROUPS.index(self.group) + 1) % len(GROUPS)]
        self._visible = None
        if self.group == "exits":           # its rows are kept at every refresh
            return
        self._tallies, self._where, self._live = {}, {}, set()
        self._vm_rows.clear()
        for vk, n in self._counts.items():
            if n > 0:
                self._place(vk, n, +1)
        self._apply_interval()


# -- the screen -----------------------------------------------------------------

NUMERIC = (("RATE/s", 8), ("TOTAL", 9), ("%", 5), ("P50us", 7), ("P99us", 7))
# The PATH column holds the longest path name (`unattributed`), so that no
# row pushes the numbers out of their columns.
PATH_WIDTH = max(len(str(p)) for p in Path)


def _fit(text, width, keep=0):
    """`text` in `width` columns.  A long name is cut in the middle, not at
    the end: region names differ at the end (ioeventfd@0x10002000 and
    ioeventfd@0x10002004), and cut there two rows would read the same.
    The first `keep` characters (an address row's address) stay whole
    while there is room for them and a cut."""
    text = str(text)
    if len(text) <= width:
        return text
    if 0 < keep and keep + 2 <= width:
        return text[:keep] + _fit(text[keep:], width - keep)
    if width < 5:
        return text[:width]
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "~" + text[len(text) - tail:]


def _us(v):
    return "-" if v is None else f"{v:.1f}"


def histogram_us(stats, q):
    ns = histogram.quantile_ns(stats.slots, q, stats.max_ns)
    return None if ns is None else ns / 1000.0


def layout(width):
    """Column widths for a terminal `width` wide: numbers fixed, REGION gets
    what is left; the VM name column only when there is room for both (the
    header names the VMs anyway)."""
    fixed = 7 + PATH_WIDTH + 1 + 3 + sum(n + 1 for _, n in NUMERIC)   # pid, path, op, numbers
    left = max(8, width - 1 - fixed)
    who = min(16, left // 3) if left >= 40 else 0
    return {"who": who, "label": left - who - (1 if who else 0)}


def lines(model, width, height, status, keys=True):
    """The screen as text lines (the curses part only paints them); height
    None: every row (batch frames, the final table)."""
    w = layout(width)
    host, kernel = platform.node(), platform.release()
    names = ", ".join(f"{pid} {who}" for pid, who in model.traced)
    out = [f"ioregtop  {host}  kernel {kernel}  {status}  {time.strftime('%H:%M:%S')}",
           f"accesses/s: {model.rate:.0f}  total: {model.total}  lost: {model.lost}  "
           f"dropped: {model.dropped}  VMs: {model.vms} ({names or 'none yet'})",
           f"group: {model.group}  sort: {model.sort}  "
           f"pid: {'all' if model.pid is None else model.pid}"
           + ("   h help  q quit" if keys else ""), ""]
    who = lambda text: f"{_fit(text, w['who']):<{w['who']}} " if w["who"] else ""  # noqa: E731
    label = {"address": "ADDRESS:SIZES", "exits": "EXIT REASON"}.get(model.group, "REGION")
    header = (f"{'PID':>6} {who('VM')}{_fit(label, w['label']):<{w['label']}} "
              f"{'PATH':<{PATH_WIDTH}} "
              f"{'OP':<2} " + " ".join(f"{name:>{n}}" for name, n in NUMERIC))
    out.append(header)
    rows = model.visible()
    grand = (model.exit_total if model.group == "exits" else model.total) or 1
    for r in rows if height is None else rows[:max(0, height - len(out) - 1)]:
        out.append(f"{r.pid:>6} {who(r.who)}{_fit(r.label, w['label'], r.keep):<{w['label']}} "
                   f"{r.path:<{PATH_WIDTH}} {r.ops:<2} {r.rate:>8.1f} {r.total:>9} "
                   f"{100.0 * r.total / grand:>5.1f} {_us(r.p50_us):>7} {_us(r.p99_us):>7}")
    if not rows:
        none = "(no exits yet)" if model.group == "exits" else "(no guest device accesses yet)"
        out.append(none if model.pid is None else f"(no rows for pid {model.pid})")
    return [line[:max(0, width - 1)] for line in (out if height is None else out[:height])]


def draw(scr, view):
    height, width = scr.getmaxyx()
    scr.erase()
    text = HELP if view.help_shown else lines(view.model, width, height - 1, view.status)
    for y, line in enumerate(text[:height - 1]):
        attr = curses.A_REVERSE if (not view.help_shown and y == 4) else curses.A_NORMAL
        scr.addstr(y, 0, line[:max(0, width - 1)], attr)
    bottom = view.bottom_line()
    if bottom:
        scr.addstr(height - 1, 0, bottom[:max(0, width - 1)])
    scr.refresh()


ENTER = (10, 13, curses.KEY_ENTER)
BACKSPACE = (8, 127, curses.KEY_BACKSPACE)
ESCAPE = 27
PID_DIGITS = 10            # /proc/sys/kernel/pid_max is at most 2^22


class PidPrompt:
    """The `p` prompt, typed into one key at a time while the view goes on
    refreshing (a blocking getstr() froze the screen)."""

    PROMPT = "pid (empty: all, Esc: cancel): "

    def __init__(self):
        self.text = ""

    def key(self, ch):
        """Returns "done", "cancel", or None while typing goes on."""
        if ch in ENTER:
            return "done"
        if ch == ESCAPE:
            return "cancel"
        if ch in BACKSPACE:
            self.text = self.text[:-1]
        elif 32 <= ch < 127 and len(self.text) < PID_DIGITS + 2:
            self.text += chr(ch)
        return None

    def line(self):
        return self.PROMPT + self.text + "_"


def pid_filter(text, traced):
    """(pid or None for all, error): what the `p` prompt's `text` asks for,
    given the traced VMs' [(pid, name)].  Not a number, or no traced VM's
    pid, is refused in words and leaves the filter as it was."""
    text = text.strip()
    if not text:
        return None, None
    if not text.isdigit() or int(text) == 0 or len(text) > PID_DIGITS:
        return "keep", f"not a pid: {text!r}"
    pid = int(text)
    if pid not in {p for p, _ in traced}:
        known = ", ".join(f"{p} {name}" for p, name in traced) or "none yet"
        return "keep", f"pid {pid} is not a traced VM (traced: {known})"
    return pid, None


class LiveView:
    """What the keys and the clock do to the view, apart from curses (so a
    test can drive it with a scripted screen): refresh every `interval`,
    at most `count` times, and the keys."""

    def __init__(self, session, interval, count=None, model=None):
        self.session = session
        self.interval = interval
        self.count = count
        self.model = model or TopModel()
        self.refreshes = 0
        self.next_refresh = 0.0
        self.message = ""
        self.help_shown = False
        self.prompt = None
        self.quit_pressed = False

    @property
    def status(self):
        return "PAUSED" if self.model.paused else "tracing"

    @property
    def counted_out(self):
        return self.count is not None and self.refreshes >= self.count

    def tick(self, now):
        """Refresh when due.  Returns whether it did."""
        if now < self.next_refresh or self.model.paused or self.counted_out:
            return False
        self.model.refresh(self.session.recording(live=True), now, self.session.vms_alive())
        self.refreshes += 1
        self.next_refresh = now + self.interval
        return True

    def bottom_line(self):
        return self.prompt.line() if self.prompt is not None else self.message

    def key(self, ch):
        """One key.  Returns True when it quits."""
        if self.prompt is not None:
            what = self.prompt.key(ch)
            if what == "done":
                pid, self.message = pid_filter(self.prompt.text, self.model.traced)
                self.message = self.message or ""
                if pid != "keep":
                    self.model.pid = pid
            if what is not None:
                self.prompt = None
            return False
        self.message = ""
        if self.help_shown:
            self.help_shown = False
        elif ch in (ord("q"), ord("Q")):
            self.quit_pressed = True
        elif ch == ord("s"):
            self.model.cycle_sort()
        elif ch == ord("g"):
            self.model.cycle_group()
        elif ch == ord(" "):
            self.model.paused = not self.model.paused
        elif ch == ord("h"):
            self.help_shown = True
        elif ch == ord("p"):
            self.prompt = PidPrompt()
        return self.quit_pressed


def run(session, interval, count=None):
    """The live view until q, Ctrl-C, `count` refreshes, or the end of the
    session.  Returns the LiveView (quit_pressed, counted_out, its model)."""
    view = LiveView(session, interval, count)

    def loop(scr):
        curses.curs_set(0)
        scr.timeout(100)
        with session.stop_signals() as stop:
            while not stop.is_set() and not session.done() and not view.counted_out:
                view.tick(time.monotonic())
                session.tracer.poll()
                draw(scr, view)
                ch = scr.getch()
                if ch == -1 or ch == curses.KEY_RESIZE:
                    continue
                if view.key(ch):
                    return

    os.environ.setdefault("ESCDELAY", "25")
    # Follow the terminal's real size as it changes, not LINES/COLUMNS
    # inherited from whatever started us.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    curses.wrapper(loop)
    return view


def frame(model, width, status):
    """One plain-text frame: the screen's lines, every row."""
    return "\n".join(lines(model, width, None, status, keys=False)) + "\n"


def batch(session, interval, count, out, width):
    """`ioregtop -b`: a frame to `out` every `interval` until `count`
    frames, Ctrl-C, or the end of the session.  Returns the LiveView."""
    view = LiveView(session, interval, count)
    with session.stop_signals() as stop:
        while not session.done() and not view.counted_out:
            if view.tick(time.monotonic()):
                if view.refreshes > 1:
                    out.write("\n")
                out.write(frame(view.model, width, "tracing"))
                out.flush()
            if stop.wait(min(0.1, interval)):
                break
            session.tracer.poll()
    return view
