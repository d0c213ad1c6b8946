"""A Recording: everything a report is built from, and nothing that needs
the live system.  `stat` renders one in memory; `record` writes one to a
bundle and `report` renders it back, through the same function, so
`report --json` of a bundle equals `stat --json` of the same run by
construction."""

from dataclasses import dataclass, field
from typing import Optional

from . import report as report_mod
from .probes import Events, RawEvent, RawSnapshot  # noqa: F401 (part of the model)
from .qemu.layout import LayoutHistory
from .regions import QemuRegions


@dataclass
class VmFacts:
    """What is known about one traced VMM process (by vm serial)."""
    serial: int
    name: Optional[str] = None             # -name guest=NAME / QMP query-name
    qemu_version: Optional[str] = None
    cmdline: Optional[list] = None
    history: Optional[LayoutHistory] = None
    region_ops: dict = field(default_factory=dict)     # MemoryRegion -> RegionOps


@dataclass
class Recording:
    snapshot: RawSnapshot
    duration_s: float
    vms: dict = field(default_factory=dict)       # serial -> VmFacts
    notes: list = field(default_factory=list)     # from the session (QMP problems, ...)
    host: dict = field(default_factory=dict)      # bundles only
    probes: dict = field(default_factory=dict)    # bundles only
    events: Optional[Events] = None
    # {program: (run_cnt, run_time_ns)} while kernel.bpf_stats_enabled is 1
    bpf_programs: dict = field(default_factory=dict)
    created: str = ""


def naming(recording):
    """({vm serial: QemuRegions} for the VMs whose QEMU memory map is
    known, {vm serial: name})."""
    vm_regions, vm_names = {}, {}
    for serial, facts in recording.vms.items():
        h = facts.history
        if h is not None and (h.mirrored or h.base is not None or h.final is not None):
            vm_regions[serial] = QemuRegions(h, facts.region_ops)
        if facts.name is not None:
            vm_names[serial] = facts.name
    return vm_regions, vm_names


def render(recording, by="auto"):
    """The Report every view prints."""
    vm_regions, vm_names = naming(recording)
    return report_mod.build(recording.snapshot, recording.duration_s, vm_regions=vm_regions,
                            vm_names=vm_names, by=by, notes=recording.notes)
