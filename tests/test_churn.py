"""Attach/detach churn through a real daemon: nothing accumulates.

50 devices attached and detached, GATEWAY_CHURN_CYCLES times (20 in CI; the
issue's 1,000 with `GATEWAY_CHURN_CYCLES=1000 ./run.sh test tests/test_churn.py
-s --timeout 0`). One more device stays attached throughout, so the NIC keeps its XDP
program and the loop measures devices, not bcc compiles. The daemon's fd count,
RSS and the program's mac2slot entries must come back to where they started;
the test prints them.
"""

from __future__ import annotations

import os
import time

from gateway.control import request
from gateway.testing.daemon import Daemon
from gateway.testing.netns import topology
from gateway.xdp import link
from gateway.xdp.program import stale_macs

DEVICES = 50
CYCLES = int(os.environ.get("GATEWAY_CHURN_CYCLES", "20"))


def footprint(pid: int, nic: str) -> tuple[int, float, int]:
    """(open fds, RSS MiB, MACs in the XDP program's mac2slot map) of the daemon."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
    return fds, rss, len(stale_macs(link.xdp_state(nic)[0]))


def settled(pid: int, nic: str) -> tuple[int, float, int]:
    """footprint() once the daemon has closed the last request's connection,
    which it does after replying: the fd count holds still for 0.3 s."""
    deadline = time.monotonic() + 5
    last = footprint(pid, nic)
    while time.monotonic() < deadline:
        time.sleep(0.3)  # a quiet spell is the event: nothing signals it
        now = footprint(pid, nic)
        if now[0] == last[0]:
            return now
        last = now
    return last


def test_attach_detach_churn_returns_to_baseline(tmp_path):
    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            request(d.run_dir, "attach", name="anchor", iface=topo.nic, mac="")
            names = [f"c{i}" for i in range(DEVICES)]
            for n in names:  # one warm-up cycle: first-use allocations are not leaks
                request(d.run_dir, "attach", name=n, iface=topo.nic, mac="")
            for n in names:
                request(d.run_dir, "detach", name=n)
            base = settled(d.proc.pid, topo.nic)
            t0 = time.monotonic()
            for _ in range(CYCLES):
                for n in names:
                    request(d.run_dir, "attach", name=n, iface=topo.nic, mac="")
                assert footprint(d.proc.pid, topo.nic)[2] == base[2] + DEVICES
                for n in names:
                    request(d.run_dir, "detach", name=n)
            took = time.monotonic() - t0
            after = settled(d.proc.pid, topo.nic)
            print(f"\n{CYCLES} cycles x {DEVICES} devices in {took:.0f} s: fds {base[0]} -> "
                  f"{after[0]}, RSS {base[1]:.1f} -> {after[1]:.1f} MiB, mac2slot entries "
                  f"{base[2]} -> {after[2]}")
            assert after[0] == base[0]
            assert after[2] == base[2] == 1  # the anchor's
            assert after[1] < base[1] + 8  # allocator noise, not a per-cycle leak
            assert [x["name"] for x in request(d.run_dir, "list")] == ["anchor"]
        finally:
            d.stop()
