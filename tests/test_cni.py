"""gateway-cni executed as a container runtime executes it, against a real daemon;
then through the reference libcni (Debian's, built into a small Go runner), and
end to end with a QEMU guest on the socket libcni's ADD handed out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cni
from gateway.testing import qemu
from gateway.testing.wait import until
from gateway.xdp import link

PLUGIN = Path(sys.executable).parent / "gateway-cni"  # the console entry point
CID = "3f1c0ffee0ddba11d00dfeedface0123456789abcdef"
CID2 = "9a8b7c6d5e4f30211122334455667788"
TIMEOUT = 30


def cni_exec(command: str, conf: dict | bytes | None, *, cid: str = CID, ifname: str = "net1",
             netns: str = "/var/run/netns/pod1", extra: dict | None = None,
             drop: tuple[str, ...] = ()) -> tuple[int, dict | None, str]:
    """Run the plugin once: (exit code, the JSON it printed or None, stderr)."""
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": str(PLUGIN.parent),
           **(extra or {})}
    for k in drop:
        env.pop(k, None)
    data = conf if isinstance(conf, bytes) else json.dumps(conf or {}).encode()
    r = subprocess.run([str(PLUGIN)], input=data, env=env, capture_output=True,
                       timeout=TIMEOUT)
    out = r.stdout.decode()
    assert out.count("\n") <= 1, out  # one JSON object, nothing else on stdout
    return r.returncode, (json.loads(out) if out.strip() else None), r.stderr.decode()


def ok(command: str, conf: dict, **kw) -> dict | None:
    rc, out, err = cni_exec(command, conf, **kw)
    assert rc == 0, (out, err)
    return out


def fails(command: str, conf, code: int, **kw) -> str:
    """The plugin answered with the spec's error object, `code`, one line."""
    rc, out, err = cni_exec(command, conf, **kw)
    assert rc != 0, out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}, out
    assert out["code"] == code, out
    assert out["msg"] and "\n" not in out["msg"] and out["cniVersion"] in cni.SUPPORTED
    return out["msg"]


def config(d, topo, tmp_path, version: str = "1.1.0", **over) -> dict:
    c = {"cniVersion": version, "name": "vmnet", "type": "gateway-cni", "master": topo.nic,
         "sharedDir": str(tmp_path / "vhost"), "runDir": d.run_dir}
    c.update(over)
    return c


def devices(d) -> list[dict]:
    return json.loads(d.ok("list", "--json"))["devices"]


def wait_until(cond, what: str, timeout: float = TIMEOUT):
    return until(cond, what, timeout)


# -- the plugin alone ----------------------------------------------------------------

def test_entry_point_and_names():
    assert PLUGIN.exists(), "pip install -e . installs the gateway-cni console script"
    name = cni.device_name("vmnet", CID, "net1")
    assert name == cni.device_name("vmnet", CID, "net1")  # derived, not stored
    assert len(name) <= 32 and name.startswith(cni.network_prefix("vmnet"))
    from gateway.registry import NAME_RE

    assert NAME_RE.match(name)
    assert len({cni.device_name(n, c, i) for n in ("a", "b") for c in (CID, CID2)
                for i in ("net1", "net2")}) == 8
    assert cni.socket_path("/s", CID, "net1") == f"/s/{CID[:12]}/{CID[:12]}-net1"


@pytest.mark.parametrize("asked", [*cni.SUPPORTED, "0.2.0", None])
def test_version_answers_in_the_version_asked(asked):
    rc, out, _ = cni_exec("VERSION", {"cniVersion": asked} if asked else b"",
                          drop=("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"))
    assert rc == 0
    assert out == {"cniVersion": asked if asked in cni.SUPPORTED else "1.1.0",
                   "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_status_and_del_without_a_daemon(tmp_path):
    conf = {"cniVersion": "1.1.0", "name": "vmnet", "type": "gateway-cni", "master": "lo",
            "runDir": str(tmp_path / "no-daemon"), "sharedDir": str(tmp_path / "vhost")}
    msg = fails("STATUS", conf, cni.E_NOT_AVAILABLE)
    assert "not running" in msg
    ok("DEL", conf)  # the daemon's whole state is gone: nothing to detach
    ok("GC", {**conf, "cni.dev/valid-attachments": []})
    fails("ADD", conf, cni.E_TRY_AGAIN)
    assert not (tmp_path / "vhost" / CID[:12]).exists()  # the refused ADD left no directory
    # a socket file nobody answers on: maybe a daemon about to restore; DEL waits
    (tmp_path / "no-daemon").mkdir()
    import socket as s

    dead = s.socket(s.AF_UNIX)
    dead.bind(str(tmp_path / "no-daemon" / "gateway.sock"))
    dead.close()
    fails("DEL", conf, cni.E_TRY_AGAIN)
    # a daemon that takes the connection and never answers: STATUS gives up, 50
    os.unlink(tmp_path / "no-daemon" / "gateway.sock")
    with s.socket(s.AF_UNIX) as mute:
        mute.bind(str(tmp_path / "no-daemon" / "gateway.sock"))
        mute.listen(4)
        assert "did not answer" in fails("STATUS", conf, cni.E_NOT_AVAILABLE)


# -- against a daemon ----------------------------------------------------------------

def test_add_check_del(env, tmp_path):
    topo, d = env
    conf = config(d, topo, tmp_path)
    info_file = tmp_path / "devinfo" / "net1.json"
    conf["runtimeConfig"] = {"CNIDeviceInfoFile": str(info_file)}
    ok("STATUS", conf)
    fails("STATUS", {**conf, "master": "gwtnosuchnic"}, cni.E_NOT_AVAILABLE)
    sock = str(tmp_path / "vhost" / CID[:12] / f"{CID[:12]}-net1")
    res = ok("ADD", conf)
    name = cni.device_name("vmnet", CID, "net1")
    (dev,) = devices(d)
    assert dev["name"] == name and dev["iface"] == topo.nic and dev["mode"] == "client"
    assert dev["socket"] == sock and dev["vlan"] == 0 and dev["mtu"] == 1500
    assert res == {"cniVersion": "1.1.0", "ips": [], "interfaces": [
        {"name": "net1", "mac": dev["mac"], "sandbox": "/var/run/netns/pod1", "mtu": 1500,
         "socketPath": sock}]}
    # the Multus device-info file: QEMU is the socket's server
    assert json.loads(info_file.read_text()) == {
        "type": "vhost-user", "version": "1.1.0",
        "vhost-user": {"mode": "server", "path": sock}}
    assert ok("ADD", conf) == res  # twice: the same answer, still one device
    assert [x["name"] for x in devices(d)] == [name]

    check = {**conf, "prevResult": res}
    assert ok("CHECK", check) is None
    bad = {**res, "interfaces": [{**res["interfaces"][0], "mac": "02:00:00:00:00:99"}]}
    fails("CHECK", {**conf, "prevResult": bad}, cni.E_MISMATCH)
    fails("CHECK", {**check, "vlan": 7}, cni.E_MISMATCH)
    fails("CHECK", {**check, "cniVersion": "0.3.1"}, cni.E_VERSION)
    fails("CHECK", check, cni.E_NOT_ATTACHED, ifname="net2")

    topo_link = ["ip", "link", "set", topo.nic]
    subprocess.run([*topo_link, "down"], check=True)
    try:
        wait_until(lambda: cni_exec("CHECK", check)[1], "CHECK to see the NIC down")
        fails("CHECK", check, cni.E_NIC_DOWN)
    finally:
        subprocess.run([*topo_link, "up"], check=True)
    wait_until(lambda: cni_exec("CHECK", check)[0] == 0, "CHECK to pass with the NIC up")

    ok("DEL", {**conf, "prevResult": res})
    assert devices(d) == []
    assert not (tmp_path / "vhost" / CID[:12]).exists()
    assert link.xdp_state(topo.nic)[0] is None and link.fdb_entries(topo.nic) == []
    ok("DEL", conf)  # again: nothing there, still success
    fails("CHECK", check, cni.E_NOT_ATTACHED)


def test_server_mode_vlan_mtu_and_macs(env, tmp_path):
    topo, d = env
    conf = config(d, topo, tmp_path, "1.0.0", mode="server", vlan=100, mtu=1400, queues=1,
                  mac="02:aa:bb:cc:dd:01")
    res = ok("ADD", conf)
    sock = tmp_path / "vhost" / CID[:12] / f"{CID[:12]}-net1"
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"] == [{"name": "net1", "mac": "02:aa:bb:cc:dd:01",
                                  "sandbox": "/var/run/netns/pod1"}]  # no 1.1.0 fields
    (dev,) = devices(d)
    assert (dev["mode"], dev["vlan"], dev["mtu"]) == ("server", 100, 1400)
    assert sock.is_socket()  # the gateway listens there
    # the runtime's MAC (capability "mac", then CNI_ARGS) wins over the config's
    res2 = ok("ADD", {**conf, "runtimeConfig": {"mac": "02:aa:bb:cc:dd:02"}}, cid=CID2)
    res3 = ok("ADD", conf, cid=CID2, ifname="net2",
              extra={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=vm;MAC=02:aa:bb:cc:dd:03"})
    assert res2["interfaces"][0]["mac"] == "02:aa:bb:cc:dd:02"
    assert res3["interfaces"][0]["mac"] == "02:aa:bb:cc:dd:03"
    assert len(devices(d)) == 3
    ok("DEL", conf)
    assert not sock.exists() and not sock.parent.exists()
    ok("DEL", conf, cid=CID2)
    assert (tmp_path / "vhost" / CID2[:12]).exists()  # net2 of the same container is left
    ok("DEL", conf, cid=CID2, ifname="net2")
    assert devices(d) == [] and not (tmp_path / "vhost" / CID2[:12]).exists()


def test_a_device_plugins_device_info_names_the_socket(env, tmp_path):
    """Multus copied a device plugin's device-info to CNIDeviceInfoFile before
    ADD: its path and mode win over the plugin's own layout, the file stays."""
    topo, d = env
    info = tmp_path / "devinfo" / "dp.json"
    info.parent.mkdir()
    sock = tmp_path / "dp" / "socket7"
    sock.parent.mkdir()
    given = {"type": "vhost-user", "version": "1.1.0",
             "vhost-user": {"mode": "client", "path": str(sock)}}  # the container dials
    info.write_text(json.dumps(given))
    conf = config(d, topo, tmp_path, runtimeConfig={"CNIDeviceInfoFile": str(info)})
    res = ok("ADD", conf)
    (dev,) = devices(d)
    assert (dev["socket"], dev["mode"]) == (str(sock), "server") and sock.is_socket()
    assert res["interfaces"][0]["socketPath"] == str(sock)
    assert json.loads(info.read_text()) == given
    assert not (tmp_path / "vhost").exists()  # no directory of our own layout
    ok("DEL", conf)
    assert devices(d) == [] and not sock.exists() and sock.parent.is_dir()
    info.write_text(json.dumps({"type": "pci", "version": "1.1.0",
                                "pci": {"pci-address": "0000:01:02.2"}}))
    fails("ADD", conf, cni.E_CONFIG)
    info.write_text("{")
    fails("ADD", conf, cni.E_DECODE)
    assert devices(d) == []


def test_check_sees_a_broken_device(env, tmp_path):
    """A guest whose TX descriptor points outside its memory: the daemon marks
    the device broken, CHECK says so (103) until the guest resets it."""
    from gateway.testing.frontend import Frontend

    topo, d = env
    conf = config(d, topo, tmp_path, mode="server")
    res = ok("ADD", conf)
    check = {**conf, "prevResult": res}
    with Frontend(res["interfaces"][0]["socketPath"]) as fe:
        fe.connect().setup()
        ok("CHECK", check)
        tx = fe.rings[1]
        tx.write_desc(0, 1 << 50, 64)
        tx.push_avail(0)
        os.eventfd_write(fe.kicks[1], 1)
        wait_until(lambda: cni_exec("CHECK", check)[0] != 0, "CHECK to see the lie")
        assert "broken" in fails("CHECK", check, cni.E_BROKEN)
    ok("DEL", check)
    assert devices(d) == []


def test_bad_input_is_a_spec_error_and_changes_nothing(env, tmp_path):
    topo, d = env
    conf = config(d, topo, tmp_path, mac="02:aa:bb:cc:dd:01")
    ok("ADD", conf)
    before = devices(d)
    before_dirs = sorted(os.listdir(tmp_path / "vhost"))
    other = {"cid": CID2}
    cases = [
        (b"{not json", cni.E_DECODE, {}),
        (b"[1, 2]", cni.E_DECODE, {}),
        (b"[" * 100000, cni.E_DECODE, {}),
        ({**conf, "master": ".."}, cni.E_CONFIG, other),
        ({**conf, "prevResult": {"interfaces": {}}}, cni.E_CONFIG, other),
        ({**conf, "cniVersion": "0.2.0"}, cni.E_VERSION, {}),
        ({k: v for k, v in conf.items() if k != "cniVersion"}, cni.E_CONFIG, {}),
        ({k: v for k, v in conf.items() if k != "master"}, cni.E_CONFIG, {}),
        ({**conf, "name": "bad name"}, cni.E_CONFIG, {}),
        ({**conf, "mater": "eth1"}, cni.E_UNSUPPORTED_FIELD, {}),
        ({**conf, "ipam": {"type": "host-local"}}, cni.E_UNSUPPORTED_FIELD, {}),
        ({**conf, "master": "gwtnosuchnic"}, cni.E_CONFIG, other),
        ({**conf, "vlan": 4095}, cni.E_CONFIG, other),
        ({**conf, "vlan": True}, cni.E_CONFIG, other),
        ({**conf, "mtu": "1500"}, cni.E_CONFIG, other),
        ({**conf, "queues": 0}, cni.E_CONFIG, other),
        ({**conf, "mode": "both"}, cni.E_CONFIG, other),
        ({**conf, "mac": "01:00:5e:00:00:01"}, cni.E_CONFIG, other),  # multicast
        ({**conf, "mac": "zz"}, cni.E_CONFIG, other),
        ({**conf, "sharedDir": "relative"}, cni.E_CONFIG, other),
        ({**conf, "sharedDir": "/" + "x" * 100}, cni.E_CONFIG, other),  # over sun_path
        ({**conf, "runtimeConfig": []}, cni.E_CONFIG, other),
        (conf, cni.E_REFUSED, other),  # the MAC is in use by the first device
        ({**conf, "queues": 64}, cni.E_REFUSED, {"cid": CID2, "extra": {"CNI_ARGS": ""}}),
        (conf, cni.E_REFUSED, {"ifname": "net1", "cid": CID2,
                               "extra": {"CNI_ARGS": "MAC=02:aa:bb:cc:dd:01"}}),
        (conf, cni.E_ENV, {"drop": ("CNI_CONTAINERID",)}),
        (conf, cni.E_ENV, {"drop": ("CNI_NETNS",)}),
        (conf, cni.E_ENV, {"drop": ("CNI_IFNAME",)}),
        (conf, cni.E_ENV, {"ifname": "a/b"}),
        (conf, cni.E_ENV, {"ifname": "x" * 16}),
        (conf, cni.E_ENV, {"cid": "../../etc"}),
        (conf, cni.E_ENV, {"extra": {"CNI_ARGS": "novalue"}}),
        (conf, cni.E_CONFIG, {"cid": CID2, "extra": {"CNI_ARGS": "MAC=nope"}}),
    ]
    for data, code, kw in cases:
        msg = fails("ADD", data, code, **kw)
        assert len(msg) < 300, msg
    fails("FROB", conf, cni.E_ENV)
    fails("ADD", conf, cni.E_ENV, drop=("CNI_COMMAND",))
    # ADD again for the first attachment with other settings: refused, not re-attached
    fails("ADD", {**conf, "vlan": 5}, cni.E_REFUSED)
    fails("GC", {**conf, "cni.dev/valid-attachments": "all"}, cni.E_CONFIG)
    fails("GC", {**conf, "cniVersion": "1.0.0"}, cni.E_VERSION)
    fails("STATUS", {**conf, "cniVersion": "0.4.0"}, cni.E_VERSION)
    assert devices(d) == before
    assert sorted(os.listdir(tmp_path / "vhost")) == before_dirs == [CID[:12]]


def test_gc_detaches_this_networks_stale_devices(env, tmp_path):
    topo, d = env
    a = config(d, topo, tmp_path, mode="server")
    b = {**a, "name": "othernet"}
    ok("ADD", a)
    ok("ADD", a, cid=CID2)
    ok("ADD", a, cid=CID2, ifname="net2")
    ok("ADD", b, cid=CID2, ifname="net3")  # an interface name is one network's
    d.ok("attach", "byhand", topo.nic)  # not a CNI device: GC leaves it alone
    ok("GC", {**a, "cni.dev/valid-attachments": [{"containerID": CID2, "ifname": "net2"}]})
    assert sorted(x["name"] for x in devices(d)) == sorted(
        ["byhand", cni.device_name("vmnet", CID2, "net2"),
         cni.device_name("othernet", CID2, "net3")])
    assert sorted(os.listdir(tmp_path / "vhost")) == [CID2[:12]]  # CID's directory went
    ok("GC", {**a, "cni.dev/valid-attachments": [{"containerID": CID2, "ifname": "net2"}]})
    ok("GC", {**b, "cni.dev/valid-attachments": []})
    assert sorted(x["name"] for x in devices(d)) == sorted(
        ["byhand", cni.device_name("vmnet", CID2, "net2")])


# -- through libcni ------------------------------------------------------------------

RUNNER_SRC = Path(__file__).parent / "cni_runner" / "main.go"
GOCODE = "/usr/share/gocode"


@pytest.fixture(scope="module")
def runner() -> Path:
    """The libcni runner, built offline in GOPATH mode and cached by its source's hash."""
    if not shutil.which("go") or not os.path.isdir(f"{GOCODE}/src/github.com/"
                                                    "containernetworking/cni/libcni"):
        pytest.skip("golang-go and golang-github-appc-cni-dev are not installed")
    cache = Path(os.environ.get("GATEWAY_CACHE", "/var/cache/gateway")) / "cni-runner"
    binary = cache / f"cni-runner-{hashlib.sha256(RUNNER_SRC.read_bytes()).hexdigest()[:16]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(f".{os.getpid()}")
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{cache / 'gopath'}:{GOCODE}",
               "GOCACHE": str(cache / "gocache"), "GOFLAGS": "", "CGO_ENABLED": "0",
               "GOPROXY": "off"}
        subprocess.run(["go", "build", "-o", str(tmp), str(RUNNER_SRC)], env=env, check=True,
                       timeout=600)
        os.replace(tmp, binary)
    return binary


def libcni(runner: Path, action: str, conflist: Path, tmp_path: Path, *, cid: str = CID,
           caps: dict | None = None) -> tuple[int, object]:
    env = {"PATH": os.environ["PATH"], "RUNNER_CONTAINERID": cid,
           "RUNNER_NETNS": "/var/run/netns/pod1", "RUNNER_IFNAME": "net1",
           "RUNNER_CACHEDIR": str(tmp_path / "cnicache"), "RUNNER_PATH": str(PLUGIN.parent),
           "RUNNER_CAPS": json.dumps(caps or {})}
    r = subprocess.run([str(runner), action, str(conflist)], env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else r.stderr


def conflist(tmp_path: Path, d, topo, version: str, **plugin) -> Path:
    p = tmp_path / f"vmnet-{version}.conflist"
    p.write_text(json.dumps({
        "cniVersion": version, "name": "vmnet",
        "plugins": [{"type": "gateway-cni", "master": topo.nic, "runDir": d.run_dir,
                     "sharedDir": str(tmp_path / "vhost"),
                     "capabilities": {"CNIDeviceInfoFile": True, "mac": True}, **plugin}]}))
    return p


def test_libcni_add_check_del(env, tmp_path, runner):
    topo, d = env
    lst = conflist(tmp_path, d, topo, "1.0.0")
    rc, out = libcni(runner, "validate", lst, tmp_path)  # asks the plugin VERSION
    assert rc == 0 and sorted(out["capabilities"]) == ["CNIDeviceInfoFile", "mac"], out
    info = tmp_path / "devinfo" / "x.json"
    caps = {"CNIDeviceInfoFile": str(info), "mac": "02:aa:bb:cc:dd:07"}
    rc, res = libcni(runner, "add", lst, tmp_path, caps=caps)
    assert rc == 0, res
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"] == [{"name": "net1", "mac": "02:aa:bb:cc:dd:07",
                                  "sandbox": "/var/run/netns/pod1"}]
    sock = json.loads(info.read_text())["vhost-user"]["path"]
    (dev,) = devices(d)
    assert dev["socket"] == sock and dev["mac"] == "02:aa:bb:cc:dd:07"
    assert libcni(runner, "cached", lst, tmp_path) == (0, res)  # libcni's result cache
    assert libcni(runner, "check", lst, tmp_path, caps=caps) == (0, {"ok": True})  # prevResult
    d.ok("detach", dev["name"])
    rc, out = libcni(runner, "check", lst, tmp_path, caps=caps)
    assert rc == 1 and out["code"] == cni.E_NOT_ATTACHED, out
    rc, res = libcni(runner, "add", lst, tmp_path, caps=caps)
    assert rc == 0 and devices(d)[0]["mac"] == "02:aa:bb:cc:dd:07"
    assert libcni(runner, "del", lst, tmp_path, caps=caps) == (0, {"ok": True})
    assert devices(d) == [] and libcni(runner, "cached", lst, tmp_path) == (0, None)
    assert libcni(runner, "del", lst, tmp_path, caps=caps) == (0, {"ok": True})

    # an older list: the answer comes in its version; libcni itself refuses CHECK
    old = conflist(tmp_path, d, topo, "0.3.1")
    rc, res = libcni(runner, "add", old, tmp_path)
    assert rc == 0 and res["cniVersion"] == "0.3.1" and len(devices(d)) == 1, res
    rc, out = libcni(runner, "check", old, tmp_path)
    assert rc == 1 and "does not support the CHECK" in out["error"], out
    assert libcni(runner, "del", old, tmp_path) == (0, {"ok": True}) and devices(d) == []
    # a version the plugin does not speak: negotiation fails before any ADD
    rc, out = libcni(runner, "validate", conflist(tmp_path, d, topo, "0.2.0"), tmp_path)
    assert rc == 1 and "0.2.0" in out["error"], out


GUEST_MAC = "52:54:00:12:34:88"
SCENARIO = """
i=0
while [ $i -lt 60 ]; do
    if ping -c 1 -W 1 {far} >/dev/null 2>&1; then echo "GW-GUEST: ping ok"; break; fi
    i=$((i+1))
done
echo "GW-GUEST: done"
"""


@pytest.mark.qemu
@pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed")
def test_libcni_add_then_a_guest_pings_the_far_host(env, tmp_path, runner):
    """The KubeVirt path: ADD through libcni (device-info capability, gateway in
    client mode), QEMU listens on the socket the device-info file names, the
    guest pings the far host; after DEL nothing of the device is left."""
    from gateway.testing.guest import ensure_guest, make_initrd, net_up

    topo, d = env
    lst = conflist(tmp_path, d, topo, "1.0.0")
    info = tmp_path / "devinfo" / "vm.json"
    caps = {"CNIDeviceInfoFile": str(info), "mac": GUEST_MAC}
    rc, res = libcni(runner, "add", lst, tmp_path, caps=caps)
    assert rc == 0, res
    vu = json.loads(info.read_text())["vhost-user"]
    assert vu["mode"] == "server"  # QEMU's side, as KubeVirt runs it
    image = ensure_guest()
    ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
    initrd = make_initrd(image, net_up(ip) + SCENARIO.format(far=topo.peer_ip),
                         tmp_path / "initrd")
    nic = qemu.VhostUserNic(socket=vu["path"], mac=res["interfaces"][0]["mac"], server=True)
    with qemu.QemuGuest(image.kernel, initrd, nics=[nic],
                        log_path=tmp_path / "console.log") as vm:
        vm.wait_for(r"GW-GUEST: done", 240)
        assert "GW-GUEST: ping ok" in vm.output(), vm.tail()
    name = cni.device_name("vmnet", CID, "net1")
    (dev,) = devices(d)
    stats = json.loads(d.ok("stats", "--json"))["devices"][name]
    assert dev["name"] == name and stats["tx_packets"] > 0 and stats["rx_packets"] > 0
    assert libcni(runner, "del", lst, tmp_path, caps=caps) == (0, {"ok": True})
    assert devices(d) == []
    assert link.xdp_state(topo.nic)[0] is None and link.fdb_entries(topo.nic) == []
    assert not os.path.exists(vu["path"]) and not (tmp_path / "vhost" / CID[:12]).exists()


# -- docs/kubernetes.md --------------------------------------------------------------

def test_kubernetes_page_yaml():
    """Every YAML block of the page parses, and says what the plugin and the
    daemon read: the NAD's config passes the plugin's own validation, the VM
    uses the registered binding on that network, the DaemonSet runs `gateway
    daemon` with options it has, on the paths the plugin talks to."""
    import re

    import yaml

    from gateway.cli import main as gateway_cli

    page = (Path(__file__).parent.parent / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    docs = {d["kind"]: d for b in blocks for d in yaml.safe_load_all(b)}
    assert sorted(docs) == ["DaemonSet", "KubeVirt", "NetworkAttachmentDefinition",
                            "VirtualMachine"] and len(blocks) == 4

    nad = docs["NetworkAttachmentDefinition"]
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
    raw = json.loads(nad["spec"]["config"])
    conf = cni.parse_config(nad["spec"]["config"].encode(), "ADD")  # raises if invalid
    assert raw["type"] == "gateway-cni" and conf.name == nad["metadata"]["name"]
    assert raw["capabilities"] == {"CNIDeviceInfoFile": True, "mac": True}

    kv = docs["KubeVirt"]["spec"]["configuration"]
    bindings = kv["network"]["binding"]
    assert bindings["vhostuser"]["downwardAPI"] == "device-info"
    assert "NetworkBindingPlugins" in kv["developerConfiguration"]["featureGates"]

    vm = docs["VirtualMachine"]["spec"]["template"]["spec"]
    ifaces = {i["name"]: i for i in vm["domain"]["devices"]["interfaces"]}
    nets = {n["name"]: n for n in vm["networks"]}
    assert set(ifaces) == set(nets)
    (vu,) = [i for i in ifaces.values() if "binding" in i]
    assert vu["binding"]["name"] in bindings
    ns = nad["metadata"]["namespace"]
    assert nets[vu["name"]]["multus"]["networkName"] == f"{ns}/{conf.name}"
    cni._mac(vu["macAddress"], "macAddress")  # what runtimeConfig.mac will carry
    assert "hugepages" in vm["domain"]["memory"]  # vhost-user needs shared guest memory

    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (c,) = pod["containers"]
    assert c["securityContext"]["privileged"] is True
    assert c["command"][:2] == ["gateway", "daemon"]
    opts = dict(a.removeprefix("--").split("=", 1) for a in c["command"][2:])
    daemon = gateway_cli.commands["daemon"]
    known = {o.removeprefix("--") for p in daemon.params for o in p.opts}
    assert set(opts) <= known, set(opts) - known
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounted = {m["mountPath"]: host[m["name"]] for m in c["volumeMounts"]}
    # the control socket, the saved attachments and the device sockets: the
    # node's own paths, where the plugin (on the node) finds them
    for path in (opts["run-dir"], opts["state-dir"], conf.shared_dir):
        assert mounted.get(path) == path, path
    assert opts["run-dir"] == conf.run_dir == "/run/gateway"
