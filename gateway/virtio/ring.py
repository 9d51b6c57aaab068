"""Python face of the C split-ring code in ``gateway._native``.

Python owns the slow decisions (ring geometry, feature bits, what to do with a
broken queue); C owns the per-packet loop. The objects here only marshal
arguments so that each burst is a single ``lib.`` call, which cffi runs with
the GIL released: one worker thread per queue can then run in parallel.
"""

from __future__ import annotations

import mmap

# Re-exported: callers build their struct gw_mem with the same ffi.
from gateway._native import ffi, lib

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "FrameBuffer",
    "RingBroken",
    "VirtQueue",
    "ffi",
    "lib",
    "packed_base",
    "ring_sizes",
    "valid_size",
]

# virtio 1.x, 2.7: alignment the driver must give each ring part.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768
# The largest GSO frame a guest may send: 64 KiB of IP packet plus Ethernet
# and a VLAN tag.
BIG_FRAME = 65536 + 18

_ERROR_NAMES = {
    lib.GW_E_OK: "GW_E_OK",
    lib.GW_E_AVAIL_IDX: "GW_E_AVAIL_IDX",
    lib.GW_E_HEAD_IDX: "GW_E_HEAD_IDX",
    lib.GW_E_DESC_IDX: "GW_E_DESC_IDX",
    lib.GW_E_CHAIN_LOOP: "GW_E_CHAIN_LOOP",
    lib.GW_E_DESC_ADDR: "GW_E_DESC_ADDR",
    lib.GW_E_INDIRECT: "GW_E_INDIRECT",
    lib.GW_E_DIRECTION: "GW_E_DIRECTION",
    lib.GW_E_BUF_ID: "GW_E_BUF_ID",
    lib.GW_E_WRAP: "GW_E_WRAP",
    lib.GW_E_CHAIN_LONG: "GW_E_CHAIN_LONG",
}

# Sub-reasons of GW_E_INDIRECT, err_detail bits 32..39 (see gw_ring.c).
_INDIRECT_WHY = {
    1: "indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC not negotiated",
    2: "nested indirect table",
    3: "INDIRECT together with NEXT",
    4: "indirect table len not a non-zero multiple of 16 (at most 1024 entries)",
    5: "indirect descriptor at the end of a packed chain (allowed only alone)",
}


def valid_size(size: int, packed: bool = False) -> bool:
    """A split ring's size must be a power of two (C masks indices with
    size-1); a packed ring's positions wrap explicitly, so any size will do."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        return False
    return packed or size & (size - 1) == 0


def ring_sizes(size: int, packed: bool = False) -> tuple[int, int, int]:
    """Bytes of (desc, avail, used), counting the event-idx u16 at each end.

    The trailing u16 is counted whether or not EVENT_IDX is negotiated, as the
    spec's sizes do, so the range checks Python makes cover what C may touch.
    A packed ring has the descriptor ring and two 4-byte event areas
    (driver's in place of avail, device's in place of used).
    """
    if packed:
        return 16 * size, 4, 4
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def ring_aligns(packed: bool = False) -> tuple[int, int, int]:
    """Alignment of (desc, avail, used): virtio 1.2, 2.7 and 2.8.10.1."""
    return (DESC_ALIGN, 4, 4) if packed else (DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN)


def packed_base(num: int, size: int) -> int:
    """A packed ring's SET_VRING_BASE value, reduced to what we keep.

    Bits 0-14 are the next descriptor to read, bit 15 its wrap counter
    (vhost-user.rst); QEMU also sends the used position in bits 16-31. We
    publish every chain we take before a queue stops, so the used position
    always equals the avail one, and the low 16 bits say both."""
    base = num & 0xFFFF
    if base & 0x7FFF >= size:
        raise ValueError(f"packed base {base & 0x7FFF} >= queue size {size}")
    return base


class RingBroken(Exception):
    """The guest broke the ring protocol; the queue refuses all further work.

    Callers mark the device as needing reset rather than guessing a recovery:
    after a lie we cannot know which of our earlier reads were true.
    """

    def __init__(self, message: str, code: int = 0, detail: int = 0):
        super().__init__(message)
        self.code = code
        self.detail = detail


class FrameBuffer:
    """Frame slots in one anonymous mmap, addressed by (base, offs, lens).

    One mapping and integer offsets let C reach every slot without Python
    objects, and the same layout can later be shared with an AF_XDP UMEM.
    """

    def __init__(self, nframes: int, frame_size: int = 2048):
        if nframes <= 0 or frame_size <= 0:
            raise ValueError("nframes and frame_size must be positive")
        self.nframes = nframes
        self.frame_size = frame_size
        self._map = mmap.mmap(-1, nframes * frame_size)
        # from_buffer keeps the mmap exported (and so mapped) while base lives.
        self.base = ffi.from_buffer("uint8_t[]", self._map, require_writable=True)
        self.offs = ffi.new("uint64_t[]", [i * frame_size for i in range(nframes)])
        self.lens = ffi.new("uint32_t[]", nframes)

    def frame(self, i: int) -> bytes:
        off = self.offs[i]
        return self._map[off : off + self.lens[i]]

    def put(self, i: int, data: bytes) -> None:
        if len(data) > self.frame_size:
            raise ValueError(f"frame of {len(data)} bytes > slot of {self.frame_size}")
        off = self.offs[i]
        self._map[off : off + len(data)] = data
        self.lens[i] = len(data)


class VirtQueue:
    """One device-side split ring; thin so a burst costs one C call.

    Not thread-safe: each queue belongs to one worker thread. ``mem`` must
    outlive the queue and must not change under a running burst (the caller
    swaps tables only while the queue is stopped).
    """

    def __init__(
        self,
        *,
        mem,
        size: int,
        desc: int,
        avail: int,
        used: int,
        last_avail: int = 0,
        hdr_len: int = 12,
        mrg_rxbuf: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        callfd: int = -1,
        offload: bool = False,
        guest_csum: bool = False,
        log=None,
        log_used_gpa: int | None = None,
        packed: bool = False,
        desc_gpa: int = 0,
    ):
        if not valid_size(size, packed):
            raise ValueError(f"bad queue size {size}")
        if packed:
            last_avail = packed_base(last_avail, size)
        self._mem = mem  # C holds a raw pointer to it
        vq = ffi.new("struct gw_vq *")
        vq.mem = mem
        vq.desc = ffi.cast("uint8_t *", desc)
        vq.avail = ffi.cast("uint8_t *", avail)
        vq.used = ffi.cast("uint8_t *", used)
        vq.size = size
        vq.hdr_len = hdr_len
        vq.mrg_rxbuf = bool(mrg_rxbuf)
        vq.event_idx = bool(event_idx)
        vq.indirect = bool(indirect)
        vq.callfd = callfd
        # Dirty logging (live migration): `log` is a DirtyLog kept alive here,
        # used-ring writes are logged only when the ring asked (VRING_F_LOG).
        self._log = log
        if log is not None:
            vq.log = log.ptr
            vq.log_size = log.size
            if log_used_gpa is not None:
                vq.log_used = 1
                vq.log_used_gpa = log_used_gpa
        vq.last_avail = last_avail & 0xFFFF
        # TX with CSUM/HOST_TSO: headers are read and a GSO frame of up to
        # 64 KiB (plus headers) waits in big while it is segmented.
        vq.offload = bool(offload)
        vq.guest_csum = bool(guest_csum)
        self._big = None
        if offload:
            self._big = ffi.new("uint8_t[]", BIG_FRAME)
            vq.big, vq.big_cap = self._big, BIG_FRAME
        if packed:
            # Position and wrap counter, used = avail (see packed_base); the
            # shadow holds a burst's used elements, at most one per descriptor.
            vq.packed = 1
            vq.last_avail = last_avail & 0x7FFF
            vq.avail_wrap = last_avail >> 15
            vq.used_idx = vq.last_avail
            vq.used_wrap = vq.avail_wrap
            vq.desc_gpa = desc_gpa
            self._shadow = ffi.new("struct gw_used_elem[]", size)
            vq.shadow = self._shadow
        else:
            # Resume from what the guest last saw as used (as DPDK does): after a
            # reconnect our own count is gone, the ring's is the truth.
            vq.used_idx = ffi.cast("uint16_t *", vq.used + 2)[0]
        self._vq = vq

    # --- bursts -----------------------------------------------------------

    def tx_burst(self, buf: FrameBuffer, n: int | None = None) -> int:
        """Guest TX into buf slots 0..n-1; returns frames written."""
        n = buf.nframes if n is None else min(n, buf.nframes)
        r = lib.gw_vq_tx_burst(self._vq, buf.base, buf.offs, buf.frame_size, buf.lens, n)
        return self._check(r)

    def rx_burst(self, buf: FrameBuffer, start: int, count: int) -> int:
        """buf slots start..start+count-1 to the guest; returns frames consumed.

        Consumed means delivered or dropped as too big; the rest were not
        touched because the guest ran out of buffers, so the caller keeps them.
        """
        if start < 0 or count < 0 or start + count > buf.nframes:
            raise IndexError(f"frames {start}..{start + count} outside 0..{buf.nframes}")
        r = lib.gw_vq_rx_burst(self._vq, buf.base, buf.offs + start, buf.lens + start, count)
        return self._check(r)

    # --- notifications ----------------------------------------------------

    def call(self) -> bool:
        """Interrupt the guest if it wants one for what we added since last time."""
        return self._check(lib.gw_vq_call(self._vq)) == 1

    def set_notify(self, enable: bool) -> int:
        """Turn guest kicks on/off; returns entries pending after the change.

        Re-checking after enabling closes the race where the guest added a
        buffer while it still believed we did not want kicks.
        """
        return self._check(lib.gw_vq_set_notify(self._vq, 1 if enable else 0))

    def pending(self) -> int:
        return self._check(lib.gw_vq_pending(self._vq))

    # --- state ------------------------------------------------------------

    @property
    def last_avail(self) -> int:
        """For GET_VRING_BASE: where a restarted backend must resume (packed:
        the position with its wrap counter in bit 15)."""
        vq = self._vq
        if vq.packed:
            return vq.last_avail | vq.avail_wrap << 15
        return vq.last_avail

    @property
    def used_idx(self) -> int:
        return self._vq.used_idx

    @property
    def walked(self) -> int:
        """Descriptors the last burst read (ring and indirect): <= GW_BURST_WALK."""
        return self._vq.walked

    @property
    def walked_total(self) -> int:
        """Descriptors read over the queue's life (the worker's throttle)."""
        return self._vq.walked_total

    @property
    def walked_max(self) -> int:
        """The most descriptors any burst of this queue read."""
        return self._vq.walked_max

    @property
    def error(self) -> int:
        return self._vq.error

    @property
    def error_text(self) -> str:
        return error_text(self._vq.error, self._vq.err_detail, self._vq.size)

    @property
    def stats(self) -> dict[str, int]:
        vq = self._vq
        return {
            "packets": vq.packets,
            "bytes": vq.bytes,
            "drop_too_big": vq.drop_too_big,
            "drop_short": vq.drop_short,
            "drop_no_room": vq.drop_no_room,
            "drop_bad_csum": vq.drop_bad_csum,
            "drop_bad_gso": vq.drop_bad_gso,
            "tx_csum": vq.tx_csum,
            "tx_gso": vq.tx_gso,
            "tx_gso_segs": vq.tx_gso_segs,
            "rx_csum_valid": vq.rx_csum_valid,
            "log_miss": vq.log_miss,
        }

    @property
    def native(self):
        """The struct gw_vq, for C bursts that drive this ring (AF_XDP ports)."""
        return self._vq

    def check(self, r: int) -> int:
        """Turn a -1 from a C call on this ring into RingBroken."""
        return self._check(r)

    def _check(self, r: int) -> int:
        if r < 0:
            vq = self._vq
            raise RingBroken(self.error_text, vq.error, vq.err_detail)
        return r


def error_text(code: int, detail: int, size: int) -> str:
    """Say which guest value was wrong; logs are all an operator gets."""
    name = _ERROR_NAMES.get(code, f"GW_E_{code}")
    if code == lib.GW_E_OK:
        return "GW_E_OK: no error"
    if code == lib.GW_E_AVAIL_IDX:
        why = f"avail idx {detail} is more than queue size {size} ahead"
    elif code == lib.GW_E_HEAD_IDX:
        why = f"head index {detail} >= queue size {size}"
    elif code == lib.GW_E_DESC_IDX:
        why = f"next index {detail} >= descriptor table size"
    elif code == lib.GW_E_CHAIN_LOOP:
        why = f"chain reached {detail} descriptors, more than its table holds: a loop"
    elif code == lib.GW_E_DESC_ADDR:
        why = f"buffer at GPA {detail:#x} not inside guest memory (or addr+len wraps)"
    elif code == lib.GW_E_INDIRECT:
        reason = _INDIRECT_WHY.get(detail >> 32, f"reason {detail >> 32}")
        why = f"{reason} (len {detail & 0xFFFFFFFF})"
    elif code == lib.GW_E_DIRECTION:
        why = f"descriptor flags {detail:#x} have the wrong direction for this queue"
    elif code == lib.GW_E_BUF_ID:
        why = f"packed buffer id {detail} >= queue size {size}"
    elif code == lib.GW_E_WRAP:
        why = (f"descriptor flags {detail:#x} in a packed chain are not available "
               "in the chain's wrap")
    elif code == lib.GW_E_CHAIN_LONG:
        why = f"chain reached {detail} descriptors, more than {lib.GW_MAX_CHAIN_READS}"
    else:
        why = f"detail {detail:#x}"
    return f"{name}: {why}"
