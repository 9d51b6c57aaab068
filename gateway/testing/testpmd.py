"""Drive DPDK ``dpdk-testpmd`` in interactive mode as a vhost-user frontend.

Usage::

    with Testpmd(sock, queues=1, args=["--forward-mode=txonly", "--txpkts=64"]) as tp:
        tp.wait_link_up(timeout=20)
        tp.start()
        time.sleep(1)
        fwd = tp.stop()            # {"TX-packets": ..., "RX-packets": ..., "TX-dropped": ...}
        stats = tp.port_stats(0)   # {"RX-packets": ..., "RX-bytes": ..., "TX-packets": ...}

The port is ``net_virtio_user0`` on ``sock`` (``server=True``: testpmd
listens there and, in DPDK 22.11, blocks its startup until a backend
connects; the first command then waits for it). ``vdev=`` replaces the
whole --vdev string (e.g. ``net_vhost0,iface=SOCK`` for a vhost backend);
``netns=`` runs testpmd inside that network namespace.

testpmd runs without hugepages and PCI (``--no-huge -m 512 --no-pci``) with a
unique ``--file-prefix``; stdout is unbuffered through ``stdbuf`` so that
command output arrives before the next ``testpmd> `` prompt. The process is
killed on exit from the ``with`` block, and its /var/run/dpdk/<prefix>
directory removed.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.testing._proc import die_with_parent, signal_group
from gateway.testing.netns import in_netns

TESTPMD = "dpdk-testpmd"
PROMPT = "testpmd> "

_counter = itertools.count()


class TestpmdError(RuntimeError):
    __test__ = False


def testpmd_available(binary: str = TESTPMD) -> bool:
    return shutil.which(binary) is not None


testpmd_available.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


_NUM = re.compile(r"([A-Za-z][\w-]*):\s*(\d+)\b")


def parse_counters(text: str) -> dict[str, int]:
    """``Name: 123`` pairs found in testpmd's statistics output."""
    return {k: int(v) for k, v in _NUM.findall(text)}


def parse_forward_stats(text: str) -> dict[str, int]:
    """Totals from the "Accumulated forward statistics for all ports" block of ``stop``."""
    m = re.search(r"Accumulated forward statistics for all ports\+*\n(.*?)\n\s*\+{8,}", text, re.S)
    if not m:
        raise TestpmdError(f"no accumulated forward statistics in:\n{text}")
    return parse_counters(m.group(1))


def parse_link_status(text: str) -> bool:
    m = re.search(r"Link status:\s*(\w+)", text)
    if not m:
        raise TestpmdError(f"no link status in:\n{text}")
    return m.group(1).lower() == "up"


class Testpmd:
    __test__ = False  # imported into test modules: not a pytest test class

    def __init__(
        self,
        socket: Path | str | None = None,
        *,
        queues: int = 1,
        mrg_rxbuf: bool | None = None,
        server: bool = False,
        packed_vq: bool | None = None,
        in_order: bool | None = None,
        mac: str | None = None,
        vdev: str | None = None,
        args: Sequence[str] = (),
        lcores: str = "0@1,1@0",
        nb_cores: int = 1,
        mbufs: int = 32768,
        memory_mb: int = 512,
        file_prefix: str | None = None,
        eal_args: Sequence[str] = (),
        binary: str = TESTPMD,
        startup_timeout: float = 60.0,
        netns: str | None = None,
    ) -> None:
        if vdev is None:
            if socket is None:
                raise ValueError("socket or vdev required")
            vdev = f"net_virtio_user0,path={socket},queues={queues}"
            for name, val in (("mrg_rxbuf", mrg_rxbuf), ("packed_vq", packed_vq),
                              ("in_order", in_order)):  # fmt: skip
                if val is not None:
                    vdev += f",{name}={int(val)}"
            if mac is not None:  # the guest's MAC: a gateway drops frames from any other
                vdev += f",mac={mac}"
            if server:
                vdev += ",server=1"
        self.vdev = vdev
        self.server = server
        self.file_prefix = file_prefix or f"gwt{os.getpid()}_{next(_counter)}"
        self.startup_timeout = startup_timeout
        self.argv = [
            "stdbuf", "-o0", "-e0",
            binary,
            "--lcores", lcores,
            "--no-huge", "-m", str(memory_mb),
            "--no-pci",
            "--file-prefix", self.file_prefix,
            "--vdev", vdev,
            *eal_args,
            "--",
            "-i",
            f"--nb-cores={nb_cores}",
            f"--total-num-mbufs={mbufs}",
        ]  # fmt: skip
        if queues > 1 and not any(a.startswith(("--rxq", "--txq")) for a in args):
            self.argv += [f"--rxq={queues}", f"--txq={queues}"]
        self.argv += list(args)
        if netns is not None:  # e.g. a traffic source on the far host's interface
            self.argv = in_netns(netns, self.argv)

        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = ""
        self._eof = False
        self._ready = False
        self.startup_output = ""
        self._cond = threading.Condition()
        self._cmd_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------- process

    def start_process(self) -> Testpmd:
        if self.proc is not None:
            raise TestpmdError("already started")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name="testpmd-out", daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> Testpmd:
        try:
            self.start_process()
            if not self.server:  # a server-mode virtio-user blocks until a backend connects
                self.wait_ready(self.startup_timeout)
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                else:
                    self._buf += chunk.decode("utf-8", errors="replace").replace("\r", "")
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def output(self) -> str:
        """Everything testpmd printed so far (startup included)."""
        with self._cond:
            return self._buf

    def _fail(self, why: str, n: int = 60) -> TestpmdError:
        with self._cond:
            tail = "\n".join(self._buf.splitlines()[-n:])
        rc = self.proc.poll() if self.proc else None
        return TestpmdError(f"{why} (rc={rc})\n--- testpmd output ---\n{tail}")

    def _wait_prompt(self, start: int, timeout: float) -> int:
        """Index of the first prompt at or after ``start``; caller holds _cond."""
        deadline = time.monotonic() + timeout
        while True:
            i = self._buf.find(PROMPT, start)
            if i >= 0:
                return i
            if self._eof:
                raise self._fail("testpmd exited")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no prompt after {timeout:.0f}s")
            self._cond.wait(left)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first prompt (end of port setup)."""
        if self.proc is None:
            raise TestpmdError("not started")
        with self._cond:
            if self._ready:
                return
            i = self._wait_prompt(0, self.startup_timeout if timeout is None else timeout)
            self.startup_output = self._buf[:i]
            self._ready = True

    # ------------------------------------------------------------ commands

    def cmd(self, text: str, timeout: float = 30.0) -> str:
        """Send one command line; return its output (up to the next prompt)."""
        self.wait_ready()
        assert self.proc is not None and self.proc.stdin is not None
        with self._cmd_lock:
            with self._cond:
                if self._eof:
                    raise self._fail(f"testpmd exited before {text!r}")
                start = len(self._buf)
            try:
                self.proc.stdin.write(text.encode() + b"\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                raise self._fail(f"testpmd exited before {text!r}") from None
            with self._cond:
                end = self._wait_prompt(start, timeout)
                out = self._buf[start:end]
        # drop the echoed command line
        first, _, rest = out.partition("\n")
        return rest if first.strip() == text.strip() else out

    def start(self) -> str:
        return self.cmd("start")

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop forwarding; return the accumulated totals (TX-packets, RX-packets, TX-dropped)."""
        return parse_forward_stats(self.cmd("stop", timeout))

    def port_stats(self, port: int = 0) -> dict[str, int]:
        """``show port stats``: RX-packets, RX-missed, RX-bytes, RX-errors, RX-nombuf,
        TX-packets, TX-errors, TX-bytes, Rx-pps, Rx-bps, Tx-pps, Tx-bps."""
        out = self.cmd(f"show port stats {port}")
        if "NIC statistics" not in out:
            raise self._fail(f"show port stats {port}: {out.strip()}")
        return parse_counters(out)

    def link_up(self, port: int = 0) -> bool:
        return parse_link_status(self.cmd(f"show port info {port}"))

    def wait_link_up(self, timeout: float = 30.0, port: int = 0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        self.wait_ready(timeout)
        while not self.link_up(port):
            if time.monotonic() > deadline:
                raise self._fail(f"port {port} link still down after {timeout:.0f}s")
            time.sleep(interval)

    def quit(self, timeout: float = 10.0) -> int:
        """``quit`` and wait for the process to end (killed if it hangs); returns its status."""
        proc = self.proc
        if proc is None:
            raise TestpmdError("not started")
        if proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        return proc.wait()

    # ------------------------------------------------------------- cleanup

    def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        signal_group(proc, signal.SIGTERM)  # testpmd cleans up and prints its final stats
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self._kill()
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if self._reader:
            self._reader.join(5)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(Path("/var/run/dpdk") / self.file_prefix, ignore_errors=True)
