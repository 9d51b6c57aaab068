"""What an idle gateway costs: CPU when no traffic flows, memory per device.

Both are read from a real `gateway daemon` process (what an operator runs),
not from the data path in this process, so the control socket, the metrics
server and the flood reader count too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import setups

from gateway.testing.daemon import Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.testing.testpmd import Testpmd
from gateway.xdp.nic import FRAME_SIZE, NFRAMES

MIB = 1 << 20
SETTLE = 0.5  # after a guest connects: workers start, first polls run


@contextlib.contextmanager
def running_daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="gw-footprint-") as tmp:
        d = Daemon(os.path.join(tmp, "run"), os.path.join(tmp, "state")).start()
        try:
            yield d
        finally:
            if d.proc.poll() is None:
                d.stop()


def attach(d: Daemon, nic: str, name: str, mac: str) -> str:
    """Attach a device; its vhost-user socket path."""
    return json.loads(d.ok("attach", name, nic, "--mac", mac, "--json"))["socket"]


def cpu_seconds(pid: int) -> float:
    """user + system time; /proc/PID/stat sums all threads, exited ones included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_percent(pid: int, seconds: float) -> float:
    """Percent of one core over `seconds`; clock-tick resolution, so 0.1 % at 10 s."""
    time.sleep(SETTLE)
    a, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - a) / (time.monotonic() - t0)


def idle_cpu(seconds: float = 10) -> dict:
    """Daemon CPU, percent of one core, with one device and no traffic.

    Three cases, because an idle worker's cost depends on the guest: none
    connected; a guest that sleeps between frames and kicks (our Python
    front-end, like a Linux virtio-net driver); a DPDK guest (testpmd rxonly)
    that busy-polls its own rings and never sleeps.
    """
    with topology() as topo, running_daemon() as d:
        pid = d.proc.pid
        sock = attach(d, topo.nic, "idle0", setups.GUEST_MAC)
        result = {"seconds": seconds, "no_guest_pct": cpu_percent(pid, seconds)}
        with Frontend(sock) as fe:
            fe.connect().setup()
            fe.post_rx(64)
            result["frontend_guest_pct"] = cpu_percent(pid, seconds)
        with Testpmd(sock, lcores=setups.lcores(setups.SOURCE_CPU),
                     args=["--forward-mode=rxonly"]) as guest:
            guest.wait_link_up(30)
            guest.start()
            result["testpmd_guest_pct"] = cpu_percent(pid, seconds)
    return result


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and its parts; Pss splits pages shared with other processes (libraries)."""
    out = {}
    for path, keys in ((f"/proc/{pid}/status", ("VmRSS", "RssAnon", "RssFile", "RssShmem")),
                       (f"/proc/{pid}/smaps_rollup", ("Pss",))):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024 / MIB
    return out


def rss_per_device(n: int = 8) -> dict:
    """Daemon memory with 0 devices, then 1 and `n` on one NIC, each with a connected guest.

    Counted: the daemon's resident pages (VmRSS). The UMEM (one per NIC queue,
    shared by the devices on it) is pinned by the kernel, so all of it is
    resident from the first attach: reported as umem_mib, in no device's share.
    The first attach also compiles and loads the XDP program (bcc/LLVM), a
    one-time cost (one_time_mib) that is no device's either, which is why
    per_device_mib is the marginal cost, (total - first) / (n - 1), and
    avg_per_device_mib, (total - base - UMEM) / n, charges it to the n devices.
    Guest memory (the front-end's memfd, mapped by the daemon) counts only for
    the pages the daemon touched: here idle guests, so rings only. Once traffic
    flows it grows by the guest buffers the daemon copies into, pages the guest
    owns and shares (RssShmem; Pss halves them).
    """
    with topology() as topo, running_daemon() as d, contextlib.ExitStack() as guests:
        pid = d.proc.pid
        time.sleep(SETTLE)
        base = memory_mib(pid)
        for i in range(n):
            sock = attach(d, topo.nic, f"fp{i}", f"52:54:00:be:01:{i:02x}")
            guests.enter_context(Frontend(sock)).connect().setup()
            if i == 0:
                time.sleep(SETTLE)
                first = memory_mib(pid)
        time.sleep(SETTLE)
        total = memory_mib(pid)
    umem = NFRAMES * FRAME_SIZE / MIB  # the topology's NIC has one queue
    return {
        "devices": n,
        "base_mib": base["VmRSS"],
        "first_mib": first["VmRSS"],
        "total_mib": total["VmRSS"],
        "umem_mib": umem,
        "one_time_mib": first["VmRSS"] - base["VmRSS"] - umem,
        "per_device_mib": (total["VmRSS"] - first["VmRSS"]) / max(n - 1, 1),
        "avg_per_device_mib": (total["VmRSS"] - base["VmRSS"] - umem) / n,
        "total_breakdown_mib": total,
    }


if __name__ == "__main__":
    print("idle cpu", idle_cpu(float(sys.argv[1]) if len(sys.argv) > 1 else 10))
    print("rss", rss_per_device())
