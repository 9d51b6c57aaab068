"""Guest memory: the regions a front-end shares by fd, mapped here.

Addresses reach us in two spaces: ring addresses are front-end virtual (QVA,
the seed's qva_to_vva), descriptor addresses are guest-physical (GPA). Both are
translated only through this table and only for a whole [addr, addr+len)
that lies inside one region. The same table is mirrored into a C struct gw_mem
for the burst loops.

A region whose fd is shorter than mmap_offset+size is refused: touching the
missing tail would SIGBUS the whole daemon, not just this guest. So is one
whose mmap_offset is not page-aligned: QEMU sends a RAM block's offset in its
file and DPDK's virtio-user a memseg's, both whole pages (hugepages even), so
anything else is not a front-end we know, and a region starting mid-page would
share its first page with whatever the file holds before it.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

from gateway._native import ffi, lib
from gateway.vhost.protocol import Region

MAX_SLOTS = lib.GW_MAX_REGIONS
U64_MAX = (1 << 64) - 1


class MemoryTableError(Exception):
    """A region the front-end described cannot be used; the request is refused."""


@dataclass
class MappedRegion:
    region: Region
    mm: mmap.mmap
    ptr: object  # cffi pointer from from_buffer; keeps the mapping pinned

    @property
    def host(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr)) + self.region.mmap_offset

    def release(self) -> None:
        ffi.release(self.ptr)
        self.mm.close()


def _check_region(r: Region) -> None:
    if r.size == 0:
        raise MemoryTableError(f"region at GPA {r.gpa:#x} has size 0")
    if r.mmap_offset % mmap.PAGESIZE:
        raise MemoryTableError(f"region at GPA {r.gpa:#x}: mmap offset {r.mmap_offset:#x} "
                               f"is not a multiple of the {mmap.PAGESIZE}-byte page")
    for what, base in (("guest address", r.gpa), ("user address", r.qva),
                       ("mmap offset", r.mmap_offset)):
        if base + r.size - 1 > U64_MAX:
            raise MemoryTableError(f"region {what} {base:#x} + size {r.size:#x} overflows")


def _overlaps(a: Region, b: Region) -> str | None:
    if a.gpa < b.gpa + b.size and b.gpa < a.gpa + a.size:
        return "guest-physical"
    if a.qva < b.qva + b.size and b.qva < a.qva + a.size:
        return "user"
    return None


def _map(r: Region, fd: int) -> MappedRegion:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MemoryTableError(f"region fd {fd}: {e.strerror}") from None
    length = r.mmap_offset + r.size
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise MemoryTableError(f"region fd {fd} is not a file that can be mapped")
    if stat.S_ISREG(st.st_mode) and st.st_size < length:
        raise MemoryTableError(
            f"region at GPA {r.gpa:#x}: fd holds {st.st_size} bytes, "
            f"region needs {length} (mmap_offset {r.mmap_offset:#x} + size {r.size:#x})"
        )
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as e:
        raise MemoryTableError(f"cannot map region at GPA {r.gpa:#x}: {e}") from None
    return MappedRegion(r, mm, ffi.from_buffer(mm))


class GuestMemory:
    """The mapped regions of one connection. Not thread-safe: the owner stops
    the burst loops before changing the table (see device.py)."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []
        self.native = ffi.new("struct gw_mem *")
        self.version = 0  # bumped on every change so users know to re-translate

    def __len__(self) -> int:
        return len(self.regions)

    def set_table(self, regions: list[Region], fds: list[int]) -> None:
        """SET_MEM_TABLE: replace everything. The fds are always consumed."""
        mapped: list[MappedRegion] = []
        try:
            self._validate(regions, [])
            for r, fd in zip(regions, fds, strict=True):
                mapped.append(_map(r, fd))
        except BaseException:
            for m in mapped:
                m.release()
            raise
        finally:
            _close_all(fds)
        self._drop_all()
        self.regions = mapped
        self._sync()

    def add(self, region: Region, fd: int) -> None:
        """ADD_MEM_REG. The fd is always consumed."""
        try:
            if len(self.regions) >= MAX_SLOTS:
                raise MemoryTableError(f"all {MAX_SLOTS} memory slots are in use")
            self._validate([region], [m.region for m in self.regions])
            mapped = _map(region, fd)
        finally:
            _close_all([fd])
        self.regions.append(mapped)
        self._sync()

    def remove(self, region: Region) -> None:
        """REM_MEM_REG: the region is named by its guest address, size and user address."""
        for i, m in enumerate(self.regions):
            r = m.region
            if (r.gpa, r.size, r.qva) == (region.gpa, region.size, region.qva):
                del self.regions[i]
                self._sync()
                m.release()
                return
        raise MemoryTableError(
            f"no region at GPA {region.gpa:#x} size {region.size:#x} to remove"
        )

    def close(self) -> None:
        self._drop_all()
        self._sync()

    def qva_to_host(self, qva: int, length: int) -> int:
        """Front-end virtual → our address, for a whole range in one region."""
        return self._translate(qva, length, "qva")

    def qva_to_gpa(self, qva: int, length: int) -> int:
        """Front-end virtual → guest-physical, for a whole range in one region
        (a packed ring's used descriptors are dirty-logged by GPA)."""
        host = self._translate(qva, length, "qva")
        for m in self.regions:
            if m.host <= host < m.host + m.region.size:
                return m.region.gpa + (host - m.host)
        raise MemoryTableError(f"QVA {qva:#x} is not inside guest memory")

    def gpa_to_host(self, gpa: int, length: int) -> int:
        return self._translate(gpa, length, "gpa")

    def view(self, gpa: int, length: int) -> memoryview:
        """Bytes of guest memory at a GPA (tests and slow paths only)."""
        for m in self.regions:
            r = m.region
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                off = r.mmap_offset + gpa - r.gpa
                return memoryview(m.mm)[off : off + length]
        raise MemoryTableError(f"GPA range {gpa:#x}+{length} is not in guest memory")

    def _translate(self, addr: int, length: int, space: str) -> int:
        if length <= 0 or addr < 0 or addr + length - 1 > U64_MAX:
            raise MemoryTableError(f"bad range {addr:#x}+{length}")
        for m in self.regions:
            base = getattr(m.region, space)
            if base <= addr and addr + length <= base + m.region.size:
                return m.host + (addr - base)
        raise MemoryTableError(
            f"{space.upper()} range {addr:#x}+{length} is not inside one memory region"
        )

    def _validate(self, new: list[Region], existing: list[Region]) -> None:
        seen = list(existing)
        for r in new:
            _check_region(r)
            for other in seen:
                space = _overlaps(r, other)
                if space:
                    raise MemoryTableError(
                        f"region at GPA {r.gpa:#x} overlaps region at GPA {other.gpa:#x} "
                        f"in {space} address space"
                    )
            seen.append(r)

    def _drop_all(self) -> None:
        old, self.regions = self.regions, []
        self._sync()
        for m in old:
            m.release()

    def _sync(self) -> None:
        n = self.native
        n.nregions = len(self.regions)
        for i, m in enumerate(self.regions):
            slot = n.regions[i]
            slot.gpa, slot.size, slot.qva = m.region.gpa, m.region.size, m.region.qva
            slot.host = ffi.cast("uint8_t *", m.host)
        self.version += 1


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
