"""Exits by reason: names from the manuals, rows, intervals and the
`stat --exits` table, JSON and CSV (issue 19).  Numbers are checked
against counts made here, not against the tool."""

import csv
import io
import json
import types

from ioregtrace import exitcodes, exits, histogram, interval
from ioregtrace.probes import RawSnapshot, Tracer, VmInfo
from ioregtrace.recording import Recording
from ioregtrace.views import exits as view

HW, USER = exits.HW, exits.USER
SVM, VMX = exitcodes.ISA_SVM, exitcodes.ISA_VMX


def stats(times_ns=(), untimed=0, to_user=0):
    slots = [0] * histogram.SLOTS
    for ns in times_ns:
        slots[histogram.slot_of(ns)] += 1
    return exits.ExitStats(len(times_ns) + untimed, to_user, sum(times_ns),
                           min(times_ns) if times_ns else 0, max(times_ns, default=0), slots)


def recording(exit_map, duration=2.0, vms=None, counters=None):
    snap = RawSnapshot(taken=0.0, vms=vms or {1: VmInfo(100, 1, True, "qemu")},
                       exits=exit_map, counters=counters or {})
    return Recording(snapshot=snap, duration_s=duration)


def test_vmx_basic_reasons_by_name():
    assert exitcodes.hw_reason_name(VMX, 30) == "IO_INSTRUCTION"
    assert exitcodes.hw_reason_name(VMX, 48) == "EPT_VIOLATION"
    assert exitcodes.hw_reason_name(VMX, 49) == "EPT_MISCONFIG"
    assert exitcodes.hw_reason_name(VMX, 1) == "EXTERNAL_INTERRUPT"
    assert exitcodes.hw_reason_name(VMX, 12) == "HLT"
    # only the basic reason (low 16 bits) names it; bit 31: the entry failed
    assert exitcodes.hw_reason_name(VMX, (1 << 31) | 33) == "INVALID_GUEST_STATE+FAILED_ENTRY"
    assert exitcodes.hw_reason_name(VMX, 200) == "VMX_200"


def test_svm_exit_codes_by_name():
    assert exitcodes.hw_reason_name(SVM, 0x7B) == "IOIO"
    assert exitcodes.hw_reason_name(SVM, 0x400) == "NPF"
    assert exitcodes.hw_reason_name(SVM, 0x72) == "CPUID"
    assert exitcodes.hw_reason_name(SVM, 0x78) == "HLT"
    assert exitcodes.hw_reason_name(SVM, 0x60) == "INTR"
    assert exitcodes.hw_reason_name(SVM, 0x7C) == "MSR"
    assert exitcodes.hw_reason_name(SVM, 0x4E) == "EXCP_PF"
    assert exitcodes.hw_reason_name(SVM, 0x13) == "CR3_WRITE"
    assert exitcodes.hw_reason_name(SVM, 0x93) == "CR3_WRITE_TRAP"
    assert exitcodes.hw_reason_name(SVM, 0xFFFFFFFF) == "INVALID"
    assert exitcodes.hw_reason_name(SVM, 0x500) == "SVM_0x500"
    # the same number means different things on the two ISAs
    assert exitcodes.hw_reason_name(VMX, 0x30) != exitcodes.hw_reason_name(SVM, 0x30)


def test_userspace_exit_reasons_by_name():
    assert exitcodes.user_reason_name(2) == "IO"
    assert exitcodes.user_reason_name(6) == "MMIO"
    assert exitcodes.user_reason_name(24) == "SYSTEM_EVENT"
    assert exitcodes.user_reason_name(3) == "HYPERCALL"
    assert exitcodes.user_reason_name(10, 4) == "INTR"           # a signal: -EINTR
    assert exitcodes.user_reason_name(2, 14) == "ERROR_EFAULT"   # the reason is stale
    assert exitcodes.user_reason_name(99) == "EXIT_99"


def test_rows_sum_vcpus_per_vm_unless_per_vcpu():
    snap = recording({
        (1, exits.ExitKey(HW, SVM, 0x7B, tid=11)): stats([1000, 3000], to_user=2, untimed=2),
        (1, exits.ExitKey(HW, SVM, 0x7B, tid=12)): stats([2000]),
        (1, exits.ExitKey(USER, 0, 2, tid=11)): stats([50000, 70000]),
    }).snapshot
    (row,) = exits.rows(snap, HW)
    assert (row.stats.count, row.stats.timed, row.stats.to_user) == (5, 3, 2)
    assert (row.stats.min_ns, row.stats.max_ns, row.stats.sum_ns) == (1000, 3000, 6000)
    assert row.pid == 100 and row.comm == "qemu" and row.key.tid == 0
    per_vcpu = exits.rows(snap, HW, per_vcpu=True)
    assert sorted((r.key.tid, r.stats.count) for r in per_vcpu) == [(11, 4), (12, 1)]
    (user,) = exits.rows(snap, USER)
    assert user.name == "IO" and user.stats.count == 2


def test_interval_subtracts_exits():
    key = (1, exits.ExitKey(HW, SVM, 0x72, tid=5))
    prev = RawSnapshot(taken=0, exits={key: stats([1000] * 10)})
    cur = RawSnapshot(taken=1, exits={key: stats([1000] * 10 + [4000] * 3)})
    diff = interval.since(prev, cur).exits[key]
    assert (diff.count, diff.timed, diff.sum_ns) == (3, 3, 12000)
    assert diff.max_ns == 4000                        # a new maximum: exact
    assert diff.min_ns >= histogram.slot_bounds(histogram.slot_of(4000))[0]
    same = RawSnapshot(taken=2, exits=cur.exits)
    assert key not in interval.since(cur, same).exits


def test_table_like_perf_kvm_stat():
    rec = recording({
        (1, exits.ExitKey(HW, SVM, 0x400, tid=7)): stats([30000] * 3, untimed=1, to_user=1),
        (1, exits.ExitKey(HW, SVM, 0x72, tid=7)): stats([10000] * 6),
        (1, exits.ExitKey(USER, 0, 6, tid=7)): stats([100000]),
    })
    text = view.table(rec)
    lines = text.splitlines()
    header = next(line for line in lines if "SAMPLES%" in line and "ISA" in line)
    for column in ("REASON", "SAMPLES", "TIME%", "MINus", "AVGus", "MAXus", "P50us", "P99us"):
        assert column in header
    cpuid = next(line.split() for line in lines if " CPUID " in line)
    # 6 of 10 exits; 60 of 150 us of handling time
    assert cpuid[3:6] == ["6", "60.00", "0"] and cpuid[6] == "40.00"
    assert cpuid[7:10] == ["10.0", "10.0", "10.0"]
    npf = next(line.split() for line in lines if " NPF " in line)
    assert npf[3:7] == ["4", "40.00", "1", "60.00"]
    assert "Total: 10 exits" in text and "Total: 1 exits" in text
    assert "did not fire" not in text


def test_where_kvm_exit_does_not_fire_it_says_so_once_and_shows_userspace_reasons():
    rec = recording({(1, exits.ExitKey(USER, 0, 2, tid=7)): stats([5000] * 4),
                     (1, exits.ExitKey(USER, 0, 6, tid=7)): stats([8000])})
    text = view.table(rec)
    assert text.count("kvm:kvm_exit did not fire") == 1
    assert text.startswith("Note: kvm:kvm_exit did not fire")
    assert "VM exits (kvm:kvm_exit)" not in text          # no empty table of them
    assert "(none seen)" not in text
    assert " IO " in text and " MMIO " in text
    doc = view.to_json(rec)
    assert doc["hardware"] is None
    assert {r["name"]: r["count"] for r in doc["userspace"]["rows"]} == {"IO": 4, "MMIO": 1}
    assert any("did not fire" in n for n in doc["notes"])
    brief = view.table(rec, brief=True)                     # every interval says it too
    assert brief.count("did not fire") == 1


def test_json_csv_sort_top_and_vm():
    rec = recording({
        (1, exits.ExitKey(HW, SVM, 0x7B, tid=7)): stats([2000] * 5),
        (1, exits.ExitKey(HW, SVM, 0x72, tid=7)): stats([9000] * 2),
        (1, exits.ExitKey(HW, SVM, 0x78, tid=8)): stats([], untimed=1),
        (2, exits.ExitKey(HW, VMX, 30, tid=9)): stats([1000]),
    }, vms={1: VmInfo(100, 1, True, "qemu"), 2: VmInfo(200, 2, True, "other")})
    doc = view.to_json(rec)
    assert [r["name"] for r in doc["hardware"]["rows"]] == ["IOIO", "CPUID", "HLT",
                                                            "IO_INSTRUCTION"]
    hlt = doc["hardware"]["rows"][2]
    assert hlt["timed"] == 0 and hlt["time_us"] is None
    by_time = view.to_json(rec, sort="time")
    assert [r["name"] for r in by_time["hardware"]["rows"]][:2] == ["CPUID", "IOIO"]
    assert by_time["hardware"]["rows"][-1]["name"] == "HLT"     # untimed rows last
    top = view.to_json(rec, top=1)
    assert len(top["hardware"]["rows"]) == 1 and top["hardware"]["rows_omitted"] == 3
    assert top["hardware"]["total"] == 9                        # totals count every row
    assert "3 more row(s) with 4 exits" in view.table(rec, top=1)
    only = view.to_json(rec, vm="other")
    assert [r["name"] for r in only["hardware"]["rows"]] == ["IO_INSTRUCTION"]
    assert view.to_json(rec, vm="nobody")["notes"]
    per_vcpu = view.to_json(rec, per_vcpu=True)
    assert {r["tid"] for r in per_vcpu["hardware"]["rows"]} == {7, 8, 9}
    rows = list(csv.DictReader(io.StringIO(view.to_csv(rec, per_vcpu=True))))
    assert [(r["kind"], r["name"], r["count"], r["tid"]) for r in rows][:2] == [
        ("hardware", "IOIO", "5", "7"), ("hardware", "CPUID", "2", "7")]
    assert rows[0]["isa"] == "svm" and rows[-1]["isa"] == "vmx"
    series = view.to_csv(rec, time_s=1.5, header=False)
    assert series.startswith("1.500,hardware,")
    json.dumps(doc)


def test_bpf_time_per_exit_from_the_kernels_accounting():
    programs = {"tracepoint__kvm__kvm_exit": (100, 30000),
                "raw_tracepoint__kvm_entry": (95, 20000),
                "raw_tracepoint__kvm_mmio": (50, 99999)}
    assert view.exit_cost_ns(programs) == 500.0
    assert view.exit_cost_ns({"raw_tracepoint__kvm_mmio": (1, 1)}) is None
    rec = recording({})
    rec.bpf_programs = programs
    assert view.to_json(rec)["bpf_ns_per_exit"] == 500.0


def test_exits_still_open_at_the_end_are_counted():
    """A halted vCPU's exit (no kvm_entry yet) and the VMM's last return
    (no KVM_RUN after it) live in the thread's state: the final snapshot
    adds each once, untimed."""
    tracer = Tracer.__new__(Tracer)
    tracer.exits = True
    snap = RawSnapshot(taken=0)
    key = (3, exits.ExitKey(HW, SVM, 0x78, tid=42))
    snap.exits[key] = stats([1000])
    empty = types.SimpleNamespace(n=0)
    # and the exits it batches before a map update: 3 CPUIDs, two of them timed
    batch = types.SimpleNamespace(n=3, kind=HW, isa=SVM, reason=0x72, err=0, to_user=1,
                                  timed=2, sum_ns=5000, min_ns=2000, max_ns=3000,
                                  slot=[histogram.slot_of(2000), histogram.slot_of(3000)] +
                                  [0] * 14)
    slot = types.SimpleNamespace(tid=42, vm=3, hx_ts=123, hx_isa=SVM, hx_reason=0x78,
                                 ux_ts=456, ux_reason=8, ux_err=0, hb=batch, ub=empty)
    tracer._add_open_exits(snap, slot)
    assert snap.exits[key].count == 2 and snap.exits[key].timed == 1
    assert snap.exits[(3, exits.ExitKey(USER, 0, 8, 0, 42))].count == 1
    cpuid = snap.exits[(3, exits.ExitKey(HW, SVM, 0x72, 0, 42))]
    assert (cpuid.count, cpuid.to_user, cpuid.timed, cpuid.sum_ns) == (3, 1, 2, 5000)
    assert (cpuid.min_ns, cpuid.max_ns) == (2000, 3000)


def test_hardware_virtualization_from_cpu_flags(tmp_path):
    """kvm:kvm_exit fires only under kvm_intel/kvm_amd: a CPU without VMX and
    SVM (a PVM host) gets no exit programs, and says why."""
    from ioregtrace import requirements
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme de pse svm sse\n")
    assert requirements.hardware_virtualization(str(cpuinfo)) == "svm"
    cpuinfo.write_text("flags\t\t: fpu vmx sse\n")
    assert requirements.hardware_virtualization(str(cpuinfo)) == "vmx"
    cpuinfo.write_text("flags\t\t: fpu sse hypervisor\n")
    assert requirements.hardware_virtualization(str(cpuinfo)) is None
    assert requirements.hardware_virtualization(str(tmp_path / "none")) is None
