"""Test topology: a veth pair plays the NIC, its peer sits in a "far host" namespace.

    root namespace                     namespace gwt<pid>far
    ┌──────────────┐   veth pair   ┌──────────────────────┐
    │ nic (gateway)│───────────────│ peer  10.77.x.1/24   │
    └──────────────┘               └──────────────────────┘

Everything is named with the `gwt` prefix plus the pid, so parallel runs do not
collide and leftovers are easy to spot; `topology()` removes it all in a
`finally`, even when the test fails. The far end's TX checksum offload is
switched off: veth would otherwise hand XDP frames whose TCP/UDP checksums are
still partial (see shared notes, "Checksums on veth").
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

_counter = itertools.count()


@dataclass
class Topology:
    nic: str  # in the root namespace: what the gateway attaches to
    nic_index: int
    nic_mac: str
    ns: str  # the far host's namespace
    peer: str  # the far host's interface
    peer_mac: str
    peer_ip: str  # without prefix length
    prefix_len: int

    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw
            ) -> subprocess.CompletedProcess:
        """Run a command on the far host (a server, ethtool, a test's sender)."""
        return subprocess.run(in_netns(self.ns, argv), check=check, timeout=timeout,
                              capture_output=True, text=True, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(in_netns(self.ns, argv), **kw)

    def peer_stats(self) -> dict[str, int]:
        """The far interface's counters (what arrived on the wire)."""
        with NetNS(self.ns) as ns:
            (link,) = ns.get_links(ifname=self.peer)
            s = link.get_attr("IFLA_STATS64")
            return {k: s[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")}


_ENTER = ("import os, sys\nfrom pyroute2 import netns\n"
          "netns.setns(sys.argv[1])\nos.execvp(sys.argv[2], sys.argv[2:])")


def in_netns(ns: str, argv) -> list[str]:
    """argv run inside namespace `ns` (a Python shim doing setns, then exec)."""
    return [sys.executable, "-c", _ENTER, ns, *argv]


@contextlib.contextmanager
def topology(queues: int = 1, subnet: int | None = None) -> Iterator[Topology]:
    """A fresh NIC/far-host pair; `queues` > 1 gives the veth that many RX/TX queues."""
    n = next(_counter)
    tag = f"{os.getpid() % 100000}{n}"
    ns, nic, peer = f"gwt{tag}far", f"gwt{tag}n", f"gwt{tag}p"
    subnet = 77 + n % 100 if subnet is None else subnet
    peer_ip = f"10.{subnet}.0.1"
    netns.create(ns)
    try:
        with IPRoute() as ipr:
            # The peer gets as many TX queues as the NIC has RX queues: native
            # XDP on veth refuses (ENOSPC) a peer with more.
            ipr.link("add", ifname=nic, kind="veth",
                     peer={"ifname": peer, "net_ns_fd": ns,
                           "num_rx_queues": queues, "num_tx_queues": queues},
                     num_rx_queues=queues, num_tx_queues=queues)
            (idx,) = ipr.link_lookup(ifname=nic)
            # No IPv6 on the NIC end: the host's own router solicitations and
            # MLD reports would muddy the far host's counters.
            with open(f"/proc/sys/net/ipv6/conf/{nic}/disable_ipv6", "w") as f:
                f.write("1")
            ipr.link("set", index=idx, state="up")
            nic_mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        with NetNS(ns) as far:
            (pidx,) = far.link_lookup(ifname=peer)
            far.addr("add", index=pidx, address=peer_ip, prefixlen=24)
            far.link("set", index=pidx, state="up")
            (lo,) = far.link_lookup(ifname="lo")
            far.link("set", index=lo, state="up")
            peer_mac = far.get_links(pidx)[0].get_attr("IFLA_ADDRESS")
        topo = Topology(nic, idx, nic_mac, ns, peer, peer_mac, peer_ip, 24)
        topo.run("ethtool", "-K", peer, "tx", "off")
        yield topo
    finally:
        with contextlib.suppress(Exception), IPRoute() as ipr:
            for i in ipr.link_lookup(ifname=nic):
                ipr.link("del", index=i)
        with contextlib.suppress(Exception):
            netns.remove(ns)
