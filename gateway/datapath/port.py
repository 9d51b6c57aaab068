"""Where frames go after they leave a guest, and come from before they enter one.

A port hands the data path one PortQueue per queue pair. The worker asks the
queue to move a burst each way (`from_guest`, `to_guest`) and the queue does
it with the ring calls that suit it: MemoryQueue goes through FrameBuffers and
Python lists (tests and the demo use it to stand in for the wire). An AF_XDP
queue (xdp_port.XdpQueue) has `pump` instead, which the worker prefers: one C
call that moves bursts both ways until the rings go quiet.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Protocol

from gateway.virtio.ring import FrameBuffer, VirtQueue

BURST = 64
FRAME_SIZE = 4096


class PortQueue(Protocol):
    fds: tuple[int, ...]  # readable when frames for the guest may be waiting at the port

    def from_guest(self, txq: VirtQueue) -> int:
        """Move a burst of the guest's TX frames to the port; return how many."""

    def to_guest(self, rxq: VirtQueue) -> int:
        """Move a burst of waiting frames into the guest; return how many."""

    def backlog(self) -> bool:
        """Frames are held for the guest, which had no buffers for them."""

    def send_raw(self, frames: list[bytes]) -> None:
        """Frames from the control plane (RARP) to the wire; worker thread only."""


class Port(Protocol):
    def queue(self, qp: int) -> PortQueue: ...


class MemoryQueue:
    """One queue pair's worth of frames in memory, with an eventfd that stays
    readable while frames wait for the guest (level-triggered, like a socket)."""

    def __init__(self, arrived: threading.Condition | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds = (self.fd,)
        self._txbuf = FrameBuffer(BURST, FRAME_SIZE)
        self._rxbuf = FrameBuffer(BURST, FRAME_SIZE)
        self._rx_next = self._rx_count = 0  # frames in _rxbuf still to give the guest
        self._arrived = arrived or threading.Condition()
        self._lock = self._arrived  # one lock per port, so a waiter can watch every queue
        self._to_guest: collections.deque[bytes] = collections.deque()
        self._from_guest: list[bytes] = []
        self._signalled = False

    def from_guest(self, txq: VirtQueue) -> int:
        n = txq.tx_burst(self._txbuf)
        if n:
            self.send_raw([self._txbuf.frame(i) for i in range(n)])
        return n

    def to_guest(self, rxq: VirtQueue) -> int:
        if self._rx_count == 0:
            self._rx_next, self._rx_count = 0, self._recv(self._rxbuf)
        if not self._rx_count:
            return 0
        k = rxq.rx_burst(self._rxbuf, self._rx_next, self._rx_count)
        self._rx_next += k
        self._rx_count -= k
        return k

    def backlog(self) -> bool:
        return self._rx_count > 0

    def delivered(self, k: int) -> tuple[FrameBuffer, int]:
        """Where the `k` frames the last to_guest() delivered are: (buffer,
        first slot), for a capture to copy them."""
        return self._rxbuf, self._rx_next - k

    def send_raw(self, frames: list[bytes]) -> None:
        with self._lock:
            self._from_guest.extend(frames)
            self._arrived.notify_all()

    def _recv(self, buf: FrameBuffer) -> int:
        with self._lock:
            n = 0
            while self._to_guest and n < buf.nframes:
                buf.put(n, self._to_guest.popleft())
                n += 1
            if not self._to_guest and self._signalled:
                os.eventfd_read(self.fd)
                self._signalled = False
            return n

    def inject(self, frames: list[bytes]) -> None:
        with self._lock:
            self._to_guest.extend(frames)
            if self._to_guest and not self._signalled:
                os.eventfd_write(self.fd, 1)
                self._signalled = True

    def waiting(self) -> int:
        """Frames injected but not yet taken by the data path."""
        with self._lock:
            return len(self._to_guest)

    def take(self) -> list[bytes]:
        with self._lock:
            out, self._from_guest = self._from_guest, []
            return out

    def wait_received(self, count: int, timeout: float) -> list[bytes]:
        """Block until `count` frames came from the guest; return them all (taken)."""
        with self._lock:
            self._arrived.wait_for(lambda: len(self._from_guest) >= count, timeout)
            out, self._from_guest = self._from_guest, []
            return out

    def close(self) -> None:
        os.close(self.fd)


class MemoryPort:
    def __init__(self) -> None:
        self.queues: dict[int, MemoryQueue] = {}
        self._arrived = threading.Condition()

    def queue(self, qp: int) -> MemoryQueue:
        if qp not in self.queues:
            self.queues[qp] = MemoryQueue(self._arrived)
        return self.queues[qp]

    def wait_total(self, count: int, timeout: float) -> list[bytes]:
        """Block until `count` frames came from the guest over all queues; take them."""
        with self._arrived:
            self._arrived.wait_for(
                lambda: sum(len(q._from_guest) for q in self.queues.values()) >= count, timeout
            )
            out = []
            for q in self.queues.values():
                out += q._from_guest
                q._from_guest = []
            return out

    def close(self) -> None:
        for q in self.queues.values():
            q.close()
        self.queues.clear()
