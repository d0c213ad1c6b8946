"""`ioregtrace stat --exits`: exits by reason, as perf kvm stat shows them
(samples, share, share of the time, min/avg/max) plus p50/p99 from the
kernel's histograms; a table, JSON or CSV."""

import csv
import io

from tabulate import tabulate

from .. import exitcodes
from .. import exits as exits_mod
from ..recording import naming
from .stat import JSON_VERSION

TITLES = {
    exits_mod.HW: "VM exits (kvm:kvm_exit); time: kvm_exit -> next kvm_entry on the vCPU, "
                  "for exits handled in kvm.ko (TO-VMM: went to userspace first, not timed)",
    exits_mod.USER: "Returns to userspace (KVM_RUN, by kvm_run.exit_reason); time: the VMM's "
                    "round trip, the return -> its next KVM_RUN on that thread",
}


def build(recording, per_vcpu=False, sort="count", top=None, vm=None):
    """(hardware ExitTable or None, userspace ExitTable, notes, hidden
    rows {kind: [ExitRow]}) of a Recording."""
    _, vm_names = naming(recording)
    snap = recording.snapshot
    hw, user, notes = exits_mod.tables(snap, recording.duration_s, per_vcpu=per_vcpu,
                                       vm_names=vm_names, sort=sort, vm=vm)
    hidden = {}
    for t in (hw, user):
        if t is not None and top is not None and len(t.rows) > top:
            hidden[t.kind] = t.rows[top:]
            t.rows = t.rows[:top]
    if vm is not None and not (user.rows or (hw and hw.rows)) and snap.exits:
        notes.append(f"--vm {vm}: no exit of a VM of that name, process name or pid")
    return hw, user, list(recording.notes) + notes, hidden


def who(row):
    name = f" ({row.vm_name})" if row.vm_name else ""
    return f"{row.pid}/{row.comm}{name}"


def _us(v):
    return "-" if v is None else f"{v:.1f}"


def _cells(row, table_total, table_ns):
    s = row.stats
    timed = s.timed
    return {
        "count": s.count,
        "pct": 100.0 * s.count / table_total if table_total else 0.0,
        "to_user": s.to_user, "timed": timed,
        "time_pct": 100.0 * s.sum_ns / table_ns if table_ns and timed else None,
        "min_us": s.min_ns / 1000.0 if timed else None,
        "avg_us": row.mean_us,
        "max_us": s.max_ns / 1000.0 if timed else None,
        "p50_us": row.quantile_us(0.50) if timed else None,
        "p99_us": row.quantile_us(0.99) if timed else None,
    }


def _totals(table, hidden):
    rows = table.rows + hidden.get(table.kind, [])
    return sum(r.stats.count for r in rows), sum(r.stats.sum_ns for r in rows)


def _one_table(table, hidden, per_vcpu):
    total, total_ns = _totals(table, hidden)
    hw = table.kind == exits_mod.HW
    body = []
    for r in table.rows:
        c = _cells(r, total, total_ns)
        line = [who(r)] + ([r.key.tid] if per_vcpu else [])
        if hw:
            line.append(exitcodes.ISA_NAMES.get(r.key.isa, str(r.key.isa)))
        line += [r.name, c["count"], f"{c['pct']:.2f}"]
        if hw:
            line.append(c["to_user"])
        line += [("-" if c["time_pct"] is None else f"{c['time_pct']:.2f}"),
                 _us(c["min_us"]), _us(c["avg_us"]), _us(c["max_us"]), _us(c["p50_us"]),
                 _us(c["p99_us"])]
        body.append(line)
    headers = ["PID/COMM"] + (["TID"] if per_vcpu else []) + (["ISA"] if hw else []) + [
        "REASON", "SAMPLES", "SAMPLES%"] + (["TO-VMM"] if hw else []) + [
        "TIME%", "MINus", "AVGus", "MAXus", "P50us", "P99us"]
    align = ["left"] + (["right"] if per_vcpu else []) + (["left"] if hw else []) + \
        ["left"] + ["right"] * (len(headers) - 2 - per_vcpu - hw)
    lines = [TITLES[table.kind] + ":"]
    lines.append(tabulate(body, headers=headers, disable_numparse=True, colalign=align)
                 if body else "(none seen)")
    more = hidden.get(table.kind)
    if more:
        lines.append(f"... {len(more)} more row(s) with "
                     f"{sum(r.stats.count for r in more)} exits (--top)")
    duration = max(table.duration_s, 1e-9)
    lines.append(f"Total: {total} exits in {table.duration_s:.2f} s ({total / duration:.1f}/s)"
                 f", {total_ns / 1e6:.3f} ms timed")
    return "\n".join(lines)


def table(recording, per_vcpu=False, sort="count", top=None, vm=None, brief=False):
    hw, user, notes, hidden = build(recording, per_vcpu, sort, top, vm)
    # Said first, once: without it the missing table would read as "no exits".
    first = [n for n in notes if n.startswith("kvm:kvm_exit")]
    notes = [n for n in notes if n not in first]
    parts = [f"Note: {n}" for n in first]
    if hw is not None:
        parts.append(_one_table(hw, hidden, per_vcpu))
    parts.append(_one_table(user, hidden, per_vcpu))
    lines = ["\n\n".join(parts), ""]
    counters = recording.snapshot.counters
    lost = counters.get("lost_events", 0)
    dropped = counters.get("dropped_exits", 0)
    if not brief or lost or dropped:
        lines.append(f"Lost events: {lost}, dropped exits: {dropped}")
    if not brief:
        lines.append("MIN/AVG/MAX exact; P50/P99 are upper bounds within 12.5 %.")
    for note in notes if not brief else []:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def _json_rows(table, hidden, per_vcpu):
    total, total_ns = _totals(table, hidden)
    out = []
    for r in table.rows:
        c = _cells(r, total, total_ns)
        row = {"pid": r.pid, "comm": r.comm, "reason": r.key.reason, "name": r.name,
               "count": c["count"], "timed": c["timed"],
               "time_us": None if not c["timed"] else
               {k: c[f"{k}_us"] for k in ("min", "avg", "max", "p50", "p99")},
               "time_ns": r.stats.sum_ns}
        if table.kind == exits_mod.HW:
            row["isa"] = exitcodes.ISA_NAMES.get(r.key.isa, r.key.isa)
            row["to_user"] = c["to_user"]
        else:
            row["errno"] = r.key.err
        if r.vm_name is not None:
            row["vm_name"] = r.vm_name
        if per_vcpu:
            row["tid"] = r.key.tid
        out.append(row)
    return {"rows": out, "total": total, "rows_omitted": len(hidden.get(table.kind, []))}


def to_json(recording, per_vcpu=False, sort="count", top=None, vm=None):
    hw, user, notes, hidden = build(recording, per_vcpu, sort, top, vm)
    counters = recording.snapshot.counters
    doc = {"version": JSON_VERSION, "duration_s": recording.duration_s,
           "hardware": None if hw is None else _json_rows(hw, hidden, per_vcpu),
           "userspace": _json_rows(user, hidden, per_vcpu),
           "lost_events": counters.get("lost_events", 0),
           "dropped_exits": counters.get("dropped_exits", 0), "notes": notes}
    if recording.bpf_programs:
        doc["bpf_programs"] = {name: {"run_cnt": n, "run_time_ns": ns}
                               for name, (n, ns) in sorted(recording.bpf_programs.items())}
        cost = exit_cost_ns(recording.bpf_programs)
        if cost is not None:
            doc["bpf_ns_per_exit"] = cost
    return doc


# The programs exit tracing adds (BCC's names for them).
EXIT_PROGRAMS = ("tracepoint__kvm__kvm_exit", "raw_tracepoint__kvm_entry")


def exit_cost_ns(programs):
    """BPF time per hardware exit, by the kernel's accounting: the
    kvm_exit and kvm_entry programs' run time over the exits (None when
    they did not run)."""
    runs = programs.get(EXIT_PROGRAMS[0], (0, 0))[0]
    if not runs:
        return None
    return sum(programs.get(name, (0, 0))[1] for name in EXIT_PROGRAMS) / runs


CSV_COLUMNS = ("kind", "pid", "tid", "comm", "vm_name", "isa", "reason", "name", "count",
               "pct", "to_user", "timed", "time_pct", "min_us", "avg_us", "max_us", "p50_us",
               "p99_us")


def to_csv(recording, per_vcpu=False, sort="count", top=None, vm=None, time_s=None,
           header=True):
    hw, user, _, hidden = build(recording, per_vcpu, sort, top, vm)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    lead = [] if time_s is None else [f"{time_s:.3f}"]
    if header:
        writer.writerow((["time_s"] if lead else []) + list(CSV_COLUMNS))
    num = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for t in (hw, user):
        if t is None:
            continue
        total, total_ns = _totals(t, hidden)
        for r in t.rows:
            c = _cells(r, total, total_ns)
            hw_row = t.kind == exits_mod.HW
            writer.writerow(lead + [
                exits_mod.KIND_NAMES[t.kind], r.pid, r.key.tid if per_vcpu else "", r.comm,
                r.vm_name or "",
                exitcodes.ISA_NAMES.get(r.key.isa, "") if hw_row else "",
                r.key.reason, r.name, c["count"], num(c["pct"]),
                c["to_user"] if hw_row else "", c["timed"], num(c["time_pct"]),
                num(c["min_us"]), num(c["avg_us"]), num(c["max_us"]), num(c["p50_us"]),
                num(c["p99_us"])])
    return buf.getvalue()
