"""Acceptance 2 (issue 5): record -> report equals stat on the same demo
run; raw events add up to the aggregates; nothing lost."""

import collections

import pytest

from conftest import IOREGTRACE, count_rows, load_json, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def same_run(tracing_host, tmp_path_factory):
    """`stat` traces `record`, which traces the demo: two tracers, one run."""
    d = tmp_path_factory.mktemp("record")
    paths = {name: d / name for name in ("stat.json", "demo.bundle", "truth.json",
                                         "report.json", "events.json")}
    res = run_cli("stat", "--json", "-o", str(paths["stat.json"]), "--",
                  IOREGTRACE, "record", "-o", str(paths["demo.bundle"]), "--events", "500000",
                  "--", IOREGTRACE, "demo", "--delay-us", "500",
                  "--truth", str(paths["truth.json"]))
    assert res.returncode == 0, res.stderr
    for args, out in ((["--json"], "report.json"), (["--json", "--events"], "events.json")):
        rep = run_cli("report", str(paths["demo.bundle"]), *args, "-o", str(paths[out]))
        assert rep.returncode == 0, rep.stderr
    docs = {name: load_json(p) for name, p in paths.items() if name.endswith(".json")}
    docs["bundle"] = paths["demo.bundle"]
    return docs


def test_report_of_the_bundle_equals_stat_of_the_run(same_run):
    report, stat, truth = same_run["report.json"], same_run["stat.json"], same_run["truth.json"]
    assert count_rows(report) == count_rows(stat) == count_rows(truth)
    assert report["lost_events"] == stat["lost_events"] == 0
    assert report["dropped_keys"] == 0
    # Two tracers timed the same exits with their own clocks: latency buckets
    # may differ by one 12.5 % step, no more.
    lat = lambda doc: {(r["space"], r["address"], r["op"]): r["latency_us"]  # noqa: E731
                       for r in doc["rows"] if r["latency_us"]}
    assert lat(report).keys() == lat(stat).keys()
    for key, got in lat(report).items():
        want = lat(stat)[key]
        assert abs(got["p50"] - want["p50"]) <= 0.13 * want["p50"] + 2, (key, got, want)


def test_raw_events_add_up_to_the_aggregates(same_run):
    events, report = same_run["events.json"], same_run["report.json"]
    assert events["lost"] == 0
    per_key = collections.Counter()
    for e in events["events"]:
        per_key[(e["space"], e["address"], e["size"], e["op"], e["path"])] += e["count"]
    assert per_key == count_rows(report)
    assert len(events["events"]) < events["requested"]      # N was large enough


def test_userspace_events_carry_their_latency(same_run):
    events = same_run["events.json"]["events"]
    userspace = [e for e in events if e["path"] == "userspace"]
    timed = [e for e in userspace if e["latency_ns"] is not None]
    # Only the very last exit (the demo's "done") is never re-entered.
    assert len(userspace) - len(timed) == 1
    forwarded = [e["latency_ns"] for e in timed if e["address"] == 0x10001000]
    assert forwarded and min(forwarded) >= 500_000
    times = [e["t_ns"] for e in events]
    assert times == sorted(times) and times[0] == 0


def test_bundle_carries_host_and_probe_facts(same_run):
    from ioregtrace import bundle
    rec = bundle.read(same_run["bundle"])
    assert rec.host["kernel"] and rec.host["kvm"]["caps"]["ioeventfd"] >= 1
    assert "kvm:kvm_mmio" in rec.probes["attached"]
    assert rec.events is not None and rec.events.requested == 500000
