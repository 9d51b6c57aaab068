"""Run a QEMU guest (TCG) with vhost-user NICs and watch its serial console.

Usage::

    img = ensure_guest()
    initrd = make_initrd(img, "ip link show eth0\\n", tmp_path / "initrd")
    nic = VhostUserNic(socket=tmp_path / "vu.sock", server=True)
    with QemuGuest(img.kernel, initrd, nics=[nic], append=img.cmdline) as vm:
        vm.wait_for(r"GW-GUEST: modules loaded", timeout=60)
        m = vm.wait_for(r"GW-GUEST: scenario exit (\\S+)", timeout=60)

``wait_for`` scans the console lines after the previous match (a cursor), so
successive calls find successive events. It raises :class:`QemuError` with
the last 40 lines on timeout, when QEMU exits, and as soon as QEMU reports
that it could not map guest memory for vhost-user (it would otherwise
silently fall back to userspace virtio and drop everything).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.testing._proc import die_with_parent, signal_group
from gateway.testing.lifecycle import Started

QEMU = "qemu-system-x86_64"

# Console lines that mean the run is broken whatever the test waits for.
FATAL_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vhost-user memory map", re.compile(r"Failed initializing vhost-user memory map")),
    ("kernel panic", re.compile(r"Kernel panic - not syncing")),
)

_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][A-Za-z0-9]|[A-Za-z=>])")


class QemuError(RuntimeError):
    pass


def classify_line(line: str) -> str | None:
    """Name of the fatal condition a console/stderr line reports, else None."""
    for name, pat in FATAL_PATTERNS:
        if pat.search(line):
            return name
    return None


def clean_line(raw: str) -> str:
    """Strip terminal escapes and carriage returns from one console line."""
    return _ANSI.sub("", raw).replace("\r", "")


def qemu_available(binary: str = QEMU) -> bool:
    return shutil.which(binary) is not None


@dataclass
class VhostUserNic:
    """One ``virtio-net-pci`` device backed by a vhost-user socket.

    ``server=True``: QEMU creates and listens on ``socket`` (the backend connects).
    ``server=False``: QEMU connects to the backend's socket, retrying every second.
    """

    socket: Path | str
    mac: str | None = None
    queues: int = 1
    server: bool = False
    # extra virtio-net-pci properties, e.g. "csum=off,gso=off" or "mrg_rxbuf=off"
    device_opts: str = ""


class QemuGuest(Started):
    def __init__(
        self,
        kernel: Path | str,
        initrd: Path | str,
        *,
        nics: Sequence[VhostUserNic] = (),
        append: str | None = None,
        memory_mb: int = 256,
        smp: int = 1,
        accel: str = "tcg",
        extra_args: Sequence[str] = (),
        binary: str = QEMU,
        log_path: Path | str | None = None,
        qmp: Path | str | None = None,
        incoming: str | None = None,
    ) -> None:
        """`qmp`: a unix socket path for a QMP monitor (gateway/testing/qmp.py).
        `incoming`: a migration URI (e.g. ``unix:/path``) this QEMU waits on
        instead of booting: the destination of a live migration."""
        if append is None:
            from gateway.testing.guest import KERNEL_CMDLINE

            append = KERNEL_CMDLINE
        self.kernel = Path(kernel)
        self.initrd = Path(initrd)
        self.nics = list(nics)
        self.append = append
        self.memory_mb = memory_mb
        self.smp = smp
        self.accel = accel
        self.extra_args = list(extra_args)
        self.binary = binary
        self.log_path = Path(log_path) if log_path else None
        self.qmp = Path(qmp) if qmp else None
        self.incoming = incoming

        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._partial = ""
        self._cursor = 0
        self._eof = False
        self._fatal: str | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log = None

    # ---------------------------------------------------------------- setup

    def command(self) -> list[str]:
        mem = f"{self.memory_mb}M"
        cmd = [
            self.binary,
            "-machine", f"q35,accel={self.accel},memory-backend=mem",
            "-cpu", "max",
            "-smp", str(self.smp),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-nographic",
            "-no-reboot",
            "-nic", "none",
            "-vga", "none",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.append,
        ]  # fmt: skip
        for i, nic in enumerate(self.nics):
            chardev = f"socket,id=c{i},path={nic.socket}"
            chardev += ",server=on,wait=off" if nic.server else ",reconnect=1"
            mac = nic.mac or f"52:54:00:12:34:{0x56 + i:02x}"
            dev = f"virtio-net-pci,netdev=n{i},mac={mac},vectors=0"
            if nic.queues > 1:
                dev += ",mq=on"
            if nic.device_opts:
                dev += "," + nic.device_opts
            cmd += [
                "-chardev", chardev,
                "-netdev", f"vhost-user,id=n{i},chardev=c{i},queues={nic.queues}",
                "-device", dev,
            ]  # fmt: skip
        if self.qmp:
            cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if self.incoming:
            cmd += ["-incoming", self.incoming]
        return cmd + self.extra_args

    def start(self) -> QemuGuest:
        if self.proc is not None:
            raise QemuError("already started")
        if self.log_path:
            self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C to pytest must not reach QEMU's console mux
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name="qemu-console", daemon=True)
        self._reader.start()
        return self

    # --------------------------------------------------------------- reader

    def _add_line(self, line: str) -> None:
        # caller holds self._cond
        self._lines.append(line)
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()
        if self._fatal is None and classify_line(line):
            self._fatal = line

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
                    if self._partial:
                        self._add_line(clean_line(self._partial))
                        self._partial = ""
                    self._eof = True
                    self._cond.notify_all()
                    return
                text = self._partial + chunk.decode("utf-8", errors="replace")
                *complete, self._partial = text.split("\n")
                for raw in complete:
                    self._add_line(clean_line(raw))
                self._cond.notify_all()

    # ---------------------------------------------------------------- query

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines + ([self._partial] if self._partial else []))

    def tail(self, n: int = 40) -> str:
        with self._cond:
            lines = self._lines[-n:] + ([clean_line(self._partial)] if self._partial else [])
        return "\n".join(lines)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _fail(self, why: str) -> QemuError:
        return QemuError(f"{why}\n--- last console lines ---\n{self.tail(40)}")

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, partial: bool = False
    ) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` after the previous match.

        Only whole lines are matched unless ``partial`` (for prompts that end
        without a newline): a line still arriving would match "count 2" when
        the guest is printing "count 20"."""
        if self.proc is None:
            raise QemuError("not started")
        pat = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._fatal is not None:  # the run is broken: every wait fails
                    raise self._fail(f"QEMU reported: {self._fatal!r}")
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    m = pat.search(line)
                    if m:
                        return m
                if partial and self._partial:
                    m = pat.search(clean_line(self._partial))
                    if m:
                        return m  # a prompt without newline; the cursor stays
                if self._eof:
                    rc = self.proc.wait()
                    raise self._fail(f"QEMU exited (rc={rc}) before {pat.pattern!r} appeared")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(f"timeout ({timeout:.0f}s) waiting for {pat.pattern!r}")
                self._cond.wait(left)

    def check(self) -> None:
        """Raise if a fatal line has been seen so far."""
        with self._cond:
            if self._fatal is not None:
                raise self._fail(f"QEMU reported: {self._fatal!r}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself (the guest powered off)."""
        if self.proc is None:
            raise QemuError("not started")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"QEMU still running after {timeout:.0f}s") from None
        if self._reader:
            self._reader.join(5)
        return rc

    def send(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    # -------------------------------------------------------------- cleanup

    def close(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
                    proc.wait()
            if proc.stdin:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            if self._reader:
                self._reader.join(5)
            if proc.stdout:
                proc.stdout.close()
        if self._log:
            self._log.close()
            self._log = None
