import math
import random

import pytest

from ioregtrace import histogram as h


def test_slots_partition_the_range_without_gaps():
    previous_upper = 0
    for slot in range(h.SLOTS - 1):
        lower, upper = h.slot_bounds(slot)
        assert lower == previous_upper, slot
        assert upper > lower
        previous_upper = upper
    assert h.slot_bounds(h.SLOTS - 1)[1] == float("inf")


@pytest.mark.parametrize("ns", [0, 1, 127, 128, 1023, 1024, 1151, 1152, 2047, 2048,
                                999_999, 1_000_000, (1 << 37) - 1, 1 << 37, 1 << 38,
                                (1 << 40) + 5])
def test_slot_of_lands_inside_its_bounds(ns):
    slot = h.slot_of(ns)
    lower, upper = h.slot_bounds(slot)
    if slot < h.SLOTS - 1:
        assert lower <= ns < upper
    else:
        assert ns >= lower


def test_bucket_width_is_at_most_an_eighth_above_1us():
    for slot in range(1 << h.SUB_BITS, h.SLOTS - 1):
        lower, upper = h.slot_bounds(slot)
        assert (upper - lower) / lower <= 1 / 8


def test_array_is_a_power_of_two_that_holds_every_slot():
    assert h.ARRAY & (h.ARRAY - 1) == 0
    assert h.ARRAY >= h.SLOTS


def _hist(values):
    slots = [0] * h.SLOTS
    for v in values:
        slots[h.slot_of(v)] += 1
    return slots


def test_quantile_is_an_upper_bound_within_an_eighth():
    rng = random.Random(7)
    for _ in range(200):
        values = [int(rng.lognormvariate(10, 2)) + 2000 for _ in range(rng.randint(1, 300))]
        ordered = sorted(values)
        for q in (0.5, 0.9, 0.99):
            exact = ordered[math.ceil(q * len(values)) - 1]   # nearest rank
            got = h.quantile_ns(_hist(values), q, max(values))
            assert exact <= got <= exact * 1.125 + 1, (q, exact, got)


def test_quantile_never_exceeds_the_exact_max():
    values = [1_000_000] * 10
    assert h.quantile_ns(_hist(values), 0.5, 1_000_000) == 1_000_000


def test_quantile_of_nothing_is_none():
    assert h.quantile_ns([0] * h.SLOTS, 0.5, 0) is None


def test_bpf_defines_name_every_constant():
    flags = dict(f[2:].split("=") for f in h.bpf_defines())
    assert flags == {"HIST_SUB_BITS": "3", "HIST_LOW_SHIFT": "10", "HIST_HIGH_SHIFT": "37",
                     "HIST_SLOTS": str(h.SLOTS), "HIST_ARRAY": str(h.ARRAY)}
