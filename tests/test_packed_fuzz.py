"""CI-sized fuzzing of the packed ring (fuzz/packed_fuzz.c): libFuzzer + ASan +
UBSan over fuzz/corpus/packed, then fresh mutations. The long run is
`make -C fuzz fuzz-packed RUNS=...` (fuzz/README.md)."""

from __future__ import annotations

import os
import pathlib

from test_fuzz import bounded_run

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
CI_SECONDS = int(os.environ.get("GATEWAY_FUZZ_PACKED_SECONDS", "15"))


def test_packed_fuzzer_bounded_run(tmp_path):
    bounded_run(tmp_path, "fuzz-packed-ci", CI_SECONDS)


def test_packed_corpus_is_small():
    files = list((FUZZ / "corpus" / "packed").iterdir())
    assert files, "fuzz/corpus/packed is empty"
    assert sum(f.stat().st_size for f in files) < 256 * 1024
