"""`gateway-cni`: a CNI plugin (spec 1.1.0, and 0.3.1 / 0.4.0 / 1.0.0) over the daemon.

A container runtime (kubelet through Multus, for a KubeVirt VM) executes the
plugin with the network configuration on stdin and the `CNI_*` variables in
the environment; it answers one JSON object on stdout: a result, or an error
object with the spec's codes. All the work is one request to the local
daemon's control socket (`control.request`): the plugin holds no state of its
own, so everything it needs later (DEL, CHECK, GC) is derived again from
(network name, CNI_CONTAINERID, CNI_IFNAME):

- the device name `cni-<8 hex of the network>-<16 hex of container id and
  ifname>` (29 characters: within the daemon's 32, and GC finds a network's
  devices by the prefix alone);
- the socket, after the userspace CNI plugin KubeVirt's vhost-user binding
  uses: `<sharedDir>/<first 12 of the container id>/<same 12>-<ifname>`, one
  directory per container for the VM's launcher to mount. QEMU is the socket
  server and the gateway dials it and redials after a restart (`"mode":
  "client"`, the default, as KubeVirt wants); `"mode": "server"` makes the
  gateway listen instead. A device-info file already at
  `runtimeConfig.CNIDeviceInfoFile` (a device plugin allocated the socket)
  wins over both; otherwise the plugin writes one there.

`run()` is the whole plugin minus the process: tests and `main()` call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

SPEC_VERSION = "1.1.0"
SUPPORTED = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEVICE_INFO_VERSION = "1.1.0"
DEFAULT_RUN_DIR = "/run/gateway"
DEFAULT_SHARED_DIR = "/var/run/vhost_sockets"
REQUEST_TIMEOUT = 60.0  # an attach compiles BPF (~0.5 s); a wedged daemon must not hang kubelet
STATUS_TIMEOUT = 5.0
MAX_STDIN = 1 << 20
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL

# Well-known error codes (SPEC.md "Error"), and ours from 100 on.
E_VERSION = 1  # incompatible CNI version
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_ENV = 4  # invalid necessary environment variables
E_IO = 5
E_DECODE = 6
E_CONFIG = 7  # invalid network config
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADD now
E_REFUSED = 100  # the daemon refused the request (its one line is the message)
E_NOT_ATTACHED = 101  # CHECK: no such device
E_NIC_DOWN = 102  # CHECK: its NIC is down or gone
E_BROKEN = 103  # CHECK: the guest broke a ring rule; the device waits for a reset
E_MISMATCH = 104  # CHECK: the device is not what the config or prevResult says

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # network names, container ids
IFNAME_BAD = re.compile(r"[/:\s]")
# fields every CNI config may carry; everything else must be ours (a typo is an error)
WELL_KNOWN = {"cniVersion", "name", "type", "args", "dns", "capabilities", "runtimeConfig",
              "prevResult", "disableCheck", "disableGC", "cni.dev/valid-attachments",
              "cni.dev/attachments"}
OURS = {"master", "vlan", "mtu", "queues", "mac", "mode", "sharedDir", "runDir"}


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# -- names -----------------------------------------------------------------------------

def _hex(*parts: str, n: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def network_prefix(network: str) -> str:
    return f"cni-{_hex('net', network, n=8)}-"


def device_name(network: str, container_id: str, ifname: str) -> str:
    """Deterministic and valid for the daemon (1-32 of [A-Za-z0-9_.-])."""
    return network_prefix(network) + _hex(container_id, ifname, n=16)


def socket_path(shared_dir: str, container_id: str, ifname: str) -> str:
    short = container_id[:12]
    return os.path.join(shared_dir, short, f"{short}-{ifname}")


# -- input -----------------------------------------------------------------------------

@dataclass
class NetConf:
    version: str
    name: str
    master: str
    vlan: int = 0
    mtu: int = 1500
    queues: int = 1
    mac: str = ""
    mode: str = "client"  # the gateway's side: client = it dials QEMU's socket
    shared_dir: str = DEFAULT_SHARED_DIR
    run_dir: str = DEFAULT_RUN_DIR
    runtime_mac: str = ""
    device_info_file: str = ""
    prev_result: dict | None = None
    valid_attachments: list | None = None


def _int(d: dict, key: str, lo: int, hi: int, default: int) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CniError(E_CONFIG, f"{key} must be a whole number in {lo}..{hi}, not {v!r}")
    return v


def _str(d: dict, key: str, default: str = "") -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise CniError(E_CONFIG, f"{key} must be a string, not {v!r}")
    return v


def _abs_dir(d: dict, key: str, default: str) -> str:
    v = _str(d, key, default)
    if not os.path.isabs(v) or "\0" in v:
        raise CniError(E_CONFIG, f"{key} must be an absolute path, not {v!r}")
    return os.path.normpath(v)


def parse_config(data: bytes, command: str) -> NetConf:
    """The network configuration, every field checked (SPEC.md "Network Configuration")."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise CniError(E_DECODE, f"the network configuration is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise CniError(E_DECODE, "the network configuration is not a JSON object")
    version = d.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(E_CONFIG, "cniVersion is missing")
    if version not in SUPPORTED:
        raise CniError(E_VERSION, f"cniVersion {version} is not supported "
                       f"(supported: {', '.join(SUPPORTED)})")
    name = d.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CniError(E_CONFIG, f"name {name!r} is not a valid network name")
    extra = sorted(set(d) - WELL_KNOWN - OURS)
    if extra:
        k = extra[0]
        why = ("gateway-cni assigns no addresses, the guest does" if k == "ipam"
               else "not a gateway-cni option")
        raise CniError(E_UNSUPPORTED_FIELD,
                       f"unsupported field {k}: {json.dumps(d[k])[:60]} ({why})")
    master = _str(d, "master")
    if command not in ("GC", "STATUS") and not _ifname_ok(master):
        raise CniError(E_CONFIG, f"master must name the NIC to attach to, not {master!r}")
    conf = NetConf(
        version=version, name=name, master=master,
        vlan=_int(d, "vlan", 0, 4094, 0), mtu=_int(d, "mtu", 68, 65535, 1500),
        queues=_int(d, "queues", 1, 256, 1), mac=_str(d, "mac"), mode=_str(d, "mode", "client"),
        shared_dir=_abs_dir(d, "sharedDir", DEFAULT_SHARED_DIR),
        run_dir=_abs_dir(d, "runDir", DEFAULT_RUN_DIR))
    if conf.mode not in ("client", "server"):
        raise CniError(E_CONFIG, f"mode must be client (QEMU listens, the gateway dials) or "
                       f"server, not {conf.mode!r}")
    if conf.mac:
        conf.mac = _mac(conf.mac, "mac")
    rc = d.get("runtimeConfig", {})
    if not isinstance(rc, dict):
        raise CniError(E_CONFIG, "runtimeConfig must be an object")
    if rc.get("mac"):
        conf.runtime_mac = _mac(_str(rc, "mac"), "runtimeConfig.mac")
    conf.device_info_file = _str(rc, "CNIDeviceInfoFile")
    if conf.device_info_file and not os.path.isabs(conf.device_info_file):
        raise CniError(E_CONFIG, "runtimeConfig.CNIDeviceInfoFile must be an absolute path")
    prev = d.get("prevResult")
    if prev is not None and (not isinstance(prev, dict) or not all(
            isinstance(prev.get(k, []), list) for k in ("interfaces", "ips", "routes"))):
        raise CniError(E_CONFIG, "prevResult must be a result object")
    conf.prev_result = prev
    if command == "GC":
        va = d.get("cni.dev/valid-attachments", [])
        if not isinstance(va, list) or not all(
                isinstance(a, dict) and isinstance(a.get("containerID"), str)
                and isinstance(a.get("ifname"), str) for a in va):
            raise CniError(E_CONFIG, "cni.dev/valid-attachments must be a list of "
                           "{containerID, ifname} objects")
        conf.valid_attachments = va
    return conf


def _ifname_ok(name: str) -> bool:
    """Linux's rules (dev_valid_name): 1-15 bytes, not . or .., no '/', ':' or space."""
    return 0 < len(name.encode()) <= 15 and name not in (".", "..") and not IFNAME_BAD.search(name)


def _mac(text: str, what: str) -> str:
    from gateway.api import GatewayError, normalise_mac

    try:
        return normalise_mac(text)
    except GatewayError as e:
        raise CniError(E_CONFIG, f"{what}: {e}") from None


@dataclass
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    mac: str = ""  # CNI_ARGS MAC=...


REQUIRED = {  # SPEC.md "Parameters": which variables each operation needs
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (), "STATUS": (), "VERSION": (),
}


def parse_env(environ: dict) -> Env:
    cmd = environ.get("CNI_COMMAND", "")
    if cmd not in REQUIRED:
        raise CniError(E_ENV, f"CNI_COMMAND {cmd!r} is not one of {', '.join(REQUIRED)}")
    for var in REQUIRED[cmd]:
        if not environ.get(var):
            raise CniError(E_ENV, f"{var} is missing for {cmd}")
    env = Env(cmd, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
              environ.get("CNI_IFNAME", ""))
    if env.container_id and (not NAME_RE.match(env.container_id) or len(env.container_id) > 1024):
        raise CniError(E_ENV, f"CNI_CONTAINERID {env.container_id[:80]!r} is not a valid "
                       "container id (letters, digits, '_', '.', '-')")
    if env.ifname and not _ifname_ok(env.ifname):
        raise CniError(E_ENV, f"CNI_IFNAME {env.ifname!r} is not a valid interface name")
    for pair in filter(None, environ.get("CNI_ARGS", "").split(";")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CniError(E_ENV, f"CNI_ARGS: {pair[:60]!r} is not KEY=VALUE")
        if key == "MAC":
            env.mac = _mac(value, "CNI_ARGS MAC")
    return env


# -- the daemon --------------------------------------------------------------------------

Client = Callable[..., object]  # (run_dir, cmd, timeout=..., **args) -> result


def _ask(client: Client, conf: NetConf, cmd: str, timeout: float = REQUEST_TIMEOUT, **args):
    from gateway.api import GatewayError
    from gateway.control import DaemonNotRunning
    from gateway.control import socket_path as control_path

    try:
        return client(conf.run_dir, cmd, timeout=timeout, **args)
    except DaemonNotRunning:
        raise CniError(E_TRY_AGAIN, "the gateway daemon is not running "
                       f"(no answer at {control_path(conf.run_dir)})") from None
    except TimeoutError:
        raise CniError(E_TRY_AGAIN, f"the gateway daemon did not answer within {timeout:g} s"
                       ) from None
    except PermissionError:
        raise CniError(E_IO, f"no permission on {control_path(conf.run_dir)}") from None
    except GatewayError as e:
        raise CniError(E_REFUSED, str(e)) from None
    except (OSError, ValueError) as e:
        raise CniError(E_IO, f"talking to the gateway daemon: {e}") from None


def _find(client: Client, conf: NetConf, name: str) -> dict | None:
    for d in _ask(client, conf, "list"):
        if d.get("name") == name:
            return d
    return None


# -- commands ----------------------------------------------------------------------------

def _read_device_info(path: str) -> tuple[str, str] | None:
    """(socket, gateway mode) from a device-info file already there, if any."""
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(E_IO, f"device-info file {path}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CniError(E_DECODE, f"device-info file {path} is not JSON: {e}") from None
    vu = info.get("vhost-user") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("type") != "vhost-user" or not isinstance(vu, dict):
        raise CniError(E_CONFIG, f"device-info file {path} does not describe a vhost-user device")
    path_, mode = vu.get("path"), vu.get("mode")
    if not isinstance(path_, str) or not os.path.isabs(path_) or mode not in ("client", "server"):
        raise CniError(E_CONFIG, f"device-info file {path}: bad vhost-user path or mode")
    # the file speaks for the container's side: "server" = QEMU creates the socket
    return path_, "client" if mode == "server" else "server"


def _write_device_info(path: str, sock: str, mode: str) -> None:
    info = {"type": "vhost-user", "version": DEVICE_INFO_VERSION,
            "vhost-user": {"mode": "server" if mode == "client" else "client", "path": sock}}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except OSError as e:
        raise CniError(E_IO, f"writing device-info file {path}: {e}") from None


def _result(conf: NetConf, env: Env, dev: dict) -> dict:
    iface = {"name": env.ifname, "mac": dev["mac"], "sandbox": env.netns}
    if _vkey(conf.version) >= (1, 1, 0):  # fields new in 1.1.0
        iface.update(mtu=dev["mtu"], socketPath=dev["socket"])
    prev = conf.prev_result or {}
    res = {"cniVersion": conf.version,
           "interfaces": [*(prev.get("interfaces") or []), iface],
           "ips": prev.get("ips") or []}
    for k in ("routes", "dns"):
        if prev.get(k):
            res[k] = prev[k]
    return res


def _our_dir(sock: str, conf: NetConf) -> str | None:
    """The per-container directory of our layout (`sharedDir/<id12>/<id12>-<ifname>`)
    `sock` lives in, if it does: a device-info file may have named any path."""
    d = os.path.dirname(sock)
    ok = os.path.dirname(d) == conf.shared_dir and os.path.basename(sock).startswith(
        os.path.basename(d) + "-")
    return d if ok else None


def _remove_socket(sock: str, conf: NetConf) -> None:
    """After a detach: the socket and its directory, when they are of our layout.
    In client mode the socket is QEMU's, left behind once it stopped; in
    server mode the daemon already removed its own."""
    cdir = _our_dir(sock, conf)
    if cdir is None:
        return
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.unlink(sock)
    with contextlib.suppress(OSError):  # not empty (another interface): keep it
        os.rmdir(cdir)


def cmd_add(conf: NetConf, env: Env, client: Client) -> dict:
    name = device_name(conf.name, env.container_id, env.ifname)
    mac = conf.runtime_mac or env.mac or conf.mac
    given = _read_device_info(conf.device_info_file) if conf.device_info_file else None
    sock, mode = given or (socket_path(conf.shared_dir, env.container_id, env.ifname), conf.mode)
    if len(sock.encode()) > SUN_PATH_MAX:
        raise CniError(E_CONFIG, f"socket path {sock} is over {SUN_PATH_MAX} bytes: "
                       "use a shorter sharedDir")
    dev = _find(client, conf, name)
    if dev is not None:  # ADD again for the same attachment: the same answer
        if (dev["iface"], dev["vlan"], dev["socket"]) != (conf.master, conf.vlan, sock) or (
                mac and dev["mac"] != mac):
            raise CniError(E_REFUSED, f"{name} is already attached with other settings "
                           f"({dev['iface']}, VLAN {dev['vlan'] or 'none'}, {dev['mac']})")
    else:
        if not os.path.exists(f"/sys/class/net/{conf.master}"):
            raise CniError(E_CONFIG, f"master {conf.master}: no such network interface")
        made = None
        cdir = _our_dir(sock, conf)
        if cdir is not None and not os.path.isdir(cdir):
            try:
                os.makedirs(cdir, mode=0o770)
            except OSError as e:
                raise CniError(E_IO, f"creating {cdir}: {e}") from None
            made = cdir
        try:
            dev = _ask(client, conf, "attach", name=name, iface=conf.master, mac=mac,
                       queues=conf.queues, mode=mode, socket=sock, mtu=conf.mtu,
                       vlan=conf.vlan)
        except CniError:
            if made:  # a refusal changes nothing, our directory included
                with contextlib.suppress(OSError):
                    os.rmdir(made)
            raise
    if conf.device_info_file and given is None:
        _write_device_info(conf.device_info_file, sock, mode)
    return _result(conf, env, dev)


def cmd_del(conf: NetConf, env: Env, client: Client) -> None:
    from gateway.control import socket_path as control_path

    name = device_name(conf.name, env.container_id, env.ifname)
    try:
        dev = _find(client, conf, name)
        if dev is not None:
            _ask(client, conf, "detach", name=name)
    except CniError as e:
        # the daemon's socket is gone with its run directory (a reboot, an
        # uninstall): there is nothing left to detach, and DEL must not block
        # the pod's teardown. A socket that does not answer may be a daemon
        # about to restore the device: try again later.
        if e.code == E_TRY_AGAIN and not os.path.exists(control_path(conf.run_dir)):
            dev = None
        elif e.code == E_REFUSED and "no device named" in e.msg:
            dev = None  # detached between our list and detach
        else:
            raise
    _remove_socket(dev["socket"] if dev else
                   socket_path(conf.shared_dir, env.container_id, env.ifname), conf)


def cmd_check(conf: NetConf, env: Env, client: Client) -> None:
    name = device_name(conf.name, env.container_id, env.ifname)
    dev = _find(client, conf, name)
    if dev is None:
        raise CniError(E_NOT_ATTACHED, f"{name} ({env.ifname} of {env.container_id[:12]}) "
                       "is not attached")
    if dev["iface"] != conf.master or dev["vlan"] != conf.vlan:
        raise CniError(E_MISMATCH, f"{name} is on {dev['iface']} VLAN {dev['vlan'] or 'none'}, "
                       f"the config says {conf.master} VLAN {conf.vlan or 'none'}")
    if dev["state"] == "pending":
        raise CniError(E_NIC_DOWN, f"{name}: waiting for its NIC: {dev.get('reason')}")
    if dev["state"] == "broken":
        raise CniError(E_BROKEN, f"{name} is broken: {dev.get('reason')}")
    if dev.get("reason"):  # "<nic> is down"
        raise CniError(E_NIC_DOWN, f"{name}: {dev['reason']}")
    mine = [i for i in (conf.prev_result or {}).get("interfaces") or []
            if isinstance(i, dict) and i.get("name") == env.ifname]
    if conf.prev_result is not None and (not mine or mine[-1].get("mac") != dev["mac"]):
        raise CniError(E_MISMATCH, f"prevResult has no interface {env.ifname} with MAC "
                       f"{dev['mac']}")


def cmd_status(conf: NetConf, client: Client) -> None:
    """Ready for ADD: the daemon answers, and the NIC the config names exists."""
    try:
        _ask(client, conf, "list", timeout=STATUS_TIMEOUT)
    except CniError as e:
        raise CniError(E_NOT_AVAILABLE, e.msg) from None
    if conf.master and not os.path.exists(f"/sys/class/net/{conf.master}"):
        raise CniError(E_NOT_AVAILABLE, f"master {conf.master}: no such network interface")


def cmd_gc(conf: NetConf, client: Client) -> None:
    from gateway.control import socket_path as control_path

    keep = {device_name(conf.name, a["containerID"], a["ifname"])
            for a in conf.valid_attachments or []}
    prefix = network_prefix(conf.name)
    try:
        devices = _ask(client, conf, "list")
    except CniError as e:
        if e.code == E_TRY_AGAIN and not os.path.exists(control_path(conf.run_dir)):
            return  # no daemon state at all: nothing to collect
        raise
    for d in devices:
        if d["name"].startswith(prefix) and d["name"] not in keep:
            try:
                _ask(client, conf, "detach", name=d["name"])
            except CniError as e:
                if "no device named" not in e.msg:
                    raise
            _remove_socket(d["socket"], conf)


def version_reply(data: bytes) -> dict:
    """VERSION: the versions we speak, in the version the runtime asked in."""
    try:
        asked = json.loads(data or b"{}").get("cniVersion")
    except (ValueError, AttributeError):
        asked = None
    return {"cniVersion": asked if asked in SUPPORTED else SPEC_VERSION,
            "supportedVersions": list(SUPPORTED)}


def run(environ: dict, stdin: bytes, client: Client) -> tuple[int, dict | None]:
    """One plugin execution: (exit code, the object to print or None)."""
    version = SPEC_VERSION
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, version_reply(stdin)
        conf = parse_config(stdin, env.command)
        version = conf.version
        need = {"CHECK": (0, 4, 0), "STATUS": (1, 1, 0), "GC": (1, 1, 0)}.get(env.command)
        if need and _vkey(conf.version) < need:
            raise CniError(E_VERSION, f"{env.command} needs cniVersion "
                           f"{'.'.join(map(str, need))} or later, the config says {conf.version}")
        if env.command == "ADD":
            return 0, cmd_add(conf, env, client)
        if env.command == "DEL":
            cmd_del(conf, env, client)
        elif env.command == "CHECK":
            cmd_check(conf, env, client)
        elif env.command == "STATUS":
            cmd_status(conf, client)
        elif env.command == "GC":
            cmd_gc(conf, client)
        return 0, None
    except CniError as e:
        err = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            err["details"] = e.details
        return 1, err


def main() -> None:
    from gateway.control import request

    def client(run_dir: str, cmd: str, timeout: float = REQUEST_TIMEOUT, **args):
        return request(run_dir, cmd, timeout=timeout, **args)

    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        rc, out = 1, {"cniVersion": SPEC_VERSION, "code": E_DECODE,
                      "msg": f"the network configuration is over {MAX_STDIN} bytes"}
    else:
        rc, out = run(dict(os.environ), data, client)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    sys.exit(rc)


if __name__ == "__main__":
    main()
