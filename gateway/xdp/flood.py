"""Frames for more than one guest: broadcast and multicast from the wire.

The XDP program hands broadcast and multicast frames to the kernel (the host
needs its ARP and neighbour discovery too); this tap reads them back with an
AF_PACKET socket and gives each running guest on the NIC a copy, so ARP and
DHCP from the far side reach the guests. It is Python per frame, which is fine
for the rate such traffic comes at; unicast never passes here.

VLANs: the kernel takes an 802.1Q tag off a frame before the tap sees it and
reports it in PACKET_AUXDATA (tp_vlan_tci with TP_STATUS_VLAN_VALID); a tag
still in the bytes (a kernel path that did not strip it) is taken off here.
Either way the frame goes on untagged, with its VLAN ID (0: untagged or a
priority tag) for Nic.flood to pick the guests of that VLAN.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
PACKET_BROADCAST, PACKET_MULTICAST = 1, 2
MAX_FRAME = 65536
SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
# struct tpacket_auxdata: status, len, snaplen (u32); mac, net, vlan_tci, vlan_tpid (u16)
AUXDATA = struct.Struct("=IIIHHHH")
TPID_8021Q, TPID_8021AD = b"\x81\x00", b"\x88\xa8"


def untag(data: bytes, ancdata) -> tuple[bytes, int]:
    """(the frame without its 802.1Q tag, its VLAN ID or 0); VLAN -1, no guest's,
    for a frame under another tag (802.1ad), as the XDP program treats unicast."""
    for level, kind, raw in ancdata:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(raw) >= AUXDATA.size:
            status, _, _, _, _, tci, tpid = AUXDATA.unpack_from(raw)
            if status & TP_STATUS_VLAN_VALID:
                if status & TP_STATUS_VLAN_TPID_VALID and tpid != 0x8100:
                    return data, -1
                return data, tci & 0xFFF
    if len(data) >= 18 and data[12:14] == TPID_8021Q:
        return data[:12] + data[16:], (data[14] << 8 | data[15]) & 0xFFF
    if len(data) >= 18 and data[12:14] == TPID_8021AD:
        return data, -1
    return data, 0


class FloodTap:
    def __init__(self, ifname: str, deliver: Callable[[bytes, int], None]) -> None:
        self.ifname = ifname
        self.deliver = deliver
        self.frames = 0
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.htons(ETH_P_ALL))
        try:
            self._sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self._sock.bind((ifname, ETH_P_ALL))
        except OSError:
            self._sock.close()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"gw-flood-{ifname}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        p = select.poll()
        p.register(self._sock, select.POLLIN)
        p.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ in p.poll():
                if fd == self._stop_r:
                    return
                try:
                    data, anc, _, addr = self._sock.recvmsg(
                        MAX_FRAME, socket.CMSG_SPACE(AUXDATA.size))
                except OSError as e:
                    if e.errno == errno.ENETDOWN:
                        continue  # the NIC went down: broadcasts resume when it is up
                    log.error("%s: flood tap: %s", self.ifname, e)
                    return
                if addr[2] in (PACKET_BROADCAST, PACKET_MULTICAST):
                    self.frames += 1
                    try:
                        self.deliver(*untag(data, anc))
                    except Exception:
                        log.exception("%s: flood delivery failed", self.ifname)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
