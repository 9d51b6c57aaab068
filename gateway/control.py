"""The daemon's control socket: one JSON request per line, one JSON reply per line.

    → {"cmd": "attach", "args": {"name": "vm0", "iface": "eth1", ...}}
    ← {"ok": true, "result": {...}}   or   {"ok": false, "error": "one line"}

One request keeps its connection: `capture` (see `capture_session`). Its reply
carries the capture's memfd (SCM_RIGHTS); the connection then stays open
while the capture lasts. A line from the client ("stop") or its closing the
connection ends it; the daemon closes it, after one line saying why
({"end": "vm0 was detached"}), when the device goes away.

The socket is `$RUN_DIR/gateway.sock`, mode 0660, owned by root and by the
`gateway` group if there is one, so that group can drive the gateway without
root. Each connection's peer is checked again with SO_PEERCRED: a socket file
whose mode someone loosened still lets no one else in.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import grp
import json
import logging
import os
import socket
import struct
from dataclasses import fields

from gateway.api import Attachment, Gateway, GatewayError
from gateway.apply import apply
from gateway.capture import DEFAULT_BUFFER_KIB, MAX_SNAPLEN

log = logging.getLogger(__name__)

SOCKET_NAME = "gateway.sock"
MAX_REQUEST = 64 * 1024
GROUP = "gateway"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


class DaemonNotRunning(Exception):
    pass


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


# -- server ---------------------------------------------------------------------------

def group_id() -> int | None:
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def peer_allowed(uid: int, gids: set[int], group: int | None) -> bool:
    """Root, the daemon's own user, or a member of the gateway group."""
    return uid in (0, os.geteuid()) or (group is not None and group in gids)


def peer_credentials(sock: socket.socket) -> tuple[int, int, set[int]]:
    """(pid, uid, {gid and supplementary gids}) of the process at the other end."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    gids = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        pass  # more than 256 groups, or an old kernel: the primary group still counts
    return pid, uid, gids


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
        elif cmd == "apply":  # a configuration file's text (gateway/apply.py)
            text, source = args.get("text"), args.get("source", "config")
            dry_run = args.get("dry_run", False)
            if not (isinstance(text, str) and isinstance(source, str)
                    and isinstance(dry_run, bool)):
                raise GatewayError("apply needs text and source (text), dry_run (true or false)")
            result = apply(gw, text, source, dry_run=dry_run)
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


def _start_capture(gw: Gateway, req: dict, pid: int, on_end):
    args = req.get("args") or {}
    if not isinstance(args, dict):
        raise GatewayError("args must be an object")
    extra = set(args) - {"name", "direction", "snaplen", "buffer_kib"}
    if extra:
        raise GatewayError(f"unknown capture arguments: {', '.join(sorted(extra))}")
    return gw.capture_start(str(args.get("name")), direction=args.get("direction", "both"),
                            snaplen=args.get("snaplen", MAX_SNAPLEN),
                            buffer_kib=args.get("buffer_kib", DEFAULT_BUFFER_KIB), pid=pid,
                            on_end=on_end)


async def capture_session(gw: Gateway, req: dict, pid: int, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter,
                          one_at_a_time: concurrent.futures.Executor) -> None:
    """A capture for as long as this connection lasts (gateway/capture.py).
    The reply {"ok": true, "result": {"rings", "ring_size", "stride", ...}}
    comes with the rings' memfd. Then: a line from the client ends it with a
    reply {"ok": true, "result": {"frames", "dropped"}} sent once the workers
    let go of the rings (so the client's last read misses nothing); EOF ends
    it silently; the device going away sends {"end": reason} and closes."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str] = loop.create_future()

    def end_now(reason: str) -> None:
        if not ended.done():
            ended.set_result(reason)

    def on_end(reason: str) -> None:  # the request thread, while the device goes
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody to tell
            loop.call_soon_threadsafe(end_now, reason)

    try:
        cap = await loop.run_in_executor(one_at_a_time, _start_capture, gw, req, pid, on_end)
    except Exception as e:  # as handle(): a refusal, or a bug that must not go unsaid
        if not isinstance(e, GatewayError):
            log.exception("request %r failed", req)
        error = str(e) if isinstance(e, GatewayError) else f"internal error: {e}"
        writer.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
        await writer.drain()
        return
    stopped = False
    try:
        lay = cap.rings.layout
        reply = {"ok": True, "result": {"rings": lay.rings, "ring_size": lay.size,
                                        "stride": lay.stride, "header": lay.stride - lay.size,
                                        "total": lay.total}}
        # The memfd rides with the reply's bytes; nothing else was written on this
        # connection, so the line goes out whole (a fresh socket buffer holds it).
        with writer.get_extra_info("socket").dup() as s:
            s.sendmsg([json.dumps(reply).encode() + b"\n"],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [cap.rings.fd]))])
        cap.rings.close_fd()  # the mapping stays; the reader has its own fd
        line_task = asyncio.ensure_future(reader.readline())
        await asyncio.wait({line_task, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():  # the device went away; the capture was stopped with it
            line_task.cancel()
            stopped = True
            writer.write(json.dumps({"end": ended.result()}).encode() + b"\n")
            await writer.drain()
            return
        try:
            line = line_task.result()
        except (ValueError, ConnectionError):
            line = b""
        frames, dropped = await loop.run_in_executor(
            one_at_a_time, gw.capture_stop, cap, "stopped by the reader" if line
            else "the reader went away")
        stopped = True
        if line:
            writer.write(json.dumps({"ok": True, "result": {"frames": frames,
                                                            "dropped": dropped}}).encode()
                         + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        if not stopped:  # the loop is going down, or the reply could not be sent
            # (an executor already shut down means the daemon is stopping: its
            # shutdown ends every capture with the devices)
            with contextlib.suppress(RuntimeError):
                one_at_a_time.submit(gw.capture_stop, cap, "the control connection failed")


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

    group = group_id()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, gids = peer_credentials(writer.get_extra_info("socket"))
            if not peer_allowed(uid, gids, group):
                log.warning("control: refused pid %d uid %d: not root, nor in group %s",
                            pid, uid, GROUP)
                writer.write(json.dumps({"ok": False, "error": f"permission denied: uid {uid} "
                                         f"is not root or in group {GROUP}"}).encode() + b"\n")
                await writer.drain()
                return
            answered = False  # a capture's fd rides its reply: only before any other
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # no newline within MAX_REQUEST: the rest is not read
                    writer.write(json.dumps({"ok": False, "error": "bad request: over "
                                             f"{MAX_REQUEST} bytes"}).encode() + b"\n")
                    await writer.drain()
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                else:
                    if req.get("cmd") == "capture" and not answered:
                        # the connection is the capture's now
                        await capture_session(gw, req, pid, reader, writer, one_at_a_time)
                        return
                    if req.get("cmd") == "capture":  # its fd must not overtake replies
                        reply = {"ok": False, "error": "capture needs a connection of its "
                                 "own: send it first"}
                    else:
                        reply = await asyncio.get_running_loop().run_in_executor(
                            one_at_a_time, handle, gw, req)
                writer.write(json.dumps(reply).encode() + b"\n")
                answered = True
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path, limit=MAX_REQUEST)
    os.chown(path, 0, 0 if group is None else group)
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
