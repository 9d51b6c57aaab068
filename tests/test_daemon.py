"""The operator's commands through the real daemon and its control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gateway.api import GatewayError
from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.frontend import Frontend
from gateway.xdp import link


def test_attach_list_stats_detach(env, tmp_path):
    topo, d = env
    out = d.ok("attach", "vm0", topo.nic)
    assert "memory-backend-memfd" in out and "share=on" in out
    assert "<interface type='vhostuser'>" in out and "<memoryBacking>" in out
    dev = json.loads(d.ok("list", "--json"))["devices"][0]
    assert dev["name"] == "vm0" and dev["iface"] == topo.nic and dev["state"] == "waiting"
    assert f"mac={dev['mac']}" in out
    assert dev["socket"] == os.path.join(d.run_dir, "vm0.sock") and dev["mode"] == "server"
    assert dev["bind_mode"] == "copy" and dev["xdp_mode"] in ("native", "generic")
    assert int(dev["mac"].split(":")[0], 16) & 2  # locally administered
    with Frontend(dev["socket"]) as fe:  # a guest sends 10 frames to the far host
        fe.connect().setup()
        frames = [bytes.fromhex(topo.peer_mac.replace(":", "")) + bytes.fromhex(
            dev["mac"].replace(":", "")) + b"\x88\xb5" + bytes([i]) * 50 for i in range(10)]
        fe.transmit(frames)
        fe.wait_tx_done(10)
        listed = d.ok("list")
        assert "vm0: running" in listed and "VERSION_1" in listed
        stats = json.loads(d.ok("stats", "--json"))
    c = stats["devices"]["vm0"]
    assert set(c) == {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "broken_total", "drops",
                      "offload", "log_miss"}
    assert all(isinstance(v, int) for k, v in c.items() if k not in ("drops", "offload"))
    assert c["offload"] == {"tx_csum": 0, "tx_gso": 0, "tx_gso_segs": 0, "rx_csum_valid": 0}
    assert all(isinstance(v, int) for v in c["drops"].values())
    assert c["tx_packets"] == 10 and c["tx_bytes"] == 10 * 64
    # the metrics endpoint says the same
    body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=TIMEOUT).read()
    text = body.decode()
    assert 'gateway_tx_packets_total{device="vm0"} 10.0' in text
    assert 'gateway_drops_total{device="vm0",reason="xdp_stopped"}' in text
    assert 'gateway_device_broken_total{device="vm0"} 0.0' in text
    d.ok("detach", "vm0")
    assert json.loads(d.ok("list", "--json"))["devices"] == []
    assert link.xdp_state(topo.nic)[0] is None
    assert link.fdb_entries(topo.nic) == []
    assert not os.path.exists(dev["socket"])


@pytest.mark.parametrize(
    "args, why",
    [
        (["attach", "vm0", "gwtnosuchnic"], "gwtnosuchnic"),
        (["attach", "bad name!", "{nic}"], "bad name"),
        (["attach", "vm0", "{nic}", "--mac", "zz:zz"], "bad MAC"),
        (["attach", "vm0", "{nic}", "--mac", "01:00:5e:00:00:01"], "multicast"),
        (["attach", "vm0", "{nic}", "--queues", "4"], "queue"),
        (["attach", "vm0", "{nic}", "--queues", "0"], "queue"),
        (["attach", "vm0", "{nic}", "--mtu", "9000"], "MTU"),
        (["attach", "vm0", "{nic}", "--socket", "/nonexistent/dir/x.sock"], "does not exist"),
        (["attach", "vm0", "{nic}", "--socket", "{taken}"], "in use"),
        (["attach", "vm0", "{nic}", "--socket", "a", "--client", "b"], "not both"),
        (["attach", "vm1", "{nic}", "--migrate-from", "vm0"],
         "--migrate-from vm0: no such attached device"),
        (["detach", "nosuch"], "no device"),
        (["stats", "nosuch"], "no device"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_refusals_are_one_line_exit_2_and_change_nothing(env, tmp_path, args, why):
    topo, d = env
    taken = socket.socket(socket.AF_UNIX)
    taken.bind(str(tmp_path / "taken.sock"))
    taken.listen(1)
    try:
        args = [a.format(nic=topo.nic, taken=tmp_path / "taken.sock") for a in args]
        r = d.cli(*args)
    finally:
        taken.close()
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and why in r.stderr
    assert json.loads(d.ok("list", "--json"))["devices"] == []
    assert link.xdp_state(topo.nic)[0] is None and link.fdb_entries(topo.nic) == []


def test_name_and_mac_in_use(env):
    topo, d = env
    d.ok("attach", "vm0", topo.nic, "--mac", "52:54:00:00:00:01")
    r = d.cli("attach", "vm0", topo.nic)
    assert r.returncode == 2 and "already attached" in r.stderr
    r = d.cli("attach", "vm1", topo.nic, "--mac", "52:54:00:00:00:01")
    assert r.returncode == 2 and "already used by vm0" in r.stderr
    assert len(json.loads(d.ok("list", "--json"))["devices"]) == 1


def test_attach_migrate_from(env):
    topo, d = env
    d.ok("attach", "vm0", topo.nic, "--mac", "52:54:00:00:00:01")
    dst = json.loads(d.ok("attach", "vm0-new", topo.nic, "--migrate-from", "vm0", "--json"))
    assert dst["mac"] == "52:54:00:00:00:01" and dst["migrate_from"] == "vm0"
    r = d.cli("attach", "vm2", topo.nic, "--migrate-from", "vm0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--migrate-from vm0: it is already paired with vm0-new" in r.stderr
    listed = d.ok("list")  # nothing ran yet: the source keeps the MAC
    assert "live migration with vm0-new: MAC steered here" in listed
    assert "live migration with vm0: MAC steered to vm0" in listed
    d.ok("detach", "vm0")  # the migration done: the MAC stays with the destination
    assert "52:54:00:00:00:01" in link.fdb_entries(topo.nic)
    [left] = json.loads(d.ok("list", "--json"))["devices"]
    assert left["name"] == "vm0-new" and left["migrate_from"] == ""


def test_daemon_not_running_gets_a_hint(tmp_path):
    d = Daemon(str(tmp_path / "run"), str(tmp_path / "state"))
    r = d.cli("list")
    assert r.returncode == 2 and "gateway daemon" in r.stderr and r.stderr.count("\n") == 1


def test_restart_restores_attachments_and_sigterm_undoes_kernel_state(env):
    topo, d = env
    d.ok("attach", "vm0", topo.nic)
    assert link.xdp_state(topo.nic)[0] is not None
    assert d.stop() == 0
    assert link.xdp_state(topo.nic)[0] is None  # SIGTERM undid it all
    assert link.fdb_entries(topo.nic) == []
    d.start()
    devs = json.loads(d.ok("list", "--json"))["devices"]
    assert [x["name"] for x in devs] == ["vm0"]
    assert link.xdp_state(topo.nic)[0] is not None


def test_stats_watch_shows_a_live_table(env):
    topo, d = env
    d.ok("attach", "vm0", topo.nic)
    p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "stats", "--watch",
                          "--interval", "0.2", "--run-dir", d.run_dir],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"},
                         # a shell's background job ignores SIGINT, and children inherit it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = ""
        for line in p.stdout:  # rich redraws; the table shows up within a refresh
            seen += line
            if "vm0" in seen and "pkt/s" in seen:
                break
        p.send_signal(signal.SIGINT)
        assert p.wait(TIMEOUT) == 0
    finally:
        p.kill()
    assert "vm0" in seen


def test_malformed_control_requests_are_refused(env):
    from gateway.control import request

    topo, d = env
    for args in ({"name": "vm0", "iface": topo.nic, "mac": "", "queues": "2"},
                 {"name": "vm0", "iface": topo.nic, "mac": "", "bogus": 1}):
        with pytest.raises(GatewayError):
            request(d.run_dir, "attach", **args)
    with pytest.raises(GatewayError, match="unknown command"):
        request(d.run_dir, "reboot")
    for raw, why in ((b"{not json\n", "bad request: Expecting"),
                     (b"[1, 2]\n", "bad request: not an object"),
                     (b"x" * (200 * 1024) + b"\n", "bad request: over 65536 bytes")):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(os.path.join(d.run_dir, "gateway.sock"))
            try:
                s.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):  # it replied and hung up early
                pass
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and reply["error"].startswith(why), reply
    assert request(d.run_dir, "list") == []
    assert d.proc.poll() is None


def test_cpus_pins_the_data_path_workers(tmp_path):
    """`--cpus 1`: the worker thread of a running device may use CPU 1 only."""
    from gateway.testing.netns import topology

    def affinities(pid: int) -> list[str]:
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out += [ln.split()[1] for ln in f if ln.startswith("Cpus_allowed_list")]
        return out

    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state"), ("--cpus", "1")).start()
        try:
            dev = json.loads(d.ok("attach", "vm0", topo.nic, "--json"))
            before = affinities(d.proc.pid)
            assert "1" not in before  # the control plane is not pinned
            with Frontend(dev["socket"]) as fe:
                fe.connect().setup()
                assert "vm0: running" in d.ok("list")
                assert affinities(d.proc.pid).count("1") == 1  # the one worker
        finally:
            d.stop()


PEER = """
import os, socket, sys
os.setgid(65534); os.setgroups([]); os.setuid(65534)  # nobody
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit()
try:
    s.sendall(b'{"cmd": "list", "args": {}}\\n')
except BrokenPipeError:
    pass  # refused peers get their reply at once, then the daemon hangs up
print(s.makefile().readline().strip())
"""


def test_control_socket_is_root_only_even_if_its_mode_is_loosened(tmp_path):
    """Mode 0660 keeps others out; SO_PEERCRED keeps them out when it is 0666."""
    import shutil
    import tempfile

    run = tempfile.mkdtemp(prefix="gwt-ctl-")
    os.chmod(run, 0o755)  # reachable by anyone: only the socket's own checks are left
    d = Daemon(run, str(tmp_path / "state")).start()
    try:
        path = os.path.join(run, "gateway.sock")
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o660 and st.st_uid == 0

        def as_nobody() -> str:
            r = subprocess.run([sys.executable, "-c", PEER, path], capture_output=True,
                               text=True, timeout=TIMEOUT)
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        assert as_nobody() == "EACCES"
        os.chmod(path, 0o666)
        reply = json.loads(as_nobody())
        assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"]
        assert "no devices" in d.ok("list")  # root still gets in
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)


def _wait_listed(d: Daemon, name: str, check) -> dict:
    """The device as `list --json` shows it, once `check` accepts it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        devs = {x["name"]: x for x in json.loads(d.ok("list", "--json"))["devices"]}
        if check(devs.get(name)) or time.monotonic() > deadline:
            return devs.get(name)
        time.sleep(0.05)  # the daemon reacts to a netlink event: nothing to wait on here


def test_nic_down_and_up_under_a_running_device(env):
    """A clear state while the NIC is down, never a crash, and back when it is up."""
    from pyroute2 import IPRoute

    topo, d = env
    dev = json.loads(d.ok("attach", "vm0", topo.nic, "--json"))
    with Frontend(dev["socket"]) as fe:
        fe.connect().setup()
        assert _wait_listed(d, "vm0", lambda x: x["state"] == "running")["state"] == "running"
        with IPRoute() as ipr:
            ipr.link("set", index=topo.nic_index, state="down")
        x = _wait_listed(d, "vm0", lambda x: x["reason"])
        assert x["reason"] == f"{topo.nic} is down" and x["state"] == "running"
        with IPRoute() as ipr:
            ipr.link("set", index=topo.nic_index, state="up")
        assert _wait_listed(d, "vm0", lambda x: not x["reason"])["reason"] is None
        _five_frames_reach_the_far_host(fe, topo, dev["mac"])
    assert d.proc.poll() is None


def _daemon_with_saved_device(tmp_path, nic: str, mac: str) -> Daemon:
    """A daemon started with device vm0 on file for `nic`, which does not exist yet."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "attachments.json").write_text(json.dumps([{"name": "vm0", "iface": nic,
                                                          "mac": mac}]))
    return Daemon(str(tmp_path / "run"), str(state)).start()


def test_a_device_whose_nic_is_missing_waits_for_it(tmp_path):
    """A saved device whose NIC is absent at start is listed `pending` with the
    reason, stays on file, and is attached when a NIC of that name appears."""
    from pyroute2 import IPRoute

    nic = f"gwt{os.getpid() % 100000}late"
    d = _daemon_with_saved_device(tmp_path, nic, "52:54:00:12:00:01")
    try:
        (x,) = json.loads(d.ok("list", "--json"))["devices"]
        assert x["state"] == "pending" and nic in x["reason"]
        assert "vm0: pending" in d.ok("list")
        with IPRoute() as ipr:
            ipr.link("add", ifname=nic, kind="veth", peer=nic + "p")
            ipr.link("set", index=ipr.link_lookup(ifname=nic)[0], state="up")
        x = _wait_listed(d, "vm0", lambda x: x["state"] == "waiting")
        assert x["state"] == "waiting" and x["xdp_mode"] == "native"
        assert json.loads((tmp_path / "state" / "attachments.json").read_text())[0]["iface"] == nic
    finally:
        d.stop()
        with IPRoute() as ipr:
            for i in ipr.link_lookup(ifname=nic):
                ipr.link("del", index=i)


def test_nic_deleted_under_a_running_device_comes_back_with_it(env):
    """Deleting the NIC under a connected guest: the device goes `pending` with
    the reason, the daemon lives on, and a NIC of that name brings it back."""
    from pyroute2 import IPRoute, NetNS

    topo, d = env
    dev = json.loads(d.ok("attach", "vm0", topo.nic, "--json"))
    with Frontend(dev["socket"]) as fe:
        fe.connect().setup()
        assert _wait_listed(d, "vm0", lambda x: x["state"] == "running")["state"] == "running"
        with IPRoute() as ipr:
            ipr.link("del", index=topo.nic_index)  # takes the far end with it
        x = _wait_listed(d, "vm0", lambda x: x["state"] == "pending")
        assert x["state"] == "pending" and x["reason"] == f"{topo.nic} was deleted"
        assert fe.sock.recv(1) == b"", "the old session must be closed"
    assert d.proc.poll() is None
    assert not os.path.exists(dev["socket"])

    with IPRoute() as ipr:
        ipr.link("add", ifname=topo.nic, kind="veth",
                 peer={"ifname": topo.peer, "net_ns_fd": topo.ns})
        (idx,) = ipr.link_lookup(ifname=topo.nic)
        with open(f"/proc/sys/net/ipv6/conf/{topo.nic}/disable_ipv6", "w") as f:
            f.write("1")  # as topology() does: the host's own IPv6 would reach the far end
        ipr.link("set", index=idx, state="up")
    with NetNS(topo.ns) as far:
        far.link("set", index=far.link_lookup(ifname=topo.peer)[0], state="up")
    x = _wait_listed(d, "vm0", lambda x: x["state"] == "waiting")
    assert x["state"] == "waiting" and x["reason"] is None
    with Frontend(dev["socket"]) as fe:
        fe.connect().setup()
        _five_frames_reach_the_far_host(fe, topo, dev["mac"])


def _five_frames_reach_the_far_host(fe: Frontend, topo, mac: str) -> None:
    before = topo.peer_stats()["rx_packets"]
    frames = [bytes.fromhex("020000000099") + bytes.fromhex(mac.replace(":", ""))
              + b"\x88\xb5" + bytes([i]) * 50 for i in range(5)]
    fe.transmit(frames)
    fe.wait_tx_done(5)
    deadline = time.monotonic() + TIMEOUT
    while topo.peer_stats()["rx_packets"] < before + 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # a kernel counter: nothing to wait on
    assert topo.peer_stats()["rx_packets"] == before + 5


def _wait_log(d: Daemon, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT  # its log reaches us through a pipe, later
    while not any(text in ln for ln in d.log):
        assert time.monotonic() < deadline, "".join(d.log)
        time.sleep(0.01)


def test_a_waiting_device_logs_a_repeated_re_attach_failure_once(tmp_path):
    """Every link event of its NIC retries a pending device; the same failure
    again is no news and is not logged again (it was, once per event)."""
    from pyroute2 import IPRoute

    nic = f"gwt{os.getpid() % 100000}down"
    d = _daemon_with_saved_device(tmp_path, nic, "52:54:00:12:00:02")
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=nic, kind="veth", peer=nic + "p")  # down: attach fails
            (i,) = ipr.link_lookup(ifname=nic)
            # Link events are handled after they happen, against the NIC as it
            # is then: wait for the first failure before anything else changes.
            _wait_log(d, f"{nic} is down")
            for mtu in (1400, 1450, 1480, 1490, 1500):  # five more events, same failure
                ipr.link("set", index=i, mtu=mtu)
            d.ok("list")  # requests and link events share one thread: mostly handled by now
            ipr.link("set", index=i, state="up")
        x = _wait_listed(d, "vm0", lambda x: x["state"] == "waiting")
        assert x["state"] == "waiting"
        _wait_log(d, "is back, re-attached")
        failed = [ln for ln in d.log if "re-attaching failed" in ln]
        assert len(failed) == 1 and f"{nic} is down" in failed[0], "".join(d.log)
    finally:
        d.stop()
        with IPRoute() as ipr:
            for i in ipr.link_lookup(ifname=nic):
                ipr.link("del", index=i)
