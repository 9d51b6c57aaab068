"""The benchmark runs (short mode) and writes its results; no timing is asserted."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_short_mode_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--seconds",
                        "0.3", "--runs", "1", "--sizes", "64", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert {x["setup"] for x in results} == {"gateway", "testpmd", "raw"}
    for x in results:
        assert x["mpps"] > 0 and x["min_mpps"] <= x["mpps"] <= x["max_mpps"]
    assert "vs testpmd" in r.stdout
