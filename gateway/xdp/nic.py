"""One NIC shared by every device attached to it.

The NIC carries one XDP program (steering by destination MAC to a device's
XSKMAP slots) and, per NIC queue, one UMEM: the kernel allows a single UMEM per
(device, queue), so all devices' sockets on a queue share its frames, fill
ring and completion ring (`struct gw_umemq`, cffi_build/gw_xskq.h). Each
device gets a slot and one socket on every NIC queue, so whatever queue RSS
picks for its return traffic, a socket of its own is there.

Set-up runs in order and is undone in reverse, on detach or when set-up fails
half-way: MAC filter, sockets, map entries; the program and the UMEMs go when
the last device leaves.

One owner per NIC: a Nic holds a flock on `/run/gateway/nic/<ifname>.lock`
(system-wide, so daemons on different state directories and library users
meet there) from before it looks at the NIC's program until close(). A second
Nic on a NIC someone drives is refused (NicInUse) and touches nothing; else
the live owner's program would pass for a crash leftover and be replaced, its
MAC filters removed. The kernel drops the lock of a process that dies, so after
a crash the next Nic gets it and cleans up what the dead one left. The lock
file also says (line "promisc") whether its holder switched promiscuous mode
on as its MAC filter fallback, so the next owner switches off what a crash
left on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from gateway._native import ffi, lib
from gateway.pidlock import Held, PidLock, note_of
from gateway.xdp import link
from gateway.xdp.flood import FloodTap
from gateway.xdp.program import XdpProgram, steer_key
from gateway.xdp.xsk import Umem, XskSocket

log = logging.getLogger(__name__)

FRAME_SIZE = 4096
NFRAMES = 4096  # per NIC queue: 16 MiB
RING_SIZE = 2048
LOCK_DIR = "/run/gateway/nic"
PROMISC = "promisc"  # in the lock file: we switched promiscuous mode on


class NicInUse(link.LinkError):
    """Another live Nic (another process, or this one) drives the NIC."""


def lock_path(ifname: str) -> str:
    return f"{LOCK_DIR}/{ifname}.lock"


def lock_nic(ifname: str) -> PidLock:
    try:
        return PidLock.take(lock_path(ifname))
    except Held as e:
        if e.pid == os.getpid():
            raise NicInUse(f"{ifname} is already driven by another Nic in this process; "
                           "not touching it") from None
        raise NicInUse(f"{ifname} is driven by another gateway process (pid {e.pid or '?'}); "
                       "not touching it") from None
    except OSError as e:
        raise link.LinkError(f"cannot lock {lock_path(ifname)}: {e}") from None


FILL_TARGET = RING_SIZE  # the whole fill ring: half the UMEM, the other half for TX


def share(ndevices: int) -> int:
    """Frames one device's socket may hold unconsumed in its RX ring, per queue.

    The shares add up to at most the frames the fill ring is kept topped up
    with (FILL_TARGET), so a device under its share finds a fill frame however
    many the others hold: a guest that posts no RX buffers pins its share,
    never the queue's UMEM. The rest of the UMEM (NFRAMES - FILL_TARGET) is for
    TX and for the fill ring's refills. Minus one frame per CPU: the XDP
    program's check-then-add may overshoot by one per CPU racing on a socket."""
    cpus = os.cpu_count() or 1
    return max(1, FILL_TARGET // max(1, ndevices) - cpus)


@dataclass
class QueueUmem:
    """A NIC queue's UMEM and the C view of it that the bursts share."""

    queue: int
    umem: Umem
    native: object  # struct gw_umemq *
    sockets: list[XskSocket] = field(default_factory=list)

    @classmethod
    def create(cls, queue: int) -> QueueUmem:
        umem = Umem(NFRAMES, FRAME_SIZE, fill_size=RING_SIZE, comp_size=RING_SIZE)
        u = ffi.new("struct gw_umemq *")
        u.area = ffi.cast("uint8_t *", umem.area)
        u.frame_size = FRAME_SIZE
        u.mask = umem.mask
        u.fill = umem.fill_ring
        u.comp = umem.comp_ring
        u.pool = umem.pool
        u.npool = umem.npool
        u.nframes = NFRAMES
        u.fill_target = FILL_TARGET
        u.fd = -1
        return cls(queue, umem, u)


class Nic:
    def __init__(self, ifname: str, *, max_devices: int = 64) -> None:
        self.link = link.resolve(ifname)
        self.name = self.link.name
        self.owner = lock_nic(self.name)  # before anything looks at the NIC's program
        self.program = None
        try:
            if PROMISC in note_of(self.owner.previous).split():  # a dead owner's fallback
                link.promisc_off(self.name)
                log.warning("%s: switched off promiscuous mode left on by a previous run",
                            self.name)
            self.program = XdpProgram(self.name, max_devices=max_devices,
                                      max_queues=max(16, self.link.rx_queues))
            self.program.attach()  # a gateway program here now is a dead owner's: replaced
            for mac in self.program.stale_macs:  # a crashed run's MAC filter entries
                link.remove_mac_filter(self.name, mac, "fdb")
                log.warning("%s: cleaned up MAC filter %s left by a previous run",
                            self.name, mac)
        except BaseException:
            try:
                if self.program is not None:
                    self.program.close()
            finally:
                self.owner.release()
            raise
        self.queues: dict[int, QueueUmem] = {}
        self.slots: dict[int, object] = {}  # slot -> XdpPort
        # The guests' MACs, for the bursts to spot guest-to-guest frames (gw_local).
        self.macs = ffi.new("uint64_t[]", max_devices)
        self.nmacs = ffi.new("unsigned *")
        # MAC -> [how the filter was added, ports using it]: two devices may share
        # a MAC in different VLANs, and the NIC's filter holds each MAC once.
        self.filters: dict[str, list] = {}
        try:
            self.tap = FloodTap(self.name, self.flood)
        except BaseException:
            try:
                self.program.close()
            finally:
                self.owner.release()
            raise
        log.info("%s: XDP program compiled in %.2f s (by a child process), attached (%s "
                 "mode), %d queues", self.name, self.program.compile_s, self.program.mode,
                 self.link.rx_queues)

    @property
    def nqueues(self) -> int:
        return self.link.rx_queues

    def free_slot(self) -> int:
        for slot in range(self.program.max_devices):
            if slot not in self.slots:
                return slot
        raise link.LinkError(f"{self.name}: all {self.program.max_devices} device slots in use")

    def add_port(self, slot: int, port) -> None:
        self.slots[slot] = port
        self._sync_macs()
        self._sync_share()

    def remove_port(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._sync_macs()
        self._sync_share()

    def _sync_share(self) -> None:
        """Each device may hold share() frames of a queue's UMEM unconsumed; see share()."""
        self.program.set_share(share(len(self.slots)))

    def _sync_macs(self) -> None:
        macs = [steer_key(p.mac, p.vlan) for p in self.slots.values()]
        self.nmacs[0] = 0  # bursts see a shorter table while it is rewritten, never junk
        for i, m in enumerate(macs):
            self.macs[i] = m
        self.nmacs[0] = len(macs)

    def add_filter(self, mac: str) -> None:
        """Make the NIC accept unicast to `mac` (counted: one entry for all its users)."""
        entry = self.filters.get(mac)
        if entry is None:
            how = link.add_mac_filter(self.name, mac)
            self.filters[mac] = [how, 1]
            if how == "promisc":
                self._record_promisc()
        else:
            entry[1] += 1

    def remove_filter(self, mac: str) -> None:
        entry = self.filters.get(mac)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.filters[mac]
            link.remove_mac_filter(self.name, mac, entry[0])
            if entry[0] == "promisc":
                self._record_promisc()

    def _record_promisc(self) -> None:
        """Keep the lock file saying whether promiscuous mode is on by our doing."""
        self.owner.write(PROMISC + "\n" if link.promisc_ours(self.name) else "")

    def flood(self, frame: bytes, vlan: int = 0, sender=None) -> None:
        """A broadcast or multicast frame (untagged, of VLAN `vlan`, 0 = untagged):
        every other running guest of that VLAN gets it."""
        for port in list(self.slots.values()):
            if port is not sender and port.vlan == vlan:
                port.give(frame)

    def deliver_local(self, frames: list[bytes], sender) -> None:
        """Frames a guest sent to other guests on this NIC (the wire will not
        bring them back): group frames to all others of its VLAN, unicast to its
        owner in that VLAN."""
        vlan = sender.vlan
        # During a migration two ports share a MAC: the one steered to wins.
        ports = sorted((p for p in self.slots.values() if p.vlan == vlan),
                       key=lambda p: getattr(p, "steering", True))
        by_mac = {bytes.fromhex(p.mac.replace(":", "")): p for p in ports}
        for f in frames:
            if f[0] & 1:
                self.flood(f, vlan, sender)
            else:
                port = by_mac.get(f[:6])
                if port is not None and port is not sender:
                    port.give(f)

    def socket_on(self, queue: int) -> tuple[QueueUmem, XskSocket]:
        """A new socket on `queue`, on the queue's shared UMEM."""
        qu = self.queues.get(queue)
        if qu is None:
            qu = self.queues[queue] = QueueUmem.create(queue)
        sock = XskSocket(self.name, queue, qu.umem, rx_size=RING_SIZE, tx_size=RING_SIZE,
                         first=not qu.sockets, busy_wait=2.0)
        if not qu.sockets:
            qu.native.fd = sock.fd
            lib.gw_umemq_refill(qu.native)  # lend the kernel frames before anything arrives
        qu.sockets.append(sock)
        return qu, sock

    def release_socket(self, qu: QueueUmem, sock: XskSocket) -> None:
        sock.close()
        qu.sockets.remove(sock)
        if not qu.sockets:  # libxdp unmapped fill/comp with the last socket: start afresh
            qu.umem.close()
            del self.queues[qu.queue]

    def close(self) -> None:
        """Detach the program and free every UMEM; devices must be detached first.
        The NIC's lock goes last, whatever failed before it."""
        try:
            self.tap.close()
            for qu in list(self.queues.values()):
                for sock in list(qu.sockets):
                    self.release_socket(qu, sock)
            self.program.close()
            log.info("%s: XDP program detached", self.name)
        finally:
            self.owner.release()
