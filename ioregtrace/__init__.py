"""ioregtrace: how KVM dispatches guest device accesses.

Data flow, top to bottom:
  bpf/ioregtrace.bpf.c   tracepoints -> per-thread classification -> maps
  probes.py              compile, attach, read the maps (RawSnapshot)
  report.py              name and sum rows (Report)
  views/                 tables, JSON (and later top, exporter)
  session.py, cli.py     what to trace and for how long
"""

__version__ = "0.1.0"
