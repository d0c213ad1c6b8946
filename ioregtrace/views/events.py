"""`ioregtrace report`: the bundle's header and its raw access events."""

import json

from tabulate import tabulate

from ..keys import Op, Path, Space


def header(recording):
    host = recording.host or {}
    kvm = host.get("kvm") or {}
    lines = [f"Recorded {recording.created or '?'} on {host.get('hostname') or '(redacted)'}: "
             f"kernel {host.get('kernel', '?')}, {host.get('cpu') or '?'}, "
             f"BCC {host.get('bcc') or '?'}, KVM caps {kvm.get('caps', kvm.get('error', '?'))}"]
    for name, why in sorted((recording.probes or {}).get("unavailable", {}).items()):
        lines.append(f"Probe not attached: {name}: {why}")
    for serial, facts in sorted(recording.vms.items()):
        if facts.qemu_version or facts.cmdline:
            cmd = " ".join(facts.cmdline) if facts.cmdline else "(command line not kept)"
            lines.append(f"VM {serial}: QEMU {facts.qemu_version or '?'}: {cmd}")
    return "\n".join(lines) + "\n\n"


def render(recording, as_json):
    ev = recording.events
    if ev is None:
        return ("[]\n" if as_json else
                "This bundle has no raw events (record with --events N).\n")
    start = ev.events[0].ts_ns if ev.events else 0
    if as_json:
        return json.dumps({"requested": ev.requested, "lost": ev.lost, "events": [
            {"t_ns": e.ts_ns - start, "tid": e.tid, "pid": e.pid, "space": str(Space(e.space)),
             "address": e.address, "size": e.size, "op": str(Op(e.op)),
             "path": str(Path(e.path)), "count": e.count, "latency_ns": e.latency_ns}
            for e in ev.events]}, indent=1) + "\n"
    body = [[f"{(e.ts_ns - start) / 1e9:.6f}", e.tid, e.pid, str(Space(e.space)),
             f"{e.address:#x}", e.size, str(Op(e.op)), str(Path(e.path)), e.count,
             "-" if e.latency_ns is None else f"{e.latency_ns / 1000:.1f}"]
            for e in ev.events]
    table = tabulate(body, headers=["TIME s", "TID", "PID", "SPACE", "ADDRESS", "SIZE", "OP",
                                    "PATH", "N", "LAT us"], disable_numparse=True)
    return (f"{table}\n\n{len(ev.events)} event(s) of {ev.requested} requested, "
            f"{ev.lost} lost\n")
