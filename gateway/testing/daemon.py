"""Drive a real `gateway daemon` process and the `gateway` CLI from tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

TIMEOUT = 30


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, run_dir: str, state_dir: str, args: tuple[str, ...] = ()) -> None:
        self.run_dir, self.state_dir, self.args = run_dir, state_dir, args
        self.metrics = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "daemon", "--run-dir", self.run_dir,
             "--state-dir", self.state_dir, "--metrics-listen", self.metrics, *self.args],
            stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:  # its log, until it says it is ready
            self.log.append(line)
            if "gateway daemon ready" in line:
                # keep reading: a daemon whose log pipe fills up blocks in mid-request
                self._reader = threading.Thread(target=self._read_log, daemon=True)
                self._reader.start()
                return self
        raise RuntimeError(f"daemon exited with {self.proc.wait()}:\n{''.join(self.log)}")

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(TIMEOUT)
        if self._reader is not None:
            self._reader.join(TIMEOUT)
        self.proc.stderr.close()
        return rc

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args,
                               *(["--run-dir", self.run_dir] if args[0] != "--help" else [])],
                              capture_output=True, text=True, timeout=TIMEOUT)

    def ok(self, *args: str) -> str:
        r = self.cli(*args)
        assert r.returncode == 0, r.stderr
        return r.stdout
