"""A named virtio-net device: what outlives any one front-end connection.

The device keeps its name, queue count, offered features and port for its
whole life, so a front-end that reconnects gets the same device and the same
feature offer. Per connection it turns the negotiated ring set-up into
VirtQueues and one worker per queue pair, and fires the registry's
new/destroy callbacks when queue pair 0 starts or stops moving frames (the
seed's rule: both rings of the first pair have a back-end).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.datapath.port import Port
from gateway.datapath.worker import QueuePairWorker
from gateway.vhost._state import RingState
from gateway.vhost.backend import Refused, VhostConnection
from gateway.vhost.dirtylog import covers
from gateway.vhost.memory import MemoryTableError
from gateway.vhost.protocol import VRING_F_LOG, ProtocolError
from gateway.virtio import features as vf
from gateway.virtio.features import Net
from gateway.virtio.ring import VirtQueue, packed_base, ring_aligns, ring_sizes, valid_size

if TYPE_CHECKING:
    from gateway.registry import Registry

log = logging.getLogger(__name__)

# Any of these makes the guest hand us partial checksums or GSO frames.
OFFLOAD_TX = vf.mask(Net.CSUM, Net.HOST_TSO4, Net.HOST_TSO6)
# Frames whose checksum we completed, GSO frames segmented, the segments they
# became, and received frames the guest was told need no checksum check.
OFFLOAD_COUNTERS = ("tx_csum", "tx_gso", "tx_gso_segs", "rx_csum_valid")

class VhostDevice:
    def __init__(
        self,
        name: str,
        *,
        port: Port,
        queue_pairs: int = 1,
        features: int = vf.SUPPORTED_FEATURES,
        protocol_features: int = vf.SUPPORTED_PROTOCOL_FEATURES,
        max_mtu: int = 65535,
        registry: Registry | None = None,
    ) -> None:
        if not 1 <= queue_pairs <= 128:
            raise ValueError(f"queue pairs must be 1..128, not {queue_pairs}")
        self.name = name
        self.port = port
        self.queue_pairs = queue_pairs
        self.features = features if _offloads(port) else features & ~vf.OFFLOADS
        self.protocol_features = protocol_features
        self.max_mtu = max_mtu
        self.registry = registry
        self.conn: VhostConnection | None = None
        self.workers: dict[int, tuple[QueuePairWorker, tuple]] = {}
        self.running = False
        self.broken_reason: str | None = None
        # Times a guest broke this device: the mark itself is cleared by the next
        # session, so without a count a guest that keeps lying leaves no trace.
        self.broken_total = 0
        self.negotiated_features = 0
        self.counters = {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0}
        self.drops = {"tx_too_big": 0, "tx_short": 0, "rx_too_big": 0, "rx_no_room": 0,
                      "tx_bad_csum": 0, "tx_bad_gso": 0}
        self.offload = dict.fromkeys(OFFLOAD_COUNTERS, 0)
        # Guest pages written while a migration logged but beyond the log (not marked).
        self.log_miss = 0
        self._no_notify: set[int] = set()  # ring indexes the application polls
        self._ever_negotiated = False
        self._rarp: list[bytes] = []
        # Queue pairs a guest broke, with the ring key they broke under: they
        # stay stopped until the front-end sets a ring up anew (a device reset).
        self._broken_at: dict[int, tuple] = {}
        # Set by the transport: runs apply() on its thread, from a worker's.
        self.on_broken: Callable[[], None] = lambda: None
        self._lock = threading.Lock()

    # -- public API (the seed's per-device calls) -------------------------------------

    @property
    def state(self) -> str:
        if self.broken_reason:
            return "broken"
        return "running" if self.running else "waiting"

    def enable_guest_notification(self, queue_id: int, enable: bool) -> None:
        """The seed's rte_vhost_enable_guest_notification: with enable=False the
        guest is asked not to kick this ring and the worker polls it instead."""
        if not 0 <= queue_id < 2 * self.queue_pairs:
            raise ValueError(f"{self.name}: no queue {queue_id}")
        if enable:
            self._no_notify.discard(queue_id)
        else:
            self._no_notify.add(queue_id)

    def feature_enable(self, mask: int) -> None:
        """Offer more features; only supported bits, and only before any front-end
        negotiated, so a reconnecting front-end sees the same offer."""
        self._check_feature_change()
        supported = vf.SUPPORTED_FEATURES if _offloads(self.port) else \
            vf.SUPPORTED_FEATURES & ~vf.OFFLOADS
        if mask & ~supported:
            raise ValueError(f"unsupported features: {vf.names(mask & ~supported)}")
        self.features |= mask

    def feature_disable(self, mask: int) -> None:
        self._check_feature_change()
        self.features &= ~mask

    def stats(self) -> dict:
        """Counters of all connections so far plus the live workers."""
        with self._lock:
            out = dict(self.counters)
            drops = dict(self.drops)
            offload = dict(self.offload)
            log_miss = self.log_miss
            for w, _ in self.workers.values():
                _add_worker_stats(out, drops, w, offload)
                log_miss += w.rxq.stats["log_miss"] + w.txq.stats["log_miss"]
        out["drops"] = drops
        out["offload"] = offload
        out["log_miss"] = log_miss
        out["broken_total"] = self.broken_total
        return out

    # -- called by the connection (backend.Device protocol) ---------------------

    def attach(self, conn: VhostConnection) -> None:
        if self.conn is not None and not self.conn.closed:
            raise RuntimeError(f"{self.name} already has a front-end")
        self.conn = conn
        self.broken_reason = None
        self._broken_at.clear()

    def detach(self, conn: VhostConnection) -> None:
        conn.close()
        if self.conn is conn:
            if conn.features_set:
                self.negotiated_features = 0
            self.conn = None

    def pause(self, conn: VhostConnection, qps: set[int] | None) -> None:
        for qp in list(self.workers):
            if qps is None or qp in qps:
                self._stop_worker(conn, qp)

    def apply(self, conn: VhostConnection) -> None:
        if conn.features_set:
            self.negotiated_features = conn.acked_features
            self._ever_negotiated = True
        keys = [(conn.rings[2 * qp].version, conn.rings[2 * qp + 1].version,
                 conn.memory.version, conn.acked_features, conn.log_version)
                for qp in range(self.queue_pairs)]
        with self._lock:
            for qp, key in list(self._broken_at.items()):
                if not conn.closed and keys[qp] != key:  # the front-end set the ring up anew
                    del self._broken_at[qp]
            if self.broken_reason is not None and self._broken_at == {} and not conn.closed:
                log.warning("%s: the front-end reset its rings: running again", self.name)
                self.broken_reason = None
        for qp in range(self.queue_pairs):
            rx, tx = conn.rings[2 * qp], conn.rings[2 * qp + 1]
            want = (
                not conn.closed
                and self.broken_reason is None
                and conn.ring_runs(rx)
                and conn.ring_runs(tx)
            )
            key = keys[qp]
            if qp in self.workers and (not want or self.workers[qp][1] != key):
                self._stop_worker(conn, qp)
            if want and qp not in self.workers:
                self._start_worker(conn, qp, key)
        self._set_running(0 in self.workers)

    def set_mtu(self, mtu: int) -> None:
        if mtu > self.max_mtu:
            raise Refused(f"MTU {mtu} is larger than {self.name} can carry ({self.max_mtu})")

    def send_rarp(self, mac: bytes) -> None:
        """After a migration the front-end asks us to announce the guest's MAC."""
        frame = rarp_frame(mac)
        if 0 in self.workers:
            self.workers[0][0].post(frame)
        else:
            self._rarp.append(frame)

    # -- internals ----------------------------------------------------------------

    def _check_feature_change(self) -> None:
        if self._ever_negotiated:
            raise RuntimeError(
                f"{self.name}: features are fixed once a front-end negotiated them"
            )

    def _set_running(self, running: bool) -> None:
        if running == self.running:
            return
        self.running = running
        log.info("%s: %s", self.name, "running" if running else "stopped")
        set_running = getattr(self.port, "set_running", None)  # ports that gate the wire
        if set_running is not None:
            set_running(running)
        if self.registry is not None:
            self.registry.notify(self, running)

    def _vq(self, conn: VhostConnection, index: int) -> VirtQueue:
        ring = conn.rings[index]
        size, addr = ring.size, ring.addr
        assert size is not None and addr is not None  # ring_runs checked
        acked = conn.acked_features
        # Packed: SET_VRING_ADDR's desc/avail/used are the descriptor ring and
        # the driver and device event areas.
        packed = bool(acked >> Net.RING_PACKED & 1)
        if not valid_size(size, packed):
            # a size taken while packed was negotiated, then features changed
            raise ProtocolError(f"ring {index}: size {size} is not a power of two")
        hosts, spans = {}, []
        for what, qva, align, length in zip(
            ("desc", "avail", "used"),
            (addr.desc, addr.avail, addr.used),
            ring_aligns(packed),
            ring_sizes(size, packed),
            strict=True,
        ):
            if qva % align:
                raise ProtocolError(f"ring {index}: {what} address {qva:#x} is misaligned")
            try:
                hosts[what] = conn.memory.qva_to_host(qva, length)
            except MemoryTableError as e:
                raise ProtocolError(f"ring {index}: {what} ring: {e}") from None
            for other, start, n in spans:
                # A used ring over the descriptor table (or any two parts sharing
                # bytes) would have our used entries rewrite what C reads as
                # descriptors: the guest gets a ring that lies by construction.
                if qva < start + n and start < qva + length:
                    raise ProtocolError(f"ring {index}: {what} ring at {qva:#x}+{length} "
                                        f"overlaps the {other} ring at {start:#x}+{n}")
            spans.append((what, qva, length))
        _check_other_rings(conn, index, spans, packed)
        if packed:  # the base may predate the size (or the features)
            try:
                packed_base(ring.base, size)
            except ValueError as e:
                raise ProtocolError(f"ring {index}: {e}") from None
        log, log_used_gpa = None, None
        if acked >> Net.LOG_ALL & 1 and conn.log is not None:
            log = conn.log
            if addr.flags & VRING_F_LOG:
                # The spec lets log_guest_addr lie outside guest memory, but the
                # bit of the used ring's last byte must be inside the log.
                used_len = ring_sizes(size, packed)[2]
                if not covers(log.size, addr.log, used_len):
                    raise ProtocolError(f"ring {index}: used ring logged at {addr.log:#x}+"
                                        f"{used_len} is beyond the {log.size}-byte log")
                log_used_gpa = addr.log
        return VirtQueue(
            mem=conn.memory.native,
            size=size,
            desc=hosts["desc"],
            avail=hosts["avail"],
            used=hosts["used"],
            last_avail=ring.base,
            hdr_len=vf.net_hdr_len(acked),
            mrg_rxbuf=bool(acked >> Net.MRG_RXBUF & 1),
            event_idx=bool(acked >> Net.RING_EVENT_IDX & 1),
            indirect=bool(acked >> Net.RING_INDIRECT_DESC & 1),
            callfd=-1 if ring.call is None else ring.call,
            # TX rings are the odd ones; what each offload bit asks is in gw_xskq.c
            offload=bool(index % 2 and acked & OFFLOAD_TX),
            guest_csum=bool(index % 2 == 0 and acked >> Net.GUEST_CSUM & 1),
            log=log,
            log_used_gpa=log_used_gpa,
            packed=packed,
            desc_gpa=conn.memory.qva_to_gpa(addr.desc, 16 * size) if packed else 0,
        )

    def _start_worker(self, conn: VhostConnection, qp: int, key: tuple) -> None:
        rx, tx = conn.rings[2 * qp], conn.rings[2 * qp + 1]
        try:
            rxq, txq = self._vq(conn, rx.index), self._vq(conn, tx.index)
        except ProtocolError as e:
            # Ring addresses come from the guest's driver: refusing them is a
            # guest lie like a bad descriptor, so the operator sees it the same way.
            self._mark_broken(qp, str(e))
            with self._lock:
                self._broken_at[qp] = key
            raise
        w = QueuePairWorker(
            f"{self.name}/q{qp}",
            rxq=rxq,
            txq=txq,
            rx_kick=None if rx.polling else rx.kick,
            tx_kick=None if tx.polling else tx.kick,
            port=self.port.queue(qp),
            on_broken=lambda reason, qp=qp: self._broken(qp, reason),
            notify=lambda: (rx.index not in self._no_notify, tx.index not in self._no_notify),
        )
        if qp == 0:
            for frame in self._rarp:
                w.post(frame)
            self._rarp.clear()
        with self._lock:
            self.workers[qp] = (w, key)
        w.start()

    def _stop_worker(self, conn: VhostConnection, qp: int) -> None:
        w, _ = self.workers[qp]
        w.stop()
        with self._lock:
            del self.workers[qp]
            _add_worker_stats(self.counters, self.drops, w, self.offload)
            self.log_miss += w.rxq.stats["log_miss"] + w.txq.stats["log_miss"]
        conn.rings[2 * qp].base = w.rxq.last_avail
        conn.rings[2 * qp + 1].base = w.txq.last_avail

    def _mark_broken(self, qp: int, reason: str) -> None:
        with self._lock:
            self.broken_reason = f"queue pair {qp}: {reason}"
            self.broken_total += 1
        log.error("%s: broken: %s", self.name, self.broken_reason)

    def _broken(self, qp: int, reason: str) -> None:
        """A worker found the guest lying. Runs on the worker's thread.

        Like the kernel's vhost-net: the queue stops, the front-end hears of it
        through the rings' error eventfds (QEMU logs "vhost vring error"), and
        the connection stays: the guest's next device reset sets the rings up
        anew and apply() starts them again. Closing the connection instead
        would leave a QEMU that does not reconnect without a network until it
        restarts."""
        self._mark_broken(qp, reason)
        conn = self.conn
        if conn is not None:
            with self._lock:
                self._broken_at[qp] = self.workers[qp][1] if qp in self.workers else ()
            for ring in (conn.rings[2 * qp], conn.rings[2 * qp + 1]):
                if ring.err is not None:
                    try:
                        os.eventfd_write(ring.err, 1)
                    except OSError:
                        pass
        self.on_broken()


def _check_other_rings(conn: VhostConnection, index: int, spans: list[tuple[str, int, int]],
                       packed: bool) -> None:
    """Refuse a ring that shares bytes with another started ring.

    Two queues over the same bytes would have one worker's used entries (or
    its descriptor reads) land in another ring's parts, from two threads: the
    guest gets rings that lie by construction, and what each worker reads is
    written by the other. QEMU and DPDK place every ring apart. A ring
    started later is checked against this one when it starts; stopped rings
    (GET_VRING_BASE) are not checked, as a device reset moves them."""
    for other in conn.rings:
        if (other.index == index or other.state is not RingState.STARTED
                or other.size is None or other.addr is None):
            continue
        a = other.addr
        for o_what, o_start, o_len in zip(("desc", "avail", "used"), (a.desc, a.avail, a.used),
                                          ring_sizes(other.size, packed), strict=True):
            for what, start, length in spans:
                if start < o_start + o_len and o_start < start + length:
                    raise ProtocolError(
                        f"ring {index}: {what} ring at {start:#x}+{length} overlaps "
                        f"ring {other.index}'s {o_what} ring at {o_start:#x}+{o_len}")


def _offloads(port: Port) -> bool:
    """Does the port complete checksums and segment GSO frames (gw_xskq.c)?"""
    return bool(getattr(port, "offloads", False))


def _add_worker_stats(counters: dict, drops: dict, w: QueuePairWorker, offload: dict) -> None:
    rx, tx = w.rxq.stats, w.txq.stats
    counters["rx_packets"] += rx["packets"]
    counters["rx_bytes"] += rx["bytes"]
    counters["tx_packets"] += tx["packets"]
    counters["tx_bytes"] += tx["bytes"]
    drops["tx_too_big"] += tx["drop_too_big"]
    drops["tx_short"] += tx["drop_short"]
    drops["rx_too_big"] += rx["drop_too_big"]
    drops["rx_no_room"] += rx["drop_no_room"]
    drops["tx_bad_csum"] += tx["drop_bad_csum"]
    drops["tx_bad_gso"] += tx["drop_bad_gso"]
    for key in ("tx_csum", "tx_gso", "tx_gso_segs"):
        offload[key] += tx[key]
    offload["rx_csum_valid"] += rx["rx_csum_valid"]


def rarp_frame(mac: bytes) -> bytes:
    """A RARP request announcing `mac`, as QEMU's self-announce sends it."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
    return (eth + body).ljust(60, b"\0")

