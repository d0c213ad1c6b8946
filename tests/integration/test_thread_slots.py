"""Where a thread's BPF state lives: the slot of `thread_slots` its thread
id indexes, or task storage when another live thread holds that slot.
Counts are exact either way, an exiting thread frees its slot, and the next
thread to take it starts clean (a stale owner's cached pid would file its
accesses under the wrong VM).  With one slot, every thread after the first
collides."""

import subprocess
import sys
import time

import pytest

from conftest import IOREGTRACE, count_rows, load_json
from ioregtrace import kvmapi, probes

pytestmark = pytest.mark.integration

# Every path, a few hundred accesses each: a run takes well under a second.
DEMO = [IOREGTRACE, "demo", "--scale", "0.2", "--delay-us", "200"]

# A KVM process that makes a VM (so it gets thread state) and then waits.
HOLDER = f"""
import fcntl, os, sys
fd = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(fd, {kvmapi.KVM_CREATE_VM:#x}, 0)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def one_slot_tracer(tracing_host, monkeypatch):
    monkeypatch.setitem(probes.MAP_SIZES, "THREAD_SLOTS", 1)
    tracer = probes.Tracer()
    yield tracer
    tracer.close()


def slot_owner(tracer):
    return tracer.bpf[b"thread_slots"][0].tid


def rows_of(tracer, pid):
    """{(space, address, size, op, path): count} the tracer holds for `pid`,
    in count_rows' shape."""
    rows = {}
    for (_, k), n in tracer.snapshot().accesses.items():
        if k.pid == pid:
            key = (str(k.space), k.address, k.size, str(k.op), str(k.path))
            rows[key] = rows.get(key, 0) + n
    return rows


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_demo(tracer, tmp_path, name, takes_slot=False):
    """A demo run to its end: (its pid, its truth rows).  `takes_slot`: its
    thread is seen holding the (free) slot while it runs."""
    truth = tmp_path / f"{name}.json"
    demo = subprocess.Popen([*DEMO, "--repeat", "10" if takes_slot else "1",
                             "--truth", str(truth)], stderr=subprocess.PIPE, text=True)
    took = takes_slot and wait_until(lambda: slot_owner(tracer) == demo.pid, timeout=60)
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err
    assert took or not takes_slot, f"{name}: the demo's thread never took the free slot"
    return demo.pid, count_rows(load_json(truth))


def test_state_in_task_storage_and_in_a_reused_slot_counts_exactly(one_slot_tracer, tmp_path):
    tracer = one_slot_tracer
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert wait_until(lambda: slot_owner(tracer) == holder.pid)
        # The slot is taken: this VM's threads keep their state in task storage.
        in_storage = run_demo(tracer, tmp_path, "in-storage")
        assert slot_owner(tracer) == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert wait_until(lambda: slot_owner(tracer) == 0), "the holder's exit left its slot taken"

    # Two VMs in turn in the one slot: the second must not inherit what the
    # first one's thread cached (its kvm_run address, under the same fd).
    first = run_demo(tracer, tmp_path, "first", takes_slot=True)
    assert wait_until(lambda: slot_owner(tracer) == 0)
    second = run_demo(tracer, tmp_path, "second", takes_slot=True)

    for pid, truth in (in_storage, first, second):
        assert rows_of(tracer, pid) == truth
    counters = tracer.snapshot().counters
    assert all(v == 0 for v in counters.values()), counters
