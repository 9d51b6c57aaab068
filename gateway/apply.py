"""Carry out a configuration file (`config.py`) on a running Gateway: the
daemon's `apply` control request and its `--config FILE` (at start, on SIGHUP).

All of it runs under the Gateway's lock, on the daemon's request thread, so no
other request or link event sees the host half-way. Three phases:

1. check: the file (config.parse), the plan against the daemon's devices
   (config.plan), then what needs the system for every device to attach (the
   NIC exists and is up, its queues, its MTU, the socket path free) and, last,
   Gateway.check on each as it will stand. Any refusal is one ConfigError line
   naming the file, the device and the field; nothing has changed.
2. run: detach (devices not in the file, and the old form of changed ones),
   then attach (changed and new ones, in file order).
3. if a step fails (the kernel refused: an XDP program, a NIC lock, a bind),
   undo what this apply did, in reverse: the host is as before, and the result
   says what failed and what was undone (or could not be put back).

The state file is written once, at the end, whichever way it went.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from gateway import config
from gateway.api import Attachment, Gateway, GatewayError
from gateway.datapath.port import FRAME_SIZE
from gateway.datapath.xdp_port import VLAN_HLEN
from gateway.vhost.transport import SocketInUse, check_socket_path
from gateway.xdp import link

log = logging.getLogger(__name__)

PAST = {"attach": "attached", "detach": "detached", "change": "changed"}
MAX_FILE = 1024 * 1024  # a host's devices fit in far less; bounds what a read costs


def read(path: str) -> str:
    """The file's text, or one line saying why not."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        raise config.ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE:
        raise config.ConfigError(f"{path}: over {MAX_FILE} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise config.ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


def current(gw: Gateway) -> dict[str, config.Current]:
    out = {n: config.Current(a, dev.state) for n, (a, _, dev) in gw.attached.items()}
    out.update({n: config.Current(a, "pending") for n, (a, _) in gw.pending.items()})
    return out


def apply(gw: Gateway, text: str, source: str, *, dry_run: bool = False) -> dict:
    """Bring `gw` to the file; the result is the plan and what became of it.
    A refused file raises ConfigError (nothing changed)."""
    desired = config.parse(text, source, gw.run_dir)
    with gw.lock:
        now = current(gw)
        steps = config.plan(desired, now)
        _check(gw, desired, steps, now)
        result = {"source": source, "dry_run": dry_run,
                  "plan": [s.to_json() for s in steps], "applied": False, "error": None,
                  "undone": [], "not_restored": []}
        if dry_run or not steps:
            result["applied"] = not dry_run
            return result
        result.update(_run(gw, steps, source))
        return result


def _check(gw: Gateway, desired: config.Desired, steps: list[config.Step],
           now: dict[str, config.Current]) -> None:
    """What attach would refuse, for every device the plan attaches, before any step."""
    staying = config.staying(steps, now)
    freed = frozenset(s.old.socket for s in steps if s.old is not None and s.name in gw.attached)
    for s in steps:
        if s.new is None:
            continue
        a, where = s.new, f"{desired.source}: device {s.name}"
        try:
            info = link.resolve(a.iface)
        except link.LinkError as e:
            raise config.ConfigError(f"{where}: nic: {e}") from None
        if a.queues > info.rx_queues:
            raise config.ConfigError(f"{where}: queues: {a.queues}, but {a.iface} has "
                                     f"{info.rx_queues} queue(s)")
        try:
            link.check_mtu(info, a.mtu, FRAME_SIZE, tag=VLAN_HLEN if a.vlan else 0)
        except link.LinkError as e:
            raise config.ConfigError(f"{where}: mtu: {e}") from None
        if a.mode == "server" and a.socket not in freed:
            try:
                check_socket_path(a.socket)
            except SocketInUse as e:
                raise config.ConfigError(f"{where}: socket: {e}") from None
        try:  # the last word is attach's own: whatever it would refuse, refused now
            # (the socket path is not probed twice: a probe is a connect())
            gw.check(replace(a), beside=staying, freed=freed | {a.socket})
        except GatewayError as e:
            raise config.ConfigError(f"{where}: {e}") from None


def _run(gw: Gateway, steps: list[config.Step], source: str) -> dict:
    done: list[tuple[str, Attachment, str | None]] = []  # (detached|attached, device, pending why)
    order = [*gw.attached, *gw.pending]
    what = ""
    try:
        for step in steps:  # detaches first: they free MACs and socket paths
            if step.old is not None:
                what = f"{step.action} {step.name}" + (" (detaching the old one)"
                                                       if step.new is not None else "")
                why = gw.pending[step.name][1] if step.name in gw.pending else None
                gw.detach(step.name, save=False)
                done.append(("detached", step.old, why))
        for step in steps:
            if step.new is not None:
                what = f"{step.action} {step.name}" + (" (attaching the new one)"
                                                       if step.old is not None else "")
                gw.attach(replace(step.new), save=False)
                done.append(("attached", step.new, None))
    except Exception as e:
        if not isinstance(e, GatewayError):
            log.exception("%s: %s failed", source, what)
        undone, lost = _undo(gw, done)
        _reorder(gw, order)
        gw._save()
        tail = "the host is as before" if not lost else f"could not put back: {'; '.join(lost)}"
        error = f"{source}: {what} failed: {e}; undone: {', '.join(undone) or 'nothing'}; {tail}"
        log.error("%s", error)
        return {"error": error, "undone": undone, "not_restored": lost}
    gw._save()
    for step in steps:
        log.info("%s: %s", source, step.line())
    return {"applied": True}


def _undo(gw: Gateway, done: list[tuple[str, Attachment, str | None]]
          ) -> tuple[list[str], list[str]]:
    """Reverse `done`: detach what was attached, re-attach what was detached
    (a device waiting for its NIC goes back to waiting). A device that cannot
    be re-attached waits like one whose NIC vanished, and is reported."""
    undone, lost = [], []
    for kind, a, why in reversed(done):
        if kind == "attached":
            try:
                gw.detach(a.name, save=False)
                undone.append(f"detached {a.name}")
            except Exception as e:
                log.exception("undo: detaching %s", a.name)
                lost.append(f"{a.name} stays attached with the file's settings ({e})")
            continue
        old = replace(a)
        if why is not None:
            gw.pending[a.name] = (old, why)
            undone.append(f"{a.name} waits for {a.iface} again")
            continue
        if old.migrate_from and old.migrate_from not in gw.attached:
            old.migrate_from = ""
        try:
            gw.attach(old, save=False)
            undone.append(f"re-attached {a.name}")
        except Exception as e:
            log.exception("undo: re-attaching %s", a.name)
            gw.pending[a.name] = (old, str(e))  # kept on file, retried when its NIC comes
            lost.append(f"{a.name} ({e}; it waits, kept on file)")
    return undone, lost


def _reorder(gw: Gateway, order: list[str]) -> None:
    """Devices back in their places: the state file lists them as before (restore
    replays it in order, a migration's source before its destination)."""
    rank = {n: i for i, n in enumerate(order)}
    for table in (gw.attached, gw.pending):
        for name in sorted(table, key=lambda n: rank.get(n, len(rank))):
            table[name] = table.pop(name)


def summary(result: dict) -> str:
    """One line for the operator (and the daemon's log on SIGHUP)."""
    n = len(result["plan"])
    if result["error"]:
        return result["error"]
    if not n:
        return f"{result['source']}: nothing to do, the daemon matches it"
    counts: dict[str, int] = {}
    for step in result["plan"]:
        counts[step["action"]] = counts.get(step["action"], 0) + 1
    if result["dry_run"]:
        text = ", ".join(f"{v} to {k}" for k, v in sorted(counts.items()))
        return f"{result['source']}: dry run, nothing changed ({text})"
    return f"{result['source']}: " + ", ".join(f"{PAST[k]} {v}" for k, v in sorted(counts.items()))


def from_file(gw: Gateway, path: str) -> dict:
    """`--config FILE`: read and apply it (the daemon's start and SIGHUP)."""
    path = os.path.abspath(path)
    return apply(gw, read(path), path)
