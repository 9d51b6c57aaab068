"""NICs going down, coming up, vanishing and coming back, as netlink says it.

A thread reads the kernel's link notifications (RTMGRP_LINK) and hands each
one to a callback: the daemon must notice a NIC that went away under its
devices, say so, and re-attach them when a NIC of that name returns; polling
would notice late and miss a quick delete-and-recreate.

The socket is a plain netlink socket read one datagram per select(), and
pyroute2 only parses what was read: pyroute2's own IPRoute reads every waiting
datagram into an internal queue and hands back one batch per get(), so a
select() on its fd slept while events (a new NIC's, a deletion's) waited in
that queue until the next netlink message happened to arrive.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

IFF_UP = 0x1

# (event, ifname, ifindex, admin up): event is "new" (created or changed) or "gone"
LinkEvent = Callable[[str, str, int, bool], None]


class LinkWatch:
    def __init__(self, on_event: LinkEvent) -> None:
        self.on_event = on_event
        self._wake_r, self._wake_w = os.pipe()
        self._ready = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="gw-linkwatch", daemon=True)

    def start(self) -> LinkWatch:
        """Returns once subscribed: no later event is missed."""
        self._thread.start()
        self._ready.wait()
        if self._sock is None:
            raise OSError("cannot subscribe to netlink link events")
        return self

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
        except OSError:
            log.exception("netlink link events")
            self._ready.set()
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_LINK))
            self._sock = sock
        except OSError:
            log.exception("netlink link events")
            sock.close()
            return
        finally:
            self._ready.set()
        try:
            self._watch(sock, MarshalRtnl())
        finally:
            sock.close()

    def _watch(self, sock: socket.socket, marshal: MarshalRtnl) -> None:
        while True:
            ready, _, _ = select.select([sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = sock.recv(1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: say so, go on
                    log.error("netlink link events were lost (receive buffer overrun)")
                    continue
                raise
            for msg in marshal.parse(data):
                name = msg.get_attr("IFLA_IFNAME")
                if name is None or msg["event"] not in ("RTM_NEWLINK", "RTM_DELLINK"):
                    continue
                event = "gone" if msg["event"] == "RTM_DELLINK" else "new"
                try:
                    self.on_event(event, name, msg["index"], bool(msg["flags"] & IFF_UP))
                except Exception:  # a bug in a handler must not stop the watch
                    log.exception("link event for %s failed", name)
