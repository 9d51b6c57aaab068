"""BPF maps and XDP attach through libbpf's thin syscall wrappers (ctypes), no bcc.

The daemon gets the XDP program and its maps as file descriptors from the
compiler process (_compile.py) and drives them from here: lookups, updates and
deletes on raw key/value bytes (program.py packs them), per-CPU values as
libbpf lays them out, and attach/detach on a NIC. libbpf is already mapped into
the process: gateway._native links it (libxdp needs it).

Every fd that arrives is checked against what the kernel says it is
(`map_info`, `prog_info`): a map of another type or size is refused before
anything reads or writes through it.
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import sys

_lib = ct.CDLL("libbpf.so.1", use_errno=True)
for _name, _args in (
        ("bpf_map_update_elem", (ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64)),
        ("bpf_map_lookup_elem", (ct.c_int, ct.c_void_p, ct.c_void_p)),
        ("bpf_map_delete_elem", (ct.c_int, ct.c_void_p)),
        ("bpf_map_get_next_key", (ct.c_int, ct.c_void_p, ct.c_void_p)),
        ("bpf_obj_get_info_by_fd", (ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32))),
        ("bpf_xdp_attach", (ct.c_int, ct.c_int, ct.c_uint32, ct.c_void_p)),
        ("bpf_xdp_detach", (ct.c_int, ct.c_uint32, ct.c_void_p)),
        ("libbpf_num_possible_cpus", ())):
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = ct.c_int

# uapi/linux/bpf.h enum bpf_map_type / bpf_prog_type
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_XSKMAP = 1, 2, 6, 17
PROG_XDP = 6
BPF_F_MMAPABLE = 1 << 10
_PERCPU = frozenset({MAP_PERCPU_ARRAY, 5, 10})  # percpu array, hash, lru hash


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def possible_cpus() -> int:
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def _info(fd: int, size: int) -> bytes:
    buf = ct.create_string_buffer(size)
    n = ct.c_uint32(size)
    _check(_lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)), f"BPF_OBJ_GET_INFO_BY_FD({fd})")
    return buf.raw


def _u32(raw: bytes, off: int) -> int:
    return int.from_bytes(raw[off:off + 4], sys.byteorder)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def map_info(fd: int) -> dict:
    """struct bpf_map_info's type, id, key/value size, max_entries, flags, name."""
    raw = _info(fd, 88)
    return {"type": _u32(raw, 0), "id": _u32(raw, 4), "key_size": _u32(raw, 8),
            "value_size": _u32(raw, 12), "max_entries": _u32(raw, 16),
            "flags": _u32(raw, 20), "name": _cstr(raw[24:40])}


def prog_type_and_name(fd: int) -> tuple[int, str]:
    """struct bpf_prog_info's type (@0) and name (@64)."""
    raw = _info(fd, 96)
    return _u32(raw, 0), _cstr(raw[64:80])


class BpfMap:
    """One map by fd: bytes in, bytes out. Per-CPU maps take and give one value per
    possible CPU, each padded to 8 bytes, as the kernel copies them."""

    def __init__(self, fd: int, info: dict) -> None:
        self.fd = fd
        self.name = info["name"]
        self.key_size, self.value_size = info["key_size"], info["value_size"]
        self.max_entries = info["max_entries"]
        self.percpu = info["type"] in _PERCPU
        self.ncpus = possible_cpus() if self.percpu else 1
        self.stride = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size
        self.buf_size = self.stride * self.ncpus

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, map wants {self.key_size}")
        return key

    def lookup(self, key: bytes) -> bytes | None:
        """The value (all CPUs' for a per-CPU map), None when there is no entry."""
        out = ct.create_string_buffer(self.buf_size)
        r = _lib.bpf_map_lookup_elem(self.fd, self._key(key), out)
        if r == -2:  # ENOENT
            return None
        _check(r, f"lookup in {self.name}")
        return out.raw

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if len(value) != self.buf_size:
            raise ValueError(f"{self.name}: value of {len(value)} bytes, map wants "
                             f"{self.buf_size}")
        _check(_lib.bpf_map_update_elem(self.fd, self._key(key), value, flags),
               f"update of {self.name}")

    def delete(self, key: bytes) -> bool:
        """False when there was no entry."""
        r = _lib.bpf_map_delete_elem(self.fd, self._key(key))
        if r == -2:
            return False
        _check(r, f"delete from {self.name}")
        return True

    def keys(self, limit: int) -> list[bytes]:
        """At most `limit` keys (a hash map may change while it is walked)."""
        out, key, nxt = [], None, ct.create_string_buffer(self.key_size)
        while len(out) < limit:
            r = _lib.bpf_map_get_next_key(self.fd, key, nxt)
            if r == -2:
                break
            _check(r, f"next key of {self.name}")
            key = nxt.raw
            out.append(key)
        return out

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError as e:
        raise OSError(e.errno, f"no network interface named {ifname!r}") from None


def xdp_attach(ifname: str, prog_fd: int, flags: int) -> None:
    """Netlink IFLA_XDP with the program's fd (libbpf's bpf_xdp_attach)."""
    _check(_lib.bpf_xdp_attach(ifindex(ifname), prog_fd, flags, None),
           f"attaching XDP to {ifname}")


def xdp_detach(ifname: str, flags: int) -> None:
    _check(_lib.bpf_xdp_detach(ifindex(ifname), flags, None), f"detaching XDP from {ifname}")
