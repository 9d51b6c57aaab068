"""Tests of the test infrastructure itself: guest image, QEMU runner, testpmd parsing."""

from __future__ import annotations

import subprocess
import time

import pytest

from gateway.testing import guest as guest_mod
from gateway.testing.guest import MARK_EXIT_RE, MARK_MODULES, CpioWriter, make_initrd
from gateway.testing.qemu import (
    QemuError,
    QemuGuest,
    VhostUserNic,
    classify_line,
    clean_line,
    qemu_available,
)
from gateway.testing.testpmd import (
    Testpmd,
    parse_counters,
    parse_forward_stats,
    parse_link_status,
    testpmd_available,
)

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def image():
    try:
        return guest_mod.ensure_guest()
    except guest_mod.GuestBuildError as e:
        pytest.skip(f"guest image unavailable: {e}")


# ------------------------------------------------------------------ pure units


def test_cpio_newc_roundtrip(tmp_path):
    w = CpioWriter()
    w.dir("a")
    w.file("a/b.txt", b"hello", 0o644)
    w.symlink("a/c", "b.txt")
    data = w.finish()
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    archive = tmp_path / "x.cpio"
    archive.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    busybox = guest_mod.BUSYBOX
    if not busybox.exists():
        pytest.skip("busybox not installed")
    with open(archive, "rb") as f:
        subprocess.run([str(busybox), "cpio", "-id"], stdin=f, cwd=out, check=True)
    assert (out / "a/b.txt").read_bytes() == b"hello"
    assert (out / "a/c").readlink().as_posix() == "b.txt"


def test_classify_line():
    assert (
        classify_line(
            "qemu-system-x86_64: Failed initializing vhost-user memory map, "
            "consider using -object memory-backend-file share=on"
        )
        == "vhost-user memory map"
    )
    assert classify_line("[    1.2] Kernel panic - not syncing: VFS") == "kernel panic"
    assert classify_line("GW-GUEST: modules loaded") is None
    assert classify_line("") is None


def test_clean_line():
    raw = "\x1bc\x1b[?7l\x1b[2JGW-GUEST: modules loaded\r"
    assert clean_line(raw) == "GW-GUEST: modules loaded"


def test_wait_for_raises_on_memory_map_failure(tmp_path):
    """Feed the console reader a fake QEMU through a real pipe: wait_for must fail fast."""
    vm = QemuGuest(tmp_path / "k", tmp_path / "i", binary="sh")
    vm.command = lambda: [  # type: ignore[method-assign]
        "sh", "-c",
        "echo booting; echo 'qemu-system-x86_64: Failed initializing vhost-user memory map, "
        "consider using -object memory-backend-file share=on'; sleep 30",
    ]  # fmt: skip
    t0 = time.monotonic()
    with vm:
        with pytest.raises(QemuError, match="memory map"):
            vm.wait_for("never printed", timeout=20)
    assert time.monotonic() - t0 < 10
    assert vm.proc is not None and vm.proc.returncode is not None


def test_wait_for_raises_when_process_exits(tmp_path):
    vm = QemuGuest(tmp_path / "k", tmp_path / "i")
    vm.command = lambda: ["sh", "-c", "printf 'one\\r\\ntwo\\n'; exit 3"]  # type: ignore[method-assign]
    with vm:
        assert vm.wait_for("^one$", timeout=10)
        with pytest.raises(QemuError, match=r"rc=3") as ei:
            vm.wait_for("three", timeout=10)
        assert "two" in str(ei.value)


def test_qemu_command_line(tmp_path):
    from gateway.testing.qemu import VhostUserNic

    vm = QemuGuest(
        tmp_path / "k",
        tmp_path / "i",
        nics=[
            VhostUserNic(tmp_path / "a.sock", server=True),
            VhostUserNic(tmp_path / "b.sock", queues=2, mac="52:54:00:00:00:02"),
        ],
    )
    cmd = " ".join(vm.command())
    assert f"socket,id=c0,path={tmp_path}/a.sock,server=on,wait=off" in cmd
    assert f"socket,id=c1,path={tmp_path}/b.sock,reconnect=1" in cmd
    assert "vhost-user,id=n1,chardev=c1,queues=2" in cmd
    assert "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02,vectors=0,mq=on" in cmd
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in cmd


def test_testpmd_parsers():
    stop_out = """
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 5              RX-dropped: 0             RX-total: 5
  TX-packets: 100            TX-dropped: 7             TX-total: 107
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 5              RX-dropped: 0             RX-total: 5
  TX-packets: 100            TX-dropped: 7             TX-total: 107
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""
    fwd = parse_forward_stats(stop_out)
    assert fwd["TX-packets"] == 100 and fwd["TX-dropped"] == 7 and fwd["RX-packets"] == 5
    stats = parse_counters(
        "  RX-packets: 3          RX-missed: 0          RX-bytes:  180\n"
        "  TX-packets: 9          TX-errors: 0          TX-bytes:  540\n"
        "  Rx-pps:            0          Rx-bps:            0\n"
    )
    assert stats["RX-bytes"] == 180 and stats["TX-packets"] == 9 and stats["Rx-pps"] == 0
    assert parse_link_status("MAC address: x\nLink status: up\nLink speed: 10 Gbps") is True
    assert parse_link_status("Link status: down\n") is False


# ------------------------------------------------------------------ guest image


def test_make_initrd_differs_per_script(image, tmp_path):
    a = make_initrd(image, "echo A\n", tmp_path / "a.cpio")
    b = make_initrd(image, "echo B\n", tmp_path / "b.cpio")
    a2 = make_initrd(image, "echo A\n", tmp_path / "a2.cpio")
    base = image.initrd.read_bytes()
    assert a.read_bytes().startswith(base) and b.read_bytes().startswith(base)
    assert a.read_bytes() != b.read_bytes()
    assert a.read_bytes() == a2.read_bytes()


def test_ensure_guest_is_cached(image):
    t0 = time.monotonic()
    again = guest_mod.ensure_guest(image.kernel.parent.parent)
    assert again == image
    assert time.monotonic() - t0 < 5
    assert not list(image.kernel.parent.parent.glob(".build-*"))


@pytest.mark.qemu
@needs_qemu
def test_guest_boots_and_runs_scenario(image, tmp_path):
    script = 'echo "MARKER-$((6 * 7))"\nls /sys/bus/virtio/drivers\n'
    initrd = make_initrd(image, script, tmp_path / "initrd.cpio")
    with QemuGuest(image.kernel, initrd, append=image.cmdline) as vm:
        vm.wait_for(MARK_MODULES, timeout=60)
        vm.wait_for(r"^MARKER-42$", timeout=30)
        vm.wait_for(r"^virtio_net$", timeout=30)
        m = vm.wait_for(MARK_EXIT_RE, timeout=30)
        assert m.group(1) == "0"
        assert vm.wait_exit(timeout=30) == 0
    assert not any("insmod" in line and "failed" in line for line in vm.lines)


# ------------------------------------------------------------------ DPDK testpmd

needs_testpmd = pytest.mark.skipif(not testpmd_available(), reason="dpdk-testpmd not installed")


@pytest.mark.dpdk
@needs_testpmd
def test_testpmd_pair_moves_packets(tmp_path):
    """A testpmd vhost backend (net_vhost) fed by a testpmd virtio-user frontend."""
    sock = tmp_path / "vu.sock"
    with Testpmd(vdev=f"net_vhost0,iface={sock},queues=1", lcores="0@0,1@1") as back:
        with Testpmd(sock, mrg_rxbuf=False, args=["--forward-mode=txonly", "--txpkts=64"]) as tp:
            tp.wait_link_up(timeout=20)
            back.wait_link_up(timeout=20)
            back.cmd("set fwd rxonly")
            back.start()
            tp.start()
            time.sleep(0.5)  # traffic for half a second
            fwd = tp.stop()
            # frames still in the ring reach the back-end after tp stops; its
            # counters live in another process and can only be polled
            deadline = time.monotonic() + 10
            while (rx := back.port_stats(0))["RX-packets"] < fwd["TX-packets"]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            back.stop()
            assert fwd["TX-packets"] > 0
            assert tp.port_stats(0)["TX-packets"] == fwd["TX-packets"]
            assert rx["RX-packets"] == fwd["TX-packets"]
            assert rx["RX-bytes"] == 64 * fwd["TX-packets"]
            assert tp.quit() == 0
            assert "Bye" in tp.output
    assert back.proc is not None and back.proc.returncode is not None


@pytest.mark.qemu
@pytest.mark.dpdk
@needs_qemu
@needs_testpmd
def test_guest_nic_over_vhost_user(image, tmp_path):
    """QemuGuest's vhost-user NIC against testpmd's vhost backend: the guest's ARPs arrive."""
    sock = tmp_path / "vu.sock"
    script = (
        "ip link set eth0 up\n"
        "ip addr add 10.99.0.2/24 dev eth0\n"
        "ping -c 3 -W 1 10.99.0.1\n"
        'echo "TXPKTS $(cat /sys/class/net/eth0/statistics/tx_packets)"\n'
    )
    initrd = make_initrd(image, script, tmp_path / "initrd.cpio")
    with Testpmd(vdev=f"net_vhost0,iface={sock},queues=1", args=["--forward-mode=rxonly"]) as back:
        back.start()
        nic = VhostUserNic(sock, server=False, mac="52:54:00:aa:bb:01")
        with QemuGuest(image.kernel, initrd, nics=[nic], append=image.cmdline) as vm:
            vm.wait_for(MARK_MODULES, timeout=60)
            tx = int(vm.wait_for(r"^TXPKTS (\d+)$", timeout=60).group(1))
            vm.wait_for(MARK_EXIT_RE, timeout=30)
            vm.wait_exit(timeout=30)
        assert back.link_up(0) is False  # QEMU is gone
        back.stop()
        stats = back.port_stats(0)
    assert tx >= 3
    assert stats["RX-packets"] >= 3
