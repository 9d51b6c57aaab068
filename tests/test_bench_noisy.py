"""The noisy-neighbour row of the benchmark runs (short mode) and its
neighbours did what they are there for; no timing is asserted."""

import json
import pathlib
import subprocess
import sys

import pytest

from gateway.testing import testpmd as tp

ROOT = pathlib.Path(__file__).resolve().parent.parent
NEIGHBOURS = ("alone", "burst", "burst-packed", "stall")


@pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed")
@pytest.mark.dpdk
def test_noisy_neighbour_short_mode_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--noisy-only",
                        "--noisy-attacks", "burst,burst-packed,stall", "--seconds", "0.3",
                        "--runs", "1", "--quiet-wait", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["results"] == []  # --noisy-only: no other row ran
    rows = {(x["neighbour"], x["direction"]): x for x in data["noisy"]}
    assert set(rows) == {(n, d) for n in NEIGHBOURS for d in ("guest->wire", "wire->guest")}
    for (name, _), x in rows.items():
        assert x["mpps"] > 0 and x["min_mpps"] <= x["mpps"] <= x["max_mpps"]
        assert x["of_alone"] > 0
        drops = x["neighbour_drops"]
        # The far host's flood ran in every row to the end and reported.
        assert x["flood_kpps"] > 0 and x["flood_cpu_pct"] is not None
        if name == "alone":  # no guest: the XDP program dropped the flood
            assert x.get("attacker_cpu_pct") is None and drops["xdp_stopped"] > 0
            assert drops["tx_short"] == drops["rx_no_room"] == drops["xdp_over_share"] == 0
            continue
        # The neighbours attacked: the attacker's process ran to the end and
        # reported; the burst's chains were taken and dropped, the gateway paused
        # its worker; the flood's frames were walked and dropped for no room, or
        # over the stalled guest's share.
        assert x["attacker_cpu_pct"] is not None
        if name.startswith("burst"):
            assert drops["tx_short"] > 1 and drops["rx_no_room"] > 0
            assert x["attacker_rounds"] > 1
            if name == "burst":  # a pass walks 3 chains: past the 1024-read mark
                assert x["throttled"] > 0
        else:
            assert drops["xdp_over_share"] > 0 and drops["tx_short"] == 0
            assert x["attacker_rounds"] == 0
    assert "/alone" in r.stdout and "burst-packed" in r.stdout
