"""The dirty-page log of a live migration (SET_LOG_BASE with LOG_SHMFD).

QEMU shares a bitmap, one bit per 4 KiB guest page from GPA 0 up, and
re-sends every page whose bit we set. It is mapped here with the same care as
guest memory (memory.py): an fd shorter than the log it claims to hold would
SIGBUS the daemon on our first write, so it is refused up front, and so is a
log too small for the guest memory we may write (those pages would reach the
destination stale). The C bursts write into it (gw_log.h); nothing else does.
"""

from __future__ import annotations

import mmap
import os
import stat

from gateway._native import ffi
from gateway.vhost.memory import MemoryTableError

PAGE_SHIFT = 12
PAGES_PER_BYTE = 8
# 1 GiB of bitmap covers 32 TiB of guest memory: anything larger is a lie.
MAX_LOG_SIZE = 1 << 30
U64_MAX = (1 << 64) - 1


class LogError(MemoryTableError):
    """The log the front-end described cannot be used; SET_LOG_BASE is refused."""


def bytes_needed(end: int) -> int:
    """Bitmap bytes covering guest-physical addresses [0, end)."""
    pages = (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
    return (pages + PAGES_PER_BYTE - 1) // PAGES_PER_BYTE


def covers(size: int, gpa: int, length: int) -> bool:
    """Does a log of `size` bytes hold the bit of every page of [gpa, gpa+length)?"""
    last = gpa + length - 1
    return length > 0 and last <= U64_MAX and (last >> PAGE_SHIFT) // PAGES_PER_BYTE < size


class DirtyLog:
    def __init__(self, fd: int, size: int, offset: int, memory_end: int) -> None:
        """Map `size` bytes at `offset` of `fd`. Checks everything first; the
        caller keeps ownership of fd (mmap holds its own reference)."""
        if size == 0:
            raise LogError("log size is 0")
        if size > MAX_LOG_SIZE:
            raise LogError(f"log size {size:#x} is over the {MAX_LOG_SIZE:#x} bytes we accept")
        if offset > U64_MAX - size:
            raise LogError(f"log offset {offset:#x} + size {size:#x} overflows")
        if size < bytes_needed(memory_end):
            raise LogError(f"log of {size} bytes covers {size * 8 << PAGE_SHIFT:#x} bytes of "
                           f"guest memory, which reaches {memory_end:#x}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise LogError(f"log fd {fd}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise LogError(f"log fd {fd} is not a file that can be mapped")
        if st.st_size < offset + size:
            raise LogError(f"log fd holds {st.st_size} bytes, the log needs {offset + size} "
                           f"(offset {offset:#x} + size {size:#x})")
        try:
            self.mm = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise LogError(f"cannot map the log: {e}") from None
        self.size, self.offset = size, offset
        self._buf = ffi.from_buffer("uint8_t[]", self.mm, require_writable=True)
        self.ptr = self._buf + offset

    def close(self) -> None:
        if self.mm is not None:
            ffi.release(self._buf)
            self.mm.close()
            self.mm = None
