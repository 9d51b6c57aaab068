"""A hostile guest's ring writes for the burst attacks of issue 12.

Each function writes a ring (split: DriverRing; packed: PackedRing) the way
an attacking guest would, with raw descriptor writes and no bookkeeping, so
that re-arming costs the attacker almost nothing: the split attacks point
every avail entry at one head and only move avail->idx on; the packed ones
lay long chains of zero-length descriptors over the whole ring.

Used by tests/test_bounded_bursts.py (C ring directly and through a daemon)
and meant for the benchmark's noisy-neighbour row.
"""

from __future__ import annotations

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
