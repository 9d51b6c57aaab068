"""Side-by-side throughput: the gateway against DPDK doing the same job.

    sudo .venv/bin/python benchmarks/bench.py [--seconds 10] [--runs 3] [--json out.json]

One topology (a veth pair: the NIC in the root namespace, its peer in a far-host
namespace), one traffic source (DPDK testpmd with virtio-user in txonly mode as
the guest, pinned to CPU 1), counted on the far veth. Setups:

  gateway   the guest's socket is a gateway device (this project)
  testpmd   testpmd forwarding net_vhost <-> net_af_xdp in io mode (DPDK's answer)
  raw       testpmd txonly straight on net_af_xdp: no vhost at all, the limit

Guest -> wire only so far; wire -> guest, 2 queue pairs, zero-loss rate,
latency, idle CPU and RSS come next (performance issue). Each figure is the
median of --runs runs with min and max; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.datapath.xdp_port import XdpPort  # noqa: E402
from gateway.registry import Registry  # noqa: E402
from gateway.testing import testpmd as tp  # noqa: E402
from gateway.testing.netns import topology  # noqa: E402
from gateway.vhost.transport import VhostService  # noqa: E402
from gateway.xdp.nic import Nic  # noqa: E402

GUEST_LCORES = "0@1,1@1"  # the traffic source on CPU 1 ...
FORWARDER_LCORES = "0@0,1@0"  # ... DPDK's forwarder on CPU 0
GUEST_MAC = "52:54:00:be:00:01"


def guest(sock: str, size: int, peer_mac: str) -> tp.Testpmd:
    return tp.Testpmd(sock, lcores=GUEST_LCORES,
                      args=["--forward-mode=txonly", f"--txpkts={size}",
                            f"--eth-peer=0,{peer_mac}"])


def measure(topo, seconds: float) -> float:
    """Frames per second arriving at the far veth over `seconds`, after a warm-up."""
    time.sleep(0.5)  # warm-up: rings fill, rates settle
    a, t0 = topo.peer_stats()["rx_packets"], time.monotonic()
    time.sleep(seconds)  # the measuring window itself
    b, t1 = topo.peer_stats()["rx_packets"], time.monotonic()
    return (b - a) / (t1 - t0)


def run_gateway(topo, size: int, seconds: float) -> float:
    with ExitStack() as stack:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})  # threads started from here on inherit CPU 0
        stack.callback(os.sched_setaffinity, 0, old)
        nic = Nic(topo.nic)
        stack.callback(nic.close)
        port = XdpPort(nic, "bench", GUEST_MAC)
        stack.callback(port.close)
        service = VhostService().start()
        stack.callback(service.stop)
        sock = os.path.join(tempfile.mkdtemp(prefix="gw-bench-"), "bench.sock")
        service.listen(Registry().create("bench", port), sock)
        with guest(sock, size, topo.peer_mac) as pmd:
            pmd.wait_ready()
            pmd.wait_link_up(30)
            pmd.start()
            return measure(topo, seconds)


def run_testpmd(topo, size: int, seconds: float) -> float:
    sock = os.path.join(tempfile.mkdtemp(prefix="gw-bench-"), "fwd.sock")
    vdevs = [f"net_vhost0,iface={sock},queues=1", f"net_af_xdp0,iface={topo.nic}"]
    with tp.Testpmd(vdev=vdevs[0], eal_args=["--vdev", vdevs[1]], lcores=FORWARDER_LCORES,
                    args=["--forward-mode=io"]) as fwd:
        fwd.wait_ready()
        fwd.start()
        with guest(sock, size, topo.peer_mac) as pmd:
            pmd.wait_ready()
            pmd.wait_link_up(30)
            pmd.start()
            return measure(topo, seconds)


def run_raw(topo, size: int, seconds: float) -> float:
    with tp.Testpmd(vdev=f"net_af_xdp0,iface={topo.nic}", lcores=GUEST_LCORES,
                    args=["--forward-mode=txonly", f"--txpkts={size}",
                          f"--eth-peer=0,{topo.peer_mac}"]) as pmd:
        pmd.wait_ready()
        pmd.start()
        return measure(topo, seconds)


SETUPS = {"gateway": run_gateway, "testpmd": run_testpmd, "raw": run_raw}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for name in args.setups.split(","):
            pps = []
            for _ in range(args.runs):
                with topology() as topo:
                    pps.append(SETUPS[name](topo, size, args.seconds))
            results.append({"setup": name, "direction": "guest->wire", "size": size,
                            "queues": 1, "mpps": statistics.median(pps) / 1e6,
                            "min_mpps": min(pps) / 1e6, "max_mpps": max(pps) / 1e6,
                            "gbps": statistics.median(pps) * size * 8 / 1e9})
    print(f"{'setup':<9} {'dir':<12} {'size':>5} {'Mpps':>7} {'min':>7} {'max':>7} "
          f"{'Gbit/s':>7} {'vs testpmd':>10} {'vs raw':>7}")
    for r in results:
        def ratio(other: str, r=r) -> str:
            o = [x for x in results if x["setup"] == other and x["size"] == r["size"]]
            return f"{r['mpps'] / o[0]['mpps']:.2f}" if o and o[0]["mpps"] else "-"
        print(f"{r['setup']:<9} {r['direction']:<12} {r['size']:>5} {r['mpps']:>7.3f} "
              f"{r['min_mpps']:>7.3f} {r['max_mpps']:>7.3f} {r['gbps']:>7.2f} "
              f"{ratio('testpmd'):>10} {ratio('raw'):>7}")
    out = {"seconds": args.seconds, "runs": args.runs, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
