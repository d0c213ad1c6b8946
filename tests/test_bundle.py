"""Bundles: a round trip renders exactly what the recording renders, and
no input, however damaged or hostile, gets past the reader as anything but
one BundleError line."""

import gzip
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioregtrace import bundle, exits, histogram
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import Events, LatencyStats, RawEvent, RawSnapshot, VmInfo
from ioregtrace.qemu.layout import LayoutHistory
from ioregtrace.qemu.mtree import FlatLayout, FlatRange
from ioregtrace.qemu.ops import RegionOps
from ioregtrace.recording import Recording, VmFacts, render
from ioregtrace.views import stat as stat_view
from ioregtrace.views import events as events_view
from ioregtrace.views import exits as exits_view


def latency(samples):
    slots = [0] * histogram.SLOTS
    for ns in samples:
        slots[histogram.slot_of(ns)] += 1
    return LatencyStats(len(samples), sum(samples), max(samples), slots)


def sample_recording():
    snap = RawSnapshot(taken=0.0)
    snap.vms = {1: VmInfo(100, 1, True, "qemu-system-x86"), 2: VmInfo(200, 2, False, "demo")}
    snap.counters = {"lost_events": 0, "dropped_accesses": 0, "attach_ambiguous": 1}
    k1 = AccessKey(100, Space.MMIO, 0x1004, 4, Op.READ, Path.USERSPACE, 1)
    k2 = AccessKey(100, Space.MMIO, 0x1004, 4, Op.READ, Path.USERSPACE, 3)
    k3 = AccessKey(200, Space.PIO, 0x70, 1, Op.WRITE, Path.UNATTRIBUTED, 0)
    snap.accesses = {(1, k1): 10, (1, k2): 7, (2, k3): 4}
    snap.latencies = {(1, k1): latency([5000] * 9 + [90000]), (1, k2): latency([7000] * 7)}
    # an ioregion too: a bundle recorded on an ioregionfd kernel was refused
    snap.registrations = [(2, "coalesced", Space.PIO, 0x70, 1),
                          (2, "ioregion", Space.MMIO, 0x10004000, 0x1000)]
    hw = latency([20000] * 3 + [40000])
    snap.exits = {
        (1, exits.ExitKey(exits.HW, 2, 0x7B, 0, 101)): exits.ExitStats(
            6, 2, hw.sum_ns, 20000, 40000, hw.slots),
        (1, exits.ExitKey(exits.USER, 0, 2, 0, 101)): exits.ExitStats(
            2, 0, 90000, 40000, 50000, latency([40000, 50000]).slots),
        (2, exits.ExitKey(exits.USER, 0, 10, 4, 201)): exits.ExitStats(1)}
    h = LayoutHistory()
    h.add_section(1, Space.MMIO, 0xA, 0x1000, 0x1000, "testdev", 0, 0x100)
    h.add_section(3, Space.MMIO, 0xC, 0x1000, 0x1000, "edu", 0, 0x300)
    h.final = FlatLayout()
    h.final.set(Space.MMIO, [FlatRange(0x1000, 0x1FFF, "edu", 0, "i/o")])
    h.final.set(Space.PIO, [FlatRange(0, 0xFFFF, "io")])
    ops = {0x100: RegionOps(0, 0, False, False, 1, 1, False),
           0x300: RegionOps(4, 8, False, True, 4, 8, False)}
    events = Events(requested=5, lost=0, events=[
        RawEvent(1000, 101, 100, 1, 0, 0x1004, 4, 0, 4, 1, 1, 5000),
        RawEvent(2000, 201, 200, 2, 1, 0x70, 1, 1, 0, 0, 1, None)])
    return Recording(snapshot=snap, duration_s=2.5,
                     vms={1: VmFacts(1, name="web1", qemu_version="7.2.22",
                                     cmdline=["qemu-system-x86_64", "-name", "web1"],
                                     history=h, region_ops=ops)},
                     notes=["a note from the session"], host={"hostname": "h1", "kernel": "6.18"},
                     probes={"attached": ["kvm:kvm_mmio"], "unavailable": {}},
                     events=events, created="2026-11-25T00:00:00Z",
                     bpf_programs={"tracepoint__kvm__kvm_exit": (6, 6000),
                                   "raw_tracepoint__kvm_entry": (4, 2000)})


def rendered(rec, by="auto"):
    rep = render(rec, by=by)
    return (json.dumps(stat_view.to_json(rep), sort_keys=True), stat_view.table(rep),
            json.dumps(exits_view.to_json(rec, per_vcpu=True), sort_keys=True),
            exits_view.table(rec), exits_view.to_csv(rec))


@pytest.mark.parametrize("by", ["auto", "address", "region"])
def test_round_trip_renders_the_same(tmp_path, by):
    rec = sample_recording()
    path = tmp_path / "b.bundle"
    bundle.write(path, rec)
    back = bundle.read(path)
    assert rendered(back, by) == rendered(rec, by)
    assert events_view.render(back, True) == events_view.render(rec, True)
    assert back.vms[1].cmdline == rec.vms[1].cmdline and back.host["hostname"] == "h1"


def test_redact_drops_command_lines_and_host_names(tmp_path):
    path = tmp_path / "b.bundle"
    bundle.write(path, sample_recording(), redact=True)
    back = bundle.read(path)
    assert back.vms[1].cmdline is None and back.host["hostname"] is None
    assert back.vms[1].name is None        # issue 16, defect 11: the VM name stayed
    raw = gzip.open(path).read().decode()
    assert "qemu-system-x86_64\"" not in raw and "h1" not in raw


def write_doc(tmp_path, doc):
    path = tmp_path / "b.bundle"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(doc).encode())
    return path


def expect_error(path, text):
    with pytest.raises(bundle.BundleError) as e:
        bundle.read(path)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_clear_errors(tmp_path):
    expect_error(tmp_path / "missing", "no such file")
    plain = tmp_path / "plain"
    plain.write_text("{}")
    expect_error(plain, "not a readable gzip file")
    doc = bundle.to_doc(sample_recording())
    full = gzip.compress(json.dumps(doc).encode())
    (tmp_path / "cut").write_bytes(full[:len(full) // 2])
    expect_error(tmp_path / "cut", "not a readable gzip file")
    expect_error(write_doc(tmp_path, {**doc, "version": 2}), "bundle version '2'")
    expect_error(write_doc(tmp_path, {**doc, "format": "x"}), "not an ioregtrace bundle")
    expect_error(write_doc(tmp_path, [1, 2]), "expected an object")
    bad = json.loads(json.dumps(doc))
    bad["accesses"][0][8] = -1
    expect_error(write_doc(tmp_path, bad), "bundle.accesses[0]: expected an integer")
    bad = json.loads(json.dumps(doc))
    bad["latencies"][0][8] += 1
    expect_error(write_doc(tmp_path, bad), "latency count does not match")
    deep = tmp_path / "deep"
    deep.write_bytes(gzip.compress(b"[" * 100000 + b"]" * 100000))
    expect_error(deep, "not valid JSON")


def mutations():
    """Damaged versions of a real bundle: a value replaced at some path."""
    doc = bundle.to_doc(sample_recording())
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])
    walk(doc, [])
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                          st.integers(),
                                                                          max_size=3))
    return st.tuples(st.sampled_from(paths), junk).map(lambda pv: _replace(doc, *pv))


def _replace(doc, path, value):
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _read_and_render(path):
    """The property: a BundleError, or a recording that renders."""
    try:
        rec = bundle.read(path)
    except bundle.BundleError:
        return
    for by in ("auto", "address", "region"):
        rendered(rec, by)
    events_view.render(rec, False)
    events_view.header(rec)


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(doc=mutations())
def test_fuzz_damaged_bundles(tmp_path, doc):
    path = tmp_path / "f.bundle"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(doc, allow_nan=True).encode())
    _read_and_render(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=30)


@FUZZ
@given(doc=json_values)
def test_fuzz_arbitrary_json(tmp_path, doc):
    path = tmp_path / "f.bundle"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(doc).encode())
    _read_and_render(path)


@FUZZ
@given(data=st.binary(max_size=512), compress=st.booleans())
def test_fuzz_arbitrary_bytes(tmp_path, data, compress):
    path = tmp_path / "f.bundle"
    path.write_bytes(gzip.compress(data) if compress else data)
    _read_and_render(path)


def test_non_finite_duration_is_refused(tmp_path):
    doc = bundle.to_doc(sample_recording())
    doc["duration_s"] = math.inf
    path = tmp_path / "b.bundle"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(doc, allow_nan=True).encode())
    expect_error(path, "duration_s: expected a finite number")


def test_text_from_a_bundle_cannot_drive_the_terminal(tmp_path):
    """Issue 16, defect 11: report printed bundle strings raw, so a bundle
    could clear or recolour the reader's terminal."""
    rec = sample_recording()
    rec.vms[1].name = "evil\x1b[2J\x1b]0;pwned\x07"
    rec.notes = ["note \x1b[31mred\x9b"]
    path = tmp_path / "b.bundle"
    bundle.write(path, rec)
    back = bundle.read(path)
    json_text, table, _, exits_table, _ = rendered(back)
    assert "evil" in exits_table                 # the VM's name, in the exits table too
    for text in (table, exits_table, "\n".join(back.notes), back.vms[1].name):
        assert not any(ord(ch) < 0x20 and ch != "\n" or 0x7f <= ord(ch) < 0xa0
                       for ch in text), repr(text)
    assert "evil\\x1b[2J" in back.vms[1].name


def test_a_gzip_bomb_is_refused_early_and_in_bounded_memory(tmp_path):
    """Issue 16, defect 11: a 2 MB gzip bomb was inflated to 1 GB before it
    was refused.  Now reading stops at MAX_RATIO times the file's size (or
    the floor), in a process that stays far below the bomb's size."""
    import subprocess
    import sys
    import zlib
    path = tmp_path / "bomb.bundle"
    z = zlib.compressobj(9, zlib.DEFLATED, 31)      # gzip container
    with open(path, "wb") as f:
        chunk = b" " * (1 << 20)
        for _ in range(600):                        # 600 MiB of spaces
            f.write(z.compress(chunk))
        f.write(z.flush())
    assert path.stat().st_size < (4 << 20)
    # The peak of this process's own memory, VmHWM: getrusage's ru_maxrss
    # survives exec, so it also counted the forked pytest (273 MiB late in
    # `make test`, 375 MiB on CI), whatever the child itself used.
    code = ("import sys\n"
            "from ioregtrace import bundle\n"
            "try:\n"
            "    bundle.read(sys.argv[1])\n"
            "except bundle.BundleError as e:\n"
            "    print(e)\n"
            "with open('/proc/self/status') as f:\n"
            "    print([l.split()[1] for l in f if l.startswith('VmHWM:')][0])\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=300)
    message, peak_kb = res.stdout.strip().splitlines()
    assert "uncompressed" in message and "not a bundle" in message, message
    # Counted, not kept: the process stays under even the smallest limit.
    assert int(peak_kb) < bundle.MIN_LIMIT >> 10, f"{int(peak_kb) >> 10} MiB to refuse a bomb"
