"""The Prometheus endpoint of a live daemon: `promtool check metrics` accepts the
scrape, and the build, device-info and device-state series say what `gateway
list` says, for a device in each state."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
import urllib.request
from importlib import metadata

from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology

STATES = ("waiting", "running", "broken", "pending")


def scrape(d: Daemon) -> str:
    return urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=TIMEOUT).read().decode()


def series(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of every sample named `name`."""
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name}


def wait_state(d: Daemon, name: str, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        devs = {x["name"]: x["state"] for x in json.loads(d.ok("list", "--json"))["devices"]}
        if devs.get(name) == state:
            return
        assert time.monotonic() < deadline, f"{name} never {state}: {devs}"
        time.sleep(0.05)  # the state changes on the device's thread: nothing to await here


def test_metrics_pass_promtool_and_show_each_device_and_its_state(tmp_path):
    gone = f"gwt{os.getpid() % 100000}gone"  # a NIC that does not exist: vm3 waits, pending
    with topology() as topo:
        run, state = tmp_path / "run", tmp_path / "state"
        state.mkdir()
        saved = [
            {"name": "vm0", "iface": topo.nic, "mac": "52:54:00:00:00:10"},
            {"name": "vm1", "iface": topo.nic, "mac": "52:54:00:00:00:11"},
            {"name": "vm2", "iface": topo.nic, "mac": "52:54:00:00:00:12", "vlan": 100,
             "mode": "client", "socket": str(tmp_path / "vm2-qemu.sock")},
            {"name": "vm3", "iface": gone, "mac": "52:54:00:00:00:13"},
        ]
        (state / "attachments.json").write_text(json.dumps(saved))
        d = Daemon(str(run), str(state)).start()
        try:
            with Frontend(str(run / "vm0.sock")) as good, Frontend(str(run / "vm1.sock")) as bad:
                good.connect().setup()
                bad.connect().setup()
                wait_state(d, "vm0", "running")
                # vm1's guest makes more TX buffers available than its ring holds: broken
                tx = bad.rings[1]
                tx.set_avail_idx(tx.avail_idx + bad.queue_size + 1)
                os.eventfd_write(bad.kicks[1], 1)
                assert select.select(bad.errs, [], [], TIMEOUT)[0], "no ring error signalled"
                wait_state(d, "vm1", "broken")
                text = scrape(d)
                listed = {x["name"]: x for x in json.loads(d.ok("list", "--json"))["devices"]}
        finally:
            d.stop()

    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert check.returncode == 0 and not check.stdout + check.stderr, check.stdout + check.stderr

    assert series(text, "gateway_build_info") == {
        (("version", metadata.version("gateway")),): 1.0}

    socket = {n: str(run / f"{n}.sock") for n in ("vm0", "vm1", "vm3")}
    socket["vm2"] = str(tmp_path / "vm2-qemu.sock")
    nic = {"vm0": topo.nic, "vm1": topo.nic, "vm2": topo.nic, "vm3": gone}
    mode = {"vm0": "server", "vm1": "server", "vm2": "client", "vm3": "server"}
    vlan = {"vm0": "0", "vm1": "0", "vm2": "100", "vm3": "0"}
    assert series(text, "gateway_device_info") == {
        tuple(sorted({"device": f"vm{i}", "nic": nic[f"vm{i}"], "mac": f"52:54:00:00:00:1{i}",
                      "vlan": vlan[f"vm{i}"], "mode": mode[f"vm{i}"],
                      "socket": socket[f"vm{i}"]}.items())): 1.0
        for i in range(4)}

    now = {"vm0": "running", "vm1": "broken", "vm2": "waiting", "vm3": "pending"}
    assert {n: x["state"] for n, x in listed.items()} == now  # what `gateway list` said
    assert series(text, "gateway_device_state") == {
        (("device", n), ("state", s)): 1.0 if s == now[n] else 0.0
        for n in now for s in STATES}
    # the counters are still there, for the devices that have them (not the pending one)
    assert {k[0][1] for k in series(text, "gateway_device_broken_total")} == {"vm0", "vm1", "vm2"}
    assert series(text, "gateway_device_broken_total")[(("device", "vm1"),)] == 1.0
