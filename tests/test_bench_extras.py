"""Latency, idle CPU and RSS measurements run and return sane figures; no timing is asserted."""

from __future__ import annotations

import pathlib
import sys

import pytest

from gateway.testing import testpmd as tp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import footprint  # noqa: E402
import latency  # noqa: E402

needs_testpmd = pytest.mark.skipif(not tp.testpmd_available(),
                                   reason="dpdk-testpmd not installed")


@needs_testpmd
@pytest.mark.dpdk
@pytest.mark.parametrize("setup", ["gateway", "testpmd"])
def test_latency(setup):
    r = latency.latency(setup, count=50, interval=0.005)
    assert r["sent"] == 50 and 0 < r["received"] <= 50
    assert 0 < r["min_us"] <= r["p50_us"] <= r["p95_us"] <= r["p99_us"] <= r["max_us"]


@needs_testpmd
@pytest.mark.dpdk
@pytest.mark.parametrize("setup", ["gateway", "testpmd"])
def test_latency_with_two_devices_and_beside_a_load(setup):
    r = latency.latency(setup, count=20, interval=0.005, devices=2)
    assert r["sent"] == 40 and [d["sent"] for d in r["per_device"]] == [20, 20]
    assert r["received"] == sum(d["received"] for d in r["per_device"]) > 0
    assert r["cpu_pct"] > 0  # the forwarder's threads were found and measured
    r = latency.latency(setup, count=20, interval=0.005, background_pps=20_000)
    assert r["background_pps"] == 20_000 and 0 < r["received"] <= 20
    if setup == "gateway":  # the device's worker slept between pings
        assert r["workers"]["sleeps"] > 0


@needs_testpmd
@pytest.mark.dpdk
def test_idle_cpu():
    r = footprint.idle_cpu(seconds=0.5)
    for key in ("no_guest_pct", "frontend_guest_pct", "testpmd_guest_pct"):
        assert r[key] >= 0


def test_rss_per_device():
    r = footprint.rss_per_device(n=2)
    assert r["devices"] == 2
    assert 0 < r["base_mib"] < r["first_mib"] <= r["total_mib"]
    assert r["per_device_mib"] > 0 and r["umem_mib"] > 0


def test_percentile_is_an_observed_value():
    samples = [float(x) for x in range(1, 101)]
    assert latency.percentile(samples, 50) == 50
    assert latency.percentile(samples, 99) == 99
    assert latency.percentile([7.0], 99) == 7.0


def test_latency_runs_are_pooled_not_one_run_picked():
    """One run's p99 is its 10th worst ping, which one stalled moment of the
    host sets; the bench's percentiles are over every run's pings."""
    import bench

    def run(values: list[float], cpu: float) -> dict:
        return {**latency.summary(values, len(values)), "rtts_us": values, "cpu_pct": cpu}

    rs = [run([10.0] * 100, 2.0), run([20.0] * 97 + [1000.0] * 3, 4.0), run([30.0] * 100, 3.0)]
    out = bench.pooled(rs)
    assert (out["sent"], out["received"]) == (300, 300)
    assert (out["p50_us"], out["p99_us"], out["max_us"]) == (20.0, 30.0, 1000.0)
    assert out["cpu_pct"] == 3.0  # the runs' median
    assert [r["p99_us"] for r in out["runs"]] == [10.0, 1000.0, 30.0]
    assert all("rtts_us" not in r for r in rs)  # the samples do not go into the JSON twice


def test_ab_halves_leave_out_the_warm_up_block_and_the_switches():
    """An A/B run's first block (the pinger starting, the worker learning)
    counts for neither side, nor do pings within AB_EDGE of a switch."""
    s = 10**9
    flips = [(0, None), (1 * s, False), (2 * s, True), (3 * s, False)]
    pings = [(int(0.5 * s), 900.0), (int(1.5 * s), 1.0), (int(2.5 * s), 2.0),
             (int(3.5 * s), 3.0), (int(2 * s + 0.01 * s), 7.0), (-1, 8.0)]
    assert latency.split_ab(pings, flips) == {False: [1.0, 3.0], True: [2.0]}


def test_latency_rounds_alternate_their_order():
    import bench

    assert bench.rounds(["gw", "tp", "bp"], 3) == ["gw", "tp", "bp", "bp", "tp", "gw",
                                                   "gw", "tp", "bp"]
    assert bench.rounds(["gw"], 0) == []


@pytest.mark.qemu
def test_tcp_offload_measure_returns_both_settings():
    import tcp_offload

    lines: list[str] = []
    r = tcp_offload.measure(mbytes=1, runs=1, echo=lines.append)
    assert set(r) == {"offloads on", "offloads off"} and len(lines) == 2
    for m in r.values():
        assert m["guest_to_far_mbit"] > 0 and m["far_to_guest_mbit"] > 0 and m["runs"] == 1


def test_idle_spinner_spins_only_when_on_at_idle_priority_and_is_reaped():
    import os
    import time

    import setups

    def state(pid: int, want: str) -> str:
        """The process's state once it is `want`, or after 5 s (a signal's
        delivery is not synchronous)."""
        deadline = time.monotonic() + 5
        while True:
            s = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            if s == want or time.monotonic() > deadline:
                return s
            time.sleep(0.01)

    with setups.IdleSpinner(0) as spin:
        spin(False)
        pid = spin.proc.pid
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.sched_getaffinity(pid) == {0}
        assert state(pid, "T") == "T"  # stopped: the off half
        spin(True)
        assert state(pid, "R") == "R"
        spin(False)
        assert state(pid, "T") == "T"
    assert spin.proc is None and not os.path.exists(f"/proc/{pid}")
