"""Exits by reason against perf kvm stat (issue 19), inside the test VM,
where kvm:kvm_exit/kvm_entry fire (TCG's emulated SVM, nested KVM; on the
host's PVM backend they never do).

Each workload runs once, under both tools at the same time:
`ioregtrace record -o BUNDLE -- perf kvm stat record -- GUEST`; the host
renders the bundle (`report --exits --per-vcpu --json`, and `report
--json --by address` for the access rows).  The guest is the demo VM (its
whole mix; only PIO to the in-kernel PIT; only CPUID) or a Linux guest
with two vCPUs (the test VM's own kernel booting to init and powering
off, e2e/guest.py).

perf's side is reported on the host, by the same perf binary, from the
perf.data the VM leaves.  perf kvm stat works in the test VM on SVM; it
showed no VM-EXIT sample only while ioregtrace's kvm_exit program returned
0, which makes the kernel drop the event for every perf event on that
tracepoint (the program returns 1 now; the counts tests fail without it).

One VM boot serves the whole module (kernel/vm.py)."""

import collections
import functools
import json
import os
import re
import statistics
import subprocess
import warnings

import pytest

import vm
from conftest import IOREGTRACE, REPO, REQUIRE_INTEGRATION, build_kernel, run_cli

pytestmark = pytest.mark.integration

WORKLOADS = {
    "mix": "demo",
    "pit": "demo --scale 0 --set pit-latch=5000",
    "cpuid": "demo --scale 0 --cpuid 5000",
    "linux": "linux",
}

GUEST_SCRIPT = r"""
out=/run/vmtest
IT={ioregtrace}
echo 1 > /proc/sys/kernel/bpf_stats_enabled
traced() {{
    name=$1; shift
    timeout ${{LIMIT_S:-600}} $IT record -o $out/$name.bundle -- \
        perf kvm stat record -o $out/$name.perf -- "$@" > $out/$name.log 2>&1
    echo $? > $out/$name.rc
}}
traced mix $IT demo --truth $out/mix.truth.json
traced pit $IT demo --scale 0 --set pit-latch=5000 --truth $out/pit.truth.json
traced cpuid $IT demo --scale 0 --cpuid 5000 --truth $out/cpuid.truth.json
# The nested Linux guest now and then hangs early, after a lockdep report
# of an interrupt taken with interrupts off (e2e/NOTES.md, not caused by
# ioregtrace): such a boot is ended when its console says so and booted
# again, up to twice, and linux.hangs keeps each hung console's tail.
linux_once() {{
    rm -f $out/linux.console
    LIMIT_S=300 traced linux qemu-system-x86_64 -accel kvm -cpu host -m 256 -smp 2 -nodefaults \
        -no-reboot -display none -serial file:$out/linux.console \
        -kernel {kernel} -initrd {initrd} \
        -append "console=ttyS0 quiet panic=-1 clocksource=tsc {tsc} e2e=boot" &
    pid=$!
    while kill -0 $pid 2>/dev/null; do
        if grep -q -e "possible recursive locking" -e "detected stalls" \
                $out/linux.console 2>/dev/null; then
            pkill -TERM -f "^qemu-system-x86_64 -accel kvm -cpu host -m 256 -smp 2"
        fi
        sleep 2
    done
    wait $pid
    grep -q "E2E-END boot 0" $out/linux.console
}}
: > $out/linux.hangs
for attempt in 1 2 3; do
    linux_once && break
    {{ echo "--- boot $attempt"; tail -c 1500 $out/linux.console; }} >> $out/linux.hangs
done
"""

VM_TIMEOUT_S = 1500     # the demo runs ~3 min, each Linux boot ~1 (up to 5)

# perf kvm stat names SVM exits as the kernel's uapi table does; the
# reasons a run can show, to their exit codes (APM vol. 2, appendix C).
PERF_SVM_NAMES = {"npf": 0x400, "io": 0x7B, "interrupt": 0x60, "cpuid": 0x72, "hlt": 0x78,
                  "msr": 0x7C, "vintr": 0x64, "nmi": 0x61, "pause": 0x77, "rdtsc": 0x6E,
                  "rdpmc": 0x6F, "invlpg": 0x79, "xsetbv": 0x8D, "wbinvd": 0x89,
                  "shutdown": 0x7F, "hypercall": 0x81, "invd": 0x76, "smi": 0x62,
                  "init": 0x63, "iret": 0x74, "rdtscp": 0x87, "cr0_sel_write": 0x65,
                  "vmrun": 0x80, "vmload": 0x82, "vmsave": 0x83, "stgi": 0x84, "clgi": 0x85,
                  "write_efer_trap": 0x8F, "pushf": 0x70, "popf": 0x71, "rsm": 0x73,
                  "swint": 0x75, "invlpga": 0x7A, "task_switch": 0x7D, "ferr_freeze": 0x7E,
                  "skinit": 0x86, "icebp": 0x88, "monitor": 0x8A, "mwait": 0x8B,
                  "invpcid": 0xA2, "read_idtr": 0x66, "read_gdtr": 0x67, "read_ldtr": 0x68,
                  "read_rt": 0x69, "write_idtr": 0x6A, "write_gdtr": 0x6B, "write_ldtr": 0x6C,
                  "write_rt": 0x6D, "avic_incomplete_ipi": 0x401,
                  "avic_unaccelerated_access": 0x402, "vmgexit": 0x403,
                  **{f"{op}_{reg}{n}": base + n
                     for op, reg, base in (("read", "cr", 0x00), ("write", "cr", 0x10),
                                           ("read", "dr", 0x20), ("write", "dr", 0x30))
                     for n in range(16)},
                  **{f"write_cr{n}_trap": 0x90 + n for n in range(16)},
                  **{f"{name} excp": 0x40 + vector for vector, name in (
                      (0, "DE"), (1, "DB"), (3, "BP"), (4, "OF"), (5, "BR"), (6, "UD"),
                      (7, "NM"), (8, "DF"), (10, "TS"), (11, "NP"), (12, "SS"), (13, "GP"),
                      (14, "PF"), (16, "MF"), (17, "AC"), (18, "MC"), (19, "XF"))}}

PERF_ROW = re.compile(r"^\s*(.+?)\s+(\d+)\s+[\d.]+%\s+[\d.]+%\s+([\d.]+)us\s+([\d.]+)us\s+"
                      r"([\d.]+)us")


def _problem():
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("qemu-system-x86_64", "busybox", "perf", "gcc"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]):
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="module")
def share(request, tmp_path_factory):
    problem = _problem()
    if problem:
        if REQUIRE_INTEGRATION:
            pytest.fail(f"VM test prerequisite missing: {problem}")
        pytest.skip(problem)
    kdir = build_kernel(request)
    import sys
    sys.path.insert(0, os.path.join(REPO, "e2e"))
    import guest as e2e_guest
    script = GUEST_SCRIPT.format(kernel=os.path.join(kdir, "bzImage"),
                                 initrd=e2e_guest.initramfs(), tsc=vm.tsc_args().strip(),
                                 ioregtrace=IOREGTRACE)
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("exits")
        try:
            # this tree's code, whichever checkout the venv was installed from
            rc, console = vm.run(script, kernel_dir=kdir, cwd=REPO, share=str(out),
                                 timeout=VM_TIMEOUT_S, env={"PYTHONPATH": REPO})
            break
        except vm.VmTimeout as e:
            if attempt == 2:
                raise
            warnings.warn(f"the test VM stalled and was booted again: {e}", stacklevel=1)
    (out / "console.log").write_text(console)
    assert rc == 0, console[-3000:]
    hangs = (out / "linux.hangs").read_text()
    if hangs:
        warnings.warn(f"the nested Linux guest hung and was booted again:\n{hangs[-1500:]}",
                      stacklevel=1)
    return out


def _report(share, name, *args):
    rc = (share / f"{name}.rc").read_text().strip()
    assert rc == "0", (share / f"{name}.log").read_text()[-3000:]
    res = run_cli("report", str(share / f"{name}.bundle"), "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _ours(share, name):
    doc = _report(share, name, "--exits", "--per-vcpu")
    assert doc["lost_events"] == 0 and doc["dropped_exits"] == 0, doc
    assert doc["hardware"] is not None, "kvm:kvm_exit did not fire in the test VM"
    return doc


@functools.lru_cache(maxsize=None)
def _perf_script(share, name):
    """perf's own record of a run, one event per line (read once: a Linux
    boot's is ~165 MB)."""
    res = subprocess.run(["perf", "script", "--ns", "-i", str(share / f"{name}.perf"),
                          "-F", "tid,time,event,trace"],
                         capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def _perf_events(share, name):
    """perf's own record, event by event: [(tid, event, vcpu, reason, time_s)]."""
    events = []
    for line in _perf_script(share, name):
        m = re.match(r"\s*(\d+)\s+([\d.]+):\s+kvm:(kvm_exit|kvm_entry):\s+vcpu (\d+)"
                     r"(?:.* reason (.+?) rip)?", line)
        if m:
            events.append((int(m.group(1)), m.group(3), int(m.group(4)), m.group(5),
                           float(m.group(2))))
    return events


def _perf_report(share, name, vcpu=None):
    """{reason name: (samples, avg_us)} of `perf kvm stat report --event=vmexit`."""
    argv = ["perf", "kvm", "-i", str(share / f"{name}.perf"), "stat", "report",
            "--event=vmexit"] + ([] if vcpu is None else ["--vcpu", str(vcpu)])
    res = subprocess.run(argv, capture_output=True, text=True, check=True)
    rows = {}
    for line in (res.stdout + res.stderr).splitlines():     # perf 6.1: the table on stderr
        m = PERF_ROW.match(line)
        if m and m.group(1).strip() != "VM-EXIT":
            rows[m.group(1).strip()] = (int(m.group(2)), float(m.group(5)))
    assert rows, res.stdout + res.stderr
    return rows


def _perf_code(name):
    assert name in PERF_SVM_NAMES, f"perf reason {name!r}: add its SVM exit code to the test"
    return PERF_SVM_NAMES[name]


@pytest.mark.parametrize("name", ["mix", "linux"])
def test_exit_counts_per_vcpu_and_reason_equal_perf_kvm_stat(share, name):
    """Per vCPU and exit reason, ioregtrace's count equals perf kvm stat's
    (`report --event=vmexit --vcpu N`).  perf counts an exit when its
    kvm_entry comes; each vCPU's last exit (the return that ends the run)
    has none, and ioregtrace counts it all the same: exactly that one more."""
    doc = _ours(share, name)
    events = _perf_events(share, name)
    vcpu_of, last = {}, {}
    for tid, event, vcpu, reason, _ in events:
        vcpu_of[tid] = vcpu
        last[tid] = (event, reason)
    ours = collections.defaultdict(collections.Counter)
    for r in doc["hardware"]["rows"]:
        assert r["isa"] == "svm", r
        assert r["tid"] in vcpu_of, f"tid {r['tid']} is no vCPU perf saw: {vcpu_of}"
        ours[vcpu_of[r["tid"]]][r["reason"]] += r["count"]
    assert len(ours) == (2 if name == "linux" else 1), dict(ours)
    for tid, vcpu in vcpu_of.items():
        expect = collections.Counter({_perf_code(reason): n for reason, (n, _)
                                      in _perf_report(share, name, vcpu).items()})
        event, reason = last[tid]
        if event == "kvm_exit":          # no entry after it: perf leaves it out
            expect[_perf_code(reason)] += 1
        assert dict(ours[vcpu]) == dict(expect), (vcpu, ours[vcpu], expect)


def test_userspace_exit_reasons_equal_the_demo_count(share):
    """The VMM's own count of KVM_RUN returns by reason (demo --truth)."""
    doc = _ours(share, "mix")
    truth = json.loads((share / "mix.truth.json").read_text())
    ours = {str(r["reason"]): r["count"] for r in doc["userspace"]["rows"]}
    assert ours == truth["exits"], (ours, truth["exits"])
    # every return to the VMM follows a hardware exit that went there
    assert doc["userspace"]["total"] == sum(r["to_user"] for r in doc["hardware"]["rows"])


def _intervals(events, tid, code):
    """perf's exit -> entry times (us) on one thread for exits of `code`
    with no return to userspace in between (perf records no such return,
    so: the reasons that stay in the kernel)."""
    out, start = [], None
    for t, event, _, reason, ts in events:
        if t != tid:
            continue
        if event == "kvm_exit":
            start = (_perf_code(reason), ts)
        elif start is not None:
            if start[0] == code:
                out.append((ts - start[1]) * 1e6)
            start = None
    return out


# (workload, SVM exit code of its one in-kernel reason, count)
SHAPES = [("pit", 0x7B, 5000), ("cpuid", 0x72, 5000)]


@pytest.mark.parametrize("name,code,count", SHAPES)
def test_handling_time_agrees_with_perf_kvm_stat(share, name, code, count):
    """A workload of one shape (only OUTs to the in-kernel PIT, or only
    CPUID): the in-kernel handling time of that reason.  The histogram's
    p50 is the upper bound of its bucket, at most 12.5 % above the true
    median: the median of perf's own exit -> entry times lies in that
    bucket.  perf kvm stat's average (over the same exits) agrees with
    ioregtrace's exact mean, and with its median within the bucket error
    plus the skew of the distribution, which is printed."""
    doc = _ours(share, name)
    rows = [r for r in doc["hardware"]["rows"] if r["reason"] == code]
    assert len(rows) == 1, doc["hardware"]["rows"]
    row = rows[0]
    assert row["timed"] >= count and row["to_user"] <= 1, row
    p50 = row["time_us"]["p50"]
    tid = row["tid"]                    # the demo's one vCPU: vcpu 0
    perf_rows = _perf_report(share, name, 0)
    perf_samples, perf_avg = next(v for k, v in perf_rows.items() if _perf_code(k) == code)
    assert perf_samples == row["count"] - row["to_user"], (perf_samples, row)
    times = _intervals(_perf_events(share, name), tid, code)
    assert len(times) == perf_samples
    perf_median = statistics.median(times)
    print(f"{name}: ioregtrace p50 <= {p50:.2f} us, mean {row['time_us']['avg']:.2f} us; "
          f"perf kvm stat avg {perf_avg:.2f} us, perf's median {perf_median:.2f} us")
    # acceptance 2: the median agrees with perf kvm stat's average within
    # the histogram's bucket error (12.5 %)
    assert abs(p50 - perf_avg) <= 0.125 * perf_avg, (p50, perf_avg)
    # With both tools attached, each one's interval holds part of the
    # other's cost, and ioregtrace's holds up to its own two programs' run
    # time: that time, measured by the kernel in this same run, is the
    # offset allowed below (fixed margins failed at ~11 % under TCG, where
    # the programs take ~2.3 us of a ~22 us exit).
    bpf_us = doc.get("bpf_ns_per_exit", 0) / 1000.0
    assert bpf_us > 0, doc.get("bpf_programs")
    # the bucket holding the true median, [p50 / 1.125, p50], holds perf's
    assert p50 / 1.125 * 0.97 - bpf_us <= perf_median <= p50 * 1.03, \
        (p50, perf_median, bpf_us)
    # the exact mean over the same exits
    assert abs(row["time_us"]["avg"] - perf_avg) <= 0.05 * perf_avg + bpf_us, \
        (row, perf_avg, bpf_us)


def test_bpf_time_per_exit_is_reported(share):
    """The kernel's accounting of the two exit programs (bpf_stats_enabled)."""
    for name in ("pit", "cpuid"):
        doc = _ours(share, name)
        assert doc.get("bpf_ns_per_exit", 0) > 0, doc.get("bpf_programs")
        print(f"{name}: {doc['bpf_ns_per_exit']:.0f} ns of BPF per exit")


def _perf_keys(share, name, event):
    """{key: samples} of `perf kvm stat report --event=ioport|mmio`."""
    res = subprocess.run(["perf", "kvm", "-i", str(share / f"{name}.perf"), "stat", "report",
                          f"--event={event}"], capture_output=True, text=True, check=True)
    rows = {}
    for line in (res.stdout + res.stderr).splitlines():
        m = re.match(r"^\s*(0x[0-9a-f]+):(\w+)\s+(\d+)\s", line)
        if m:
            rows[(int(m.group(1), 16), m.group(2))] = int(m.group(3))
    assert rows, res.stdout + res.stderr
    return rows


ACCESS_LINE = re.compile(r"\s*(\d+)\s+[\d.]+:\s+kvm:(?:kvm_entry:|kvm_pio: pio_(read|write) at "
                         r"0x([0-9a-f]+) size \d+ count (\d+)|kvm_mmio: mmio write len \d+ "
                         r"gpa 0x([0-9a-f]+))")


def _perf_leaves_out(share, name):
    """{(space, address, op): n}: the accesses perf kvm stat's ioport and
    mmio tables do not count, by perf's own record of them.  Both are the
    tools' definitions, not errors: a string IN or OUT is one kvm_pio event
    (`count N`), one access to perf and N to ioregtrace; and perf counts a
    PIO or an MMIO write when the vCPU enters again, which the run's last
    access on each vCPU never does."""
    out, since_entry = collections.Counter(), collections.defaultdict(list)
    for line in _perf_script(share, name):
        m = ACCESS_LINE.match(line)
        if not m:
            continue
        tid, op, port, count, gpa = m.groups()
        if port:
            key = ("pio", int(port, 16), "POUT" if op == "write" else "PIN")
            out[key] += int(count) - 1
            since_entry[tid].append(key)
        elif gpa:
            since_entry[tid].append(("mmio", int(gpa, 16), "W"))
        else:
            since_entry[tid] = []
    for keys in since_entry.values():
        out.update(keys[-1:])
    return {k: n for k, n in out.items() if n}


@pytest.mark.parametrize("name", ["mix", "linux"])
def test_access_counts_per_port_and_address_equal_perf_kvm_stat(share, name):
    """Per PIO port and MMIO address and direction, the accesses (all
    paths) equal perf kvm stat's `--event=ioport` / `--event=mmio`, but for
    what perf leaves out by definition (_perf_leaves_out), which perf's own
    record names."""
    doc = _report(share, name, "--by", "address")
    ours = collections.Counter()
    for r in doc["rows"]:
        op = ("W" if r["op"] == "write" else "R") if r["space"] == "mmio" else \
            ("POUT" if r["op"] == "write" else "PIN")
        ours[(r["space"], r["address"], op)] += r["count"]
    left_out = _perf_leaves_out(share, name)
    print(f"{name}: perf leaves out {left_out}")
    if name == "mix":
        # the demo's string IN (rep insb x 32) and its last write ("done")
        assert set(left_out) == {("pio", 0x5005, "PIN"), ("pio", 0x5FF0, "POUT")}, left_out
    ours.subtract(left_out)
    ours = {k: n for k, n in ours.items() if n}
    perf = {("pio", a, op): n for (a, op), n in _perf_keys(share, name, "ioport").items()}
    perf.update({("mmio", a, op): n for (a, op), n in _perf_keys(share, name, "mmio").items()})
    assert ours == perf


def test_in_kernel_accesses_carry_their_exits_handling_time(share):
    """The PIT workload: the 5000 OUTs to port 0x43 (path kernel) have a
    latency, and it is the handling time of their IOIO exits."""
    access = _report(share, "pit", "--by", "address")
    (row,) = [r for r in access["rows"] if r["address"] == 0x43 and r["space"] == "pio"]
    assert row["path"] == "kernel" and row["count"] == 5000, row
    exits = _ours(share, "pit")
    (ioio,) = [r for r in exits["hardware"]["rows"] if r["reason"] == 0x7B]
    lat = row["latency_us"]
    assert lat is not None, row
    assert lat["p50"] == ioio["time_us"]["p50"], (lat, ioio)
    assert lat["max"] <= ioio["time_us"]["max"]
