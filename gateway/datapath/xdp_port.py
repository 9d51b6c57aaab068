"""A device's port on a NIC: its slot in the XDP program and its AF_XDP sockets.

Device queue pair p sends on NIC queue p and receives from every NIC queue q
with q % P == p (P = the device's queue pairs), so each socket's TX and RX
ring has exactly one worker and every NIC queue is read by someone. Each burst
is one C call that copies between guest buffers and UMEM frames
(cffi_build/gw_xskq.c), once per frame.

A device on a VLAN (`vlan` 1..4094) is steered by (VLAN, MAC): the XDP program
takes the tag off what it redirects, and the TX burst puts it on what leaves,
so the guest only ever sees untagged frames.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time

from gateway._native import ffi, lib
from gateway.datapath.port import BURST, FRAME_SIZE, MemoryQueue
from gateway.virtio.ring import FrameBuffer, VirtQueue
from gateway.xdp import link
from gateway.xdp.nic import Nic, QueueUmem
from gateway.xdp.program import is_unicast, mac_key
from gateway.xdp.xsk import STATS_KEYS, XskSocket

log = logging.getLogger(__name__)

Sock = tuple[QueueUmem, XskSocket]
VLAN_HLEN = 4


# The pump keeps polling this long after the last frame before the worker
# sleeps: a burst arriving within it costs no wake-up, and idle costs nothing.
# Long enough for a guest's answer to a frame from the wire (a ping's reply
# from a guest sharing its CPU came after 50 us often enough to set p95 and
# p99: measured 236/278 us at 50, 97/183 at 150, for 1 point of CPU more at
# 100 pings/s).
SPIN_NS = 150_000
BUDGET_NS = 20_000_000  # hand back to Python at least this often (stop, stats)
_spin_ns = [SPIN_NS]


def set_busy_poll(us: int) -> None:
    """How long workers poll after the last frame before they sleep. Longer
    spares sparse traffic the wake-up (lower latency) and costs a whole CPU per
    busy worker while traffic lasts; never more than 1 s."""
    if not 0 <= us <= 1_000_000:
        raise ValueError(f"busy poll {us} us is outside 0..1000000")
    _spin_ns[0] = us * 1000


class XdpQueue:
    def __init__(self, port: XdpPort, qp: int, rx: list[Sock], tx: Sock,
                 inbox: MemoryQueue | None) -> None:
        self.port, self.rx, self.tx, self.inbox = port, rx, tx, inbox
        self.fds = tuple(s.fd for _, s in rx) + ((inbox.fd,) if inbox else ())
        self._backlog = False
        self.throttled = False  # the last pump pass walked far more than it moved
        self._raw: FrameBuffer | None = None
        self._attention = ffi.new("uint32_t *")
        self._pump = None
        self.first_ns = 0  # when the last pump run first moved a frame (CLOCK_MONOTONIC)
        self.woke_ns = 0  # when the last sleep() ended (CLOCK_MONOTONIC)
        # where the burst copies frames for other guests on the NIC: a burst's
        # worth plus the segments of a GSO frame (pages untouched until used)
        self._local_buf = FrameBuffer(BURST + lib.GW_GSO_MAX_SEGS, FRAME_SIZE)
        loc = self._local = ffi.new("struct gw_local *")
        loc.macs, loc.nmacs = port.nic.macs, port.nic.nmacs
        loc.base, loc.offs, loc.lens = (self._local_buf.base, self._local_buf.offs,
                                        self._local_buf.lens)
        loc.cap = self._local_buf.nframes
        loc.own_mac, loc.check_src = mac_key(port.mac), not port.allow_spoofing
        loc.vlan = port.vlan
        loc.max_frame = port.max_frame  # the device's MTU holds on TX too
        self.capture(port.capture_ring(qp))

    def capture(self, ring) -> None:
        """Copy this queue pair's frames into `ring` (a struct gw_cap *, from
        gateway/capture.py) from the next burst on; NULL: stop copying. After
        stopping, `capture_busy()` says whether a burst still holds the old one."""
        lib.gw_cap_hook(self._local, ring)

    def capture_busy(self) -> bool:
        return lib.gw_cap_busy(self._local) != 0

    def pump(self, txq: VirtQueue, rxq: VirtQueue, first_wait_ns: int = 0) -> bool:
        """Bursts both ways in C until idle (see gw_pump_run); Python only runs
        for frames other guests must see, the inbox and the worker's own work.
        False when the rings went quiet: time for the worker to sleep.
        `first_wait_ns`: poll this long for a first frame (a worker that woke
        ahead of one); `first_ns` then says when the run first moved one."""
        p = self._pump
        if p is None or p.txq != txq.native or p.rxq != rxq.native:
            p = self._pump = self._make_pump(txq, rxq)
        moved = self.inbox.to_guest(rxq) if self.inbox is not None else 0
        if moved and self._local.capture != ffi.NULL:  # frames from the wire's broadcasts
            buf, start = self.inbox.delivered(moved)  # and other guests reach it this way
            lib.gw_cap_frames(self._local, lib.GW_CAP_RX, buf.base, buf.offs + start,
                              buf.lens + start, moved)
        p.first_wait_ns = first_wait_ns
        r = lib.gw_pump_run(p, _spin_ns[0], max(BUDGET_NS, _spin_ns[0]))
        return self._after_run(p, r, txq, rxq) or bool(moved)

    def _after_run(self, p, r: int, txq: VirtQueue, rxq: VirtQueue) -> bool:
        """What Python does after a pump run (r: what it returned); False if
        it ended idle (whatever it moved before: the worker may sleep)."""
        self.first_ns = p.first_ns
        if r < 0:
            (txq if p.broken == 1 else rxq).check(-1)
        if self._local.n:  # guest frames other guests must see
            frames = [self._local_buf.frame(i) for i in range(self._local.n)]
            self._local.n = 0
            self.port.nic.deliver_local(frames, self.port)
        self._backlog = p.waiting > 0 or (self.inbox is not None and self.inbox.backlog())
        self.throttled = bool(p.throttled)
        self.port.resync_held(self.rx)
        return not p.idle

    def sleep(self, txq: VirtQueue, rxq: VirtQueue, fds: list[int], returns: set[int],
              drains: set[int], timeout_ns: int, poll_until_ns: int = 0
              ) -> tuple[list[int], bool | None]:
        """The worker's sleep on `fds` (gw_pump_sleep), and the pump run it woke
        for, in one C call: no Python between a frame's wake-up and the pump.
        `returns`: fds that mean Python has work (no pump); `drains`: kick
        eventfds, read empty. Returns the ready fds and, if the pump ran, what
        `pump` would have (None: it did not)."""
        p = self._pump
        if p is None or p.txq != txq.native or p.rxq != rxq.native:
            p = self._pump = self._make_pump(txq, rxq)
        if self.inbox is not None:
            returns = returns | {self.inbox.fd}  # its frames are Python's to move
        n = len(fds)
        cfds, revents = ffi.new("int[]", fds), ffi.new("short[]", n)
        flags = ffi.new("uint8_t[]", [lib.GW_WAKE_RETURN * (fd in returns)
                                      | lib.GW_WAKE_DRAIN * (fd in drains) for fd in fds])
        r = lib.gw_pump_sleep(p, cfds, flags, revents, n, timeout_ns, poll_until_ns,
                              _spin_ns[0], max(BUDGET_NS, _spin_ns[0]))
        if r < 0 and r != -errno.EINTR:
            raise OSError(-r, os.strerror(-r))
        ready = [fds[i] for i in range(n) if revents[i]] if r > 0 else []
        self.woke_ns = p.woke_ns
        if not p.pumped:
            return ready, None
        return ready, self._after_run(p, p.moved, txq, rxq)

    def _make_pump(self, txq: VirtQueue, rxq: VirtQueue):
        if len(self.rx) > lib.GW_PUMP_MAX_RX:
            raise ValueError(f"{len(self.rx)} RX sockets, the pump takes {lib.GW_PUMP_MAX_RX}")
        p = ffi.new("struct gw_pump *")
        p.txq, p.rxq = txq.native, rxq.native
        qu, s = self.tx
        p.tx_u, p.tx, p.tx_fd, p.local = qu.native, s.tx, s.fd, self._local
        p.nrx = len(self.rx)
        for i, (qu, s) in enumerate(self.rx):
            p.rx[i].u, p.rx[i].rx = qu.native, s.rx
            p.rx[i].held = self.port.nic.program.held(self.port.slot, s.queue)
        p.attention = self._attention
        p.share_cpu = 1  # one pump polls per CPU: a second one hands over and sleeps
        p.yield_busy = 1  # ... and, while they do, a pump moving a load yields every 20 us
        p.give_way = 1  # ... and a polling one yields to one of them with work waiting
        return p

    def interrupt(self) -> None:
        """From any thread: make a running pump return to its worker."""
        self._attention[0] = 1

    def backlog(self) -> bool:
        """Only asked after a pass that moved nothing: frames still waiting in an
        RX ring then mean the guest has no buffers for them."""
        return self._backlog

    def send_raw(self, frames: list[bytes]) -> None:
        if self._raw is None:
            self._raw = FrameBuffer(BURST, FRAME_SIZE)
        qu, s = self.tx
        for i in range(0, len(frames), BURST):
            chunk = frames[i : i + BURST]
            for j, f in enumerate(chunk):
                self._raw.put(j, self.port.tag(f))
            lib.gw_xsk_send(qu.native, s.tx, s.fd, self._raw.base, self._raw.offs,
                            self._raw.lens, len(chunk))


class XdpPort:
    """Create with everything checked first; `close()` undoes it all."""

    offloads = True  # the C bursts complete checksums and segment GSO frames

    def __init__(self, nic: Nic, name: str, mac: str, *, queue_pairs: int = 1,
                 mtu: int = 1500, allow_spoofing: bool = False, vlan: int = 0,
                 migrate_from: XdpPort | None = None) -> None:
        if migrate_from is not None:
            _check_twin(migrate_from, nic, mac, vlan)
        if not is_unicast(mac):
            raise link.LinkError(f"{mac} is not a unicast MAC address")
        if not 0 <= vlan <= 4094:
            raise link.LinkError(f"VLAN {vlan} is outside 1..4094")
        if not 1 <= queue_pairs <= nic.nqueues:
            raise link.LinkError(f"{queue_pairs} queue pairs asked, {nic.name} has "
                                 f"{nic.nqueues} queues")
        self.max_frame = link.check_mtu(nic.link, mtu, FRAME_SIZE, tag=VLAN_HLEN if vlan else 0)
        self.nic, self.name, self.mac, self.vlan = nic, name, mac, vlan
        self.queue_pairs, self.mtu = queue_pairs, mtu
        self.allow_spoofing = allow_spoofing  # else frames from other source MACs are dropped
        self._queues: dict[int, XdpQueue] = {}
        # `gateway capture`: one ring per queue pair while a capture runs (capture.py);
        # the lock orders hooking with queues being created on other threads
        self._capture: list | None = None
        self._capture_lock = threading.Lock()
        self.slot = nic.free_slot()
        self.sockets: dict[int, Sock] = {}
        # per NIC queue: the socket's rx_dropped + rx_ring_full already taken off
        # its held count (frames the XDP program counted but the kernel dropped)
        self._lost_seen: dict[int, int] = {}
        self.filtered = False
        self.running = False
        self.inbox = MemoryQueue()  # frames from other guests and broadcasts from the wire
        self._inbox_reader: XdpQueue | None = None
        # Live migration: two ports share one MAC, the source's and the destination's.
        # `steering` says which one the XDP program sends the MAC's frames to and
        # which holds the MAC filter; it moves to whichever starts running last
        # (the destination once the VM resumes there) and to the survivor on close.
        self.twin: XdpPort | None = None
        self.steering = migrate_from is None
        nic.add_port(self.slot, self)
        try:
            nic.add_filter(mac)  # counted: a migration's twins hold one entry between them
            self.filtered = True
            for q in range(nic.nqueues):
                self.sockets[q] = nic.socket_on(q)
                self._lost_seen[q] = 0
                nic.program.reset_held(self.slot, q)
                nic.program.set_socket(self.slot, q, self.sockets[q][1].fd)
            if migrate_from is None:
                nic.program.set_device(self.slot, mac, self.max_frame, running=False, vlan=vlan)
        except BaseException:
            self.close()
            raise
        self.mode = next(iter(self.sockets.values()))[1].mode
        if migrate_from is not None:
            self.twin, migrate_from.twin = migrate_from, self
        log.info("%s: on %s slot %d, MAC %s%s (%s), AF_XDP %s", name, nic.name, self.slot, mac,
                 f" VLAN {vlan}" if vlan else "", nic.filters[mac][0], self.mode)

    @property
    def max_mtu(self) -> int:
        return self.max_frame - 14

    def tag(self, frame: bytes) -> bytes:
        """`frame` as it goes on the wire: with the device's 802.1Q tag, if any
        (what gw_xsk_from_guest does in C, for the Python slow path)."""
        if not self.vlan or len(frame) < 14:
            return frame
        return frame[:12] + struct.pack("!HH", 0x8100, self.vlan) + frame[12:]

    def queue(self, qp: int) -> XdpQueue:
        """The same object for every worker of this queue pair, so its counters
        outlive a front-end's reconnection."""
        with self._capture_lock:
            if qp not in self._queues:
                n, p = self.nic.nqueues, self.queue_pairs
                self._queues[qp] = XdpQueue(self, qp,
                                            [self.sockets[q] for q in range(n) if q % p == qp],
                                            self.sockets[qp % n], self.inbox if qp == 0 else None)
                if qp == 0:
                    self._inbox_reader = self._queues[qp]
            return self._queues[qp]

    def capture_ring(self, qp: int):
        """The capture ring queue pair `qp` copies its frames into, or NULL."""
        return self._capture[qp] if self._capture is not None else ffi.NULL

    def set_capture(self, rings: list | None, wait: float = 1.0) -> bool:
        """Hook one capture ring per queue pair (None: unhook). Unhooking waits
        up to `wait` s for bursts still holding a ring; False if one did not
        let go, and then the rings must stay mapped."""
        if rings is not None and len(rings) != self.queue_pairs:
            raise ValueError(f"{len(rings)} capture rings for {self.queue_pairs} queue pairs")
        with self._capture_lock:
            self._capture = rings
            queues = list(self._queues.items())
            for qp, q in queues:
                q.capture(self.capture_ring(qp))
        if rings is not None:
            return True
        deadline = time.monotonic() + wait
        while any(q.capture_busy() for _, q in queues):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)  # a burst takes microseconds
        return True

    def set_running(self, running: bool) -> None:
        """Frames for a stopped device are dropped (and counted) by the XDP program
        rather than filling sockets nobody reads."""
        self.running = running
        if running and not self.steering:
            self._take_steering()
        elif self.steering:
            self.nic.program.set_device(self.slot, self.mac, self.max_frame, running,
                                        vlan=self.vlan)

    def _take_steering(self) -> None:
        twin = self.twin
        assert twin is not None  # only a twin starts without steering
        self.nic.program.set_device(self.slot, self.mac, self.max_frame, self.running,
                                    vlan=self.vlan, take=True)
        self.steering, twin.steering = True, False
        log.info("%s: MAC %s now steered here, not to %s", self.name, self.mac, twin.name)

    def _take_steering_from(self, old: XdpPort) -> None:
        self.twin = old
        self._take_steering()
        self.twin = None

    def give(self, frame: bytes) -> None:
        """A frame for this guest that did not come through its sockets."""
        if self.running and len(frame) <= self.max_frame:
            self.inbox.inject([frame])
            if self._inbox_reader is not None:
                self._inbox_reader.interrupt()  # its pump polls rings, not the inbox

    def resync_held(self, socks: list[Sock]) -> None:
        """Take frames that the XDP program counted as held but the kernel then
        dropped (RX ring full, no fill frame: XDP_STATISTICS counts each once)
        off the sockets' held counts, so they do not eat the device's share."""
        prog = self.nic.program
        for _, s in socks:
            st = s.stats()
            lost = st["rx_dropped"] + st["rx_ring_full"]
            new = lost - self._lost_seen.get(s.queue, 0)
            if new > 0:
                self._lost_seen[s.queue] = lost
                lib.gw_held_sub(prog.held(self.slot, s.queue), new)

    def stats(self) -> dict[str, int]:
        """BPF counters of the slot, the sockets' XDP_STATISTICS (rx_ring_full and
        friends: drops the XDP program cannot see), guest frames refused for
        their source MAC, length, own VLAN tag or MTU (tx_spoofed, tx_runt,
        tx_tagged, tx_over_mtu), for the NIC queues this device sends on, TX
        bursts cut short for want of frames or ring room, and for those it
        reads, RX descriptors outside the UMEM (rx_bad_desc); these last
        three are shared with the other devices on those queues."""
        out = dict(self.nic.program.counters(self.slot))
        for key in (*STATS_KEYS, "tx_no_frame", "tx_ring_full", "rx_bad_desc"):
            out[key] = 0
        out["tx_spoofed"] = sum(q._local.spoofed for q in self._queues.values())
        out["tx_runt"] = sum(q._local.runts for q in self._queues.values())
        out["tx_tagged"] = sum(q._local.tagged for q in self._queues.values())
        out["tx_over_mtu"] = sum(q._local.over_mtu for q in self._queues.values())
        for qu, s in self.sockets.values():
            for key, v in s.stats().items():
                out[key] += v
            out["rx_bad_desc"] += qu.native.rx_bad_desc
        for q in {qp % self.nic.nqueues for qp in range(self.queue_pairs)}:
            u = self.sockets[q][0].native
            out["tx_no_frame"] += u.tx_no_frame
            out["tx_ring_full"] += u.tx_ring_full
        return out

    def close(self) -> None:
        prog = self.nic.program
        twin, self.twin = self.twin, None
        if twin is not None:
            twin.twin = None
            if self.steering:  # the survivor keeps the guest reachable
                twin._take_steering_from(self)
        prog.remove_device(self.slot, self.mac, self.vlan)  # sockets leave the map first
        for q, (qu, s) in self.sockets.items():
            # Frames still in the RX ring (a guest that took none) go back to the
            # queue's pool: closing the socket would lose them to every device.
            lib.gw_xsk_rx_drain(qu.native, s.rx)
            # So do TX frames the kernel never took (kicked first; reclaimed only in
            # copy mode, where nothing but a kick makes the kernel read the ring).
            lib.gw_xsk_tx_drain(qu.native, s.tx, s.fd, s.mode == "copy")
            prog.reset_held(self.slot, q)
            self.nic.release_socket(qu, s)
        self.sockets.clear()
        if self.filtered:
            self.nic.remove_filter(self.mac)
            self.filtered = False
        self.nic.remove_port(self.slot)
        self.inbox.close()


def _check_twin(src: XdpPort, nic: Nic, mac: str, vlan: int) -> None:
    """A migration's destination port must mirror its source exactly."""
    if src.nic is not nic:
        raise link.LinkError(f"{src.name} is on {src.nic.name}, not {nic.name}: a migration "
                             "stays on one NIC")
    if src.mac != mac:
        raise link.LinkError(f"{src.name} has MAC {src.mac}, not {mac}")
    if src.vlan != vlan:
        raise link.LinkError(f"{src.name} is on VLAN {src.vlan or 'none'}, not {vlan or 'none'}")
    if src.twin is not None:
        raise link.LinkError(f"{src.name} is already paired with {src.twin.name} "
                             "for a migration")
    if not src.sockets:
        raise link.LinkError(f"{src.name} is closed")
