"""One thread per queue pair: guest TX → port, port → guest RX.

The port queue moves each burst with one C call (GIL released), so Python
runs once per burst, not per frame; an AF_XDP queue goes further and `pump`s
in C until its rings have been quiet for a while, so Python runs only when the
traffic stops. When a pass moves nothing, the worker asks the guest to kick,
re-checks the rings (a kick may have been skipped just before) and sleeps in
poll() on the kick eventfds, the port's fd and its own wake-up eventfd.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable

from gateway.datapath.port import PortQueue
from gateway.virtio.ring import RingBroken, VirtQueue, lib

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 1  # when the front-end never kicks (no-fd bit) or kicks are disabled

_cpus: list[int] = []  # CPUs for data-path threads, taken in turn; empty: anywhere
_turn = itertools.count()


def wasteful(walked: int, moved: int) -> bool:
    """The pump's throttle rule (gw_xskq.h), for ports without a pump."""
    return walked > lib.GW_THROTTLE_WALK and walked > lib.GW_THROTTLE_PER_FRAME * moved


def pin_workers(cpus: Iterable[int]) -> None:
    """Run every worker started from now on on one of `cpus`, in turn: a worker
    that keeps its CPU keeps its caches, and the operator keeps the guests' CPUs
    free. Refuses CPUs this process may not use."""
    cpus = sorted(set(cpus))
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if bad:
        raise ValueError(f"CPU {bad[0]} is not available to this process "
                         f"(allowed: {','.join(map(str, sorted(allowed)))})")
    _cpus[:] = cpus


class QueuePairWorker:
    def __init__(
        self,
        name: str,
        rxq: VirtQueue,
        txq: VirtQueue,
        rx_kick: int | None,
        tx_kick: int | None,
        port: PortQueue,
        on_broken: Callable[[str], None],
        notify: Callable[[], tuple[bool, bool]] = lambda: (True, True),
    ) -> None:
        self.name = name
        self.rxq, self.txq = rxq, txq
        self.rx_kick, self.tx_kick = rx_kick, tx_kick
        self.port = port
        self.on_broken = on_broken
        self.notify = notify  # (rx, tx): may the guest kick us? (enable_guest_notification)
        self.control: list[bytes] = []  # frames from the control plane (RARP), sent to the port
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self.throttled = 0  # passes followed by a throttle pause
        self._thread = threading.Thread(target=self._run, name=f"gw-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._interrupt()
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._wake)

    def post(self, frame: bytes) -> None:
        """Queue a frame for the port from another thread (the control plane)."""
        with self._lock:
            self.control.append(frame)
        self._interrupt()
        os.eventfd_write(self._wake, 1)

    def _interrupt(self) -> None:
        interrupt = getattr(self.port, "interrupt", None)
        if interrupt is not None:
            interrupt()

    # -- the loop ---------------------------------------------------------------

    def _run(self) -> None:
        if _cpus:
            os.sched_setaffinity(0, {_cpus[next(_turn) % len(_cpus)]})  # this thread only
        try:
            while not self._stop:
                if not self._pass():
                    self._sleep()
        except RingBroken as e:
            self.on_broken(str(e))
        except Exception:  # a bug here must not kill the daemon silently
            log.exception("%s: worker failed", self.name)
            self.on_broken("internal error in the data path worker")

    def _pass(self) -> bool:
        """One round over both directions; True if anything moved."""
        if self.control:
            with self._lock:
                frames, self.control = self.control, []
            self.port.send_raw(frames)
        pump = getattr(self.port, "pump", None)
        if pump is not None:  # the port loops in C until the rings go quiet
            moved = pump(self.txq, self.rxq)
            if getattr(self.port, "throttled", False):
                self._throttle()
            return moved
        walk0 = self.txq.walked_total + self.rxq.walked_total
        n = self.port.from_guest(self.txq)
        self.txq.call()  # C signals only if the used ring moved (drops included)
        k = self.port.to_guest(self.rxq)
        if k:
            self.rxq.call()
        if wasteful(self.txq.walked_total + self.rxq.walked_total - walk0, n + k):
            self._throttle()
        return bool(n or k)

    def _throttle(self) -> None:
        """A guest made this pass walk descriptors for nothing (issue 12): pause
        GW_THROTTLE_MS, so it costs a bounded share of a CPU. Only the wake
        eventfd ends the pause early: stop() and post() are never delayed."""
        self.throttled += 1
        p = select.poll()
        p.register(self._wake, select.POLLIN)
        if p.poll(lib.GW_THROTTLE_MS):
            _drain(self._wake)  # the next pass sends posted frames; stop() set _stop

    def _sleep(self) -> None:
        rx_notify, tx_notify = self.notify()
        fds = [self._wake]
        timeout = None
        pending = self.txq.set_notify(tx_notify)
        if tx_notify and self.tx_kick is not None:
            fds.append(self.tx_kick)
        else:
            timeout = POLL_INTERVAL_MS
        backlog = self.port.backlog()
        if backlog:  # frames wait for guest buffers: wake when it adds some
            pending += self.rxq.set_notify(rx_notify)
            if rx_notify and self.rx_kick is not None:
                fds.append(self.rx_kick)
            else:
                timeout = POLL_INTERVAL_MS
        else:
            fds.extend(self.port.fds)
        if not pending and not self._stop:
            p = select.poll()
            for fd in fds:
                p.register(fd, select.POLLIN)
            for fd, _ in p.poll(timeout):
                if fd not in self.port.fds:
                    _drain(fd)
        self.txq.set_notify(False)
        if backlog:
            self.rxq.set_notify(False)


def _drain(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass
