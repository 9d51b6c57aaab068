"""`gateway apply FILE` and `gateway daemon --config FILE`: the host's devices
from a TOML file, through the real daemon and its control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway.api import default_mac
from gateway.config import ConfigError, Current, parse, plan
from gateway.pidlock import PidLock
from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.xdp import link
from gateway.xdp.nic import lock_path

SETTINGS = ("name", "iface", "mac", "vlan", "queues", "mtu", "socket", "mode",
            "allow_spoofing", "state")


def devices(d: Daemon) -> dict[str, dict]:
    """What `gateway list` says, keyed by name, the settings and state only."""
    return {x["name"]: {k: x[k] for k in SETTINGS}
            for x in json.loads(d.ok("list", "--json"))["devices"]}


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def apply(d: Daemon, path: str, *args: str) -> subprocess.CompletedProcess:
    return d.cli("apply", path, *args)


def applied_json(d: Daemon, path: str, *args: str) -> dict:
    r = apply(d, path, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(what, deadline: float = TIMEOUT):
    end = time.monotonic() + deadline
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def two_devices(nic: str, tmp_path, *, vlan: int = 100, mtu: int = 1500) -> str:
    return f"""
[defaults]
nic = "{nic}"

[devices.vm0]

[devices.vm1]
mac = "52:54:00:00:00:11"
vlan = {vlan}
mtu = {mtu}
socket = "{tmp_path}/vm1.sock"
"""


# -- the file on its own (no daemon): every refusal is one line ----------------------------

@pytest.mark.parametrize("text, line", [
    ("[devices.vm0\n", "f.toml: Expected ']'"),
    ("", "f.toml: no [devices] table"),
    ("unlisted = \"some\"\n[devices]\n", "f.toml: unlisted: 'some' is not"),
    ("[device.vm0]\nnic = \"x\"\n", "f.toml: unknown key 'device'"),
    ("[devices.vm0]\nnic = \"x\"\n[devices.vm0]\n", "f.toml: Cannot declare ('devices', 'vm0') "
     "twice"),
    ("[devices.\"bad name\"]\nnic = \"x\"\n", "f.toml: device bad name: bad name"),
    ("[devices.vm0]\n", "f.toml: device vm0: nic: missing"),
    ("[devices.vm0]\nnic = \"x\"\nvlna = 3\n", "f.toml: device vm0: unknown field 'vlna'"),
    ("[devices.vm0]\nnic = \"x\"\nmac = \"zz:zz\"\n", "f.toml: device vm0: mac: bad MAC"),
    ("[devices.vm0]\nnic = \"x\"\nmac = \"01:00:5e:00:00:01\"\n",
     "f.toml: device vm0: mac: MAC 01:00:5e"),
    ("[devices.vm0]\nnic = \"x\"\nvlan = 5000\n", "f.toml: device vm0: vlan: 5000 is outside"),
    ("[devices.vm0]\nnic = \"x\"\nvlan = \"100\"\n", "f.toml: device vm0: vlan: must be a number"),
    ("[devices.vm0]\nnic = \"x\"\nqueues = 0\n", "f.toml: device vm0: queues: 0 is outside"),
    ("[devices.vm0]\nnic = \"x\"\nmtu = 10\n", "f.toml: device vm0: mtu: 10 is outside"),
    ("[devices.vm0]\nnic = \"x\"\nmtu = true\n", "f.toml: device vm0: mtu: must be a number"),
    ("[devices.vm0]\nnic = \"x\"\nmode = \"both\"\n", "f.toml: device vm0: mode: 'both' is not"),
    ("[devices.vm0]\nnic = \"x\"\nmode = \"client\"\n", "f.toml: device vm0: socket: missing"),
    ("[devices.vm0]\nnic = \"x\"\nsocket = \"vm0.sock\"\n",
     "f.toml: device vm0: socket: 'vm0.sock' is not an absolute path"),
    ("[devices.vm0]\nnic = \"a/b\"\n", "f.toml: device vm0: nic: 'a/b' is not a NIC name"),
    ("[devices.vm0]\nnic = \"x\"\nallow_spoofing = 1\n",
     "f.toml: device vm0: allow_spoofing: must be true or false"),
    ("[defaults]\nmac = \"52:54:00:00:00:01\"\n[devices]\n", "f.toml: defaults: mac: belongs to "
     "one device"),
    ("[devices.vm0]\nnic = \"x\"\nmac = \"52:54:00:00:00:01\"\n"
     "[devices.vm1]\nnic = \"y\"\nmac = \"52-54-00-00-00-01\"\n",
     "f.toml: device vm1: mac: 52:54:00:00:00:01 is also vm0's (untagged)"),
    ("[devices.vm0]\nnic = \"x\"\nsocket = \"/r/vm1.sock\"\n[devices.vm1]\nnic = \"x\"\n",
     "f.toml: device vm1: socket: /r/vm1.sock is also vm0's"),
])
def test_file_errors_are_one_line_naming_file_device_and_field(text, line):
    with pytest.raises(ConfigError) as e:
        parse(text, "f.toml", "/r")
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_plan_is_empty_for_the_same_devices_and_names_what_differs():
    text = ("[defaults]\nnic = \"eth1\"\n[devices.vm0]\n[devices.vm1]\nvlan = 7\n"
            "[devices.vm2]\nqueues = 2\n")
    desired = parse(text, "f.toml", "/r")
    assert desired.devices["vm0"].mac == default_mac("vm0")
    assert desired.devices["vm0"].socket == "/r/vm0.sock"
    same = {n: Current(a, "running") for n, a in parse(text, "f", "/r").devices.items()}
    assert plan(desired, same) == []
    now = dict(same)
    now["old"] = Current(parse("[devices.old]\nnic = \"eth1\"\n", "f", "/r").devices["old"],
                         "waiting")
    del now["vm2"]
    now["vm1"] = Current(parse(text.replace("7", "8"), "f", "/r").devices["vm1"], "running")
    steps = plan(desired, now)
    assert [(s.action, s.name) for s in steps] == [
        ("detach", "old"), ("change", "vm1"), ("attach", "vm2")]
    assert steps[1].changes == {"vlan": (8, 7)} and not steps[1].live
    assert "not live: a guest is connected" in steps[1].note
    assert steps[0].live and steps[2].live
    # a guest-side setting (the MAC its QEMU names) says the VM must change too
    now["vm1"] = Current(parse(text.replace("vlan = 7", "vlan = 7\nmac = \"52:54:00:00:00:01\""),
                               "f", "/r").devices["vm1"], "running")
    (step,) = [s for s in plan(desired, now) if s.name == "vm1"]
    assert set(step.changes) == {"mac"} and "its VM still names the old mac" in step.note
    # unlisted = "keep": devices not in the file stay, and must not clash with it
    keep = parse("unlisted = \"keep\"\n" + text, "f.toml", "/r")
    assert [s.name for s in plan(keep, now)] == ["vm1", "vm2"]
    clash = Current(parse("[devices.cni0]\nnic = \"eth1\"\nvlan = 7\nmac = \"" +
                          default_mac("vm1") + "\"\n", "f", "/r").devices["cni0"], "running")
    with pytest.raises(ConfigError, match="f.toml: device vm1: mac: .* already used by cni0"):
        plan(keep, {"cni0": clash})


def test_the_example_and_the_readme_say_the_same_and_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "examples", "gateway.toml")) as f:
        example = parse(f.read(), "gateway.toml", "/run/gateway")
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    assert parse(block, "README.md", "/run/gateway").devices == example.devices
    assert [(a.name, a.iface, a.mode) for a in example.devices.values()] == [
        ("web", "eth1", "server"), ("db", "eth1", "server"), ("build", "eth2", "client")]


# -- through the daemon --------------------------------------------------------------------

def test_dry_run_then_apply_then_the_same_file_changes_nothing(env, tmp_path):
    topo, d = env
    path = write(tmp_path / "gw.toml", two_devices(topo.nic, tmp_path))
    dry = applied_json(d, path, "--dry-run")
    assert dry["dry_run"] is True and dry["applied"] is False and dry["error"] is None
    assert [(s["action"], s["name"]) for s in dry["plan"]] == [("attach", "vm0"),
                                                               ("attach", "vm1")]
    assert dry["plan"][1]["device"] == {
        "nic": topo.nic, "mac": "52:54:00:00:00:11", "vlan": 100, "queues": 1, "mtu": 1500,
        "socket": f"{tmp_path}/vm1.sock", "mode": "server", "allow_spoofing": False}
    assert dry["plan"][0]["device"]["mac"] == default_mac("vm0")
    assert devices(d) == {}  # a dry run changes nothing
    assert link.xdp_state(topo.nic)[0] is None

    r = apply(d, path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"attach vm0: nic {topo.nic} mac {default_mac('vm0')} queues 1 mtu 1500 server socket "
        f"{d.run_dir}/vm0.sock",
        f"attach vm1: nic {topo.nic} vlan 100 mac 52:54:00:00:00:11 queues 1 mtu 1500 server "
        f"socket {tmp_path}/vm1.sock",
        f"{path}: attached 2"]
    first = devices(d)
    assert first["vm1"] == {"name": "vm1", "iface": topo.nic, "mac": "52:54:00:00:00:11",
                            "vlan": 100, "queues": 1, "mtu": 1500,
                            "socket": f"{tmp_path}/vm1.sock", "mode": "server",
                            "allow_spoofing": False, "state": "waiting"}
    fdb = sorted(link.fdb_entries(topo.nic))
    prog = link.xdp_state(topo.nic)[0]

    again = applied_json(d, path)
    assert again["plan"] == [] and again["applied"] is True
    assert apply(d, path).stdout == f"{path}: nothing to do, the daemon matches it\n"
    assert devices(d) == first
    assert sorted(link.fdb_entries(topo.nic)) == fdb and link.xdp_state(topo.nic)[0] == prog


def test_drift_is_repaired_and_only_the_changed_device_is_re_attached(env, tmp_path):
    topo, d = env
    path = write(tmp_path / "gw.toml", two_devices(topo.nic, tmp_path)
                 + "\n[devices.vm2]\nmode = \"client\"\nsocket = \"" + str(tmp_path / "q.sock")
                 + "\"\n")
    assert apply(d, path).returncode == 0
    d.ok("detach", "vm2")  # by hand, behind the file's back
    d.ok("attach", "stray", topo.nic)
    with Frontend(f"{tmp_path}/vm1.sock") as fe:  # a guest on vm1
        fe.connect().setup()
        frame = (bytes.fromhex(topo.peer_mac.replace(":", "")) + bytes.fromhex("525400000011")
                 + b"\x88\xb5" + b"x" * 50)
        fe.transmit([frame] * 5)
        fe.wait_tx_done(5)
        wait_for(lambda: devices(d)["vm1"]["state"] == "running")

        keep = write(tmp_path / "keep.toml", 'unlisted = "keep"\n' + open(path).read())
        res = applied_json(d, keep, "--dry-run")  # the daemon's other devices left alone
        assert [(s["action"], s["name"]) for s in res["plan"]] == [("attach", "vm2")]
        res = applied_json(d, path)
        assert [(s["action"], s["name"]) for s in res["plan"]] == [("detach", "stray"),
                                                                   ("attach", "vm2")]
        assert res["plan"][0]["live"] is True  # no guest on it
        assert set(devices(d)) == {"vm0", "vm1", "vm2"}
        assert devices(d)["vm2"]["mode"] == "client"

        # vm0 changes in the file: vm0 alone is re-attached; vm1's guest never notices
        write(tmp_path / "gw.toml", two_devices(topo.nic, tmp_path).replace(
            "[devices.vm0]\n", "[devices.vm0]\nvlan = 200\nallow_spoofing = true\n")
            + "\n[devices.vm2]\nmode = \"client\"\nsocket = \"" + str(tmp_path / "q.sock")
            + "\"\n")
        res = applied_json(d, path)
        assert [(s["action"], s["name"], s["changes"]) for s in res["plan"]] == [
            ("change", "vm0", {"vlan": [0, 200], "allow_spoofing": [False, True]})]
        assert res["plan"][0]["live"] is True and res["plan"][0]["note"] == ""
        now = devices(d)
        assert now["vm0"]["vlan"] == 200 and now["vm0"]["allow_spoofing"] is True
        assert now["vm1"]["state"] == "running"
        stats = json.loads(d.ok("stats", "--json"))["devices"]
        assert stats["vm1"]["tx_packets"] == 5  # the same device: its counters go on
        fe.transmit([frame] * 3)
        fe.wait_tx_done(3)
        assert json.loads(d.ok("stats", "vm1", "--json"))["devices"]["vm1"]["tx_packets"] == 8

        # a change to the device whose guest is connected: the plan says it is not live
        write(tmp_path / "vm1.toml", two_devices(topo.nic, tmp_path, mtu=1400).replace(
            "[devices.vm0]\n", "[devices.vm0]\nvlan = 200\nallow_spoofing = true\n")
            + "\n[devices.vm2]\nmode = \"client\"\nsocket = \"" + str(tmp_path / "q.sock")
            + "\"\n")
        dry = applied_json(d, str(tmp_path / "vm1.toml"), "--dry-run")
        (step,) = dry["plan"]
        assert step["name"] == "vm1" and step["changes"] == {"mtu": [1500, 1400]}
        assert step["live"] is False and "not live: a guest is connected" in step["note"]
        assert "not live" in apply(d, str(tmp_path / "vm1.toml"), "--dry-run").stdout
        assert devices(d)["vm1"]["mtu"] == 1500 and devices(d)["vm1"]["state"] == "running"


def test_a_failure_half_way_is_undone_and_the_host_is_as_before(env, tmp_path):
    topo, d = env
    with topology() as other:
        d.ok("attach", "keep", topo.nic, "--mac", "52:54:00:00:00:01")
        d.ok("attach", "old", topo.nic, "--mac", "52:54:00:00:00:02")
        d.ok("attach", "chg", topo.nic, "--mac", "52:54:00:00:00:03")
        before = devices(d)
        fdb = sorted(link.fdb_entries(topo.nic))
        prog = link.xdp_state(topo.nic)[0]
        state = (tmp_path / "state" / "attachments.json").read_text()
        path = write(tmp_path / "gw.toml", f"""
[defaults]
nic = "{topo.nic}"
[devices.keep]
mac = "52:54:00:00:00:01"
[devices.chg]
mac = "52:54:00:00:00:03"
vlan = 5
[devices.new-a]
[devices.new-b]
nic = "{other.nic}"
[devices.new-c]
""")
        # attach #2 of 3 fails in the kernel's part: another process holds new-b's NIC
        held = PidLock.take(lock_path(other.nic))
        try:
            r = apply(d, path)
        finally:
            held.release()
        assert r.returncode == 1
        err = r.stderr.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"gateway: {path}: attach new-b failed: cannot attach new-b to {other.nic}")
        assert err[0].endswith("undone: detached new-a, detached chg, re-attached chg, "
                               "re-attached old; the host is as before"), err[0]
        assert devices(d) == before
        assert sorted(link.fdb_entries(topo.nic)) == fdb
        assert link.xdp_state(topo.nic)[0] == prog
        assert link.xdp_state(other.nic)[0] is None and link.fdb_entries(other.nic) == []
        assert (tmp_path / "state" / "attachments.json").read_text() == state
        # the NIC free again, the same file goes through
        assert apply(d, path).returncode == 0
        assert set(devices(d)) == {"keep", "chg", "new-a", "new-b", "new-c"}
        assert d.ok("detach", "new-b") == ""  # before `other` goes


def test_refusals_name_file_device_and_field_exit_2_and_change_nothing(env, tmp_path):
    topo, d = env
    d.ok("attach", "hand", topo.nic, "--mac", "52:54:00:00:00:09")
    before = devices(d)
    fdb = sorted(link.fdb_entries(topo.nic))
    taken = socket.socket(socket.AF_UNIX)
    taken.bind(str(tmp_path / "taken.sock"))
    taken.listen(16)  # never accepted: each probe of the path waits in its backlog
    nic_mtu = link.resolve(topo.nic).mtu
    cases = [
        ("[devices.vm0]\nnic = \"gwtnosuch\"\n", "device vm0: nic: "),
        (f"[devices.vm0]\nnic = \"{topo.nic}\"\nqueues = 4\n",
         f"device vm0: queues: 4, but {topo.nic} has 1 queue(s)"),
        (f"[devices.vm0]\nnic = \"{topo.nic}\"\nmtu = {nic_mtu + 1}\n", "device vm0: mtu: "),
        (f"[devices.vm0]\nnic = \"{topo.nic}\"\nsocket = \"{tmp_path}/taken.sock\"\n",
         "device vm0: socket: " + f"{tmp_path}/taken.sock is in use"),
        (f"[devices.vm0]\nnic = \"{topo.nic}\"\nsocket = \"/nonexistent/x.sock\"\n",
         "device vm0: socket: /nonexistent does not exist"),
        (f"unlisted = \"keep\"\n[devices.vm0]\nnic = \"{topo.nic}\"\n"
         "mac = \"52:54:00:00:00:09\"\n",
         "device vm0: mac: 52:54:00:00:00:09 is already used by hand (untagged), which is not "
         "in the file"),
        (f"[devices.vm0]\nnic = \"{topo.nic}\"\n[devices.vm1]\nnic = \"{topo.nic}\"\n"
         "mac = \"zz\"\n", "device vm1: mac: bad MAC address 'zz'"),
    ]
    try:
        for text, why in cases:
            path = write(tmp_path / "bad.toml", text)
            for args in ((), ("--dry-run",), ("--json",)):
                r = apply(d, path, *args)
                assert r.returncode == 2, (text, r)
                assert r.stderr.startswith(f"gateway: {path}: {why}"), (why, r.stderr)
                assert r.stderr.count("\n") == 1 and r.stdout == ""
            assert devices(d) == before and sorted(link.fdb_entries(topo.nic)) == fdb
        r = apply(d, str(tmp_path / "missing.toml"))
        assert r.returncode == 2
        assert r.stderr == f"gateway: {tmp_path}/missing.toml: cannot read: No such file or " \
            "directory\n"
    finally:
        taken.close()
    assert devices(d) == before
    d.proc.send_signal(signal.SIGHUP)  # without --config: said, and nothing else
    assert wait_for(lambda: any("SIGHUP: no --config file" in x for x in d.log))
    assert d.proc.poll() is None and devices(d) == before


def test_daemon_config_at_start_and_on_sighup(tmp_path):
    with topology() as topo:
        path = write(tmp_path / "gw.toml", two_devices(topo.nic, tmp_path))
        # a bad file at start: the daemon does not start, one line says why
        bad = write(tmp_path / "bad.toml", f"[devices.vm0]\nnic = \"{topo.nic}\"\nvlan = 9999\n")
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "daemon", "--run-dir",
                            str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
                            "--config", bad], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 2
        assert r.stderr.splitlines()[-1] == (f"gateway: {bad}: device vm0: vlan: 9999 is "
                                             "outside 1..4094 (0 or none: untagged)")
        assert link.xdp_state(topo.nic)[0] is None

        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state"), ("--config", path)).start()
        try:
            assert set(devices(d)) == {"vm0", "vm1"}  # applied before it said ready
            write(tmp_path / "gw.toml", two_devices(topo.nic, tmp_path, vlan=300).replace(
                "[devices.vm0]\n", "") + "\n[devices.vm2]\n")
            d.proc.send_signal(signal.SIGHUP)
            now = wait_for(lambda: (lambda x: x if "vm2" in x else None)(devices(d)))
            assert set(now) == {"vm1", "vm2"} and now["vm1"]["vlan"] == 300
            assert wait_for(lambda: any(f"{path}: attached 1, changed 1, detached 1" in line
                                        for line in d.log))

            write(tmp_path / "gw.toml", "[devices.vm9]\nnic = \"gwtnosuch\"\n")
            d.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: [x for x in d.log if "SIGHUP:" in x and "nothing changed" in x
                                     and "device vm9: nic:" in x])
            assert devices(d) == now
            assert d.proc.poll() is None  # alive
        finally:
            assert d.stop() == 0
