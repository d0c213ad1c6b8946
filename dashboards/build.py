#!/usr/bin/env python3
"""Generate the Grafana dashboard (dashboards/ioregtrace.json) from this file,
the source of truth.  `python3 dashboards/build.py` rewrites it; the tests
check the JSON in the repository is what this file generates, and run every
query against a real Prometheus."""

import json
import os

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECT = 'vm=~"$vm", region=~"$region"'
RATE = "$__rate_interval"


def target(expr, legend, ref="A", **extra):
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref,
            **extra}


def panel(pid, title, kind, grid, targets, unit="short", description="", **extra):
    return {"id": pid, "type": kind, "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": dict(zip("xywh", grid, strict=True)),
            "targets": targets, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            **extra}


def latency_quantile(q):
    # By VM too: two VMs' regions of one name are two devices.
    return (f"histogram_quantile({q}, sum by (le, vm, region) (rate("
            f"ioregtrace_userspace_dispatch_seconds_bucket{{{SELECT}}}[{RATE}])))")


PANELS = [
    panel(1, "Accesses/s by dispatch path", "timeseries", (0, 0, 12, 8),
          [target(f"sum by (path) (rate(ioregtrace_accesses_total{{{SELECT}}}[{RATE}]))",
                  "{{path}}")], unit="ops",
          description="ioeventfd and coalesced never leave the kernel; userspace is "
                      "a KVM_RUN exit handled by the VMM."),
    panel(2, "Accesses/s by region (top 10)", "timeseries", (12, 0, 12, 8),
          [target(f"topk(10, sum by (vm, region) (rate(ioregtrace_accesses_total"
                  f"{{{SELECT}}}[{RATE}])))", "{{vm}} {{region}}")], unit="ops"),
    panel(3, "Userspace share", "stat", (0, 8, 6, 6),
          [target(f'sum(rate(ioregtrace_accesses_total{{path="userspace", {SELECT}}}'
                  f"[{RATE}])) / sum(rate(ioregtrace_accesses_total{{{SELECT}}}[{RATE}]))",
                  "userspace")], unit="percentunit",
          description="The share of accesses that exit to the VMM: the slow path."),
    panel(4, "Userspace dispatch latency p50 / p99 by region", "timeseries", (6, 8, 18, 6),
          [target(latency_quantile(0.5), "p50 {{vm}} {{region}}", "A"),
           target(latency_quantile(0.99), "p99 {{vm}} {{region}}", "B")], unit="s",
          description="From KVM_RUN's return to the next KVM_RUN on the same vCPU thread."),
    panel(5, "Userspace dispatch latency (heatmap)", "heatmap", (0, 14, 24, 8),
          [target(f"sum by (le) (increase(ioregtrace_userspace_dispatch_seconds_bucket"
                  f"{{{SELECT}}}[{RATE}]))", "{{le}}", format="heatmap")], unit="s",
          options={"calculate": False, "yAxis": {"unit": "s"}}),
    panel(6, "ioregionfd candidates: userspace time by region", "table", (0, 22, 16, 8),
          [target(f"topk(10, sum by (vm, region, op) (increase("
                  f"ioregtrace_userspace_dispatch_seconds_sum{{{SELECT}}}[$__range])))",
                  "{{vm}} {{region}} {{op}}", instant=True, format="table")], unit="s",
          description="Where the VMM spends its time on exits: reads, and writes that no "
                      "ioeventfd catches. Moving these regions to ioregionfd would skip "
                      "the VMM's vCPU thread."),
    panel(7, "Lost events and dropped keys", "timeseries", (16, 22, 8, 8),
          [target(f"sum(increase(ioregtrace_lost_events_total[{RATE}]))", "lost", "A"),
           target(f"sum(increase(ioregtrace_dropped_keys_total[{RATE}]))", "dropped", "B")]),
    # The exits row: every exit by reason (hardware exits only where the KVM
    # backend emits kvm:kvm_exit), and what handling them costs.
    panel(8, "VM exits/s by reason (top 10)", "timeseries", (0, 30, 12, 8),
          [target('topk(10, sum by (vm, kind, reason) (rate(ioregtrace_exits_total'
                  f'{{vm=~"$vm"}}[{RATE}])))', "{{vm}} {{kind}} {{reason}}")], unit="ops",
          description="hardware: kvm:kvm_exit by VMX basic reason / SVM exit code (absent "
                      "where the backend does not emit it, e.g. PVM); userspace: returns "
                      "from KVM_RUN by kvm_run.exit_reason."),
    panel(9, "Exit handling time p50 / p99 by reason", "timeseries", (12, 30, 12, 8),
          [target(f"histogram_quantile({q}, sum by (le, vm, kind, reason) (rate("
                  f'ioregtrace_exit_handling_seconds_bucket{{vm=~"$vm"}}[{RATE}])))',
                  f"p{int(q * 100)} {{{{vm}}}} {{{{kind}}}} {{{{reason}}}}", ref)
           for q, ref in ((0.5, "A"), (0.99, "B"))], unit="s",
          description="hardware: kvm_exit to the next kvm_entry, exits kvm.ko handled "
                      "itself; userspace: the VMM's round trip to its next KVM_RUN."),
]


def variable(name, query):
    return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


DASHBOARD = {
    "title": "ioregtrace: guest device access dispatch",
    "uid": "ioregtrace",
    "description": "How KVM dispatches guest MMIO/PIO accesses, per VM and region.",
    "tags": ["kvm", "ioregtrace"],
    "schemaVersion": 38,
    "version": 1,
    "editable": True,
    "time": {"from": "now-15m", "to": "now"},
    "refresh": "10s",
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource",
         "query": "prometheus", "current": {}},
        variable("vm", "label_values(ioregtrace_accesses_total, vm)"),
        variable("region", 'label_values(ioregtrace_accesses_total{vm=~"$vm"}, region)'),
    ]},
    "panels": PANELS,
}


def render():
    return json.dumps(DASHBOARD, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ioregtrace.json")
    with open(out, "w") as f:
        f.write(render())
    print(f"wrote {out}")
