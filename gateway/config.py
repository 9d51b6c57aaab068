"""The host's declarative configuration: a TOML file of devices, and the plan that
brings the daemon to it (`gateway apply FILE`, `gateway daemon --config FILE`).

Sans-IO: `parse` turns the file's text into the desired devices, `plan` compares
them with the daemon's devices (handed in, not looked up) and says what to
attach, detach and change. What needs the system (the NIC, a socket path on
disk) and carrying the plan out is `gateway/apply.py`'s job.

    unlisted = "detach"          # optional: what happens to devices not in the file
    [defaults]                   # optional: fields every device gets unless it sets them
    nic = "eth1"
    [devices.vm0]
    mac = "52:54:00:12:34:56"    # every `gateway attach` option, by its long name
    vlan = 100

Every error is one line naming the file, the device and the field, so the
operator can find it without reading code: `hosts/a.toml: device vm0: vlan:
5000 is outside 1..4094`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from gateway.api import Attachment, GatewayError, default_mac, normalise_mac
from gateway.registry import NAME_RE

# file key → (Attachment field, type, what the error says it must be)
FIELDS: dict[str, tuple[str, type, str]] = {
    "nic": ("iface", str, "text (a NIC name)"),
    "mac": ("mac", str, "text (a MAC address)"),
    "vlan": ("vlan", int, "a number"),
    "queues": ("queues", int, "a number"),
    "mtu": ("mtu", int, "a number"),
    "socket": ("socket", str, "text (an absolute path)"),
    "mode": ("mode", str, 'text ("server" or "client")'),
    "allow_spoofing": ("allow_spoofing", bool, "true or false"),
}
# a MAC or a socket path belongs to one device: they make no sense as defaults
PER_DEVICE = ("mac", "socket")
TOP_KEYS = ("unlisted", "defaults", "devices")
UNLISTED = ("detach", "keep")
# what the VM's own configuration (QEMU's command line, libvirt's XML) also names:
# changing it here alone leaves a running VM's side pointing at the old value
VM_SIDE = {"mac": "-device mac", "socket": "chardev path", "mode": "chardev server/client",
           "queues": "queues"}
MAX_IFNAME = 15  # IFNAMSIZ - 1


class ConfigError(GatewayError):
    """The file cannot be applied; nothing was changed. Its text is one line."""


@dataclass
class Desired:
    source: str  # the file's name, for messages
    devices: dict[str, Attachment]  # in file order; MAC and socket filled in
    unlisted: str = "detach"


@dataclass
class Current:
    """One device the daemon has: its settings and `gateway list`'s state."""
    attachment: Attachment
    state: str  # waiting, running, broken, pending


@dataclass
class Step:
    action: str  # attach, detach, change
    name: str
    new: Attachment | None = None  # attach, change
    old: Attachment | None = None  # detach, change
    changes: dict[str, tuple] = field(default_factory=dict)  # file key → (old, new)
    live: bool = True  # False: a connected guest notices (its session is cut)
    note: str = ""

    def to_json(self) -> dict:
        d: dict = {"action": self.action, "name": self.name, "live": self.live,
                   "note": self.note, "text": self.line()}
        if self.new is not None:
            d["device"] = to_file(self.new)
        if self.changes:
            d["changes"] = {k: list(v) for k, v in self.changes.items()}
        return d

    def line(self) -> str:
        if self.action == "attach":
            text = f"attach {self.name}: {describe(self.new)}"
        elif self.action == "detach":
            text = f"detach {self.name}: not in the file"
        else:
            text = f"change {self.name}: " + ", ".join(
                f"{k} {shown(old)} -> {shown(new)}" for k, (old, new) in self.changes.items())
        return text + (f" ({self.note})" if self.note else "")


def shown(v) -> str:
    return "none" if v == "" else str(v).lower() if isinstance(v, bool) else str(v)


def describe(a: Attachment) -> str:
    vlan = f" vlan {a.vlan}" if a.vlan else ""
    return (f"nic {a.iface}{vlan} mac {a.mac} queues {a.queues} mtu {a.mtu} "
            f"{a.mode} socket {a.socket}" + (" allow_spoofing" if a.allow_spoofing else ""))


def to_file(a: Attachment) -> dict:
    """An attachment as the file spells it."""
    return {key: getattr(a, attr) for key, (attr, _, _) in FIELDS.items()}


# -- parsing ---------------------------------------------------------------------------

def parse(text: str, source: str, run_dir: str) -> Desired:
    """The file's devices, each checked on its own and against the others.
    `run_dir` is the daemon's: a device without `socket` listens there."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    unlisted = doc.get("unlisted", "detach")
    if unlisted not in UNLISTED:
        raise ConfigError(f"{source}: unlisted: {unlisted!r} is not \"detach\" or \"keep\"")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults must be a table ([defaults])")
    for key in defaults:
        if key in PER_DEVICE:
            raise ConfigError(f"{source}: defaults: {key}: belongs to one device, "
                              "not to all of them")
        _check_value(f"{source}: defaults", key, defaults[key])
    if "devices" not in doc:  # an empty or truncated file must not detach everything
        raise ConfigError(f"{source}: no [devices] table (write an empty [devices] to mean "
                          "no devices)")
    devices = doc["devices"]
    if not isinstance(devices, dict):
        raise ConfigError(f"{source}: devices must be a table ([devices.NAME] per device)")
    out: dict[str, Attachment] = {}
    for name, spec in devices.items():
        out[name] = _device(source, name, spec, defaults, run_dir)
    _check_unique(source, out)
    return Desired(source, out, unlisted)


def _check_value(where: str, key: str, value) -> None:
    if key not in FIELDS:
        raise ConfigError(f"{where}: unknown field {key!r} (known: {', '.join(FIELDS)})")
    _, want, what = FIELDS[key]
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key}: must be {what}, not {value!r}")
    bad = None
    if key == "nic" and not (0 < len(value) <= MAX_IFNAME and value.isprintable()
                             and "/" not in value and " " not in value):
        bad = f"{value!r} is not a NIC name"
    elif key == "vlan" and not 0 <= value <= 4094:
        bad = f"{value} is outside 1..4094 (0 or none: untagged)"
    elif key == "queues" and not 1 <= value <= 256:
        bad = f"{value} is outside 1..256"
    elif key == "mtu" and not 68 <= value <= 65535:
        bad = f"{value} is outside 68..65535"
    elif key == "mode" and value not in ("server", "client"):
        bad = f"{value!r} is not \"server\" or \"client\""
    elif key == "socket" and not (os.path.isabs(value) and "\0" not in value):
        bad = f"{value!r} is not an absolute path"
    if bad:
        raise ConfigError(f"{where}: {key}: {bad}")


def _device(source: str, name: str, spec, defaults: dict, run_dir: str) -> Attachment:
    where = f"{source}: device {name}"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: bad name: use 1-32 letters, digits, '_', '.', '-'")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table ([devices.{name}])")
    merged = {**defaults, **spec}
    for key, value in spec.items():
        _check_value(where, key, value)
    if "nic" not in merged:
        raise ConfigError(f"{where}: nic: missing (or set it under [defaults])")
    a = Attachment(name=name, iface="", mac="")
    for key, value in merged.items():
        setattr(a, FIELDS[key][0], value)
    try:
        a.mac = normalise_mac(a.mac) if a.mac else default_mac(name)
    except GatewayError as e:
        raise ConfigError(f"{where}: mac: {e}") from None
    if a.mode == "client" and not a.socket:
        raise ConfigError(f"{where}: socket: missing (client mode connects to the VM's "
                          "socket: give its path)")
    a.socket = os.path.normpath(a.socket or os.path.join(run_dir, f"{name}.sock"))
    return a


def _check_unique(source: str, devices: dict[str, Attachment]) -> None:
    """What two devices in one file cannot share: a MAC in one VLAN, a socket."""
    macs: dict[tuple[str, int], str] = {}
    sockets: dict[str, str] = {}
    for a in devices.values():
        other = macs.setdefault((a.mac, a.vlan), a.name)
        if other != a.name:
            raise ConfigError(f"{source}: device {a.name}: mac: {a.mac} is also {other}'s "
                              f"({f'in VLAN {a.vlan}' if a.vlan else 'untagged'})")
        other = sockets.setdefault(a.socket, a.name)
        if other != a.name:
            raise ConfigError(f"{source}: device {a.name}: socket: {a.socket} is also "
                              f"{other}'s")


# -- planning --------------------------------------------------------------------------

def plan(desired: Desired, current: dict[str, Current]) -> list[Step]:
    """What brings `current` to `desired`: detaches (by name), then changes and
    attaches (in file order). Same file, same daemon: no step."""
    steps: list[Step] = []
    if desired.unlisted == "detach":
        for name in sorted(set(current) - set(desired.devices)):
            cur = current[name]
            connected = _connected(cur)
            steps.append(Step("detach", name, old=cur.attachment, live=not connected,
                              note="a guest is connected: it loses its network"
                              if connected else ""))
    kept = {} if desired.unlisted == "detach" else {
        n: c.attachment for n, c in current.items() if n not in desired.devices}
    for name, new in desired.devices.items():
        _check_beside(desired.source, new, kept)
        cur = current.get(name)
        if cur is None:
            steps.append(Step("attach", name, new=new))
            continue
        changes = {key: (getattr(cur.attachment, attr), getattr(new, attr))
                   for key, (attr, _, _) in FIELDS.items()
                   if getattr(cur.attachment, attr) != getattr(new, attr)}
        if not changes:
            continue
        step = Step("change", name, new=new, old=cur.attachment, changes=changes)
        if _connected(cur):
            step.live = False
            vm = [f"{k} ({VM_SIDE[k]})" for k in changes if k in VM_SIDE]
            step.note = ("not live: a guest is connected; re-attaching cuts its session"
                         + (f"; its VM still names the old {', '.join(vm)}: change the VM "
                            "too and restart it" if vm else " (QEMU reconnects)"))
        steps.append(step)
    return steps


def _connected(cur: Current) -> bool:
    """A front-end is connected (or was, and broke): re-creating the device cuts it."""
    return cur.state not in ("waiting", "pending")


def _check_beside(source: str, a: Attachment, kept: dict[str, Attachment]) -> None:
    """A file device against the daemon's devices the file leaves alone (unlisted =
    "keep"; with "detach" they are gone before anything is attached)."""
    for other in kept.values():
        if other.mac == a.mac and other.vlan == a.vlan:
            raise ConfigError(f"{source}: device {a.name}: mac: {a.mac} is already used by "
                              f"{other.name} ({f'in VLAN {a.vlan}' if a.vlan else 'untagged'}), "
                              "which is not in the file")
        if other.socket == a.socket:
            raise ConfigError(f"{source}: device {a.name}: socket: {a.socket} is already "
                              f"used by {other.name}, which is not in the file")


def staying(steps: list[Step], current: dict[str, Current]) -> list[Attachment]:
    """The daemon's devices the plan leaves as they are."""
    moved = {s.name for s in steps}
    return [c.attachment for n, c in current.items() if n not in moved]
