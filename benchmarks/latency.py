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

import json
import math
import sys

import setups
from pyroute2 import NetNS

from gateway.testing.netns import topology
from gateway.testing.testpmd import Testpmd

NUD_PERMANENT = 0x80

_PINGER = r"""
import json, os, socket, struct, sys, time

ip, count, interval, cpu = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
os.sched_setaffinity(0, {cpu})
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
                rtts.append((t1 - t0) / 1000)
            break
    time.sleep(max(0.0, start + interval - time.monotonic()))
print(json.dumps(rtts))
"""


def percentile(samples: list[float], p: float) -> float:
    """Nearest rank: always a value that was observed, and p99 <= max by construction."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ping(topo, ip: str, count: int, interval: float) -> list[float]:
    """RTTs in microseconds of the echo replies that came back (lost ones are left out)."""
    out = topo.run(sys.executable, "-c", _PINGER, ip, str(count), str(interval),
                   str(setups.SOURCE_CPU), timeout=count * (interval + 1) + 30)
    return json.loads(out.stdout)


def latency(setup: str, count: int = 1000, interval: float = 0.01) -> dict:
    """Percentiles over the replies that came back; a lost request is in sent, not received.

    p95 is there because p99 of a 10 s run is only 10 samples: a host that
    stalls a CPU now and then sets p99 on its own, for every setup alike (on
    the 2-CPU test VM something every 0.5 s, likely kdamond's sampling, costs
    ~2-3 % of the pings a few milliseconds).
    """
    with topology() as topo, setups.SERVERS[setup](topo) as sock:
        guest_ip = topo.peer_ip.rsplit(".", 1)[0] + ".2"
        with NetNS(topo.ns) as far:
            (idx,) = far.link_lookup(ifname=topo.peer)
            far.neigh("add", dst=guest_ip, lladdr=setups.GUEST_MAC, ifindex=idx,
                      state=NUD_PERMANENT)
        # The port's MAC is the gateway device's: icmpecho answers ARP with it,
        # and echo replies leave from whatever MAC the request was sent to.
        vdev = f"net_virtio_user0,path={sock},queues=1,mac={setups.GUEST_MAC}"
        with Testpmd(vdev=vdev, lcores=setups.lcores(setups.SOURCE_CPU),
                     args=["--forward-mode=icmpecho"]) as guest:
            guest.wait_link_up(30)
            guest.start()
            rtts = ping(topo, guest_ip, count, interval)
    if not rtts:
        raise RuntimeError(f"{setup}: no echo reply out of {count} requests")
    return {"p50_us": percentile(rtts, 50), "p95_us": percentile(rtts, 95),
            "p99_us": percentile(rtts, 99),
            "min_us": min(rtts), "max_us": max(rtts), "sent": count, "received": len(rtts)}


if __name__ == "__main__":
    for name in sys.argv[1:] or list(setups.SERVERS):
        print(name, latency(name))
