"""Just enough of an IP host on top of the Python front-end: ARP and ping.

`GuestHost` runs a thread that keeps RX buffers posted, answers ARP requests
and ICMP echo requests for its address, and queues every other frame for the
test. Frame builders and parsers are plain functions over bytes.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading

from gateway.testing.frontend import Frontend, FrontendError

BCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp(op: int, src_mac: bytes, src_ip: str, dst_mac: bytes, dst_ip: str) -> bytes:
    eth_dst = BCAST if op == 1 else dst_mac
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + src_mac + socket.inet_aton(src_ip) \
        + (b"\0" * 6 if op == 1 else dst_mac) + socket.inet_aton(dst_ip)
    return eth_dst + src_mac + b"\x08\x06" + body


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """A UDP datagram with its checksum (over the IPv4 pseudo-header) filled in."""
    dgram = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17,
                                                                          len(dgram))
    return dgram[:6] + struct.pack("!H", csum(pseudo + dgram) or 0xFFFF) + dgram[8:]


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def parse_arp(f: bytes) -> tuple[int, bytes, str, str] | None:
    """(op, sender MAC, sender IP, target IP) of an ARP frame, else None."""
    if len(f) < 42 or f[12:14] != b"\x08\x06":
        return None
    op = struct.unpack("!H", f[20:22])[0]
    return op, f[22:28], socket.inet_ntoa(f[28:32]), socket.inet_ntoa(f[38:42])


def parse_ipv4(f: bytes) -> tuple[str, str, int, bytes] | None:
    """(src, dst, proto, payload) of an IPv4 frame with a valid header, else None."""
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[14] != 0x45 or csum(f[14:34]) != 0:
        return None
    total = struct.unpack("!H", f[16:18])[0]
    return socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34]), f[23], f[34:14 + total]


class GuestHost:
    """An ARP- and ping-answering host on a connected, set-up Frontend."""

    def __init__(self, fe: Frontend, mac: str, ip: str) -> None:
        self.fe, self.mac, self.ip = fe, mac_bytes(mac), ip
        self.frames: queue.Queue[bytes] = queue.Queue()  # everything not answered here
        self.neigh: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._learned = threading.Condition()
        self._stop = False
        fe.timeout = 0.2  # the loop below wakes this often to notice stop()
        fe.post_rx(128)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, frames: list[bytes]) -> None:
        with self._lock:
            self.fe.rings[1].poll_used()  # free the descriptors of frames already sent
            self.fe.transmit(frames)

    def _run(self) -> None:
        while not self._stop:
            try:
                got = self.fe.receive(1)
            except FrontendError:
                continue
            self.fe.post_rx(len(got))
            for f in got:
                self._handle(f)

    def _handle(self, f: bytes) -> None:
        a = parse_arp(f)
        if a is not None:
            op, smac, sip, tip = a
            with self._learned:
                self.neigh[sip] = smac
                self._learned.notify_all()
            if op == 1 and tip == self.ip:
                self.send([arp(2, self.mac, self.ip, smac, sip)])
                return
        p = parse_ipv4(f)
        if p is not None and p[1] == self.ip and p[2] == 1 and p[3][:1] == b"\x08":
            ident, seq = struct.unpack("!HH", p[3][4:8])
            reply = ipv4(self.ip, p[0], 1, icmp_echo(0, ident, seq, p[3][8:]))
            self.send([f[6:12] + self.mac + b"\x08\x00" + reply])
            return
        self.frames.put(f)

    def resolve(self, ip: str, timeout: float = 5.0) -> bytes:
        """ARP for `ip`; the answer is learned by the receive loop."""
        self.send([arp(1, self.mac, self.ip, BCAST, ip)])
        with self._learned:
            if not self._learned.wait_for(lambda: ip in self.neigh, timeout):
                raise TimeoutError(f"no ARP reply from {ip}")
            return self.neigh[ip]

    def ping(self, ip: str, seq: int, timeout: float = 5.0) -> bytes:
        """One echo request; returns the reply frame."""
        dst = self.neigh.get(ip) or self.resolve(ip)
        data = b"gateway-ping-%d" % seq
        self.send([dst + self.mac + b"\x08\x00"
                   + ipv4(self.ip, ip, 1, icmp_echo(8, 0x4757, seq, data))])
        return self.expect(lambda f: (p := parse_ipv4(f)) is not None and p[0] == ip
                           and p[2] == 1 and p[3][:1] == b"\0" and p[3][8:] == data, timeout)

    def expect(self, match, timeout: float = 5.0) -> bytes:
        """The next queued frame that matches (others are dropped)."""
        while True:
            f = self.frames.get(timeout=timeout)
            if match(f):
                return f

    def stop(self) -> None:
        self._stop = True
        self._thread.join()
