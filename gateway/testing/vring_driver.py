"""The driver (guest) side of a virtio split ring, in plain Python.

Tests and the test frontend play the guest with it: they post buffers, kick,
and reap used entries exactly as a guest driver would, over a writable buffer
that stands for guest-physical memory starting at GPA 0. It also has raw
helpers to write any descriptor or index, so tests can lie like a hostile
guest would.

Adding publishes at once (ring entry, then avail->idx): a test never needs
batching, and an already-visible entry keeps "what did the device see" simple.
Python stores land in program order, which on x86 (TSO) is the order the
device sees them in; a real guest would also need a write barrier there.
"""

from __future__ import annotations

import struct

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def need_event(event: int, new: int, old: int) -> bool:
    """virtio 2.7.10: did the index move past event on its way old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class DriverRing:
    """One split ring driven from the guest side.

    Descriptor i owns the data slot at ``buf_gpa + i * buf_size``; chains
    copy their chunks into their descriptors' slots, so the device reads real
    guest memory and tests can compare bytes end to end.
    """

    def __init__(self, mem, ring_gpa: int, size: int, buf_gpa: int,
                 buf_size: int = 2048, event_idx: bool = False):
        if size < 1 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        if ring_gpa % 16:
            raise ValueError("descriptor table must be 16-byte aligned")
        self.mem = memoryview(mem)
        if self.mem.readonly:
            raise ValueError("guest memory must be writable")
        # Ring indexes are read and written whole, as a real driver does: struct's
        # "<H" goes byte by byte, and a back-end polling in C saw torn values.
        self._w16 = self.mem[: len(self.mem) & ~1].cast("H")
        self.size = size
        self.buf_gpa = buf_gpa
        self.buf_size = buf_size
        self.event_idx = event_idx
        self.desc_gpa, self.avail_gpa, self.used_gpa = self.layout(ring_gpa, size)
        if buf_gpa + size * buf_size > len(self.mem):
            raise ValueError("buffer area does not fit in guest memory")
        if ring_gpa + self.ring_bytes(size) > len(self.mem):
            raise ValueError("ring does not fit in guest memory")
        self.mem[ring_gpa : ring_gpa + self.ring_bytes(size)] = bytes(self.ring_bytes(size))
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}   # posted head -> descriptor ids
        self._done: dict[int, list[int]] = {}     # reaped head -> ids, for read_in
        self._avail_idx = 0                        # our shadow of avail->idx
        self._last_used = 0                        # next used entry to reap
        self._kicked = 0                           # avail->idx at the last kick

    def release(self) -> None:
        """Drop the views of guest memory, so that its owner can unmap it."""
        self._w16.release()
        self.mem.release()

    # --- geometry ---------------------------------------------------------

    @staticmethod
    def layout(ring_gpa: int, size: int) -> tuple[int, int, int]:
        """GPAs of (desc, avail, used), each at its spec alignment."""
        avail = ring_gpa + 16 * size
        used = _align(avail + 6 + 2 * size, 4)
        return ring_gpa, avail, used

    @staticmethod
    def ring_bytes(size: int) -> int:
        """Bytes from the desc table start to the end of used (incl. avail_event)."""
        _, _, used = DriverRing.layout(0, size)
        return used + 6 + 8 * size

    def slot_gpa(self, i: int) -> int:
        return self.buf_gpa + i * self.buf_size

    # --- raw access ---------------------------------------------------------

    def _u16(self, gpa: int) -> int:
        return self._w16[gpa >> 1]  # every 16-bit ring field is 2-byte aligned

    def _put16(self, gpa: int, v: int) -> None:
        self._w16[gpa >> 1] = v & 0xFFFF

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Write descriptor i verbatim; no checks, so tests can lie."""
        struct.pack_into("<QIHH", self.mem, self.desc_gpa + 16 * i,
                         addr & (2**64 - 1), length & 0xFFFFFFFF, flags, next & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return struct.unpack_from("<QIHH", self.mem, self.desc_gpa + 16 * i)

    def push_avail(self, head: int) -> None:
        """Put head in the next avail slot and publish it (head is not checked)."""
        self._put16(self.avail_gpa + 4 + 2 * (self._avail_idx % self.size), head)
        self.set_avail_idx(self._avail_idx + 1)

    def set_avail_idx(self, v: int) -> None:
        self._avail_idx = v & 0xFFFF
        self._put16(self.avail_gpa + 2, self._avail_idx)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @property
    def used_idx(self) -> int:
        return self._u16(self.used_gpa + 2)

    @property
    def last_used(self) -> int:
        """The next used entry poll_used will reap (what the driver has seen)."""
        return self._last_used

    @property
    def used_flags(self) -> int:
        return self._u16(self.used_gpa)

    @property
    def avail_event(self) -> int:
        return self._u16(self.used_gpa + 4 + 8 * self.size)

    def set_used_event(self, v: int) -> None:
        self._put16(self.avail_gpa + 4 + 2 * self.size, v)

    def set_no_interrupt(self, on: bool) -> None:
        flags = self._u16(self.avail_gpa)
        self._put16(self.avail_gpa, flags | AVAIL_F_NO_INTERRUPT if on
                    else flags & ~AVAIL_F_NO_INTERRUPT)

    # --- posting buffers ----------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _alloc(self, n: int) -> list[int]:
        if n < 1 or n > len(self._free):
            raise RuntimeError(f"need {n} descriptors, {len(self._free)} free")
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    def add_out(self, chunks: list[bytes], indirect: bool = False) -> int:
        """Post a device-readable chain, one descriptor per chunk; returns head.

        The caller splits virtio-net header + frame into chunks itself, so a
        test can put the header in its own descriptor, split it, or not.
        With indirect, one ring descriptor points at a table in its own slot
        and the chunks' data follow the table in that same slot.
        """
        if indirect:
            (head,) = self._alloc(1)
            table = self.slot_gpa(head)
            data = table + 16 * len(chunks)
            if data + sum(map(len, chunks)) > table + self.buf_size:
                raise ValueError("indirect table and data do not fit one slot")
            for k, chunk in enumerate(chunks):
                more = k + 1 < len(chunks)
                struct.pack_into("<QIHH", self.mem, table + 16 * k, data, len(chunk),
                                 F_NEXT if more else 0, k + 1 if more else 0)
                self.mem[data : data + len(chunk)] = chunk
                data += len(chunk)
            self.write_desc(head, table, 16 * len(chunks), F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            ids = self._alloc(len(chunks))
            for k, (i, chunk) in enumerate(zip(ids, chunks, strict=True)):
                if len(chunk) > self.buf_size:
                    raise ValueError(f"chunk of {len(chunk)} bytes > slot of {self.buf_size}")
                self.mem[self.slot_gpa(i) : self.slot_gpa(i) + len(chunk)] = chunk
                more = k + 1 < len(ids)
                self.write_desc(i, self.slot_gpa(i), len(chunk),
                                F_NEXT if more else 0, ids[k + 1] if more else 0)
            head = ids[0]
            self._chains[head] = ids
        self.push_avail(head)
        return head

    def add_in(self, nbufs: int = 1, buflen: int | None = None) -> int:
        """Post a device-writable chain of nbufs slots; returns head."""
        buflen = self.buf_size if buflen is None else buflen
        if buflen > self.buf_size:
            raise ValueError(f"buflen {buflen} > slot of {self.buf_size}")
        ids = self._alloc(nbufs)
        for k, i in enumerate(ids):
            more = k + 1 < len(ids)
            self.write_desc(i, self.slot_gpa(i), buflen,
                            F_WRITE | (F_NEXT if more else 0), ids[k + 1] if more else 0)
        self._chains[ids[0]] = ids
        self.push_avail(ids[0])
        return ids[0]

    # --- notifications -------------------------------------------------------

    def kick_needed(self) -> bool:
        """Should the guest kick for what it published since the last kick?

        Assumes the caller kicks when told so: it moves the "last kick" mark.
        """
        new, old = self._avail_idx, self._kicked
        self._kicked = new
        if new == old:
            return False
        if self.event_idx:
            return need_event(self.avail_event, new, old)
        return not self.used_flags & USED_F_NO_NOTIFY

    # --- reaping -----------------------------------------------------------

    def poll_used(self) -> list[tuple[int, int]]:
        """Reap new used entries as (head, len) and free their descriptors.

        The data stays in the slots until a later add reuses them, so
        read_in(head, len) still works right after this returns.
        """
        out = []
        end = self.used_idx
        while self._last_used != end:
            e = self.used_gpa + 4 + 8 * (self._last_used % self.size)
            head, length = struct.unpack_from("<II", self.mem, e)
            out.append((head, length))
            ids = self._chains.pop(head, None)
            if ids is not None:  # a head we never posted (hostile tests) frees nothing
                self._free.extend(ids)
                self._done[head] = ids
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    def read_in(self, head: int, length: int) -> bytes:
        """The first length bytes the device wrote into the in-chain at head."""
        parts = []
        ids = self._chains.get(head) or self._done[head]
        for i in ids:
            _, dlen, _, _ = self.read_desc(i)
            k = min(length, dlen)
            parts.append(bytes(self.mem[self.slot_gpa(i) : self.slot_gpa(i) + k]))
            length -= k
            if not length:
                break
        return b"".join(parts)
