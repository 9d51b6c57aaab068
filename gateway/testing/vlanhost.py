"""The far host's VLAN hosts, in Python over AF_PACKET, for kernels without 802.1Q.

This test kernel has neither CONFIG_VLAN_8021Q (no VLAN subinterfaces) nor
bridge VLAN filtering, so the far host's side of each VLAN is played by one
process on the far veth: per VLAN ID an IPv4 address (sharing the veth's MAC,
like a VLAN subinterface would) that answers ARP and ping, records UDP to port
5000, and sends UDP, ARP and pings on command, every frame tagged with its VID.
Frames arriving tagged for another VID, or untagged, are not its business (the
far kernel drops tagged ones it has no VLAN device for, after the tap).

The kernel takes a received frame's tag off into PACKET_AUXDATA, so each event
carries the TCI as the wire had it (priority bits included) and the frame as
the far stack would see it, untagged.

    with FarVlans(topo, {100: "10.77.100.1", 200: "10.77.200.1"}) as far:
        far.send(100, guest_mac, "10.77.100.2", b"hello")
        far.wait("udp", lambda e: e["data"] == ...)

Run in the far namespace as `python -m gateway.testing.vlanhost IFACE VID=IP ...`;
commands come as JSON lines on stdin, events go out as JSON lines on stdout.

What needs the far kernel's own stack on a VLAN (TCP, with its retransmissions
and windows) gets `FarVlanTap` instead: a tap device carrying the VLAN's
address, whose frames a relay process tags onto the wire and whose VLAN's
frames it untags into the tap -- a VLAN subinterface in user space
(`python -m gateway.testing.vlanhost --tap IFACE VID IP/LEN`).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time

from gateway.testing.guestnet import (
    BCAST,
    arp,
    icmp_echo,
    ipv4,
    mac_bytes,
    parse_arp,
    parse_ipv4,
    udp,
)

ETH_P_ALL, SOL_PACKET, PACKET_AUXDATA = 3, 263, 8
TP_STATUS_VLAN_VALID = 1 << 4
PACKET_OUTGOING = 4
AUXDATA = struct.Struct("=IIIHHHH")


def tag(frame: bytes, vid: int) -> bytes:
    return frame[:12] + struct.pack("!HH", 0x8100, vid) + frame[12:]


def vlan_of(data: bytes, anc) -> tuple[bytes, int | None]:
    """(frame without its tag, TCI) — TCI None for an untagged frame."""
    for level, kind, raw in anc:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(raw) >= AUXDATA.size:
            status, _, _, _, _, tci, _ = AUXDATA.unpack_from(raw)
            if status & TP_STATUS_VLAN_VALID:
                return data, tci
    if len(data) >= 18 and data[12:14] == b"\x81\x00":
        return data[:12] + data[16:], struct.unpack("!H", data[14:16])[0]
    return data, None


class _Host:
    """The process side: one socket, the VLAN addresses, a receive loop."""

    def __init__(self, iface: str, ips: dict[int, str]) -> None:
        self.ips = ips
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        # bursts from a guest outrun this Python loop: queue them (SO_RCVBUFFORCE, root)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)
        self.sock.bind((iface, ETH_P_ALL))
        self.mac = self.sock.getsockname()[4][:6]
        self.lock = threading.Lock()

    def emit(self, **ev) -> None:
        with self.lock:
            print(json.dumps(ev), flush=True)

    def out(self, vid: int, frame: bytes) -> None:
        self.sock.send(tag(frame, vid))

    def serve(self) -> None:
        while True:
            data, anc, _, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(AUXDATA.size))
            if addr[2] == PACKET_OUTGOING:
                continue
            f, tci = vlan_of(data, anc)
            if tci is None or (tci & 0xFFF) not in self.ips:
                continue
            vid = tci & 0xFFF
            self.handle(vid, tci, f)

    def handle(self, vid: int, tci: int, f: bytes) -> None:
        me = self.ips[vid]
        a = parse_arp(f)
        if a is not None:
            op, smac, sip, tip = a
            self.emit(ev="arp", vid=vid, tci=tci, op=op, ip=sip, mac=smac.hex(":"), target=tip)
            if op == 1 and tip == me:
                self.out(vid, arp(2, self.mac, me, smac, sip))
            return
        p = parse_ipv4(f)
        if p is None:
            return
        src, dst, proto, body = p
        if proto == 1 and dst == me and body[:1] == b"\x08":
            ident, seq = struct.unpack("!HH", body[4:8])
            self.out(vid, f[6:12] + self.mac + b"\x08\x00"
                     + ipv4(me, src, 1, icmp_echo(0, ident, seq, body[8:])))
            self.emit(ev="echo", vid=vid, tci=tci, ip=src)
        elif proto == 1 and dst == me and body[:1] == b"\x00":
            self.emit(ev="pong", vid=vid, tci=tci, ip=src, seq=struct.unpack("!H", body[6:8])[0])
        elif proto == 17 and len(body) >= 8 and struct.unpack("!H", body[2:4])[0] == 5000:
            self.emit(ev="udp", vid=vid, tci=tci, src=src, dst=dst, data=body[8:].hex(),
                      frame=f.hex())
        elif proto == 6:  # recorded whole, for checks of what the gateway segmented
            self.emit(ev="tcp", vid=vid, tci=tci, frame=f.hex())

    def command(self, c: dict) -> None:
        vid = c.get("vid")
        me = self.ips.get(vid)
        if c["cmd"] == "udp":
            dst_mac = mac_bytes(c["mac"])
            for i in range(c.get("count", 1)):
                data = bytes.fromhex(c["data"]) + (b" %05d" % i if "count" in c else b"")
                self.out(vid, dst_mac + self.mac + b"\x08\x00"
                         + ipv4(me, c["ip"], 17, udp(me, c["ip"], 4000, 5000, data)))
        elif c["cmd"] == "raw":  # exactly these bytes: any tag, or none
            self.sock.send(bytes.fromhex(c["frame"]))
        elif c["cmd"] == "arp":
            self.out(vid, arp(1, self.mac, me, BCAST, c["ip"]))
        elif c["cmd"] == "ping":
            self.out(vid, mac_bytes(c["mac"]) + self.mac + b"\x08\x00"
                     + ipv4(me, c["ip"], 1, icmp_echo(8, 0x4656, c["seq"], b"far-vlan-ping")))
        self.emit(ev="done", cmd=c["cmd"], vid=vid)


TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


def tap_main(iface: str, vid: int, addr: str) -> None:
    """The relay: wire frames of VLAN `vid` into the tap untagged, the tap's
    frames onto the wire tagged. The tap shares the wire interface's MAC, as a
    VLAN subinterface would, and lives as long as this process."""
    name = f"{iface[:10]}.{vid}"  # IFNAMSIZ: 15 characters at most
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: bursts outrun us
    sock.bind((iface, ETH_P_ALL))
    mac = sock.getsockname()[4][:6].hex(":")
    # No IPv6 on the tap: its router solicitations would reach the guest's VLAN.
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("1")
    subprocess.run(["ip", "link", "set", name, "address", mac, "up"], check=True)
    subprocess.run(["ip", "addr", "add", addr, "dev", name], check=True)

    def wire_to_tap() -> None:
        while True:
            data, anc, _, sll = sock.recvmsg(65536, socket.CMSG_SPACE(AUXDATA.size))
            if sll[2] == PACKET_OUTGOING:
                continue
            f, tci = vlan_of(data, anc)
            if tci is not None and tci & 0xFFF == vid:
                os.write(fd, f)

    threading.Thread(target=wire_to_tap, daemon=True).start()
    print("ready", name, mac, flush=True)
    while True:
        sock.send(tag(os.read(fd, 65536), vid))


class FarVlanTap:
    """A far-host address on VLAN `vid` with the far kernel's whole stack behind
    it: servers bind to `ip` in the far namespace as on any interface."""

    def __init__(self, topo, vid: int, ip: str, prefix_len: int = 24) -> None:
        self.ip = ip
        self.proc = topo.popen(sys.executable, "-m", "gateway.testing.vlanhost", "--tap",
                               topo.peer, str(vid), f"{ip}/{prefix_len}",
                               stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            self.close()
            raise RuntimeError(f"the VLAN {vid} tap relay did not start: {line}")
        self.name, self.mac = line[1], line[2]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> FarVlanTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str]) -> None:
    if argv[0] == "--tap":
        tap_main(argv[1], int(argv[2]), argv[3])
        return
    iface = argv[0]
    ips = {int(v): ip for v, ip in (a.split("=") for a in argv[1:])}
    host = _Host(iface, ips)
    threading.Thread(target=host.serve, daemon=True).start()
    host.emit(ev="ready", mac=host.mac.hex(":"))
    for line in sys.stdin:
        host.command(json.loads(line))


class FarVlans:
    """Drives the VLAN hosts in the far namespace of a netns.Topology."""

    def __init__(self, topo, ips: dict[int, str]) -> None:
        self.ips = ips
        self.proc = topo.popen(sys.executable, "-m", "gateway.testing.vlanhost", topo.peer,
                               *(f"{v}={ip}" for v, ip in ips.items()),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []  # every event taken off the queue, for later checks
        self._unclaimed: list[dict] = []  # ... that no wait() returned yet
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.mac = self.wait("ready")["mac"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def _do(self, **c) -> None:
        self.proc.stdin.write(json.dumps(c) + "\n")
        self.proc.stdin.flush()
        self.wait("done", lambda e: e["cmd"] == c["cmd"])

    def udp(self, vid: int, mac: str, ip: str, data: bytes, count: int | None = None) -> None:
        """UDP to port 5000 (count: that many, numbered " 00000" ...)."""
        extra = {} if count is None else {"count": count}
        self._do(cmd="udp", vid=vid, mac=mac, ip=ip, data=data.hex(), **extra)

    def raw(self, frame: bytes) -> None:
        """`frame` onto the wire as it is (no tag added)."""
        self._do(cmd="raw", frame=frame.hex())

    def resolve(self, vid: int, ip: str, timeout: float = 15.0) -> str:
        self._do(cmd="arp", vid=vid, ip=ip)
        return self.wait("arp", lambda e: e["op"] == 2 and e["ip"] == ip and e["vid"] == vid,
                         timeout)["mac"]

    def ping(self, vid: int, ip: str, seq: int, timeout: float = 15.0) -> dict:
        mac = self.resolve(vid, ip, timeout)
        self._do(cmd="ping", vid=vid, mac=mac, ip=ip, seq=seq)
        return self.wait("pong", lambda e: e["ip"] == ip and e["seq"] == seq, timeout)

    def wait(self, ev: str, match=lambda e: True, timeout: float = 15.0) -> dict:
        """The first event of kind `ev` that matches and no earlier wait returned:
        events arrive in the far host's order, which is not always the test's."""
        for e in self._unclaimed:
            if e["ev"] == ev and match(e):
                self._unclaimed.remove(e)
                return e
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {ev} event")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"no {ev} event") from None
            self.seen.append(e)
            if e["ev"] == ev and match(e):
                return e
            self._unclaimed.append(e)

    def drain(self) -> list[dict]:
        """Every event so far (`seen`), the queued ones included."""
        while True:
            try:
                e = self.events.get_nowait()
            except queue.Empty:
                return self.seen
            self.seen.append(e)
            self._unclaimed.append(e)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stdin.close()

    def __enter__(self) -> FarVlans:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    main(sys.argv[1:])
