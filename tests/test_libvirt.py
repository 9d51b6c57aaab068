"""libvirt for real: domains defined with what `gateway attach` / `gateway xml` print,
run by a libvirtd of the test's own (gateway/testing/libvirt.py), QEMU as
libvirt's user `libvirt-qemu`, a Linux guest under TCG.

The commands here are the README's libvirt section. Guests under TCG are slow,
so each boot covers several things: the server-mode boot also restarts the
daemon twice and hot-plugs a second device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gateway.testing import libvirt, qemu
from gateway.testing.daemon import Daemon
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.netns import topology
from gateway.xdp import link

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
    pytest.mark.skipif(not libvirt.available(), reason="libvirt-daemon-system not installed"),
]

QEMU_USER = "libvirt-qemu"
MAC0, MAC1 = "52:54:00:1b:00:01", "52:54:00:1b:00:02"
FILE_SIZE = 1 << 20

# eth0: ping, download, then ping once a second until eth1 appears (hot-plug);
# eth1 (eth0 down, so the far host is reached through eth1 only): ping, then wait
# until it is gone (detach).
SCENARIO = """
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: pinged"
echo "GW-GUEST: md5 $(wget -q -O - http://{far}:8000/blob | md5sum | cut -d' ' -f1)"
n=0
while [ ! -e /sys/class/net/eth1 ] && [ $n -lt 900 ]; do
    if ping -c 1 -W 1 {far} >/dev/null 2>&1; then echo "GW-GUEST: ping ok $n"; sleep 0.5
    else echo "GW-GUEST: ping lost $n"; fi
    n=$((n+1))
done
echo "GW-GUEST: eth1 appeared"
ip link set eth0 down
ip link set eth1 up
ip addr add {ip1}/24 dev eth1
i=0
while [ "$(cat /sys/class/net/eth1/operstate)" != up ] && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i+1))
done
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: eth1 pinged"
i=0
while [ -e /sys/class/net/eth1 ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done
echo "GW-GUEST: eth1 gone"
sleep 600  # no power-off under libvirt's feet while it finishes the detach
"""

# QEMU 7.2 under TCG segfaults in vhost_net_start when the guest drives a vhost-user
# virtio-net device with MSI-X (shared notes: vectors=0). A <qemu:override> could
# set vectors=0, but only on devices whose alias the domain XML names in advance,
# not on a hot-plugged one (the printed <interface> carries no alias); so the test
# guest's kernel runs with pci=nomsi, which covers both. The XML is the printed one.
GUEST_CMDLINE_EXTRA = " pci=nomsi"


@pytest.fixture
def gateway_group():
    """The README's first step: the `gateway` group exists before the daemon starts
    (its sockets get that group). Removed after if the test made it."""
    created = subprocess.run(["getent", "group", "gateway"], capture_output=True).returncode
    if created:
        subprocess.run(["groupadd", "--system", "gateway"], check=True)
    yield
    if created:
        subprocess.run(["groupdel", "gateway"], capture_output=True)


@contextlib.contextmanager
def qemu_user_in_gateway_group():
    """The README's second step: libvirt's QEMU user joins the group."""
    subprocess.run(["usermod", "-aG", "gateway", QEMU_USER], check=True)
    try:
        yield
    finally:
        subprocess.run(["gpasswd", "-d", QEMU_USER, "gateway"], capture_output=True)


@pytest.fixture
def world(request, tmp_path, gateway_group):
    """A far host serving a file, a daemon, a libvirtd; a directory libvirt's QEMU
    user can enter (pytest's tmp_path is root's alone), holding the daemon's run
    directory, the guest's kernel, initrd and console."""
    d = Path(tempfile.mkdtemp(prefix="gwt-vm-"))
    d.chmod(0o755)
    blob = os.urandom(FILE_SIZE)
    (d / "www").mkdir()
    (d / "www" / "blob").write_bytes(blob)
    server = daemon = None
    try:
        queues = getattr(request, "param", 1)  # the NIC's queues
        with topology(queues) as topo, libvirt.Libvirtd(keep_logs=tmp_path) as lv:
            server = topo.popen(sys.executable, "-m", "http.server", "8000", "--bind",
                                topo.peer_ip, cwd=d / "www", stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
            daemon = Daemon(str(d / "run"), str(d / "state")).start()
            yield W(d, topo, lv, daemon, hashlib.md5(blob).hexdigest())
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.stop()
        if server is not None:
            server.kill()
            server.wait()
        for f in d.glob("*.console"):
            shutil.copy(f, tmp_path / f.name)
        shutil.rmtree(d, ignore_errors=True)


class W:
    def __init__(self, d, topo, lv, daemon, md5):
        self.dir, self.topo, self.lv, self.d, self.md5 = d, topo, lv, daemon, md5
        self.far = topo.peer_ip
        net = topo.peer_ip.split(".")[1]
        self.ip0, self.ip1 = f"10.{net}.0.2", f"10.{net}.0.3"

    def boot(self, name: str, interface_xml: str, memory_backing: str) -> libvirt.Console:
        """Define and start a domain with the gateway's elements pasted in."""
        image = ensure_guest()
        kernel = self.dir / "vmlinuz"
        if not kernel.exists():
            shutil.copyfile(image.kernel, kernel)
        initrd = make_initrd(image, net_up(self.ip0) + SCENARIO.format(
            far=self.far, ip1=self.ip1), self.dir / f"{name}.initrd")
        console = self.dir / f"{name}.console"
        xml = libvirt.domain_xml(
            name, kernel=kernel, initrd=initrd, cmdline=image.cmdline + GUEST_CMDLINE_EXTRA,
            console=console, memory_backing=memory_backing,
            # q35 hot-plugs into a free PCIe root port: one for eth0, two spare (and
            # none taken by a USB controller)
            devices=interface_xml + "\n<controller type='usb' model='none'/>"
            "<controller type='pci' index='0' model='pcie-root'/>"
            + "<controller type='pci' model='pcie-root-port'/>" * 3)
        self.lv.define_and_start(xml)
        return libvirt.Console(console)

    def running(self, name: str):
        def check():
            state = self.lv.virsh("domstate", name, check=False).stdout.strip()
            if state != "running":
                log = [ln for ln in self.lv.qemu_log(name).splitlines()
                       if not ln.startswith(("-", " ", "LC_ALL", "/"))]
                raise libvirt.LibvirtError(f"domain {name} is {state!r}: QEMU log:\n"
                                           + "\n".join(log[-30:]))
        return check

    def restart_daemon(self, how: str) -> None:
        if how == "SIGTERM":
            assert self.d.stop() == 0
        else:
            self.d.proc.kill()
            self.d.proc.wait()
            assert link.xdp_state(self.topo.nic)[0] is not None  # left behind by the crash
        self.d.start()  # restores the devices from its state directory


def qemu_pid(lv: libvirt.Libvirtd, name: str) -> int:
    return int((lv.root / "run" / "qemu" / f"{name}.pid").read_text())


def test_server_mode_domain_survives_daemon_restarts_and_hotplugs(world):
    """The gateway listens, QEMU (as libvirt-qemu, in group gateway) connects with
    the printed <reconnect>: ping + download, the daemon restarted by SIGTERM and by
    SIGKILL with the guest's pings resuming each time in the same QEMU; then a
    second device hot-plugged with `virsh attach-device --live` of `gateway xml`,
    pinged through, detached, and shown waiting."""
    w = world
    with qemu_user_in_gateway_group():  # libvirtd runs already: no restart needed
        out = w.d.ok("attach", "vm0", w.topo.nic, "--mac", MAC0)
        assert "note:" not in out, out
        xml = w.d.ok("xml", "vm0")
        assert "<reconnect enabled='yes' timeout='1'/>" in xml
        assert xml in out  # attach prints the same element
        memory = w.d.ok("xml", "--memory-backing")
        console = w.boot("gwt-server", xml, memory)
        alive = w.running("gwt-server")
        console.wait_for(r"GW-GUEST: pinged", 180, check=alive)
        assert console.wait_for(r"GW-GUEST: md5 (\S+)", 120, check=alive)[1] == w.md5
        console.wait_for(r"GW-GUEST: ping ok", 60, check=alive)
        pid = qemu_pid(w.lv, "gwt-server")
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(QEMU_USER).pw_uid
        for how in ("SIGTERM", "SIGKILL"):
            w.restart_daemon(how)
            console.skip()
            for _ in range(3):  # the same guest, no domain restart: its pings resume
                console.wait_for(r"GW-GUEST: ping ok", 120, check=alive)
            assert qemu_pid(w.lv, "gwt-server") == pid

        w.d.ok("attach", "vm1", w.topo.nic, "--mac", MAC1)
        iface = w.dir / "vm1.xml"
        iface.write_text(w.d.ok("xml", "vm1", "--rx-queue-size", "512",
                                "--tx-queue-size", "512"))
        w.lv.virsh("attach-device", "gwt-server", str(iface), "--live")
        console.wait_for(r"GW-GUEST: eth1 appeared", 120, check=alive)
        console.wait_for(r"GW-GUEST: eth1 pinged", 120, check=alive)
        c = json.loads(w.d.ok("stats", "vm1", "--json"))["devices"]["vm1"]
        assert c["tx_packets"] >= 3 and c["rx_packets"] >= 3, c  # 3 pings, their replies
        w.lv.virsh("detach-device", "gwt-server", str(iface), "--live")
        console.wait_for(r"GW-GUEST: eth1 gone", 120, check=alive)
        assert "vm1: waiting" in w.d.ok("list")
        lines = console.lines()
        assert sum("modules loaded" in ln for ln in lines) == 1  # never rebooted


def test_client_mode_domain_survives_daemon_restarts(world):
    """QEMU listens (`--client`; libvirt's mode='server', no <reconnect> needed), the
    gateway dials it: ping + download, and after SIGTERM and SIGKILL the restarted
    daemon dials again and the same guest's pings resume."""
    w = world
    out = w.d.ok("attach", "vm0", w.topo.nic, "--client", str(w.dir / "vm0.sock"))
    assert (f"note: libvirt runs QEMU as {QEMU_USER}, who cannot create {w.dir}/vm0.sock "
            f"in {w.dir}: keep QEMU's sockets in a directory it owns ('install -d -o "
            f"{QEMU_USER} DIR'), or attach without --client") in out
    w.d.ok("detach", "vm0")
    subprocess.run(["install", "-d", "-o", QEMU_USER, str(w.dir / "vms")], check=True)
    sock = str(w.dir / "vms" / "vm0.sock")
    out = w.d.ok("attach", "vm0", w.topo.nic, "--mac", MAC0, "--client", sock)
    assert "note:" not in out, out
    xml = w.d.ok("xml", "vm0")
    assert f"path='{sock}' mode='server'/>" in xml and "reconnect" not in xml
    console = w.boot("gwt-client", xml, w.d.ok("xml", "--memory-backing"))
    alive = w.running("gwt-client")
    console.wait_for(r"GW-GUEST: pinged", 180, check=alive)
    assert console.wait_for(r"GW-GUEST: md5 (\S+)", 120, check=alive)[1] == w.md5
    console.wait_for(r"GW-GUEST: ping ok", 60, check=alive)
    pid = qemu_pid(w.lv, "gwt-client")
    for how in ("SIGTERM", "SIGKILL"):
        w.restart_daemon(how)
        console.skip()
        for _ in range(3):
            console.wait_for(r"GW-GUEST: ping ok", 120, check=alive)
        assert qemu_pid(w.lv, "gwt-client") == pid
    assert sum("modules loaded" in ln for ln in console.lines()) == 1


def connect_as(user: str, path: str) -> subprocess.CompletedProcess:
    """Connect to a unix socket as `user`, as libvirt's QEMU would."""
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
            "    sys.exit(e.strerror)\nprint('connected')")
    # Debian's python3: the venv's may sit where that user cannot go
    return subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", code, path],
                          capture_output=True, text=True, timeout=30)


def test_libvirt_qemu_user_needs_the_gateway_group(world):
    """Without the group, what attach and `gateway xml` print names the fix, and
    libvirt's QEMU user really cannot connect; after 'usermod -aG gateway
    libvirt-qemu' it can and the note is gone. (The boot in the server-mode test
    runs QEMU as that user, with the group.)"""
    w = world
    out = w.d.ok("attach", "vm0", w.topo.nic, "--mac", MAC0)
    sock = str(w.dir / "run" / "vm0.sock")
    fix = f"usermod -aG gateway {QEMU_USER}"
    (note,) = [ln for ln in out.splitlines() if ln.startswith("note:")]
    assert QEMU_USER in note and sock in note and fix in note and "--client" in note
    r = connect_as(QEMU_USER, sock)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "Permission denied\n"), r
    r = w.d.cli("xml", "vm0")
    assert r.returncode == 0 and fix in r.stderr and "<interface" in r.stdout
    with qemu_user_in_gateway_group():
        r = connect_as(QEMU_USER, sock)
        assert r.stdout == "connected\n", r
        r = w.d.cli("xml", "vm0")
        assert r.returncode == 0 and r.stderr == ""
        assert json.loads(w.d.ok("list", "--json"))["devices"][0]["libvirt_note"] is None


@pytest.mark.parametrize("size", ["128", "300", "2048", "0"])
def test_queue_size_outside_256_to_1024_is_one_line(world, size):
    w = world
    w.d.ok("attach", "vm0", w.topo.nic)
    for opt in ("--rx-queue-size", "--tx-queue-size"):
        r = w.d.cli("xml", "vm0", opt, size)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr == (f"gateway: {opt} {size}: use 256, 512, 1024 "
                            "(a power of two from 256 to 1024)\n")
    out = w.d.ok("xml", "vm0", "--rx-queue-size", "1024", "--tx-queue-size", "256")
    assert "<driver rx_queue_size='1024' tx_queue_size='256'/>" in out


def test_printed_elements_exactly():
    """What operators paste: QEMU connecting gets <reconnect> (a daemon restart would
    otherwise leave the guest without link for good), QEMU listening does not; queue
    pairs and ring sizes go in <driver>; a quote in the path stays inside the attribute."""
    from gateway.libvirt_xml import MEMORY_BACKING, interface

    assert interface(mac="52:54:00:00:00:01", socket="/run/gateway/vm0.sock",
                     mode="server") == (
        "<interface type='vhostuser'>\n"
        "  <mac address='52:54:00:00:00:01'/>\n"
        "  <source type='unix' path='/run/gateway/vm0.sock' mode='client'>\n"
        "    <reconnect enabled='yes' timeout='1'/>\n"
        "  </source>\n"
        "  <model type='virtio'/>\n"
        "</interface>")
    assert interface(mac="52:54:00:00:00:01", socket="/vms/it's.sock", mode="client",
                     queues=2, rx_queue_size=1024, tx_queue_size=512) == (
        "<interface type='vhostuser'>\n"
        "  <mac address='52:54:00:00:00:01'/>\n"
        "  <source type='unix' path='/vms/it&apos;s.sock' mode='server'/>\n"
        "  <model type='virtio'/>\n"
        "  <driver queues='2' rx_queue_size='1024' tx_queue_size='512'/>\n"
        "</interface>")
    assert MEMORY_BACKING == ("<memoryBacking>\n  <source type='memfd'/>\n"
                              "  <access mode='shared'/>\n</memoryBacking>")


@pytest.mark.parametrize("world", [2], indirect=True)
def test_two_queue_pairs_and_ring_sizes_reach_qemu(world):
    """`<driver queues='2' rx_queue_size='1024' tx_queue_size='512'>` as printed:
    libvirt turns it into QEMU's multiqueue vhost-user netdev and ring sizes, and
    QEMU accepts them and connects (started paused: no guest boot needed)."""
    w = world
    w.d.ok("attach", "vm0", w.topo.nic, "--queues", "2")
    xml = w.d.ok("xml", "vm0", "--rx-queue-size", "1024", "--tx-queue-size", "512")
    assert "<driver queues='2' rx_queue_size='1024' tx_queue_size='512'/>" in xml
    image = ensure_guest()
    for f in (image.kernel, image.initrd):  # where libvirt's QEMU user may read them
        shutil.copy(f, w.dir / f.name)
    dom = libvirt.domain_xml("gwt-mq", kernel=w.dir / image.kernel.name,
                             initrd=w.dir / image.initrd.name, cmdline=image.cmdline,
                             console=w.dir / "gwt-mq.console", devices=xml,
                             memory_backing=w.d.ok("xml", "--memory-backing"))
    path = w.dir / "gwt-mq.xml"
    path.write_text(dom)
    w.lv.virsh("define", str(path))
    with qemu_user_in_gateway_group():
        w.lv.virsh("start", "gwt-mq", "--paused")
        assert w.lv.virsh("domstate", "gwt-mq").stdout.strip() == "paused"
    log = w.lv.qemu_log("gwt-mq")
    assert '"type":"vhost-user","chardev":"charnet0","queues":2' in log, log
    assert '"mq":true' in log and '"rx_queue_size":1024' in log and '"tx_queue_size":512' in log


def test_access_notes_name_each_fix(tmp_path):
    """Each way libvirt's QEMU user can be shut out gets its own fix; a socket it can
    use, or root as QEMU's user, gets none. (A file stands in for the socket: only
    its owner, group and mode count.)"""
    from gateway.libvirt_xml import access_note

    closed = tmp_path / "vm0.sock"  # pytest's base directory is root's alone (0700)
    closed.touch()
    top = next(str(p) for p in reversed(tmp_path.parents)  # the outermost one shut
               if p.stat().st_mode & 0o001 == 0)
    assert access_note(str(closed), QEMU_USER) == (
        f"libvirt runs QEMU as {QEMU_USER}, who cannot enter {top}: 'chmod o+x {top}', "
        "or put the socket elsewhere")
    assert access_note(str(closed), "root") is None
    d = Path(tempfile.mkdtemp(prefix="gwt-note-"))
    try:
        d.chmod(0o755)
        sock = d / "vm0.sock"
        sock.touch()
        sock.chmod(0o660)
        os.chown(sock, 0, 0)  # made while there was no `gateway` group
        assert access_note(str(sock), QEMU_USER) == (
            f"libvirt runs QEMU as {QEMU_USER}, who cannot connect to {sock} (group root): "
            "'groupadd --system gateway', restart the gateway daemon, then "
            f"'usermod -aG gateway {QEMU_USER}'; or attach with --client")
        os.chown(sock, 0, pwd.getpwnam(QEMU_USER).pw_gid)
        assert access_note(str(sock), QEMU_USER) is None
        assert access_note(str(d / "qemu.sock"), QEMU_USER, "client") is not None
        os.chown(d, pwd.getpwnam(QEMU_USER).pw_uid, 0)
        assert access_note(str(d / "qemu.sock"), QEMU_USER, "client") is None
    finally:
        shutil.rmtree(d)
