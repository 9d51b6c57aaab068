"""AF_XDP sockets and their UMEM, over libxdp 1.3.1 (bindings in ``gateway._native``).

A `Umem` is the frame memory one NIC queue shares between the kernel and us: an
anonymous mmap'd area cut into equal frames, libxdp's umem handle, the fill ring
(free frames we lend the kernel for RX) and the completion ring (TX frames the
kernel is done with). The kernel allows ONE UMEM per (device, queue); every
`XskSocket` on that queue (one per guest device) therefore shares it: the first
socket binds the queue, the others bind with XDP_SHARED_UMEM and use the same
fill/completion rings.

Python here does set-up, teardown and slow paths (tests, control frames): the
per-packet datapath is C and works on the exposed cffi pointers (`Umem.area`,
`Umem.fill_ring`, `Umem.comp_ring`, `Umem.pool`/`Umem.npool`, `XskSocket.rx`/`.tx`/`.fd`).
Rules for that C code are in docs/architecture.md ("xdp/xsk.py").

What libxdp 1.3.1 does (read in its xsk.c, checked by tests/test_xsk.py):

- `xsk_umem__create` creates the fill/completion rings on the umem's own fd and
  keeps pointers to OUR ring structs: they must live as long as the umem.
- The first socket on a (device, queue) IS the umem's fd. Deleting that socket
  does not close it: the queue stays bound until `xsk_umem__delete`. So close
  sockets first, then the umem; a Umem whose sockets are all gone is spent
  (libxdp unmapped its fill/completion rings with the last socket).
- `xsk_socket__create_shared` on the SAME (device, queue) finds libxdp's
  per-queue context and ignores the fill/comp arguments entirely: it neither
  reads nor writes them. We pass the umem's own structs anyway. On ANOTHER
  device/queue it would create new fill/comp rings into the structs passed,
  which would overwrite the owner's handles: `XskSocket` refuses that.
- A failed first bind: older kernels moved the umem fd's fill/completion rings
  into a buffer pool that the failed bind then destroyed, and libxdp does not
  recreate them, so the umem was unusable (platform notes). On 6.18 the
  EOPNOTSUPP of zero-copy on veth left it usable (a copy bind on the same umem
  received frames, checked by hand). `XskSocket` recreates the libxdp umem
  (same area, every frame free again) after any failed first bind anyway: it
  is cheap, and the zero-copy -> copy fallback and the EBUSY retry then work on
  every kernel.
- A closed queue is free again after ~20-70 ms here (the platform notes say up
  to ~0.5 s): `busy_wait` covers it.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import threading
import time

from gateway._native import ffi, lib

__all__ = ["Umem", "XskError", "XskSocket"]

_HINTS = {
    errno.EBUSY: "queue already has a UMEM (another socket/process is bound to this queue, "
                 "or the kernel has not released a closed one yet: ~0.5 s)",
    errno.EPERM: "run as root (CAP_NET_RAW, CAP_IPC_LOCK)",
    errno.EACCES: "run as root (CAP_NET_RAW, CAP_IPC_LOCK)",
    errno.ENOENT: "no such interface",
    errno.ENODEV: "no such interface",
    errno.EOPNOTSUPP: "the driver cannot do this bind mode (zero-copy?)",
    errno.ENOMEM: "out of memory or RLIMIT_MEMLOCK too low for the UMEM",
    errno.EINVAL: "bad ring/frame sizes, queue id beyond the device's queues, or bad flags",
}

STATS_KEYS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
              "rx_fill_ring_empty_descs", "tx_ring_empty_descs")

_ZC_BIND = lib.XDP_ZEROCOPY | lib.XDP_USE_NEED_WAKEUP
_COPY_BIND = lib.XDP_COPY | lib.XDP_USE_NEED_WAKEUP


def _errname(err: int) -> str:
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # errorcode says ENOTSUP, the same number on Linux
    return errno.errorcode.get(err, f"errno {err}")


class XskError(OSError):
    """An AF_XDP call failed: errno, its name and a hint at the usual cause."""

    def __init__(self, err: int, what: str) -> None:
        name = _errname(err)
        hint = _HINTS.get(err)
        msg = f"{what}: {name} ({os.strerror(err)})" + (f": {hint}" if hint else "")
        super().__init__(err, msg)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Umem:
    """UMEM area + fill/completion rings + the free-frame pool of one NIC queue.

    Frame addresses are offsets into `area`, multiples of `frame_size`. The pool
    is a stack in C memory (`pool[0:npool[0]]`) so the C datapath can take and
    return frames itself; Python's `alloc`/`free`/`fill`/`reap_completions`
    use the same stack under `lock`. Whoever runs the datapath of this queue
    must be the only user of fill/comp/pool at a time (they are single-producer
    single-consumer rings): one worker thread per NIC queue, or hold `lock`.
    """

    def __init__(self, nframes: int = 4096, frame_size: int = 4096,
                 fill_size: int = 2048, comp_size: int = 2048, headroom: int = 0) -> None:
        # Aligned mode: the kernel wants a power-of-two frame of 2048..PAGE_SIZE bytes
        # and power-of-two ring sizes (they are indexed with size - 1).
        if not (_pow2(frame_size) and 2048 <= frame_size <= mmap.PAGESIZE):
            raise ValueError(f"frame_size {frame_size}: power of two in 2048..{mmap.PAGESIZE}")
        if not (_pow2(fill_size) and _pow2(comp_size)):
            raise ValueError("fill_size and comp_size must be powers of two")
        if nframes < 1:
            raise ValueError("nframes must be >= 1")
        self.nframes, self.frame_size = nframes, frame_size
        self.fill_size, self.comp_size, self.headroom = fill_size, comp_size, headroom
        self.size = nframes * frame_size
        self.mask = ~(frame_size - 1) & 0xFFFFFFFFFFFFFFFF  # data address -> its frame
        self.lock = threading.Lock()
        # Anonymous and page-aligned; the kernel pins the pages while the umem lives.
        self._mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.area = ffi.from_buffer("unsigned char[]", self._mm)
        self.fill_ring = ffi.new("struct xsk_ring_prod *")
        self.comp_ring = ffi.new("struct xsk_ring_cons *")
        self.pool = ffi.new("__u64[]", nframes)
        self.npool = ffi.new("unsigned[1]")
        self._cfg = ffi.new("struct xsk_umem_config *", {
            "fill_size": fill_size, "comp_size": comp_size, "frame_size": frame_size,
            "frame_headroom": headroom, "flags": 0})
        self.umem = ffi.NULL  # struct xsk_umem *
        self.sockets: list[XskSocket] = []
        self.bound: tuple[str, int] | None = None  # (ifname, queue) of the first socket
        self.spent = False  # had sockets, all closed: fill/comp are unmapped
        self.closed = False
        try:
            self._create()
        except BaseException:
            self._release_area()
            raise

    # -- libxdp umem ----------------------------------------------------------

    def _create(self) -> None:
        # libxdp fills in these structs and keeps pointers to them (fill_save/comp_save).
        ffi.memmove(self.fill_ring, bytes(ffi.sizeof("struct xsk_ring_prod")),
                    ffi.sizeof("struct xsk_ring_prod"))
        ffi.memmove(self.comp_ring, bytes(ffi.sizeof("struct xsk_ring_cons")),
                    ffi.sizeof("struct xsk_ring_cons"))
        pp = ffi.new("struct xsk_umem **")
        rc = lib.xsk_umem__create(pp, self.area, self.size, self.fill_ring, self.comp_ring,
                                  self._cfg)
        if rc:
            raise XskError(-rc, f"xsk_umem__create({self.nframes} x {self.frame_size} B)")
        self.umem = pp[0]
        # Every frame free, highest address at the bottom so alloc() hands out low ones.
        self.pool[0:self.nframes] = [(self.nframes - 1 - i) * self.frame_size
                                     for i in range(self.nframes)]
        self.npool[0] = self.nframes

    def _recreate(self) -> None:
        """After a failed first bind: same area, fresh umem fd and rings (see module doc)."""
        assert not self.sockets
        if self.umem != ffi.NULL:
            lib.xsk_umem__delete(self.umem)
            self.umem = ffi.NULL
        self._create()

    @property
    def fd(self) -> int:
        return lib.xsk_umem__fd(self.umem)

    # -- frame pool -----------------------------------------------------------

    @property
    def nfree(self) -> int:
        """Frames in the pool (neither in the kernel's rings nor handed out)."""
        return self.npool[0]

    def alloc(self, n: int) -> list[int]:
        """Take up to n free frames (fewer if the pool runs short)."""
        with self.lock:
            have = self.npool[0]
            k = min(n, have)
            addrs = ffi.unpack(self.pool + (have - k), k)
            self.npool[0] = have - k
        return addrs

    def free(self, addrs: list[int]) -> None:
        """Give frames back; any address inside a frame stands for that frame."""
        with self.lock:
            have = self.npool[0]
            if have + len(addrs) > self.nframes:
                raise ValueError("more frames freed than the UMEM holds")
            self.pool[have:have + len(addrs)] = [a & self.mask for a in addrs]
            self.npool[0] = have + len(addrs)

    def fill(self, n: int | None = None) -> int:
        """Lend up to n (default: as many as fit) free frames to the kernel for RX."""
        with self.lock:
            if self.spent or self.closed:
                return 0
            k = lib.gw_xsk_fill(self.fill_ring, self.pool, self.npool[0],
                                self.fill_size if n is None else n)
            self.npool[0] -= k
        return k

    def reap_completions(self) -> int:
        """Return the frames of finished TX to the pool; how many."""
        with self.lock:
            if self.spent or self.closed:
                return 0
            k = lib.gw_xsk_reap(self.comp_ring, self.pool, self.npool[0], self.nframes, self.mask)
            self.npool[0] += k
        return k

    # -- lifetime -------------------------------------------------------------

    def _socket_closed(self, sock: XskSocket) -> None:
        self.sockets.remove(sock)
        if not self.sockets:
            self.spent = True

    def close(self) -> None:
        """Close the sockets still open on this umem, then the umem, then the area."""
        if self.closed:
            return
        for s in list(self.sockets):
            s.close()
        self.closed = True
        if self.umem != ffi.NULL:
            rc = lib.xsk_umem__delete(self.umem)
            assert rc == 0, rc  # only -EBUSY while sockets use it, and we closed them
            self.umem = ffi.NULL
        self._release_area()

    def _release_area(self) -> None:
        ffi.release(self.area)
        self._mm.close()

    def __enter__(self) -> Umem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and getattr(self, "umem", ffi.NULL) != ffi.NULL:
            self.close()


class XskSocket:
    """One AF_XDP socket on (ifname, queue), with its own RX and TX rings.

    `first=True`: the socket that binds the queue with `umem` (xsk_socket__create).
    Zero-copy is tried first (XDP_ZEROCOPY|XDP_USE_NEED_WAKEUP); on EOPNOTSUPP or
    EINVAL it falls back to XDP_COPY|XDP_USE_NEED_WAKEUP. `mode` is what the kernel
    reports (XDP_OPTIONS): "zero-copy" or "copy". On EBUSY the bind is retried for
    up to `busy_wait` seconds: a queue whose last socket was just closed is freed
    by the kernel ~0.5 s later. `first=False`: a further socket on the same queue
    (another guest) sharing umem's fill/completion rings; it inherits the mode.

    No XDP program is loaded (XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD): put `fd` into
    your own XSKMAP. After creation the first socket lends the kernel
    min(fill_size, nframes // 2) frames for RX; the rest stay free for TX.
    """

    def __init__(self, ifname: str, queue: int, umem: Umem, *, rx_size: int = 2048,
                 tx_size: int = 2048, first: bool, zerocopy: bool = True,
                 busy_wait: float = 0.0) -> None:
        if umem.closed or umem.spent:
            raise ValueError("umem is closed or spent (its sockets were all closed)")
        if not (_pow2(rx_size) and _pow2(tx_size)):
            raise ValueError("rx_size and tx_size must be powers of two")
        if first and umem.sockets:
            raise ValueError("umem already has its first socket: pass first=False")
        if not first and not umem.sockets:
            raise ValueError("first=False needs a live first socket on umem")
        if not first and umem.bound != (ifname, queue):
            raise ValueError(f"a shared socket must use the first socket's queue {umem.bound}; "
                             "another device/queue needs its own fill/completion rings")
        self.ifname, self.queue, self.umem = ifname, queue, umem
        self.rx = ffi.new("struct xsk_ring_cons *")
        self.tx = ffi.new("struct xsk_ring_prod *")
        self._cfg = ffi.new("struct xsk_socket_config *")
        self._cfg.rx_size, self._cfg.tx_size = rx_size, tx_size
        self._cfg.libxdp_flags = lib.XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD
        self._cfg.xdp_flags = 0
        self._xsk = ffi.NULL
        pp = ffi.new("struct xsk_socket **")
        name = ifname.encode()
        if first:
            self._create_first(pp, name, zerocopy, busy_wait)
        else:
            rc = lib.xsk_socket__create_shared(pp, name, queue, umem.umem, self.rx, self.tx,
                                               umem.fill_ring, umem.comp_ring, self._cfg)
            if rc:
                raise XskError(-rc, f"xsk_socket__create_shared({ifname} queue {queue})")
        self._xsk = pp[0]
        self.fd: int = lib.xsk_socket__fd(self._xsk)
        opts = lib.gw_xsk_options(self.fd)
        self.mode = "zero-copy" if opts >= 0 and opts & lib.XDP_OPTIONS_ZEROCOPY else "copy"
        umem.sockets.append(self)
        if first:
            umem.bound = (ifname, queue)
            umem.fill(min(umem.fill_size, umem.nframes // 2))

    def _create_first(self, pp, name: bytes, zerocopy: bool, busy_wait: float) -> None:
        umem = self.umem
        binds = [_ZC_BIND, _COPY_BIND] if zerocopy else [_COPY_BIND]
        deadline = time.monotonic() + busy_wait
        errs: list[str] = []
        while binds:
            self._cfg.bind_flags = binds[0]
            rc = lib.xsk_socket__create(pp, name, self.queue, umem.umem, self.rx, self.tx,
                                        self._cfg)
            if rc == 0:
                return
            umem._recreate()  # a failed first bind leaves the umem unusable
            err = -rc
            if err == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            kind = "zero-copy" if binds[0] & lib.XDP_ZEROCOPY else "copy"
            errs.append(f"{kind}: {_errname(err)}")
            if err in (errno.EOPNOTSUPP, errno.EINVAL) and len(binds) > 1:
                binds.pop(0)
                continue
            tried = f" (tried {', '.join(errs)})" if len(errs) > 1 else ""
            raise XskError(err, f"xsk_socket__create({self.ifname} queue {self.queue}){tried}")

    # -- control --------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The kernel's drop counters for this socket (XDP_STATISTICS). XDP_REDIRECT
        to a socket whose RX ring is full or whose fill ring is empty drops silently
        elsewhere: rx_ring_full / rx_fill_ring_empty_descs are where it shows."""
        st = ffi.new("struct xdp_statistics *")
        rc = lib.gw_xsk_stats(self.fd, st)
        if rc:
            raise XskError(-rc, "getsockopt(XDP_STATISTICS)")
        return {k: getattr(st, k) for k in STATS_KEYS}

    def kick(self) -> None:
        """Make the kernel transmit what is in the TX ring (needed with need_wakeup,
        always in copy mode). Busy/again answers are not errors: kick later."""
        rc = lib.gw_xsk_kick(self.fd)
        if rc:
            raise XskError(-rc, f"sendto kick on {self.ifname} queue {self.queue}")

    def close(self) -> None:
        """Delete the socket (before its umem). The last socket of a umem spends it."""
        if self._xsk != ffi.NULL:
            lib.xsk_socket__delete(self._xsk)
            self._xsk = ffi.NULL
            self.fd = -1
            self.umem._socket_closed(self)

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slow-path helpers (per-packet Python: tests and control frames only) --

    def send(self, frames: list[bytes], timeout: float = 2.0) -> int:
        """Copy frames into UMEM frames, post them on TX and kick until the kernel
        took them all; returns how many were sent (fewer only on timeout). Frames
        come back through the completion ring: reaped here and on later calls."""
        umem = self.umem
        room = umem.frame_size - umem.headroom
        for f in frames:
            if len(f) > room:
                raise ValueError(f"frame of {len(f)} bytes > {room}")
        idx = ffi.new("__u32 *")
        deadline = time.monotonic() + timeout
        sent = 0
        while True:
            umem.reap_completions()
            want = min(len(frames) - sent, lib.xsk_prod_nb_free(self.tx, len(frames) - sent))
            addrs = umem.alloc(want) if want else []
            n = len(addrs)
            if n and lib.xsk_ring_prod__reserve(self.tx, n, idx) == n:
                for i, addr in enumerate(addrs):
                    f = frames[sent + i]
                    ffi.memmove(umem.area + addr, f, len(f))
                    d = lib.xsk_ring_prod__tx_desc(self.tx, idx[0] + i)
                    d.addr, d.len, d.options = addr, len(f), 0
                lib.xsk_ring_prod__submit(self.tx, n)
                sent += n
            elif addrs:
                umem.free(addrs)
            self.kick()
            if self.tx.consumer[0] == self.tx.producer[0] and sent == len(frames):
                break
            if time.monotonic() >= deadline:
                break
        umem.reap_completions()
        return sent

    def recv(self, max: int = 64, timeout: float = 0.0) -> list[bytes]:
        """Up to max received frames (copied out), waiting up to timeout seconds for
        the first. Their UMEM frames go straight back to the fill ring."""
        umem = self.umem
        idx = ffi.new("__u32 *")
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        while True:
            n = lib.xsk_ring_cons__peek(self.rx, max, idx)
            if n:
                break
            if lib.xsk_ring_prod__needs_wakeup(umem.fill_ring):
                p.poll(0)  # zero-copy drivers wait for this before using the fill ring
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            p.poll(int(left * 1000) or 1)
        out, addrs = [], []
        for i in range(n):
            d = lib.xsk_ring_cons__rx_desc(self.rx, idx[0] + i)
            out.append(ffi.buffer(umem.area + d.addr, d.len)[:])
            addrs.append(d.addr)
        lib.xsk_ring_cons__release(self.rx, n)
        umem.free(addrs)
        umem.fill(n)
        return out
