"""`ioregtrace stat` output: a table for people, a stable JSON for programs."""

import csv
import io

from tabulate import tabulate

from .. import candidates
from ..keys import Path

JSON_VERSION = 1
# Paths whose latency, where kvm:kvm_exit fires, is the exit's in-kernel handling
IN_KERNEL = (Path.KERNEL, Path.IOEVENTFD, Path.COALESCED, Path.UNATTRIBUTED)


def _us(value):
    return f"{value:.1f}" if value is not None else "-"


def who(row):
    name = f" ({row.vm_name})" if row.vm_name else ""
    return f"{row.key.pid}/{row.comm}{name}"


def table(report, brief=False):
    """The table; `brief` (one of a periodic series) leaves out what does
    not change from one interval to the next: explanations, candidates, notes."""
    total = report.total
    duration = max(report.duration_s, 1e-9)
    by_region = report.by == "region"
    show_calls = any(r.qemu_calls is not None for r in report.rows)
    per_vcpu = report.per_vcpu
    body = []
    for r in report.rows:
        lat = r.latency
        address = f"{r.key.address:#x}" + ("+" if by_region and len(r.addresses) > 1 else "")
        size = ",".join(str(s) for s in sorted(r.sizes)) if by_region else r.key.size
        line = [who(r)] + ([r.key.tid] if per_vcpu else []) + [
                r.region if r.region is not None else "(unassigned)",
                str(r.key.space), address, size, str(r.key.op), str(r.key.path), r.count]
        if show_calls:
            line.append(r.qemu_calls if r.qemu_calls is not None else "-")
        line += [f"{100.0 * r.count / total:.1f}" if total else "-",
                 f"{r.count / duration:.1f}",
                 _us(lat and lat.p50_us), _us(lat and lat.p99_us), _us(lat and lat.max_us)]
        body.append(line)
    headers = ["PID/COMM", "REGION", "SPACE", "ADDRESS", "SIZE", "OP", "PATH", "COUNT"]
    align = ["left", "left", "left", "right", "right", "left", "left", "right"]
    if per_vcpu:
        headers.insert(1, "TID")
        align.insert(1, "right")
    if show_calls:
        headers.append("CALLS")
        align.append("right")
    headers += ["%", "RATE/s", "P50us", "P99us", "MAXus"]
    align += ["right"] * 5
    lines = [tabulate(body, headers=headers, disable_numparse=True, colalign=align)
             if body else "(no guest device accesses seen)"]
    if report.hidden:
        lines.append(f"... {len(report.hidden)} more row(s) with "
                     f"{sum(r.count for r in report.hidden)} accesses (--top)")
    by_path = report.totals_by_path()
    parts = ", ".join(f"{path} {by_path[path]}" for path in Path if by_path.get(path))
    lines.append("")
    lines.append(f"Total: {total} accesses in {report.duration_s:.2f} s "
                 f"({total / duration:.1f}/s){': ' + parts if parts else ''}")
    if brief:
        if report.lost_events or report.dropped_keys:
            lines.append(f"Lost events: {report.lost_events}, "
                         f"dropped keys: {report.dropped_keys}")
        return "\n".join(lines) + "\n"
    lines.append(f"Lost events: {report.lost_events}, dropped keys: {report.dropped_keys}")
    lines.append("Latency: userspace exit to next KVM_RUN on the same thread (ioregionfd: "
                 "command sent to response received); p50/p99 are upper bounds within "
                 "12.5 %.")
    if any(r.stats is not None and r.key.path in IN_KERNEL for r in report.rows):
        lines.append("Latency of kernel, ioeventfd and coalesced rows: the in-kernel "
                     "handling of the exit that carried the access (kvm_exit -> kvm_entry).")
    if show_calls:
        lines.append("CALLS: how many times QEMU called the region's handler for these "
                     "accesses (it splits accesses wider than the handler implements and "
                     "refuses sizes the region does not accept).")
    ranked = candidates.rank(report)
    if ranked:
        lines += ["", "Candidates for ioregionfd (time spent in userspace round trips; "
                  "IOREGIONFD: this VM's measured round trip for the same op and size):",
                  candidates_table(ranked)]
    for note in report.notes:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def candidates_table(ranked):
    body = [[f"{c.pid}/{c.comm}", c.region if c.region is not None else "(unassigned)",
             c.op, c.size, c.count, f"{c.userspace_mean_us:.1f}", f"{c.userspace_ms:.1f}",
             _us(c.ioregionfd_mean_us),
             f"{c.saving_ms:.1f}" if c.saving_ms is not None else "-"]
            for c in ranked]
    return tabulate(body, headers=["PID/COMM", "REGION", "OP", "SIZE", "COUNT", "USERSPACEus",
                                   "TOTALms", "IOREGIONFDus", "SAVESms"],
                    disable_numparse=True,
                    colalign=["left", "left", "left"] + ["right"] * 6)


def to_json(report):
    rows = []
    for r in report.rows:
        lat = r.latency
        row = {
            "pid": r.key.pid, "comm": r.comm, "space": str(r.key.space),
            "address": r.key.address, "size": r.key.size, "op": str(r.key.op),
            "path": str(r.key.path), "region": r.region, "count": r.count,
            "latency_us": None if lat is None else
            {"p50": lat.p50_us, "p99": lat.p99_us, "max": lat.max_us},
        }
        if r.vm_name is not None:
            row["vm_name"] = r.vm_name
        if r.key.tid:
            row["tid"] = r.key.tid
        if report.by == "region":
            row["addresses"] = len(r.addresses)
            row["sizes"] = {str(size): n for size, n in sorted(r.sizes.items())}
        if r.qemu_calls is not None:
            row["qemu_calls"] = r.qemu_calls
            row["qemu_rejected"] = r.qemu_rejected
        rows.append(row)
    return {"version": JSON_VERSION, "duration_s": report.duration_s,
            "lost_events": report.lost_events, "dropped_keys": report.dropped_keys,
            "by": report.by, "rows": rows, "rows_omitted": len(report.hidden),
            "total": report.total, "diagnostics": report.diagnostics,
            "candidates": [c.as_dict() for c in candidates.rank(report)],
            "notes": report.notes}


CSV_COLUMNS = ("pid", "tid", "comm", "vm_name", "region", "space", "address", "size", "op",
               "path", "count", "rate_per_s", "p50_us", "p99_us", "max_us")


def csv_rows(report):
    """One list per row, in CSV_COLUMNS order: the shown rows (--top cuts
    them, as it cuts the table); a region row's address is its lowest and
    its size the largest."""
    duration = max(report.duration_s, 1e-9)
    out = []
    for r in report.rows:
        lat = r.latency
        out.append([r.key.pid, r.key.tid or "", r.comm, r.vm_name or "", r.region or "",
                    str(r.key.space),
                    f"{r.key.address:#x}", r.key.size, str(r.key.op), str(r.key.path), r.count,
                    f"{r.count / duration:.3f}"] +
                   ["" if lat is None else f"{v:.3f}"
                    for v in ((lat and lat.p50_us), (lat and lat.p99_us), (lat and lat.max_us))])
    return out


def to_csv(report, time_s=None, header=True):
    """The rows as CSV text.  A periodic series puts the end of each
    interval (seconds since start) in a first column, time_s, and writes
    the header line only once."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    lead = [] if time_s is None else [f"{time_s:.3f}"]
    if header:
        writer.writerow((["time_s"] if lead else []) + list(CSV_COLUMNS))
    for row in csv_rows(report):
        writer.writerow(lead + row)
    return buf.getvalue()
