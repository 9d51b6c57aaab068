"""`gateway capture`, the reader's side (the CLI): the daemon's capture rings
(gateway/capture.py) turned into a pcap stream.

The capture's own connection to the control socket brings the rings' memfd
(SCM_RIGHTS) and stays open: closing it ends the capture, a line from the
daemon says it ended there (the device went away). The reader maps the rings,
and a C call writes the records as pcap records straight from the rings
(gw_cap_write: each record's header ends with its pcap header, so writev
needs no copy of ours), merged across queue pairs by timestamp; pcapng
blocks are built in a buffer first (gw_cap_to_pcap). After each drain it sleeps in poll() on the
connection, BUSY_MS if frames came, POLL_MS if none did (a reader that
spins would take a CPU from the traffic it watches). It is the only one that waits: the
workers drop and count what does not fit.

pcap: the classic format with nanosecond timestamps (magic 0xa1b23c4d),
LINKTYPE_ETHERNET, which tcpdump, tshark and wireshark read, from a pipe too;
or, with --pcapng, pcapng whose packets carry their direction (epb_flags:
inbound = to the guest, outbound = from it).
"""

from __future__ import annotations

import array
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from gateway._native import ffi, lib

POLL_MS = 10  # the rings were empty: nothing is flowing
BUSY_MS = 2  # they were not: let frames gather (4 MiB is ~4 ms at 1 GB/s) rather than spin
OUT_CHUNK = 1 << 20  # pcap bytes per C call
STOP_WAIT = 5.0  # s for the daemon to say the rings are let go
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1


class CaptureFailed(Exception):
    """The capture could not start or broke; exit code and one line."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


def pcap_header(snaplen: int) -> bytes:
    return struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + value + bytes(-len(value) % 4)


def pcapng_header(snaplen: int, name: str) -> bytes:
    """Section Header Block, then one Interface Description Block (the
    device: if_name, if_tsresol 9 = nanoseconds), in host byte order as the
    C records are."""
    shb = struct.pack("=IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("=I", 28)
    opts = _option(2, name.encode()) + _option(9, b"\x09") + _option(0, b"")
    n = 20 + len(opts)
    idb = struct.pack("=IIHHI", 1, n, LINKTYPE_ETHERNET, 0, snaplen) + opts + struct.pack("=I", n)
    return shb + idb


@dataclass
class Result:
    frames: int  # written to the output
    dropped: int  # did not fit in the rings
    ended: str | None  # why the daemon ended it, if it did
    broken_pipe: bool = False


class _Conn:
    """The capture's connection: the JSON line protocol plus one fd."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.buf = b""
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def line_with_fds(self, timeout: float | None) -> tuple[dict | None, list[int]]:
        """The next line (None: the daemon closed) and the fds that came with it."""
        fds: list[int] = []
        self.sock.settimeout(timeout)
        try:
            while b"\n" not in self.buf:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(raw[: len(raw) - len(raw) % 4])
                        fds.extend(a)
                if not data:
                    return None, fds
                self.buf += data
        finally:
            self.sock.settimeout(None)
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = {"ok": False, "error": "the daemon sent something that is not JSON"}
        return (msg if isinstance(msg, dict) else {"ok": False, "error": "bad reply"}), fds

    def close(self) -> None:
        self.sock.close()


class _Rings:
    """The reader's mapping of the daemon's rings and its views (gw_cap_view)."""

    def __init__(self, fd: int, layout: dict) -> None:
        try:
            rings, size, stride = (int(layout[k]) for k in ("rings", "ring_size", "stride"))
            header = int(layout["header"])
        except (KeyError, TypeError, ValueError):
            raise CaptureFailed("the daemon's capture reply is incomplete") from None
        total = rings * stride
        if not (1 <= rings <= lib.GW_PUMP_MAX_RX and size & (size - 1) == 0
                and lib.GW_CAP_MIN_RING <= size <= lib.GW_CAP_MAX_RING
                and stride == header + size and header >= ffi.sizeof("struct gw_cap_shared")
                and os.fstat(fd).st_size == total):
            raise CaptureFailed("the daemon's capture rings do not match their description")
        self._map = mmap.mmap(fd, total)
        self._buf = ffi.from_buffer("uint8_t[]", self._map, require_writable=True)
        self.views = ffi.new("struct gw_cap_view[]", rings)
        for i in range(rings):
            v = self.views[i]
            v.sh = ffi.cast("struct gw_cap_shared *", self._buf + i * stride)
            v.data = self._buf + i * stride + header
            v.size = size
            v.tail = v.sh.tail
        self.n = rings
        self.pcapng = 0  # 1: pcapng Enhanced Packet Blocks instead of pcap records
        self._out = ffi.new("uint8_t[]", OUT_CHUNK + 16 + 65536)
        self._frames = ffi.new("uint64_t *")
        self._bad = ffi.new("unsigned *")

    def take(self, max_frames: int) -> tuple[memoryview, int]:
        """Waiting records as pcap bytes, at most max_frames frames: a view of
        this reader's own buffer (no copy at 1.5 GB/s), good until the next take."""
        got = lib.gw_cap_to_pcap(self.views, self.n, self._out, OUT_CHUNK, max_frames,
                                 self._frames, self._bad, self.pcapng)
        if got < 0:
            raise CaptureFailed(f"capture ring {self._bad[0]} holds a record the daemon "
                                "never writes: stopping")
        return memoryview(ffi.buffer(self._out, got)), self._frames[0]

    def write(self, fd: int, max_frames: int) -> int:
        """Waiting records (at most max_frames) written to fd as pcap straight
        from the rings (gw_cap_write: no copy on our side); how many."""
        got = lib.gw_cap_write(self.views, self.n, fd, max_frames, self._frames, self._bad)
        if got < 0 and self._bad[0] < self.n:
            raise CaptureFailed(f"capture ring {self._bad[0]} holds a record the daemon "
                                "never writes: stopping")
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        return self._frames[0]

    def dropped(self) -> int:
        return sum(self.views[i].sh.dropped for i in range(self.n))

    def close(self) -> None:
        self.views = None
        ffi.release(self._buf)
        self._map.close()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def capture(socket_path: str, name: str, open_out: Callable[[], int], *, direction: str,
            count: int | None, snaplen: int, buffer_kib: int, pcapng: bool = False,
            started=lambda: None) -> Result:
    """Run one capture of device `name` until SIGINT/SIGTERM, `count` frames,
    the daemon's end or a broken pipe. The output (`open_out()`, an fd) is
    opened once the daemon said yes, so a refused capture leaves no file."""
    conn = _Conn(socket_path)
    try:
        conn.send({"cmd": "capture", "args": {"name": name, "direction": direction,
                                              "snaplen": snaplen, "buffer_kib": buffer_kib}})
        reply, fds = conn.line_with_fds(30.0)
        if reply is None or not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise CaptureFailed(reply.get("error", "refused") if reply else
                                "the daemon closed the connection", 2)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise CaptureFailed(f"the daemon sent {len(fds)} descriptors for the capture, not 1")
        try:
            rings = _Rings(fds[0], reply.get("result") or {})
        finally:
            os.close(fds[0])
        rings.pcapng = int(pcapng)
        header = pcapng_header(snaplen, name) if pcapng else pcap_header(snaplen)
        try:
            return _loop(conn, rings, open_out(), count, header, started)
        finally:
            rings.close()
    finally:
        conn.close()


def _loop(conn: _Conn, rings: _Rings, out_fd: int, count: int | None, header: bytes,
          started) -> Result:
    stop = []

    def on_signal(signum, frame) -> None:
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    res = Result(0, 0, None)
    try:
        try:
            _write_all(out_fd, header)
            started()
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            busy = False
            while not stop and (count is None or res.frames < count):
                if poller.poll(BUSY_MS if busy else POLL_MS):
                    msg, fds = conn.line_with_fds(STOP_WAIT)
                    for fd in fds:
                        os.close(fd)
                    # the daemon ended it (device gone) and let go of the rings
                    # first, or it went away itself: take what is there
                    res.ended = (msg or {}).get("end") or "the daemon closed the capture"
                    _drain(rings, out_fd, count, res)
                    break
                busy = _drain(rings, out_fd, count, res)
            else:
                # Ctrl-C or -c: the daemon unhooks, then says so; only after that
                # is the rings' content final
                conn.send({"cmd": "stop"})
                msg, fds = conn.line_with_fds(STOP_WAIT)
                for fd in fds:
                    os.close(fd)
                if msg is not None and "end" in msg:
                    res.ended = msg["end"]
                _drain(rings, out_fd, count, res)
        except BrokenPipeError:
            # the reader went away: end quietly, like tcpdump | head; unless Ctrl-C
            # took both of us (`... -w - | tcpdump -r -`): then the summary is wanted
            res.broken_pipe = not stop
        except (TimeoutError, ConnectionError):
            pass  # the daemon did not answer the stop: what was read stands
        res.dropped = rings.dropped()
        return res
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _drain(rings: _Rings, out_fd: int, count: int | None, res: Result) -> bool:
    """Everything waiting (up to `count`) to out_fd; True if there was some."""
    moved = False
    while count is None or res.frames < count:
        left = (count - res.frames) if count is not None else 1 << 62
        if rings.pcapng:  # pcapng blocks are built in a buffer of ours
            data, n = rings.take(left)
            if n:
                _write_all(out_fd, data)
        else:  # pcap records are written from the rings themselves
            n = rings.write(out_fd, left)
        if not n:
            return moved
        res.frames += n
        moved = True
    return moved


def decoder() -> subprocess.Popen:
    """Without -w: tcpdump prints the frames, reading our pcap from a pipe."""
    try:
        return subprocess.Popen(["tcpdump", "-nn", "-r", "-"], stdin=subprocess.PIPE)
    except FileNotFoundError:
        raise CaptureFailed("tcpdump is not installed: apt-get install tcpdump, or write "
                            "the capture with -w FILE (or -w - | your decoder)", 2) from None


def summary(res: Result) -> str:
    return f"{res.frames} packets captured, {res.dropped} dropped (capture buffer full)"


def open_output(path: str) -> int:
    if path == "-":
        return sys.stdout.fileno()
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CaptureFailed(f"cannot write {path}: {e.strerror}", 2) from None
