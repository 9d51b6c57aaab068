"""systemd's notification protocol (sd_notify(3)), spoken directly.

systemd passes a unix datagram socket in NOTIFY_SOCKET: a path, or an
abstract name written with a leading '@'. Each datagram is newline-separated
KEY=VALUE lines (READY=1, STATUS=..., STOPPING=1, WATCHDOG=1). No libsystemd:
the protocol is one sendto(), and the gateway must run (and send nothing) where
there is no systemd at all.

Sending never raises: a daemon must not fail because its supervisor's socket
is gone or full. A failure is logged once; later ones at debug level. After
STOPPING=1 nothing more is sent: a watchdog ping or a status line from another
thread must not tell systemd the daemon is alive and well while it shuts down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

# sockaddr_un.sun_path holds 108 bytes; a path needs its terminating NUL too
SUN_PATH_MAX = 108
# a blocked send (systemd's queue full) holds up the caller at most this long
SEND_TIMEOUT = 1.0


def notify_address(value: str | None) -> str | bytes | None:
    """The address NOTIFY_SOCKET names, or None when unset or not one we can use."""
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL instead of the '@'
        addr = b"\0" + value[1:].encode()
        if len(addr) > SUN_PATH_MAX:
            log.warning("NOTIFY_SOCKET %r: abstract name over %d bytes; not notifying systemd",
                        value, SUN_PATH_MAX - 1)
            return None
        return addr
    if not value.startswith("/"):  # e.g. systemd >= 253's vsock:CID:PORT (not in Debian 12)
        log.warning("NOTIFY_SOCKET %r: neither an absolute path nor an abstract '@' name; "
                    "not notifying systemd", value)
        return None
    if len(value.encode()) >= SUN_PATH_MAX:
        log.warning("NOTIFY_SOCKET %r: path over %d bytes; not notifying systemd",
                    value, SUN_PATH_MAX - 1)
        return None
    return value


def watchdog_interval(env=os.environ, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked of this process: WATCHDOG_USEC unset or
    not a positive integer, or WATCHDOG_PID naming another process (a child that
    inherited its parent's environment must not ping for it)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        if not wpid.isdigit():
            log.warning("WATCHDOG_PID %r is not a pid; not pinging the watchdog", wpid)
            return None
        if int(wpid) != (os.getpid() if pid is None else pid):
            return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC %r is not a positive integer; not pinging the watchdog", usec)
        return None
    return int(usec) / 2 / 1e6


def _line(key: str, value: object) -> str:
    # one field per line: a newline inside a value would forge another field
    text = str(value).replace("\n", " ")
    return f"{key}={text}\n"


class Notifier:
    """Sends to NOTIFY_SOCKET; without one, every call does nothing."""

    def __init__(self, env=os.environ) -> None:
        self.address = notify_address(env.get("NOTIFY_SOCKET"))
        self._sock: socket.socket | None = None
        self._failed = False
        self._stopped = False
        self._lock = threading.Lock()  # STOPPING=1 is the last datagram, whichever thread
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(SEND_TIMEOUT)
            # watchdog pings never wait: one systemd has no room for is dropped
            # (the next comes in half the timeout) rather than stall the request thread
            self._nowait = socket.socket(socket.AF_UNIX,
                                         socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._nowait.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> bool:
        """One datagram of KEY=VALUE lines, in the order given; True if it went out.
        It waits up to SEND_TIMEOUT for room in systemd's queue."""
        return self._send(fields, wait=True)

    def _send(self, fields: dict, wait: bool) -> bool:
        if self._sock is None or not fields:
            return False
        data = "".join(_line(k, v) for k, v in fields.items()).encode()
        with self._lock:
            if self._stopped:
                return False
            self._stopped = "STOPPING" in fields
            try:
                (self._sock if wait else self._nowait).sendto(data, self.address)
            except OSError as e:  # gone, refused, full past SEND_TIMEOUT: systemd will see
                (log.debug if self._failed else log.warning)(
                    "cannot notify systemd on %s: %s", self.address, e)
                self._failed = True
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self._send({"WATCHDOG": 1}, wait=False)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._nowait.close()
                self._sock = None
