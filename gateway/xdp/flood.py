"""Frames for more than one guest: broadcast and multicast from the wire.

The XDP program hands broadcast and multicast frames to the kernel (the host
needs its ARP and neighbour discovery too); this tap reads them back with an
AF_PACKET socket and gives each running guest on the NIC a copy, so ARP and
DHCP from the far side reach the guests. It is Python per frame, which is fine
for the rate such traffic comes at; unicast never passes here.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
PACKET_BROADCAST, PACKET_MULTICAST = 1, 2
MAX_FRAME = 65536


class FloodTap:
    def __init__(self, ifname: str, deliver: Callable[[bytes], None]) -> None:
        self.ifname = ifname
        self.deliver = deliver
        self.frames = 0
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.htons(ETH_P_ALL))
        try:
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
                    data, addr = self._sock.recvfrom(MAX_FRAME)
                except OSError as e:
                    if e.errno == errno.ENETDOWN:
                        continue  # the NIC went down: broadcasts resume when it is up
                    log.error("%s: flood tap: %s", self.ifname, e)
                    return
                if addr[2] in (PACKET_BROADCAST, PACKET_MULTICAST):
                    self.frames += 1
                    try:
                        self.deliver(data)
                    except Exception:
                        log.exception("%s: flood delivery failed", self.ifname)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
