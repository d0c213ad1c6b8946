"""`ioregtrace stat INTERVAL [COUNT]`: one table (or JSON line, or CSV
rows) per interval, of the accesses made in that interval, like bcc's
tools and `kvm_stat -i`.

The series ends after COUNT intervals (CMD is then ended, as after -d),
when CMD or the traced processes end, at -d, or on Ctrl-C/SIGTERM; an
interval cut short by the end is still printed, with its real length."""

import dataclasses
import json
import time

from .. import interval as interval_mod
from .. import report as report_mod
from ..recording import render
from . import exits as exits_view
from . import stat as stat_view


@dataclasses.dataclass
class Shape:
    """How every interval is shown: the options of `stat`."""
    fmt: str = "table"            # table, json or csv
    by: str = "auto"
    sort: str = "count"
    top: int = None
    vm: str = None
    exits: bool = False           # stat --exits: exit tables instead of accesses
    per_vcpu: bool = False


def interval_text(recording, shape, number, end_s, first):
    """One interval's output.  `recording` holds that interval's snapshot
    and length; end_s is its end in seconds since the start."""
    if shape.exits:
        return _exits_interval(recording, shape, number, end_s, first)
    rep = report_mod.shape(render(recording, by=shape.by), sort=shape.sort, top=shape.top,
                           vm=shape.vm)
    if shape.fmt == "json":
        doc = stat_view.to_json(rep)
        doc.update(interval=number, time_s=round(end_s, 6))
        return json.dumps(doc, separators=(",", ":")) + "\n"
    if shape.fmt == "csv":
        return stat_view.to_csv(rep, time_s=end_s, header=first)
    stamp = time.strftime("%H:%M:%S")
    return (f"{stamp}  interval {number}: {recording.duration_s:.2f} s\n"
            + stat_view.table(rep, brief=True) + "\n")


def _exits_interval(recording, shape, number, end_s, first):
    args = dict(per_vcpu=shape.per_vcpu, sort=shape.sort, top=shape.top, vm=shape.vm)
    if shape.fmt == "json":
        doc = exits_view.to_json(recording, **args)
        doc.update(interval=number, time_s=round(end_s, 6))
        return json.dumps(doc, separators=(",", ":")) + "\n"
    if shape.fmt == "csv":
        return exits_view.to_csv(recording, time_s=end_s, header=first, **args)
    stamp = time.strftime("%H:%M:%S")
    return (f"{stamp}  interval {number}: {recording.duration_s:.2f} s\n"
            + exits_view.table(recording, brief=True, **args) + "\n")


def run(session, every_s, count, shape, emit):
    """Print intervals through `emit(text)` until the series ends."""
    prev, number, start = None, 0, session.started
    last_end = start
    with session.stop_signals() as stop:
        while True:
            deadline = last_end + every_s
            while (time.monotonic() < deadline and not session.done()
                   and not stop.is_set()):
                session.tracer.poll()
                stop.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            number += 1
            final = session.done() or stop.is_set() or (count is not None and number >= count)
            if final:
                session.stop()
                if count is not None and number >= count and not stop.is_set():
                    session.end_reason = f"{count} intervals printed"
            now = time.monotonic()
            recording = session.recording(live=not final)
            snapshot = recording.snapshot
            recording.snapshot = interval_mod.since(prev, snapshot)
            recording.duration_s = now - last_end
            # An interval cut short by the end is printed only if something
            # happened in it: a Ctrl-C right after a tick adds no empty table.
            if not final or number == 1 or recording.snapshot.accesses or \
                    recording.snapshot.exits or \
                    now - last_end >= every_s:
                emit(interval_text(recording, shape, number, now - start, first=number == 1))
            if final:
                break
            prev, last_end = snapshot, now
    if stop.is_set():
        session.log("stopping")
