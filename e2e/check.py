"""What an end-to-end run must show (issue 17's acceptance), as lists of
problems in words: empty means it holds.

- QEMU's own account: per region and op, the handler calls ioregtrace
  derives for the accesses QEMU dispatched itself (the userspace and
  coalesced paths) equal the calls QEMU logged (memory_region_ops_*, every
  thread: vCPUs and the main loop draining coalesced writes), and so do the
  bytes, where QEMU refused no piece.
- The paths a user expects, by region name.
- Nothing lost or dropped.
- The candidates ranking names the expected region first.
- The test VM's kernel (the ioregionfd series) printed no WARN, BUG,
  oops or lockdep report while the guest ran.
- With the built QEMU (issue 18): the ioregionfd accesses per region and
  op equal the commands its device thread received (its ioregionfd_*
  trace events), and the guest's data-integrity steps all printed their
  line."""

import collections

QEMU_DISPATCHED = ("userspace", "coalesced", "ioregionfd")
MUST_BE_ZERO = ("lost_events", "dropped_accesses", "dropped_latency",
                "dropped_registrations", "dropped_vms", "lost_layout")


def dispatched(stat):
    """{(region, op): [accesses, handler calls, bytes, refused pieces]}
    of the rows QEMU dispatched itself; calls None where unknown."""
    out = collections.defaultdict(lambda: [0, 0, 0, 0])
    for r in stat["rows"]:
        if r["path"] not in QEMU_DISPATCHED:
            continue
        entry = out[(r["region"], r["op"])]
        entry[0] += r["count"]
        calls = r.get("qemu_calls")
        entry[1] = None if calls is None or entry[1] is None else entry[1] + calls
        entry[2] += sum(int(size) * n for size, n in r["sizes"].items())
        entry[3] += r.get("qemu_rejected") or 0
    return out


# Regions QEMU's log shows calls of that no guest access makes: QEMU
# itself writes there.  A device without an irqfd (QEMU 7.2's NVMe)
# delivers each MSI by a write to the APIC's MSI window; a guest's own
# writes to 0xfee00000 are kvm.ko's LAPIC and never reach QEMU.
QEMU_OWN = {("kvm-apic-msi", "write"): "QEMU delivering device MSIs"}


def qemu_own(stat, log):
    """{(region, op): calls QEMU logged} of QEMU_OWN regions where the
    guest made no access."""
    ours = dispatched(stat)
    return {key: log[f"{key[0]}|{key[1]}"][0] for key in QEMU_OWN
            if f"{key[0]}|{key[1]}" in log and key not in ours}


def msi_interrupts(console, device):
    """How many MSI interrupts of `device` the guest handled (its
    /proc/interrupts, printed on the console at the end)."""
    total = 0
    for line in console.splitlines():
        fields = line.split()
        if "MSI" in line and device in line and fields and fields[0].endswith(":"):
            total += sum(int(f) for f in fields[1:] if f.isdigit())
    return total


def against_qemu_log(stat, log):
    """Differences from QEMU's own log ({"region|op": [calls, bytes]})."""
    problems = []
    ours = dispatched(stat)
    own = qemu_own(stat, log)
    logged = {tuple(k.split("|", 1)): v for k, v in log.items()
              if tuple(k.split("|", 1)) not in own}
    for key in sorted(set(ours) | set(logged), key=str):
        accesses, calls, nbytes, refused = ours.get(key, [0, 0, 0, 0])
        log_calls, log_bytes = logged.get(key, [0, 0])
        region, op = key
        if calls is None:
            problems.append(f"{region} {op}: QEMU's handler calls unknown "
                            f"({accesses} accesses)")
        elif calls != log_calls:
            problems.append(f"{region} {op}: {calls} handler calls from {accesses} accesses, "
                            f"QEMU logged {log_calls}")
        elif not refused and nbytes != log_bytes:
            problems.append(f"{region} {op}: {nbytes} bytes, QEMU logged {log_bytes}")
    return problems


def against_device_commands(stat, commands):
    """ioregtrace's ioregionfd accesses against the commands QEMU's device
    thread logged ({"region|op": [commands, bytes]}), per region and op."""
    ours = collections.defaultdict(lambda: [0, 0])
    for r in stat["rows"]:
        if r["path"] == "ioregionfd":
            entry = ours[f"{r['region']}|{r['op']}"]
            entry[0] += r["count"]
            entry[1] += sum(int(size) * n for size, n in r["sizes"].items())
    return [f"{key.replace('|', ' ')}: ioregtrace counted {ours.get(key, [0, 0])} "
            f"(accesses, bytes) on ioregionfd, QEMU's device thread got "
            f"{commands.get(key, [0, 0])}"
            for key in sorted(set(ours) | set(commands))
            if ours.get(key, [0, 0]) != commands.get(key, [0, 0])]


def console_checks(console, lines):
    return [f"the guest never printed 'E2E-CHECK {line}'" for line in lines
            if f"E2E-CHECK {line}" not in console]


def expected_paths(stat, pairs):
    seen = {(r["region"], r["path"]) for r in stat["rows"]}
    return [f"no {path} accesses to {region}" for region, path in pairs
            if (region, path) not in seen]


def forbidden_paths(stat, pairs):
    seen = {(r["region"], r["path"]) for r in stat["rows"]}
    return [f"{path} accesses to {region}, which should have none" for region, path in pairs
            if (region, path) in seen]


def nothing_dropped(stat):
    d = stat["diagnostics"]
    return [f"{name}: {d[name]}" for name in MUST_BE_ZERO if d.get(name)]


def top_final_table(text, pairs):
    """`ioregtop -b`: its last frame (the final table, printed when CMD
    ends) has a row for each expected (region, path)."""
    start = text.rfind("ioregtop ")        # each frame starts with its ioregtop line
    if start < 0:
        return ["ioregtop printed nothing"]
    last = text[start:].splitlines()
    return [f"ioregtop's final table has no {path} row for {region}" for region, path in pairs
            if not any(region in line.split() and path in line.split() for line in last)]


def candidate_first(stat, region):
    ranked = stat.get("candidates") or []
    if not ranked:
        return [f"no candidates; expected {region}"]
    if ranked[0]["region"] != region:
        return [f"first candidate is {ranked[0]['region']}, expected {region}"]
    return []


def problems(workload, run, stat):
    """Everything that does not hold for one workload's run."""
    out = []
    if run["rc"] != 0:
        out.append(f"ioregtrace exited {run['rc']}: {run['stderr'][-300:]}")
    if f"E2E-END {workload.name} 0" not in run["console"]:
        out.append(f"the guest's workload did not finish: {run['console'][-300:]!r}")
    if workload.tool == "top":
        return out + top_final_table(run.get("top", ""), workload.expect_paths)
    if stat is None:
        return out + ["no stat.json"]
    out += against_qemu_log(stat, run["log"])
    if workload.qemu == "built":
        out += against_device_commands(stat, run.get("ioregionfd_log", {}))
    out += console_checks(run["console"], workload.console_checks)
    out += [f"the test VM's kernel complained: {line}"
            for line in run.get("kernel_complaints", [])]
    out += expected_paths(stat, workload.expect_paths)
    out += forbidden_paths(stat, workload.forbid_paths)
    out += nothing_dropped(stat)
    if workload.candidate:
        out += candidate_first(stat, workload.candidate)
    return out


def summary_row(workload, run, stat):
    """(name, wall s, accesses, {path: count}, userspace ms of the first
    candidate) for the table."""
    by_path = collections.Counter()
    for r in (stat or {}).get("rows", []):
        by_path[r["path"]] += r["count"]
    if workload.tool != "stat":
        name_suffix = f" ({workload.tool})"
    else:
        name_suffix = ""
    ranked = (stat or {}).get("candidates") or []
    first = ranked[0] if ranked else None
    name = workload.name + name_suffix + (" (booted twice)" if run.get("retried_after")
                                          else "")
    return (name, run["wall_s"], sum(by_path.values()) if stat else None, dict(by_path),
            f"{first['region']} {first['userspace_ms']:.1f} ms" if first else "-")
