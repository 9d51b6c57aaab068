"""Link set-up for the XDP datapath, all of it over netlink with pyroute2.

- `resolve(ifname)`: the NIC's index, MAC, MTU, state and queue counts.
- `xdp_state(ifname)`: which XDP program (if any) is attached, and in which mode.
- `add_mac_filter` / `remove_mac_filter`: make the NIC accept a guest's MAC. First a
  unicast filter entry (`bridge fdb add MAC dev NIC self permanent`, which the kernel's
  default ndo_fdb_add turns into dev_uc_add_excl; veth accepts it); when the driver
  answers EOPNOTSUPP, promiscuous mode instead, reference-counted per NIC.
- `check_mtu`: refuse a guest MTU the NIC or the AF_XDP frame cannot carry.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_PROMISC, IFF_UP
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_PERMANENT

ETH_HLEN = 14
XDP_PACKET_HEADROOM = 256  # the kernel keeps this much in front of every AF_XDP frame

# IFLA_XDP_ATTACHED values (uapi/linux/if_link.h)
(XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_HW,
 XDP_ATTACHED_MULTI) = range(5)
_MODE_NAMES = {XDP_ATTACHED_DRV: "native", XDP_ATTACHED_SKB: "generic",
               XDP_ATTACHED_HW: "offload", XDP_ATTACHED_MULTI: "multi",
               # pyroute2 decodes the number to iproute2's words
               "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload",
               "xdpmulti": "multi"}


class LinkError(Exception):
    """A NIC we cannot use: unknown, down, MTU too small, netlink refused."""


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    mac: str
    mtu: int
    state: str  # "up" / "down" (administrative state, IFF_UP)
    rx_queues: int
    tx_queues: int


def _get_link(ipr: IPRoute, ifname: str):
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LinkError(f"no network interface named {ifname!r}")
    return ipr.get_links(idx[0])[0]


def _real_queues(ifname: str, kind: str) -> int:
    """Queues in use, which AF_XDP binds to: netlink gives only how many the
    device could have (a plain `ip link add ... type veth` has 2 and uses 1),
    sysfs lists the ones in use. 0 if it cannot tell."""
    try:
        return sum(e.startswith(kind + "-") for e in os.listdir(f"/sys/class/net/{ifname}/queues"))
    except OSError:
        return 0


def resolve(ifname: str, *, require_up: bool = True) -> LinkInfo:
    """The NIC's facts; LinkError when it does not exist or (with require_up) is down."""
    with IPRoute() as ipr:
        msg = _get_link(ipr, ifname)
    up = bool(msg["flags"] & IFF_UP)
    info = LinkInfo(
        name=ifname,
        index=msg["index"],
        mac=msg.get_attr("IFLA_ADDRESS"),
        mtu=msg.get_attr("IFLA_MTU"),
        state="up" if up else "down",
        rx_queues=_real_queues(ifname, "rx") or msg.get_attr("IFLA_NUM_RX_QUEUES") or 1,
        tx_queues=_real_queues(ifname, "tx") or msg.get_attr("IFLA_NUM_TX_QUEUES") or 1,
    )
    if require_up and not up:
        raise LinkError(f"{ifname} is down: bring it up first (ip link set dev {ifname} up)")
    return info


def xdp_state(ifname: str) -> tuple[int | None, str | None]:
    """(program id, mode) of the XDP program attached to `ifname`, or (None, None).

    mode is "native", "generic", "offload" or "multi" (several modes at once).
    """
    with IPRoute() as ipr:
        msg = _get_link(ipr, ifname)
    xdp = msg.get_attr("IFLA_XDP")
    if not xdp:
        return None, None
    attrs = dict(xdp.get("attrs", []))
    attached = attrs.get("IFLA_XDP_ATTACHED") or XDP_ATTACHED_NONE
    if attached not in _MODE_NAMES:
        return None, None
    prog_id = (attrs.get("IFLA_XDP_PROG_ID") or attrs.get("IFLA_XDP_DRV_PROG_ID")
               or attrs.get("IFLA_XDP_SKB_PROG_ID") or attrs.get("IFLA_XDP_HW_PROG_ID"))
    return prog_id, _MODE_NAMES.get(attached, str(attached))


def xdp_prog_ids(ifname: str) -> dict[str, int]:
    """Every attached XDP program by mode ({"native": id, ...}); several only in "multi"."""
    with IPRoute() as ipr:
        msg = _get_link(ipr, ifname)
    xdp = msg.get_attr("IFLA_XDP")
    attrs = dict(xdp.get("attrs", [])) if xdp else {}
    attached = attrs.get("IFLA_XDP_ATTACHED") or XDP_ATTACHED_NONE
    out = {}
    for key, mode in (("IFLA_XDP_DRV_PROG_ID", "native"), ("IFLA_XDP_SKB_PROG_ID", "generic"),
                      ("IFLA_XDP_HW_PROG_ID", "offload")):
        if attrs.get(key):
            out[mode] = attrs[key]
    if not out and attached in _MODE_NAMES and attrs.get("IFLA_XDP_PROG_ID"):
        out[_MODE_NAMES[attached]] = attrs["IFLA_XDP_PROG_ID"]
    return out


# ------------------------------------------------------------------ MAC filters

# Promiscuous fallback bookkeeping, per interface index: the MACs that need it and whether
# we switched promisc on (if it was on already, someone else owns it and we never turn it off).
_promisc_lock = threading.Lock()
_promisc_users: dict[int, set[str]] = {}
_promisc_ours: dict[int, bool] = {}


def _norm_mac(mac: str) -> str:
    parts = mac.lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    int("".join(parts), 16)
    return ":".join(parts)


def _set_promisc(ipr: IPRoute, index: int, on: bool) -> None:
    ipr.link("set", index=index, flags=IFF_PROMISC if on else 0, change=IFF_PROMISC)


def _fdb(ipr: IPRoute, command: str, index: int, mac: str) -> None:
    """`bridge fdb COMMAND MAC dev INDEX self permanent` (one place, so tests can fake it)."""
    ipr.fdb(command, ifindex=index, lladdr=mac, state=NUD_PERMANENT, flags=NTF_SELF)


def add_mac_filter(ifname: str, mac: str) -> str:
    """Make `ifname` accept unicast frames to `mac`; returns "fdb" or "promisc"."""
    mac = _norm_mac(mac)
    with IPRoute() as ipr:
        msg = _get_link(ipr, ifname)
        index = msg["index"]
        try:
            _fdb(ipr, "add", index, mac)
            return "fdb"
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise LinkError(f"{ifname} already has a unicast filter entry for {mac}: "
                                "is another device using this MAC?") from e
            if e.code not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise LinkError(f"adding {mac} to {ifname}'s unicast filter: {e}") from e
        with _promisc_lock:
            users = _promisc_users.setdefault(index, set())
            if not users:
                msg = ipr.get_links(index)[0]
                already = bool(msg["flags"] & IFF_PROMISC)
                if not already:
                    _set_promisc(ipr, index, True)
                _promisc_ours[index] = not already
            users.add(mac)
        return "promisc"


def promisc_ours(ifname: str) -> bool:
    """Whether add_mac_filter() switched promiscuous mode on for `ifname` (and
    it is still needed): what a crash would leave on."""
    with IPRoute() as ipr:
        index = _get_link(ipr, ifname)["index"]
    with _promisc_lock:
        return bool(_promisc_users.get(index)) and _promisc_ours.get(index, False)


def promisc_off(ifname: str) -> None:
    """Switch promiscuous mode off (a dead owner's fallback; see nic.py)."""
    with IPRoute() as ipr:
        _set_promisc(ipr, _get_link(ipr, ifname)["index"], False)


def remove_mac_filter(ifname: str, mac: str, how: str) -> None:
    """Undo add_mac_filter(ifname, mac), which returned `how`. Missing entries are fine."""
    mac = _norm_mac(mac)
    with IPRoute() as ipr:
        try:
            msg = _get_link(ipr, ifname)
        except LinkError:
            return  # interface gone: nothing left to undo
        index = msg["index"]
        if how == "fdb":
            try:
                _fdb(ipr, "del", index, mac)
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise LinkError(f"removing {mac} from {ifname}'s unicast filter: {e}") from e
            return
        if how != "promisc":
            raise ValueError(f"unknown MAC filter kind {how!r}")
        with _promisc_lock:
            users = _promisc_users.get(index)
            if not users or mac not in users:
                return
            users.discard(mac)
            if not users:
                del _promisc_users[index]
                if _promisc_ours.pop(index, False):
                    _set_promisc(ipr, index, False)


def fdb_entries(ifname: str) -> list[str]:
    """The unicast "self" filter entries of `ifname` (multicast ones left out)."""
    with IPRoute() as ipr:
        index = _get_link(ipr, ifname)["index"]
        out = []
        for e in ipr.fdb("dump", ifindex=index):
            mac = e.get_attr("NDA_LLADDR")
            if e["ifindex"] == index and mac and not int(mac[:2], 16) & 1:
                out.append(mac)
        return out


# ------------------------------------------------------------------ MTU


def check_mtu(link: LinkInfo, guest_mtu: int, frame_size: int,
              headroom: int = XDP_PACKET_HEADROOM, tag: int = 0) -> int:
    """Refuse a guest MTU that does not fit; returns the longest frame (MTU + Ethernet header).

    Two limits: the NIC's MTU, and the AF_XDP frame (`frame_size` bytes of UMEM per frame,
    of which `headroom` is reserved in front of the packet). `tag` is the VLAN header
    (4) a device's frames carry on the wire: it must fit in the frame too, but not in
    the NIC's MTU, which like Linux's counts neither it nor the Ethernet header.
    """
    if guest_mtu > link.mtu:
        raise LinkError(f"guest MTU {guest_mtu} is larger than the NIC MTU of {link.name} "
                        f"({link.mtu})")
    room = frame_size - headroom - ETH_HLEN - tag
    if guest_mtu > room:
        vlan = f" minus {tag} VLAN tag" if tag else ""
        raise LinkError(f"guest MTU {guest_mtu} is larger than the AF_XDP frame can carry: "
                        f"frame size {frame_size} minus {headroom} headroom minus {ETH_HLEN} "
                        f"Ethernet header{vlan} = {room}")
    return guest_mtu + ETH_HLEN
