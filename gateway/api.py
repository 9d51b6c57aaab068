"""The library API the daemon serves: attach, detach, list, stats.

`Gateway` owns everything with a kernel side (NICs with their XDP program and
UMEMs, ports, vhost sockets) and the record of attachments in the state
directory, so a restarted daemon re-creates them. `attach` checks every input
before it touches the system; a refusal is a GatewayError whose text is the
one line the operator sees.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, fields

import netaddr

from gateway.capture import Capture, CaptureError, Captures
from gateway.datapath.port import FRAME_SIZE
from gateway.datapath.xdp_port import VLAN_HLEN, XdpPort
from gateway.libvirt_xml import access_note, domain_parts, qemu_user
from gateway.registry import NAME_RE, Registry
from gateway.vhost.device import VhostDevice
from gateway.vhost.transport import SocketInUse, VhostService, check_socket_path
from gateway.virtio import features as vf
from gateway.xdp import link
from gateway.xdp.nic import Nic
from gateway.xdp.program import XdpError
from gateway.xdp.xsk import XskError

log = logging.getLogger(__name__)

STATE_FILE = "attachments.json"


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class GatewayError(Exception):
    """A request refused with one line of explanation (CLI exit code 2)."""


@dataclass
class Attachment:
    name: str
    iface: str
    mac: str
    queues: int = 1
    mode: str = "server"  # server: we listen on `socket`; client: we connect to it
    socket: str = ""
    mtu: int = 1500
    allow_spoofing: bool = False  # let the guest send with source MACs not its own
    vlan: int = 0  # 802.1Q VLAN ID 1..4094 its frames carry on the wire; 0: untagged
    # Live migration: this device is the destination of the attached device of this
    # name (same NIC and MAC); the MAC's frames move here when the VM resumes here.
    migrate_from: str = ""


def default_mac(name: str) -> str:
    """Stable and locally administered: the same NAME always gets the same MAC."""
    b = bytearray(hashlib.sha256(b"gateway:" + name.encode()).digest()[:6])
    b[0] = (b[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def normalise_mac(mac: str) -> str:
    try:
        eui = netaddr.EUI(mac)
    except (netaddr.AddrFormatError, TypeError, ValueError):
        raise GatewayError(f"bad MAC address {mac!r}") from None
    if eui.words[0] & 1:
        raise GatewayError(f"MAC {mac} is a multicast address: a guest needs a unicast one")
    eui.dialect = netaddr.mac_unix_expanded
    return str(eui)


def qemu_args(a: Attachment) -> list[str]:
    chardev = f"socket,id=gw-{a.name},path={a.socket}"
    chardev += ",server=on,wait=off" if a.mode == "client" else ",reconnect=1"
    dev = f"virtio-net-pci,netdev=gw-{a.name},mac={a.mac}"
    if a.queues > 1:
        dev += f",mq=on,vectors={2 * a.queues + 2}"
    return [
        "-object", "memory-backend-memfd,id=mem,size=<RAM>,share=on",
        "-machine", "memory-backend=mem",
        "-chardev", chardev,
        "-netdev", f"vhost-user,id=gw-{a.name},chardev=gw-{a.name},queues={a.queues}",
        "-device", dev,
    ]  # fmt: skip


class Gateway:
    def __init__(self, run_dir: str, state_dir: str | None = None) -> None:
        self.run_dir, self.state_dir = run_dir, state_dir
        self.registry = Registry()
        self.service = VhostService().start()
        self.nics: dict[str, Nic] = {}
        self.attached: dict[str, tuple[Attachment, XdpPort, VhostDevice]] = {}
        # saved or attached devices that are not running for want of their NIC
        # (deleted, or absent at start): re-attached when a NIC of that name appears
        self.pending: dict[str, tuple[Attachment, str]] = {}
        self.nics_down: set[str] = set()
        self.captures = Captures()  # `gateway capture`: at most one per device
        self.lock = threading.RLock()  # metrics scrapes read while requests change things

    # -- attach / detach ---------------------------------------------------------

    def check(self, a: Attachment, *, beside: list[Attachment] | None = None,
              freed: frozenset[str] = frozenset()) -> link.LinkInfo:
        """Everything attach needs, checked before anything changes.

        `beside` and `freed` are for a plan checked as a whole (apply.py): the
        devices `a` will sit beside instead of those attached now, and the
        sockets of devices the plan detaches before attaching `a`."""
        for f in fields(a):  # requests come as JSON: types are not a given
            want = {"int": int, "bool": bool}.get(f.type, str)
            v = getattr(a, f.name)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise GatewayError(f"{f.name} must be "
                                   f"{ {int: 'a number', bool: 'true or false'}.get(want, 'text')}")
        if not NAME_RE.match(a.name):
            raise GatewayError(f"bad name {a.name!r}: use 1-32 letters, digits, '_', '.', '-'")
        others = [o for o, _, _ in self.attached.values()] if beside is None else beside
        if a.name in {o.name for o in others} or (beside is None and a.name in self.pending):
            raise GatewayError(f"a device named {a.name} is already attached")
        if not 0 <= a.vlan <= 4094:
            raise GatewayError(f"--vlan {a.vlan} is outside 1..4094")
        src = self._migration_source(a)
        a.mac = normalise_mac(a.mac or (src.mac if src else default_mac(a.name)))
        if src and a.mac != src.mac:
            raise GatewayError(f"--migrate-from {src.name}: {src.name} has MAC {src.mac}, "
                               f"not {a.mac} (leave --mac out to take it)")
        if src and a.vlan != src.vlan:
            raise GatewayError(f"--migrate-from {src.name}: {src.name} is on VLAN "
                               f"{src.vlan or 'none'}, not {a.vlan or 'none'}")
        for other in others:
            if other.mac == a.mac and other.vlan == a.vlan and other is not src:
                where = f"in VLAN {a.vlan}" if a.vlan else "untagged"  # other VLANs may reuse it
                raise GatewayError(f"MAC {a.mac} is already used by {other.name} ({where})")
            if other.socket == a.socket:
                raise GatewayError(f"socket {a.socket} is already used by {other.name}")
        if a.mode not in ("server", "client"):
            raise GatewayError(f"bad socket mode {a.mode!r}")
        try:
            info = link.resolve(a.iface)
        except link.LinkError as e:
            raise GatewayError(str(e)) from None
        if src and a.queues != src.queues:
            raise GatewayError(f"--migrate-from {src.name}: it has {src.queues} queue pair(s), "
                               f"not {a.queues}")
        if not 1 <= a.queues <= info.rx_queues:
            raise GatewayError(f"--queues {a.queues}: {a.iface} has {info.rx_queues} queue(s)")
        if not 68 <= a.mtu <= 65535:
            raise GatewayError(f"--mtu {a.mtu} is outside 68..65535")
        try:
            link.check_mtu(info, a.mtu, FRAME_SIZE, tag=VLAN_HLEN if a.vlan else 0)
        except link.LinkError as e:
            raise GatewayError(str(e)) from None
        if a.mode == "server" and a.socket not in freed:
            try:
                check_socket_path(a.socket)
            except SocketInUse as e:
                raise GatewayError(f"socket path taken: {e}") from None
        return info

    def _migration_source(self, a: Attachment) -> Attachment | None:
        """The attached device `a` is to take over in a live migration, checked."""
        if not a.migrate_from:
            return None
        if a.migrate_from not in self.attached:
            raise GatewayError(f"--migrate-from {a.migrate_from}: no such attached device")
        src, port, _ = self.attached[a.migrate_from]
        if src.iface != a.iface:
            raise GatewayError(f"--migrate-from {src.name}: it is on {src.iface}, not {a.iface} "
                               "(a migration stays on one NIC)")
        if port.twin is not None:
            raise GatewayError(f"--migrate-from {src.name}: it is already paired with "
                               f"{port.twin.name}")
        return src

    @_locked
    def attach(self, a: Attachment, *, save: bool = True) -> dict:
        if self.pending.get(a.name, (None,))[0] is a:  # a retry of a pending device
            del self.pending[a.name]
        if not a.socket:
            a.socket = os.path.join(self.run_dir, f"{a.name}.sock")
        a.socket = os.path.abspath(a.socket)
        self.check(a)
        nic = self.nics.get(a.iface)
        try:
            if nic is None:
                nic = self.nics[a.iface] = Nic(a.iface)
            twin = self.attached[a.migrate_from][1] if a.migrate_from else None
            port = XdpPort(nic, a.name, a.mac, queue_pairs=a.queues, mtu=a.mtu,
                           allow_spoofing=a.allow_spoofing, vlan=a.vlan, migrate_from=twin)
        except (link.LinkError, XdpError, XskError, OSError) as e:
            self._drop_idle_nic(a.iface)
            raise GatewayError(f"cannot attach {a.name} to {a.iface}: {e}") from None
        try:
            dev = self.registry.create(a.name, port, queue_pairs=a.queues, max_mtu=port.max_mtu)
            if a.mode == "server":
                self.service.listen(dev, a.socket)
            else:
                self.service.connect(dev, a.socket)
        except BaseException:
            if a.name in {d.name for d in self.registry}:
                self.registry.remove(a.name)
            port.close()
            self._drop_idle_nic(a.iface)
            raise
        self.attached[a.name] = (a, port, dev)
        if save:
            self._save()
        log.info("%s: attached to %s (%s, %s)", a.name, a.iface, a.mac, a.socket)
        return self.describe(a.name)

    @_locked
    def detach(self, name: str, *, save: bool = True) -> None:
        if name in self.pending:
            del self.pending[name]
            if save:
                self._save()
            log.info("%s: detached (it was waiting for its NIC)", name)
            return
        if name not in self.attached:
            raise GatewayError(f"no device named {name}")
        self._teardown(name, f"{name} was detached")
        if save:
            self._save()
        log.info("%s: detached", name)

    def _teardown(self, name: str, why: str) -> None:
        self.captures.end_device(name, why)  # first: its reader gets every frame and why
        a, port, _ = self.attached.pop(name)
        for other, _, _ in self.attached.values():
            if other.migrate_from == name:  # the pair ends with its source
                other.migrate_from = ""
        try:
            self.service.remove(name)
        finally:
            self.registry.remove(name)
            port.close()
            self._drop_idle_nic(a.iface)

    def _drop_idle_nic(self, iface: str) -> None:
        nic = self.nics.get(iface)
        if nic is not None and not nic.slots:
            del self.nics[iface]
            nic.close()

    # -- queries ------------------------------------------------------------------

    def describe(self, name: str) -> dict:
        if name in self.pending:
            a, why = self.pending[name]
            d = asdict(a)
            d.update(state="pending", reason=why, features=[], qemu_args=qemu_args(a),
                     libvirt_xml=domain_parts(a), libvirt_note=None)
            return d
        a, port, dev = self.attached[name]
        d = asdict(a)
        d.update(
            state=dev.state,
            reason=dev.broken_reason or (f"{a.iface} is down" if a.iface in self.nics_down
                                         else None),
            features=vf.names(dev.negotiated_features),
            xdp_mode=port.nic.program.mode,
            bind_mode=port.mode,
            # a live migration's two devices: which one the MAC's frames go to
            migration_peer=port.twin.name if port.twin else None,
            capture=self.captures.describe(name),
            mac_steered_here=port.steering,
            qemu_args=qemu_args(a),
            libvirt_xml=domain_parts(a),
            # libvirt's QEMU user must reach our socket, or create its own (README, libvirt)
            libvirt_note=access_note(a.socket, qemu_user(), a.mode),
        )
        return d

    @_locked
    def list(self) -> list[dict]:
        return [self.describe(n) for n in sorted({*self.attached, *self.pending})]

    @_locked
    def stats(self, name: str | None = None) -> dict:
        if name is not None and name not in self.attached:
            raise GatewayError(f"no device named {name}")
        out = {}
        for n in sorted(self.attached) if name is None else [name]:
            _, port, dev = self.attached[n]
            s = dev.stats()
            p = port.stats()
            drops = dict(s["drops"])
            for reason in ("drop_no_socket", "drop_stopped", "drop_too_big",
                           "drop_over_share"):
                drops["xdp_" + reason.removeprefix("drop_")] = p[reason]
            for reason in ("rx_dropped", "rx_ring_full", "rx_fill_ring_empty_descs",
                           "tx_ring_full", "tx_no_frame", "tx_spoofed", "tx_runt",
                           "tx_tagged", "tx_over_mtu", "rx_bad_desc"):
                drops[reason] = p[reason]
            out[n] = {k: s[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                                        "broken_total", "log_miss")}
            out[n]["drops"] = drops
            out[n]["offload"] = s["offload"]
        return {"devices": out}

    # -- capture -------------------------------------------------------------------

    @_locked
    def capture_start(self, name: str, *, direction: str = "both", snaplen: int = 65535,
                      buffer_kib: int = 4096, pid: int = 0, on_end=lambda reason: None
                      ) -> Capture:
        """Hook capture rings into device `name` (gateway/capture.py); `on_end`
        hears why if the capture ends from this side (the device goes away)."""
        if name not in self.attached:
            raise GatewayError(f"no device named {name}" + (
                " (it is waiting for its NIC)" if name in self.pending else ""))
        try:
            return self.captures.start(name, self.attached[name][1], direction=direction,
                                       snaplen=snaplen, buffer_kib=buffer_kib, pid=pid,
                                       on_end=on_end)
        except CaptureError as e:
            raise GatewayError(str(e)) from None

    @_locked
    def end_captures(self, reason: str) -> None:
        """Every capture ends, its reader told why (the daemon is stopping)."""
        for name in list(self.captures.by_device):
            self.captures.end_device(name, reason)

    @_locked
    def capture_stop(self, cap: Capture, reason: str) -> tuple[int, int]:
        """Unhook `cap` (its reader stopped or went away): (frames, dropped)."""
        return self.captures.stop(cap, reason)

    # -- persistence and shutdown --------------------------------------------------

    def _save(self) -> None:
        if not self.state_dir:
            return
        path = os.path.join(self.state_dir, STATE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump([asdict(a) for a, _, _ in self.attached.values()]
                      + [asdict(a) for a, _ in self.pending.values()], f, indent=1)
        os.replace(tmp, path)

    def restore(self) -> list[str]:
        """Re-create the saved attachments; what failed is logged and kept on file."""
        if not self.state_dir:
            return []
        try:
            with open(os.path.join(self.state_dir, STATE_FILE)) as f:
                saved = [Attachment(**d) for d in json.load(f)]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as e:
            log.error("ignoring unreadable %s: %s", STATE_FILE, e)
            return []
        done = []
        for a in saved:
            if a.migrate_from and a.migrate_from not in self.attached:
                a.migrate_from = ""  # the source is gone: nothing left to take over from
            try:
                self.attach(a, save=False)
                done.append(a.name)
            except GatewayError as e:
                log.error("%s: not restored: %s (retried when %s appears)", a.name, e, a.iface)
                self.pending[a.name] = (a, str(e))
        return done

    @_locked
    def on_link(self, event: str, ifname: str, index: int, up: bool) -> None:
        """A netlink link event (linkwatch.py): a NIC went down or up, was
        deleted under its devices, or (re)appeared for devices waiting for it."""
        nic = self.nics.get(ifname)
        ours = nic is not None and nic.link.index == index
        if event == "gone":
            if not ours:
                return
            names = sorted(n for n, (a, _, _) in self.attached.items() if a.iface == ifname)
            log.error("%s was deleted: %s wait for it to come back", ifname, ", ".join(names))
            for n in names:
                a = self.attached[n][0]
                try:
                    self._teardown(n, f"{ifname} was deleted")
                except Exception:  # the kernel already took most of it with the NIC
                    log.exception("%s: teardown after %s vanished", n, ifname)
                    self.attached.pop(n, None)
                self.pending[n] = (a, f"{ifname} was deleted")
            left = self.nics.pop(ifname, None)
            self.nics_down.discard(ifname)
            if left is not None:  # a teardown failed: still free what is left, and the lock
                try:
                    left.close()
                except Exception:
                    log.exception("closing %s after it vanished", ifname)
            return
        if ours:
            if up and ifname in self.nics_down:
                self.nics_down.discard(ifname)
                log.warning("%s is up again", ifname)
            elif not up and ifname not in self.nics_down:
                self.nics_down.add(ifname)
                log.error("%s went down: its devices pass no traffic until it is up", ifname)
            return
        for n, (a, before) in sorted(self.pending.items()):
            if a.iface != ifname:
                continue
            try:
                self.attach(a, save=False)
            except GatewayError as e:
                self.pending[n] = (a, str(e))
                # a NIC coming up sends a burst of events: say each new reason once
                (log.debug if str(e) == before else log.error)(
                    "%s: %s is back but re-attaching failed: %s", n, ifname, e)
                continue
            self.pending.pop(n, None)
            log.warning("%s: %s is back, re-attached", n, ifname)

    def shutdown(self) -> None:
        """Undo all kernel state (the state file stays, for the next start)."""
        for name in list(self.attached):
            self.captures.end_device(name, "the daemon is stopping")
            try:
                self.detach(name, save=False)
            except Exception:
                log.exception("%s: detach failed during shutdown", name)
        self.service.stop()
