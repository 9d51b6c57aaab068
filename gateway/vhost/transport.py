"""Unix sockets for vhost-user: the only place that calls recvmsg/sendmsg.

Server mode: we listen on a path and QEMU connects (`-chardev socket,path=`).
Client mode: QEMU listens (`server=on`) and we connect, and connect again with
backoff whenever it goes away, so a VM outlives a restart of either side.
Either way a device serves one front-end at a time and a front-end that comes
back gets the same device. Everything runs on one asyncio loop; the data path
runs in worker threads and reaches this loop only through `device.on_broken`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass, field

from gateway.vhost.backend import VhostConnection
from gateway.vhost.device import VhostDevice
from gateway.vhost.protocol import MAX_FDS, ProtocolError

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0
# A message begun and not finished within this many seconds closes its
# connection: QEMU and DPDK write each message whole, and a device serves one
# front-end at a time, so a peer sitting on half a message would keep the
# device from every other front-end until it hangs up.
PARTIAL_MESSAGE_TIMEOUT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0


SOCKET_MODE = 0o660
SOCKET_GROUP = "gateway"


def _group_id() -> int:
    """The `gateway` group if there is one, else root's."""
    try:
        return grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return 0


class SocketInUse(Exception):
    """Another process already listens on the socket path."""


@dataclass
class Endpoint:
    device: VhostDevice
    path: str
    mode: str  # "server" (we listen) or "client" (we connect)
    listener: socket.socket | None = None
    sock: socket.socket | None = None
    conn: VhostConnection | None = None
    closing: bool = False
    connections: int = 0  # front-end sessions so far
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    session_over: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    partial: asyncio.TimerHandle | None = None  # deadline of a message begun, not finished


def _recv(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    out = list(fds)
    if flags & socket.MSG_CTRUNC:
        for fd in out:
            os.close(fd)
        raise ProtocolError(f"more than {MAX_FDS} fds in one message")
    return data, out


class VhostService:
    """The control-plane loop. Use `start()` to run it on its own thread (tests,
    the demo) or run `serve_forever()` on the caller's loop (the daemon)."""

    def __init__(self, partial_timeout: float = PARTIAL_MESSAGE_TIMEOUT) -> None:
        if not partial_timeout > 0:
            raise ValueError(f"partial message timeout must be > 0, not {partial_timeout}")
        self.partial_timeout = partial_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self._thread: threading.Thread | None = None

    # -- running the loop -----------------------------------------------------------

    def start(self) -> VhostService:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="gw-control", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        """Close every endpoint (stopping the data path) and the loop."""
        if self.loop is None:
            return
        for name in list(self.endpoints):
            self.remove(name)
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self._thread = None
        self.loop = None

    def _call(self, coro):
        assert self.loop is not None, "service not started"
        if self._thread is not None and threading.current_thread() is not self._thread:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        raise RuntimeError("call the async_ methods from the loop thread")

    # -- endpoints ----------------------------------------------------------------

    def listen(self, device: VhostDevice, path: str) -> Endpoint:
        return self._call(self.async_listen(device, path))

    def connect(self, device: VhostDevice, path: str) -> Endpoint:
        return self._call(self.async_connect(device, path))

    def remove(self, name: str) -> None:
        self._call(self.async_remove(name))

    def wait_connected(self, name: str, timeout: float) -> None:
        async def wait() -> None:
            await asyncio.wait_for(self.endpoints[name].connected.wait(), timeout)
        self._call(wait())

    async def async_listen(self, device: VhostDevice, path: str) -> Endpoint:
        self._check_free(device)
        lsock = _bind(path)
        ep = Endpoint(device, path, "server", listener=lsock)
        self.endpoints[device.name] = ep
        asyncio.get_running_loop().add_reader(lsock, self._accept, ep)
        log.info("%s: listening on %s", device.name, path)
        return ep

    async def async_connect(self, device: VhostDevice, path: str) -> Endpoint:
        self._check_free(device)
        ep = Endpoint(device, path, "client")
        self.endpoints[device.name] = ep
        ep.task = asyncio.get_running_loop().create_task(self._reconnect(ep))
        return ep

    async def async_remove(self, name: str) -> None:
        ep = self.endpoints.pop(name, None)
        if ep is None:
            raise KeyError(f"no endpoint for {name!r}")
        ep.closing = True
        if ep.task is not None:
            ep.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ep.task
        self._disconnect(ep, "endpoint removed")
        if ep.listener is not None:
            asyncio.get_running_loop().remove_reader(ep.listener)
            ep.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)

    def _check_free(self, device: VhostDevice) -> None:
        if device.name in self.endpoints:
            raise ValueError(f"{device.name} already has a socket")

    # -- sessions -----------------------------------------------------------------

    def _accept(self, ep: Endpoint) -> None:
        assert ep.listener is not None
        try:
            sock, _ = ep.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if ep.sock is not None:
            log.warning("%s: refusing a second front-end on %s", ep.device.name, ep.path)
            sock.close()
            return
        self._open(ep, sock)

    async def _reconnect(self, ep: Endpoint) -> None:
        delay = BACKOFF_MIN
        while not ep.closing:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ep.path)
            except OSError as e:
                sock.close()
                log.debug("%s: connect %s: %s; retry in %.2fs",
                          ep.device.name, ep.path, e.strerror, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            ep.session_over.clear()
            if self._open(ep, sock):
                await ep.session_over.wait()
            else:
                await asyncio.sleep(BACKOFF_MAX)

    def _open(self, ep: Endpoint, sock: socket.socket) -> bool:
        sock.settimeout(SEND_TIMEOUT)  # replies are tiny; a peer that never reads is cut off
        conn = VhostConnection(ep.device)
        try:
            ep.device.attach(conn)
        except RuntimeError as e:
            log.warning("%s", e)
            sock.close()
            return False
        loop = asyncio.get_running_loop()
        ep.sock, ep.conn = sock, conn
        ep.connections += 1
        ep.device.on_broken = lambda: loop.call_soon_threadsafe(self._stop_broken, ep, conn)
        loop.add_reader(sock, self._readable, ep)
        ep.connected.set()
        log.info("%s: front-end connected (%s mode, %s)", ep.device.name, ep.mode, ep.path)
        return True

    def _stop_broken(self, ep: Endpoint, conn: VhostConnection) -> None:
        """A worker stopped on a guest's lie: join it here, where rings change."""
        if ep.conn is conn and not conn.closed:
            ep.device.apply(conn)

    def _readable(self, ep: Endpoint) -> None:
        sock, conn = ep.sock, ep.conn
        assert sock is not None and conn is not None
        try:
            data, fds = _recv(sock, conn.reader.wanted())
            if not data:
                for fd in fds:
                    os.close(fd)
                self._disconnect(ep, "front-end closed the connection")
                return
            reply = conn.handle(data, fds)
            self._watch_partial(ep, conn)
            if reply:
                sock.sendall(reply)
        except ProtocolError as e:
            log.error("%s: protocol error: %s; closing the connection", ep.device.name, e)
            with contextlib.suppress(OSError):
                sock.sendall(conn.take_unsent())
            self._disconnect(ep, f"protocol error: {e}")
        except OSError as e:
            self._disconnect(ep, f"socket error: {e.strerror or e}")
        except Exception:
            log.exception("%s: internal error; closing the connection", ep.device.name)
            self._disconnect(ep, "internal error")

    def _watch_partial(self, ep: Endpoint, conn: VhostConnection) -> None:
        """Arm the deadline when a message begins, cancel it when it is done.

        The reader is asked for at most one message part per recvmsg, so
        "mid-message" after a recv means the message that is buffered now; the
        deadline counts from its first byte and is not renewed by more bytes."""
        if not conn.reader.mid_message:
            if ep.partial is not None:
                ep.partial.cancel()
                ep.partial = None
        elif ep.partial is None:
            ep.partial = asyncio.get_running_loop().call_later(
                self.partial_timeout, self._partial_expired, ep, conn)

    def _partial_expired(self, ep: Endpoint, conn: VhostConnection) -> None:
        ep.partial = None
        if ep.conn is not conn:
            return  # that session is over already
        self._disconnect(ep, "half a message", conn, line=(
            f"{ep.device.name}: front-end sent half a message and did not finish it "
            f"in {self.partial_timeout:g} s; closing"))

    def _disconnect(self, ep: Endpoint, reason: str, conn: VhostConnection | None = None,
                    line: str | None = None) -> None:
        """End the session; `line`, if given, is logged as a warning instead of
        the usual "disconnected" line."""
        if ep.sock is None or (conn is not None and ep.conn is not conn):
            return  # already gone, or a late report about an older session
        sock, conn = ep.sock, ep.conn
        ep.sock = ep.conn = None
        ep.connected.clear()
        ep.session_over.set()
        if ep.partial is not None:
            ep.partial.cancel()
            ep.partial = None
        asyncio.get_running_loop().remove_reader(sock)
        if line is not None:
            log.warning("%s", line)
        else:
            log.info("%s: front-end disconnected: %s", ep.device.name, reason)
        sock.close()
        if conn is not None:
            ep.device.detach(conn)


def check_socket_path(path: str) -> bool:
    """Raise SocketInUse unless we may listen on `path`; True if a stale socket
    file is there (nobody listens on it any more) and must be removed first."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise SocketInUse(f"{os.path.dirname(os.path.abspath(path))} does not exist")
    try:
        st = os.lstat(path)  # a symlink is refused, never followed
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise SocketInUse(f"{path} is a symbolic link: give the real path")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket")
    # Non-blocking: a listener whose backlog is full (a process that stopped
    # accepting) makes a blocking connect() wait for good, and this runs on the
    # daemon's one request thread. EAGAIN means somebody listens there.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return True
        if e.errno != errno.EAGAIN:
            raise
    finally:
        probe.close()
    raise SocketInUse(f"{path} is in use by another process")


def _bind(path: str) -> socket.socket:
    """Listen on `path`, replacing a stale socket file but never a live one.

    Whoever can connect can pose as the guest, so the file is SOCKET_MODE from
    the start (Linux creates it with the mode of the unbound socket's inode,
    less the umask) and owned by root and the `gateway` group, like the
    control socket: a QEMU that does not run as root needs that group."""
    if check_socket_path(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)  # bind() never follows a symlink: one there makes it fail
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} was replaced while it was being created")
        if os.geteuid() == 0:
            os.chown(path, 0, _group_id(), follow_symlinks=False)
        os.chmod(path, SOCKET_MODE)
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
