#!/usr/bin/env python3
"""Hand-made seeds for ring_fuzz.c: byte strings in the order its decoder reads them.

They start libFuzzer on paths that random bytes reach slowly: a frame spread over
many merged RX buffers until the guest runs out (rollback), num_buffers split
across descriptors, a TX chain through an indirect table, EVENT_IDX interrupts.
Written to fuzz/corpus/ring/seed-*; `make fuzz-ring-merge` keeps them if they add
coverage. Keep this file in step with the decoder in ring_fuzz.c.
"""

from __future__ import annotations

import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus" / "ring"

MRG, EVENT_IDX, INDIRECT, HDR12, CALLFD = 1, 2, 4, 8, 16
NEXT, WRITE, F_INDIRECT = 1, 2, 4


def u8(v: int) -> bytes:
    return bytes([v & 0xFF])


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFF_FFFF)


def header(cfg: int, lg: int, dirmode: int = 0) -> bytes:
    # cfg, cfg2 (ring size log2), cfg3 (descriptor direction mode);
    # one 4096-byte data region at GPA 0; the three ring parts one after the
    # other at its start; no rotation; zero fill.
    return (u8(cfg) + u8(lg) + u8(dirmode)
            + u8(0)                       # one data region
            + u8(0) + u16(0) + u8(0)      # 4096 bytes, adjacent (GPA 0)
            + (u8(0) + u8(0) + u32(0)) * 3
            + u8(0)                       # rotation
            + b"\0" * 8)                  # fill seed


def desc(off: int, length: int, flags: int, nxt: int = 0) -> bytes:
    """Addr mode 0 (region 0 + off), len mode 'tiny' (1..16) or 64+k."""
    if 1 <= length <= 16:
        return u8(0 | 3 << 3) + u8(flags) + u8(0) + u32(off) + u8(length - 1) + u8(nxt)
    assert 64 <= length <= 64 + 255
    return u8(0) + u8(flags) + u8(0) + u32(off) + u8(length - 64) + u8(nxt)


def ind_desc(table: int = 0) -> bytes:
    """Addr mode 4: points at indirect table `table`, plain INDIRECT."""
    return u8(4) + u8(0) + u8(0) + u8(table) + u8(0)


def rings(heads: list[int], avail: int | None = None, used_event: int | None = None,
          no_interrupt: bool = False) -> bytes:
    m = (4 if no_interrupt else 0) | (8 if used_event is not None else 0)
    out = u16(0) + u16(0) + u16(0) + u8(0)         # last_avail, used_idx, signalled
    out += u8(m) + u16(0 if avail is None else avail)  # avail idx = size - (this % (size+1))
    out += u8(len(heads) - 1) + b"".join(u8(h) for h in heads)
    if used_event is not None:
        out += u16(used_event)
    return out


def op_tx(n: int, cap_mode: int = 1) -> bytes:
    return u8(0) + u8(n - 1) + u8(cap_mode)


def op_rx(lens: list[int]) -> bytes:
    # every frame in length mode 2: u16 % 2048
    lm = 0b10101010
    return u8(2) + u8(len(lens) - 1) + u8(lm) + b"".join(u16(v) for v in lens)


CALL, PENDING = u8(4), u8(6)


def notify(on: int) -> bytes:
    return u8(5) + u8(on)


def guest_adds(k: int) -> bytes:
    return u8(7) + u8(0) + u8(k)


def seeds() -> dict[str, bytes]:
    s = {}
    # MRG_RXBUF: a 72-byte frame over 16-byte buffers needs 5, the guest has 4:
    # nothing published; then it adds more and the frame goes through.
    s["mrg-rollback"] = (
        header(MRG | HDR12, 2) + u8(0) + u8(3)
        + b"".join(desc(2048 + 32 * i, 16, WRITE) for i in range(4))
        + rings([0, 1, 2, 3])
        + op_rx([60]) + guest_adds(4) + op_rx([60, 8]) + CALL
    )
    # num_buffers (header bytes 10, 11) split over a 10-byte and a 2-byte buffer.
    s["mrg-numbuf-split"] = (
        header(MRG | HDR12 | EVENT_IDX, 2) + u8(0) + u8(3)
        + desc(2048, 10, WRITE) + desc(2064, 1, WRITE) + desc(2080, 1, WRITE)
        + desc(2096, 100, WRITE)
        + rings([0, 1, 2, 3])
        + op_rx([60]) + CALL + op_rx([1]) + CALL
    )
    # the same as one chain without MRG_RXBUF, and a frame too big for it
    s["rx-chain"] = (
        header(HDR12, 2) + u8(0) + u8(3)
        + desc(2048, 10, WRITE | NEXT, 1) + desc(2064, 1, WRITE | NEXT, 2)
        + desc(2080, 1, WRITE | NEXT, 3) + desc(2096, 100, WRITE)
        + rings([0, 0, 0, 0])
        + op_rx([60, 200, 20]) + CALL + PENDING
    )
    # TX through an indirect table of 4 entries at GPA 1024
    ind_table = u8(1) + u8(0) + u8(3) + u32(1024)
    s["tx-indirect"] = (
        header(INDIRECT | HDR12, 2, dirmode=1) + ind_table + u8(1)
        + ind_desc(0) + desc(3000, 64, 0)
        + b"".join(desc(2048 + 128 * i, 64 + i, NEXT if i < 3 else 0, i + 1) for i in range(4))
        + rings([0, 1])
        + op_tx(4) + CALL + notify(1) + PENDING + op_tx(4)
    )
    # TX chains with EVENT_IDX interrupts and the guest moving used_event
    s["tx-event-idx"] = (
        header(EVENT_IDX | CALLFD, 3, dirmode=1) + u8(0) + u8(7)
        + b"".join(desc(2048 + 128 * i, 64 + i, 0) for i in range(8))
        + rings(list(range(8)), used_event=2)
        + op_tx(3) + CALL + op_tx(2) + CALL + u8(7) + u8(3) + u16(9) + op_tx(8) + CALL
        + notify(0) + notify(1) + PENDING
    )
    return s


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (OUT / f"seed-{name}").write_bytes(data)
        print(f"{OUT / f'seed-{name}'}: {len(data)} bytes")


if __name__ == "__main__":
    main()
