"""Latency histogram layout shared with the BPF program.

Log2 buckets split into 2**SUB_BITS linear sub-buckets (as in HdrHistogram),
so a bucket is at most 1/8 of its lower bound wide: a quantile read from it is
within 12.5 % of the true value, where plain log2 buckets would give 100 %.

Slots, for a latency of `ns` nanoseconds:
  ns < 2**LOW_SHIFT:  slot = ns >> (LOW_SHIFT - SUB_BITS)      (linear, 128 ns)
  otherwise, with e = floor(log2(ns)) and m the SUB_BITS bits below the top:
                      slot = (e - LOW_SHIFT + 1) << SUB_BITS | m
  e > HIGH_SHIFT:     the last slot (overflow, ~275 s and more)
"""

import math

SUB_BITS = 3
LOW_SHIFT = 10     # 1.024 us
HIGH_SHIFT = 37    # 137 s
SLOTS = (HIGH_SHIFT - LOW_SHIFT + 2) << SUB_BITS
ARRAY = 1 << (SLOTS - 1).bit_length()   # the BPF array: a power of two >= SLOTS


def bpf_defines():
    return [f"-DHIST_SUB_BITS={SUB_BITS}", f"-DHIST_LOW_SHIFT={LOW_SHIFT}",
            f"-DHIST_HIGH_SHIFT={HIGH_SHIFT}", f"-DHIST_SLOTS={SLOTS}",
            f"-DHIST_ARRAY={ARRAY}"]


def slot_of(ns):
    """The slot the BPF program puts `ns` in (the reference for tests)."""
    if ns < (1 << LOW_SHIFT):
        return ns >> (LOW_SHIFT - SUB_BITS)
    e = ns.bit_length() - 1
    if e > HIGH_SHIFT:
        return SLOTS - 1
    sub = (ns >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1)
    return ((e - LOW_SHIFT + 1) << SUB_BITS) + sub


def slot_bounds(slot):
    """[lower, upper) in nanoseconds of a slot; the last one is open."""
    if slot < (1 << SUB_BITS):
        width = 1 << (LOW_SHIFT - SUB_BITS)
        return slot * width, (slot + 1) * width
    e = (slot >> SUB_BITS) - 1 + LOW_SHIFT
    sub = slot & ((1 << SUB_BITS) - 1)
    width = 1 << (e - SUB_BITS)
    lower = (1 << e) + sub * width
    if slot == SLOTS - 1:
        return lower, float("inf")
    return lower, lower + width


def quantile_ns(slots, q, max_ns):
    """The q-quantile as the upper bound of the slot it falls in, capped at
    the exact maximum: never below the true quantile, at most 12.5 % above
    it (the report says "at most X")."""
    total = sum(slots)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for slot, n in enumerate(slots):
        seen += n
        if seen >= rank:
            return min(slot_bounds(slot)[1], max_ns)
    return max_ns
