"""CI-sized fuzzing of the packed ring (fuzz/packed_fuzz.c): libFuzzer + ASan +
UBSan over fuzz/corpus/packed, then fresh mutations. The long run is
`make -C fuzz fuzz-packed RUNS=...` (fuzz/README.md)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest
from test_fuzz import _libfuzzer_missing

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
CI_SECONDS = int(os.environ.get("GATEWAY_FUZZ_PACKED_SECONDS", "15"))


def test_packed_fuzzer_bounded_run(tmp_path):
    why = _libfuzzer_missing(tmp_path)
    if why:
        pytest.skip(why)
    build = tmp_path / "build"
    r = subprocess.run(
        ["make", "-s", "-C", str(FUZZ), "fuzz-packed-ci", f"BUILD={build}",
         f"CI_TIME={CI_SECONDS}", "SEED=1"],
        capture_output=True, text=True, timeout=CI_SECONDS + 120,
    )
    out = r.stdout + r.stderr
    tail = out[-4000:]
    assert r.returncode == 0, tail
    assert "AddressSanitizer" not in out and "runtime error" not in out, tail
    assert "invariant failed" not in out, tail
    m = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert m, tail
    assert int(m.group(1)) >= 1000, tail
    assert not any((build / "artifacts").iterdir()), tail


def test_packed_corpus_is_small():
    files = list((FUZZ / "corpus" / "packed").iterdir())
    assert files, "fuzz/corpus/packed is empty"
    assert sum(f.stat().st_size for f in files) < 256 * 1024
