"""The ioregtrace command line."""

import json
import os
import sys
import tempfile

import click

from . import __version__
from .errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _PassThrough(click.Command):
    """Commands that take `-- CMD [ARGS...]`: everything after `--` is CMD's."""

    def parse_args(self, ctx, args):
        if "--" in args:
            i = args.index("--")
            args, ctx.meta["cmd"] = args[:i], args[i + 1:]
            if not ctx.meta["cmd"]:
                raise click.UsageError("`--` must be followed by a command", ctx)
        else:
            ctx.meta["cmd"] = []
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if "unexpected extra argument" in e.message:
                e.message += "; a command to run goes after `--`"
            raise

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        optional = ""
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):   # optional ones nest: [INTERVAL [COUNT]]
                pieces.append(("[" if not param.required else "") + param.make_metavar(ctx))
                optional += "]" if not param.required else ""
        if optional:
            pieces[-1] += optional
        return pieces + ["[-- CMD [ARGS]...]"]


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ioregtrace")
def cli():
    """How KVM dispatches guest device accesses, per VM and device region.

    Every guest MMIO/PIO access that kvm.ko reports is classified by the path
    that served it: ioeventfd (signalled an eventfd in the kernel), coalesced
    (buffered in the coalesced MMIO/PIO ring), kernel (emulated in kvm.ko:
    LAPIC, IOAPIC, PIT, PIC), userspace (KVM_RUN returned KVM_EXIT_MMIO/IO to
    the VMM), or ioregionfd (kernels that have it).  Userspace round trips
    are timed.  Needs root (CAP_BPF + CAP_PERFMON); `ioregtrace doctor`
    checks the rest.
    """


def _target_options(f):
    f = click.option("-p", "--pid", "pids", type=int, multiple=True, metavar="PID",
                     help="Trace this VMM process (repeatable). Default: every KVM VM.")(f)
    f = click.option("-d", "--duration", type=float, metavar="SECONDS",
                     help="Stop after SECONDS and report; with -- CMD, then end CMD (a QEMU "
                          "is quit over QMP, anything else gets SIGTERM). Default: until CMD "
                          "or the -p processes exit, or Ctrl-C.")(f)
    f = click.option("--qmp", type=click.Path(dir_okay=False), metavar="SOCKET",
                     help="With one -p: that QEMU's QMP unix socket, for its region names "
                          "as they were at attach.")(f)
    return f


def _render(recording, shape):
    from . import report as report_mod
    from .recording import render
    from .views import exits as exits_view
    from .views import stat as stat_view
    if shape.exits:
        args = dict(per_vcpu=shape.per_vcpu, sort=shape.sort, top=shape.top, vm=shape.vm)
        if shape.fmt == "json":
            return json.dumps(exits_view.to_json(recording, **args), indent=1) + "\n"
        if shape.fmt == "csv":
            return exits_view.to_csv(recording, **args)
        return exits_view.table(recording, **args)
    result = report_mod.shape(render(recording, by=shape.by), sort=shape.sort, top=shape.top,
                              vm=shape.vm)
    if shape.fmt == "json":
        return json.dumps(stat_view.to_json(result), indent=1) + "\n"
    if shape.fmt == "csv":
        return stat_view.to_csv(result)
    return stat_view.table(result)


def _table_options(f):
    """How `stat` and `report` show their rows."""
    from .exits import SORTS as EXIT_SORTS
    from .report import SORTS
    f = click.option("--vm", metavar="NAME",
                     help="Only this VM's rows (QEMU's -name, else the process name or pid); "
                          "totals are then that VM's.")(f)
    f = click.option("--top", type=click.IntRange(min=1), metavar="N",
                     help="Show the first N rows; totals and candidates still count all.")(f)
    f = click.option("--sort", type=click.Choice(list(dict.fromkeys([*SORTS, *EXIT_SORTS]))),
                     default="count", show_default=True,
                     help="Row order: most accesses, highest userspace latency (p50, p99, "
                          "max), or by region name, guest address or path; with --exits: "
                          "count, time (total), p50, p99, max or reason.")(f)
    f = click.option("--csv", "as_csv", is_flag=True,
                     help="Write CSV rows (a header line, then one line per row).")(f)
    f = click.option("--json", "as_json", is_flag=True,
                     help="Write JSON instead of a table.")(f)
    return f


def _shape(as_json, as_csv, by, sort, top, vm, exits=False, per_vcpu=False):
    from .exits import SORTS as EXIT_SORTS
    from .report import SORTS
    from .views.periodic import Shape
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    if sort not in (EXIT_SORTS if exits else SORTS):
        raise click.UsageError(f"--sort {sort} sorts {'accesses' if exits else 'exits'}; "
                               f"{'with' if exits else 'without'} --exits use one of "
                               f"{', '.join(EXIT_SORTS if exits else SORTS)}")
    return Shape(fmt="json" if as_json else "csv" if as_csv else "table", by=by, sort=sort,
                 top=top, vm=vm, exits=exits, per_vcpu=per_vcpu)


def _exit_options(f):
    """Exit tracing: on unless --no-exits; --exits shows it."""
    f = click.option("--no-exits", is_flag=True,
                     help="Do not trace exits by reason (kvm:kvm_exit/kvm_entry, KVM_RUN "
                          "returns): the least cost per exit.")(f)
    return f


def check_output(path):
    """Before tracing, not after: an output file that cannot be written
    would lose everything traced.  An existing path was checked by click
    (click.Path(dir_okay=False, writable=True)); a new file needs a
    directory that exists and takes a new file (a read-only file system
    refuses even root)."""
    if path is None or os.path.exists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {path}: no directory {directory}")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ioregtrace-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _write(text, output):
    """The result to `output`, or stdout.  If the file cannot be written
    after all (its directory went away, the disk filled up), the result
    still reaches the user: on stdout, with a line on stderr that says so."""
    if output:
        try:
            with open(output, "w") as f:
                f.write(text)
            return
        except OSError as e:
            print(f"ioregtrace: cannot write {output} ({e.strerror}); the result follows "
                  "on stdout", file=sys.stderr)
    sys.stdout.write(text)
    sys.stdout.flush()


_by_option = click.option(
    "--by", type=click.Choice(["auto", "address", "region"]), default="auto", show_default=True,
    help="One row per device region, or per guest address. auto: by region when QEMU's "
         "region names are known.")


class _Seconds(click.ParamType):
    """INTERVAL: what else a word there may have been meant as is said."""
    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds; a command to run goes after "
                      "`--`", param, ctx)
        if not 0.1 <= seconds < float("inf"):
            self.fail(f"{value}: expected at least 0.1 seconds", param, ctx)
        return seconds


@cli.command(cls=_PassThrough, context_settings=CONTEXT)
@click.argument("every", metavar="INTERVAL", required=False, type=_Seconds())
@click.argument("count", metavar="COUNT", required=False, type=click.IntRange(min=1))
@_target_options
@_table_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the result to FILE instead of stdout.")
@_by_option
@click.option("--per-vcpu", is_flag=True,
              help="A row per vCPU thread too (TID column; JSON and CSV: tid): counts and "
                   "latencies of each vCPU.")
@click.option("--exits", "show_exits", is_flag=True,
              help="Show VM exits by reason instead of accesses: every exit kvm.ko reports "
                   "(kvm:kvm_exit, with its in-kernel handling time) and every return to "
                   "userspace (by kvm_run.exit_reason, with the VMM's round trip).")
@_exit_options
@click.pass_context
def stat(ctx, every, count, pids, duration, qmp, as_json, as_csv, sort, top, vm, output, by,
         per_vcpu, show_exits, no_exits):
    """Count guest device accesses by address and dispatch path.

    \b
    ioregtrace stat                       every KVM VM, until Ctrl-C
    ioregtrace stat -p 1234 -d 10         one VMM for 10 seconds
    ioregtrace stat -p 1234 --qmp /run/vm1.qmp
                                          a running QEMU, with region names
    ioregtrace stat --json -- qemu-system-x86_64 ...
                                          run CMD traced from its start;
                                          exit with CMD's status
    ioregtrace stat 1 10 --top 5          every second, 10 times, the
                                          5 busiest rows of that second
    ioregtrace stat 5 --json --vm web1    a JSON line per 5 s for one VM

    With INTERVAL, one table per INTERVAL seconds of the accesses made in
    it (--json: one JSON object per line; --csv: a time_s column first);
    after COUNT of them CMD is ended, as after -d.

    Rows: one per VM, device region (or address), op and path, with count,
    share, rate and, for the userspace path, latency p50/p99/max in
    microseconds (the time from the exit to the VMM's next KVM_RUN on that
    vCPU thread).  For QEMU, regions are QEMU's own (info mtree), as they
    were when each access was made; ioregtrace adds its own QMP monitor and
    -no-shutdown to a QEMU it starts (so it can read the final map; it then
    lets QEMU exit).  Ctrl-C prints what was gathered so far.
    """
    from .session import Session
    from .views import periodic

    if show_exits and no_exits:
        raise click.UsageError("--exits and --no-exits exclude each other")
    shape = _shape(as_json, as_csv, by, sort, top, vm, exits=show_exits, per_vcpu=per_vcpu)
    check_output(output)
    # Exit tables are per thread in the kernel whatever --per-vcpu says:
    # only the access keys need PER_VCPU.  Without --exits, exits are traced
    # only where they add to the access rows (their in-kernel time, where
    # kvm:kvm_exit fires): nothing is compiled that the output cannot show.
    from .requirements import hardware_virtualization
    exits = show_exits or (not no_exits and hardware_virtualization() is not None)
    session = Session(pids=pids, cmd=ctx.meta["cmd"], duration=duration, qmp=qmp,
                      per_vcpu=per_vcpu and not show_exits, exits=exits).start()
    try:
        if every is None:
            session.wait()
            _write(_render(session.recording(), shape), output)
        else:
            with _Series(output) as series:
                periodic.run(session, every, count, shape, series.emit)
    finally:
        status = session.finish()
    ctx.exit(status)


class _Series:
    """Where a periodic stat writes, interval by interval: FILE (opened
    before the first one) or stdout, flushed each time so that a reader
    of a pipe sees each interval when it ends.  If FILE fails on the way,
    the rest goes to stdout, and stderr says so."""

    def __init__(self, output):
        self.output, self.file = output, None

    def __enter__(self):
        if self.output:
            try:
                self.file = open(self.output, "w")
            except OSError as e:
                self._fail(e)
        return self

    def _fail(self, e):
        print(f"ioregtrace: cannot write {self.output} ({e.strerror}); the rest follows on "
              "stdout", file=sys.stderr)
        self.file = None

    def emit(self, text):
        if self.file is not None:
            try:
                self.file.write(text)
                self.file.flush()
                return
            except OSError as e:
                self._fail(e)
        sys.stdout.write(text)
        sys.stdout.flush()

    def __exit__(self, *exc):
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self._fail(e)


@cli.command(cls=_PassThrough, context_settings=CONTEXT)
@_target_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="The bundle to write (gzip'd JSON).")
@click.option("--events", type=click.IntRange(min=1), metavar="N",
              help="Also keep the first N accesses one by one (time, vCPU thread, address, "
                   "size, op, path, userspace latency).")
@click.option("--redact", is_flag=True, help="Leave out command lines and the host name.")
@_exit_options
@click.pass_context
def record(ctx, pids, duration, qmp, output, events, redact, no_exits):
    """Record a bug-report bundle: the same data as `stat`, plus host facts
    (kernel, CPU, BCC, KVM capabilities, probes attached or not and why),
    per-VM facts (QEMU version, command line, the memory maps used for
    names) and, with --events, raw access events.  `ioregtrace report FILE`
    renders it anywhere; `report --json` equals what `stat --json` would
    have printed.

    \b
    ioregtrace record -o vm.bundle -p 1234 -d 30
    ioregtrace record -o boot.bundle --events 100000 -- qemu-system-x86_64 ...
    """
    from . import bundle
    from .session import Session

    check_output(output)
    session = Session(pids=pids, cmd=ctx.meta["cmd"], duration=duration, qmp=qmp,
                      events=events, exits=not no_exits).start()
    try:
        session.wait()
        recording = session.recording()
        recording.host = bundle.host_facts()
        recording.created = bundle.now_iso()
        output = _write_bundle(bundle, output, recording, redact)
        n_events = len(recording.events.events) if recording.events else 0
        click.echo(f"ioregtrace: wrote {output}: {sum(recording.snapshot.accesses.values())} "
                   f"accesses, {len(recording.snapshot.accesses)} keys, {n_events} events",
                   err=True)
    finally:
        status = session.finish()
    ctx.exit(status)


def _write_bundle(bundle, output, recording, redact):
    """The bundle to `output`; if that fails after all, to a file of our
    own in the temporary directory, and say where.  Returns the path."""
    try:
        bundle.write(output, recording, redact=redact)
        return output
    except OSError as e:
        fd, fallback = tempfile.mkstemp(prefix="ioregtrace-", suffix=".bundle")
        os.close(fd)
        bundle.write(fallback, recording, redact=redact)
        print(f"ioregtrace: cannot write {output} ({e.strerror}); wrote the bundle to "
              f"{fallback} instead", file=sys.stderr)
        return fallback


@cli.command(context_settings=CONTEXT)
@click.argument("bundle_file", metavar="FILE", type=click.Path(dir_okay=False))
@_table_options
@_by_option
@click.option("--events", "list_events", is_flag=True,
              help="List the raw access events instead of the table.")
@click.option("--exits", "show_exits", is_flag=True,
              help="Show the VM exits by reason instead of accesses (as stat --exits).")
@click.option("--per-vcpu", is_flag=True, help="With --exits: a row per vCPU thread.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to FILE instead of stdout.")
def report(bundle_file, as_json, as_csv, sort, top, vm, by, list_events, show_exits, per_vcpu,
           output):
    """Render a bundle written by `ioregtrace record`, offline: the same
    tables as `stat`, or its raw events.  Reading a bundle never runs
    anything from it; a damaged or foreign file is one error line."""
    from . import bundle
    from .views import events as events_view

    if per_vcpu and not show_exits:
        raise click.UsageError("--per-vcpu needs --exits here (a bundle's accesses are "
                               "per VM unless recorded per vCPU)")
    shape = _shape(as_json, as_csv, by, sort, top, vm, exits=show_exits, per_vcpu=per_vcpu)
    check_output(output)
    recording = bundle.read(bundle_file)
    if list_events:
        text = events_view.render(recording, as_json)
    else:
        text = _render(recording, shape)
        if shape.fmt == "table":
            text = events_view.header(recording) + text
    _write(text, output)


@cli.command(cls=_PassThrough, context_settings=CONTEXT)
@_target_options
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, metavar="SECONDS", help="Refresh every SECONDS.")
@click.option("-b", "--batch", is_flag=True,
              help="Batch mode (as top -b): a plain-text frame with every row to stdout "
                   "every -i SECONDS, a blank line between frames; no terminal needed. "
                   "Width: $COLUMNS, else the terminal's, else 120.")
@click.option("-n", "--count", type=click.IntRange(min=1), metavar="N",
              help="Stop after N refreshes (N frames with -b); CMD is ended as with q.")
@_exit_options
@click.pass_context
def top(ctx, pids, duration, qmp, interval, batch, count, no_exits):
    """Live view of guest device accesses (also installed as `ioregtop`).

    One row per VM x region x path: accesses/s and userspace latency
    p50/p99 in the last interval, total and share since start.  Keys: q
    quit, s sort, g group (region / address / path), p pid filter, space
    pause, h help.  CMD's output is discarded.  When the session ends by
    itself (CMD or the -p processes exit, -d, Ctrl-C) the final table is
    printed, rates and latency over the whole session; not after q or -n.

    \b
    ioregtop                              every KVM VM
    ioregtop -p 1234 --qmp /run/vm1.qmp   one QEMU, with region names
    ioregtop -b -i 5 -n 12 -p 1234        a frame every 5 s for a minute
    ioregtop -- qemu-system-x86_64 ...
    """
    import shutil
    import subprocess
    import time

    from .session import Session
    from .views import top as top_view

    if not batch and not sys.stdout.isatty():
        raise UserError("ioregtop needs a terminal; use `ioregtop -b` or `ioregtrace stat` "
                        "for output to a pipe or file")
    # Compiling the BPF program takes seconds (15 on a loaded machine);
    # without a word the terminal would stay blank that long.
    print("ioregtop: compiling and attaching the tracer (a few seconds, longer on a busy "
          "machine) ...", file=sys.stderr, flush=True)
    session = Session(pids=pids, cmd=ctx.meta["cmd"], duration=duration, qmp=qmp,
                      child_stdio=subprocess.DEVNULL, log=lambda msg: None,
                      exits=not no_exits).start()
    ended_by_us = False
    try:
        width = shutil.get_terminal_size((120, 24)).columns
        view = (top_view.batch(session, interval, count, sys.stdout, width) if batch
                else top_view.run(session, interval, count))
        ended_by_us = view.quit_pressed or view.counted_out
        if ended_by_us:
            session.end_command()
        session.stop()
        recording = session.recording()      # lets a QEMU paused at its shutdown exit
        if not ended_by_us:
            view.model.conclude(recording, time.monotonic(), session.vms_alive())
            width = shutil.get_terminal_size((120, 24)).columns
            ended = f"ended after {recording.duration_s:.1f} s"
            sys.stdout.write(("\n" if batch and view.refreshes else "")
                             + top_view.frame(view.model, width, ended))
            sys.stdout.flush()
    finally:
        status = session.finish()
    ctx.exit(0 if ended_by_us else status)


# serve --by address: a guest's VGA memory alone is tens of thousands of
# addresses, each a series (one QEMU gave 20,851 and 5 MB per scrape).
ADDRESS_SERIES_CAP = 1000


def series_cap(by, max_series):
    """--max-series as given, else the default for the labelling."""
    if max_series is None and by == "address":
        return ADDRESS_SERIES_CAP
    return max_series


def metrics_url(host, port):
    """The URL to scrape (an IPv6 address in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def _listen_address(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--listen {text}: expected HOST:PORT, e.g. 127.0.0.1:9860")
    return host, int(port)


@cli.command(cls=_PassThrough, context_settings=CONTEXT)
@_target_options
@click.option("--listen", default="127.0.0.1:9860", show_default=True, metavar="HOST:PORT",
              help="Where to serve /metrics. Loopback by default; anything else is "
                   "reachable from the network.")
@click.option("--by", type=click.Choice(["region", "address"]), default="region",
              show_default=True, help="Label series by region, or also by guest address.")
@click.option("--max-series", type=click.IntRange(min=1), metavar="N",
              help="Export at most N access series; further ones add to an 'other' series. "
                   f"Default: no cap by region, {ADDRESS_SERIES_CAP} with --by address (one "
                   "QEMU has tens of thousands of addresses).")
@click.option("--grace", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="Keep exporting a VM this long after it exits.")
@_exit_options
@click.pass_context
def serve(ctx, pids, duration, qmp, listen, by, max_series, grace, no_exits):
    """Serve the counts as Prometheus metrics on /metrics.

    \b
    ioregtrace_accesses_total{vm,pid,region,space,op,path}        counter
    ioregtrace_userspace_dispatch_seconds{vm,pid,region,space,op} histogram
    ioregtrace_lost_events_total, ioregtrace_dropped_keys_total   counters
    ioregtrace_vms, ioregtrace_series_folded                      gauges
    ioregtrace_build_info{version,kernel,bcc}                     info

    The maps are read at scrape time (at most 4 times a second).  It runs
    until Ctrl-C or -d; after CMD or the -p processes end it keeps serving
    their final counts for --grace seconds.  See dashboards/ for Grafana.
    """
    from prometheus_client import CollectorRegistry

    from .session import Session
    from .views.exporter import Exporter, LateExporter, start_server

    host, port = _listen_address(listen)
    # Listen first: a port that is taken is said at once, and a scraper is
    # answered (with ioregtrace_build_info) during the seconds the BPF
    # program takes to compile, instead of being refused.
    registry = CollectorRegistry(auto_describe=False)
    exporter = LateExporter()
    registry.register(exporter)
    try:
        server = start_server(host, port, registry)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    try:
        session = Session(pids=pids, cmd=ctx.meta["cmd"], duration=None, qmp=qmp,
                          exits=not no_exits).start()
    except BaseException:
        server.shutdown()
        raise
    status = 0
    try:
        exporter.ready(Exporter(session, by=by, max_series=series_cap(by, max_series),
                                grace_s=grace))
        if host not in ("127.0.0.1", "::1", "localhost"):
            session.log(f"warning: serving on {host}:{port}, reachable from the network")
        session.log(f"serving {metrics_url(host, port)}; Ctrl-C to stop")
        _serve_until_stopped(session, duration)
    finally:
        server.shutdown()
        status = session.finish()
    ctx.exit(status)


def _serve_until_stopped(session, duration):
    """Keep the session's data flowing until Ctrl-C or -d.  When CMD or the
    guest ends, conclude once (QEMU's final map; lets a paused QEMU exit)
    and keep serving the final counts."""
    import time
    concluded = False
    with session.stop_signals() as stop:
        while not stop.wait(0.1):
            with session.tracer.lock:
                session.tracer.poll()
                if session.done() and not concluded:
                    session.recording()
                    concluded = True
                    session.log("the traced VMs have ended; still serving their counts")
            if duration is not None and time.monotonic() - session.started >= duration:
                break
    session.stop()


def top_main():
    """The `ioregtop` console script: `ioregtrace top` under its own name."""
    main(sys.argv[1:], command=top, prog_name="ioregtop")


def _parse_counts(values):
    counts = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.isdigit():
            raise click.BadParameter(f"{value!r}: expected NAME=COUNT", param_hint="--set")
        counts[name] = int(count)
    return counts


@cli.command(context_settings=CONTEXT)
@click.option("--truth", type=click.Path(dir_okay=False, writable=True),
              help="Write the VMM's own count of what it did and saw (stat's JSON shape).")
@click.option("--scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Multiply every block's count.")
@click.option("--set", "sets", multiple=True, metavar="NAME=COUNT",
              help="Set one block's count (repeatable); see --list.")
@click.option("--delay-us", type=click.IntRange(min=0), default=1000, show_default=True,
              help="How long the device thread takes to answer a forwarded read.")
@click.option("--wait-signal", is_flag=True,
              help="Run the mix once as warm-up, then wait for SIGUSR1 before the "
                   "measured pass (for attaching with -p); --truth covers that pass.")
@click.option("--churn", is_flag=True,
              help="After the measured pass, deassign the datamatch ioeventfd and "
                   "unregister the coalesced zones, then run the mix again.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run the measured pass this many times (a long-running VM).")
@click.option("--pass-log", type=click.Path(dir_okay=False, writable=True),
              help="After each measured pass, append a line: CLOCK_MONOTONIC seconds, "
                   "vCPU thread CPU seconds, accesses so far (make bench reads it).")
@click.option("--cpuid", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N", help="Execute CPUID N times first in the measured pass (exits "
                                "kvm.ko handles itself, with no device access).")
@click.option("--list", "list_mix", is_flag=True, help="Print the mix and exit.")
def demo(truth, scale, sets, delay_us, wait_signal, churn, repeat, pass_log, cpuid, list_mix):
    """Run the built-in demo VM: a tiny VMM on /dev/kvm whose guest makes a
    known mix of device accesses over every dispatch path.

    \b
    ioregtrace stat -- ioregtrace demo     trace it (what `make demo` does)
    ioregtrace demo --truth truth.json     its own count, to compare with stat
    """
    from .demo import mix, run

    counts = _parse_counts(sets)
    if list_mix:
        try:
            blocks = mix.build_mix(scale, counts)
        except ValueError as e:
            raise UserError(str(e)) from None
        for b in blocks:
            for i, a in enumerate(b.body):
                label = b.name if i == 0 else "  then"
                click.echo(f"{label:18} {str(a.space):4} {a.address:#12x} {a.size} "
                           f"{str(a.op):5} x{b.count * a.rep:<7} meant for {a.expect}")
        return
    try:
        run.run(scale=scale, counts=counts, delay_us=delay_us, wait_signal=wait_signal,
                churn=churn, repeat=repeat, truth_path=truth, pass_log=pass_log,
                cpuid=cpuid)
    except ValueError as e:
        raise UserError(str(e)) from None


@cli.command(context_settings=CONTEXT)
@click.option("--fix", is_flag=True,
              help="Apply the fixes that can be automated (mounts, kernel header tree).")
def doctor(fix):
    """Check what ioregtrace needs: privileges, debugfs/tracefs, each
    tracepoint, BCC, kernel headers, /dev/kvm.  Exit 1 if a required one is
    missing."""
    from . import requirements

    checks = requirements.all_checks()
    if fix:
        for check in checks:
            if not check.ok and check.fixer:
                click.echo(f"fixing: {check.name} ...")
                try:
                    check.fixer()
                except Exception as e:   # report and go on with the others
                    click.echo(f"  failed: {e}")
        checks = requirements.all_checks()
    for check in checks:
        mark = "ok" if check.ok else ("missing" if check.required else "absent")
        line = f"[{mark:7}] {check.name}: {check.detail}"
        if not check.ok:
            line += f"\n          fix: {check.fix}"
        click.echo(line)
    if any(c.required and not c.ok for c in checks):
        raise SystemExit(1)


def main(argv=None, command=None, prog_name="ioregtrace"):
    """Entry point: every failure the user can cause or fix is one line on
    stderr, never a traceback.  Usage errors exit 2, everything else 1."""
    try:
        status = (command or cli).main(args=argv, prog_name=prog_name, standalone_mode=False)
        sys.exit(status or 0)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        print(f"ioregtrace: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        print(f"ioregtrace: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("ioregtrace: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"ioregtrace: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("ioregtrace: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
