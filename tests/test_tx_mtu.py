"""The device's MTU holds on what its guest sends (issue 12), through the AF_XDP
datapath with the Python test guest: a frame longer than the device's MTU plus
its Ethernet header is dropped and counted (tx_over_mtu), however much room the
UMEM frame has; a GSO frame whose segments would be longer is dropped the same
way, and one whose segments fit is cut into segments of at most that length.
The device's MTU (1000) is below the wire's (1500), so only the gateway can have
stopped what the far host does not see. On a VLAN the limit is the same: the
tag the gateway adds is not the guest's to count."""

from __future__ import annotations

import os
import struct

import pytest
from test_offload import check_segments, ipv4, tcp
from test_offload_wire import capture, captured, vnet

from gateway.testing.guestnet import mac_bytes
from gateway.testing.wired import wired_guest

MAC = "52:54:00:aa:00:0d"
MTU = 1000
MAX_FRAME = MTU + 14
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else sends it


@pytest.fixture(params=[0, 100], ids=["untagged", "vlan100"])
def guest(request, tmp_path):
    with wired_guest(str(tmp_path), MAC, mtu=MTU, vlan=request.param) as (topo, port, dev, fe):
        assert port.max_frame == MAX_FRAME
        yield topo, port, dev, fe


def eth(topo, ethertype: int) -> bytes:
    return mac_bytes(topo.peer_mac) + mac_bytes(MAC) + struct.pack("!H", ethertype)


def test_frames_over_the_device_mtu_are_dropped_and_counted(guest):
    topo, port, dev, fe = guest
    lengths = [60, MAX_FRAME, MAX_FRAME + 1, 1514, 3000, MAX_FRAME - 1]
    frames = [eth(topo, ETHERTYPE) + b"%08d" % i + os.urandom(n - 22)
              for i, n in enumerate(lengths)]
    fits = [f for f in frames if len(f) <= MAX_FRAME]
    cap = capture(topo, ETHERTYPE, len(fits))
    try:
        fe.transmit(frames)  # one burst, in order: a frame let through shows before the last
        fe.wait_tx_done(len(frames))
        got = captured(cap)
    finally:
        cap.kill()
    assert got == fits
    s = port.stats()
    assert s["tx_over_mtu"] == len(frames) - len(fits) == 3
    assert dev.stats()["drops"]["tx_too_big"] == 0  # the UMEM frame had room for all


def test_gso_segments_are_no_longer_than_the_device_mtu(guest):
    topo, port, dev, fe = guest
    frame = eth(topo, 0x0800) + ipv4(tcp(os.urandom(5000)))
    mss = MAX_FRAME - 54  # Ethernet, IPv4 and TCP headers: 54 bytes
    nsegs = -(-5000 // mss)
    cap = capture(topo, 0x0800, nsegs)
    try:
        for m in (mss + 1, 1448, mss):  # one byte over, the wire's MSS, one that fits
            fe.transmit([frame], vnet_hdr=vnet(1, 1, 54, m, 34, 16))
        fe.wait_tx_done(3)
        segs = captured(cap)
    finally:
        cap.kill()
    check_segments(frame, segs, mss, False)
    assert max(len(x) for x in segs) == MAX_FRAME
    assert port.stats()["tx_over_mtu"] == 2
    s = dev.stats()
    assert (s["offload"]["tx_gso"], s["offload"]["tx_gso_segs"]) == (1, nsegs)
    assert s["drops"]["tx_bad_gso"] == 0
