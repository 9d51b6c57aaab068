"""Hostile guests through the real daemon: a lying ring breaks its own device only.

What an operator relies on is proved end to end, through `gateway daemon`:
the liar's device shows `broken` with the reason in `gateway list --json`, its
`broken_total` counter moves in `stats --json` and in the metrics, the daemon
survives and writes nothing into the liar's memory, a healthy guest on the same
NIC keeps reaching the far host while the liar is broken and after it is back,
and a new session (or detach + attach) gives the liar working traffic again.

One topology and one daemon serve the module (the XDP compile dominates the
set-up). Two devices share the NIC: `good`, whose guest sends to the far host
from a thread for the whole module, and `bad`, which every case connects to
anew, lies to, and recovers. A small process on the far host counts frames by
source MAC, keeps the last frame of each tag and sends frames on request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from gateway import control
from gateway.testing.daemon import Daemon
from gateway.testing.frontend import Frontend, FrontendError
from gateway.testing.netns import topology
from gateway.testing.vring_driver import F_INDIRECT, F_NEXT, F_WRITE
from gateway.vhost import protocol as p
from gateway.vhost.protocol import Request

TIMEOUT = 10
ETH_TYPE = 0x88B5  # IEEE local experimental: the far host's kernel drops it silently
QSIZE = 64  # the lying guest's queues
PART = 1 << 20  # bytes per memory region of the lying guest
HOLE = 2 * PART + 0x1000  # a GPA in no region
TOP = 2**64 - PART  # region 2 ends exactly at 2^64
DATA = 0x80000  # spare guest memory in region 0, after rings and buffers
TABLE = 0x90000  # where lying indirect tables go
H = 40  # first descriptor of a lying chain: the set-up traffic uses low indexes
BURST, PACE_S = 8, 0.005  # the healthy guest: 8 frames every 5 ms
STEP = 3 * BURST  # "keeps flowing": this many more healthy frames must arrive

FAR_HOST = r"""
import json, select, socket, struct, sys
ETH_TYPE = int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
s.bind((sys.argv[1], ETH_TYPE))
s.setblocking(False)
mine = s.getsockname()[4]
counts, last = {}, {}

def drain():
    while True:
        try:
            f, addr = s.recvfrom(4096)
        except BlockingIOError:
            return
        if addr[2] == 4:  # PACKET_OUTGOING: our own sends
            continue
        counts[f[6:12].hex()] = counts.get(f[6:12].hex(), 0) + 1
        last[f[14:22].rstrip(b" ").decode(errors="replace")] = f.hex()

print(json.dumps(mine.hex()), flush=True)
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    drain()
    if sys.stdin in r:
        cmd = sys.stdin.readline().split()
        if not cmd:
            break
        if cmd[0] == "count":
            print(json.dumps(counts), flush=True)
        elif cmd[0] == "frame":
            print(json.dumps(last.get(cmd[1])), flush=True)
        elif cmd[0] == "send":
            dst, tag, n = bytes.fromhex(cmd[1]), cmd[2].encode().ljust(8), int(cmd[3])
            for _ in range(n):
                s.send(dst + mine + struct.pack("!H", ETH_TYPE) + tag + b"\xa5" * 50)
            print(json.dumps(n), flush=True)
"""


def frame(dst: str, src: str, tag: str, size: int = 72) -> bytes:
    """dst, src, our EtherType, an 8-byte tag the far host files frames under."""
    head = bytes.fromhex(dst) + bytes.fromhex(src) + struct.pack("!H", ETH_TYPE)
    return (head + tag.encode().ljust(8)).ljust(size, b"\xa5")


def wait_for(what: str, pred: Callable[[], object]) -> object:
    """Poll for a state that announces itself by no event (counters, log lines)."""
    deadline = time.monotonic() + TIMEOUT
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return v


class FarHost:
    def __init__(self, topo) -> None:
        self.proc = topo.popen(sys.executable, "-c", FAR_HOST, topo.peer, str(ETH_TYPE),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.mac = json.loads(self.proc.stdout.readline())

    def _ask(self, *words: object):
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def count(self, mac: str) -> int:
        return self._ask("count").get(mac, 0)

    def wait_count(self, mac: str, n: int) -> None:
        wait_for(f"{n} frames from {mac} on the far host", lambda: self.count(mac) >= n)

    def frame(self, tag: str) -> bytes | None:
        h = self._ask("frame", tag)
        return None if h is None else bytes.fromhex(h)

    def send(self, mac: str, tag: str, n: int) -> None:
        self._ask("send", mac, tag, n)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class DaemonLog:
    """The daemon's log lines so far (the Daemon helper keeps reading them)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def lines(self) -> list[str]:
        return self.daemon.log


class Sender(threading.Thread):
    """The healthy guest: a few frames every few ms, each burst reaped before the
    next, so a stall of its device shows as a timeout here or as a far-host
    count that stops moving. Paced, not flat out: the daemon needs the CPUs."""

    def __init__(self, fe: Frontend, data: bytes) -> None:
        super().__init__(name="good-guest", daemon=True)
        self.fe, self.data = fe, data
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.fe.transmit([self.data] * BURST)
                self.fe.wait_tx_done(BURST)
                self.halt.wait(PACE_S)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(TIMEOUT)


class LyingGuest(Frontend):
    """Regions 0 and 1 are adjacent, so a buffer may legitimately cross them;
    region 2 ends at 2^64 after a hole, so a buffer can run off region 1 into
    nothing, or wrap past 2^64 into region 0, where every piece is "in memory"
    and only the overflow check stands in the way."""

    def __init__(self, path: str) -> None:
        super().__init__(path, queue_size=QSIZE, mem_size=3 * PART, regions=3)

    def regions(self) -> list[p.Region]:
        rs = super().regions()
        rs[2] = dataclasses.replace(rs[2], gpa=TOP)
        return rs


def connect_guest(path: str) -> LyingGuest:
    """A new session of the lying guest. The daemon serves one front-end at a
    time and may not have seen the last session's close yet: it then closes
    the newcomer at once, so retry until a deadline."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        fe = LyingGuest(path)
        try:
            return fe.connect().setup()
        except (FrontendError, OSError):
            fe.release()
            if time.monotonic() > deadline:
                raise


def kick(fe: Frontend, ring: int) -> None:
    os.eventfd_write(fe.kicks[ring], 1)


def wait_broken(fe: Frontend, lie: Lie) -> None:
    """The event: a lie in the rings is signalled on a ring's error eventfd
    (the connection stays, for the guest's reset); one in a ring's addresses
    is a protocol error, which closes the connection."""
    if lie.recover == "reconnect":
        fe.sock.settimeout(TIMEOUT)
        try:
            assert fe.sock.recv(1) == b""
        except ConnectionResetError:
            pass
        return
    ready, _, _ = select.select(fe.errs, [], [], TIMEOUT)
    assert ready, "no ring error signalled"


def guest_bytes(fe: Frontend) -> bytes:
    """Guest memory except the used rings, which are the device's to write (it
    may refresh avail_event as it goes to sleep); used->idx is checked apart."""
    m = bytearray(fe.mem)
    for r in fe.rings:
        n = 6 + 8 * r.size
        m[r.used_gpa : r.used_gpa + n] = bytes(n)
    return bytes(m)


# --- the lies ----------------------------------------------------------------------

@dataclass
class Lie:
    name: str
    reason: tuple[str, ...]  # all in the reason `gateway list` shows
    write: Callable[[LyingGuest], None]  # into guest memory, before the snapshot
    fire: Callable[[LyingGuest, FarHost, str], None]  # kick, send or re-address: make it read
    recover: str = "reset"  # the guest resets the device; or "reattach": detach + attach,
    # or "reconnect": a lie the protocol refuses closes the session, a new one recovers


def tx_chain(*descs: tuple[int, int, int, int], table: Sequence[tuple] = (), at: int = TABLE,
             head: int = H) -> Callable[[LyingGuest], None]:
    """Descriptors H, H+1, ... as (addr, len, flags, next) and an optional
    indirect table at `at`, then head H made available on the TX ring."""

    def write(fe: LyingGuest) -> None:
        tx = fe.rings[1]
        for k, (addr, n, flags, nxt) in enumerate(descs):
            tx.write_desc(head + k, addr, n, flags, nxt)
        for k, entry in enumerate(table):
            struct.pack_into("<QIHH", fe.mem, at + 16 * k, *entry)
        tx.push_avail(head)
    return write


def kick_tx(fe: LyingGuest, far: FarHost, mac: str) -> None:
    kick(fe, 1)


def whole_table_chain(fe: LyingGuest) -> None:
    """Every descriptor points to the next, the last to the first: a chain with
    no end, longer than the queue, without any short cycle."""
    tx = fe.rings[1]
    for i in range(QSIZE):
        tx.write_desc(i, DATA, 16, F_NEXT, (i + 1) % QSIZE)
    tx.push_avail(H)


def avail_jump(fe: LyingGuest) -> None:
    tx = fe.rings[1]
    tx.set_avail_idx(tx.avail_idx + QSIZE + 1)


def no_write(fe: LyingGuest) -> None:
    pass


def used_over_desc(fe: LyingGuest, far: FarHost, mac: str) -> None:
    """The TX ring re-addressed with its used ring on its descriptor table (a
    guest driver programs these addresses; the front-end passes them on)."""
    tx = fe.rings[1]
    desc = fe.qva(tx.desc_gpa)
    with pytest.raises((FrontendError, OSError)):  # REPLY_ACK: the daemon hangs up instead
        fe.request(Request.SET_VRING_ADDR, p.vring_addr(1, desc, desc, fe.qva(tx.avail_gpa)))


def avail_over_other_used(fe: LyingGuest, far: FarHost, mac: str) -> None:
    """The TX ring re-addressed with its avail ring on the RX ring's used ring:
    each ring legal alone, the two sharing bytes."""
    tx, rx = fe.rings[1], fe.rings[0]
    with pytest.raises((FrontendError, OSError)):  # REPLY_ACK: the daemon hangs up instead
        fe.request(Request.SET_VRING_ADDR, p.vring_addr(
            1, fe.qva(tx.desc_gpa), fe.qva(tx.used_gpa), fe.qva(rx.used_gpa)))


def readonly_rx(fe: LyingGuest) -> None:
    fe.mem[DATA : DATA + 2048] = b"\x5a" * 2048  # must still be there afterwards
    rx = fe.rings[0]
    rx.write_desc(H, DATA, 2048, 0, 0)  # device-readable, offered for receiving
    rx.push_avail(H)


def frame_for_rx(fe: LyingGuest, far: FarHost, mac: str) -> None:
    kick(fe, 0)
    far.send(mac, "rxlie", 1)  # the device only reads RX chains when a frame comes


def indirect(length: int, table: Sequence[tuple] = ()) -> Callable[[LyingGuest], None]:
    return tx_chain((TABLE, length, F_INDIRECT, 0), table=table)


LIES = [
    Lie("address outside every region", ("GW_E_DESC_ADDR", hex(HOLE)),
        tx_chain((HOLE, 64, 0, 0)), kick_tx),
    Lie("buffer straddling a region end into the hole", ("GW_E_DESC_ADDR", hex(2 * PART - 32)),
        tx_chain((2 * PART - 32, 64, 0, 0)), kick_tx),
    Lie("addr+len wrapping past 2^64", ("GW_E_DESC_ADDR", hex(2**64 - 16)),
        tx_chain((2**64 - 16, 64, 0, 0)), kick_tx, "reattach"),
    Lie("chain looping", ("GW_E_CHAIN_LOOP", f"{QSIZE + 1} descriptors"),
        tx_chain((DATA, 16, F_NEXT, H + 1), (DATA, 16, F_NEXT, H + 2), (DATA, 16, F_NEXT, H + 1)),
        kick_tx),
    Lie("chain longer than the queue", ("GW_E_CHAIN_LOOP", f"{QSIZE + 1} descriptors"),
        whole_table_chain, kick_tx),
    Lie("indirect table inside an indirect table", ("GW_E_INDIRECT", "nested indirect"),
        indirect(32, [(DATA, 16, F_NEXT, 1), (TABLE + 0x100, 16, F_INDIRECT, 0)]), kick_tx),
    Lie("misaligned indirect table (len not n*16)", ("GW_E_INDIRECT", "(len 24)"),
        indirect(24, [(DATA, 16, 0, 0)]), kick_tx),
    Lie("zero-length indirect table", ("GW_E_INDIRECT", "(len 0)"), indirect(0), kick_tx),
    Lie("indirect table over 1024 entries", ("GW_E_INDIRECT", f"(len {16 * 1025})"),
        indirect(16 * 1025), kick_tx),
    Lie("avail idx more than the queue size ahead", ("GW_E_AVAIL_IDX", f"queue size {QSIZE}"),
        avail_jump, kick_tx, "reattach"),
    Lie("used ring over the descriptor table", ("ring 1: used ring", "overlaps the desc ring"),
        no_write, used_over_desc, "reconnect"),
    Lie("TX avail ring over the RX used ring",
        ("ring 0: used ring", "overlaps ring 1's avail ring"),
        no_write, avail_over_other_used, "reconnect"),
    Lie("write-only descriptor on TX", ("GW_E_DIRECTION", "flags 0x2"),
        tx_chain((DATA, 12, F_NEXT, H + 1), (DATA + 64, 64, F_WRITE, 0)), kick_tx),
    Lie("read-only descriptor on RX", ("GW_E_DIRECTION", "flags 0x0"),
        readonly_rx, frame_for_rx, "reattach"),
]


# --- the rig -----------------------------------------------------------------------

@dataclass
class Rig:
    topo: object
    daemon: Daemon
    log: DaemonLog
    far: FarHost
    sender: Sender
    good_mac: str  # hex, no colons
    bad_mac: str
    bad_socket: str

    def list(self) -> dict[str, dict]:
        """What `gateway list --json` prints, by device name."""
        return {d["name"]: d for d in json.loads(self.daemon.ok("list", "--json"))["devices"]}

    def request(self, cmd: str, **args):
        """A control-socket request: what the CLI would print, without its start-up."""
        return control.request(self.daemon.run_dir, cmd, **args)

    def stats(self, name: str) -> dict:
        return self.request("stats", name=name)["devices"][name]

    def metric_broken(self, name: str) -> float:
        body = urllib.request.urlopen(f"http://{self.daemon.metrics}/metrics",
                                      timeout=TIMEOUT).read().decode()
        m = re.search(rf'^gateway_device_broken_total{{device="{name}"}} (\S+)$', body, re.M)
        assert m, body
        return float(m.group(1))

    def healthy_flows(self) -> None:
        """The good guest's frames keep reaching the far host from now on."""
        assert self.sender.error is None, self.sender.error
        self.far.wait_count(self.good_mac, self.far.count(self.good_mac) + STEP)

    def attach_bad(self) -> None:
        d = json.loads(self.daemon.ok("attach", "bad", self.topo.nic, "--json"))
        self.bad_mac, self.bad_socket = d["mac"].replace(":", ""), d["socket"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with topology() as topo:
        d = Daemon(str(tmp / "run"), str(tmp / "state")).start()
        far = good_fe = sender = None
        try:
            log = DaemonLog(d)
            far = FarHost(topo)
            good = json.loads(d.ok("attach", "good", topo.nic, "--json"))
            good_fe = Frontend(good["socket"]).connect().setup()
            good_mac = good["mac"].replace(":", "")
            sender = Sender(good_fe, frame(far.mac, good_mac, "good"))
            sender.start()
            r = Rig(topo, d, log, far, sender, good_mac, "", "")
            r.attach_bad()
            r.healthy_flows()
            yield r
        finally:
            if sender is not None:
                sender.stop()
            if good_fe is not None:
                good_fe.release()
            if far is not None:
                far.close()
            if d.proc.poll() is None:
                assert d.stop() == 0


def exercise(rig: Rig, fe: LyingGuest, tag: str, rx: bool = True) -> None:
    """Frames both ways through the bad device, each compared byte for byte.
    Without rx the guest posts no RX buffers, so the far host's own multicast
    (flooded to every guest) cannot write into its memory."""
    sent = rig.far.count(rig.bad_mac)
    out = frame(rig.far.mac, rig.bad_mac, tag + "o")
    fe.transmit([out, out])
    fe.wait_tx_done(2)
    rig.far.wait_count(rig.bad_mac, sent + 2)
    assert rig.far.frame(tag + "o") == out
    if not rx:
        return
    fe.post_rx(16)
    rig.far.send(rig.bad_mac, tag + "i", 3)
    want = frame(rig.bad_mac, rig.far.mac, tag + "i")
    got: list[bytes] = []
    while len(got) < 3:  # frames flooded from the far host's own traffic may come too
        frames = fe.receive(1)
        fe.post_rx(len(frames))
        got += [f for f in frames if f[14:22] == want[14:22]]
    assert got == [want] * 3


# --- tests -------------------------------------------------------------------------

@pytest.mark.parametrize("lie", LIES, ids=[lie.name for lie in LIES])
def test_lie_breaks_only_the_liar(rig, lie):
    before = rig.stats("bad")["broken_total"]
    fe = connect_guest(rig.bad_socket)
    try:
        exercise(rig, fe, "pre", rx=False)  # the device works before the lie
        # before the lie is written: a worker still polling after "pre" (a
        # loaded machine) may find it before the kick, and log at once
        log_from = len(rig.log.lines)
        lie.write(fe)
        snapshot = guest_bytes(fe)
        used = [r.used_idx for r in fe.rings]
        bad_frames = rig.far.count(rig.bad_mac)
        lie.fire(fe, rig.far, rig.bad_mac)
        wait_broken(fe, lie)

        devices = rig.list()
        bad, good = devices["bad"], devices["good"]
        assert bad["state"] == "broken", bad
        for part in lie.reason:
            assert part in bad["reason"], bad["reason"]
        assert (good["state"], good["reason"]) == ("running", None)
        assert rig.stats("bad")["broken_total"] == before + 1
        assert rig.stats("good")["broken_total"] == 0
        assert rig.metric_broken("bad") == before + 1
        wait_for("the log line", lambda: any(
            f"bad: broken: {bad['reason']}" in line for line in rig.log.lines[log_from:]))

        rig.healthy_flows()  # while the liar is broken
        assert rig.daemon.proc.poll() is None
        # Nothing of the lie reached the wire, and the daemon wrote nothing into
        # the liar's memory: no used entry, no byte of the read-only RX buffer.
        assert rig.far.count(rig.bad_mac) == bad_frames
        assert [r.used_idx for r in fe.rings] == used
        assert guest_bytes(fe) == snapshot
        if lie.recover == "reset":  # on the same connection
            fe.reset()
            recovered(rig, fe, before)
            return
    finally:
        fe.release()

    if lie.recover == "reattach":
        rig.daemon.ok("detach", "bad")
        rig.attach_bad()
        before = -1  # a new device: its count starts again
    fe = connect_guest(rig.bad_socket)
    try:
        recovered(rig, fe, before)
    finally:
        fe.release()


def recovered(rig: Rig, fe: Frontend, before: int) -> None:
    """The liar's device runs again, its count kept, and both guests pass frames."""
    listed = wait_for("the device running again", lambda: (
        (d := {d["name"]: d for d in rig.request("list")}["bad"])["state"] == "running" and d))
    assert listed["reason"] is None
    assert rig.stats("bad")["broken_total"] == before + 1  # kept across sessions
    exercise(rig, fe, "post")
    rig.healthy_flows()  # and after


def test_legal_layouts_are_not_lies(rig):
    """What the checks must let through: a buffer crossing two adjacent regions
    (C splits the copy), an indirect table at an odd address (the spec puts it
    "anywhere in memory"; we read it with memcpy) and an indirect table longer
    than the queue (Linux sizes them by fragment count; we follow up to 1024)."""
    before = rig.stats("bad")["broken_total"]
    fe = connect_guest(rig.bad_socket)
    try:
        tx = fe.rings[1]
        hdr = (DATA, 12, F_NEXT, 1)  # a zeroed virtio-net header at DATA
        cross = frame(rig.far.mac, rig.bad_mac, "cross", 100)
        fe.mem[PART - 40 : PART + 60] = cross
        tx.write_desc(H, DATA, 12, F_NEXT, H + 1)
        tx.write_desc(H + 1, PART - 40, len(cross), 0, 0)
        tx.push_avail(H)

        odd = frame(rig.far.mac, rig.bad_mac, "odd")
        fe.mem[DATA + 0x100 : DATA + 0x100 + len(odd)] = odd
        struct.pack_into("<QIHHQIHH", fe.mem, TABLE + 1, *hdr, DATA + 0x100, len(odd), 0, 0)
        tx.write_desc(H + 2, TABLE + 1, 32, F_INDIRECT, 0)
        tx.push_avail(H + 2)

        long = frame(rig.far.mac, rig.bad_mac, "long", 99)  # one byte per entry
        fe.mem[DATA + 0x200 : DATA + 0x200 + len(long)] = long
        table = [hdr] + [(DATA + 0x200 + k, 1, F_NEXT if k < 98 else 0, k + 2)
                         for k in range(99)]
        for k, entry in enumerate(table):
            struct.pack_into("<QIHH", fe.mem, TABLE + 0x1000 + 16 * k, *entry)
        tx.write_desc(H + 3, TABLE + 0x1000, 16 * len(table), F_INDIRECT, 0)
        tx.push_avail(H + 3)
        kick(fe, 1)

        for tag, want in (("cross", cross), ("odd", odd), ("long", long)):
            assert wait_for(f"frame {tag!r} on the far host", lambda t=tag: rig.far.frame(t)) \
                == want
        listed = rig.list()["bad"]
        assert (listed["state"], listed["reason"]) == ("running", None)
        assert rig.stats("bad")["broken_total"] == before
    finally:
        fe.release()
