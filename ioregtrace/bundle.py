"""Bug-report bundles: a Recording as gzip'd JSON, plus facts about the host.

Reading a bundle never executes anything from it: it is JSON, parsed with
bounded size, and every field is checked for type and range before it
reaches the renderer.  Anything else is a BundleError (one line)."""

import datetime
import gzip
import json
import math
import os
import platform
import zlib

from . import exits, histogram, kvmapi
from .errors import UserError
from .keys import AccessKey, Op, Path, Space
from .probes import Events, LatencyStats, RawEvent, RawSnapshot, VmInfo
from .qemu.layout import LayoutHistory, View
from .qemu.mtree import FlatLayout, FlatRange
from .qemu.ops import RegionOps
from .recording import Recording, VmFacts

FORMAT = "ioregtrace-bundle"
VERSION = 1
MAX_BYTES = 1 << 30          # decompressed
# A bundle is JSON, which gzip shrinks 5-30 times; far more is a bomb, which
# is rejected as soon as it passes this ratio (plus a floor for small files).
MAX_RATIO = 200
MIN_LIMIT = 64 << 20
CHUNK = 1 << 20
U64 = (1 << 64) - 1
SPACES = {str(s): s for s in Space}
KINDS = ("ioeventfd", "coalesced", "ioregion")


class BundleError(UserError):
    pass


# -- writing ----------------------------------------------------------------

def _ranges(ranges):
    return [[r.start, r.end, r.name, r.offset, r.mr] for r in ranges]


def _layout(layout):
    return None if layout is None else {str(s): _ranges(r) for s, r in layout.ranges.items()}


def _history(h):
    if h is None:
        return None
    views = [{"gen": v.gen, "space": str(v.space), "fv": v.fv, "ranges": _ranges(v.ranges)}
             for space in (Space.MMIO, Space.PIO) for v in h.views[space]]
    return {"views": views, "base": _layout(h.base), "final": _layout(h.final)}


def _key(k):
    return [int(k.space), k.address, k.size, int(k.op), int(k.path), k.layout]


def to_doc(rec, redact=False):
    snap = rec.snapshot
    vms = []
    for serial, info in sorted(snap.vms.items()):
        facts = rec.vms.get(serial, VmFacts(serial))
        vms.append({
            "serial": serial, "pid": info.pid, "comm": info.comm, "complete": info.complete,
            "name": None if redact else facts.name, "qemu_version": facts.qemu_version,
            "cmdline": None if redact else facts.cmdline,
            "layout": _history(facts.history),
            "region_ops": [[mr, o.valid_min, o.valid_max, o.valid_unaligned, o.has_accepts,
                            o.impl_min, o.impl_max, o.impl_unaligned]
                           for mr, o in sorted(facts.region_ops.items())]})
    host = dict(rec.host)
    if redact:
        host["hostname"] = None
    events = None
    if rec.events is not None:
        events = {"requested": rec.events.requested, "lost": rec.events.lost,
                  "list": [[e.ts_ns, e.tid, e.pid, e.vm, e.space, e.address, e.size, e.op,
                            e.path, e.layout, e.count, e.latency_ns]
                           for e in rec.events.events]}
    return {
        "format": FORMAT, "version": VERSION, "created": rec.created,
        "duration_s": rec.duration_s, "host": host, "probes": rec.probes,
        "notes": rec.notes, "counters": snap.counters, "vms": vms,
        "accesses": [[vm, k.pid] + _key(k) + [n] for (vm, k), n in snap.accesses.items()],
        "latencies": [[vm, k.pid] + _key(k) + [s.count, s.sum_ns, s.max_ns,
                                                [[i, n] for i, n in enumerate(s.slots) if n]]
                      for (vm, k), s in snap.latencies.items()],
        "registrations": [[vm, kind, str(space), addr, size]
                          for vm, kind, space, addr, size in snap.registrations],
        "exits": [[vm, k.kind, k.isa, k.reason, k.err, k.tid, s.count, s.to_user, s.sum_ns,
                   s.min_ns, s.max_ns, [[i, n] for i, n in enumerate(s.slots) if n]]
                  for (vm, k), s in snap.exits.items()],
        "bpf_programs": {name: list(v) for name, v in rec.bpf_programs.items()},
        "events": events,
    }


def write(path, rec, redact=False):
    data = json.dumps(to_doc(rec, redact), separators=(",", ":")).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with gzip.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- host facts ---------------------------------------------------------------

def host_facts():
    facts = {"hostname": platform.node(), "kernel": platform.release(),
             "machine": platform.machine(), "cpu": None, "bcc": None, "kvm": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import bcc
        facts["bcc"] = getattr(bcc, "__version__", None)
    except ImportError:
        pass
    facts["kvm"] = kvm_facts()
    return facts


def kvm_facts():
    """The KVM capabilities that decide which dispatch paths exist."""
    import fcntl
    try:
        with kvmapi.system_fd() as fd:
            caps = {name: fcntl.ioctl(fd, kvmapi.KVM_CHECK_EXTENSION, cap) for name, cap in (
                ("coalesced_mmio", kvmapi.KVM_CAP_COALESCED_MMIO),
                ("ioeventfd", kvmapi.KVM_CAP_IOEVENTFD),
                ("coalesced_pio", kvmapi.KVM_CAP_COALESCED_PIO))}
            return {"api_version": fcntl.ioctl(fd, kvmapi.KVM_GET_API_VERSION), "caps": caps}
    except OSError as e:
        return {"error": e.strerror}


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- reading ----------------------------------------------------------------

class _Check:
    """Typed access to untrusted JSON; every failure names where it was."""

    def __init__(self, path="bundle"):
        self.path = path

    def fail(self, what):
        raise BundleError(f"{self.path}: {what}")

    def at(self, part):
        return _Check(f"{self.path}{part}")


def _dict(c, v):
    if not isinstance(v, dict):
        c.fail("expected an object")
    return v


def _list(c, v, n=None):
    if not isinstance(v, list) or (n is not None and len(v) != n):
        c.fail(f"expected a list{'' if n is None else f' of {n}'}")
    return v


def _int(c, v, lo=0, hi=U64):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        c.fail(f"expected an integer in [{lo}, {hi}]")
    return v


def _bool(c, v):
    if not isinstance(v, bool):
        c.fail("expected true or false")
    return v


# Control characters (C0, DEL, C1) that a terminal would act on: a bundle's
# text is shown, never obeyed (ESC could clear or recolour the screen).
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}


def _str(c, v, optional=False, maxlen=4096):
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > maxlen:
        c.fail("expected a string")
    return v.translate(_CONTROLS)


def _num(c, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        c.fail("expected a finite number >= 0")
    return float(v)


def _field(c, d, name):
    if name not in d:
        c.fail(f"missing {name!r}")
    return d[name], c.at(f".{name}")


def _access_key(c, row, pid):
    space, addr, size, op, path, layout = row
    _int(c.at("[space]"), space, 0, len(Space) - 1)
    _int(c.at("[op]"), op, 0, len(Op) - 1)
    _int(c.at("[path]"), path, 0, len(Path) - 1)
    return AccessKey(pid, Space(space), _int(c.at("[address]"), addr),
                     _int(c.at("[size]"), size, 0, 255), Op(op), Path(path),
                     _int(c.at("[layout]"), layout, 0, (1 << 32) - 1))


def _flat_ranges(c, v):
    ranges = []
    for i, r in enumerate(_list(c, v)):
        ci = c.at(f"[{i}]")
        start, end, name, offset, mr = _list(ci, r, 5)
        start, end = _int(ci, start), _int(ci, end)
        if end < start:
            ci.fail("range ends before it starts")
        ranges.append(FlatRange(start, end, _str(ci, name, maxlen=256), _int(ci, offset),
                                mr=_int(ci, mr)))
    return ranges


def _flat_layout(c, v):
    if v is None:
        return None
    layout = FlatLayout()
    for name, ranges in _dict(c, v).items():
        if name not in SPACES:
            c.fail(f"unknown space {name!r}")
        layout.set(SPACES[name], _flat_ranges(c.at(f".{name}"), ranges))
    return layout


def _history_from(c, v):
    if v is None:
        return None
    d = _dict(c, v)
    h = LayoutHistory()
    views, cv = _field(c, d, "views")
    last = {}
    for i, view in enumerate(_list(cv, views)):
        ci = cv.at(f"[{i}]")
        vd = _dict(ci, view)
        gen = _int(ci, _field(ci, vd, "gen")[0], 0, (1 << 32) - 1)
        space = _field(ci, vd, "space")[0]
        if space not in SPACES:
            ci.fail("unknown space")
        space = SPACES[space]
        if gen < last.get(space, 0):
            ci.fail("views out of order")
        last[space] = gen
        h.views[space].append(View(gen, space, _int(ci, _field(ci, vd, "fv")[0]),
                                   _flat_ranges(ci.at(".ranges"), _field(ci, vd, "ranges")[0])))
    h.base = _flat_layout(c.at(".base"), _field(c, d, "base")[0])
    h.final = _flat_layout(c.at(".final"), _field(c, d, "final")[0])
    return h


def from_doc(doc):
    c = _Check()
    d = _dict(c, doc)
    if d.get("format") != FORMAT:
        c.fail(f"not an ioregtrace bundle (format {str(d.get('format'))[:40]!r})")
    if d.get("version") != VERSION:
        c.fail(f"bundle version {str(d.get('version'))[:20]!r}, this ioregtrace reads "
               f"version {VERSION}")
    snap = RawSnapshot(taken=0.0)
    counters, cc = _field(c, d, "counters")
    snap.counters = {_str(cc, k, maxlen=64): _int(cc.at(f".{k}"), n)
                     for k, n in _dict(cc, counters).items()}
    vms = {}
    rows, cr = _field(c, d, "vms")
    for i, vm in enumerate(_list(cr, rows)):
        ci = cr.at(f"[{i}]")
        v = _dict(ci, vm)
        def get(name, ci=ci, v=v):
            return _field(ci, v, name)[0]
        serial = _int(ci, get("serial"), 0, (1 << 32) - 1)
        pid = _int(ci, get("pid"), 0, (1 << 32) - 1)
        snap.vms[serial] = VmInfo(pid, serial, _bool(ci, get("complete")),
                                  _str(ci, get("comm"), maxlen=64))
        cmdline = get("cmdline")
        if cmdline is not None:
            cmdline = [_str(ci.at(".cmdline"), a) for a in _list(ci.at(".cmdline"), cmdline)]
        region_ops = {}
        for j, o in enumerate(_list(ci.at(".region_ops"), get("region_ops"))):
            cj = ci.at(f".region_ops[{j}]")
            mr, vmin, vmax, vun, acc, imin, imax, iun = _list(cj, o, 8)
            region_ops[_int(cj, mr)] = RegionOps(
                _int(cj, vmin, 0, 1 << 16), _int(cj, vmax, 0, 1 << 16), _bool(cj, vun),
                _bool(cj, acc), _int(cj, imin, 0, 1 << 16), _int(cj, imax, 0, 1 << 16),
                _bool(cj, iun))
        vms[serial] = VmFacts(serial, name=_str(ci, get("name"), optional=True, maxlen=256),
                              qemu_version=_str(ci, get("qemu_version"), optional=True,
                                                maxlen=64),
                              cmdline=cmdline,
                              history=_history_from(ci.at(".layout"), get("layout")),
                              region_ops=region_ops)
    rows, cr = _field(c, d, "accesses")
    for i, row in enumerate(_list(cr, rows)):
        ci = cr.at(f"[{i}]")
        row = _list(ci, row, 9)
        vm, pid = _int(ci, row[0], 0, (1 << 32) - 1), _int(ci, row[1], 0, (1 << 32) - 1)
        snap.accesses[(vm, _access_key(ci, row[2:8], pid))] = _int(ci, row[8])
    rows, cr = _field(c, d, "latencies")
    for i, row in enumerate(_list(cr, rows)):
        ci = cr.at(f"[{i}]")
        row = _list(ci, row, 12)
        vm, pid = _int(ci, row[0], 0, (1 << 32) - 1), _int(ci, row[1], 0, (1 << 32) - 1)
        slots = [0] * histogram.SLOTS
        for pair in _list(ci, row[11]):
            slot, n = _list(ci, pair, 2)
            slots[_int(ci, slot, 0, histogram.SLOTS - 1)] = _int(ci, n)
        count = _int(ci, row[8])
        if count != sum(slots):
            ci.fail("latency count does not match its histogram")
        snap.latencies[(vm, _access_key(ci, row[2:8], pid))] = LatencyStats(
            count, _int(ci, row[9]), _int(ci, row[10]), slots)
    rows, cr = _field(c, d, "registrations")
    for i, row in enumerate(_list(cr, rows)):
        ci = cr.at(f"[{i}]")
        vm, kind, space, addr, size = _list(ci, row, 5)
        if kind not in KINDS or space not in SPACES:
            ci.fail("unknown registration kind or space")
        snap.registrations.append((_int(ci, vm, 0, (1 << 32) - 1), kind, SPACES[space],
                                   _int(ci, addr), _int(ci, size, 0, (1 << 32) - 1)))
    # absent from bundles written before exits were traced, or with --no-exits
    rows, cr = d.get("exits", []), c.at(".exits")
    for i, row in enumerate(_list(cr, rows)):
        snap.exits.update([_exit_from(cr.at(f"[{i}]"), row)])
    programs = {}
    cp = c.at(".bpf_programs")
    for name, v in _dict(cp, d.get("bpf_programs", {})).items():
        runs, ns = _list(cp, v, 2)
        programs[_str(cp, name, maxlen=64)] = (_int(cp, runs), _int(cp, ns))
    notes, cn = _field(c, d, "notes")
    host, _ = _field(c, d, "host")
    probes, _ = _field(c, d, "probes")
    return Recording(snapshot=snap, duration_s=_num(c.at(".duration_s"), d.get("duration_s")),
                     vms=vms, notes=[_str(cn, n) for n in _list(cn, notes)],
                     host=_host_from(c.at(".host"), host),
                     probes=_probes_from(c.at(".probes"), probes),
                     events=_events_from(c.at(".events"), d.get("events")),
                     bpf_programs=programs,
                     created=_str(c.at(".created"), d.get("created", ""), maxlen=64))


def _exit_from(c, row):
    """((vm, ExitKey), ExitStats) of one bundled exit row, checked."""
    vm, kind, isa, reason, err, tid, count, to_user, sum_ns, min_ns, max_ns, pairs = \
        _list(c, row, 12)
    if kind not in exits.KIND_NAMES:
        c.fail("unknown exit kind")
    slots = [0] * histogram.SLOTS
    for pair in _list(c, pairs):
        slot, n = _list(c, pair, 2)
        slots[_int(c, slot, 0, histogram.SLOTS - 1)] = _int(c, n)
    stats = exits.ExitStats(_int(c, count), _int(c, to_user), _int(c, sum_ns), _int(c, min_ns),
                            _int(c, max_ns), slots)
    if stats.timed + stats.to_user > stats.count or stats.min_ns > stats.max_ns:
        c.fail("exit counts do not add up")
    key = exits.ExitKey(kind, _int(c, isa, 0, 255), _int(c, reason, 0, (1 << 32) - 1),
                        _int(c, err, 0, (1 << 16) - 1), _int(c, tid, 0, (1 << 32) - 1))
    return (_int(c, vm, 0, (1 << 32) - 1), key), stats


def _host_from(c, v):
    d = _dict(c, v)
    host = {}
    for name in ("hostname", "kernel", "machine", "cpu", "bcc"):
        host[name] = _str(c.at(f".{name}"), d.get(name), optional=True, maxlen=256)
    kvm = d.get("kvm")
    if kvm is not None:
        ck = c.at(".kvm")
        kd = _dict(ck, kvm)
        kvm = {}
        if "error" in kd:
            kvm["error"] = _str(ck.at(".error"), kd["error"], maxlen=256)
        if "api_version" in kd:
            kvm["api_version"] = _int(ck.at(".api_version"), kd["api_version"])
        if "caps" in kd:
            kvm["caps"] = {_str(ck, k, maxlen=64): _int(ck.at(f".caps.{k}"), n, -(1 << 31))
                           for k, n in _dict(ck.at(".caps"), kd["caps"]).items()}
    host["kvm"] = kvm
    return host


def _probes_from(c, v):
    d = _dict(c, v)
    attached = [_str(c.at(".attached"), p, maxlen=512)
                for p in _list(c.at(".attached"), d.get("attached", []))]
    unavailable = {_str(c, k, maxlen=512): _str(c.at(f".unavailable.{k}"), why)
                   for k, why in _dict(c.at(".unavailable"), d.get("unavailable", {})).items()}
    return {"attached": attached, "unavailable": unavailable}


def _events_from(c, v):
    if v is None:
        return None
    d = _dict(c, v)
    ev = Events(requested=_int(c, _field(c, d, "requested")[0]),
                lost=_int(c, _field(c, d, "lost")[0]))
    rows, cr = _field(c, d, "list")
    for i, row in enumerate(_list(cr, rows)):
        ci = cr.at(f"[{i}]")
        row = _list(ci, row, 12)
        *ints, latency = row
        ts, tid, pid, vm, space, addr, size, op, path, layout, count = (
            _int(ci, x) for x in ints)
        if space >= len(Space) or op >= len(Op) or path >= len(Path) or size > 255:
            ci.fail("field out of range")
        ev.events.append(RawEvent(ts, tid, pid, vm, space, addr, size, op, path, layout, count,
                                  None if latency is None else _int(ci, latency)))
    return ev


def _inflated_size(path, limit):
    """The size of `path` uncompressed, counted without keeping it: a bomb
    is refused in constant memory, whatever the allocator makes of many
    large chunks kept alive at once.  Raises BundleError past `limit`."""
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise BundleError(f"{path}: more than {limit >> 20} MiB uncompressed "
                                  f"(over {MAX_RATIO} times its size): not a bundle")
    return total


def read(path):
    """A Recording from a bundle file, or BundleError."""
    try:
        limit = min(MAX_BYTES, max(MIN_LIMIT, MAX_RATIO * os.path.getsize(path)))
        size = _inflated_size(path, limit)
        with gzip.open(path, "rb") as f:
            data = f.read(size + 1)
        if len(data) != size:       # the file changed between the two reads
            raise BundleError(f"{path}: changed while it was read")
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise BundleError(f"{path}: not a readable gzip file ({e})") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:     # UnicodeDecodeError is a ValueError
        raise BundleError(f"{path}: not valid JSON ({str(e)[:80]})") from None
    try:
        return from_doc(doc)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    except (RecursionError, ValueError, TypeError) as e:
        raise BundleError(f"{path}: malformed bundle ({str(e)[:80]})") from None
