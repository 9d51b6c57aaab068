"""gateway's XDP program (bpf/gateway_xdp.c): compiled by bcc in a child process, driven here.

    prog = XdpProgram("eth1", max_devices=64, max_queues=16)   # compiles (~0.5-3 s)
    prog.attach()                      # native, else generic; refuses a foreign program
    prog.set_device(0, "52:54:00:12:34:56", max_frame=1514, running=True)
    prog.set_socket(0, queue, xsk_fd)  # one AF_XDP socket per NIC RX queue
    prog.counters(0), prog.global_counters()
    prog.detach(); prog.close()

Loading: XdpProgram() starts `python -m gateway.xdp._compile` (see there), which
imports bcc, compiles the C source, has bcc create the maps and load the program,
sends the program's and the maps' fds back over a unix socket (SCM_RIGHTS) and
exits. This process never imports bcc, so LLVM (~60 MiB resident once mapped, ~30
MiB more of heap after a compile) is never part of the daemon. The fds are
checked against the kernel's own description of them (program type and name, each
map's type, key/value size, entries) before use. Attach/detach and map access go
through libbpf (maps.py).

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
import json
import mmap
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway._native import ffi
from gateway.xdp import link as _link
from gateway.xdp import maps as _maps
from gateway.xdp._compile import (  # noqa: F401  (re-exported: the environment checks)
    DEBIAN_BCC,
    ENV_BPF_SOURCE,
    ENV_CFLAGS,
    ENV_SOURCE,
    MAPS,
    MAX_MESSAGE,
    PROG_NAME,
    XdpError,
    bcc_available,
    bpf_source,
    find_kernel_headers,
    import_bcc,
)

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

COMPILE_TIMEOUT = 300.0  # s for the compiler process; a compile takes ~0.5-3 s here
_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # holds the gateway package we run
# The child imports the same gateway package as this process, whatever sys.path
# tricks brought it here; -P keeps the working directory off its path.
_CHILD = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from gateway.xdp._compile import main; sys.exit(main(sys.argv[1:]))")


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


# ------------------------------------------------------------------ the compiler process


def expected_maps(max_devices: int, max_queues: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (map type, key size, value size, max entries), as bpf/gateway_xdp.c
    declares them for these sizes: what a received map fd must be."""
    slots = max_devices * max_queues
    return {
        "mac2slot": (_maps.MAP_HASH, 8, 4, max_devices),
        "devices": (_maps.MAP_ARRAY, 4, 16, max_devices),
        "xsks": (_maps.MAP_XSKMAP, 4, 4, slots),
        "counters": (_maps.MAP_PERCPU_ARRAY, 4, 8, max_devices * len(COUNTERS)),
        "gcounters": (_maps.MAP_PERCPU_ARRAY, 4, 8, len(GLOBAL_COUNTERS)),
        "held": (_maps.MAP_ARRAY, 4, 8, slots),
    }


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


def _receive(sock: socket.socket, proc: subprocess.Popen, timeout: float
             ) -> tuple[dict, list[int]]:
    """The compiler's one message and the fds that came with it."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise XdpError(f"the XDP compiler process (pid {proc.pid}) did not answer within "
                           f"{timeout:.0f} s")
        if select.select([sock], [], [], min(left, 1.0))[0]:
            break
    space = socket.CMSG_SPACE(4 * (len(MAPS) + 1)) + socket.CMSG_SPACE(4 * 16)  # room for lies
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, space)
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"={len(payload) // 4}i", payload[: len(payload) // 4 * 4])
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise XdpError("the XDP compiler process sent a truncated message")
        if not data:
            rc = proc.wait(timeout=10)
            raise XdpError(f"the XDP compiler process exited with {rc} without an answer "
                           "(its error is in the log above)")
        try:
            msg = json.loads(data)
        except ValueError as e:
            raise XdpError(f"the XDP compiler process sent no JSON: {e}") from None
        if not isinstance(msg, dict):
            raise XdpError("the XDP compiler process sent no JSON object")
        if "error" in msg:
            raise XdpError(str(msg["error"]))
        if msg.get("maps") != list(MAPS) or len(fds) != len(MAPS) + 1:
            raise XdpError(f"the XDP compiler process sent maps {msg.get('maps')!r} and "
                           f"{len(fds)} fds; expected {list(MAPS)} and the program's fd first")
    except BaseException:
        _close_all(fds)
        raise
    return msg, fds


def compile_program(max_devices: int, max_queues: int, timeout: float | None = None
                    ) -> tuple[int, dict[str, _maps.BpfMap]]:
    """(program fd, maps by name) from a compiler process (see _compile.py), each fd
    checked against what the kernel says it is. The child is gone on return; one
    silent past `timeout` (COMPILE_TIMEOUT) is killed."""
    timeout = COMPILE_TIMEOUT if timeout is None else timeout
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _CHILD, _PKG_ROOT, str(theirs.fileno()),
                 str(max_devices), str(max_queues)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            raise XdpError(f"cannot start the XDP compiler process ({sys.executable}): "
                           f"{e}") from e
        finally:
            theirs.close()  # EOF on `ours` once the child is gone, answer or not
        try:
            _, fds = _receive(ours, proc, timeout)
        except BaseException:
            if proc.poll() is None:  # silent past the deadline, or no answer we take
                proc.kill()
            proc.wait()
            raise
        try:
            proc.wait(timeout=10)  # it exits right after sending
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        ours.close()
    return _checked(fds, max_devices, max_queues)


def _checked(fds: list[int], max_devices: int, max_queues: int
             ) -> tuple[int, dict[str, _maps.BpfMap]]:
    try:
        ptype, pname = _maps.prog_type_and_name(fds[0])
        if ptype != _maps.PROG_XDP or pname != PROG_NAME[:15]:
            raise XdpError(f"the XDP compiler process sent program {pname!r} of type {ptype}, "
                           f"not the XDP program {PROG_NAME}")
        maps = {}
        for name, fd in zip(MAPS, fds[1:], strict=True):
            info = _maps.map_info(fd)
            want = expected_maps(max_devices, max_queues)[name]
            got = (info["type"], info["key_size"], info["value_size"], info["max_entries"])
            if info["name"] != name or got != want:
                raise XdpError(f"map {name}: the kernel says {info['name']!r} (type, key, value, "
                               f"entries) {got}, expected {want}")
            if name == "held" and not info["flags"] & _maps.BPF_F_MMAPABLE:
                raise XdpError("map held is not mmap-able (BPF_F_MMAPABLE)")
            maps[name] = _maps.BpfMap(fd, info)
    except OSError as e:
        _close_all(fds)
        raise XdpError(f"cannot inspect the XDP compiler's fds: {e}") from e
    except BaseException:
        _close_all(fds)
        raise
    return fds[0], maps


# ------------------------------------------------------------------ the program

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_DEV_CFG = struct.Struct("=IIII")  # struct dev_cfg: running, max_frame, share, pad


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
        t0 = time.monotonic()
        self._prog_fd, self._maps = compile_program(max_devices, max_queues)
        self.compile_s = time.monotonic() - t0  # the child's whole life, start to exit
        try:
            self.prog_id = prog_info_fd(self._prog_fd)["id"]
            self._mac2slot = self._maps["mac2slot"]
            self._devices = self._maps["devices"]
            self._xsks = self._maps["xsks"]
            self._counters = self._maps["counters"]
            self._gcounters = self._maps["gcounters"]
            self.share = NO_SHARE
            # `held` is mmap-ed so that the C bursts can subtract what they consume
            # without a syscall: one u64 per (slot, queue), the xsks index.
            n = max_devices * self.max_queues * 8
            size = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                self._held_mm = mmap.mmap(self._maps["held"].fd, size, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise XdpError(f"mmap of the held map failed: {e}") from e
            self._held = ffi.from_buffer("uint64_t[]", self._held_mm)
        except BaseException:
            self._free()
            raise

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
                _maps.xdp_attach(self.ifname, self._prog_fd, flags)
            except OSError as e:
                errors.append(f"{mode}: {e.strerror}")
                continue
            self.mode = mode
            return mode
        raise XdpError(f"attaching XDP to {self.ifname} failed: {'; '.join(errors)}")

    def _remove(self, mode: str) -> None:
        try:
            _maps.xdp_detach(self.ifname, _MODE_FLAGS.get(mode, 0))
        except OSError as e:
            raise XdpError(f"detaching XDP ({mode}) from {self.ifname} failed: "
                           f"{e.strerror}") from e

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
            self._free()

    def _free(self) -> None:
        """Unmap `held`, close every map fd and the program's: the kernel frees what no
        fd and no NIC holds any more."""
        mm = getattr(self, "_held_mm", None)
        if mm is not None:
            held, self._held, self._held_mm = self._held, None, None
            if held is not None:
                ffi.release(held)  # the buffer export, so that the mapping can go
            mm.close()
        for m in getattr(self, "_maps", {}).values():
            m.close()
        fd, self._prog_fd = getattr(self, "_prog_fd", -1), -1
        if fd >= 0:
            os.close(fd)

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

    def _slot_of(self, key: bytes) -> int | None:
        v = self._mac2slot.lookup(key)
        return None if v is None else _U32.unpack(v)[0]

    def steered_slot(self, mac: str, vlan: int = 0) -> int | None:
        """The slot mac2slot steers (vlan, mac) to, None when nobody's."""
        return self._slot_of(_U64.pack(steer_key(mac, vlan)))

    def _device(self, slot: int, running: bool, max_frame: int) -> None:
        self._devices.update(_U32.pack(slot), _DEV_CFG.pack(int(running), max_frame,
                                                              self.share, 0))

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
        key = _U64.pack(steer_key(mac, vlan))
        old = self._slot_of(key)
        if old is not None and old != slot and not take:
            where = f" in VLAN {vlan}" if vlan else ""
            raise XdpError(f"MAC {mac}{where} is already steered to slot {old}")
        self._device(slot, running, max_frame)  # configuration before the MAC
        self._mac2slot.update(key, _U32.pack(slot))

    def set_share(self, share: int) -> None:
        """Every slot's socket may hold at most `share` frames unconsumed per queue
        (the XDP program drops beyond it: drop_over_share)."""
        if not 0 <= share <= NO_SHARE:
            raise ValueError(f"share {share} out of range")
        self.share = share
        for slot in range(self.max_devices):
            key = _U32.pack(slot)
            running, max_frame, old, pad = _DEV_CFG.unpack(self._devices.lookup(key))
            if old != share:
                self._devices.update(key, _DEV_CFG.pack(running, max_frame, share, pad))

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
        key = _U64.pack(steer_key(mac, vlan))
        if self._slot_of(key) == slot:
            self._mac2slot.delete(key)
        self._device(slot, False, 0)
        for q in range(self.max_queues):
            self.clear_socket(slot, q)
        zero = bytes(self._counters.buf_size)
        for c in range(len(COUNTERS)):
            self._counters.update(_U32.pack(slot * len(COUNTERS) + c), zero)

    def set_socket(self, slot: int, queue: int, fd: int) -> None:
        """Frames for `slot` arriving on NIC queue `queue` go to the AF_XDP socket `fd`."""
        idx = self.slot_index_for(slot, queue)
        try:
            self._xsks.update(_U32.pack(idx), _U32.pack(fd))
        except OSError as e:
            raise XdpError(f"XSKMAP[{idx}] = fd {fd} (slot {slot}, queue {queue}) failed: "
                           f"{e.strerror} (the socket must be an AF_XDP socket bound with an "
                           "RX ring)") from e

    def clear_socket(self, slot: int, queue: int) -> None:
        self._xsks.delete(_U32.pack(self.slot_index_for(slot, queue)))  # False: was empty

    def _sum(self, m: _maps.BpfMap, index: int) -> int:
        """A per-CPU u64 counter, summed over CPUs."""
        raw = m.lookup(_U32.pack(index))
        return 0 if raw is None else sum(struct.unpack(f"={m.ncpus}Q", raw))

    def counters(self, slot: int) -> dict[str, int]:
        """The slot's counters, summed over CPUs."""
        self._check_slot(slot)
        base = slot * len(COUNTERS)
        return {name: self._sum(self._counters, base + i) for i, name in enumerate(COUNTERS)}

    def global_counters(self) -> dict[str, int]:
        """Frames handed to the kernel: passed (unknown unicast), broadcast, multicast, runt."""
        return {name: self._sum(self._gcounters, i) for i, name in enumerate(GLOBAL_COUNTERS)}


__all__ = ["XdpProgram", "XdpError", "find_kernel_headers", "import_bcc", "bcc_available",
           "mac_key", "steer_key", "prog_info", "is_gateway_program", "bpf_source", "COUNTERS",
           "GLOBAL_COUNTERS"]
