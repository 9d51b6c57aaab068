"""A vhost-user front-end in Python: the "test guest" for tests and the demo.

It does what QEMU does, as far as a net back-end can tell: memfd guest memory
shared by fd (split in regions with distinct guest-physical and user
addresses, so both translations are exercised), its own split rings, eventfds
for kick and call, and the same message sequence. It sends frames through the
guest TX rings and reads what the back-end wrote into the RX rings.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import struct
import threading
import time

from gateway.testing.packed_driver import EVENT_DESC, PackedRing
from gateway.testing.vring_driver import DriverRing
from gateway.vhost import protocol as p
from gateway.vhost._state import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from gateway.vhost.protocol import Region, Request
from gateway.virtio import features as vf
from gateway.virtio.features import Net, Proto

QVA_BASE = 0x7F00_0000_0000
QVA_GAP = 1 << 30  # user addresses of regions are not contiguous: catches GPA/QVA mix-ups
BUF_SIZE = 2048
_FENCE = threading.Lock()


class FrontendError(Exception):
    pass


class Frontend:
    def __init__(
        self,
        path: str,
        *,
        queue_pairs: int = 1,
        queue_size: int = 256,
        mem_size: int = 8 << 20,
        regions: int = 2,
        want: int | None = None,
        want_protocol: int | None = None,
        add_mem_reg: bool = False,
        server: bool = False,
        timeout: float = 5.0,
        packed: bool = False,
    ) -> None:
        self.path = path
        self.queue_pairs = queue_pairs
        self.queue_size = queue_size
        self.mem_size = mem_size
        self.nregions = regions
        self.want = want
        self.want_protocol = want_protocol
        self.add_mem_reg = add_mem_reg
        self.server = server
        self.timeout = timeout
        self.packed = packed
        self.sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self.memfd = os.memfd_create("gw-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size)
        self.rings: list[DriverRing | PackedRing] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        self.features = 0
        self.protocol_features = 0
        self._layout()

    # -- memory and rings ---------------------------------------------------------

    def regions(self) -> list[Region]:
        part = self.mem_size // self.nregions
        return [
            Region(gpa=k * part, size=part, qva=QVA_BASE + k * (part + QVA_GAP),
                   mmap_offset=k * part)
            for k in range(self.nregions)
        ]

    def qva(self, gpa: int) -> int:
        for r in self.regions():
            if r.gpa <= gpa < r.gpa + r.size:
                return r.qva + gpa - r.gpa
        raise ValueError(f"GPA {gpa:#x} outside guest memory")

    def _layout(self) -> None:
        nrings = 2 * self.queue_pairs
        ring_bytes = (DriverRing.ring_bytes(self.queue_size) + 4095) & ~4095
        buf_bytes = self.queue_size * BUF_SIZE
        need = nrings * (ring_bytes + buf_bytes)
        if need > self.mem_size:
            raise ValueError(f"guest memory of {self.mem_size} bytes is too small ({need} needed)")
        self._ring_gpas = [i * ring_bytes for i in range(nrings)]
        self._buf_gpas = [nrings * ring_bytes + i * buf_bytes for i in range(nrings)]

    # -- connection ---------------------------------------------------------------

    def connect(self) -> Frontend:
        if self.server:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.path)
            self._listener.listen(1)
            self._listener.settimeout(self.timeout)
            self.sock, _ = self._listener.accept()
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    self.sock.connect(self.path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)  # the back-end's socket is not there yet
        self.sock.settimeout(self.timeout)
        return self

    def send(
        self, req: int, payload: bytes = b"", fds: list[int] = (), need_reply: bool = False
    ) -> None:
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        data = p.encode(req, payload, flags)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv_reply(self, req: int) -> bytes:
        hdr = self._recv_exact(p.HEADER.size)
        rreq, flags, size = p.HEADER.unpack(hdr)
        if rreq != req or not flags & p.FLAG_REPLY:
            raise FrontendError(
                f"expected reply to {Request(req).name}, got {rreq} flags {flags:#x}")
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("back-end closed the connection")
            buf += chunk
        return buf

    def request(self, req: int, payload: bytes = b"", fds: list[int] = (), reply: bool = False
                ) -> bytes | None:
        """Send; read the reply if the request has one or REPLY_ACK applies."""
        ack = not reply and bool(self.protocol_features >> Proto.REPLY_ACK & 1)
        self.send(req, payload, fds, need_reply=ack)
        if reply:
            return self.recv_reply(req)
        if ack:
            (rc,) = struct.unpack("<Q", self.recv_reply(req))
            if rc:
                raise FrontendError(f"{Request(req).name} failed: {rc}")
        return None

    def get_u64(self, req: int) -> int:
        return struct.unpack("<Q", self.request(req, reply=True))[0]

    # -- the QEMU-like handshake ---------------------------------------------------

    def setup(self, *, driver_ok: bool = True) -> Frontend:
        offered = self.get_u64(Request.GET_FEATURES)
        self.request(Request.SET_OWNER)
        want = offered if self.want is None else self.want & offered
        # Split rings (vring_driver.py) unless asked for packed ones
        # (packed_driver.py): then RING_PACKED must be offered.
        if not self.packed:
            want &= ~(1 << Net.RING_PACKED)
        elif not want >> Net.RING_PACKED & 1:
            raise FrontendError("packed rings wanted, RING_PACKED not offered")
        if offered >> Net.PROTOCOL_FEATURES & 1:
            proto = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            if self.want_protocol is not None:
                proto &= self.want_protocol
            self.request(Request.SET_PROTOCOL_FEATURES, p.u64(proto))
            self.protocol_features = proto
            if proto >> Proto.MQ & 1:
                n = self.get_u64(Request.GET_QUEUE_NUM)
                if n < self.queue_pairs:
                    raise FrontendError(f"back-end has {n} queue pairs, {self.queue_pairs} wanted")
        self.features = want
        self.request(Request.SET_FEATURES, p.u64(want))
        self._send_memory()
        self.rings, self.kicks, self.calls, self.errs = [], [], [], []
        for i in range(2 * self.queue_pairs):
            self.rings.append(self._new_ring(i))
            for fds in (self.kicks, self.calls, self.errs):
                fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self.start_ring(i)
        if driver_ok and self.protocol_features >> Proto.STATUS & 1:
            self.request(Request.SET_STATUS, p.u64(
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK))
        return self

    def _send_memory(self) -> None:
        if self.add_mem_reg:
            for r in self.regions():
                self.request(Request.ADD_MEM_REG, p.single_region(r), [self.memfd])
        else:
            regions = self.regions()
            self.request(Request.SET_MEM_TABLE, p.mem_table(regions), [self.memfd] * len(regions))

    def _new_ring(self, i: int) -> DriverRing | PackedRing:
        kind = PackedRing if self.features >> Net.RING_PACKED & 1 else DriverRing
        return kind(self.mem, self._ring_gpas[i], self.queue_size, self._buf_gpas[i],
                    BUF_SIZE, event_idx=bool(self.features >> Net.RING_EVENT_IDX & 1))

    def start_ring(self, i: int, base: int | None = None) -> None:
        ring = self.rings[i]
        self.request(Request.SET_VRING_CALL, p.u64(i), [self.calls[i]])
        self.request(Request.SET_VRING_ERR, p.u64(i), [self.errs[i]])
        self.request(Request.SET_VRING_NUM, p.vring_state(i, self.queue_size))
        if isinstance(ring, PackedRing):
            # position 0 with wrap counter 1; descriptor ring, device and
            # driver event areas in SET_VRING_ADDR's desc/used/avail
            base = 1 << 15 if base is None else base
            used, avail = ring.device_gpa, ring.driver_gpa
        else:
            base = 0 if base is None else base
            used, avail = ring.used_gpa, ring.avail_gpa
        self.request(Request.SET_VRING_BASE, p.vring_state(i, base))
        self.request(Request.SET_VRING_ADDR, p.vring_addr(
            i, self.qva(ring.desc_gpa), self.qva(used), self.qva(avail)))
        self.request(Request.SET_VRING_KICK, p.u64(i), [self.kicks[i]])
        if self.features >> Net.PROTOCOL_FEATURES & 1:
            self.request(Request.SET_VRING_ENABLE, p.vring_state(i, 1))

    def wait_error(self, i: int, timeout: float | None = None) -> bool:
        """Wait for the back-end to signal ring i's error eventfd (as QEMU
        does, to log "vhost vring error"); True if it did."""
        ready, _, _ = select.select([self.errs[i]], [], [], self.timeout if timeout is None
                                    else timeout)
        return bool(ready) and os.eventfd_read(self.errs[i]) > 0

    def reset(self) -> None:
        """What QEMU does when the guest resets the device: stop every ring
        (GET_VRING_BASE), then set each up again from zeroed ring memory."""
        for i in range(len(self.rings)):
            self.get_vring_base(i)
        for i, old in enumerate(self.rings):
            old.release()
            self.rings[i] = self._new_ring(i)
            self.start_ring(i)

    def get_vring_base(self, i: int) -> int:
        _, num = p.VRING_STATE.unpack(
            self.request(Request.GET_VRING_BASE, p.vring_state(i, 0), reply=True))
        return num

    # -- frames -------------------------------------------------------------------

    @property
    def hdr_len(self) -> int:
        return vf.net_hdr_len(self.features)

    def transmit(self, frames: list[bytes], qp: int = 0, split_header: bool = False,
                 vnet_hdr: bytes | None = None) -> None:
        """Frames out of the guest: header and frame in separate descriptors
        (or the header itself split in two, to exercise ANY_LAYOUT). vnet_hdr
        replaces the zeroed virtio-net header (offload tests); a frame longer
        than a buffer (a GSO frame) takes several descriptors."""
        ring = self.rings[2 * qp + 1]
        hdr = bytes(self.hdr_len) if vnet_hdr is None else vnet_hdr[: self.hdr_len]
        for f in frames:
            body = [f[i : i + BUF_SIZE] for i in range(0, len(f), BUF_SIZE)] or [f]
            chunks = [hdr[:4], hdr[4:], *body] if split_header else [hdr, *body]
            ring.add_out(chunks)
        if ring.kick_needed():
            os.eventfd_write(self.kicks[2 * qp + 1], 1)

    def wait_tx_done(self, count: int, qp: int = 0) -> None:
        """Reap `count` used TX entries: the back-end has taken the frames."""
        self._reap(2 * qp + 1, count)

    def post_rx(self, n: int, qp: int = 0, buflen: int = BUF_SIZE) -> None:
        ring = self.rings[2 * qp]
        for _ in range(n):
            ring.add_in(1, buflen)
        if ring.kick_needed():
            os.eventfd_write(self.kicks[2 * qp], 1)

    def receive(self, count: int, qp: int = 0, headers: bool = False) -> list:
        """`count` frames from the back-end, headers stripped, buffers merged;
        with headers, (virtio-net header, frame) pairs."""
        ring = self.rings[2 * qp]
        used = self._reap(2 * qp, None, frames=count)
        frames, i = [], 0
        while i < len(used):
            head, length = used[i]
            data = ring.read_in(head, length)
            nbuf = 1
            if self.features >> Net.MRG_RXBUF & 1:
                (nbuf,) = struct.unpack_from("<H", data, 10)
                for head2, len2 in used[i + 1 : i + nbuf]:
                    data += ring.read_in(head2, len2)
            frames.append((data[: self.hdr_len], data[self.hdr_len :]) if headers
                          else data[self.hdr_len :])
            i += nbuf
        return frames

    def _reap(self, index: int, count: int | None, frames: int | None = None
              ) -> list[tuple[int, int]]:
        ring, call = self.rings[index], self.calls[index]
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.timeout
        while True:
            out += ring.poll_used()
            if count is not None and len(out) >= count:
                return out
            if frames is not None and self._frames_in(ring, out) >= frames:
                return out
            if ring.event_idx and isinstance(ring, PackedRing):
                ring.set_driver_event(EVENT_DESC, ring.last_used, ring.used_wrap)
                with _FENCE:
                    pass
                if ring.is_used(ring.last_used):
                    continue
            elif ring.event_idx:
                # Ask for an interrupt after what we have reaped, then look again:
                # entries that came in before used_event was written get none.
                ring.set_used_event(ring.last_used)
                with _FENCE:  # a locked instruction: the store above before the load below
                    pass
                if ring.used_idx != ring.last_used:
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"ring {index}: timed out with {len(out)} used entries")
            if select.select([call], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)

    def _frames_in(self, ring: DriverRing | PackedRing, used: list[tuple[int, int]]) -> int:
        if not self.features >> Net.MRG_RXBUF & 1:
            return len(used)
        n, i = 0, 0
        while i < len(used):
            head, length = used[i]
            (nbuf,) = struct.unpack_from("<H", ring.read_in(head, 12), 10)
            i += max(nbuf, 1)
            n += 1 if i <= len(used) else 0
        return n

    # -- teardown -----------------------------------------------------------------

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for fd in self.kicks + self.calls + self.errs:
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []

    def release(self) -> None:
        """Close everything, guest memory included."""
        self.close()
        for ring in self.rings:
            ring.release()
        self.rings = []
        try:
            self.mem.close()
        except BufferError:
            pass  # a view is still held (say, by a traceback): the GC unmaps it later
        os.close(self.memfd)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
