"""One owner per state directory and per NIC (issue 12, finding 3).

A second daemon, or a second library user, must not take a live gateway's NIC
for a crash leftover: it is refused with one line and changes nothing (the
XDP program, the MAC filter and the traffic of the first stay as they were).
Only once the owner is dead (SIGKILL: its flocks die with it) does the next
one clean up after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.xdp import link
from gateway.xdp.nic import Nic, NicInUse, lock_path
from gateway.xdp.program import prog_info

N = 20


def send(fe: Frontend, topo, mac: str, n: int, tag: int) -> None:
    """n frames from the guest to the far host (ethertype 0x88b5, local experimental)."""
    frames = [bytes.fromhex(topo.peer_mac.replace(":", "")) + bytes.fromhex(mac.replace(":", ""))
              + b"\x88\xb5" + bytes([tag, i]) * 25 for i in range(n)]
    fe.transmit(frames)
    fe.wait_tx_done(n)


def wire_count(topo, want: int) -> int:
    """The far host's rx_packets once it reaches `want` (or the deadline)."""
    deadline = time.monotonic() + TIMEOUT
    while (n := topo.peer_stats()["rx_packets"]) < want and time.monotonic() < deadline:
        time.sleep(0.01)  # a kernel counter: nothing to wait on
    return n


def daemon_cmd(run_dir: str, state_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "daemon", "--run-dir", run_dir,
                           "--state-dir", state_dir], capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_a_second_owner_is_refused_and_the_next_after_a_crash_cleans_up(tmp_path):
    with topology() as topo:
        a = Daemon(str(tmp_path / "a-run"), str(tmp_path / "a-state")).start()
        b = None
        try:
            dev = json.loads(a.ok("attach", "vm0", topo.nic, "--json"))
            mac = dev["mac"]
            prog, _ = link.xdp_state(topo.nic)
            assert prog is not None and link.fdb_entries(topo.nic) == [mac]
            with Frontend(dev["socket"]) as fe:
                fe.connect().setup()
                base = topo.peer_stats()["rx_packets"]
                send(fe, topo, mac, N, 1)
                assert wire_count(topo, base + N) == base + N

                # the same command run twice: same run and state directories
                r = daemon_cmd(a.run_dir, a.state_dir)
                assert r.returncode == 2, r.stderr
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1 and f"pid {a.proc.pid}" in lines[0], r.stderr
                assert a.state_dir in lines[0]
                assert json.loads(a.ok("list", "--json"))["devices"][0]["name"] == "vm0"
                assert os.path.exists(dev["socket"])  # its vhost socket is still A's

                # another state directory, the same NIC
                b = Daemon(str(tmp_path / "b-run"), str(tmp_path / "b-state")).start()
                r = b.cli("attach", "vm1", topo.nic)
                assert r.returncode == 2, r.stderr
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1, r.stderr
                assert (f"{topo.nic} is driven by another gateway process (pid {a.proc.pid}); "
                        "not touching it") in lines[0]
                assert json.loads(b.ok("list", "--json"))["devices"] == []
                assert b.stop() == 0
                b = None

                # a library user in this process
                with pytest.raises(NicInUse, match=f"pid {a.proc.pid}"):
                    Nic(topo.nic)

                assert link.xdp_state(topo.nic)[0] == prog
                assert link.fdb_entries(topo.nic) == [mac]
                send(fe, topo, mac, N, 2)  # A's guest still reaches the wire, every frame
                assert wire_count(topo, base + 2 * N) == base + 2 * N
                assert json.loads(a.ok("stats", "--json"))["devices"]["vm0"]["tx_packets"] \
                    == 2 * N

            # A dies without undoing anything: its program and MAC filter stay behind
            a.proc.kill()
            a.proc.wait(TIMEOUT)
            a.proc.stderr.close()
            assert link.xdp_state(topo.nic)[0] == prog
            assert link.fdb_entries(topo.nic) == [mac]

            a = Daemon(a.run_dir, a.state_dir).start()  # A's successor
            assert f"cleaned up MAC filter {mac} left by a previous run" in "".join(a.log)
            new, _ = link.xdp_state(topo.nic)
            assert new is not None and new != prog and prog_info(prog) is None
            assert link.fdb_entries(topo.nic) == [mac]  # the restored device's own
            with Frontend(dev["socket"]) as fe:
                fe.connect().setup()
                base = topo.peer_stats()["rx_packets"]
                send(fe, topo, mac, N, 3)
                assert wire_count(topo, base + N) == base + N
            assert a.stop() == 0
            assert link.xdp_state(topo.nic)[0] is None and link.fdb_entries(topo.nic) == []
            assert not os.path.exists(lock_path(topo.nic))
            assert not os.path.exists(os.path.join(a.state_dir, "daemon.lock"))
        finally:
            for d in (a, b):
                if d is not None and d.proc.poll() is None:
                    d.stop()


def test_a_second_nic_in_one_process_is_refused_until_the_first_closes():
    with topology() as topo:
        first = Nic(topo.nic)
        try:
            prog = link.xdp_state(topo.nic)[0]
            with pytest.raises(NicInUse, match="another Nic in this process"):
                Nic(topo.nic)
            assert link.xdp_state(topo.nic)[0] == prog and first.program.replaced is None
        finally:
            first.close()
        assert not os.path.exists(lock_path(topo.nic))
        second = Nic(topo.nic)  # released by close(): the next one gets it
        try:
            assert second.program.replaced is None  # nothing was left to clean up
        finally:
            second.close()
        assert link.xdp_state(topo.nic)[0] is None


def test_a_nic_that_fails_half_way_releases_its_lock(monkeypatch):
    """Nic() failing after it took the lock (here: its flood tap) undoes what it
    did and lets go of the NIC, so the next attempt is not refused."""
    import gateway.xdp.nic as nic_mod

    def no_tap(*_):
        raise OSError("no flood tap today")

    with topology() as topo:
        with monkeypatch.context() as m:
            m.setattr(nic_mod, "FloodTap", no_tap)
            with pytest.raises(OSError, match="no flood tap today"):
                Nic(topo.nic)
        assert not os.path.exists(lock_path(topo.nic))
        assert link.xdp_state(topo.nic)[0] is None
        nic = Nic(topo.nic)
        nic.close()


PROMISC_CRASHER = """
import errno, os, sys
from pyroute2.netlink.exceptions import NetlinkError
from gateway.datapath.xdp_port import XdpPort
from gateway.xdp import link
from gateway.xdp.nic import Nic

def no_fdb(ipr, command, index, mac):  # a NIC without unicast filter entries
    raise NetlinkError(errno.EOPNOTSUPP, "Operation not supported")

link._fdb = no_fdb
nic = Nic(sys.argv[1])
XdpPort(nic, "vm0", sys.argv[2])
print("attached", os.getpid(), flush=True)
os._exit(0)  # a crash: nothing undone
"""


def _promisc(ifname: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (msg,) = ipr.get_links(ifname=ifname)
        return bool(msg["flags"] & 0x100)  # IFF_PROMISC


def test_promiscuous_mode_left_on_by_a_crash_is_switched_off_by_the_next_owner():
    with topology() as topo:
        assert not _promisc(topo.nic)
        out = subprocess.run([sys.executable, "-c", PROMISC_CRASHER, topo.nic,
                              "52:54:00:12:34:77"], capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert "attached" in out.stdout, out.stderr
        assert _promisc(topo.nic)  # the dead owner's fallback, still on
        with open(lock_path(topo.nic)) as f:  # what it left for the next owner
            assert f.read() == f"{out.stdout.split()[-1]}\npromisc\n"
        nic = Nic(topo.nic)
        try:
            assert not _promisc(topo.nic)
            assert nic.program.replaced is not None
        finally:
            nic.close()
        assert not _promisc(topo.nic) and link.xdp_state(topo.nic)[0] is None
