"""The C checksum and TCP segmentation offloads (cffi_build/gw_offload.c)
against an independent Python reference, and how the TX ring hands a GSO
frame bigger than a UMEM frame to them.

The reference parses every segment the C code writes with struct, from the
bytes alone, and checks what the wire needs: lengths, IDs, sequence numbers,
flags, both checksums, and that the payloads put back together are the
original's.
"""

from __future__ import annotations

import mmap
import os
import random
import struct

import pytest

from gateway.testing.vring_driver import DriverRing
from gateway.virtio.ring import VirtQueue, ffi, lib

CAP = 4096  # a UMEM frame
MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")
FIN, SYN, PSH, ACK, CWR = 0x01, 0x02, 0x08, 0x10, 0x80


# --- reference ------------------------------------------------------------------

def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def l4_ok(src: bytes, dst: bytes, proto: int, l4: bytes) -> bool:
    return ones_sum(pseudo(src, dst, proto, len(l4)) + l4) == 0xFFFF


def tcp(payload: bytes, *, seq=1000, flags=ACK | PSH, opts=b"") -> bytes:
    doff = (20 + len(opts)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5001, seq, 7, doff << 4, flags, 512, 0, 0) \
        + opts + payload


def ipv4(l4: bytes, *, proto=6, ident=0x1234, opts=b"", frag=0x4000) -> bytes:
    ihl = (20 + len(opts)) // 4
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(l4), ident, frag,
                    64, proto, 0, SRC4, DST4) + opts
    c = (~ones_sum(h)) & 0xFFFF
    return h[:10] + struct.pack("!H", c) + h[12:] + l4


def ipv6(l4: bytes, *, nh=6) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(l4), nh, 64) + SRC6 + DST6 + l4


def eth(l3: bytes, ethertype: int, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return MAC + tag + struct.pack("!H", ethertype) + l3


def tcp_frame(payload: bytes, v6=False, vlan=None, **kw) -> bytes:
    t = tcp(payload, **kw)
    return eth(ipv6(t), 0x86DD, vlan) if v6 else eth(ipv4(t), 0x0800, vlan)


def hdr(*, flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    h = ffi.new("struct gw_net_hdr *")
    h.flags, h.gso_type, h.hdr_len, h.gso_size = flags, gso_type, hdr_len, gso_size
    h.csum_start, h.csum_offset = csum_start, csum_offset
    return h


def segment(frame: bytes, h, cap=CAP) -> list[bytes] | int:
    """The C plan + segments, or the negative refusal."""
    f = ffi.from_buffer(frame)
    plan = ffi.new("struct gw_gso *")
    n = lib.gw_gso_plan(f, len(frame), h, cap, plan)
    if n < 0:
        return n
    out, segs = ffi.new("uint8_t[]", cap), []
    for i in range(n):
        k = lib.gw_gso_segment(f, plan, i, out)
        assert 0 < k <= cap
        segs.append(bytes(ffi.buffer(out, k)))
    return segs


def check_segments(orig: bytes, segs: list[bytes], mss: int, v6: bool, l3: int = 14) -> None:
    """Everything a receiver checks, per segment, from the bytes alone."""
    ihl = 40 if v6 else 20
    l4 = l3 + ihl
    thl = (orig[l4 + 12] >> 4) * 4
    payload = orig[l4 + thl:]
    assert len(segs) == max(1, -(-len(payload) // mss))
    seq0 = struct.unpack_from("!I", orig, l4 + 4)[0]
    id0 = struct.unpack_from("!H", orig, l3 + 4)[0]
    oflags = orig[l4 + 13]
    got = b""
    for i, s in enumerate(segs):
        assert s[:l3] == orig[:l3]
        body = s[l4 + thl:]
        assert len(body) == min(mss, len(payload) - i * mss)
        if v6:
            plen, nh = struct.unpack_from("!HB", s, l3 + 4)
            assert plen == len(s) - l4 and nh == 6
            src, dst = s[l3 + 8 : l3 + 24], s[l3 + 24 : l3 + 40]
        else:
            tot, ident = struct.unpack_from("!HH", s, l3 + 2)
            assert tot == len(s) - l3 and ident == (id0 + i) & 0xFFFF
            assert ones_sum(s[l3 : l3 + 20]) == 0xFFFF  # header checksum right
            assert s[l3 + 6 : l3 + 10] == orig[l3 + 6 : l3 + 10]  # flags/TTL/proto kept
            src, dst = s[l3 + 12 : l3 + 16], s[l3 + 16 : l3 + 20]
        seq = struct.unpack_from("!I", s, l4 + 4)[0]
        assert seq == (seq0 + i * mss) & 0xFFFFFFFF
        f = s[l4 + 13]
        last = i == len(segs) - 1
        assert f & (FIN | PSH) == (oflags & (FIN | PSH) if last else 0)
        assert f & CWR == (oflags & CWR if i == 0 else 0)
        assert f & ~(FIN | PSH | CWR) & 0xFF == oflags & ~(FIN | PSH | CWR) & 0xFF
        assert s[l4 + 20 : l4 + thl] == orig[l4 + 20 : l4 + thl]  # options kept
        assert l4_ok(src, dst, 6, s[l4:])
        got += body
    assert got == payload


# --- checksum completion --------------------------------------------------------------

def partial(frame: bytes, l3: int, v6: bool, proto: int, csum_at: int) -> bytearray:
    """What a guest with CSUM sends: the pseudo-header sum (not inverted) in
    the checksum field, the rest to be summed by us."""
    f = bytearray(frame)
    l4 = l3 + (40 if v6 else 20)
    src, dst = (f[l3 + 8 : l3 + 24], f[l3 + 24 : l3 + 40]) if v6 else \
        (f[l3 + 12 : l3 + 16], f[l3 + 16 : l3 + 20])
    struct.pack_into("!H", f, l4 + csum_at, ones_sum(pseudo(bytes(src), bytes(dst), proto,
                                                             len(f) - l4)))
    return f


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 999, 1400, 1401])
def test_csum_complete_tcp_and_udp(v6, n):
    rnd = random.Random(n)
    data = rnd.randbytes(n)
    for proto, l4, off in ((6, tcp(data), 16), (17, struct.pack("!HHHH", 53, 53, 8 + n, 0)
                                                 + data, 6)):
        frame = eth(ipv6(l4, nh=proto), 0x86DD) if v6 else eth(ipv4(l4, proto=proto), 0x0800)
        f = partial(frame, 14, v6, proto, off)
        start = 14 + (40 if v6 else 20)
        buf = ffi.from_buffer(f)
        assert lib.gw_csum_complete(buf, len(f), start, off) == 0
        ip = f[14:]
        src, dst = (ip[8:24], ip[24:40]) if v6 else (ip[12:16], ip[16:20])
        assert l4_ok(bytes(src), bytes(dst), proto, bytes(f[start:]))
        assert f[start + off : start + off + 2] != b"\0\0"  # UDP: 0 would mean "none"
        assert f[:start + off] == partial(frame, 14, v6, proto, off)[:start + off]


def test_csum_complete_refuses_offsets_outside_the_frame():
    f = bytearray(partial(tcp_frame(b"x" * 100), 14, False, 6, 16))
    before = bytes(f)
    buf = ffi.from_buffer(f)
    n = len(f)
    for start, off in ((n, 0), (n - 1, 0), (n - 2, 1), (34, n), (0xFFFF, 0xFFFF), (n - 2, 0)):
        r = lib.gw_csum_complete(buf, n, start, off)
        if start + off + 2 <= n:
            assert r == 0
            f[:] = before
        else:
            assert r == -lib.GW_OFF_E_CSUM
            assert bytes(f) == before  # nothing written


# --- segmentation ------------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("plen,mss", [(65000, 1448), (60000, 1440), (1448, 1448),
                                      (1449, 1448), (3000, 1000), (0, 1448), (5000, 4000 - 54)])
def test_gso_segments_match_reference(v6, plen, mss):
    payload = random.Random(plen ^ mss).randbytes(plen)
    frame = tcp_frame(payload, v6=v6, flags=ACK | PSH | FIN | CWR, seq=0xFFFFF000)
    gso = lib.GW_NET_HDR_GSO_TCPV6 if v6 else lib.GW_NET_HDR_GSO_TCPV4
    segs = segment(frame, hdr(flags=1, gso_type=gso, hdr_len=74 if v6 else 54, gso_size=mss,
                              csum_start=54 if v6 else 34, csum_offset=16))
    assert isinstance(segs, list)
    check_segments(frame, segs, mss, v6)
    assert all(len(s) <= CAP for s in segs)


def test_gso_keeps_tcp_options_and_vlan_tag():
    opts = bytes([1, 1, 8, 10]) + bytes(range(8))  # NOP NOP timestamps
    payload = os.urandom(10000)
    frame = tcp_frame(payload, vlan=5, opts=opts)
    segs = segment(frame, hdr(gso_type=lib.GW_NET_HDR_GSO_TCPV4, gso_size=1448))
    check_segments(frame, segs, 1448, False, l3=18)


@pytest.mark.parametrize("case,why", [
    ("mss0", "GSO_SIZE"), ("too_many", "GSO_SIZE"), ("over_cap", "GSO_SIZE"),
    ("hdr_len", "HDR"), ("udp", "GSO_TYPE"), ("ecn", "GSO_TYPE"), ("unknown", "GSO_TYPE"),
    ("ip_options", "HDR"), ("ext_hdr", "HDR"), ("not_tcp", "HDR"), ("v4_as_v6", "HDR"),
    ("v6_as_v4", "HDR"), ("short_tcp", "HDR"), ("doff", "HDR"), ("fragment", "HDR"),
    ("arp", "HDR"), ("runt", "HDR"),
])
def test_gso_bad_headers_refused(case, why):
    payload = b"p" * 20000
    v4 = lib.GW_NET_HDR_GSO_TCPV4
    frame, kw = tcp_frame(payload), dict(gso_type=v4, gso_size=1448)
    if case == "mss0":
        kw["gso_size"] = 0
    elif case == "too_many":
        kw["gso_size"] = 20000 // (lib.GW_GSO_MAX_SEGS + 1)
    elif case == "over_cap":
        kw["gso_size"] = CAP
    elif case == "hdr_len":
        kw["hdr_len"] = len(frame) + 1
    elif case in ("udp", "ecn", "unknown"):
        kw["gso_type"] = {"udp": 3, "ecn": v4 | 0x80, "unknown": 9}[case]
    elif case == "ip_options":
        frame = eth(ipv4(tcp(payload), opts=b"\x01\x01\x01\x00"), 0x0800)
    elif case == "ext_hdr":
        frame, kw["gso_type"] = eth(ipv6(b"\x06\x00" + b"\0" * 6 + tcp(payload), nh=0),
                                    0x86DD), lib.GW_NET_HDR_GSO_TCPV6
    elif case == "not_tcp":
        frame = eth(ipv4(tcp(payload), proto=17), 0x0800)
    elif case == "v4_as_v6":
        kw["gso_type"] = lib.GW_NET_HDR_GSO_TCPV6
    elif case == "v6_as_v4":
        frame = tcp_frame(payload, v6=True)
    elif case == "short_tcp":
        frame = tcp_frame(b"")[:14 + 20 + 19]
    elif case == "doff":
        frame = bytearray(tcp_frame(payload))
        frame[14 + 20 + 12] = 4 << 4
        frame = bytes(frame)
    elif case == "fragment":
        frame = eth(ipv4(tcp(payload), frag=0x2000), 0x0800)
    elif case == "arp":
        frame = eth(b"\0" * 28, 0x0806)
    elif case == "runt":
        frame = frame[:13]
    assert segment(frame, hdr(**kw)) == -getattr(lib, f"GW_OFF_E_{why}")


def test_gso_random_headers_never_escape_the_buffers():
    """Random bytes in every header field: each answer is a refusal or
    segments that fit cap (ASan would see any stray access in the fuzz build)."""
    rnd = random.Random(7)
    base = tcp_frame(rnd.randbytes(3000))
    for _ in range(3000):
        f = bytearray(base[: rnd.randrange(0, len(base) + 1)])
        for _ in range(rnd.randrange(1, 6)):
            if f:
                f[rnd.randrange(min(len(f), 60))] = rnd.randrange(256)
        h = hdr(flags=rnd.randrange(4), gso_type=rnd.choice([1, 4, 3, 0x81]),
                hdr_len=rnd.randrange(0x10000), gso_size=rnd.randrange(0x10000),
                csum_start=rnd.randrange(0x10000), csum_offset=rnd.randrange(0x10000))
        r = segment(bytes(f), h, cap=2000)
        assert isinstance(r, list) or r < 0
        if isinstance(r, list):
            assert all(len(s) <= 2000 for s in r)


# --- receive verification --------------------------------------------------------------

def test_csum_verify():
    data = os.urandom(777)
    good = [tcp_frame(data), tcp_frame(data, v6=True), tcp_frame(data, vlan=3)]
    for v6 in (False, True):
        u = struct.pack("!HHHH", 53, 53, 8 + len(data), 0) + data
        f = eth(ipv6(u, nh=17), 0x86DD) if v6 else eth(ipv4(u, proto=17), 0x0800)
        good.append(bytes(partial(f, 14, v6, 17, 6)))
    fixed = []
    for f in good:
        f = bytearray(f)
        l3 = 18 if f[12:14] == b"\x81\x00" else 14
        l4 = l3 + (40 if f[l3] >> 4 == 6 else 20)
        proto = f[l3 + 6] if f[l3] >> 4 == 6 else f[l3 + 9]
        off = 16 if proto == 6 else 6
        if proto == 6:
            f = partial(bytes(f), l3, f[l3] >> 4 == 6, 6, off)
        assert lib.gw_csum_complete(ffi.from_buffer(f), len(f), l4, off) == 0
        fixed.append(bytes(f))
    for f in fixed:
        assert lib.gw_csum_verify(f, len(f)) == 1
        assert lib.gw_csum_verify(f + b"\0" * 20, len(f) + 20) == 1  # Ethernet padding
        bad = bytearray(f)
        bad[-1] ^= 0x40
        assert lib.gw_csum_verify(bytes(bad), len(bad)) == 0
        assert lib.gw_csum_verify(f[:-1], len(f) - 1) == 0  # truncated
    udp0 = eth(ipv4(struct.pack("!HHHH", 1, 2, 12, 0) + b"abcd", proto=17), 0x0800)
    frag = eth(ipv4(tcp(b"x"), frag=0x2000), 0x0800)
    icmp = eth(ipv4(b"\x08\0\0\0\0\0\0\0", proto=1), 0x0800)
    for f in (udp0, frag, icmp, b"", MAC):
        assert lib.gw_csum_verify(f, len(f)) == 0


# --- the TX ring hands GSO frames over ----------------------------------------------------

MEM = 1 << 20
RING_GPA, BUF_GPA, SLOT = 0x1000, 0x10000, 2048


class Ring:
    def __init__(self, size=64, **kw):
        self.map = mmap.mmap(-1, MEM)
        host = ffi.from_buffer("uint8_t[]", self.map)
        addr = int(ffi.cast("uintptr_t", host))
        self.mem = ffi.new("struct gw_mem *")
        self.mem.nregions = 1
        r = self.mem.regions[0]
        r.gpa, r.size, r.qva, r.host = 0, MEM, 0, host
        self.drv = DriverRing(self.map, RING_GPA, size, BUF_GPA, SLOT)
        d = self.drv
        self.vq = VirtQueue(mem=self.mem, size=size, desc=addr + d.desc_gpa,
                            avail=addr + d.avail_gpa, used=addr + d.used_gpa, **kw)
        self.big = ffi.new("uint8_t[]", 65536 + 256)
        self.hdrs = ffi.new("uint8_t[]", 12 * 8)
        n = self.vq.native
        n.big, n.big_cap, n.hdrs = self.big, 65536 + 256, self.hdrs

    def send(self, vhdr: bytes, frame: bytes) -> None:
        data = vhdr + frame
        self.drv.add_out([data[i : i + SLOT] for i in range(0, len(data), SLOT)])


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, start=0, off=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, start, off, 0)


def test_tx_burst_puts_one_gso_frame_per_burst_in_big():
    from gateway.virtio.ring import FrameBuffer

    r = Ring()
    small = tcp_frame(b"s" * 100)
    big1, big2 = tcp_frame(os.urandom(40000)), tcp_frame(os.urandom(50000), v6=True)
    r.send(vnet(), small)
    r.send(vnet(1, 1, 66, 1448, 34, 16), big1)
    r.send(vnet(1, 4, 86, 1448, 54, 16), big2)
    r.send(vnet(), os.urandom(6000))  # too big and not GSO: dropped as before
    r.send(vnet(), small)
    buf = FrameBuffer(8, CAP)
    n = r.vq.native
    assert r.vq.tx_burst(buf) == 2  # small, big1; then the burst stops
    assert n.big_slot == 1 and buf.lens[1] == len(big1)
    assert bytes(ffi.buffer(r.big, len(big1))) == big1
    assert buf.frame(0) == small
    assert bytes(ffi.buffer(r.hdrs, 12))[:10] == vnet()[:10]
    assert bytes(ffi.buffer(r.hdrs + 12, 12)) == vnet(1, 1, 66, 1448, 34, 16)
    h = ffi.new("struct gw_net_hdr *")
    lib.gw_net_hdr_decode(r.hdrs + 12, h)
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset) == \
        (1, 1, 66, 1448, 34, 16)
    assert r.vq.tx_burst(buf) == 1 and n.big_slot == 0
    assert bytes(ffi.buffer(r.big, len(big2))) == big2
    assert r.vq.tx_burst(buf) == 1 and n.big_slot == -1 and buf.frame(0) == small
    assert n.drop_too_big == 1
    assert len(r.drv.poll_used()) == 5  # every chain returned


def test_tx_burst_without_hdrs_or_big_drops_oversize_as_before():
    from gateway.virtio.ring import FrameBuffer

    r = Ring()
    r.vq.native.hdrs = ffi.NULL
    r.send(vnet(1, 1, 66, 1448, 34, 16), tcp_frame(os.urandom(40000)))
    buf = FrameBuffer(8, CAP)
    assert r.vq.tx_burst(buf) == 0 and r.vq.native.drop_too_big == 1
    r.vq.native.hdrs = r.hdrs
    r.send(vnet(1, 1, 66, 1448, 34, 16), os.urandom(70000))  # > big_cap
    assert r.vq.tx_burst(buf) == 0 and r.vq.native.drop_too_big == 2


def test_rx_burst_writes_the_flags_byte():
    from gateway.virtio.ring import FrameBuffer

    r = Ring()
    for _ in range(2):
        r.drv.add_in()
    buf = FrameBuffer(2, CAP)
    buf.put(0, b"a" * 60)
    buf.put(1, b"b" * 60)
    flags = ffi.new("uint8_t[]", [lib.GW_NET_HDR_F_DATA_VALID, 0])
    r.vq.native.rx_flags = flags
    assert r.vq.rx_burst(buf, 0, 2) == 2
    used = r.drv.poll_used()
    assert [r.drv.read_in(h, 12)[0] for h, _ in used] == [2, 0]
    assert r.drv.read_in(used[0][0], 72)[12:] == b"a" * 60


# --- bounded fuzzing --------------------------------------------------------------------

FUZZ_SECONDS = 10


def test_offload_fuzzer_bounded_run(tmp_path):
    """fuzz/offload_fuzz.c under libFuzzer + ASan + UBSan, seeded with valid
    GSO and partial-checksum frames so mutations start from deep paths."""
    from test_fuzz import bounded_run

    seeds = tmp_path / "seeds"
    seeds.mkdir()
    rnd = random.Random(3)
    for k, (v6, vlan, mss, plen) in enumerate([(False, None, 1448, 5000), (True, None, 1400, 3000),
                                               (False, 7, 500, 4000), (True, 7, 100, 700)]):
        frame = tcp_frame(rnd.randbytes(plen), v6=v6, vlan=vlan, flags=ACK | PSH | FIN | CWR)
        l4 = (18 if vlan else 14) + (40 if v6 else 20)
        h = struct.pack("<BBHHHHH", 1, 4 if v6 else 1, l4 + 20, mss, l4, 16, 0)
        (seeds / f"gso{k}").write_bytes(h + struct.pack("<H", 2000) + frame)
        h = struct.pack("<BBHHHHH", 1, 0, 0, 0, l4, 16, 0)
        (seeds / f"csum{k}").write_bytes(h + struct.pack("<H", 2000) + frame[: l4 + 20 + 33])
    bounded_run(tmp_path, "fuzz-offload-ci", FUZZ_SECONDS, f"SEEDS={seeds}")
