"""The loader's side of the contract with bpf/ioregtrace.bpf.c."""

import re

from ioregtrace import histogram, keys, kvmapi, probes

SOURCE = open(probes.BPF_SOURCE).read()


def defined_by_loader():
    return {flag[2:].split("=")[0] for flag in probes.compile_flags(have_fast_mmio=True)
            if flag.startswith("-D")}


def test_every_constant_the_program_uses_is_defined():
    code = re.sub(r"/\*.*?\*/", "", SOURCE, flags=re.S)
    used = set(re.findall(r"\b(?:SPACE|OP|PATH|KVM|HIST|MAX|IOEVENTFD|ZONE)_[A-Z0-9_]+\b",
                          code)) | {"KVM_RUN", "KVM_IOEVENTFD", "KVM_CREATE_VM"}
    defined_here = set(re.findall(r"#define\s+([A-Z0-9_]+)", code))
    missing = used - defined_here - defined_by_loader()
    assert not missing, missing


def test_loader_constants_have_the_abi_values():
    flags = dict(f[2:].split("=", 1) for f in probes.compile_flags(False) if "=" in f)
    assert int(flags["KVM_RUN"].rstrip("U"), 16) == kvmapi.KVM_RUN == 0xAE80
    assert int(flags["KVM_IOEVENTFD"].rstrip("U"), 16) == kvmapi.KVM_IOEVENTFD
    assert flags["PATH_USERSPACE"] == str(int(keys.Path.USERSPACE))
    assert flags["HIST_SLOTS"] == str(histogram.SLOTS)
    assert "-DHAVE_KVM_FAST_MMIO" in probes.compile_flags(True)
    assert "-DHAVE_KVM_FAST_MMIO" not in probes.compile_flags(False)


def test_counters_are_listed_in_the_programs_order():
    indices = {name.lower(): int(i) for name, i in
               re.findall(r"#define CNT_([A-Z_]+)\s+(\d+)", SOURCE)}
    assert sorted(indices.values()) == list(range(len(indices)))
    assert list(probes.COUNTERS) == sorted(indices, key=indices.get)


def test_uapi_structs_read_from_ioctl_arguments_match_the_abi():
    """The BPF copies of struct kvm_ioeventfd / kvm_coalesced_mmio_zone are
    prefixes of the real ones (the tail of kvm_ioeventfd is padding)."""
    ioeventfd = re.search(r"struct ioctl_ioeventfd \{(.*?)\};", SOURCE, re.S).group(1)
    fields = re.findall(r"(u64|u32|s32) (\w+);", ioeventfd)
    assert [n for _, n in fields] == [f[0] for f in kvmapi.KvmIoeventfd._fields_][:5]
    zone = re.search(r"struct ioctl_zone \{(.*?)\};", SOURCE, re.S).group(1)
    assert [n for _, n in re.findall(r"(u64|u32) (\w+);", zone)] == [
        f[0] for f in kvmapi.KvmCoalescedMmioZone._fields_]


def test_raw_event_layout_matches_the_program():
    """probes.RAW_EVENT decodes struct raw_event: same fields, same order."""
    body = re.search(r"struct raw_event \{(.*?)\};", SOURCE, re.S).group(1)
    fmt = {"u64": "Q", "u32": "I", "u8": "B"}
    out = "<"
    for ctype, _name, count in re.findall(r"(u64|u32|u8) (\w+)(?:\[(\d+)\])?;", body):
        out += f"{count}x" if count else fmt[ctype]
    assert out == probes.RAW_EVENT.format
