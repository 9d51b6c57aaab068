"""CI-sized fuzzing (issue 6): the C split ring under libFuzzer + ASan + UBSan, and
the vhost-user message machine under hypothesis. The long campaigns are
`make -C fuzz fuzz-ring`, `fuzz-proto` and `fuzz-proto-mut` (see fuzz/README.md)."""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
sys.path.insert(0, str(FUZZ))

import proto_harness as ph  # noqa: E402

from gateway.vhost import protocol as p  # noqa: E402
from gateway.vhost.protocol import Request  # noqa: E402
from gateway.virtio import features as vf  # noqa: E402
from gateway.virtio.ring import FrameBuffer  # noqa: E402

RING_CI_SECONDS = int(os.environ.get("GATEWAY_FUZZ_RING_SECONDS", "20"))
PROTO_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "1500"))


@pytest.fixture(scope="module")
def frames():
    return FrameBuffer(4, 2048)


# -- the C ring under libFuzzer ----------------------------------------------------


def _libfuzzer_missing(tmp: pathlib.Path) -> str | None:
    clang = shutil.which("clang")
    if clang is None:
        return "clang is not installed (Debian: apt-get install clang libclang-rt-14-dev)"
    src = tmp / "probe.c"
    src.write_text("#include <stddef.h>\n#include <stdint.h>\n"
                   "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n")
    r = subprocess.run([clang, "-fsanitize=fuzzer,address,undefined", str(src), "-o",
                        str(tmp / "probe")], capture_output=True, text=True)
    if r.returncode:
        return ("clang cannot link -fsanitize=fuzzer (Debian: apt-get install "
                f"libclang-rt-14-dev): {r.stderr.strip()[-300:]}")
    return None


def bounded_run(tmp_path, target: str, seconds: int, *make_args: str) -> str:
    """`make -C fuzz TARGET` for about `seconds` (skipped without libFuzzer):
    any sanitizer report, broken invariant or crash artifact fails it, and so
    does a run too short to have done anything. Returns its output."""
    why = _libfuzzer_missing(tmp_path)
    if why:
        pytest.skip(why)
    build = tmp_path / "build"
    r = subprocess.run(
        ["make", "-s", "-C", str(FUZZ), target, f"BUILD={build}", f"CI_TIME={seconds}",
         "SEED=1", *make_args],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    out = r.stdout + r.stderr
    tail = out[-4000:]
    assert r.returncode == 0, tail
    assert "AddressSanitizer" not in out and "runtime error" not in out, tail
    assert "invariant failed" not in out, tail
    m = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert m, tail
    assert int(m.group(1)) >= 1000, tail  # it really ran, not just started
    assert not any((build / "artifacts").iterdir()), tail
    return out


def test_ring_fuzzer_bounded_run(tmp_path):
    """Builds fuzz/ring_fuzz.c with gw_ring.c, replays fuzz/corpus/ring and mutates for
    RING_CI_SECONDS: any sanitizer report or broken invariant fails the run."""
    bounded_run(tmp_path, "fuzz-ring-ci", RING_CI_SECONDS)


def test_ring_corpus_is_small():
    files = list((FUZZ / "corpus" / "ring").iterdir())
    assert files, "fuzz/corpus/ring is empty"
    assert sum(f.stat().st_size for f in files) < 2 * 1024 * 1024


# -- the message machine under hypothesis ---------------------------------------------


@settings(
    max_examples=PROTO_EXAMPLES,
    deadline=None,  # hangs are caught by the harness's own alarm (10 s)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.randoms(use_true_random=False))
def test_proto_random_streams(frames, r):
    """Random and mutated vhost-user sessions, with real fds (memfds, eventfds, pipes,
    /dev/null, a directory) in random counts: handle() raises nothing but
    ProtocolError, never hangs, and every fd ends up held or closed; nothing leaks
    after close()."""
    stream = ph.generate(r)
    note(ph.describe(stream))
    ph.run_stream(stream, frames)


def test_proto_mutation_driver_short(frames):
    """The fast driver of the long run (fuzz/proto_fuzz.py), on a few hundred streams."""
    for i in range(300):
        ph.run_stream(ph.generate(random.Random(f"ci:{i}")), frames)


def test_harness_sees_a_leaked_fd(frames, monkeypatch):
    """The oracle itself: a connection that forgets to close an fd is caught."""
    monkeypatch.setattr(p, "_close", lambda fd: None)  # Message.close_fds leaks
    stream = ph.Stream(items=[ph.Item(p.encode(Request.GET_FEATURES), [ph.FdSpec("eventfd")])])
    leaked: list[int] = []
    real_open = ph.make_fd

    def make(spec):
        fd = real_open(spec)
        leaked.append(fd)
        return fd

    monkeypatch.setattr(ph, "make_fd", make)
    try:
        with pytest.raises(ph.FuzzFailure, match="neither held nor closed|still open"):
            ph.run_stream(stream, frames)
    finally:
        for fd in leaked:
            try:
                os.close(fd)
            except OSError:
                pass


def test_harness_sees_a_foreign_exception(frames, monkeypatch):
    """The oracle itself: an exception other than ProtocolError out of handle() fails."""
    from gateway.vhost.backend import VhostConnection

    def boom(self, msg):
        raise KeyError("boom")

    monkeypatch.setattr(VhostConnection, "_on_get_features", boom)
    stream = ph.Stream(items=[ph.Item(p.encode(Request.GET_FEATURES))],
                       features=vf.SUPPORTED_FEATURES)
    with pytest.raises(ph.FuzzFailure, match="KeyError"):
        ph.run_stream(stream, frames)
