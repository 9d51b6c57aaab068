"""Load gateway's XDP program (bpf/gateway_xdp.c) with bcc and drive its maps.

    prog = XdpProgram("eth1", max_devices=64, max_queues=16)   # compiles (~0.5-3 s)
    prog.attach()                      # native, else generic; refuses a foreign program
    prog.set_device(0, "52:54:00:12:34:56", max_frame=1514, running=True)
    prog.set_socket(0, queue, xsk_fd)  # one AF_XDP socket per NIC RX queue
    prog.counters(0), prog.global_counters()
    prog.detach(); prog.close()

Where the C source is found (first hit wins): $GATEWAY_BPF_SOURCE; `gateway_xdp.c` next to
this module (package data, for wheels that ship it); the source checkout's
`bpf/gateway_xdp.c` two levels above the package (editable installs and the repo). A wheel
without the file needs GATEWAY_BPF_SOURCE, and the error says so.

Our own program versus a foreign one: the BPF program name (the C function name,
"gateway_xdp") plus the names of its maps (mac2slot, xsks, ...), read with BPF_PROG_GET_FD_BY_ID
and BPF_OBJ_GET_INFO_BY_FD. A program with that name and those maps left on the NIC by a
run that crashed (or by an earlier XdpProgram in this process) is replaced on attach(), so
its maps (MACs, sockets, counters) go with it; anything else is refused.
"""

from __future__ import annotations

import ctypes as ct
import errno
import glob
import importlib.util
import mmap
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from gateway._native import ffi
from gateway.xdp import link as _link

PROG_NAME = "gateway_xdp"
MAP_NAMES = frozenset({"mac2slot", "devices", "xsks", "counters", "gcounters"})
# A stale program is recognised by these names; "held" (newer) is not required.
COUNTERS = ("rx_packets", "rx_bytes", "drop_no_socket", "drop_stopped", "drop_too_big",
            "drop_over_share")
NO_SHARE = 0xFFFFFFFF  # a slot's share until set_share(): no limit
GLOBAL_COUNTERS = ("passed", "broadcast", "multicast", "runt")

# uapi/linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE,
               "offload": XDP_FLAGS_HW_MODE}

ENV_SOURCE = "BCC_KERNEL_SOURCE"
ENV_CFLAGS = "GATEWAY_BPF_CFLAGS"
ENV_BPF_SOURCE = "GATEWAY_BPF_SOURCE"


class XdpError(Exception):
    """The XDP program cannot be built, attached or driven."""


# ------------------------------------------------------------------ environment


DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc"


def import_bcc():
    """The `bcc` module, or an XdpError that says how to get it.

    bcc is not on PyPI (that name is another project), so a venv usually lacks
    it: then Debian's pure-Python package is loaded from its own directory,
    without putting all of dist-packages (Debian's cffi, ...) on sys.path."""
    try:
        import bcc
        return bcc
    except ImportError as e:
        first = e
    init = os.path.join(DEBIAN_BCC, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(
            "bcc", init, submodule_search_locations=[DEBIAN_BCC])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
            return module
        except Exception as e:
            del sys.modules["bcc"]
            first = e
    raise XdpError(f"cannot import bcc ({first}): apt-get install python3-bpfcc "
                   "(bcc is not on PyPI)")


def find_kernel_headers() -> tuple[str, list[str]]:
    """(BCC_KERNEL_SOURCE directory, extra clang flags) for compiling the program.

    Debian's linux-headers-amd64 splits the headers in two: /usr/src/linux-headers-V-common
    (kconfig.h, what bcc wants as its kernel source) and /usr/src/linux-headers-V-amd64
    (generated headers, passed with -I). $BCC_KERNEL_SOURCE and $GATEWAY_BPF_CFLAGS win when
    set. XDP needs only UAPI headers, so headers older than the running kernel do.
    """
    env_src, env_cflags = os.environ.get(ENV_SOURCE), os.environ.get(ENV_CFLAGS)
    if env_src and env_cflags is not None:
        return env_src, shlex.split(env_cflags)
    arch_dir = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
    kernel_arch = {"amd64": "x86", "arm64": "arm64"}[arch_dir]
    found = None
    for common in sorted(glob.glob("/usr/src/linux-headers-*-common"), key=_version_key):
        arch = common[: -len("-common")] + f"-{arch_dir}"
        if os.path.isdir(arch) and os.path.exists(os.path.join(common, "include/linux/kconfig.h")):
            found = common, arch
    if found is None:
        if env_src:
            return env_src, []
        raise XdpError("kernel headers for bcc not found: "
                       f"apt-get install linux-headers-{arch_dir}")
    common, arch = found
    cflags = [f"-I{arch}/{d}" for d in (f"arch/{kernel_arch}/include/generated", "include",
                                        f"arch/{kernel_arch}/include/generated/uapi",
                                        "include/generated/uapi")]
    if env_cflags is not None:
        cflags = shlex.split(env_cflags)
    return env_src or common, cflags


def _version_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in
            path.replace("-", ".").split(".")]


def bpf_source() -> Path:
    """Path of gateway_xdp.c (see the module docstring for the search order)."""
    env = os.environ.get(ENV_BPF_SOURCE)
    if env:
        p = Path(env)
        if not p.is_file():
            raise XdpError(f"${ENV_BPF_SOURCE}={env} is not a file")
        return p
    here = Path(__file__).resolve().parent
    for p in (here / "gateway_xdp.c", here.parent.parent / "bpf" / "gateway_xdp.c"):
        if p.is_file():
            return p
    raise XdpError(f"bpf/gateway_xdp.c not found next to the gateway package ({here}): "
                   f"set ${ENV_BPF_SOURCE} to its path")


# ------------------------------------------------------------------ bpf(2) program info

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_MAP_GET_FD_BY_ID = 14
_BPF_OBJ_GET_INFO_BY_FD = 15
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _bpf(cmd: int, attr: ct.Array) -> int:
    r = _libc.syscall(ct.c_long(_SYS_BPF), ct.c_int(cmd), attr, ct.c_uint(ct.sizeof(attr)))
    if r < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _fd_by_id(cmd: int, obj_id: int) -> int:
    attr = (ct.c_uint8 * 16)()
    ct.c_uint32.from_buffer(attr, 0).value = obj_id
    return _bpf(cmd, attr)


def _obj_info(fd: int, size: int, map_ids: ct.Array | None = None) -> bytes:
    info = (ct.c_uint8 * size)()
    if map_ids is not None:  # struct bpf_prog_info: nr_map_ids @52, map_ids @56
        ct.c_uint32.from_buffer(info, 52).value = len(map_ids)
        ct.c_uint64.from_buffer(info, 56).value = ct.addressof(map_ids)
    attr = (ct.c_uint8 * 16)()  # bpf_fd u32, info_len u32, info u64
    ct.c_uint32.from_buffer(attr, 0).value = fd
    ct.c_uint32.from_buffer(attr, 4).value = size
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(info)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    return bytes(info)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def prog_info_fd(fd: int) -> dict[str, Any]:
    """{"id", "name", "tag", "map_names"} of the BPF program behind `fd`."""
    map_ids = (ct.c_uint32 * 16)()
    raw = _obj_info(fd, 256, map_ids)
    n = min(int.from_bytes(raw[52:56], "little"), len(map_ids))
    names = set()
    for mid in map_ids[:n]:
        try:
            mfd = _fd_by_id(_BPF_MAP_GET_FD_BY_ID, mid)
        except OSError:
            continue
        try:  # struct bpf_map_info: name[16] @24
            names.add(_cstr(_obj_info(mfd, 128)[24:40]))
        finally:
            os.close(mfd)
    return {"id": int.from_bytes(raw[4:8], "little"), "tag": raw[8:16].hex(),
            "name": _cstr(raw[64:80]), "map_names": names}


def prog_info(prog_id: int) -> dict[str, Any] | None:
    """prog_info_fd for a program id; None when no such program exists (any more)."""
    try:
        fd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise XdpError(f"cannot inspect BPF program id {prog_id}: {e}") from e
    try:
        return prog_info_fd(fd)
    finally:
        os.close(fd)


_BPF_MAP_GET_NEXT_KEY = 4


def stale_macs(prog_id: int) -> list[str]:
    """The MACs a (stale) gateway program still steers, read from its mac2slot
    map before it goes: after a crash they name the filter entries to undo."""
    try:
        pfd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id)
    except OSError:
        return []
    try:
        map_ids = (ct.c_uint32 * 16)()
        raw = _obj_info(pfd, 256, map_ids)
    finally:
        os.close(pfd)
    for mid in map_ids[: min(int.from_bytes(raw[52:56], "little"), len(map_ids))]:
        try:
            mfd = _fd_by_id(_BPF_MAP_GET_FD_BY_ID, mid)
        except OSError:
            continue
        try:
            if _cstr(_obj_info(mfd, 128)[24:40]) != "mac2slot":
                continue
            keys, key, nxt = [], ct.c_uint64(), ct.c_uint64()
            attr = (ct.c_uint8 * 24)()  # map_fd u32, pad, key u64, next_key u64
            ct.c_uint32.from_buffer(attr, 0).value = mfd
            ct.c_uint64.from_buffer(attr, 16).value = ct.addressof(nxt)
            first = True
            while len(keys) < 65536:
                ct.c_uint64.from_buffer(attr, 8).value = 0 if first else ct.addressof(key)
                try:
                    _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
                except OSError:
                    break  # ENOENT: no more keys
                keys.append(nxt.value)
                key.value, first = nxt.value, False
            macs = dict.fromkeys(k & MAC_MASK for k in keys)  # one MAC may be in 2 VLANs
            return [":".join(f"{k:012x}"[i:i + 2] for i in range(0, 12, 2)) for k in macs]
        finally:
            os.close(mfd)
    return []


def is_gateway_program(info: dict[str, Any] | None) -> bool:
    return bool(info) and info["name"] == PROG_NAME and MAP_NAMES <= info["map_names"]


# ------------------------------------------------------------------ keys


def mac_key(mac: str) -> int:
    """mac2slot's key: the 6 bytes as a big-endian 48-bit number ("00:11:..:ff" -> 0x0011..ff)."""
    hexdigits = mac.replace(":", "").replace("-", "")
    if len(hexdigits) != 12:
        raise ValueError(f"not a MAC address: {mac!r}")
    return int(hexdigits, 16)


MAC_MASK = (1 << 48) - 1


def steer_key(mac: str, vlan: int = 0) -> int:
    """mac2slot's key: the VLAN ID (0 = untagged) above the MAC's 48 bits."""
    if not 0 <= vlan <= 4094:
        raise ValueError(f"VLAN {vlan} out of range 0..4094")
    return vlan << 48 | mac_key(mac)


def is_unicast(mac: str) -> bool:
    return not (mac_key(mac) >> 40) & 1


# ------------------------------------------------------------------ the program


class XdpProgram:
    """bpf/gateway_xdp.c compiled for one NIC; attach() puts it on the NIC."""

    def __init__(self, ifname: str, max_devices: int = 64, max_queues: int = 16):
        if not 1 <= max_devices <= 4096 or not 1 <= max_queues <= 256:
            raise ValueError("max_devices must be 1..4096 and max_queues 1..256")
        self.ifname = ifname
        self.max_devices = max_devices
        self.max_queues = max_queues
        self.mode: str | None = None  # "native" / "generic" once attached
        self.prog_id: int | None = None
        self.replaced: int | None = None  # id of our stale program replaced by attach()
        self.stale_macs: list[str] = []  # the MACs it steered (their filters are stale too)
        bcc = import_bcc()
        self._BPF = bcc.BPF
        src_dir, cflags = find_kernel_headers()
        os.environ[ENV_SOURCE] = src_dir  # bcc reads it at compile time
        cflags = [*cflags, f"-DMAX_DEVICES={max_devices}", f"-DMAX_QUEUES={max_queues}"]
        path = bpf_source()
        try:
            self._bpf = bcc.BPF(src_file=str(path).encode(), cflags=cflags)
            self._fn = self._bpf.load_func(PROG_NAME.encode(), bcc.BPF.XDP)
        except Exception as e:
            raise XdpError(f"compiling/loading {path} failed: {e} (kernel source {src_dir}, "
                           f"cflags {' '.join(cflags)})") from e
        self.prog_id = prog_info_fd(self._fn.fd)["id"]
        self._mac2slot = self._bpf[b"mac2slot"]
        self._devices = self._bpf[b"devices"]
        self._xsks = self._bpf[b"xsks"]
        self._counters = self._bpf[b"counters"]
        self._gcounters = self._bpf[b"gcounters"]
        self.share = NO_SHARE
        # `held` is mmap-ed so that the C bursts can subtract what they consume
        # without a syscall: one u64 per (slot, queue), the xsks index.
        n = max_devices * self.max_queues * 8
        size = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._held_mm = mmap.mmap(self._bpf[b"held"].map_fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self._bpf.cleanup()
            raise XdpError(f"mmap of the held map failed: {e}") from e
        self._held = ffi.from_buffer("uint64_t[]", self._held_mm)

    # -------------------------------------------------------------- attach / detach

    @property
    def attached(self) -> bool:
        return self.mode is not None

    def attach(self) -> str:
        """Attach to the NIC, native mode first, then generic; returns the mode."""
        if self.attached:
            return self.mode
        try:
            present = _link.xdp_prog_ids(self.ifname)
        except _link.LinkError as e:
            raise XdpError(str(e)) from e
        for mode, pid in present.items():
            if pid == self.prog_id:
                self.mode = mode  # already ours (attach() after a lost detach)
                return mode
            if not is_gateway_program(prog_info(pid)):
                raise XdpError(
                    f"{self.ifname} already has an XDP program (id {pid}) that is not gateway's: "
                    f"detach it first (ip link set dev {self.ifname} xdp off)")
        for mode, pid in present.items():  # our own, stale: replace it
            self.stale_macs = stale_macs(pid)
            self._remove(mode)
            self.replaced = pid
        errors = []
        for mode in ("native", "generic"):
            flags = XDP_FLAGS_UPDATE_IF_NOEXIST | _MODE_FLAGS[mode]
            try:
                self._BPF.attach_xdp(self.ifname.encode(), self._fn, flags)
            except Exception as e:  # bcc raises plain Exception
                errors.append(f"{mode}: {e}")
                continue
            self.mode = mode
            return mode
        raise XdpError(f"attaching XDP to {self.ifname} failed: {'; '.join(errors)}")

    def _remove(self, mode: str) -> None:
        try:
            self._BPF.remove_xdp(self.ifname.encode(), _MODE_FLAGS.get(mode, 0))
        except Exception as e:
            raise XdpError(f"detaching XDP ({mode}) from {self.ifname} failed: {e}") from e

    def detach(self) -> None:
        """Take our program off the NIC (a program that is not ours is left alone)."""
        if not self.attached:
            return
        self.mode = None
        try:
            present = _link.xdp_prog_ids(self.ifname)
        except _link.LinkError:
            return  # the NIC is gone, and the program with it
        for m, pid in present.items():
            if pid == self.prog_id:
                self._remove(m)

    def close(self) -> None:
        """detach() and free the program and its maps."""
        try:
            self.detach()
        finally:
            bpf, self._bpf = getattr(self, "_bpf", None), None
            mm = getattr(self, "_held_mm", None)
            if mm is not None:
                held, self._held, self._held_mm = self._held, None, None
                if held is not None:
                    ffi.release(held)  # the buffer export, so that the mapping can go
                mm.close()
            if bpf is not None:
                bpf.cleanup()

    def __enter__(self) -> XdpProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- maps

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_devices:
            raise ValueError(f"slot {slot} out of range 0..{self.max_devices - 1}")

    def slot_index_for(self, slot: int, queue: int) -> int:
        """The XSKMAP index of (device slot, NIC RX queue), as in the C program."""
        self._check_slot(slot)
        if not 0 <= queue < self.max_queues:
            raise ValueError(f"queue {queue} out of range 0..{self.max_queues - 1}")
        return slot * self.max_queues + queue

    def set_device(self, slot: int, mac: str, max_frame: int, running: bool,
                   vlan: int = 0, *, take: bool = False) -> None:
        """Steer unicast frames to `mac` (tagged with VLAN `vlan`, or untagged for 0) to
        `slot` (also used to start/stop it); max_frame does not count the tag.
        `take`: the MAC may be steered elsewhere now and moves here (a live
        migration's destination device starting)."""
        self._check_slot(slot)
        if not is_unicast(mac):
            raise ValueError(f"{mac} is not a unicast MAC")
        if max_frame <= 0:
            raise ValueError("max_frame must be positive")
        key = self._mac2slot.Key(steer_key(mac, vlan))
        old = self._mac2slot.get(key)
        if old is not None and old.value != slot and not take:
            where = f" in VLAN {vlan}" if vlan else ""
            raise XdpError(f"MAC {mac}{where} is already steered to slot {old.value}")
        cfg = self._devices.Leaf()
        cfg.running = 1 if running else 0
        cfg.max_frame = max_frame
        cfg.share = self.share
        self._devices[self._devices.Key(slot)] = cfg  # configuration before the MAC
        self._mac2slot[key] = self._mac2slot.Leaf(slot)

    def set_share(self, share: int) -> None:
        """Every slot's socket may hold at most `share` frames unconsumed per queue
        (the XDP program drops beyond it: drop_over_share)."""
        if not 0 <= share <= NO_SHARE:
            raise ValueError(f"share {share} out of range")
        self.share = share
        for slot in range(self.max_devices):
            key = self._devices.Key(slot)
            cfg = self._devices[key]
            if cfg.share != share:
                cfg.share = share
                self._devices[key] = cfg

    def held(self, slot: int, queue: int):
        """A C pointer (uint64_t *) to the held count of (slot, queue), in the map's
        shared mapping: the bursts subtract from it what they consume."""
        return self._held + self.slot_index_for(slot, queue)

    def held_count(self, slot: int, queue: int) -> int:
        return int(self._held[self.slot_index_for(slot, queue)])

    def reset_held(self, slot: int, queue: int) -> None:
        """Zero (slot, queue)'s count: its socket is gone or drained."""
        self._held[self.slot_index_for(slot, queue)] = 0

    def remove_device(self, slot: int, mac: str, vlan: int = 0) -> None:
        """Stop steering (vlan, mac), mark the slot stopped, clear its sockets and counters."""
        self._check_slot(slot)
        key = self._mac2slot.Key(steer_key(mac, vlan))
        old = self._mac2slot.get(key)
        if old is not None and old.value == slot:
            del self._mac2slot[key]
        cfg = self._devices.Leaf()
        cfg.share = self.share
        self._devices[self._devices.Key(slot)] = cfg
        for q in range(self.max_queues):
            self.clear_socket(slot, q)
        for c in range(len(COUNTERS)):
            self._counters.clearitem(self._counters.Key(slot * len(COUNTERS) + c))

    def set_socket(self, slot: int, queue: int, fd: int) -> None:
        """Frames for `slot` arriving on NIC queue `queue` go to the AF_XDP socket `fd`."""
        idx = self.slot_index_for(slot, queue)
        try:
            self._xsks[self._xsks.Key(idx)] = self._xsks.Leaf(fd)
        except Exception as e:
            raise XdpError(f"XSKMAP[{idx}] = fd {fd} (slot {slot}, queue {queue}) failed: {e} "
                           "(the socket must be an AF_XDP socket bound with an RX ring)") from e

    def clear_socket(self, slot: int, queue: int) -> None:
        idx = self.slot_index_for(slot, queue)
        try:
            del self._xsks[self._xsks.Key(idx)]
        except KeyError:
            pass  # was empty

    def counters(self, slot: int) -> dict[str, int]:
        """The slot's counters, summed over CPUs."""
        self._check_slot(slot)
        base = slot * len(COUNTERS)
        return {name: int(self._counters.sum(self._counters.Key(base + i)).value)
                for i, name in enumerate(COUNTERS)}

    def global_counters(self) -> dict[str, int]:
        """Frames handed to the kernel: passed (unknown unicast), broadcast, multicast, runt."""
        return {name: int(self._gcounters.sum(self._gcounters.Key(i)).value)
                for i, name in enumerate(GLOBAL_COUNTERS)}


__all__ = ["XdpProgram", "XdpError", "find_kernel_headers", "import_bcc", "mac_key",
           "steer_key", "prog_info", "is_gateway_program", "bpf_source", "COUNTERS",
           "GLOBAL_COUNTERS"]
