"""The sans-IO protocol machine, driven with byte vectors: no sockets, no threads."""

from __future__ import annotations

import os
import struct

import pytest

from gateway.vhost import protocol as p
from gateway.vhost._state import RingState
from gateway.vhost.backend import Refused, VhostConnection
from gateway.vhost.protocol import ProtocolError, Region, Request
from gateway.virtio import features as vf
from gateway.virtio.features import Net, Proto

ALL_PROTO = vf.SUPPORTED_PROTOCOL_FEATURES
# split rings: the packed ring's SET_VRING_NUM/BASE rules are in test_packed_ring.py
SPLIT_FEATURES = vf.SUPPORTED_FEATURES & ~(1 << Net.RING_PACKED)


class FakeDevice:
    """Records what the connection asks of the data path."""

    name = "fake"

    def __init__(self, queue_pairs: int = 1) -> None:
        self.features = vf.SUPPORTED_FEATURES
        self.protocol_features = vf.SUPPORTED_PROTOCOL_FEATURES
        self.queue_pairs = queue_pairs
        self.calls: list[tuple] = []
        self.rarp: list[bytes] = []

    def pause(self, conn, qps):
        self.calls.append(("pause", None if qps is None else tuple(sorted(qps))))

    def apply(self, conn):
        running = [r.index for r in conn.rings if conn.ring_runs(r)]
        self.calls.append(("apply", tuple(running)))

    def set_mtu(self, mtu):
        if mtu > 9000:
            raise Refused("too big for the fake NIC")

    def send_rarp(self, mac):
        self.rarp.append(mac)


def msg(req, payload=b"", need_reply=False):
    flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
    return p.encode(req, payload, flags)


def reply_of(out: bytes) -> tuple[int, int, bytes]:
    req, flags, size = p.HEADER.unpack_from(out)
    assert flags & p.FLAG_REPLY
    assert len(out) == p.HEADER.size + size
    return req, flags, out[p.HEADER.size :]


def memfd(size=1 << 20) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def conn():
    c = VhostConnection(FakeDevice(queue_pairs=2))
    yield c
    c.close()


def owned(c: VhostConnection, proto: int = ALL_PROTO) -> VhostConnection:
    c.handle(msg(Request.SET_OWNER))
    c.handle(msg(Request.SET_PROTOCOL_FEATURES, p.u64(proto)))
    c.handle(msg(Request.SET_FEATURES, p.u64(SPLIT_FEATURES)))
    return c


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- codec -------------------------------------------------------------------------


def test_header_layout_is_12_bytes_little_endian():
    assert p.encode(Request.GET_FEATURES) == struct.pack("<III", 1, 1, 0)
    assert p.encode_reply(Request.GET_FEATURES, p.u64(5)) == struct.pack("<IIIQ", 1, 5, 8, 5)


def test_reader_reassembles_byte_by_byte():
    r = p.MessageReader()
    data = msg(Request.SET_FEATURES, p.u64(0x1234)) + msg(Request.GET_FEATURES)
    got = []
    for b in data:
        r.feed(bytes([b]))
        while (m := r.next_message()) is not None:
            got.append(m)
    assert [(m.request, m.payload) for m in got] == [
        (Request.SET_FEATURES, p.u64(0x1234)), (Request.GET_FEATURES, b"")]


def test_fds_belong_to_the_message_they_arrived_with():
    r = p.MessageReader()
    a, b = memfd(), memfd()
    r.feed(msg(Request.SET_VRING_KICK, p.u64(0)), [a])
    r.feed(msg(Request.SET_VRING_CALL, p.u64(1)), [b])
    m1, m2 = r.next_message(), r.next_message()
    assert m1.fds == [a] and m2.fds == [b]
    m1.close_fds(), m2.close_fds()


@pytest.mark.parametrize(
    "data, fds, why",
    [
        (msg(Request.SET_FEATURES, b"\0" * 4), 0, "payload is 4 bytes"),
        (msg(Request.GET_FEATURES, b"\0" * 8), 0, "expected 0"),
        (msg(Request.SET_VRING_ADDR, b"\0" * 39), 0, "expected 40"),
        (p.encode(99), 0, "unknown request 99"),
        (p.encode(Request.SET_LOG_FD, p.u64(0)), 0, "unsupported request SET_LOG_FD"),
        (p.encode(Request.SET_LOG_BASE, p.u64(0)), 1, "expected 16"),
        (p.encode(Request.SET_LOG_BASE, p.log_base(4096)), 0, "carries 0 fds, expected 1"),
        (struct.pack("<III", 1, 0, 0), 0, "bad version"),
        (struct.pack("<III", 1, 1 | p.FLAG_REPLY, 0), 0, "bad flags"),
        (struct.pack("<III", 1, 1 | 0x100, 0), 0, "bad flags"),
        (struct.pack("<III", Request.SET_MEM_TABLE, 1, 1 << 20), 0, "too big"),
        (msg(Request.SET_MEM_TABLE, struct.pack("<II", 0, 0)), 0, "0 regions"),
        (msg(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 256), 0, "9 regions"),
        (msg(Request.SET_VRING_KICK, p.u64(0)), 0, "carries 0 fds, expected 1"),
        (msg(Request.SET_VRING_KICK, p.u64(0x100)), 1, "carries 1 fds, expected 0"),
        (msg(Request.SET_FEATURES, p.u64(0)), 1, "carries 1 fds"),
        (msg(Request.SET_OWNER), 9, r"9 fds \(max 8\)"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_messages_are_refused_and_their_fds_closed(data, fds, why):
    r = p.MessageReader()
    before = fd_count()
    r.feed(data, [memfd() for _ in range(fds)])
    with pytest.raises(ProtocolError, match=why):
        r.next_message()
    r.close()
    assert fd_count() == before


def test_short_header_waits_for_more():
    r = p.MessageReader()
    r.feed(msg(Request.GET_FEATURES)[:7])
    assert r.next_message() is None


def test_reader_says_when_it_is_in_the_middle_of_a_message():
    """The transport's deadline hangs on this: set from a message's first byte
    to its last, clear between messages, whatever the chunks."""
    r = p.MessageReader()
    assert not r.mid_message
    data = msg(Request.SET_FEATURES, p.u64(1)) + msg(Request.GET_FEATURES)
    seen = []
    for b in data:
        r.feed(bytes([b]))
        while r.next_message() is not None:
            pass
        seen.append(r.mid_message)
    # SET_FEATURES is 20 bytes, GET_FEATURES 12: idle only after the last byte of each
    assert seen == [True] * 19 + [False] + [True] * 11 + [False]


def test_fds_without_any_message_are_refused():
    r = p.MessageReader()
    r.feed(b"", [memfd()])
    with pytest.raises(ProtocolError, match="without a message"):
        r.next_message()
    r.close()


# -- the state machine --------------------------------------------------------------


def test_feature_negotiation(conn):
    _, _, payload = reply_of(conn.handle(msg(Request.GET_FEATURES)))
    offered = struct.unpack("<Q", payload)[0]
    assert offered == vf.SUPPORTED_FEATURES
    assert offered >> Net.PROTOCOL_FEATURES & 1
    _, _, payload = reply_of(conn.handle(msg(Request.GET_PROTOCOL_FEATURES)))
    proto = struct.unpack("<Q", payload)[0]
    for bit in (Proto.MQ, Proto.REPLY_ACK, Proto.CONFIGURE_MEM_SLOTS, Proto.STATUS,
                Proto.NET_MTU, Proto.RARP):
        assert proto >> bit & 1, bit.name
    owned(conn)
    assert conn.acked_features == SPLIT_FEATURES
    _, _, payload = reply_of(conn.handle(msg(Request.GET_QUEUE_NUM)))
    assert struct.unpack("<Q", payload)[0] == 2
    _, _, payload = reply_of(conn.handle(msg(Request.GET_MAX_MEM_SLOTS)))
    assert struct.unpack("<Q", payload)[0] >= 32


def test_unoffered_feature_is_refused(conn):
    conn.handle(msg(Request.SET_OWNER))
    with pytest.raises(ProtocolError, match="not offered"):
        conn.handle(msg(Request.SET_FEATURES, p.u64(1 << Net.HOST_UFO)))


def test_unoffered_feature_with_reply_ack_gets_a_nack_and_the_connection_lives(conn):
    owned(conn)
    out = conn.handle(msg(Request.SET_PROTOCOL_FEATURES, p.u64(1 << Proto.BACKEND_REQ), True))
    assert reply_of(out)[2] == p.u64(1)
    out = conn.handle(msg(Request.SET_OWNER, need_reply=True))
    assert reply_of(out)[2] == p.u64(0)


def test_requests_before_set_owner_are_out_of_state(conn):
    with pytest.raises(ProtocolError, match="before SET_OWNER"):
        conn.handle(msg(Request.SET_VRING_NUM, p.vring_state(0, 256)))


def test_protocol_feature_gates(conn):
    owned(conn, proto=0)
    with pytest.raises(ProtocolError, match="CONFIGURE_MEM_SLOTS"):
        conn.handle(msg(Request.GET_MAX_MEM_SLOTS))


@pytest.mark.parametrize(
    "req, payload, why",
    [
        (Request.SET_VRING_NUM, p.vring_state(4, 256), "ring index 4 out of range"),
        (Request.SET_VRING_NUM, p.vring_state(0, 0), "size 0"),
        (Request.SET_VRING_NUM, p.vring_state(0, 100), "size 100"),
        (Request.SET_VRING_NUM, p.vring_state(0, 65536), "size 65536"),
        (Request.SET_VRING_BASE, p.vring_state(0, 70000), "base 70000"),
        (Request.SET_VRING_ADDR, p.vring_addr(0, 0, 0, 0, flags=2), "unknown address flags"),
        (Request.SET_VRING_ENABLE, p.vring_state(0, 2), "enable value 2"),
        (Request.SET_VRING_CALL, p.u64(0x200 | 0x100), "unknown bits"),
        (Request.SET_VRING_KICK, p.u64(0x100), "kick before its size"),
        (Request.SET_STATUS, p.u64(0x100), "not a byte"),
    ],
)
def test_bad_ring_values_close_the_connection(conn, req, payload, why):
    owned(conn)
    with pytest.raises(ProtocolError, match=why):
        conn.handle(msg(req, payload))


def test_overlapping_regions_are_refused_and_fds_closed(conn):
    owned(conn)
    before = fd_count()
    regions = [Region(0, 1 << 20, 0x1000_0000, 0), Region(1 << 19, 1 << 20, 0x2000_0000, 0)]
    with pytest.raises(ProtocolError, match="overlaps"):
        conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table(regions)), [memfd(2 << 20), memfd()])
    assert fd_count() == before


def test_region_larger_than_its_fd_is_refused(conn):
    owned(conn)
    regions = [Region(0, 4 << 20, 0x1000_0000, 0)]
    out = conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table(regions), True), [memfd(1 << 20)])
    assert reply_of(out)[2] == p.u64(1)
    assert len(conn.memory) == 0


def test_region_overflowing_u64_is_refused(conn):
    owned(conn)
    regions = [Region((1 << 64) - 4096, 1 << 20, 0x1000_0000, 0)]
    with pytest.raises(ProtocolError, match="overflows"):
        conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table(regions)), [memfd()])


@pytest.mark.parametrize("offset", [1, 0x10, 0x800, 0x1000 + 8])
def test_region_with_an_unaligned_mmap_offset_is_refused_and_fds_closed(conn, offset):
    owned(conn)
    before = fd_count()
    regions = [Region(0, 1 << 20, 0x1000_0000, offset)]
    with pytest.raises(ProtocolError, match="mmap offset .* is not a multiple of the 4096-byte"):
        conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table(regions)), [memfd(2 << 20)])
    assert fd_count() == before and len(conn.memory) == 0
    # the same through ADD_MEM_REG, and with REPLY_ACK a refusal the front-end hears
    out = conn.handle(msg(Request.ADD_MEM_REG, p.single_region(regions[0]), True),
                      [memfd(2 << 20)])
    assert reply_of(out)[2] == p.u64(1)
    assert fd_count() == before and len(conn.memory) == 0
    # a page-aligned offset into the same file is fine
    aligned = Region(0, 1 << 20, 0x1000_0000, 0x1000)
    conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table([aligned])), [memfd(2 << 20)])
    assert len(conn.memory) == 1


def test_add_and_remove_memory_regions(conn):
    owned(conn)
    r1, r2 = Region(0, 1 << 20, 0x1000_0000, 0), Region(1 << 20, 1 << 20, 0x3000_0000, 0)
    conn.handle(msg(Request.ADD_MEM_REG, p.single_region(r1)), [memfd()])
    conn.handle(msg(Request.ADD_MEM_REG, p.single_region(r2)), [memfd()])
    assert len(conn.memory) == 2
    assert conn.memory.gpa_to_host(0x100, 16) == conn.memory.qva_to_host(0x1000_0100, 16)
    assert conn.memory.qva_to_host(0x3000_0010, 16) == conn.memory.gpa_to_host((1 << 20) + 16, 16)
    with pytest.raises(Exception, match="not inside one memory region"):
        conn.memory.gpa_to_host((1 << 20) - 8, 16)  # crosses the two regions
    conn.handle(msg(Request.REM_MEM_REG, p.single_region(r1)), [memfd()])
    assert len(conn.memory) == 1
    with pytest.raises(ProtocolError, match="no region"):
        conn.handle(msg(Request.REM_MEM_REG, p.single_region(r1)))


def _ring_setup(conn, i, kick=True):
    conn.handle(msg(Request.SET_VRING_NUM, p.vring_state(i, 256)))
    conn.handle(msg(Request.SET_VRING_BASE, p.vring_state(i, 7)))
    conn.handle(msg(Request.SET_VRING_ADDR, p.vring_addr(i, 0x1000_0000, 0x1000_2000, 0x1000_1000)))
    if kick:
        conn.handle(msg(Request.SET_VRING_KICK, p.u64(i)), [os.eventfd(0)])


def test_ring_lifecycle_and_get_vring_base(conn):
    owned(conn)
    regions = [Region(0, 1 << 20, 0x1000_0000, 0)]
    conn.handle(msg(Request.SET_MEM_TABLE, p.mem_table(regions)), [memfd()])
    for i in (0, 1):
        _ring_setup(conn, i)
        assert conn.rings[i].state is RingState.STARTED
        assert not conn.rings[i].enabled  # PROTOCOL_FEATURES acked: wait for ENABLE
        conn.handle(msg(Request.SET_VRING_ENABLE, p.vring_state(i, 1)))
    conn.handle(msg(Request.SET_STATUS, p.u64(0xF)))
    assert conn.device.calls[-1] == ("apply", (0, 1))
    with pytest.raises(ProtocolError, match="while the ring is started"):
        conn.handle(msg(Request.SET_VRING_BASE, p.vring_state(0, 1)))


def test_get_vring_base_stops_the_ring_and_replies_its_base():
    c = VhostConnection(FakeDevice())
    owned(c)
    c.handle(msg(Request.SET_MEM_TABLE, p.mem_table([Region(0, 1 << 20, 0x1000_0000, 0)])),
             [memfd()])
    _ring_setup(c, 0)
    out = c.handle(msg(Request.GET_VRING_BASE, p.vring_state(0, 0)))
    assert reply_of(out)[2] == p.vring_state(0, 7)
    assert c.rings[0].state is RingState.STOPPED
    assert ("pause", (0,)) in c.device.calls
    c.close()


def test_rings_start_enabled_without_protocol_features():
    c = VhostConnection(FakeDevice())
    c.handle(msg(Request.SET_OWNER))
    c.handle(msg(Request.SET_FEATURES, p.u64(1 << Net.VERSION_1)))
    _ring_setup(c, 0)
    assert c.rings[0].enabled
    c.close()


def test_polling_kick_with_the_nofd_bit():
    c = VhostConnection(FakeDevice())
    owned(c)
    _ring_setup(c, 0, kick=False)
    c.handle(msg(Request.SET_VRING_KICK, p.u64(0x100)))
    assert c.rings[0].polling and c.rings[0].kick is None
    assert c.rings[0].state is RingState.STARTED
    c.close()


def test_close_releases_every_fd():
    before = fd_count()
    c = VhostConnection(FakeDevice())
    owned(c)
    c.handle(msg(Request.SET_MEM_TABLE, p.mem_table([Region(0, 1 << 20, 0x1000_0000, 0)])),
             [memfd()])
    for i in (0, 1):
        _ring_setup(c, i)
        c.handle(msg(Request.SET_VRING_CALL, p.u64(i)), [os.eventfd(0)])
        c.handle(msg(Request.SET_VRING_ERR, p.u64(i)), [os.eventfd(0)])
    c.close()
    assert fd_count() == before


def test_mtu_and_rarp(conn):
    owned(conn)
    assert reply_of(conn.handle(msg(Request.NET_SET_MTU, p.u64(1500), True)))[2] == p.u64(0)
    assert reply_of(conn.handle(msg(Request.NET_SET_MTU, p.u64(9500), True)))[2] == p.u64(1)
    assert reply_of(conn.handle(msg(Request.NET_SET_MTU, p.u64(20), True)))[2] == p.u64(1)
    conn.handle(msg(Request.SEND_RARP, b"\x52\x54\x00\x12\x34\x56\0\0"))
    assert conn.device.rarp == [b"\x52\x54\x00\x12\x34\x56"]


def test_reset_owner_forgets_everything(conn):
    owned(conn)
    conn.handle(msg(Request.RESET_OWNER))
    assert not conn.owned and conn.acked_features == 0 and conn.protocol_features == 0
    with pytest.raises(ProtocolError, match="before SET_OWNER"):
        conn.handle(msg(Request.SET_FEATURES, p.u64(0)))
