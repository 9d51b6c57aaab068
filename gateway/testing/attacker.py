"""A hostile guest's ring writes for the burst attacks of issue 12.

Each function writes a ring (split: DriverRing; packed: PackedRing) the way
an attacking guest would, with raw descriptor writes and no bookkeeping, so
that re-arming costs the attacker almost nothing: the split attacks point
every avail entry at one head and only move avail->idx on; the packed ones
lay long chains of zero-length descriptors over the whole ring.

Used by tests/test_bounded_bursts.py (C ring directly),
tests/test_burst_attack_daemon.py (through a daemon) and the benchmark's
noisy-neighbour row (benchmarks/noisy.py).
"""

from __future__ import annotations

import struct

from gateway.testing.packed_driver import F_AVAIL, F_USED, avail_flags

F_NEXT = 1
F_WRITE = 2


def split_chain(drv, length: int, *, write: bool, addr: int | None = None) -> int:
    """Descriptors 0..length-1 as one chain of zero-length buffers; head 0."""
    addr = drv.slot_gpa(0) if addr is None else addr
    flags = F_WRITE if write else 0
    for i in range(length):
        nxt = F_NEXT if i + 1 < length else 0
        drv.write_desc(i, addr, 0, flags | nxt, i + 1 if nxt else 0)
    return 0


def split_fill(drv, head: int = 0) -> None:
    """Every avail entry names head; publish a whole ring's worth past what
    the device took (avail->idx = used->idx + size)."""
    for k in range(drv.size):
        drv._put16(drv.avail_gpa + 4 + 2 * k, head)
    drv.set_avail_idx(drv.used_idx + drv.size)


def split_rearm(drv) -> None:
    """After the device took (and returned) chains, offer the same head again:
    one 16-bit store, which is all the attack costs the guest."""
    drv.set_avail_idx(drv.used_idx + drv.size)


def packed_fill(drv, chain: int, *, write: bool, length: int = 0) -> int:
    """The whole ring as chains of `chain` descriptors of `length` bytes
    each (a last partial chain included); returns the number of chains."""
    flags = F_WRITE if write else 0
    n = 0
    left = drv.size
    while left:
        k = min(chain, left)
        descs = [(drv.slot_gpa(0), length, n % drv.size,
                  flags | (F_NEXT if j + 1 < k else 0)) for j in range(k)]
        drv.post(descs)
        left -= k
        n += 1
    return n


class PackedRearm:
    """packed_fill's chains, posted again each time the device took them all,
    for the price of three memory copies per chain (the benchmark's attacker
    must cost almost nothing: packed_fill builds each descriptor in Python).

    A packed ring is available only descriptor by descriptor, in the wrap the
    driver is on (2.8.6), so a re-arm must rewrite every flags field; address,
    length and id never change, so the whole ring is written from one of two
    images made once (one per wrap), each chain's body before its head.
    """

    def __init__(self, drv, chain: int, *, write: bool, length: int = 0) -> None:
        if not 1 <= chain <= drv.size:
            raise ValueError(f"chain of {chain} descriptors in a ring of {drv.size}")
        self.drv = drv
        self.heads = list(range(0, drv.size, chain))
        self.chain = chain
        flags = F_WRITE if write else 0
        self._image = {}
        for wrap in (0, 1):
            avail = avail_flags(wrap)
            img = bytearray(16 * drv.size)
            for n, head in enumerate(self.heads):
                k = min(chain, drv.size - head)
                for j in range(k):
                    f = flags | avail | (F_NEXT if j + 1 < k else 0)
                    struct.pack_into("<QIHH", img, 16 * (head + j), drv.slot_gpa(0), length,
                                     n, f)
            self._image[wrap] = bytes(img)
        self.posted_wrap: int | None = None  # the wrap of the chains on offer
        self.rounds = 0

    def taken(self) -> bool:
        """The device used every chain: each head holds its used element,
        AVAIL == USED == the wrap the chains were posted in. Every head is
        read, not only the last: the device publishes a batch's first used
        element last."""
        if self.posted_wrap is None:
            return True
        w = bool(self.posted_wrap)
        for head in self.heads:
            f = self.drv.read_desc(head)[3]
            if not bool(f & F_AVAIL) == w == bool(f & F_USED):
                return False
        return True

    def rearm(self) -> bool:
        """Offer the whole ring again if the device took it; True if it did.
        Each chain's body first, then its head's address, length and id, then
        the head's flags, which make the chain available."""
        if not self.taken():
            return False
        drv, wrap = self.drv, self.drv.avail_wrap
        img, base, mem = self._image[wrap], drv.desc_gpa, drv.mem
        for head in reversed(self.heads):  # chain 0 last: the device starts there
            a, end = 16 * head, 16 * min(head + self.chain, drv.size)
            mem[base + a + 16 : base + end] = img[a + 16 : end]
            mem[base + a : base + a + 14] = img[a : a + 14]
            mem[base + a + 14 : base + a + 16] = img[a + 14 : a + 16]
        drv.avail_wrap ^= 1  # the chains fill the ring: next_avail is back where it was
        drv._added += drv.size
        self.posted_wrap = wrap
        self.rounds += 1
        return True
