"""Round-trip latency at light load: far host -> setup -> guest -> setup -> far host.

The guest is DPDK testpmd (virtio-user) in icmpecho mode: a busy-polling guest
that answers at once, so the figures are the forwarder's two passes plus the
veth, not a guest kernel's wake-up. The far host pings it 100 times a second,
far below any rate where queues build up, so what is measured is how long a
lone frame waits in each forwarder (wake-ups, polling intervals), which a
throughput figure cannot show.

RTTs come from our own raw ICMP socket rather than ping(8), which the host may
not have. Both ends are the kernel's software timestamps on the far veth
(SO_TIMESTAMPING), so neither the pinger's wake-up nor its being preempted
between reading a clock and sending is counted: only the path out and back.
It runs in a subprocess inside the far host's namespace, pinned to the traffic
source's CPU, so it never competes for the GIL with the gateway running in
this process.

The far host gets a static neighbour entry for the guest: ARP is answered by
testpmd too, but through the gateway's slow broadcast path, and a neighbour
refresh in the middle of a run would show up as an outlier that is not the
data path's.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable

import setups
from pyroute2 import NetNS

from gateway.testing.netns import topology
from gateway.testing.testpmd import Testpmd

NUD_PERMANENT = 0x80

_PINGER = r"""
import json, os, socket, struct, sys, time

ip, count, interval, cpu = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
os.sched_setaffinity(0, {cpu})
# A short EEVDF slice (sched_runtime 100 us, kernel 6.12+): the far host sends
# on time instead of waiting out the busy-polling guest's slice on this CPU.
import ctypes
attr = struct.pack("IIQiIQQQ", 48, 0, 0, 0, 0, 100_000, 0, 0)
ctypes.CDLL(None).syscall(314, 0, ctypes.c_char_p(attr), 0)
SO_TIMESTAMPING = 37  # also the cmsg type; flags: TX_SOFTWARE RX_SOFTWARE SOFTWARE OPT_TSONLY
FLAGS = 1 << 1 | 1 << 3 | 1 << 4 | 1 << 11


def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def stamp(anc):
    for level, kind, val in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING:
            sec, nsec = struct.unpack("qq", val[:16])
            return sec * 10**9 + nsec
    return None


s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, FLAGS)
ident, payload = os.getpid() & 0xFFFF, bytes(range(56))
rtts = []
for seq in range(count):
    start = time.monotonic()
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq) + payload
    t0 = time.time_ns()
    s.sendto(pkt, (ip, 0))
    try:  # veth stamps the frame as it leaves, during sendto(): already queued
        t0 = stamp(s.recvmsg(0, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)[1]) or t0
    except BlockingIOError:
        pass
    deadline = start + 1.0
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, anc, _, _ = s.recvmsg(2048, 512)
        except TimeoutError:
            break
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            t1 = stamp(anc)
            if t1 is not None:
                rtts.append((t0, (t1 - t0) / 1000))
            break
    time.sleep(max(0.0, start + interval - time.monotonic()))
print(json.dumps(rtts))
"""


def percentile(samples: list[float], p: float) -> float:
    """Nearest rank: always a value that was observed, and p99 <= max by construction."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ping(topo, ip: str, count: int, interval: float) -> list[tuple[int, float]]:
    """(sent at, CLOCK_REALTIME ns; RTT in microseconds) of the echo replies
    that came back (lost ones are left out)."""
    out = topo.run(sys.executable, "-c", _PINGER, ip, str(count), str(interval),
                   str(setups.SOURCE_CPU), timeout=count * (interval + 1) + 30)
    return json.loads(out.stdout)


def _run_ns(tids: list[str], pid: int) -> int:
    """CPU time (ns, schedstat: exact, not clock ticks) of these threads of pid."""
    total = 0
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def forwarder_threads(setup: str, pid: int | None) -> tuple[int, list[str]]:
    """The forwarder's threads: the gateway's workers (named gw-*, in this
    process), or the whole testpmd process."""
    if setup.startswith("gateway"):
        me = os.getpid()
        tids = []
        for tid in os.listdir(f"/proc/{me}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{me}/task/{tid}/comm") as f:
                if f.read().startswith("gw-"):
                    tids.append(tid)
        return me, tids
    return pid, os.listdir(f"/proc/{pid}/task")


def summary(rtts: list[float], sent: int) -> dict:
    return {"p50_us": percentile(rtts, 50), "p95_us": percentile(rtts, 95),
            "p99_us": percentile(rtts, 99), "min_us": min(rtts), "max_us": max(rtts),
            "sent": sent, "received": len(rtts)}


AB_BLOCK = 1.0  # seconds per block of an A/B run
AB_EDGE = 0.05  # seconds around a switch whose pings count for neither side


def split_ab(samples: list[tuple[int, float]], flips: list[tuple[int, bool | None]]
             ) -> dict[bool, list[float]]:
    """RTTs by the switch's state when each ping left (flips: (time, state)
    in order; state None: a warm-up block, counted for neither side); pings
    within AB_EDGE of a flip are left out."""
    out: dict[bool, list[float]] = {True: [], False: []}
    times = [t for t, _ in flips]
    for t0, rtt in samples:
        i = bisect.bisect_right(times, t0) - 1
        if i < 0 or flips[i][1] is None:
            continue
        near = min(abs(t0 - times[j]) for j in (i, i + 1) if j < len(times))
        if near >= AB_EDGE * 1e9:
            out[flips[i][1]].append(rtt)
    return out


def latency(setup: str, count: int = 1000, interval: float = 0.01, devices: int = 1,
            background_pps: float = 0.0, ab: Callable[[bool], None] | None = None
            ) -> dict:
    """Percentiles over the replies that came back; a lost request is in sent, not received.

    `devices` guests (a port each of one icmpecho testpmd, each on its own
    NIC, one forwarder for all, as an operator would run it) are pinged at
    the same time, and
    the percentiles are over all their replies. `background_pps`: one more
    device whose (paced) guest sends that many 64 B frames a second to the
    wire meanwhile. `cpu_pct` is the forwarder's CPU (percent of one core,
    from schedstat) over the pinging. `ab`: a switch (e.g. the gateway's
    wake-ahead) turned on and off every AB_BLOCK seconds during the run; the
    result's "ab" then has the percentiles of each side (the first block a
    warm-up of neither), which saw the same
    host at the same time, so their difference is the switch's, not the
    machine's mood (runs minutes apart on a shared host differ far more).

    p95 is there because p99 of a 10 s run is only 10 samples: a host that
    stalls a CPU now and then sets p99 on its own, for every setup alike (on
    the 2-CPU test VM something every 0.5 s, likely kdamond's sampling, costs
    ~2-3 % of the pings a few milliseconds).
    """
    from pacer import PacedGuest

    n = devices + bool(background_pps)
    with contextlib.ExitStack() as stack:
        topos = [stack.enter_context(topology()) for _ in range(n)]
        socks, pid = stack.enter_context(setups.serve_many(setup, topos))
        ips, vdevs = [], []
        for i, topo in enumerate(topos[:devices]):
            ip = topo.peer_ip.rsplit(".", 1)[0] + ".2"
            ips.append(ip)
            with NetNS(topo.ns) as far:
                (idx,) = far.link_lookup(ifname=topo.peer)
                far.neigh("add", dst=ip, lladdr=setups.GUEST_MAC, ifindex=idx,
                          state=NUD_PERMANENT)
            # The port's MAC is the gateway device's: icmpecho answers ARP with it,
            # and echo replies leave from whatever MAC the request was sent to.
            vdevs.append(f"net_virtio_user{i},path={socks[i]},queues=1,mac={setups.GUEST_MAC}")
        # One icmpecho testpmd for all the devices, one forwarding lcore
        # polling every port (icmpecho answers on the port a request came
        # in on): a testpmd per device made the guests take turns on CPU 1,
        # each waiting out the other's slice, and the 2-device row measured
        # that (ms for every setup alike), not the forwarders.
        guest = stack.enter_context(Testpmd(
            vdev=vdevs[0], eal_args=[a for v in vdevs[1:] for a in ("--vdev", v)],
            lcores=setups.lcores(setups.SOURCE_CPU), args=["--forward-mode=icmpecho"]))
        for port in range(devices):
            guest.wait_link_up(30, port=port)
        # The guest (polling) shares SOURCE_CPU with the pingers and the
        # background pacer: a short slice makes it take turns every ~300 us,
        # not every ~1.4 ms; the pinger's, shorter still (100 us), lets the
        # far host send on time, as it would from a machine of its own.
        setups.short_slice(guest.proc.pid, GUEST_SLICE_NS)
        guest.start()
        bg = None
        if background_pps:
            g = stack.enter_context(PacedGuest(socks[-1], 64, dst_mac=BACKGROUND_DST,
                                               cpu=setups.SOURCE_CPU))
            seconds = count * interval + 5
            # Asleep between its bursts: a pacer polling the clock on CPU 1
            # took it from the icmpecho guest, and the row measured that.
            bg = threading.Thread(target=lambda: (setups.short_slice(0, GUEST_SLICE_NS),
                                                  g.run(background_pps, seconds, sleep=True)),
                                  daemon=True)
            bg.start()
            time.sleep(1.0)  # the load is running before the pings start
        fpid, tids = forwarder_threads(setup, pid)
        t0, c0 = time.monotonic(), _run_ns(tids, fpid)
        results: list[list[tuple[int, float]]] = [[] for _ in ips]
        pingers = [threading.Thread(target=lambda i=i: results[i].extend(
            ping(topos[i], ips[i], count, interval))) for i in range(devices)]
        for t in pingers:
            t.start()
        flips: list[tuple[int, bool | None]] = []
        if ab is not None:
            # The first block warms up, switched on and counted for neither
            # side: a run's first pings (the pinger starting, the worker
            # learning the gaps) are no sample of either, and counted for
            # the on side they may set its p99.
            state: bool | None = None
            while any(t.is_alive() for t in pingers):
                ab(True if state is None else state)
                flips.append((time.time_ns(), state))
                state = False if state is None else not state
                for t in pingers:
                    t.join(AB_BLOCK / len(pingers))  # a block, or the run's end
            ab(True)
        for t in pingers:
            t.join()
        cpu = 100 * (_run_ns(tids, fpid) - c0) / 1e9 / (time.monotonic() - t0)
        workers = setups.worker_counters()
        if bg is not None:
            bg.join()
    rtts = [r for rs in results for _, r in rs]
    if not rtts:
        raise RuntimeError(f"{setup}: no echo reply out of {count * devices} requests")
    out = summary(rtts, count * devices)
    out.update(cpu_pct=cpu, devices=devices, background_pps=background_pps, rtts_us=rtts)
    if devices > 1:
        out["per_device"] = [summary([r for _, r in rs], count) for rs in results if rs]
    if ab is not None:
        sides = split_ab([x for rs in results for x in rs], flips)
        out["ab"] = {("on" if k else "off"): {**summary(v, len(v)), "rtts_us": v}
                     for k, v in sides.items() if v}
    if setup.startswith("gateway"):
        out["workers"] = workers
    return out


BACKGROUND_DST = "02:00:00:00:00:98"  # nobody's: the far host drops it at once
GUEST_SLICE_NS = 300_000


if __name__ == "__main__":
    for name in sys.argv[1:] or list(setups.SERVERS):
        print(name, latency(name))
