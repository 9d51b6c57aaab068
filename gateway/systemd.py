"""What the daemon tells systemd (Type=notify), over sdnotify.py.

- READY=1 once the control socket is up and the saved attachments are restored,
  with STATUS= the device count; STATUS= again whenever that count changes;
- WATCHDOG=1 every half WATCHDOG_USEC when systemd asks for it;
- STOPPING=1 when the daemon starts undoing its kernel state.

Everything that changes the set of devices (requests, link events, the
restore) runs on the daemon's one request thread, so that thread is where the
count is read after each job, and where the watchdog ping is sent from: a
request that never ends there, or a Gateway lock never released, stops the
pings and systemd restarts the daemon, which is what a hung control path
needs. Without NOTIFY_SOCKET all of this sends nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os

from gateway.api import Gateway
from gateway.sdnotify import Notifier, watchdog_interval

log = logging.getLogger(__name__)


class RequestThread(concurrent.futures.ThreadPoolExecutor):
    """One thread, jobs one at a time; after each job `after()` runs on it too."""

    def __init__(self, after) -> None:
        super().__init__(1, thread_name_prefix="requests")
        self._after = after

    def submit(self, fn, /, *args, **kwargs):
        def job():
            try:
                return fn(*args, **kwargs)
            finally:
                try:
                    self._after()
                except Exception:  # the job's own result or error is what its caller gets
                    log.exception("after a request")
        return super().submit(job)


class Systemd:
    """The daemon's side: `requests` is its request thread; `ready()` once it is
    ready, `stopping()` when it starts shutting down."""

    def __init__(self, gw: Gateway, env=os.environ) -> None:
        self.gw = gw
        self.notify = Notifier(env)
        self.interval = watchdog_interval(env) if self.notify.enabled else None
        self.requests = RequestThread(self._update)
        self._ready = False  # the daemon is ready: READY=1 is due
        self._told: str | None = None  # the STATUS= systemd has, sent with READY=1 or after
        self._pinger: asyncio.Task | None = None

    def status(self) -> str:
        with self.gw.lock:
            n, pending = len({*self.gw.attached, *self.gw.pending}), len(self.gw.pending)
        return f"{n} device{'' if n == 1 else 's'}" + (f", {pending} pending" if pending else "")

    def _update(self) -> None:
        """On the request thread, after each job. What systemd did not take (its queue
        full past the send timeout) is sent again after a later job, e.g. a ping."""
        if not self._ready:
            return
        text = self.status()
        if self._told is None:
            if self.notify.ready(text):
                self._told = text
        elif text != self._told and self.notify.status(text):
            self._told = text

    def _mark_ready(self) -> None:
        self._ready = True
        self._update()

    def reloading(self, fn, *args) -> None:
        """On the request thread: `fn(*args)` (SIGHUP's re-read of the config file)
        between RELOADING=1 and READY=1, as systemd's ExecReload= expects."""
        if not self._ready:  # a SIGHUP before start-up is done: READY=1 is still due
            return fn(*args)
        self.notify.send(RELOADING=1, STATUS="reloading the configuration file")
        try:
            fn(*args)
        finally:
            text = self.status()
            if self.notify.ready(text):
                self._told = text

    def _ping(self) -> None:
        with self.gw.lock:  # a scrape or request holding it forever is a hang too
            self.notify.watchdog()

    async def ready(self) -> None:
        """Say READY=1 (on the request thread, so no STATUS= update can overtake it)
        and start the watchdog pings if systemd asked for them."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.requests, self._mark_ready)
        if self.interval is not None:
            self._pinger = asyncio.create_task(self._watchdog(self.interval))

    async def _watchdog(self, interval: float) -> None:
        # scheduled by the control loop, sent from the request thread: both must run
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            await loop.run_in_executor(self.requests, self._ping)

    def stopping(self) -> None:
        """STOPPING=1: the last datagram (sdnotify.Notifier sends nothing after it)."""
        if self._pinger is not None:
            self._pinger.cancel()
        self.notify.stopping("stopping: undoing kernel state")
