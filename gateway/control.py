"""The daemon's control socket: one JSON request per line, one JSON reply per line.

    → {"cmd": "attach", "args": {"name": "vm0", "iface": "eth1", ...}}
    ← {"ok": true, "result": {...}}   or   {"ok": false, "error": "one line"}

The socket is `$RUN_DIR/gateway.sock`, mode 0660, so a group can be given
the right to drive the gateway without root.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
from dataclasses import fields

from gateway.api import Attachment, Gateway, GatewayError

log = logging.getLogger(__name__)

SOCKET_NAME = "gateway.sock"
MAX_REQUEST = 64 * 1024


class DaemonNotRunning(Exception):
    pass


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


# -- server ---------------------------------------------------------------------------

def handle(gw: Gateway, req: dict) -> dict:
    """One request → one reply; any refusal becomes {"ok": false, "error": ...}."""
    try:
        cmd, args = req.get("cmd"), req.get("args") or {}
        if not isinstance(args, dict):
            raise GatewayError("args must be an object")
        if cmd == "attach":
            known = {f.name for f in fields(Attachment)}
            extra = set(args) - known
            if extra:
                raise GatewayError(f"unknown attach arguments: {', '.join(sorted(extra))}")
            try:
                a = Attachment(**args)
            except TypeError as e:
                raise GatewayError(f"bad attach request: {e}") from None
            result = gw.attach(a)
        elif cmd == "detach":
            gw.detach(str(args.get("name")))
            result = None
        elif cmd == "list":
            result = gw.list()
        elif cmd == "stats":
            result = gw.stats(args.get("name"))
        else:
            raise GatewayError(f"unknown command {cmd!r}")
        return {"ok": True, "result": result}
    except GatewayError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug must not take the daemon down
        log.exception("request %r failed", req)
        return {"ok": False, "error": f"internal error: {e}"}


async def serve(gw: Gateway, run_dir: str, one_at_a_time: concurrent.futures.Executor
                ) -> asyncio.AbstractServer:
    """Requests run on `one_at_a_time` (a single thread: attach compiles BPF, so
    the loop stays free, and requests never overlap each other or a restore)."""
    path = socket_path(run_dir)
    if os.path.exists(path):
        try:
            request(run_dir, "list", timeout=1)
        except DaemonNotRunning:
            os.unlink(path)  # a crashed daemon's socket
        else:
            raise GatewayError(f"another gateway daemon is running ({path})")

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                else:
                    reply = await asyncio.get_running_loop().run_in_executor(
                        one_at_a_time, handle, gw, req)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path, limit=MAX_REQUEST)
    os.chmod(path, 0o660)
    return server


# -- client ---------------------------------------------------------------------------

def request(run_dir: str, cmd: str, timeout: float = 120.0, **args) -> object:
    """Send one request to the daemon; returns its result or raises GatewayError."""
    path = socket_path(run_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(path) from None
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise GatewayError("the daemon closed the connection")
            buf += chunk
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise GatewayError(reply.get("error", "unknown error"))
    return reply.get("result")
