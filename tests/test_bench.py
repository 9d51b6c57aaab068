"""The benchmark runs (short mode) and writes its results; no timing is asserted.

The extras (zero-loss search, latency, idle CPU, RSS) have their own short
tests: test_pacer.py and test_bench_extras.py."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_short_mode_writes_results(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--seconds",
                        "0.3", "--runs", "1", "--sizes", "64", "--json", str(out),
                        "--plot", str(png), "--no-extras", "--quiet-wait", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    results = record["results"]
    # every role's exact command line is kept, so a figure can be reproduced
    for role in ("wire->guest source", "wire->guest guest", "testpmd forwarder"):
        assert "dpdk-testpmd" in record["commands"][role]
    seen = {(x["setup"], x["direction"], x["queues"]) for x in results}
    for direction in ("guest->wire", "wire->guest"):
        assert {(s, direction, 1) for s in ("gateway", "gateway-packed", "testpmd", "raw")} <= seen
        assert {(s, direction, 2) for s in ("gateway", "raw")} <= seen
    for x in results:
        assert x["mpps"] > 0 and x["min_mpps"] <= x["mpps"] <= x["max_mpps"]
    assert "/testpmd" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
