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
import os
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
"""

# QEMU 7.2 under TCG segfaults in vhost_net_start unless virtio-net-pci has
# vectors=0 (shared notes): the test domains set it; what operators get does not.
NO_MSIX = ("<qemu:device alias='net0'><qemu:frontend>"
           "<qemu:property name='vectors' type='unsigned' value='0'/>"
           "</qemu:frontend></qemu:device>")


@contextlib.contextmanager
def qemu_user_in_gateway_group():
    """What the README tells operators: the group, and libvirt's QEMU user in it."""
    created = subprocess.run(["getent", "group", "gateway"], capture_output=True).returncode
    if created:
        subprocess.run(["groupadd", "--system", "gateway"], check=True)
    subprocess.run(["usermod", "-aG", "gateway", QEMU_USER], check=True)
    try:
        yield
    finally:
        subprocess.run(["gpasswd", "-d", QEMU_USER, "gateway"], capture_output=True)
        if created:
            subprocess.run(["groupdel", "gateway"], capture_output=True)


@pytest.fixture
def world(tmp_path):
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
        with topology() as topo, libvirt.Libvirtd(keep_logs=tmp_path) as lv:
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
            name, kernel=kernel, initrd=initrd, cmdline=image.cmdline + " pci=nomsi",
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
    with qemu_user_in_gateway_group():
        # the sockets are made by the daemon: restart it to give them the new group
        w.restart_daemon("SIGTERM")
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
        stats = w.d.ok("stats", "vm1")
        assert " rx 0 pkts" not in stats and " tx 0 pkts" not in stats, stats
        w.lv.virsh("detach-device", "gwt-server", str(iface), "--live")
        console.wait_for(r"GW-GUEST: eth1 gone", 120, check=alive)
        assert "vm1: waiting" in w.d.ok("list")
        lines = console.lines()
        assert sum("modules loaded" in ln for ln in lines) == 1  # never rebooted
