"""`gateway demo`: the whole product on a built-in default, no NIC or VM needed.

1. a veth pair plays the NIC; its peer is a far host in its own namespace,
   with an IP address and a small HTTP server;
2. a gateway daemon starts (temporary run and state directories) and a
   device is attached to the NIC;
3. a real Linux guest boots in QEMU on the device's socket;
4. the guest pings the far host and downloads a file from it;
5. `gateway stats` shows what crossed;
6. everything is undone, on Ctrl-C too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

from gateway.control import request
from gateway.testing import qemu
from gateway.testing.daemon import Daemon
from gateway.testing.guest import default_cache_dir, ensure_guest, make_initrd, net_up
from gateway.testing.netns import topology

GUEST_MAC = "52:54:00:de:00:01"
FILE_SIZE = 1 << 20

SCENARIO = """
echo "GW-GUEST: ip {ip}, pinging the far host {far}"
ping -c 3 {far} | sed 's/^/GW-GUEST:   /'
echo "GW-GUEST: fetching http://{far}:8000/demo.bin"
echo "GW-GUEST: md5 $(wget -q -O - http://{far}:8000/demo.bin | md5sum | cut -d' ' -f1)"
"""


class DemoFailed(Exception):
    pass


def run_demo(wait: bool = True, say: Callable[[str], None] = print) -> dict:
    if os.geteuid() != 0:
        raise DemoFailed("the demo creates namespaces and attaches XDP: run it as root")
    if not qemu.qemu_available():
        raise DemoFailed("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    tmp = tempfile.mkdtemp(prefix="gateway-demo-")
    blob = os.urandom(FILE_SIZE)
    with open(os.path.join(tmp, "demo.bin"), "wb") as f:
        f.write(blob)
    server = daemon = None
    try:
        say("1. creating the far host (a network namespace) and a veth pair as the NIC")
        with topology() as topo:
            ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
            say(f"   NIC {topo.nic}; far host {topo.peer_ip} in namespace {topo.ns}, "
                "serving demo.bin over HTTP")
            server = topo.popen(sys.executable, "-m", "http.server", "8000", "--bind",
                                topo.peer_ip, cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

            say("2. starting the gateway daemon and attaching vm0 "
                "(compiles the XDP program: ~1 s)")
            daemon = Daemon(os.path.join(tmp, "run"), os.path.join(tmp, "state")).start()
            dev = request(daemon.run_dir, "attach", name="vm0", iface=topo.nic, mac=GUEST_MAC,
                          mode="server", socket="", queues=1, mtu=1500)
            say(f"   vm0: {dev['mac']} on {dev['iface']}, socket {dev['socket']}, "
                f"XDP {dev['xdp_mode']}, AF_XDP {dev['bind_mode']}")

            if not any(default_cache_dir().glob("guest-*")):
                say("3. fetching a guest kernel (Debian linux-image, ~70 MB, cached after)")
            image = ensure_guest()
            initrd = make_initrd(image, net_up(ip) + SCENARIO.format(ip=ip, far=topo.peer_ip),
                                 os.path.join(tmp, "initrd"))
            say("3. booting a Linux guest in QEMU on vm0's socket (TCG: ~10 s)")
            nic = qemu.VhostUserNic(socket=dev["socket"], mac=GUEST_MAC)
            with qemu.QemuGuest(image.kernel, initrd, nics=[nic]) as vm:
                say("4. the guest, on the wire through the gateway:")
                say("   " + vm.wait_for(r"GW-GUEST: ip", 120).string)
                m = None
                while m is None:
                    line = vm.wait_for(r"GW-GUEST: ", 120).string
                    say("   " + line)
                    if "md5 " in line:
                        m = line.split("md5 ")[1].strip()
                vm.wait_for(r"GW-GUEST: scenario exit", 30)
            if m != hashlib.md5(blob).hexdigest():
                raise DemoFailed("the file the guest fetched is not the one served")
            say("   the guest's copy of demo.bin matches the far host's (md5)")

            say("5. gateway stats:")
            stats = request(daemon.run_dir, "stats")
            for name, c in stats["devices"].items():
                drops = " ".join(f"{k}={v}" for k, v in c["drops"].items() if v) or "none"
                say(f"   {name}: rx {c['rx_packets']} pkts {c['rx_bytes']} B, "
                    f"tx {c['tx_packets']} pkts {c['tx_bytes']} B, drops: {drops}")
            if wait:
                say("press Ctrl-C to clean up and stop")
                _wait_for_ctrl_c()
            say("6. cleaning up: daemon stopped (XDP program, MAC filter, sockets undone), "
                "namespace and veth removed")
            return stats
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.stop()
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_ctrl_c() -> None:
    done = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        done.wait()
    finally:
        signal.signal(signal.SIGINT, old)
