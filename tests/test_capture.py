"""`gateway capture`: a device's frames as its guest sees them, in pcap, read
back with tcpdump and tshark; the capture rings' C code on its own; a
capture that cannot keep up, a reader that dies, a device detached under a
capture, two captures at once."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from gateway._native import ffi, lib
from test_offload import ACK, PSH, check_segments, ipv4, tcp

from gateway.api import GatewayError
from gateway.capture import (
    HEADER,
    MAX_BUFFER_KIB,
    MAX_TOTAL,
    CaptureError,
    Captures,
    Layout,
    Rings,
)
from gateway.capture_reader import PCAP_MAGIC_NS, CaptureFailed, _Conn, _Rings
from gateway.control import request
from gateway.testing import testpmd as tp
from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.testing.wait import until

ETH_TEST = 0x88B5  # IEEE local experimental: nobody else on the wire sends it

FAR_SENDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for line in sys.stdin:
    s.send(bytes.fromhex(line.strip()))
print("sent", flush=True)
"""


def mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def frame(dst: str, src: str, i: int, size: int | None = None) -> bytes:
    body = struct.pack("!I", i) + bytes([i % 251]) * ((size or 60 + i % 1400) - 18)
    return mac(dst) + mac(src) + struct.pack("!H", ETH_TEST) + body


def read_pcap(path) -> list[tuple[int, bytes]]:
    """(timestamp ns, frame) records of a nanosecond pcap, checked as we go."""
    data = open(path, "rb").read()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (PCAP_MAGIC_NS, 2, 4, 1)
    out, off = [], 24
    while off < len(data):
        sec, nsec, caplen, origlen = struct.unpack_from("<IIII", data, off)
        assert nsec < 10**9 and caplen <= min(origlen, snaplen)
        out.append((sec * 10**9 + nsec, data[off + 16: off + 16 + caplen]))
        off += 16 + caplen
    assert off == len(data)
    return out


def tcpdump(path, expr: str) -> list[str]:
    r = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(path), expr], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return [x for x in r.stdout.splitlines() if not x[:1].isspace()]  # not hex dumps


class Cap:
    """A `gateway capture` process of the test's, started and waited for."""

    def __init__(self, d, name: str, *args: str, stdout=None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "capture", name, "--run-dir", d.run_dir,
             *args], stdout=stdout, stderr=subprocess.PIPE)
        self.first = self.proc.stderr.readline().decode()  # says it captures, or why not
        assert "capturing on" in self.first, self.first + self.proc.stderr.read().decode()

    def end(self, sig: int | None = signal.SIGINT) -> tuple[int, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        self.out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def counts(err: str) -> tuple[int, int]:
    """(captured, dropped) from the summary line."""
    line = next(x for x in err.splitlines() if "packets captured" in x)
    words = line.split()
    return int(words[0]), int(words[3])


def wait_for(cond, what: str, timeout: float = TIMEOUT):
    return until(cond, what, timeout)


def device(d, name: str) -> dict:
    return next(x for x in request(d.run_dir, "list") if x["name"] == name)


def lines(stream, n: int) -> list[str]:
    """The next n summary lines tcpdump prints (its hex dumps skipped)."""
    out = []
    while len(out) < n:
        x = stream.readline()
        assert x, "tcpdump ended"
        if not x[:1].isspace():
            out.append(x)
    return out


def receive(fe, n: int) -> list[bytes]:
    """The guest's next n test frames (whatever else the far host sends skipped)."""
    got: list[bytes] = []
    while len(got) < n:
        got += [f for f in fe.receive(1) if f[12:14] == b"\x88\xb5"]
    return got


def far_send(topo, frames: list[bytes]) -> None:
    r = topo.run(sys.executable, "-c", FAR_SENDER, topo.peer,
                 input="".join(f.hex() + "\n" for f in frames))
    assert r.stdout.strip() == "sent", r.stderr


@contextlib.contextmanager
def guest(d, topo, name: str, *attach_args: str):
    dev = json.loads(d.ok("attach", name, topo.nic, "--json", *attach_args))
    with Frontend(dev["socket"], queue_size=1024, mem_size=32 << 20) as fe:
        fe.connect().setup()
        wait_for(lambda: device(d, name)["state"] == "running", f"{name} running")
        yield dev, fe


# -- the rings alone ---------------------------------------------------------------

def test_ring_wraps_keeps_order_and_refuses_a_lying_tail():
    rings = Rings(Layout(1, lib.GW_CAP_MIN_RING), snaplen=1000, dirs=lib.GW_CAP_RX)
    view = _Rings(rings.fd, {"rings": 1, "ring_size": lib.GW_CAP_MIN_RING,
                             "stride": HEADER + lib.GW_CAP_MIN_RING, "header": HEADER})
    cap = rings.caps[0]
    try:
        frames = [bytes([i % 256]) * (14 + i * 7 % 1500) for i in range(1200)]
        got = []
        for k in range(0, 1200, 40):  # 40 per read: the ring wraps many times
            for i in range(k, k + 40):
                lib.gw_cap_put(cap, lib.GW_CAP_RX, frames[i], len(frames[i]), i + 1)
                lib.gw_cap_put(cap, lib.GW_CAP_TX, b"x" * 60, 60, 0)  # not asked for
            data, n = view.take(1 << 30)
            data = bytes(data)  # a view of the reader's buffer, reused by the next take
            assert n == 40
            off = 0
            for _ in range(n):
                _, nsec, caplen, origlen = struct.unpack_from("<IIII", data, off)
                got.append((nsec, origlen, data[off + 16: off + 16 + caplen]))
                off += 16 + caplen
        assert [g[0] for g in got] == list(range(1, 1201))  # in order, own timestamps
        assert [g[1] for g in got] == [len(f) for f in frames]
        assert [g[2] for g in got] == [f[:1000] for f in frames]  # snaplen held
        assert cap.dropped == 0 and cap.frames == 1200
        # nobody reading: what does not fit is dropped and counted, never waited for
        for i in range(1000):
            lib.gw_cap_put(cap, lib.GW_CAP_RX, frames[i], len(frames[i]), 0)
        assert 0 < cap.frames - 1200 < 1000 and cap.frames - 1200 + cap.dropped == 1000
        assert view.dropped() == cap.dropped
        # a reader that writes a tail we never gave it only stops its own capture
        data, n = view.take(1 << 30)  # room again
        snapshot = bytes(ffi.buffer(cap.data, cap.size))
        for lie in (cap.head + 64, cap.head - cap.size - 64, 2**64 - 1):
            cap.sh.tail = lie
            before = cap.dropped
            lib.gw_cap_put(cap, lib.GW_CAP_RX, b"y" * 100, 100, 0)
            assert cap.dropped == before + 1
        assert bytes(ffi.buffer(cap.data, cap.size)) == snapshot
        # and the reader checks what it reads: a record no producer writes stops it
        cap.sh.tail = view.views[0].tail
        lib.gw_cap_put(cap, lib.GW_CAP_RX, b"z" * 100, 100, 0)
        rec = ffi.cast("struct gw_cap_rec *", cap.data + (view.views[0].tail & (cap.size - 1)))
        rec.reclen = 40  # not a multiple of 32
        with pytest.raises(CaptureFailed, match="never writes"):
            view.take(10)
    finally:
        view.close()
        rings.close()


def test_rings_of_two_queue_pairs_merge_by_timestamp():
    rings = Rings(Layout(2, lib.GW_CAP_MIN_RING), snaplen=100, dirs=lib.GW_CAP_TX)
    view = _Rings(rings.fd, {"rings": 2, "ring_size": lib.GW_CAP_MIN_RING,
                             "stride": HEADER + lib.GW_CAP_MIN_RING, "header": HEADER})
    try:
        for ts in (1, 3, 4, 9):
            lib.gw_cap_put(rings.caps[0], lib.GW_CAP_TX, bytes([ts]) * 20, 20, ts)
        for ts in (2, 5, 6, 7, 8):
            lib.gw_cap_put(rings.caps[1], lib.GW_CAP_TX, bytes([ts]) * 30, 30, ts)
        data, n = view.take(7)  # -c: stops where asked, the rest stays
        data = bytes(data)  # a view of the reader's buffer, reused by the next take
        got = []
        while n:
            off = 0
            for _ in range(n):
                _, nsec, caplen, _ = struct.unpack_from("<IIII", data, off)
                got.append((nsec, data[off + 16: off + 16 + caplen]))
                off += 16 + caplen
            data, n = view.take(100)
            data = bytes(data)
        assert [t for t, _ in got] == list(range(1, 10))
        assert all(f == bytes([t]) * (20 if t in (1, 3, 4, 9) else 30) for t, f in got)
    finally:
        view.close()
        rings.close()


class FakePort:
    queue_pairs = 2

    def __init__(self) -> None:
        self.hooked = None

    def set_capture(self, rings, wait: float = 1.0) -> bool:
        self.hooked = rings
        return True


def test_pcap_written_straight_from_two_rings_in_order_and_a_gone_reader(tmp_path):
    """gw_cap_write: the pcap records come out of the rings themselves (no copy
    of ours), merged by timestamp, more than one writev's worth; the tails move
    only past what was written; a pipe whose reader left is EPIPE."""
    rings = Rings(Layout(2, lib.GW_CAP_MIN_RING), snaplen=100, dirs=lib.GW_CAP_TX)
    view = _Rings(rings.fd, {"rings": 2, "ring_size": lib.GW_CAP_MIN_RING,
                             "stride": HEADER + lib.GW_CAP_MIN_RING, "header": HEADER})
    n = lib.GW_CAP_IOV + 44  # two writev calls
    frames = {ts: bytes([ts % 256]) * (20 + ts % 150) for ts in range(1, n + 1)}
    try:
        for ts in range(1, n + 1):
            lib.gw_cap_put(rings.caps[ts % 2], lib.GW_CAP_TX, frames[ts], len(frames[ts]),
                           ts * 1_000_000_007)  # seconds and nanoseconds both move
        out = tmp_path / "out.pcap"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT)
        try:
            assert view.write(fd, n - 10) == n - 10  # -c: stops where asked
            assert view.write(fd, 100) == 10
            assert view.write(fd, 100) == 0
        finally:
            os.close(fd)
        data, off, got = out.read_bytes(), 0, []
        while off < len(data):
            sec, nsec, caplen, origlen = struct.unpack_from("<IIII", data, off)
            got.append((sec * 10**9 + nsec, data[off + 16: off + 16 + caplen], origlen))
            off += 16 + caplen
        assert [t for t, _, _ in got] == [ts * 1_000_000_007 for ts in range(1, n + 1)]
        assert all(f == frames[t // 1_000_000_007][:100] and o == len(frames[t // 1_000_000_007])
                   for t, f, o in got)  # snaplen 100
        assert all(c.sh.tail == c.sh.head for c in rings.caps)  # all room given back
        # the reader of a pipe went away: EPIPE
        lib.gw_cap_put(rings.caps[0], lib.GW_CAP_TX, b"p" * 60, 60, 0)
        r, w = os.pipe()
        os.close(r)
        try:
            with pytest.raises(BrokenPipeError):
                view.write(w, 100)
        finally:
            os.close(w)
    finally:
        view.close()
        rings.close()


def test_captures_together_hold_a_bounded_amount_of_memory():
    assert Captures().max_total == MAX_TOTAL == 512 << 20 >= 2 * MAX_BUFFER_KIB * 1024
    # the same rule at a smaller scale (rings are populated when they are made)
    caps, ports = Captures(max_total=1 << 20), [FakePort() for _ in range(3)]
    big = {"direction": "both", "snaplen": 100, "buffer_kib": 512, "pid": 1,
           "on_end": lambda reason: None}
    a = caps.start("a", ports[0], **big)
    b = caps.start("b", ports[1], **big)
    assert len(ports[0].hooked) == 2 and a.rings.layout.size == 256 * 1024
    with pytest.raises(CaptureError, match="would hold 1536 KiB, over the daemon's 1024 KiB"):
        caps.start("c", ports[2], **big)
    assert ports[2].hooked is None and set(caps.by_device) == {"a", "b"}
    assert caps.stop(a, "test") == (0, 0) and ports[0].hooked is None
    c = caps.start("c", ports[2], **big)  # room again
    for cap in (b, c):
        caps.stop(cap, "test")
    assert caps.by_device == {}


# -- through the daemon --------------------------------------------------------------

def test_frames_both_ways_read_back_by_tcpdump_and_tshark(env, tmp_path):
    topo, d = env
    pcap = tmp_path / "vm0.pcap"
    with guest(d, topo, "vm0") as (dev, fe):
        cap = Cap(d, "vm0", "-w", str(pcap))
        assert device(d, "vm0")["capture"]["pid"] == cap.proc.pid
        listed = subprocess.run([sys.executable, "-m", "gateway.cli", "list", "--run-dir",
                                 d.run_dir], capture_output=True, text=True, timeout=TIMEOUT)
        assert f"  capture by pid {cap.proc.pid}: both, 4096 KiB buffer" in listed.stdout
        out = [frame(topo.peer_mac, dev["mac"], i) for i in range(300)]
        into = [frame(dev["mac"], topo.peer_mac, 1000 + i) for i in range(200)]
        # broadcasts reach the guest another way (the flood tap and the inbox)
        into[50:60] = [frame("ff:ff:ff:ff:ff:ff", topo.peer_mac, 2000 + i) for i in range(10)]
        fe.post_rx(400)
        fe.transmit(out[:150])
        fe.wait_tx_done(150)
        far_send(topo, into[:50])
        assert receive(fe, 50) == into[:50]
        far_send(topo, into[50:60])
        assert receive(fe, 10) == into[50:60]
        far_send(topo, into[60:])
        got = into[:60] + receive(fe, 140)
        fe.transmit(out[150:])
        fe.wait_tx_done(150)
        rc, err = cap.end()
    assert rc == 0, err
    assert got == into
    recs = read_pcap(pcap)
    captured, dropped = counts(err)
    assert (captured, dropped) == (len(recs), 0)
    ours = [f for _, f in recs if f[12:14] == b"\x88\xb5"]
    # every frame, whole, in the order each direction moved them
    assert [f for f in ours if f[6:12] == mac(dev["mac"])] == out
    assert [f for f in ours if f[:6] == mac(dev["mac"]) or f[0] == 0xFF] == into
    assert len(ours) == 500
    ts = [t for t, _ in recs]
    assert ts == sorted(ts) and abs(ts[0] / 1e9 - time.time()) < 600
    # tcpdump reads it: direction by MAC, lengths
    sent = tcpdump(pcap, f"ether src {dev['mac']} and ether proto {ETH_TEST:#x}")
    recv = tcpdump(pcap, f"ether dst {dev['mac']} and ether proto {ETH_TEST:#x}")
    bcast = tcpdump(pcap, f"ether broadcast and ether proto {ETH_TEST:#x}")
    assert len(sent) == 300 and len(recv) == 190 and len(bcast) == 10
    assert [int(x.split("length ")[1].split(":")[0]) for x in sent] == [len(f) for f in out]
    r = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len", "-e",
                        "eth.type"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    rows = [x.split("\t") for x in r.stdout.splitlines()]
    assert len(rows) == len(recs)
    assert [int(n) for n, t in rows if t == "0x88b5"] == [len(f) for f in ours]
    assert device(d, "vm0")["capture"] is None  # unhooked when it ended


def test_vlan_device_frames_captured_untagged_live_through_tcpdump(env, tmp_path):
    topo, d = env
    with guest(d, topo, "vm100", "--vlan", "100") as (dev, fe):
        cap = Cap(d, "vm100", "-w", "-", stdout=subprocess.PIPE)
        live = subprocess.Popen(["tcpdump", "-l", "-nn", "-e", "-r", "-"], stdin=cap.proc.stdout,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        cap.proc.stdout.close()
        try:
            out = [frame(topo.peer_mac, dev["mac"], i) for i in range(20)]
            fe.transmit(out)
            fe.wait_tx_done(20)
            # tcpdump prints them while the capture still runs
            seen = lines(live.stdout, 20)
            assert cap.proc.poll() is None
            assert all(f"{dev['mac']} > {topo.peer_mac}, ethertype Unknown (0x88b5)" in x
                       and "802.1Q" not in x for x in seen), seen
            into = [frame(dev["mac"], topo.peer_mac, 100 + i) for i in range(10)]
            fe.post_rx(64)
            far_send(topo, [f[:12] + struct.pack("!HH", 0x8100, 100) + f[12:] for f in into])
            assert receive(fe, 10) == into
            rc, err = cap.end()
            assert rc == 0, err
            rest, _ = live.communicate(timeout=TIMEOUT)
        finally:
            live.kill()
            live.wait()
    assert live.returncode == 0
    far = [x for x in rest.splitlines() if f"{topo.peer_mac} > {dev['mac']}" in x]
    assert len(far) == 10 and not any("802.1Q" in x for x in far)


def test_gso_frame_captured_as_the_segments_that_leave(env, tmp_path):
    topo, d = env
    pcap = tmp_path / "gso.pcap"
    with guest(d, topo, "vm0") as (dev, fe):
        cap = Cap(d, "vm0", "-w", str(pcap), "--direction", "tx")
        payload = os.urandom(20000)
        gso = (mac(topo.peer_mac) + mac(dev["mac"]) + b"\x08\x00"
               + ipv4(tcp(payload, flags=ACK | PSH)))
        # virtio-net header: NEEDS_CSUM, GSO TCPv4, 54 header bytes, MSS 1448, csum at 34+16
        fe.transmit([gso], vnet_hdr=struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0))
        fe.wait_tx_done(1)
        rc, err = cap.end()
    assert rc == 0, err
    segs = [f for _, f in read_pcap(pcap)]
    assert len(segs) == -(-len(payload) // 1448) == counts(err)[0]
    check_segments(gso, segs, 1448, False)  # each one as it went to the wire


def test_capture_that_cannot_keep_up_drops_and_counts_the_datapath_does_not_wait(env, tmp_path):
    topo, d = env
    pcap = tmp_path / "full.pcap"
    n = 20_000
    with guest(d, topo, "vm0") as (dev, fe):
        before = topo.peer_stats()["rx_packets"]
        cap = Cap(d, "vm0", "-w", str(pcap), "--direction", "tx", "-B", "64")
        cap.proc.send_signal(signal.SIGSTOP)  # the reader reads nothing for a while
        try:
            frames = [frame(topo.peer_mac, dev["mac"], i, 1000) for i in range(n)]
            fe.post_rx(1000)
            for i in range(0, n, 500):
                fe.transmit(frames[i:i + 500])
                fe.wait_tx_done(500)
            far_send(topo, [frame(dev["mac"], topo.peer_mac, i) for i in range(50)])
            # every frame still reached the wire
            wait_for(lambda: topo.peer_stats()["rx_packets"] - before >= n, "frames on the wire")
        finally:
            cap.proc.send_signal(signal.SIGCONT)
        rc, err = cap.end()
        stats = json.loads(d.ok("stats", "vm0", "--json"))["devices"]["vm0"]
    assert rc == 0, err
    assert topo.peer_stats()["rx_packets"] - before == n
    assert stats["tx_packets"] == n
    captured, dropped = counts(err)
    recs = read_pcap(pcap)
    assert captured == len(recs) and captured + dropped == n  # tx only: the far frames are not
    # a 64 KiB ring holds 62 records of 32 + 1024 bytes (1000 rounded up to 32)
    assert captured == 64 * 1024 // (32 + 1024) and dropped == n - captured
    assert [f for _, f in recs] == frames[:captured]  # the first ones, before it filled


def test_reader_killed_then_broken_pipe_then_detach_end_captures(env, tmp_path):
    topo, d = env
    with guest(d, topo, "vm0") as (dev, fe):
        out = [frame(topo.peer_mac, dev["mac"], i) for i in range(100)]
        # SIGKILL: the daemon sees the connection close and unhooks
        cap = Cap(d, "vm0", "-w", str(tmp_path / "killed.pcap"))
        fe.transmit(out[:50])
        fe.wait_tx_done(50)
        cap.kill()
        wait_for(lambda: device(d, "vm0")["capture"] is None, "the capture unhooked")
        before = topo.peer_stats()["rx_packets"]
        fe.transmit(out[50:])
        fe.wait_tx_done(50)
        wait_for(lambda: topo.peer_stats()["rx_packets"] - before >= 50, "frames still forwarded")
        # the reader of a pipe goes away (| head): the capture exits quietly
        cap = Cap(d, "vm0", "-w", "-", stdout=subprocess.PIPE)
        assert len(cap.proc.stdout.read(24)) == 24  # the pcap header
        cap.proc.stdout.close()
        deadline = time.monotonic() + TIMEOUT
        while cap.proc.poll() is None and time.monotonic() < deadline:
            fe.transmit(out[:10])  # it notices at its next write
            fe.wait_tx_done(10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                cap.proc.wait(0.05)
        rc, err = cap.end(None)
        assert (rc, err) == (0, "")
        wait_for(lambda: device(d, "vm0")["capture"] is None, "the capture unhooked")
        # a second capture of a device is refused while one runs; detach ends it
        cap = Cap(d, "vm0", "-w", str(tmp_path / "rx.pcap"), "--direction", "rx")
        r = d.cli("capture", "vm0", "-w", str(tmp_path / "second.pcap"))
        assert r.returncode == 2 and "already being captured" in r.stderr
        fe.transmit(out[:20])  # tx: not asked for
        fe.wait_tx_done(20)
        fe.post_rx(64)
        into = [frame(dev["mac"], topo.peer_mac, i) for i in range(30)]
        far_send(topo, into)
        assert receive(fe, 30) == into
        d.ok("detach", "vm0")
        rc, err = cap.end(None)
    assert rc == 1 and "capture ended: vm0 was detached" in err, err
    recs = [f for _, f in read_pcap(tmp_path / "rx.pcap")]
    assert [f for f in recs if f[12:14] == b"\x88\xb5"] == into
    assert counts(err) == (len(recs), 0)
    assert d.proc.poll() is None


def test_captures_started_and_ended_200_times_under_traffic_leave_nothing(env):
    """Hooking and unhooking race the worker's bursts: the daemon lives, every
    frame is forwarded, and no memfd, mapping or hook is left."""
    topo, d = env
    with guest(d, topo, "vm0") as (dev, fe):
        pid = d.proc.pid

        def held() -> tuple[int, int]:
            fds = sum("gateway-capture" in os.readlink(f"/proc/{pid}/fd/{f}")
                      for f in os.listdir(f"/proc/{pid}/fd"))
            maps = open(f"/proc/{pid}/maps").read().count("gateway-capture")
            return fds, maps

        sent, stop = [0], threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                fe.transmit([frame(topo.peer_mac, dev["mac"], i) for i in range(64)])
                fe.wait_tx_done(64)
                sent[0] += 64

        before = topo.peer_stats()["rx_packets"]
        t = threading.Thread(target=traffic)
        t.start()
        try:
            for i in range(200):
                conn = _Conn(os.path.join(d.run_dir, "gateway.sock"))
                conn.send({"cmd": "capture", "args": {"name": "vm0", "buffer_kib": 64}})
                reply, fds = conn.line_with_fds(TIMEOUT)
                assert reply["ok"] and len(fds) == 1, reply
                os.close(fds[0])
                if i % 2:  # half end with "stop" and its answer, half by closing
                    conn.send({"cmd": "stop"})
                    reply, _ = conn.line_with_fds(TIMEOUT)
                    assert reply["ok"] and reply["result"]["frames"] >= 0
                conn.close()
                # closing is noticed by the daemon's loop, not answered: await it,
                # or the next request may come first and find vm0 still captured
                wait_for(lambda: device(d, "vm0")["capture"] is None, "unhooked")
        finally:
            stop.set()
            t.join()
        wait_for(lambda: device(d, "vm0")["capture"] is None, "the last capture unhooked")
        wait_for(lambda: topo.peer_stats()["rx_packets"] - before >= sent[0], "every frame")
        assert topo.peer_stats()["rx_packets"] - before == sent[0] > 0
        assert held() == (0, 0)
    assert d.proc.poll() is None


def test_two_queue_pairs_captured_into_one_stream(tmp_path):
    with topology(queues=2) as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            dev = json.loads(d.ok("attach", "vm0", topo.nic, "--queues", "2", "--json"))
            with Frontend(dev["socket"], queue_pairs=2, queue_size=256, mem_size=32 << 20) as fe:
                fe.connect().setup()
                wait_for(lambda: device(d, "vm0")["state"] == "running", "vm0 running")
                pcap = tmp_path / "mq.pcap"
                cap = Cap(d, "vm0", "-w", str(pcap), "--direction", "tx")
                sent = {qp: [frame(topo.peer_mac, dev["mac"], 100 * qp + i) for i in range(50)]
                        for qp in (0, 1)}
                for k in range(0, 50, 10):  # interleaved: each pair's in its own order
                    for qp in (0, 1):
                        fe.transmit(sent[qp][k:k + 10], qp=qp)
                        fe.wait_tx_done(10, qp=qp)
                rc, err = cap.end()
        finally:
            d.stop()
    assert rc == 0, err
    recs = read_pcap(pcap)
    assert counts(err) == (100, 0) and len(recs) == 100
    frames = [f for _, f in recs]
    for qp in (0, 1):
        assert [f for f in frames if f in sent[qp]] == sent[qp]
    assert [t for t, _ in recs] == sorted(t for t, _ in recs)


def test_two_captures_on_two_devices_printed_pcapng_and_refusals(env, tmp_path):
    topo, d = env
    with guest(d, topo, "vm0") as (dev0, fe0), guest(d, topo, "vm1") as (dev1, fe1):
        caps = [Cap(d, n, "-w", str(tmp_path / f"{n}.pcap"), "-c", "40", "--direction", "tx")
                for n in ("vm0", "vm1")]
        sent = {}
        for (dev, fe), name in (((dev0, fe0), "vm0"), ((dev1, fe1), "vm1")):
            sent[name] = [frame(topo.peer_mac, dev["mac"], i) for i in range(60)]
            fe.transmit(sent[name])
            fe.wait_tx_done(60)
        for name, cap in zip(("vm0", "vm1"), caps, strict=True):
            rc, err = cap.end(None)  # -c 40: each ends by itself
            assert rc == 0, err
            assert counts(err)[0] == 40
            assert [f for _, f in read_pcap(tmp_path / f"{name}.pcap")] == sent[name][:40]
        # without -w, tcpdump prints them
        cap = Cap(d, "vm1", "-c", "3", "--direction", "tx", stdout=subprocess.PIPE)
        fe1.transmit(sent["vm1"][:5])
        fe1.wait_tx_done(5)
        rc, err = cap.end(None)
        printed = [x for x in cap.out.decode().splitlines() if not x[:1].isspace()]
        assert rc == 0 and counts(err) == (3, 0), err
        assert len(printed) == 3 and all(f"{dev1['mac']} > {topo.peer_mac}" in x
                                         for x in printed), printed
        # pcapng: each frame says its direction
        ng = tmp_path / "vm0.pcapng"
        cap = Cap(d, "vm0", "-w", str(ng), "--pcapng")
        fe0.transmit(sent["vm0"][:5])
        fe0.wait_tx_done(5)
        fe0.post_rx(64)
        into = [frame(dev0["mac"], topo.peer_mac, 500 + i) for i in range(4)]
        far_send(topo, into)
        assert receive(fe0, 4) == into
        rc, err = cap.end()
        assert rc == 0, err
        r = subprocess.run(["tshark", "-r", str(ng), "-Y", f"eth.type == {ETH_TEST:#x}", "-T",
                            "fields", "-e", "frame.packet_flags_direction", "-e", "eth.src",
                            "-e", "frame.len"], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        rows = [x.split("\t") for x in r.stdout.splitlines()]
        out_dir = [(dev0["mac"], str(len(f))) for f in sent["vm0"][:5]]
        assert [(s, n) for dr, s, n in rows if int(dr, 0) == 2] == out_dir, rows  # outbound
        assert [(s, n) for dr, s, n in rows if int(dr, 0) == 1] == [  # inbound
            (topo.peer_mac, str(len(f))) for f in into], rows
        assert len(tcpdump(ng, f"ether proto {ETH_TEST:#x}")) == 9  # tcpdump reads it too
    for args, msg in ((("nope",), "no device named nope"),
                      (("vm0", "-c", "0"), "-c 0"),
                      (("vm0", "-s", "0"), "-s 0"),
                      (("vm0", "-B", "1"), "-B 1")):
        r = d.cli("capture", *args, "-w", str(tmp_path / "x.pcap"))
        assert r.returncode == 2 and r.stderr.startswith("gateway: ") and msg in r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
    r = d.cli("capture", "vm0", "--direction", "up", "-w", str(tmp_path / "x.pcap"))
    assert r.returncode == 2 and "'up' is not one of 'rx', 'tx', 'both'" in r.stderr
    # the same numbers straight on the control socket are checked by the daemon
    for args, msg in (({"snaplen": "x"}, "snaplen 'x' is outside 1..65535"),
                      ({"buffer_kib": True}, "buffer size (KiB) True is outside"),
                      ({"buffer_kib": 1 << 40}, "is outside 64..262144"),
                      ({"direction": ["rx"]}, "bad direction"),
                      ({"ring": 1}, "unknown capture arguments: ring")):
        with pytest.raises(GatewayError, match=re.escape(msg)):
            request(d.run_dir, "capture", name="vm0", **args)
    conn = _Conn(os.path.join(d.run_dir, "gateway.sock"))  # after another request: refused,
    try:  # its fd would otherwise overtake that reply
        conn.send({"cmd": "list"})
        assert conn.line_with_fds(TIMEOUT)[0]["ok"]
        conn.send({"cmd": "capture", "args": {"name": "vm0"}})
        reply, fds = conn.line_with_fds(TIMEOUT)
        assert fds == [] and reply == {"ok": False, "error": "capture needs a connection of "
                                                             "its own: send it first"}
    finally:
        conn.close()
    assert device(d, "vm0")["capture"] is None
    # the daemon stopping ends a capture too, and is not held up by it
    cap = Cap(d, "vm1", "-w", str(tmp_path / "last.pcap"))
    assert d.stop() == 0
    rc, err = cap.end(None)
    assert rc == 1 and "capture ended: the daemon is stopping" in err, err
    assert not os.path.exists(tmp_path / "x.pcap")  # a refusal leaves nothing


@pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed")
@pytest.mark.dpdk
def test_capture_benchmark_runs_and_the_capture_sees_frames():
    """benchmarks/capture_bench.py returns both figures; no timing is asserted."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    import capture_bench

    lines: list[str] = []
    (r,) = capture_bench.measure([64], runs=1, seconds=0.5, echo=lines.append)
    assert r["without_mpps"] > 0 and r["with_mpps"] > 0 and len(lines) == 1
    assert 0 <= r["capture_dropped_share"] <= 1
