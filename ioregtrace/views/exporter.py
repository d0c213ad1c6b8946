"""`ioregtrace serve`: the counts as Prometheus metrics.

Nothing happens per event in Python: each scrape reads the BPF maps (at
most once per `cache_s`, however many scrapers there are) and renders the
same rows as `stat --by region`, as labelled series.

Series are stable for Prometheus:
- a counter's label set, once exported, stays (until its VM has been gone
  for the grace period), so every series only grows;
- --max-series caps the label sets; further ones are folded into one
  `other` series per path, which also only grows (contributions of VMs
  dropped after their grace period are kept in it);
- a VM is labelled by its name (QEMU -name, else comm), and `pid` is empty:
  a VM restarted under the same name continues its series, which go on
  growing from the last count of the one before (that one's counts are
  carried over, so a restart neither resets a counter nor churns labels);
- only two VMs of one name running at once are told apart by `pid` (the
  first one seen keeps it empty).
"""

import collections
import platform
import socket
import socketserver
import threading
import time
import wsgiref.simple_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

from .. import __version__, exitcodes, histogram
from .. import exits as exits_mod
from ..keys import Path
from ..probes import AGENT_COUNTERS, COUNTERS
from ..recording import naming
from ..report import merge_stats, name_accesses

OTHER = "other"
# Histogram buckets: the kernel's log2 octaves (its 8 sub-buckets summed), in
# seconds: 1.024 us .. 137 s.
BUCKET_SLOTS = [((octave + 1) << histogram.SUB_BITS) - 1
                for octave in range(histogram.SLOTS >> histogram.SUB_BITS)]


def bucket_bounds():
    """(slot index that closes the bucket, upper bound in seconds)."""
    out = []
    for last in BUCKET_SLOTS[:-1]:
        upper_ns = histogram.slot_bounds(last)[1]
        out.append((last, upper_ns / 1e9))
    return out


def histogram_buckets(slots):
    """Cumulative (le, count) pairs, ending with +Inf."""
    buckets, seen, i = [], 0, 0
    for last, le in bucket_bounds():
        while i <= last:
            seen += slots[i]
            i += 1
        buckets.append((f"{le:.9g}", seen))
    buckets.append(("+Inf", sum(slots)))
    return buckets


class Exporter:
    """A prometheus_client collector over a running Session."""

    def __init__(self, session, by="region", max_series=None, grace_s=60.0, cache_s=0.25):
        self.session = session
        self.by = by
        self.max_series = max_series
        self.grace_s = grace_s
        self.cache_s = cache_s
        self.lock = threading.Lock()
        self.admitted = {}                 # label tuple -> order first seen
        self.folded = set()                # label tuples folded into `other`
        self.other_base = collections.Counter()    # path -> count of dropped VMs' folds
        self.dropped_vms = set()           # serials past their grace period, or restarted
        self.identities = {}               # serial -> (vm label, pid label), fixed
        self.carried = collections.Counter()   # label tuple -> earlier incarnations' count
        self.carried_stats = {}            # label tuple -> their LatencyStats
        self._own = {}                     # serial -> {label suffix: count}, last build
        self._own_stats = {}               # serial -> {label suffix: LatencyStats}
        self._own_exits = {}               # serial -> {exit label suffix: ExitStats}
        self.carried_exits = {}            # exit label tuple -> earlier incarnations'
        self._vms = {}                     # serial -> VmInfo, from the last read
        self._last_folded = {}             # folded label tuple -> its last count
        self._families = None
        self._at = 0.0
        self.scrapes = 0

    # -- prometheus_client --------------------------------------------------

    def collect(self):
        with self.lock:
            self.scrapes += 1
            now = time.monotonic()
            if self._families is None or now - self._at >= self.cache_s:
                self._families = self._build(now)
                self._at = now
            return list(self._families)

    def describe(self):
        return []      # families are dynamic: no registration-time collect()

    # -- building -------------------------------------------------------------

    def _identity(self, serial, pid, name):
        """(vm, pid) labels of a VM, fixed at first sight: (NAME, "") unless a
        running VM holds that already, then (NAME, PID).  An exited VM that
        held the same labels (a restart) passes its counts on to this one."""
        ident = self.identities.get(serial)
        if ident is not None:
            return ident
        held = {s: i for s, i in self.identities.items() if s not in self.dropped_vms}
        running = {i for s, i in held.items() if s in self._vms and not self._vms[s].exited_ns}
        ident = (name, "")
        if ident in running:
            ident = (name, str(pid))
            if ident in running:            # one pid, two running VMs: cannot be
                ident = (f"{name}#{serial}", "")
        for s, i in held.items():
            if i == ident:
                self._pass_on(s, ident)
        self.identities[serial] = ident
        return ident

    def _pass_on(self, serial, ident):
        """A restarted VM's counts carry over to the series its successor
        continues."""
        self.dropped_vms.add(serial)
        for suffix, n in self._own.pop(serial, {}).items():
            self.carried[ident + suffix] += n
        for suffix, st in self._own_stats.pop(serial, {}).items():
            self.carried_stats[ident + suffix] = merge_stats(
                self.carried_stats.get(ident + suffix), st)
        for suffix, st in self._own_exits.pop(serial, {}).items():
            self.carried_exits[ident + suffix] = exits_mod.merge(
                self.carried_exits.get(ident + suffix), st)

    def _expire(self, vms, now):
        for serial, info in vms.items():
            if info.exited_ns and serial not in self.dropped_vms and \
                    now - info.exited_ns / 1e9 >= self.grace_s:
                self.dropped_vms.add(serial)
                self._forget(serial)

    def _forget(self, serial):
        """A VM gone for the grace period, with no successor: its series
        leave; what they had folded into `other` stays there (a counter
        never goes down)."""
        ident = self.identities.get(serial)
        self._own.pop(serial, None)
        self._own_stats.pop(serial, None)
        self._own_exits.pop(serial, None)
        if ident is None:
            return
        for labels in [k for k in self.carried_exits if k[:2] == ident]:
            del self.carried_exits[labels]
        for labels in [k for k in self.admitted if k[:2] == ident]:
            del self.admitted[labels]
        for labels in [k for k in self.folded if k[:2] == ident]:
            self.other_base[labels[5]] += self._last_folded.pop(labels, 0)
            self.folded.discard(labels)
        for labels in [k for k in self.carried if k[:2] == ident]:
            del self.carried[labels]
            self.carried_stats.pop(labels, None)

    def _build(self, now):
        with self.session.tracer.lock:
            recording = self.session.recording(live=True)
        snapshot = recording.snapshot
        self._vms = snapshot.vms
        self._expire(self._vms, now)
        # Straight from the named keys to label sets: no report rows, no
        # sorting, no notes (one QEMU is tens of thousands of keys).
        vm_regions, vm_names = naming(recording)
        named, _ = name_accesses(snapshot, vm_regions)
        own = collections.defaultdict(collections.Counter)     # serial -> suffix -> count
        own_stats = collections.defaultdict(dict)
        for vm, key, count, region, _calls in named:
            if vm in self.dropped_vms:
                continue
            suffix = (region if region is not None else "unassigned",
                      str(key.space), str(key.op), str(key.path))
            if self.by == "address":
                suffix += (f"{key.address:#x}",)
            own[vm][suffix] += count
            latency = snapshot.latencies.get((vm, key))
            if latency is not None:
                own_stats[vm][suffix] = merge_stats(own_stats[vm].get(suffix), latency)
        self._own, self._own_stats = dict(own), dict(own_stats)
        # Labels in the order VMs came: the first of a name keeps pid empty;
        # a restart takes over its predecessor's series with this build's
        # final counts of the predecessor.
        for serial in sorted(own):
            info = self._vms.get(serial)
            self._identity(serial, info.pid if info else 0,
                           vm_names.get(serial) or (info.comm if info else "?"))
        counts = collections.Counter(self.carried)
        stats = dict(self.carried_stats)
        for serial, suffixes in self._own.items():
            if serial in self.dropped_vms:
                continue
            ident = self.identities[serial]
            for suffix, n in suffixes.items():
                counts[ident + suffix] += n
            for suffix, st in self._own_stats.get(serial, {}).items():
                stats[ident + suffix] = merge_stats(stats.get(ident + suffix), st)
        c = snapshot.counters
        lost_events = c.get("lost_events", 0) + c.get("lost_raw_events", 0)
        series, other = self._cap(counts)

        names = ["vm", "pid", "region", "space", "op", "path"] + (
            ["address"] if self.by == "address" else [])
        accesses = CounterMetricFamily(
            "ioregtrace_accesses", "Guest device accesses, by the path kvm.ko dispatched "
            "them through (string PIO: one per element).", labels=names)
        for labels in sorted(series):
            accesses.add_metric(labels, series[labels])
        for path, n in sorted(other.items()):
            accesses.add_metric([OTHER] * 5 + [path] + ([OTHER] if self.by == "address"
                                                        else []), n)
        latency = HistogramMetricFamily(
            "ioregtrace_userspace_dispatch_seconds", "Time the VMM took to handle an "
            "exit: from KVM_RUN's return (kvm_userspace_exit) to the next KVM_RUN on the "
            "same vCPU thread.", labels=[n for n in names if n != "path"])
        direct = HistogramMetricFamily(
            "ioregtrace_ioregionfd_round_trip_seconds", "Time a device task took to answer "
            "kvm.ko over ioregionfd: from the command sent (kvm_ioregion_send) to its "
            "response (kvm_ioregion_response), on the vCPU thread.",
            labels=[n for n in names if n != "path"])
        family = {str(Path.USERSPACE): latency, str(Path.IOREGIONFD): direct}
        for labels in sorted(stats):
            if labels not in series or labels[5] not in family:
                continue
            s = stats[labels]
            family[labels[5]].add_metric([v for i, v in enumerate(labels) if i != 5],
                                         histogram_buckets(s.slots), s.sum_ns / 1e9)
        lost = CounterMetricFamily("ioregtrace_lost_events", "Events the tracer saw but "
                                   "could not process.")
        lost.add_metric([], lost_events)
        dropped = CounterMetricFamily("ioregtrace_dropped_keys", "Accesses not counted "
                                      "because the tracer's accesses map was full.")
        dropped.add_metric([], c.get("dropped_accesses", 0))
        # Every counter of the BPF side, so that no drop goes unseen (the
        # latency map's, the registration tables', the VM table's, ...).
        diagnostics = CounterMetricFamily(
            "ioregtrace_diagnostics", "The tracer's own counters (README, Diagnostics): "
            "accesses, samples and events it dropped or could not attribute.",
            labels=["counter"])
        for name in COUNTERS + AGENT_COUNTERS:
            diagnostics.add_metric([name], c.get(name, 0))
        vms = GaugeMetricFamily("ioregtrace_vms", "VMM processes traced and running.")
        vms.add_metric([], sum(1 for s, i in self._vms.items()
                               if not i.exited_ns and s not in self.dropped_vms))
        folded = GaugeMetricFamily("ioregtrace_series_folded", "Label sets folded into "
                                   "the 'other' series by --max-series.")
        folded.add_metric([], len(self.folded))
        return [accesses, latency, direct, *self._exit_families(snapshot, vm_names), lost, dropped,
                diagnostics, vms, folded, _build_info()]

    def _exit_families(self, snapshot, vm_names):
        """ioregtrace_exits_total and ioregtrace_exit_handling_seconds: per
        VM, kind and reason (not per vCPU: bounded by the reason tables)."""
        own = collections.defaultdict(dict)
        for serial in sorted({serial for serial, _ in snapshot.exits}):
            info = self._vms.get(serial)
            if serial not in self.dropped_vms:
                self._identity(serial, info.pid if info else 0,
                               vm_names.get(serial) or (info.comm if info else "?"))
        for (serial, key), st in snapshot.exits.items():
            if serial in self.dropped_vms:
                continue
            suffix = (exits_mod.KIND_NAMES[key.kind],
                      exitcodes.ISA_NAMES.get(key.isa, "") if key.kind == exits_mod.HW
                      else "", key.name)
            own[serial][suffix] = exits_mod.merge(own[serial].get(suffix), st)
        self._own_exits = dict(own)
        merged = dict(self.carried_exits)
        for serial, suffixes in self._own_exits.items():
            ident = self.identities[serial]
            for suffix, st in suffixes.items():
                merged[ident + suffix] = exits_mod.merge(merged.get(ident + suffix), st)
        names = ["vm", "pid", "kind", "isa", "reason"]
        total = CounterMetricFamily(
            "ioregtrace_exits", "VM exits by reason: kind hardware (kvm:kvm_exit, where "
            "the KVM backend emits it; VMX basic reason or SVM exit code) or userspace "
            "(returns from KVM_RUN, by kvm_run.exit_reason).", labels=names)
        timing = HistogramMetricFamily(
            "ioregtrace_exit_handling_seconds", "hardware: kvm_exit to the next kvm_entry "
            "on the vCPU, for exits kvm.ko handled without returning to the VMM; "
            "userspace: the VMM's round trip, KVM_RUN's return to its next KVM_RUN.",
            labels=names)
        for labels in sorted(merged):
            st = merged[labels]
            total.add_metric(list(labels), st.count)
            if st.timed:
                timing.add_metric(list(labels), histogram_buckets(st.slots), st.sum_ns / 1e9)
        return total, timing

    def _cap(self, counts):
        """(admitted series, {path: other count}) under --max-series."""
        series, other = {}, collections.Counter(self.other_base)
        # Those admitted before keep their place; new ones come busiest first.
        order = lambda k: (self.admitted.get(k, float("inf")), -counts[k], k)  # noqa: E731
        for labels in sorted(counts, key=order):
            if labels not in self.admitted and labels not in self.folded:
                if self.max_series is None or len(self.admitted) < self.max_series:
                    self.admitted[labels] = len(self.admitted) + len(self.folded)
                else:
                    self.folded.add(labels)
            if labels in self.admitted:
                series[labels] = counts[labels]
            else:
                other[labels[5]] += counts[labels]
                self._last_folded[labels] = counts[labels]
        return series, other


def _build_info():
    info = InfoMetricFamily("ioregtrace_build", "ioregtrace version and host.")
    info.add_metric([], {"version": __version__, "kernel": platform.release(),
                         "bcc": _bcc_version()})
    return info


def _bcc_version():
    try:
        import bcc
        return getattr(bcc, "__version__", "unknown")
    except ImportError:
        return "none"


class LateExporter:
    """The collector registered before the session exists: until ready()
    hands it the Exporter, a scrape gets ioregtrace_build_info alone."""

    def __init__(self):
        self._exporter = None

    def ready(self, exporter):
        self._exporter = exporter

    def collect(self):
        if self._exporter is not None:
            return self._exporter.collect()
        return [_build_info()]


# -- the HTTP server ---------------------------------------------------------

class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """A thread per scrape.  prometheus_client's own server listens with
    socketserver's backlog of 5: with 20 scrapers connecting at once the
    kernel drops the SYNs past it, and a scraper retrying after 1, 3, 7 s
    timed out under load.  Connections wait in the kernel's queue instead."""
    daemon_threads = True
    request_queue_size = 128


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):      # no line per scrape on stderr
        pass


def start_server(host, port, registry):
    """Serve /metrics of `registry` on host:port from a daemon thread; the
    server (call .shutdown() to stop).  Raises OSError if it cannot listen."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    server_class = type("Server", (_Server,), {"address_family": family})
    server = wsgiref.simple_server.make_server(host, port, make_wsgi_app(registry),
                                               server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
