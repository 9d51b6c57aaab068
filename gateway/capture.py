"""`gateway capture`, the daemon's side: capture rings in a sealed memfd, hooked
into a device's queue pairs while one reader (the CLI) holds the capture.

One ring per queue pair, so each has a single producer: the queue pair's
worker, which copies frames in C as its bursts move them (cffi_build/
gw_capture.c) and never waits: a frame that does not fit is counted as
dropped. The CLI gets the memfd over the control socket (SCM_RIGHTS), maps it
and turns records into pcap. The memfd is sealed at its size, so the reader
cannot shrink it under the daemon's mapping (a SIGBUS in a worker); what the
reader can write (the ring's tail) the producer checks before use.

Layout (`Layout`): ring i's shared header (struct gw_cap_shared) at
i * stride, its data right after the header's page; stride = 4096 + size.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gateway._native import ffi, lib

log = logging.getLogger(__name__)

HEADER = 4096  # each ring's shared header, a page of its own
DEFAULT_BUFFER_KIB = 4096
MAX_BUFFER_KIB = 262144  # 256 MiB for all of a capture's rings
MAX_TOTAL = 512 << 20  # ring bytes for all the daemon's captures together
MAX_SNAPLEN = 65535
DIRECTIONS = {"rx": lib.GW_CAP_RX, "tx": lib.GW_CAP_TX, "both": lib.GW_CAP_RX | lib.GW_CAP_TX}
UNHOOK_WAIT = 1.0  # s: a burst lasts microseconds; past this a worker is stuck


class CaptureError(Exception):
    """A capture request refused; the text is the operator's one line."""


@dataclass(frozen=True)
class Layout:
    rings: int
    size: int  # data bytes per ring, a power of two

    @property
    def stride(self) -> int:
        return HEADER + self.size

    @property
    def data(self) -> int:
        return self.rings * self.size

    @property
    def total(self) -> int:
        return self.rings * self.stride

    @classmethod
    def for_buffer(cls, rings: int, buffer_kib: int) -> Layout:
        """The buffer split over the rings, each a power of two within the
        C bounds (GW_CAP_MIN_RING..GW_CAP_MAX_RING)."""
        per = max(buffer_kib * 1024 // rings, lib.GW_CAP_MIN_RING)
        size = 1 << (per.bit_length() - 1)
        return cls(rings, min(size, lib.GW_CAP_MAX_RING))


def check_request(direction: object, snaplen: object, buffer_kib: object) -> None:
    """The request's numbers, checked (they come from a socket)."""
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise CaptureError(f"bad direction {direction!r}: rx, tx or both")
    for what, v, lo, hi in (("snaplen", snaplen, 1, MAX_SNAPLEN),
                            ("buffer size (KiB)", buffer_kib, 64, MAX_BUFFER_KIB)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise CaptureError(f"{what} {v!r} is outside {lo}..{hi}")


class Rings:
    """The memfd, the daemon's mapping of it and one producer struct per ring."""

    def __init__(self, layout: Layout, snaplen: int, dirs: int) -> None:
        self.layout = layout
        self.fd = os.memfd_create("gateway-capture", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, layout.total)
            # The reader gets this fd: it may neither shrink the file under our
            # mapping (SIGBUS in a worker) nor grow it, nor lift the seals.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            # populated now, on the request thread: a worker's first lap must not
            # take a page fault (shmem allocation) per page in the middle of a burst
            self._map = mmap.mmap(self.fd, layout.total,
                                  flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(self.fd)
            raise
        self._buf = ffi.from_buffer("uint8_t[]", self._map, require_writable=True)
        self.caps = []
        for i in range(layout.rings):
            c = ffi.new("struct gw_cap *")
            c.sh = ffi.cast("struct gw_cap_shared *", self._buf + i * layout.stride)
            c.data = self._buf + i * layout.stride + HEADER
            c.size, c.snaplen, c.dirs = layout.size, snaplen, dirs
            self.caps.append(c)

    def counts(self) -> tuple[int, int]:
        """(frames written, frames dropped) over all rings, from our own copies."""
        return sum(c.frames for c in self.caps), sum(c.dropped for c in self.caps)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Only once no worker can write: every hook cleared and quiet."""
        self.close_fd()
        self.caps = []
        ffi.release(self._buf)
        self._map.close()


class Capture:
    """One reader's capture of one device."""

    def __init__(self, device: str, port, rings: Rings, direction: str, pid: int,
                 on_end: Callable[[str], None]) -> None:
        self.device, self.port, self.rings = device, port, rings
        self.direction, self.pid, self.on_end = direction, pid, on_end
        self.ended = False

    def describe(self) -> dict:
        return {"pid": self.pid, "direction": self.direction, "buffer": self.rings.layout.data}


class Captures:
    """The daemon's captures, at most one per device. Called on the request
    thread (start, stop, end_device) and so never alongside an attach or
    detach of the same device."""

    def __init__(self, max_total: int = MAX_TOTAL) -> None:
        self.max_total = max_total
        self.by_device: dict[str, Capture] = {}
        self._lock = threading.Lock()

    def start(self, device: str, port, *, direction: str, snaplen: int, buffer_kib: int,
              pid: int, on_end: Callable[[str], None]) -> Capture:
        check_request(direction, snaplen, buffer_kib)
        with self._lock:
            held = self.by_device.get(device)
            if held is not None:
                raise CaptureError(f"{device} is already being captured (by pid {held.pid}): "
                                   "one capture per device")
            layout = Layout.for_buffer(port.queue_pairs, buffer_kib)
            # a capture's buffer fills when its reader is slow: bound them all, so
            # captures cannot take the daemon's memory (populated at start)
            taken = sum(c.rings.layout.data for c in self.by_device.values())
            if taken + layout.data > self.max_total:
                raise CaptureError(f"captures would hold {(taken + layout.data) >> 10} KiB, "
                                   f"over the daemon's {self.max_total >> 10} KiB: end one, or "
                                   "ask for a smaller buffer (-B)")
            rings = Rings(layout, snaplen, DIRECTIONS[direction])
            cap = Capture(device, port, rings, direction, pid, on_end)
            self.by_device[device] = cap
        port.set_capture(rings.caps)
        log.info("%s: capture started (%s, pid %d, %d ring(s) of %d KiB)", device, direction,
                 pid, rings.layout.rings, rings.layout.size // 1024)
        return cap

    def stop(self, cap: Capture, reason: str, *, tell: bool = False) -> tuple[int, int]:
        """Unhook and free `cap` (once); `tell` says `reason` to its reader.
        Returns (frames written, frames dropped)."""
        with self._lock:
            if cap.ended:
                return cap.rings.counts() if cap.rings.caps else (0, 0)
            cap.ended = True
            if self.by_device.get(cap.device) is cap:
                del self.by_device[cap.device]
        quiet = cap.port.set_capture(None, wait=UNHOOK_WAIT)
        counts = cap.rings.counts()
        if quiet:
            cap.rings.close()
        else:  # never unmap what a worker may still write: keep it, say so
            cap.rings.close_fd()
            log.error("%s: a worker did not leave the capture ring within %.1f s; its "
                      "memory is kept", cap.device, UNHOOK_WAIT)
        log.info("%s: capture ended (%s): %d frames, %d dropped", cap.device, reason, *counts)
        if tell:
            cap.on_end(reason)
        return counts

    def end_device(self, device: str, reason: str) -> None:
        """The device goes away: its capture ends and its reader is told why."""
        cap = self.by_device.get(device)
        if cap is not None:
            self.stop(cap, reason, tell=True)

    def describe(self, device: str) -> dict | None:
        cap = self.by_device.get(device)
        return cap.describe() if cap is not None else None
