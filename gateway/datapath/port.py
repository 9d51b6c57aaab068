"""Where frames go after they leave a guest, and come from before they enter one.

A port hands the data path one PortQueue per queue pair. The data path moves
frames in bursts through FrameBuffers, so a port backed by AF_XDP can swap
buffers for UMEM frames without the worker changing. MemoryPort keeps frames
in Python lists: tests and the demo use it to stand in for the wire.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Protocol

from gateway.virtio.ring import FrameBuffer


class PortQueue(Protocol):
    fd: int | None  # readable while frames wait for the guest; None: never

    def send(self, buf: FrameBuffer, n: int) -> None:
        """Frames 0..n-1 of buf left the guest."""

    def recv(self, buf: FrameBuffer) -> int:
        """Fill buf from frame 0 with frames for the guest; return how many."""


class Port(Protocol):
    def queue(self, qp: int) -> PortQueue: ...


class MemoryQueue:
    """One queue pair's worth of frames in memory, with an eventfd that stays
    readable while frames wait for the guest (level-triggered, like a socket)."""

    def __init__(self, arrived: threading.Condition | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._arrived = arrived or threading.Condition()
        self._lock = self._arrived  # one lock per port, so a waiter can watch every queue
        self._to_guest: collections.deque[bytes] = collections.deque()
        self._from_guest: list[bytes] = []
        self._signalled = False

    def send(self, buf: FrameBuffer, n: int) -> None:
        frames = [buf.frame(i) for i in range(n)]
        with self._lock:
            self._from_guest.extend(frames)
            self._arrived.notify_all()

    def recv(self, buf: FrameBuffer) -> int:
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
