"""One vhost-user connection, back-end side, without sockets.

`VhostConnection.handle(data, fds)` takes what the transport received and
returns the bytes to send back. It owns the negotiated state of the
connection (features, memory table, ring set-up) and tells the device when the
data path must pause (before memory or fds it uses change) and when to
re-apply the ring set-up. Rules about what is legal when live in _state.py.

Anything malformed or out of state raises ProtocolError: the transport logs it
and closes this one connection. A well-formed request we cannot honour (memory
that cannot be mapped, an MTU too big) is answered with a REPLY_ACK failure
when the front-end asked for one, and otherwise also closes the connection,
because the front-end would go on believing it succeeded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

from gateway.vhost import _state
from gateway.vhost import protocol as p
from gateway.vhost._state import RingState
from gateway.vhost.dirtylog import DirtyLog, LogError
from gateway.vhost.memory import MAX_SLOTS, GuestMemory, MemoryTableError
from gateway.vhost.protocol import ProtocolError, Request
from gateway.virtio import features as vf
from gateway.virtio.features import Net, Proto
from gateway.virtio.ring import packed_base, valid_size

log = logging.getLogger(__name__)

class Refused(Exception):
    """A well-formed request this back-end will not carry out."""


@dataclass
class Ring:
    """What the front-end told us about one virtqueue."""

    index: int
    state: RingState = RingState.IDLE
    size: int | None = None
    addr: p.VringAddr | None = None
    base: int = 0  # next avail index to process; updated when the data path pauses
    kick: int | None = None
    polling: bool = False  # kick given with the no-fd bit: the front-end never kicks
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    version: int = 0  # bumped whenever the data path must rebuild this ring

    @property
    def qp(self) -> int:
        return self.index // 2

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd is not None:
                _close(fd)
                setattr(self, name, None)


class Device(Protocol):
    """What a connection needs from the device it serves (vhost/device.py)."""

    name: str
    features: int  # virtio features offered
    protocol_features: int  # protocol features offered
    queue_pairs: int

    def pause(self, conn: VhostConnection, qps: set[int] | None) -> None:
        """Stop the data path of these queue pairs (None: all) and write each
        ring's position back to Ring.base. Called before state they use changes."""

    def apply(self, conn: VhostConnection) -> None:
        """Bring the data path in line with the connection's rings and memory."""

    def set_mtu(self, mtu: int) -> None:
        """Raise Refused if the MTU cannot be carried."""

    def send_rarp(self, mac: bytes) -> None: ...


@dataclass
class VhostConnection:
    device: Device
    owned: bool = False
    acked_features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    status: int = 0
    mtu: int | None = None
    memory: GuestMemory = field(default_factory=GuestMemory)
    rings: list[Ring] = field(default_factory=list)
    closed: bool = False
    log: DirtyLog | None = None  # SET_LOG_BASE: where a migration wants our writes marked
    log_version: int = 0  # bumped when the log changes: workers must pick the new one

    def __post_init__(self) -> None:
        self.reader = p.MessageReader()
        self._unsent = bytearray()
        self.rings = [Ring(i) for i in range(2 * self.device.queue_pairs)]

    # -- driven by the transport -------------------------------------------------

    def handle(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> bytes:
        """Feed received bytes and fds; return what must be sent back."""
        if self.closed:
            for fd in fds:
                _close(fd)
            raise ProtocolError("connection already closed")
        self.reader.feed(data, fds)
        out = self._unsent
        while (msg := self.reader.next_message()) is not None:
            try:
                out += self._dispatch(msg)
            finally:
                msg.close_fds()  # whatever a handler did not take
        return self.take_unsent()

    def take_unsent(self) -> bytes:
        """Replies to the messages handled before a ProtocolError: the front-end
        should still see them before the connection closes."""
        out, self._unsent = bytes(self._unsent), bytearray()
        return out

    def close(self) -> None:
        """Tear down: stop the data path, release fds and mappings. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.device.pause(self, None)
        finally:
            for r in self.rings:
                r.state = RingState.STOPPED
                r.close_fds()
            self.memory.close()
            self._drop_log()
            self.reader.close()
        self.device.apply(self)  # after the release, so destroy_device sees it all gone

    # -- queries ----------------------------------------------------------------

    def negotiated(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def proto(self, bit: Proto) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def ring_runs(self, ring: Ring) -> bool:
        """True when the data path should process this ring now."""
        return (
            ring.state is RingState.STARTED
            and ring.enabled
            and ring.size is not None
            and ring.addr is not None
            and len(self.memory) > 0
            and _state.device_may_run(self.protocol_features, self.status)
        )

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self, msg: p.Message) -> bytes:
        req = Request(msg.request)  # the reader only lets known requests through
        index = self._ring_index(req, msg)
        why = _state.check(
            req,
            owned=self.owned,
            offered=self.device.features,
            protocol=self.protocol_features,
            ring_count=len(self.rings),
            ring_index=index,
        )
        if why:
            raise ProtocolError(why)
        rule = _state.RULES[req]
        handler = getattr(self, "_on_" + req.name.lower())
        log.debug("%s: %s", self.device.name, req.name)
        try:
            reply = handler(msg) if index is None else handler(msg, self.rings[index])
        except Refused as e:
            if msg.need_reply and self.proto(Proto.REPLY_ACK) and not rule.replies:
                log.warning("%s: %s refused: %s", self.device.name, req.name, e)
                return p.encode_reply(req, p.u64(1))
            raise ProtocolError(f"{req.name} refused: {e}") from None
        if rule.replies:
            return p.encode_reply(req, reply)
        if msg.need_reply and self.proto(Proto.REPLY_ACK):
            return p.encode_reply(req, p.u64(0))
        return b""

    @staticmethod
    def _ring_index(req: Request, msg: p.Message) -> int | None:
        if not _state.RULES.get(req, _state.Rule()).ring:
            return None
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            v = msg.u64()
            if v & ~(p.VRING_IDX_MASK | p.VRING_NOFD):
                raise ProtocolError(f"{req.name}: unknown bits in {v:#x}")
            return v & p.VRING_IDX_MASK
        return p.VRING_STATE.unpack_from(msg.payload)[0]

    def _move(self, req: Request, ring: Ring) -> None:
        try:
            ring.state = _state.ring_transition(req, ring.state)
        except ValueError as e:
            raise ProtocolError(f"ring {ring.index}: {e}") from None

    def _change_ring(self, ring: Ring, change) -> None:
        """Apply a change the data path reads: pause the ring's queue pair first."""
        self.device.pause(self, {ring.qp})
        change()
        ring.version += 1
        self.device.apply(self)

    def _change_memory(self, change) -> None:
        self.device.pause(self, None)
        try:
            change()
        except MemoryTableError as e:
            self.device.apply(self)
            raise Refused(str(e)) from None
        self.device.apply(self)

    # -- features and ownership -------------------------------------------------

    def _on_get_features(self, msg: p.Message) -> bytes:
        return p.u64(self.device.features)

    def _on_set_features(self, msg: p.Message) -> None:
        f = msg.u64()
        extra = f & ~self.device.features
        if extra:
            raise Refused(f"features {vf.names(extra)} were not offered")
        running = any(r.state is RingState.STARTED for r in self.rings)
        # QEMU turns LOG_ALL on and off on running rings when a migration starts
        # and ends; any other change under running rings is refused.
        log_all = 1 << Net.LOG_ALL
        if running and self.features_set and (f ^ self.acked_features) & ~log_all:
            raise Refused("features changed while rings are running")
        if running and self.features_set and f != self.acked_features:
            self.device.pause(self, None)
            self.acked_features = f
            self.device.apply(self)
            return
        self.acked_features = f
        self.features_set = True

    def _on_set_owner(self, msg: p.Message) -> None:
        self.owned = True  # QEMU sends it once per queue pair: repeats are fine

    def _on_reset_owner(self, msg: p.Message) -> None:
        """The seed's reset_owner: the device stays, everything negotiated goes."""
        self.device.pause(self, None)
        for r in self.rings:
            r.close_fds()
        self.rings = [Ring(i) for i in range(2 * self.device.queue_pairs)]
        self.memory.close()
        self._drop_log()
        self.acked_features = self.protocol_features = self.status = 0
        self.features_set = self.owned = False
        self.device.apply(self)

    def _on_get_protocol_features(self, msg: p.Message) -> bytes:
        return p.u64(self.device.protocol_features)

    def _on_set_protocol_features(self, msg: p.Message) -> None:
        f = msg.u64()
        extra = f & ~self.device.protocol_features
        if extra:
            raise Refused(f"protocol features {vf.names(extra, Proto)} were not offered")
        self.protocol_features = f

    def _on_get_queue_num(self, msg: p.Message) -> bytes:
        return p.u64(self.device.queue_pairs)

    def _on_get_max_mem_slots(self, msg: p.Message) -> bytes:
        return p.u64(MAX_SLOTS)

    def _on_set_status(self, msg: p.Message) -> None:
        v = msg.u64()
        if v > 0xFF:
            raise ProtocolError(f"SET_STATUS: status {v:#x} is not a byte")
        if v == self.status:
            return
        self.device.pause(self, None)
        self.status = v
        self.device.apply(self)

    def _on_get_status(self, msg: p.Message) -> bytes:
        return p.u64(self.status)

    # -- memory -----------------------------------------------------------------

    def _on_set_mem_table(self, msg: p.Message) -> None:
        regions, fds = msg.mem_table(), msg.fds
        msg.fds = []  # set_table consumes them, mapped or not
        self._change_memory(lambda: self.memory.set_table(regions, fds))

    def _on_set_log_base(self, msg: p.Message) -> bytes:
        size, offset = msg.log()
        end = max((m.region.gpa + m.region.size for m in self.memory.regions), default=0)
        try:
            new = DirtyLog(msg.fds[0], size, offset, end)
        except LogError as e:
            raise Refused(str(e)) from None
        self.device.pause(self, None)
        self._drop_log()
        self.log = new
        self.log_version += 1
        self.device.apply(self)
        return b""

    def _drop_log(self) -> None:
        """Callers have paused the workers: no burst writes into the old log."""
        if self.log is not None:
            self.log.close()
            self.log = None
            self.log_version += 1

    def _on_add_mem_reg(self, msg: p.Message) -> None:
        region, fd = msg.single_region(), msg.fds.pop()
        self._change_memory(lambda: self.memory.add(region, fd))

    def _on_rem_mem_reg(self, msg: p.Message) -> None:
        region = msg.single_region()
        self._change_memory(lambda: self.memory.remove(region))

    # -- rings ------------------------------------------------------------------

    def _on_set_vring_num(self, msg: p.Message, ring: Ring) -> None:
        _, num = msg.vring_state()
        if not valid_size(num, self._packed()):
            raise ProtocolError(f"ring {ring.index}: size {num} is not a power of two <= 32768"
                                if not self._packed() else
                                f"ring {ring.index}: size {num} is not in 1..32768")
        self._move(Request.SET_VRING_NUM, ring)
        ring.size = num

    def _on_set_vring_addr(self, msg: p.Message, ring: Ring) -> None:
        addr = msg.vring_addr()
        if addr.flags & ~p.VRING_F_LOG:
            raise ProtocolError(f"ring {ring.index}: unknown address flags {addr.flags:#x}")
        was = ring.state
        self._move(Request.SET_VRING_ADDR, ring)
        if was is RingState.STARTED:
            self._change_ring(ring, lambda: setattr(ring, "addr", addr))
        else:
            ring.addr = addr

    def _on_set_vring_base(self, msg: p.Message, ring: Ring) -> None:
        _, num = msg.vring_state()
        if self._packed():
            # Position, wrap counter and QEMU's used half: packed_base() says
            # what we keep; checked against the size here if it is known.
            try:
                num = packed_base(num, ring.size if ring.size is not None else 0x8000)
            except ValueError as e:
                raise ProtocolError(f"ring {ring.index}: {e}") from None
        elif num > 0xFFFF:
            raise ProtocolError(f"ring {ring.index}: base {num} does not fit a split ring index")
        self._move(Request.SET_VRING_BASE, ring)
        ring.base = num

    def _on_get_vring_base(self, msg: p.Message, ring: Ring) -> bytes:
        if ring.state is RingState.STARTED:
            self.device.pause(self, {ring.qp})
            self._move(Request.GET_VRING_BASE, ring)
            ring.version += 1
            self.device.apply(self)
        if self._packed():
            # As QEMU reads it back: avail state low, used state high.
            return p.vring_state(ring.index, ring.base | ring.base << 16)
        return p.vring_state(ring.index, ring.base)

    def _packed(self) -> bool:
        return bool(self.acked_features >> Net.RING_PACKED & 1)

    def _on_set_vring_kick(self, msg: p.Message, ring: Ring) -> None:
        nofd = bool(msg.u64() & p.VRING_NOFD)
        fd = None if nofd else msg.fds.pop()

        def change() -> None:
            if ring.kick is not None:
                _close(ring.kick)
            ring.kick, ring.polling = fd, nofd
            if ring.state is not RingState.STARTED and _state.ring_enabled_at_start(
                self.acked_features
            ):
                ring.enabled = True
            self._move(Request.SET_VRING_KICK, ring)

        if ring.size is None or ring.addr is None:
            if fd is not None:
                _close(fd)
            raise ProtocolError(f"ring {ring.index}: kick before its size and addresses")
        self._change_ring(ring, change)

    def _on_set_vring_call(self, msg: p.Message, ring: Ring) -> None:
        fd = None if msg.u64() & p.VRING_NOFD else msg.fds.pop()
        self._change_ring(ring, lambda: self._swap_fd(ring, "call", fd))

    def _on_set_vring_err(self, msg: p.Message, ring: Ring) -> None:
        """A worker that finds the guest lying writes this fd from its own
        thread (device._broken): like kick and call, the old fd is closed only
        once the queue pair's worker has stopped, or its number, taken by the
        next memfd, could receive 8 bytes meant for the old eventfd. The ring
        itself is unchanged (no version bump), so a pair the guest broke stays
        stopped and a running one goes on from where it was."""
        fd = None if msg.u64() & p.VRING_NOFD else msg.fds.pop()
        self.device.pause(self, {ring.qp})
        self._swap_fd(ring, "err", fd)
        self.device.apply(self)

    @staticmethod
    def _swap_fd(ring: Ring, name: str, fd: int | None) -> None:
        old = getattr(ring, name)
        if old is not None:
            _close(old)
        setattr(ring, name, fd)

    def _on_set_vring_enable(self, msg: p.Message, ring: Ring) -> None:
        _, num = msg.vring_state()
        if num not in (0, 1):
            raise ProtocolError(f"ring {ring.index}: enable value {num} is not 0 or 1")
        if ring.enabled != bool(num):
            self._change_ring(ring, lambda: setattr(ring, "enabled", bool(num)))

    # -- net --------------------------------------------------------------------

    def _on_net_set_mtu(self, msg: p.Message) -> None:
        mtu = msg.u64()
        if not 68 <= mtu <= 65535:
            raise Refused(f"MTU {mtu} is outside 68..65535")
        self.device.set_mtu(mtu)
        self.mtu = mtu

    def _on_send_rarp(self, msg: p.Message) -> None:
        self.device.send_rarp(msg.payload[:6])


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
