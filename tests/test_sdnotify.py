"""systemd readiness and watchdog: a real daemon talks to a fake NOTIFY_SOCKET
(a datagram socket of the test's), a request stuck on the request thread stops
the watchdog pings, and `systemd-analyze verify` accepts examples/gateway.service."""

from __future__ import annotations

import asyncio
import configparser
import errno
import json
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.request

import pytest

from gateway import sdnotify
from gateway.systemd import Systemd
from gateway.testing.daemon import TIMEOUT, Daemon
from gateway.testing.netns import topology

ROOT = pathlib.Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 200_000  # a ping every 0.1 s
QUIET = 10 * WATCHDOG_USEC / 1e6  # ten ping intervals without one: the pings have stopped


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET (a path, or an abstract name if `abstract`),
    read all the time by a thread, as systemd does: the kernel queues only
    net.unix.max_dgram_qlen datagrams (10 here), and a sender then waits."""

    FENCE = b"FENCE\n"

    def __init__(self, where: pathlib.Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"gwt-notify-{os.getpid()}-{where.name}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(where / "notify"))
            self.address = str(where / "notify")
        self.got: queue.Queue[bytes] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            data = self.sock.recv(4096)
            if not data:  # shutdown()
                return
            self.got.put(data)

    def recv(self, timeout: float = TIMEOUT) -> list[str]:
        """The next datagram's KEY=VALUE lines."""
        try:
            data = self.got.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no datagram in {timeout} s") from None
        assert data.endswith(b"\n"), data
        return data.decode().splitlines()

    def pending(self) -> list[list[str]]:
        """Every datagram sent before this call: a fence datagram of our own goes
        through the same queue, so all before it have been read when it is."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(self.FENCE, self.sock.getsockname())
        out = []
        while (data := self.got.get(timeout=TIMEOUT)) != self.FENCE:
            out.append(data.decode().splitlines())
        return out

    def until(self, want: list[str], timeout: float = TIMEOUT) -> list[list[str]]:
        """Datagrams up to and including the first equal to `want`."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1] != want:
            seen.append(self.recv(max(0.0, deadline - time.monotonic())))
        return seen

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def notify_env(tmp_path, monkeypatch):
    """A fake systemd whose address the daemons started in the test inherit."""
    def make(abstract: bool = False, watchdog_pid: str | None = None) -> FakeSystemd:
        fake = FakeSystemd(tmp_path, abstract)
        made.append(fake)
        monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
        monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
        if watchdog_pid is None:
            monkeypatch.delenv("WATCHDOG_PID", raising=False)
        else:
            monkeypatch.setenv("WATCHDOG_PID", watchdog_pid)
        return fake

    made: list[FakeSystemd] = []
    yield make
    for fake in made:
        fake.close()


WATCHDOG = ["WATCHDOG=1"]
STOPPING = ["STOPPING=1", "STATUS=stopping: undoing kernel state"]


def pings(datagrams: list[list[str]]) -> None:
    assert all(x == WATCHDOG for x in datagrams), datagrams


def test_ready_status_watchdog_stopping_in_order(tmp_path, notify_env):
    """READY=1 comes once the control socket answers and the saved device is
    restored (the status says so), STATUS= follows the device count, WATCHDOG=1
    every half WATCHDOG_USEC, and STOPPING=1 is the last word."""
    fake = notify_env()
    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            assert fake.recv() == ["READY=1", "STATUS=0 devices"]
            assert fake.until(WATCHDOG) == [WATCHDOG]
            d.ok("attach", "vm0", topo.nic)
            pings(fake.until(["STATUS=1 device"])[:-1])  # pings only, however long it took
            d.ok("attach", "vm1", topo.nic)
            pings(fake.until(["STATUS=2 devices"])[:-1])
            d.ok("detach", "vm1")
            pings(fake.until(["STATUS=1 device"])[:-1])
            assert fake.until(WATCHDOG) and fake.until(WATCHDOG)  # it keeps pinging
        finally:
            assert d.stop() == 0
        pings(fake.until(STOPPING)[:-1])
        assert fake.pending() == []  # nothing after STOPPING=1

        # restarted: READY=1 only once the saved device is back
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            assert fake.recv() == ["READY=1", "STATUS=1 device"]
            assert "vm0: waiting" in d.ok("list")
        finally:
            assert d.stop() == 0
        assert fake.until(STOPPING)[-1] == STOPPING


def test_sighup_reload_is_framed_by_reloading_and_ready(tmp_path, notify_env):
    """`systemctl reload` (ExecReload= sends SIGHUP): the --config file is applied
    again between RELOADING=1 and READY=1, and READY=1 carries the new count."""
    fake = notify_env()
    with topology() as topo:
        conf = tmp_path / "gateway.toml"
        conf.write_text(f'[devices.vm0]\nnic = "{topo.nic}"\n')
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state"),
                   args=("--config", str(conf))).start()
        try:
            pings(fake.until(["READY=1", "STATUS=1 device"])[:-1])
            conf.write_text(f'[devices.vm0]\nnic = "{topo.nic}"\n'
                            f'[devices.vm1]\nnic = "{topo.nic}"\n')
            d.proc.send_signal(signal.SIGHUP)
            pings(fake.until(["RELOADING=1", "STATUS=reloading the configuration file"])[:-1])
            pings(fake.until(["READY=1", "STATUS=2 devices"])[:-1])
            assert "vm1: waiting" in d.ok("list")
        finally:
            assert d.stop() == 0
        assert fake.until(STOPPING)[-1] == STOPPING


# Loaded into the daemon (and only there) through PYTHONPATH: `stats hang` opens a
# FIFO and reads it to its end, so the request thread is stuck until the test says.
HANG_HOOK = textwrap.dedent('''\
    import os

    FIFO = os.environ.get("GATEWAY_TEST_HANG_FIFO")
    if FIFO:
        from gateway import api

        _stats = api.Gateway.stats

        def stats(self, name=None):
            if name == "hang":
                with open(FIFO) as f:
                    f.read()
            return _stats(self, name)

        api.Gateway.stats = stats
''')


def test_a_request_stuck_on_the_request_thread_stops_the_watchdog(tmp_path, notify_env,
                                                                  monkeypatch):
    """The pings go through the request thread: while a request never ends, the
    control loop and the metrics still run but no WATCHDOG=1 goes out (systemd
    would kill and restart the daemon); when the request ends they resume."""
    fake = notify_env(abstract=True)  # and an abstract '@' address this time
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_HOOK)
    fifo = tmp_path / "hang.fifo"
    os.mkfifo(fifo)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("GATEWAY_TEST_HANG_FIFO", str(fifo))
    d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    writer = None
    try:
        assert fake.recv() == ["READY=1", "STATUS=0 devices"]
        fake.until(WATCHDOG)
        fake.until(WATCHDOG)
        client.connect(os.path.join(d.run_dir, "gateway.sock"))
        client.sendall(json.dumps({"cmd": "stats", "args": {"name": "hang"}}).encode() + b"\n")
        deadline = time.monotonic() + TIMEOUT
        while writer is None:  # the FIFO has a reader once the request thread is in the hook
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO and time.monotonic() < deadline, e
                time.sleep(0.01)
        # a ping sent before the request started is queued already; none may follow
        pings(fake.pending())
        with pytest.raises(TimeoutError):
            fake.recv(timeout=QUIET)
        # the process is not frozen: its metrics answer, its control loop takes connections
        urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=TIMEOUT).read()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.connect(os.path.join(d.run_dir, "gateway.sock"))
        os.close(writer)  # the request ends...
        writer = None
        client.settimeout(TIMEOUT)
        assert json.loads(client.makefile().readline()) == {
            "ok": False, "error": "no device named hang"}
        assert fake.recv() == WATCHDOG  # ...and the pings resume
        assert fake.recv() == WATCHDOG
    finally:
        if writer is not None:
            os.close(writer)
        client.close()
        assert d.stop() == 0
    assert fake.until(STOPPING)[-1] == STOPPING


def test_no_watchdog_for_another_pid_and_no_socket_no_failure(tmp_path, notify_env,
                                                             monkeypatch):
    """WATCHDOG_PID naming another process: READY=1 but no pings. A NOTIFY_SOCKET
    nobody listens on: the daemon starts, serves and stops all the same."""
    fake = notify_env(watchdog_pid="1")
    d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
    try:
        assert fake.recv() == ["READY=1", "STATUS=0 devices"]
        with pytest.raises(TimeoutError):
            fake.recv(timeout=QUIET)
    finally:
        assert d.stop() == 0
    assert fake.recv() == STOPPING

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    monkeypatch.delenv("WATCHDOG_PID")
    d = Daemon(str(tmp_path / "run2"), str(tmp_path / "state2")).start()
    try:
        assert "no devices" in d.ok("list")
    finally:
        assert d.stop() == 0
    assert sum("cannot notify systemd" in line for line in d.log) == 1  # said once


def test_notify_addresses_and_watchdog_settings():
    assert sdnotify.notify_address(None) is None
    assert sdnotify.notify_address("") is None
    assert sdnotify.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.notify_address("@foo/bar") == b"\0foo/bar"
    assert sdnotify.notify_address("relative/path") is None
    assert sdnotify.notify_address("vsock:2:1234") is None
    assert sdnotify.notify_address("/" + "x" * 106) is not None
    assert sdnotify.notify_address("/" + "x" * 107) is None  # no room for the NUL
    assert sdnotify.notify_address("@" + "x" * 107) is not None
    assert sdnotify.notify_address("@" + "x" * 108) is None

    me = os.getpid()
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000"}) == 0.1
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000",
                                       "WATCHDOG_PID": str(me)}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    for bad in ("0", "-5", "1e6", "abc", " 200000"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}) is None


def test_notifier_sends_nothing_without_a_socket_and_nothing_after_stopping(tmp_path):
    off = sdnotify.Notifier({})
    assert not off.enabled and not off.ready("x") and not off.watchdog()

    fake = FakeSystemd(tmp_path)
    n = sdnotify.Notifier({"NOTIFY_SOCKET": fake.address})
    try:
        assert n.status("two\nREADY=1")  # a newline cannot forge a field
        assert fake.recv() == ["STATUS=two READY=1"]
        assert n.stopping("bye") and fake.recv() == ["STOPPING=1", "STATUS=bye"]
        assert not n.watchdog() and not n.status("late")
        assert fake.pending() == []
    finally:
        n.close()
        fake.close()


def test_a_watchdog_ping_never_waits_for_room_in_a_full_queue(tmp_path, monkeypatch):
    """A status waits for room in systemd's queue (here for an hour); a ping is
    dropped at once instead: it must not hold up the request thread."""
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 3600)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd, not reading
    stuck.bind(str(tmp_path / "notify"))
    n = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            with pytest.raises(BlockingIOError):
                for _ in range(100_000):
                    filler.sendto(b"x", str(tmp_path / "notify"))
        result = []
        t = threading.Thread(target=lambda: result.append(n.watchdog()), daemon=True)
        t.start()
        t.join(TIMEOUT)
        assert result == [False]  # returned, dropped
        stuck.setblocking(False)
        while True:
            try:
                stuck.recv(16)
            except BlockingIOError:
                break
        assert n.watchdog() and stuck.recv(16) == b"WATCHDOG=1\n"
    finally:
        n.close()
        stuck.close()


def test_what_systemd_did_not_take_is_sent_after_the_next_job(tmp_path):
    """READY=1 and STATUS= (the device count after each job on the request thread)
    that could not be sent (nobody listening, or a full queue past the timeout)
    are sent after a later job rather than lost."""
    gw = types.SimpleNamespace(lock=threading.RLock(), attached={}, pending={})
    where = tmp_path / "late"
    where.mkdir()
    sd = Systemd(gw, {"NOTIFY_SOCKET": str(where / "notify")})
    try:
        asyncio.run(sd.ready())  # READY=1 lost: nobody listens yet
        sd.requests.submit(gw.attached.update, vm0=None).result()  # lost again
        fake = FakeSystemd(where)
        try:
            sd.requests.submit(lambda: None).result()  # e.g. a watchdog ping
            assert fake.recv() == ["READY=1", "STATUS=1 device"]
            sd.requests.submit(gw.attached.pop, "vm0").result()
            assert fake.recv() == ["STATUS=0 devices"]
            sd.requests.submit(lambda: None).result()  # no change: nothing sent
            assert fake.pending() == []
            sd.requests.submit(gw.pending.update, vm1=None).result()
            assert fake.recv() == ["STATUS=1 device, 1 pending"]
        finally:
            fake.close()
    finally:
        sd.requests.shutdown()
        sd.notify.close()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """`systemd-analyze verify` (no systemd running needed) on the example unit,
    its ExecStart pointed at this venv's gateway, which must exist; it warns on
    stderr and still exits 0, so silence is what is asserted."""
    gateway = shutil.which("gateway") or str(pathlib.Path(sys.executable).parent / "gateway")
    assert os.access(gateway, os.X_OK), gateway
    text = (ROOT / "examples" / "gateway.service").read_text()
    assert "ExecStart=/usr/local/bin/gateway daemon " in text
    unit = tmp_path / "gateway.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/gateway ", f"ExecStart={gateway} "))

    def verify(path: pathlib.Path) -> subprocess.CompletedProcess:
        return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=TIMEOUT)

    r = verify(unit)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # the check can fail: a misspelt key is reported
    typo = tmp_path / "typo" / "gateway.service"
    typo.parent.mkdir()
    typo.write_text(unit.read_text().replace("NotifyAccess=", "NotifyAcess="))
    assert "Unknown key 'NotifyAcess'" in verify(typo).stderr

    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str
    ini.read_string(text)
    service = ini["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure" and service["WatchdogSec"] == "30s"
