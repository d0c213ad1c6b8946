"""`ioregtrace stat` output: a table for people, a stable JSON for programs."""

from tabulate import tabulate

from ..keys import Path

JSON_VERSION = 1


def _us(value):
    return f"{value:.1f}" if value is not None else "-"


def table(report):
    total = report.total
    duration = max(report.duration_s, 1e-9)
    body = []
    for r in report.rows:
        lat = r.latency
        body.append([
            f"{r.key.pid}/{r.comm}", r.region, str(r.key.space), f"{r.key.address:#x}",
            r.key.size, str(r.key.op), str(r.key.path), r.count,
            f"{100.0 * r.count / total:.1f}" if total else "-",
            f"{r.count / duration:.1f}",
            _us(lat and lat.p50_us), _us(lat and lat.p99_us), _us(lat and lat.max_us),
        ])
    headers = ["PID/COMM", "REGION", "SPACE", "ADDRESS", "SIZE", "OP", "PATH", "COUNT",
               "%", "RATE/s", "P50us", "P99us", "MAXus"]
    lines = [tabulate(body, headers=headers, disable_numparse=True,
                      colalign=("left", "left", "left", "right", "right", "left", "left",
                                "right", "right", "right", "right", "right", "right"))
             if body else "(no guest device accesses seen)"]
    by_path = report.totals_by_path()
    parts = ", ".join(f"{path} {by_path[path]}" for path in Path if by_path.get(path))
    lines.append("")
    lines.append(f"Total: {total} accesses in {report.duration_s:.2f} s "
                 f"({total / duration:.1f}/s){': ' + parts if parts else ''}")
    lines.append(f"Lost events: {report.lost_events}, dropped keys: {report.dropped_keys}")
    lines.append("Latency: userspace exit to next KVM_RUN on the same thread; "
                 "p50/p99 are upper bounds within 12.5 %.")
    for note in report.notes:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def to_json(report):
    rows = []
    for r in report.rows:
        lat = r.latency
        rows.append({
            "pid": r.key.pid, "comm": r.comm, "space": str(r.key.space),
            "address": r.key.address, "size": r.key.size, "op": str(r.key.op),
            "path": str(r.key.path), "region": r.region, "count": r.count,
            "latency_us": None if lat is None else
            {"p50": lat.p50_us, "p99": lat.p99_us, "max": lat.max_us},
        })
    return {"version": JSON_VERSION, "duration_s": report.duration_s,
            "lost_events": report.lost_events, "dropped_keys": report.dropped_keys,
            "rows": rows, "diagnostics": report.diagnostics, "notes": report.notes}
