"""NICs going down, coming up, vanishing and coming back, as netlink says it.

A thread reads the kernel's link notifications (RTMGRP_LINK) and hands each
one to a callback: the daemon must notice a NIC that went away under its
devices, say so, and re-attach them when a NIC of that name returns; polling
would notice late and miss a quick delete-and-recreate.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

log = logging.getLogger(__name__)

IFF_UP = 0x1

# (event, ifname, ifindex, admin up): event is "new" (created or changed) or "gone"
LinkEvent = Callable[[str, str, int, bool], None]


class LinkWatch:
    def __init__(self, on_event: LinkEvent) -> None:
        self.on_event = on_event
        self._wake_r, self._wake_w = os.pipe()
        self._ready = threading.Event()
        self._ipr: IPRoute | None = None
        self._thread = threading.Thread(target=self._run, name="gw-linkwatch", daemon=True)

    def start(self) -> LinkWatch:
        """Returns once subscribed: no later event is missed."""
        self._thread.start()
        self._ready.wait()
        if self._ipr is None:
            raise OSError("cannot subscribe to netlink link events")
        return self

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        # pyroute2's IPRoute runs its own asyncio loop: it cannot be made in a
        # thread that already has one (the daemon's), so it lives here.
        try:
            self._ipr = IPRoute()
            self._ipr.bind(groups=RTMGRP_LINK)
        except Exception:
            log.exception("netlink link events")
            self._ipr = None
        finally:
            self._ready.set()
        if self._ipr is None:
            return
        try:
            self._watch()
        finally:
            self._ipr.close()

    def _watch(self) -> None:
        assert self._ipr is not None
        fd = self._ipr.fileno()
        while True:
            ready, _, _ = select.select([fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            for msg in self._ipr.get():
                name = msg.get_attr("IFLA_IFNAME")
                if name is None:
                    continue
                event = "gone" if msg["event"] == "RTM_DELLINK" else "new"
                try:
                    self.on_event(event, name, msg["index"], bool(msg["flags"] & IFF_UP))
                except Exception:  # a bug in a handler must not stop the watch
                    log.exception("link event for %s failed", name)
