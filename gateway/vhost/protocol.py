"""vhost-user wire format: bytes and fds in, typed messages out, and back.

Never touches a socket (like h11): the transport feeds what recvmsg gave it
and writes what `encode_reply` returns. Every size and fd count is checked
here, so the state machine only ever sees well-formed payloads.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum


class Request(IntEnum):
    """Front-end → back-end requests (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


HEADER = struct.Struct("<III")  # request, flags, payload size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
REGION = struct.Struct("<QQQQ")  # guest_phys_addr, size, user_addr, mmap_offset
MEM_HEADER = struct.Struct("<II")  # nregions, padding
LOG = struct.Struct("<QQ")  # VhostUserLog: mmap_size, mmap_offset
SINGLE_REGION_PAD = struct.Struct("<Q")

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_FDS = 8
MAX_TABLE_REGIONS = 8  # SET_MEM_TABLE carries at most 8 regions (one fd each)
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8
VRING_F_LOG = 1 << 0

# Largest payload of any request we accept; anything bigger is refused before
# buffering it, so a peer cannot make us hold megabytes.
MAX_PAYLOAD = MEM_HEADER.size + MAX_TABLE_REGIONS * REGION.size


class ProtocolError(Exception):
    """The peer broke the wire format; the connection must be closed."""


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    qva: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        while self.fds:
            _close(self.fds.pop())

    # Payload views. Sizes were checked by MessageReader, so these only unpack.
    def u64(self) -> int:
        return U64.unpack(self.payload)[0]

    def vring_state(self) -> tuple[int, int]:
        return VRING_STATE.unpack(self.payload)

    def vring_addr(self) -> VringAddr:
        return VringAddr(*VRING_ADDR.unpack(self.payload))

    def mem_table(self) -> list[Region]:
        n, _pad = MEM_HEADER.unpack_from(self.payload)
        off = MEM_HEADER.size
        return [Region(*REGION.unpack_from(self.payload, off + i * REGION.size)) for i in range(n)]

    def log(self) -> tuple[int, int]:
        """SET_LOG_BASE: (mmap_size, mmap_offset) of the log in the fd."""
        return LOG.unpack(self.payload)

    def single_region(self) -> Region:
        return Region(*REGION.unpack_from(self.payload, SINGLE_REGION_PAD.size))


# Payload size each request must have: an int, or a check on the payload.
_U64_REQUESTS = {
    Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_VRING_KICK,
    Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_STATUS,
    Request.NET_SET_MTU, Request.SEND_RARP,
}
_EMPTY_REQUESTS = {
    Request.GET_FEATURES, Request.SET_OWNER, Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
}
_STATE_REQUESTS = {
    Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
}


def _expected_size(req: int, payload: bytes) -> set[int]:
    if req in _U64_REQUESTS:
        return {U64.size}
    if req in _EMPTY_REQUESTS:
        return {0}
    if req in _STATE_REQUESTS:
        return {VRING_STATE.size}
    if req == Request.RESET_OWNER:
        return {0, U64.size}  # senders disagree; the value is unused
    if req == Request.SET_VRING_ADDR:
        return {VRING_ADDR.size}
    if req == Request.SET_LOG_BASE:
        return {LOG.size}  # the shared-memory form; the u64 one is for kernel vhost
    if req in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return {SINGLE_REGION_PAD.size + REGION.size}
    if req == Request.SET_MEM_TABLE:
        if len(payload) < MEM_HEADER.size:
            return {MEM_HEADER.size}
        n = MEM_HEADER.unpack_from(payload)[0]
        if not 1 <= n <= MAX_TABLE_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE with {n} regions (allowed 1..{MAX_TABLE_REGIONS})")
        return {MEM_HEADER.size + n * REGION.size}
    raise ProtocolError(f"unsupported request {_req_name(req)}")


def _expected_fds(msg: Message) -> set[int]:
    req = msg.request
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return {0} if msg.u64() & VRING_NOFD else {1}
    if req == Request.SET_MEM_TABLE:
        return {len(msg.mem_table())}
    if req in (Request.ADD_MEM_REG, Request.SET_LOG_BASE):
        return {1}
    if req == Request.REM_MEM_REG:
        return {0, 1}  # QEMU passes the region's fd again; it is only closed
    return {0}


def _req_name(req: int) -> str:
    try:
        return Request(req).name
    except ValueError:
        return f"unknown request {req}"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class MessageReader:
    """Reassembles messages from a byte stream with SCM_RIGHTS fds attached.

    fds that arrive with a chunk belong to the message that chunk starts in.
    That holds only if no chunk spans two messages: a unix stream socket may
    glue an fd-carrying write after earlier bytes in one recvmsg, so the
    transport asks for exactly `wanted()` bytes each time (as QEMU and DPDK do:
    header first, then payload).
    After a ProtocolError the reader is dead; `close` releases every fd it holds.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._pending_fds: list[tuple[int, int]] = []  # (stream offset of its chunk, fd)
        self._dead = False

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        at = self._start + len(self._buf)
        self._pending_fds.extend((at, fd) for fd in fds)
        self._buf += data

    @property
    def mid_message(self) -> bool:
        """True while part of a message is buffered (some header bytes, or a
        header whose payload has not all come). QEMU and DPDK write each
        message whole, so the transport gives this state a deadline; between
        messages (nothing buffered) there is none."""
        return bool(self._buf)

    def wanted(self) -> int:
        """Bytes still missing from the header or payload being read."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        size = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER.size + min(size, MAX_PAYLOAD + 1) - len(self._buf))

    def next_message(self) -> Message | None:
        if self._dead:
            raise ProtocolError("reader already failed")
        try:
            return self._next()
        except ProtocolError:
            self._dead = True
            raise

    def _next(self) -> Message | None:
        if len(self._buf) < HEADER.size:
            if self._pending_fds and not self._buf:
                raise ProtocolError("file descriptors received without a message")
            return None
        req, flags, size = HEADER.unpack_from(self._buf)
        if flags & FLAG_VERSION_MASK != VERSION:
            raise ProtocolError(f"{_req_name(req)}: bad version in flags {flags:#x}")
        if flags & ~KNOWN_FLAGS or flags & FLAG_REPLY:
            raise ProtocolError(f"{_req_name(req)}: bad flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"{_req_name(req)}: payload of {size} bytes is too big")
        if len(self._buf) < HEADER.size + size:
            return None
        payload = bytes(self._buf[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        self._start += HEADER.size + size
        fds = [fd for at, fd in self._pending_fds if at < self._start]
        self._pending_fds = [(at, fd) for at, fd in self._pending_fds if at >= self._start]
        msg = Message(req, flags, payload, fds)
        try:
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{msg.name}: {len(fds)} fds (max {MAX_FDS})")
            want = _expected_size(req, payload)
            if size not in want:
                raise ProtocolError(
                    f"{msg.name}: payload is {size} bytes, expected {' or '.join(map(str, want))}"
                )
            want_fds = _expected_fds(msg)
            if len(fds) not in want_fds:
                raise ProtocolError(
                    f"{msg.name}: carries {len(fds)} fds, "
                    f"expected {' or '.join(map(str, want_fds))}"
                )
        except ProtocolError:
            msg.close_fds()
            raise
        return msg

    def close(self) -> None:
        while self._pending_fds:
            _close(self._pending_fds.pop()[1])
        self._buf.clear()


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, VERSION | FLAG_REPLY)


def u64(v: int) -> bytes:
    return U64.pack(v)


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def mem_table(regions: list[Region]) -> bytes:
    return MEM_HEADER.pack(len(regions), 0) + b"".join(
        REGION.pack(r.gpa, r.size, r.qva, r.mmap_offset) for r in regions
    )


def log_base(size: int, offset: int = 0) -> bytes:
    return LOG.pack(size, offset)


def single_region(r: Region) -> bytes:
    return SINGLE_REGION_PAD.pack(0) + REGION.pack(r.gpa, r.size, r.qva, r.mmap_offset)
