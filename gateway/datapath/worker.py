"""One thread per queue pair: guest TX → port, port → guest RX.

Each burst is one C call (GIL released), so Python runs once per burst, not
per frame. When a pass moves nothing, the worker asks the guest to kick,
re-checks the rings (a kick may have been skipped just before) and sleeps in
poll() on the kick eventfds, the port's fd and its own wake-up eventfd.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from gateway.datapath.port import PortQueue
from gateway.virtio.ring import FrameBuffer, RingBroken, VirtQueue

log = logging.getLogger(__name__)

BURST = 64
FRAME_SIZE = 4096
POLL_INTERVAL_MS = 1  # when the front-end never kicks (no-fd bit) or kicks are disabled


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
        self._txbuf = FrameBuffer(BURST, FRAME_SIZE)
        self._rxbuf = FrameBuffer(BURST, FRAME_SIZE)
        self._rx_next = self._rx_count = 0  # frames in _rxbuf still to give the guest
        self._thread = threading.Thread(target=self._run, name=f"gw-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._wake)

    def post(self, frame: bytes) -> None:
        """Queue a frame for the port from another thread (the control plane)."""
        with self._lock:
            self.control.append(frame)
        os.eventfd_write(self._wake, 1)

    # -- the loop ---------------------------------------------------------------

    def _run(self) -> None:
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
        moved = False
        n = self.txq.tx_burst(self._txbuf)
        if n:
            self.port.send(self._txbuf, n)
            moved = True
        self.txq.call()  # C signals only if the used ring moved (drops included)
        if self.control:
            self._send_control()
        if self._rx_count == 0:
            self._rx_next, self._rx_count = 0, self.port.recv(self._rxbuf)
        if self._rx_count:
            k = self.rxq.rx_burst(self._rxbuf, self._rx_next, self._rx_count)
            if k:
                self._rx_next += k
                self._rx_count -= k
                self.rxq.call()
                moved = True
        return moved

    def _send_control(self) -> None:
        with self._lock:
            frames, self.control = self.control[: BURST], self.control[BURST:]
        buf = FrameBuffer(len(frames), FRAME_SIZE)
        for i, f in enumerate(frames):
            buf.put(i, f)
        self.port.send(buf, len(frames))

    def _sleep(self) -> None:
        rx_notify, tx_notify = self.notify()
        fds = [self._wake]
        timeout = None
        pending = self.txq.set_notify(tx_notify)
        if tx_notify and self.tx_kick is not None:
            fds.append(self.tx_kick)
        else:
            timeout = POLL_INTERVAL_MS
        if self._rx_count:  # frames wait for guest buffers: wake when it adds some
            pending += self.rxq.set_notify(rx_notify)
            if rx_notify and self.rx_kick is not None:
                fds.append(self.rx_kick)
            else:
                timeout = POLL_INTERVAL_MS
        elif self.port.fd is not None:
            fds.append(self.port.fd)
        if not pending and not self._stop:
            p = select.poll()
            for fd in fds:
                p.register(fd, select.POLLIN)
            for fd, _ in p.poll(timeout):
                if fd != self.port.fd:
                    _drain(fd)
        self.txq.set_notify(False)
        if self._rx_count:
            self.rxq.set_notify(False)


def _drain(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass
