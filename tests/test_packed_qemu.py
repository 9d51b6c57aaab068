"""A real Linux guest (QEMU 7.2, TCG) with packed virtqueues (virtio-net-pci
packed=on) on the wire through the gateway: ping, a TCP download checked by
md5, then a driver reload (every ring stopped with GET_VRING_BASE, whose wrap
counter must come back right, and set up anew) and ping again."""

from __future__ import annotations

import hashlib

import pytest
from test_qemu_wire import BLOB_SIZE, blob_server, guest_on

from gateway.testing import qemu
from gateway.testing.guest import net_up
from gateway.testing.netns import topology
from gateway.testing.tcp_stream import run_stream
from gateway.virtio.features import Net

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
]

GUEST_MAC = "52:54:00:12:34:5a"

SCENARIO = """
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok"
echo "GW-GUEST: md5 $(wget -q -O - http://{far}:8000/blob | md5sum | cut -d' ' -f1)"
rmmod virtio_net && insmod /lib/modules/virtio_net.ko && echo "GW-GUEST: driver reloaded"
{net_up}
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok again"
"""


def test_packed_linux_guest_pings_downloads_and_survives_a_reset(tmp_path):
    with topology() as topo, blob_server(topo, tmp_path) as blob:
        ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
        script = SCENARIO.format(far=topo.peer_ip, net_up=net_up(ip))
        with guest_on(topo, tmp_path, script, GUEST_MAC, "packed=on") as (dev, service, vm):
            vm.wait_for(r"GW-GUEST: ping ok", 120)
            assert dev.negotiated_features >> Net.RING_PACKED & 1
            m = vm.wait_for(r"GW-GUEST: md5 (\w+)", 120)
            vm.wait_for(r"GW-GUEST: driver reloaded", 60)
            vm.wait_for(r"GW-GUEST: ping ok again", 60)
            vm.wait_for(r"GW-GUEST: scenario exit 0", 30)
            assert service.endpoints["vm0"].connections == 1  # one session throughout
        assert m.group(1) == hashlib.md5(blob).hexdigest()
        assert dev.stats()["rx_bytes"] > BLOB_SIZE
        assert dev.broken_reason is None


def test_packed_guest_tcp_with_offloads_both_ways(tmp_path):
    """The offloads ride the same burst loop: the guest's TSO frames (header
    captured, one per burst in `big`) are cut up, its downloads verified."""
    r = run_stream(tmp_path, mbytes=8, device_opts="packed=on")
    assert r.features >> Net.RING_PACKED & 1 and r.features >> Net.HOST_TSO4 & 1
    assert r.up_ok and r.up_bytes == 8 << 20
    assert r.down_ok
    off, drops = r.stats["offload"], r.stats["drops"]
    assert off["tx_gso"] > 0 and off["tx_gso_segs"] >= 2 * off["tx_gso"]
    assert off["rx_csum_valid"] > (8 << 20) // 1448 // 2
    assert drops["tx_bad_gso"] == drops["tx_bad_csum"] == drops["tx_too_big"] == 0
    assert r.stats["broken_total"] == 0


def test_packed_guest_big_receive_chains_without_mrg_rxbuf(tmp_path):
    """GUEST_TSO without MRG_RXBUF: Linux posts 64 KiB receive chains (many
    descriptors each, across the ring's wrap)."""
    r = run_stream(tmp_path, mbytes=4, device_opts="packed=on,mrg_rxbuf=off")
    assert r.features >> Net.RING_PACKED & 1 and not r.features >> Net.MRG_RXBUF & 1
    assert r.down_ok and r.up_ok
    assert r.stats["drops"]["rx_too_big"] == 0
