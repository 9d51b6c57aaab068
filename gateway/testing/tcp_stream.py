"""A real Linux guest streaming TCP through the gateway, both ways: the offload
test (tests/test_qemu_offload.py) and its benchmark (benchmarks/tcp_offload.py).

The guest (busybox) makes a random blob, sends it with nc to a counter on the
far host, then downloads another blob over HTTP from there. The far end times
the upload from accept to last byte; the guest times the download with
/proc/uptime (10 ms resolution, enough for seconds-long transfers under TCG).
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import qemu
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

GUEST_MAC = "52:54:00:12:34:57"

# What `-device virtio-net-pci` needs to negotiate no offload at all.
NO_OFFLOADS = ("csum=off,gso=off,guest_csum=off,guest_tso4=off,guest_tso6=off,"
               "host_tso4=off,host_tso6=off")

SINK = """
import hashlib, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
want, got, h = int(sys.argv[2]), 0, hashlib.md5()
t0 = None
while got < want:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    h.update(b)
    got += len(b)
print(got, h.hexdigest(), time.monotonic() - (t0 or time.monotonic()), flush=True)
c.close()
"""

SCENARIO = """
dd if=/dev/urandom of=/tmp/up bs=65536 count={chunks} 2>/dev/null
echo "GW-GUEST: up md5 $(md5sum /tmp/up | cut -d' ' -f1)"
nc {far} 9000 < /tmp/up
echo "GW-GUEST: up done"
t0=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /tmp/down http://{far}:8000/blob
t1=$(cut -d' ' -f1 /proc/uptime)
echo "GW-GUEST: down md5 $(md5sum /tmp/down | cut -d' ' -f1) $t0 $t1"
"""


@dataclass
class StreamResult:
    up_bytes: int
    up_ok: bool                 # the far host got the guest's blob, md5 equal
    up_seconds: float
    down_ok: bool               # the guest got the far host's blob, md5 equal
    down_seconds: float
    stats: dict = field(default_factory=dict)   # the device's counters afterwards
    features: int = 0

    @property
    def up_mbit(self) -> float:
        return self.up_bytes * 8 / self.up_seconds / 1e6 if self.up_seconds else 0.0

    @property
    def down_mbit(self) -> float:
        return self.up_bytes * 8 / self.down_seconds / 1e6 if self.down_seconds else 0.0


def run_stream(workdir: Path, *, mbytes: int = 8, device_opts: str = "",
               timeout: float = 240) -> StreamResult:
    """One guest, `mbytes` MiB each way; device_opts go to its virtio-net-pci."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    size = mbytes << 20
    blob = os.urandom(size)
    (workdir / "blob").write_bytes(blob)
    with topology() as topo:
        ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
        http = topo.popen(sys.executable, "-m", "http.server", "8000", "--bind", topo.peer_ip,
                          cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sink = topo.popen(sys.executable, "-c", SINK, topo.peer_ip, str(size),
                          stdout=subprocess.PIPE, text=True)
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "vm0", GUEST_MAC)
        try:
            assert sink.stdout.readline().strip() == "ready"
            dev = Registry().create("vm0", port, max_mtu=port.max_mtu)
            path = str(workdir / "vm0.sock")
            service.listen(dev, path)
            script = net_up(ip) + SCENARIO.format(far=topo.peer_ip, chunks=size >> 16)
            initrd = make_initrd(ensure_guest(), script, workdir / "initrd")
            nics = [qemu.VhostUserNic(socket=path, mac=GUEST_MAC, device_opts=device_opts)]
            with qemu.QemuGuest(ensure_guest().kernel, initrd, nics=nics,
                                log_path=workdir / "console.log") as vm:
                up_md5 = vm.wait_for(r"GW-GUEST: up md5 (\w+)", timeout).group(1)
                vm.wait_for(r"GW-GUEST: up done", timeout)
                if not select.select([sink.stdout], [], [], 60)[0]:
                    raise TimeoutError("the far host's sink never finished")
                got, far_md5, secs = sink.stdout.readline().split()
                m = vm.wait_for(r"GW-GUEST: down md5 (\w+) ([\d.]+) ([\d.]+)", timeout)
                vm.wait_for(r"GW-GUEST: scenario exit 0", 30)
                features = dev.negotiated_features
            return StreamResult(
                up_bytes=int(got), up_ok=int(got) == size and far_md5 == up_md5,
                up_seconds=float(secs),
                down_ok=m.group(1) == hashlib.md5(blob).hexdigest(),
                down_seconds=float(m.group(3)) - float(m.group(2)),
                stats=dev.stats(), features=features)
        finally:
            service.stop()
            port.close()
            nic.close()
            for p in (http, sink):
                p.kill()
                p.wait()
