"""ioregtop's model and layout, without a terminal."""

import ctypes
import threading

from ioregtrace import histogram, probes, regions
from ioregtrace.keys import AccessKey, Op, Path, Space
from ioregtrace.probes import LatencyStats, RawSnapshot, VmInfo
from ioregtrace.qemu.layout import LayoutHistory
from ioregtrace.recording import Recording, VmFacts
from ioregtrace.views import top


def lat(samples):
    slots = [0] * histogram.SLOTS
    for ns in samples:
        slots[histogram.slot_of(ns)] += 1
    return LatencyStats(len(samples), sum(samples), max(samples), slots)


FAST = AccessKey(10, Space.MMIO, 0x1000, 4, Op.READ, Path.USERSPACE)
FAST_W = AccessKey(10, Space.MMIO, 0x1000, 4, Op.WRITE, Path.USERSPACE)
SLOW = AccessKey(10, Space.MMIO, 0x2000, 4, Op.READ, Path.USERSPACE)
BELL = AccessKey(20, Space.MMIO, 0x3000, 4, Op.WRITE, Path.IOEVENTFD)


def recording(counts, lats, duration):
    snap = RawSnapshot(taken=duration)
    snap.vms = {1: VmInfo(10, 1, True, "qemu"), 2: VmInfo(20, 2, True, "demo")}
    snap.counters = {"lost_events": 0, "dropped_accesses": 0}
    vm = {10: 1, 20: 2}
    snap.accesses = {(vm[k.pid], k): n for k, n in counts.items()}
    snap.latencies = {(vm[k.pid], k): s for k, s in lats.items()}
    return Recording(snapshot=snap, duration_s=duration)


def test_rates_and_latency_are_for_the_last_interval():
    m = top.TopModel()
    m.refresh(recording({FAST: 100, SLOW: 10}, {FAST: lat([5000] * 100),
                                                SLOW: lat([2_000_000] * 10)}, 1.0), now=1.0)
    m.refresh(recording({FAST: 300, FAST_W: 50, SLOW: 10, BELL: 40},
                        {FAST: lat([5000] * 100 + [9000] * 200), SLOW: lat([2_000_000] * 10)},
                        3.0), now=3.0)
    rows = {(r.pid, r.label): r for r in m.visible()}
    fast = rows[(10, "mmio@0x1000")]
    assert fast.total == 350 and fast.ops == "RW"
    assert fast.rate == (200 + 50) / 2.0
    assert 9.0 <= fast.p50_us <= 9.0 * 1.125            # only the new samples
    slow = rows[(10, "mmio@0x2000")]
    assert slow.rate == 0 and slow.p99_us is None       # nothing new this interval
    assert rows[(20, "mmio@0x3000")].rate == 20.0
    assert m.total == 400 and m.rate == 125 + 20


def test_sort_group_and_filter():
    m = top.TopModel()
    rec = recording({FAST: 100, SLOW: 10, BELL: 50}, {FAST: lat([5000] * 100),
                                                     SLOW: lat([3_000_000] * 10)}, 1.0)
    m.refresh(rec, now=1.0)
    assert [r.label for r in m.visible()] == ["mmio@0x1000", "mmio@0x3000", "mmio@0x2000"]
    m.cycle_sort()
    assert m.sort == "total"
    m.cycle_sort()
    assert m.sort == "p99" and m.visible()[0].label == "mmio@0x2000"
    m.cycle_sort()
    assert m.sort == "name" and [r.label for r in m.visible()][0] == "mmio@0x1000"
    m.pid = 20
    assert [r.pid for r in m.visible()] == [20]
    m.pid = None
    m.cycle_group()
    assert m.group == "address"
    m.refresh(rec, now=2.0)
    assert {r.label for r in m.visible()} == {"0x1000:4", "0x2000:4", "0x3000:4"}
    m.cycle_group()
    m.refresh(rec, now=3.0)
    assert {(r.pid, r.label, r.path) for r in m.visible()} == {
        (10, "-", "userspace"), (20, "-", "ioeventfd")}


def test_screen_lines_fit_the_terminal():
    m = top.TopModel()
    long = AccessKey(10, Space.MMIO, 0xFEBF0000, 4, Op.READ, Path.USERSPACE)
    m.refresh(recording({FAST: 10**9, long: 5}, {}, 1.0), now=1.0)
    for width, height in ((80, 24), (60, 10), (200, 50)):
        text = top.lines(m, width, height, "tracing")
        assert len(text) <= height and all(len(line) < width for line in text)
    assert " VM " not in top.lines(m, 80, 24, "tracing")[4]
    assert " VM " in top.lines(m, 140, 24, "tracing")[4]


def test_empty_and_filtered_screens_say_so():
    m = top.TopModel()
    m.refresh(recording({}, {}, 1.0), now=1.0)
    assert "(no guest device accesses yet)" in top.lines(m, 80, 24, "tracing")
    m.refresh(recording({FAST: 1}, {}, 2.0), now=2.0)
    m.pid = 99
    assert "(no rows for pid 99)" in top.lines(m, 80, 24, "tracing")


def test_columns_hold_every_path_and_tell_long_names_apart():
    """Issue 16, defect 12: `unattributed` overflowed the PATH column and
    pushed P99 off an 80-column screen, and two regions were cut to the
    same `ioeventfd@0x10002~`."""
    m = top.TopModel()
    a = AccessKey(20, Space.MMIO, 0x10002000, 4, Op.WRITE, Path.UNATTRIBUTED)
    b = AccessKey(20, Space.MMIO, 0x10002004, 4, Op.WRITE, Path.IOREGIONFD)
    m.refresh(recording({a: 7, b: 5, FAST: 3}, {FAST: lat([5000] * 3)}, 1.0), now=1.0)
    for width in (80, 100):
        text = top.lines(m, width, 24, "tracing")
        header = text[4]
        op, p99 = header.index("OP"), header.index("P99us")
        for line in text[5:8]:                  # every field under its heading
            assert line[op] in "RW", (width, header, line)
            value = line[p99 - 2:p99 + len("P99us")].strip()
            assert value == "-" or float(value) > 0, (width, header, line)
        labels = [line[7:].split()[0] for line in text[5:8]]
        assert len(set(labels)) == 3, labels


def count_calls(monkeypatch, cls, name):
    """How often cls.name is called from now on (the original still runs)."""
    calls = [0]
    original = getattr(cls, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(cls, name, counted)
    return calls


def big_recording(counts, duration, registrations=(), vms=None):
    snap = RawSnapshot(taken=duration, accesses=dict(counts), registrations=list(registrations),
                       counters={"lost_events": 0, "dropped_accesses": 0})
    snap.vms = {1: VmInfo(10, 1, True, "qemu")}
    return Recording(snapshot=snap, duration_s=duration, vms=vms or {})


def test_a_refresh_names_only_the_keys_that_are_new(monkeypatch):
    """Issue 16, defect 7: ioregtop on one SeaBIOS QEMU (VGA memory, tens
    of thousands of keys) took 40 % of a CPU: every refresh named and
    grouped every key, twice.  Now a key is named once, and a refresh
    looks again only at the keys that moved."""
    names = count_calls(monkeypatch, regions.FallbackNamer, "name")
    vga = [(1, AccessKey(10, Space.MMIO, 0xA0000 + i, 1, Op.WRITE, Path.USERSPACE, i % 7))
           for i in range(50_000)]
    counts = {k: 1 for k in vga}
    m = top.TopModel(group="address")
    m.refresh(big_recording(counts, 1.0), now=1.0)
    assert names[0] == 50_000
    for k in vga[:5]:
        counts[k] += 10
    new = (1, AccessKey(10, Space.PIO, 0x3C0, 1, Op.WRITE, Path.USERSPACE, 3))
    counts[new] = 4
    m.refresh(big_recording(counts, 2.0), now=2.0)
    assert names[0] == 50_001, "only the new key is named"
    assert m.total == 50_000 + 50 + 4 and m.rate == 54.0
    moved = {r.label for r in m.rows if r.rate}
    assert moved == {f"{0xA0000 + i:#x}:1" for i in range(5)} | {"pio@0x3c0:1"}
    m.cycle_group()                 # path: regrouped from the counts, not named again
    assert names[0] == 50_001 and [r.total for r in m.rows] == [50_054]
    assert m.rate == 54.0


def qemu_vm(history):
    return {1: VmFacts(1, name="seabios", history=history)}


def test_names_follow_a_memory_map_that_grows(monkeypatch):
    """The name cache is right when the map changes: a new generation
    re-names only the keys made under it, a new registration only its
    VM's keys, and their counts move to their new rows."""
    h = LayoutHistory()
    h.add_section(1, Space.MMIO, 0x100, 0xA0000, 0x20000, "vga-lowmem", 0, 0x10)
    old_key = (1, AccessKey(10, Space.MMIO, 0xB0000, 1, Op.WRITE, Path.USERSPACE, 1))
    new_key = (1, AccessKey(10, Space.MMIO, 0xB0000, 1, Op.WRITE, Path.USERSPACE, 2))
    counts = {old_key: 5, new_key: 3}
    looked_up = count_calls(monkeypatch, regions.QemuRegions, "flat_range")
    m = top.TopModel()
    m.refresh(big_recording(counts, 1.0, vms=qemu_vm(h)), now=1.0)
    assert {r.label: r.total for r in m.rows} == {"vga-lowmem": 8}
    # Generation 2's map (mirrored late): 0xb0000 is now another region.
    h.add_section(2, Space.MMIO, 0x200, 0xA0000, 0x10000, "vga-lowmem", 0, 0x10)
    h.add_section(2, Space.MMIO, 0x200, 0xB0000, 0x10000, "vga.vram", 0, 0x20)
    m.refresh(big_recording(counts, 2.0, vms=qemu_vm(h)), now=2.0)
    assert looked_up[0] == 3, "only the generation-2 key is named again"
    assert {r.label: r.total for r in m.rows} == {"vga-lowmem": 5, "vga.vram": 3}
    # An ioeventfd registered at a fallback-named address renames that VM's keys.
    bell = (1, AccessKey(10, Space.MMIO, 0xFE000000, 4, Op.WRITE, Path.USERSPACE))
    counts[bell] = 2
    m.refresh(big_recording(counts, 3.0, vms=qemu_vm(h)), now=3.0)
    assert "mmio@0xfe000000" in {r.label for r in m.rows}
    reg = [(1, "ioeventfd", Space.MMIO, 0xFE000000, 4)]
    m.refresh(big_recording(counts, 4.0, reg, vms=qemu_vm(h)), now=4.0)
    assert {r.label: r.total for r in m.rows} == {
        "vga-lowmem": 5, "vga.vram": 3, "ioeventfd@0xfe000000": 2}


def test_address_rows_keep_their_region_name_and_sizes():
    """Issue 16, defect 12: grouped by address, a row said `mmio@0xa0004`
    only: neither the region nor the access sizes.  The address and sizes
    are never cut; the name takes the columns left (MMIO addresses go
    bare: 80 columns leave the column 15 characters)."""
    h = LayoutHistory()
    h.add_section(1, Space.MMIO, 0x100, 0xA0000, 0x20000, "vga-lowmem", 0, 0x10)
    byte = (1, AccessKey(10, Space.MMIO, 0xA0004, 1, Op.WRITE, Path.USERSPACE, 1))
    word = (1, AccessKey(10, Space.MMIO, 0xA0004, 2, Op.WRITE, Path.USERSPACE, 1))
    port = (1, AccessKey(10, Space.PIO, 0x5000, 4, Op.READ, Path.USERSPACE, 1))
    m = top.TopModel(group="address")
    m.refresh(big_recording({byte: 3, word: 2, port: 1}, 1.0, vms=qemu_vm(h)), now=1.0)
    assert {r.label for r in m.rows} == {"0xa0004:1,2 vga-lowmem", "pio@0x5000:4"}
    for width in (80, 100):
        text = "\n".join(top.lines(m, width, 24, "tracing"))
        assert "0xa0004:1,2 vga" in text and "pio@0x5000:4" in text
    assert "vga-lowmem" in "\n".join(top.lines(m, 100, 24, "tracing"))


class MapKey(ctypes.Structure):
    """struct access_key of bpf/ioregtrace.bpf.c."""
    _fields_ = [("pid", ctypes.c_uint32), ("vm", ctypes.c_uint32), ("addr", ctypes.c_uint64),
                ("space", ctypes.c_uint8), ("op", ctypes.c_uint8), ("path", ctypes.c_uint8),
                ("size", ctypes.c_uint8), ("layout", ctypes.c_uint32)]


class FakeMap:
    def __init__(self, entries=None):
        self.entries = entries if entries is not None else []     # the test's own list

    def items_lookup_batch(self):
        return iter(self.entries)

    def keys(self):
        return [k for k, _ in self.entries]

    def __getitem__(self, index):            # the per-CPU counters
        return [0, 0]


def test_the_maps_are_read_into_keys_made_once(monkeypatch):
    """Issue 16, defect 7: every refresh built an AccessKey for each of the
    tens of thousands of map keys, more work than reading the map."""
    made = count_calls(monkeypatch, probes, "_access_key")
    tracer = probes.Tracer.__new__(probes.Tracer)
    tracer.lock, tracer._access_keys, tracer.per_vcpu = threading.RLock(), {}, False
    tracer.poll, tracer.snapshot_vms = (lambda: None), (lambda: {})
    entries = [(MapKey(10, 1, 0xA0000 + i, 0, 1, 4, 1, i % 7), ctypes.c_uint64(1))
               for i in range(5000)]
    tracer.bpf = {b"accesses": FakeMap(entries), b"latencies": FakeMap(),
                  b"counters": FakeMap(), b"reg_history": FakeMap()}
    first = tracer.snapshot()
    entries.append((MapKey(10, 1, 0x3C0, 1, 1, 4, 1, 3), ctypes.c_uint64(2)))
    second = tracer.snapshot()
    assert made[0] == 5001, "one AccessKey per map key, made once"
    key = (1, AccessKey(10, Space.MMIO, 0xA0004, 1, Op.WRITE, Path.USERSPACE, 4))
    assert first.accesses[key] == second.accesses[key] == 1
    assert second.accesses[(1, AccessKey(10, Space.PIO, 0x3C0, 1, Op.WRITE, Path.USERSPACE,
                                         3))] == 2


def test_exits_grouping_rows_per_vm_and_reason():
    """`g` up to exits: a row per VM x exit reason (vCPUs summed), rate and
    quantiles of the last interval, totals since start; and back again."""
    from ioregtrace import exits

    def hw(times, tid, reason=0x7B, kind=exits.HW):
        slots = [0] * histogram.SLOTS
        for ns in times:
            slots[histogram.slot_of(ns)] += 1
        return (1, exits.ExitKey(kind, 2 if kind == exits.HW else 0, reason, tid=tid)), \
            exits.ExitStats(len(times), 0, sum(times), min(times), max(times), slots)

    m = top.TopModel()
    rec = recording({FAST: 10}, {}, 1.0)
    rec.snapshot.exits = dict([hw([2000] * 10, 11), hw([2000] * 5, 12),
                               hw([90000] * 4, 11, reason=2, kind=exits.USER)])
    m.refresh(rec, now=1.0)
    for _ in range(3):
        m.cycle_group()
    assert m.group == "exits"
    rec = recording({FAST: 20}, {}, 3.0)
    rec.snapshot.exits = dict([hw([2000] * 10 + [30000] * 4, 11), hw([2000] * 5, 12),
                               hw([90000] * 4, 11, reason=2, kind=exits.USER)])
    m.refresh(rec, now=3.0)
    rows = {(r.label, r.path): r for r in m.visible()}
    ioio = rows[("IOIO", "hardware")]
    assert ioio.total == 19 and ioio.rate == 4 / 2.0 and ioio.who == "qemu"
    assert 30.0 <= ioio.p50_us <= 30.0 * 1.125               # only the new exits
    io = rows[("IO", "userspace")]
    assert io.total == 4 and io.rate == 0 and io.p50_us is None
    text = "\n".join(top.lines(m, 100, None, "tracing", keys=False))
    assert "EXIT REASON" in text and "IOIO" in text and "hardware" in text
    m.conclude(rec, now=3.0)
    assert rows != {} and m.visible()[0].rate == 19 / 3.0
    m.cycle_group()
    assert m.group == "region" and {r.label for r in m.visible()} == {"mmio@0x1000"}
