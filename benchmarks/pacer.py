"""A paced guest for the zero-loss throughput search (performance issue 5).

DPDK 22.11 testpmd cannot offer a chosen rate, so the guest is ours: the
Python test front-end does the vhost-user handshake and owns guest memory,
and a small C loop (pacer.c, compiled with cffi on first use) posts frames on
the TX ring at a fixed rate. A frame due while every descriptor is still
with the back-end is dropped and counted: the back-end did not drain the
ring as fast as the guest offered.

    with PacedGuest(sock, 64, dst_mac=topo.peer_mac, cpu=SOURCE_CPU) as g:
        rate, trials = zero_loss_search(wire_trial(g, topo, 2.0), 10_000, 2_000_000)
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import math
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable

from gateway.testing.frontend import BUF_SIZE, Frontend
from gateway.testing.guestnet import ipv4, mac_bytes, udp
from gateway.testing.vring_driver import DriverRing
from gateway.virtio.features import Net, mask

HERE = pathlib.Path(__file__).resolve().parent
GUEST_MAC = "52:54:00:be:00:01"  # benchmarks/setups.py's, without importing the XDP stack
# RFC 2544's benchmark range: the far host is not 198.19.0.1 and does not
# forward, so it drops the frames after counting them and never answers
# (a UDP port it owned would cost it an ICMP error per frame).
SRC_IP, DST_IP = "198.18.0.1", "198.19.0.1"

# The split ring with one descriptor per frame is all pacer.c drives: no
# RING_PACKED, no IN_ORDER (its batched used entries would miscount), and no
# offloads a UDP blast has no use for.
WANT = mask(Net.VERSION_1, Net.ANY_LAYOUT, Net.MRG_RXBUF, Net.RING_EVENT_IDX,
            Net.PROTOCOL_FEATURES)

_ERRORS = {
    -1: "used->idx moved past the frames in flight",
    -2: "used entry with a descriptor id >= ring size",
    -3: "used entry for a descriptor not in flight",
    -4: "writing the kick eventfd failed",
}


@functools.cache
def _native():
    """(ffi, lib), compiled once per process; the C stays in pacer.c for editing."""
    import cffi  # only the paced guest needs a compiler

    src = (HERE / "pacer.c").read_text()
    struct = re.search(r"^struct pacer \{.*?^\};", src, re.S | re.M).group(0)
    ffi = cffi.FFI()
    ffi.cdef(struct + """
        void pacer_init(struct pacer *p);
        int pacer_run(struct pacer *p, double rate, uint64_t count, uint32_t burst,
                      uint64_t max_late_ns, uint64_t drain_ns, int doze, uint64_t *out);
    """)
    ffi.set_source("_gw_pacer", src, extra_compile_args=["-O2", "-Wall", "-Wextra"])
    tmp = tempfile.mkdtemp(prefix="gw-pacer-")
    try:
        so = ffi.compile(tmpdir=tmp)
        loader = importlib.machinery.ExtensionFileLoader("_gw_pacer", so)
        mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("_gw_pacer", loader))
        loader.exec_module(mod)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded .so stays mapped
    return mod.ffi, mod.lib


def udp_frame(size: int, dst_mac: str, src_mac: str = GUEST_MAC) -> bytes:
    """An Ethernet frame of `size` bytes (no FCS, as testpmd's --txpkts counts)."""
    if size < 42:
        raise ValueError(f"frame of {size} bytes cannot hold Ethernet + IPv4 + UDP (42)")
    data = bytes(size - 42)
    return (mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00"
            + ipv4(SRC_IP, DST_IP, 17, udp(SRC_IP, DST_IP, 9, 9, data)))


class TxRing:
    """pacer.c's view of one TX ring: descriptor i always holds slot i's frame.

    Apart from PacedGuest so tests can play a lying device over plain memory.
    """

    def __init__(self, mem, ring: DriverRing, kick_fd: int, frame: bytes, hdr_len: int) -> None:
        length = hdr_len + len(frame)
        if length > ring.buf_size:
            raise ValueError(f"header + frame = {length} bytes > slot of {ring.buf_size}")
        for i in range(ring.size):
            slot = ring.slot_gpa(i)
            mem[slot : slot + length] = bytes(hdr_len) + frame
            ring.write_desc(i, slot, length)
        self.size = ring.size
        ffi, lib = _native()
        self._mem = ffi.from_buffer("uint8_t[]", mem, require_writable=True)
        self._free = ffi.new("uint16_t[]", ring.size)
        self._inflight = ffi.new("uint8_t[]", ring.size)
        self._p = ffi.new("struct pacer *", {
            "mem": self._mem, "avail_gpa": ring.avail_gpa, "used_gpa": ring.used_gpa,
            "size": ring.size, "kick_fd": kick_fd, "event_idx": int(ring.event_idx),
            "free_ids": self._free, "inflight": self._inflight})
        lib.pacer_init(self._p)

    @property
    def in_flight(self) -> int:
        """Frames posted that the device has not returned yet."""
        return self.size - self._p.nfree

    @property
    def kicks(self) -> int:
        return self._p.kicks

    def run(self, rate: float, count: int, burst: int, max_late: float, drain: float,
            sleep: bool = False) -> tuple[int, int, int, float]:
        """pacer_run: (sent, dropped, skipped, max lag in seconds); RuntimeError on a lie."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")  # C would spin
        ffi, lib = _native()
        out = ffi.new("uint64_t[4]")
        rc = lib.pacer_run(self._p, rate, count, burst, int(max_late * 1e9), int(drain * 1e9),
                           sleep, out)
        if rc:
            raise RuntimeError(f"TX ring broken: {_ERRORS.get(rc, rc)}")
        return out[0], out[1], out[2], out[3] / 1e9

    def close(self) -> None:
        """Let go of guest memory: an exported buffer keeps an mmap from closing."""
        if self._mem is not None:
            _native()[0].release(self._mem)
            self._mem = None


class PacedGuest:
    """A vhost-user guest that offers UDP frames on queue pair 0's TX ring at a set rate.

    It polls and asks for no interrupts, like DPDK's virtio PMD in testpmd, so
    the back-ends are measured against the same kind of guest as in bench.py.
    Entering sends one frame and waits until the back-end took it: the first
    trial then measures a running data path, not its start-up.
    """

    def __init__(self, sock: str, size: int = 64, *, dst_mac: str, src_mac: str = GUEST_MAC,
                 cpu: int | None = None, queue_size: int = 256, burst: int = 32,
                 timeout: float = 10.0) -> None:
        self.frame = udp_frame(size, dst_mac, src_mac)
        self.cpu, self.burst, self.timeout = cpu, burst, timeout
        need = 2 * (DriverRing.ring_bytes(queue_size) + 4096 + queue_size * BUF_SIZE)
        mem_size = max(8 << 20, -(-need // (2 << 20)) * (2 << 20))  # whole MiB per region
        self.fe = Frontend(sock, queue_size=queue_size, mem_size=mem_size,
                           want=WANT, timeout=timeout)
        self.tx: TxRing | None = None
        self.last: dict[str, int | float] = {}

    def __enter__(self) -> PacedGuest:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        fe = self.fe.connect().setup()
        if not fe.features & mask(Net.VERSION_1, Net.ANY_LAYOUT):
            raise RuntimeError("back-end negotiated neither VERSION_1 nor ANY_LAYOUT: "
                               "header and frame cannot share a descriptor")
        self.tx = TxRing(fe.mem, fe.rings[1], fe.kicks[1], self.frame, fe.hdr_len)  # qp 0 TX
        if self._run(1e6, 1, self.timeout, self.timeout)[:2] != (1, 0) or self.tx.in_flight:
            raise RuntimeError(f"the back-end did not take a frame within {self.timeout} s")

    def _run(self, rate: float, count: int, max_late: float, drain: float,
             sleep: bool = False) -> tuple[int, int, int]:
        kicks = self.tx.kicks
        old = os.sched_getaffinity(0)
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # this thread only: pid 0 is the caller
        try:
            sent, dropped, skipped, lag = self.tx.run(rate, count, self.burst, max_late, drain,
                                                           sleep)
        finally:
            os.sched_setaffinity(0, old)
        self.last = {"kicks": self.tx.kicks - kicks, "skipped": skipped,
                     "max_lag_us": round(lag * 1e6, 1), "in_flight": self.tx.in_flight}
        return sent, dropped, skipped

    def run(self, rate_pps: float, seconds: float, drain: float = 1.0, sleep: bool = False
            ) -> tuple[int, int, int]:
        """Offer rate_pps * seconds frames; returns (offered, sent, ring_full_drops).

        A burst this thread could not post until half a ring's worth of time
        after its due time is skipped rather than offered late all at once, so
        a preempted pacer does not overflow the ring and blame the back-end;
        offered then falls short of rate * seconds by self.last["skipped"].
        Returns once the back-end gave back every frame or `drain` seconds
        passed (self.last["in_flight"] then says how many it still holds).
        `sleep`: wait between bursts asleep (a background load beside
        others on its CPU), not polling the clock (a rate search).
        """
        if rate_pps <= 0 or seconds <= 0:
            raise ValueError("rate and duration must be positive")
        count = max(1, round(rate_pps * seconds))
        max_late = self.tx.size / 2 / rate_pps
        sent, dropped, skipped = self._run(rate_pps, count, max_late, drain, sleep)
        return count - skipped, sent, dropped

    def close(self) -> None:
        if self.tx is not None:
            self.tx.close()
        self.fe.release()


def wire_trial(guest: PacedGuest, topo, seconds: float, max_skipped: float = 0.01,
               tries: int = 3, settle: float = 2.0) -> Callable[[float], int]:
    """A trial for zero_loss_search: frames offered minus frames on the far veth.

    On two CPUs the pacer shares its CPU with kernel threads (rcu, kdamond,
    ksoftirqd), which take it for milliseconds now and then, so a few skipped
    bursts are normal: a pass stands if the pacer skipped at most
    `max_skipped` of the frames due, i.e. it offered the full rate the rest
    of the time. A pass that skipped more proves nothing and is run again, up
    to `tries` times; if no run was clean the skipped frames count as lost.
    Counting waits until the far end has every frame sent or its counter stood
    still for 0.2 s (at most `settle` s): used entries come back before the
    frames cross the veth.
    """
    def rx() -> int:
        return topo.peer_stats()["rx_packets"]

    def once(rate: float) -> int:
        before = rx()
        _, sent, dropped = guest.run(rate, seconds)
        deadline, last, still = time.monotonic() + settle, rx(), time.monotonic()
        while last - before < sent and time.monotonic() < deadline:
            time.sleep(0.02)
            now = rx()
            if now != last:
                last, still = now, time.monotonic()
            elif time.monotonic() - still > 0.2:
                break
        return dropped + sent - (last - before)

    def trial(rate: float) -> int:
        for _ in range(tries):
            lost = once(rate)
            if lost or guest.last["skipped"] <= max_skipped * rate * seconds:
                return lost
        return guest.last["skipped"]

    return trial


def zero_loss_search(trial: Callable[[float], int], lo_pps: float, hi_pps: float,
                     precision: float = 0.02, max_trials: int = 12
                     ) -> tuple[float, list[tuple[float, int]]]:
    """The highest rate in [lo, hi] where trial(rate) lost nothing, by bisection.

    hi is tried first (a back-end that keeps up needs one trial), then lo
    (0.0 is returned when even lo loses), then geometric midpoints until the
    bracket is within `precision` of the passing rate or max_trials ran out:
    10 kpps..2 Mpps at 2 % takes at most 2 + 9 trials. Returns
    (rate, [(rate, lost), ...] in the order tried). A negative loss means the
    caller counted frames it did not send, so it stops the search.
    """
    if not 0 < lo_pps < hi_pps:
        raise ValueError(f"need 0 < lo < hi, got {lo_pps}, {hi_pps}")
    if max_trials < 2:
        raise ValueError("max_trials must allow trying hi and lo")
    trials: list[tuple[float, int]] = []

    def passes(rate: float) -> bool:
        lost = trial(rate)
        trials.append((rate, lost))
        if lost < 0:
            raise ValueError(f"trial at {rate:.0f} pps lost {lost} frames: counting is off")
        return lost == 0

    if passes(hi_pps):
        return hi_pps, trials
    if not passes(lo_pps):
        return 0.0, trials
    good, bad = lo_pps, hi_pps
    while bad - good > precision * good and len(trials) < max_trials:
        mid = math.sqrt(good * bad)  # precision is relative: halve the bracket's ratio
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good, trials
