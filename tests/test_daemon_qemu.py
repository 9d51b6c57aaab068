"""A QEMU guest in client mode keeps its network across a daemon restart."""

from __future__ import annotations

import pytest

from gateway.testing import qemu
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.xdp import link

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
]

GUEST_MAC = "52:54:00:12:34:77"
SCENARIO = """
n=0
while [ $n -lt 400 ]; do
    if ping -c 1 -W 1 {far} >/dev/null 2>&1; then echo "GW-GUEST: ping ok $n"
    else echo "GW-GUEST: ping lost $n"; fi
    n=$((n+1))
done
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_guest_keeps_pinging_across_a_daemon_restart(env, tmp_path, how):
    """SIGTERM undoes the kernel state; after SIGKILL the next daemon finds the
    crashed one's XDP program and MAC filter and replaces them. Either way it
    restores vm0 from its state file and the guest's ping loop carries on."""
    topo, d = env
    ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
    sock = str(tmp_path / "vm0-qemu.sock")
    image = ensure_guest()
    script = net_up(ip) + SCENARIO.format(ip=ip, far=topo.peer_ip)
    initrd = make_initrd(image, script, tmp_path / "initrd")
    nic = qemu.VhostUserNic(socket=sock, mac=GUEST_MAC, server=True)  # QEMU listens
    with qemu.QemuGuest(image.kernel, initrd, nics=[nic],
                        log_path=tmp_path / "console.log") as vm:
        d.ok("attach", "vm0", topo.nic, "--mac", GUEST_MAC, "--client", sock)
        for _ in range(3):
            vm.wait_for(r"GW-GUEST: ping ok", 120)
        if how == "SIGTERM":
            assert d.stop() == 0  # the guest's network is gone for now
        else:
            d.proc.kill()
            d.proc.wait()
            assert link.xdp_state(topo.nic)[0] is not None  # left behind by the crash
        d.start()  # restores vm0 and dials QEMU again
        assert link.fdb_entries(topo.nic) == [GUEST_MAC]  # one filter, not a stale one too
        for _ in range(3):  # the same guest, no reboot: its ping loop carries on
            vm.wait_for(r"GW-GUEST: ping ok", 120)
        vm.check()
    assert "modules loaded" in vm.output() and vm.output().count("modules loaded") == 1
