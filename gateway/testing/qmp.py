"""A minimal QMP client for tests: commands, and events awaited by name.

QMP interleaves asynchronous events with command replies on one socket, so
`execute` files away every event it reads and `wait_event` looks there
first. Waiting on MIGRATION events (capability "events") means a test never
polls query-migrate in a sleep loop.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path


class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        """Connect (QEMU may still be creating the socket) and leave capability
        negotiation mode."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {path}") from None
                time.sleep(0.05)  # QEMU has not created its socket yet: nothing to await
        self._sock = s
        self._buf = b""
        self.events: list[dict] = []
        self._read(timeout)  # greeting
        self.execute("qmp_capabilities")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("timed out waiting for QMP")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd: str, timeout: float = 30.0, **args) -> object:
        req = {"execute": cmd}
        if args:
            req["arguments"] = args
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read(timeout)
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise QmpError(f"{cmd}: {msg['error'].get('desc', msg['error'])}")
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str, match: Callable[[dict], bool] = lambda d: True,
                   timeout: float = 60.0) -> dict:
        """The first event `name` whose data satisfies `match`, seen or to come."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and match(ev.get("data", {})):
                    del self.events[: i + 1]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no {name} event within {timeout:.0f}s "
                               f"(seen: {[e['event'] for e in self.events]})")
            msg = self._read(left)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self._sock.close()
