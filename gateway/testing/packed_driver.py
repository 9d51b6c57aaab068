"""The driver (guest) side of a virtio packed ring (virtio 1.2, 2.8), in Python.

The packed counterpart of vring_driver.py: tests and the test frontend post
buffers, kick and reap used descriptors as Linux's virtio_ring.c does for a
packed queue, over a writable buffer standing for guest memory at GPA 0, and
can write any descriptor or flag verbatim to lie like a hostile guest.

A chain's descriptors are written first and the head's flags last, as a real
driver must (the device may read the ring any time). Python stores land in
program order, which on x86 is what the device sees.
"""

from __future__ import annotations

import struct

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits that make a descriptor available in this wrap."""
    return F_AVAIL if wrap else F_USED


def need_event(event: int, new: int, old: int) -> bool:
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class PackedRing:
    """One packed ring driven from the guest side.

    Buffer ids and data slots are separate pools (in a packed ring ids are
    not descriptor positions): a chain of k descriptors takes one id and k
    slots at ``buf_gpa + slot * buf_size``.
    """

    def __init__(self, mem, ring_gpa: int, size: int, buf_gpa: int,
                 buf_size: int = 2048, event_idx: bool = False):
        if not 1 <= size <= 32768:
            raise ValueError(f"ring size {size} out of range")
        if ring_gpa % 16:
            raise ValueError("descriptor ring must be 16-byte aligned")
        self.mem = memoryview(mem)
        self._w16 = self.mem[: len(self.mem) & ~1].cast("H")
        self.size = size
        self.buf_gpa = buf_gpa
        self.buf_size = buf_size
        self.event_idx = event_idx
        self.desc_gpa, self.driver_gpa, self.device_gpa = self.layout(ring_gpa, size)
        if buf_gpa + size * buf_size > len(self.mem):
            raise ValueError("buffer area does not fit in guest memory")
        self.mem[ring_gpa : ring_gpa + self.ring_bytes(size)] = bytes(self.ring_bytes(size))
        self._free_ids = list(range(size))
        self._free_slots = list(range(size))
        self._chains: dict[int, tuple[int, list[int]]] = {}  # id -> (ring descs, slots)
        self._done: dict[int, tuple[int, list[int]]] = {}
        self._buflen: dict[int, int] = {}                     # in-chains: bytes per slot
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        self._added = 0      # descriptors made available since the last kick check

    def release(self) -> None:
        self._w16.release()
        self.mem.release()

    # --- geometry -----------------------------------------------------------

    @staticmethod
    def layout(ring_gpa: int, size: int) -> tuple[int, int, int]:
        """GPAs of (descriptor ring, driver event area, device event area)."""
        return ring_gpa, ring_gpa + 16 * size, ring_gpa + 16 * size + 4

    @staticmethod
    def ring_bytes(size: int) -> int:
        return 16 * size + 8

    def slot_gpa(self, i: int) -> int:
        return self.buf_gpa + i * self.buf_size

    # --- raw access -----------------------------------------------------------

    def _u16(self, gpa: int) -> int:
        return self._w16[gpa >> 1]

    def _put16(self, gpa: int, v: int) -> None:
        self._w16[gpa >> 1] = v & 0xFFFF

    def write_desc(self, pos: int, addr: int, length: int, id_: int, flags: int) -> None:
        """Descriptor pos verbatim, flags included; no checks, so tests can lie."""
        struct.pack_into("<QIHH", self.mem, self.desc_gpa + 16 * pos,
                         addr & (2**64 - 1), length & 0xFFFFFFFF, id_ & 0xFFFF, flags & 0xFFFF)

    def read_desc(self, pos: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring descriptor pos."""
        return struct.unpack_from("<QIHH", self.mem, self.desc_gpa + 16 * pos)

    def post(self, descs: list[tuple[int, int, int, int]]) -> int:
        """Make raw descriptors (addr, len, id, flags without AVAIL/USED)
        available at next_avail, head last; returns the head position."""
        head, head_wrap = self.next_avail, self.avail_wrap
        pos, wrap = head, head_wrap
        for k, (addr, length, id_, flags) in enumerate(descs):
            f = flags | avail_flags(wrap)
            if k == 0:
                self.write_desc(pos, addr, length, id_, 0)      # not available yet
                f_head = f
            else:
                self.write_desc(pos, addr, length, id_, f)
            pos += 1
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
        self._put16(self.desc_gpa + 16 * head + 14, f_head)   # publish the chain
        self.next_avail, self.avail_wrap = pos, wrap
        self._added += len(descs)
        return head

    # --- posting buffers --------------------------------------------------------

    def _take(self, nslots: int) -> tuple[int, list[int]]:
        if not self._free_ids or nslots > len(self._free_slots):
            raise RuntimeError("ring full")
        id_ = self._free_ids.pop(0)
        slots, self._free_slots = self._free_slots[:nslots], self._free_slots[nslots:]
        return id_, slots

    def add_out(self, chunks: list[bytes], indirect: bool = False) -> int:
        """Post a device-readable chain, one descriptor per chunk; returns its id.

        With indirect, one ring descriptor points at a table in its own slot
        and the chunks' data follow the table in that slot."""
        if indirect:
            id_, slots = self._take(1)
            table = self.slot_gpa(slots[0])
            data = table + 16 * len(chunks)
            if data + sum(map(len, chunks)) > table + self.buf_size:
                raise ValueError("indirect table and data do not fit one slot")
            for k, chunk in enumerate(chunks):
                struct.pack_into("<QIHH", self.mem, table + 16 * k, data, len(chunk), 0, 0)
                self.mem[data : data + len(chunk)] = chunk
                data += len(chunk)
            self._chains[id_] = (1, slots)
            self.post([(table, 16 * len(chunks), id_, F_INDIRECT)])
            return id_
        id_, slots = self._take(len(chunks))
        descs = []
        for k, (s, chunk) in enumerate(zip(slots, chunks, strict=True)):
            if len(chunk) > self.buf_size:
                raise ValueError(f"chunk of {len(chunk)} bytes > slot of {self.buf_size}")
            self.mem[self.slot_gpa(s) : self.slot_gpa(s) + len(chunk)] = chunk
            descs.append((self.slot_gpa(s), len(chunk), id_,
                          F_NEXT if k + 1 < len(chunks) else 0))
        self._chains[id_] = (len(chunks), slots)
        self.post(descs)
        return id_

    def add_in(self, nbufs: int = 1, buflen: int | None = None,
               indirect: bool = False) -> int:
        """Post a device-writable chain of nbufs slots; returns its id."""
        buflen = self.buf_size if buflen is None else buflen
        if buflen > self.buf_size:
            raise ValueError(f"buflen {buflen} > slot of {self.buf_size}")
        if indirect:
            id_, slots = self._take(nbufs + 1)
            self._buflen[id_] = buflen
            table = self.slot_gpa(slots[0])
            for k, s in enumerate(slots[1:]):
                struct.pack_into("<QIHH", self.mem, table + 16 * k, self.slot_gpa(s),
                                 buflen, 0, F_WRITE)
            self._chains[id_] = (1, slots)
            self.post([(table, 16 * nbufs, id_, F_INDIRECT)])
            return id_
        id_, slots = self._take(nbufs)
        self._buflen[id_] = buflen
        self._chains[id_] = (nbufs, slots)
        self.post([(self.slot_gpa(s), buflen, id_,
                    F_WRITE | (F_NEXT if k + 1 < nbufs else 0))
                   for k, s in enumerate(slots)])
        return id_

    # --- event suppression -------------------------------------------------------

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        """Driver event area: when the device should interrupt us."""
        self._put16(self.driver_gpa, off | wrap << 15)
        self._put16(self.driver_gpa + 2, flags)

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote: when it wants kicks."""
        return self._u16(self.device_gpa), self._u16(self.device_gpa + 2)

    def kick_needed(self) -> bool:
        """Linux's virtqueue_kick_prepare_packed; moves the "last kick" mark."""
        new = self.next_avail
        old = (new - self._added) & 0xFFFF
        added, self._added = self._added, 0
        if not added:
            return False
        off_wrap, flags = self.device_event
        if flags != EVENT_DESC:
            return flags != EVENT_DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        return need_event(event & 0xFFFF, new, old)

    # --- reaping ----------------------------------------------------------------

    def is_used(self, pos: int) -> bool:
        flags = self._u16(self.desc_gpa + 16 * pos + 14)
        return bool(flags & F_AVAIL) == bool(self.used_wrap) == bool(flags & F_USED)

    def poll_used(self) -> list[tuple[int, int]]:
        """Reap used descriptors as (id, len) and free their ids and slots."""
        out = []
        while self.is_used(self.last_used):
            _, length, id_, _ = self.read_desc(self.last_used)
            out.append((id_, length))
            chain = self._chains.pop(id_, None)
            ndesc = 1
            if chain is not None:   # an id we never posted (hostile tests) frees nothing
                ndesc, slots = chain
                self._free_ids.append(id_)
                self._free_slots.extend(slots)
                self._done[id_] = chain
            self.last_used += ndesc
            if self.last_used >= self.size:
                self.last_used -= self.size
                self.used_wrap ^= 1
        return out

    def read_in(self, id_: int, length: int) -> bytes:
        """The first length bytes the device wrote into the in-chain id."""
        ndesc, slots = self._chains.get(id_) or self._done[id_]
        if ndesc == 1 and len(slots) > 1:   # indirect: slot 0 holds the table
            slots = slots[1:]
        parts = []
        for s in slots:
            k = min(length, self._buflen.get(id_, self.buf_size))
            parts.append(bytes(self.mem[self.slot_gpa(s) : self.slot_gpa(s) + k]))
            length -= k
            if not length:
                break
        return b"".join(parts)
