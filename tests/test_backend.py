"""The back-end end to end over real unix sockets, with the Python front-end."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

import pytest

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.testing.frontend import BUF_SIZE, Frontend, FrontendError
from gateway.testing.vring_driver import DriverRing
from gateway.vhost import backend as backend_mod
from gateway.vhost import device as device_mod
from gateway.vhost import protocol as p
from gateway.vhost.protocol import Request
from gateway.vhost.transport import SocketInUse, VhostService
from gateway.virtio import features as vf
from gateway.virtio.features import Net

TIMEOUT = 10


class Events:
    """new/destroy callbacks as awaitable events."""

    def __init__(self, registry: Registry) -> None:
        self.log: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        registry.register_callbacks(
            lambda d: self._add("new", d.name), lambda d: self._add("destroy", d.name)
        )

    def _add(self, kind: str, name: str) -> None:
        with self._cond:
            self.log.append((kind, name))
            self._cond.notify_all()

    def wait(self, kind: str, name: str, count: int = 1) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.log.count((kind, name)) >= count, TIMEOUT)
        assert ok, f"no {kind} for {name} (log: {self.log})"


@pytest.fixture
def gw(tmp_path):
    class Gw:
        registry = Registry()
        events = Events(registry)
        service = VhostService().start()
        ports: dict[str, MemoryPort] = {}

        def device(self, name="vm0", queue_pairs=1, client=False):
            port = MemoryPort()
            self.ports[name] = port
            dev = self.registry.create(name, port, queue_pairs=queue_pairs)
            path = str(tmp_path / f"{name}.sock")
            if client:
                self.service.connect(dev, path)
            else:
                self.service.listen(dev, path)
            return dev, port, path

    g = Gw()
    yield g
    g.service.stop()
    for port in g.ports.values():
        port.close()


def frames_of(n: int, size: int = 60, seed: int = 0) -> list[bytes]:
    return [struct.pack("!I", seed + i) + bytes((seed + i + k) & 0xFF for k in range(size - 4))
            for i in range(n)]


@pytest.mark.parametrize(
    "want, split",
    [
        (None, False),  # everything: VERSION_1, MRG_RXBUF, EVENT_IDX, 12-byte header
        (None, True),  # header split over two descriptors (ANY_LAYOUT)
        (1 << Net.PROTOCOL_FEATURES, False),  # legacy: 10-byte header, no EVENT_IDX
        (vf.SUPPORTED_FEATURES & ~(1 << Net.RING_EVENT_IDX), False),
    ],
    ids=["all", "split-header", "legacy-10-byte-header", "no-event-idx"],
)
def test_guest_tx_frames_arrive_intact(gw, want, split):
    dev, port, path = gw.device()
    with Frontend(path, want=want) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        assert fe.hdr_len == (10 if want == 1 << Net.PROTOCOL_FEATURES else 12)
        sent = frames_of(300, 200)  # more than the ring holds: it must wrap
        for i in range(0, len(sent), 60):  # 3 descriptors each at most: fits 256
            fe.transmit(sent[i : i + 60], split_header=split)
            fe.wait_tx_done(60)
        assert port.queue(0).wait_received(300, TIMEOUT) == sent
        assert dev.stats()["tx_packets"] == 300
        assert fe.get_vring_base(1) == 300


@pytest.mark.parametrize("mrg", [True, False])
def test_injected_frames_reach_the_guest(gw, mrg):
    want = None if mrg else vf.SUPPORTED_FEATURES & ~(1 << Net.MRG_RXBUF)
    dev, port, path = gw.device()
    with Frontend(path, want=want) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        frames = frames_of(50, 1514)
        if mrg:
            frames += frames_of(5, 3000, seed=100)  # needs two 2048-byte buffers each
        fe.post_rx(200)
        port.queue(0).inject(frames)
        assert fe.receive(len(frames)) == frames
        stats = dev.stats()
        assert stats["rx_packets"] == len(frames)
        assert stats["rx_bytes"] == sum(map(len, frames))


def test_rx_waits_for_guest_buffers(gw):
    dev, port, path = gw.device()
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        frames = frames_of(30)
        port.queue(0).inject(frames)
        fe.post_rx(10)
        got = fe.receive(10)
        fe.post_rx(20)  # the rest waited in the back-end for these
        got += fe.receive(20)
        assert got == frames


def test_frame_too_big_for_guest_buffers_is_dropped_and_counted(gw):
    want = vf.SUPPORTED_FEATURES & ~(1 << Net.MRG_RXBUF)
    dev, port, path = gw.device()
    with Frontend(path, want=want) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        fe.post_rx(4)
        port.queue(0).inject([b"\x01" * 3000, b"\x02" * 100])
        assert fe.receive(1) == [b"\x02" * 100]
        assert dev.stats()["drops"]["rx_too_big"] == 1


def test_two_queue_pairs_move_frames_independently(gw):
    dev, port, path = gw.device(queue_pairs=2)
    with Frontend(path, queue_pairs=2) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        for qp in (0, 1):
            fe.transmit(frames_of(20, seed=qp * 1000), qp=qp)
            assert port.queue(qp).wait_received(20, TIMEOUT) == frames_of(20, seed=qp * 1000)
            fe.post_rx(20, qp=qp)
            port.queue(qp).inject(frames_of(20, 100, seed=qp))
            assert fe.receive(20, qp=qp) == frames_of(20, 100, seed=qp)
        assert len(dev.workers) == 2


def test_memory_by_add_mem_reg(gw):
    dev, port, path = gw.device()
    with Frontend(path, add_mem_reg=True, regions=4) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        fe.transmit(frames_of(10))
        assert port.queue(0).wait_received(10, TIMEOUT) == frames_of(10)


def test_destroy_fires_when_the_front_end_stops_a_ring(gw):
    dev, port, path = gw.device()
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        assert dev.state == "running"
        fe.get_vring_base(0)
        gw.events.wait("destroy", "vm0")
        assert dev.state == "waiting"


@pytest.mark.parametrize("mode", ["server", "client"])
def test_reconnect_gets_the_same_device_and_offer(gw, mode):
    """server: the front-end dials in again; client: "QEMU" listens again and we
    reconnect with backoff. Either way the same device, the same features."""
    dev, port, path = gw.device(client=(mode == "client"))
    offers = []
    for round_ in range(3):
        with Frontend(path, server=(mode == "client")) as fe:
            fe.connect().setup()
            gw.events.wait("new", "vm0", round_ + 1)
            offers.append(fe.get_u64(Request.GET_FEATURES))
            fe.transmit(frames_of(5, seed=round_))
            assert port.queue(0).wait_received(5, TIMEOUT) == frames_of(5, seed=round_)
        gw.events.wait("destroy", "vm0", round_ + 1)
    assert len(set(offers)) == 1
    assert gw.registry.get("vm0") is dev
    assert dev.stats()["tx_packets"] == 15


def test_a_second_front_end_is_refused_while_one_is_connected(gw):
    dev, port, path = gw.device()
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.settimeout(TIMEOUT)
        assert s.recv(1) == b""  # closed by the back-end
        s.close()
        fe.transmit(frames_of(3))
        assert port.queue(0).wait_received(3, TIMEOUT) == frames_of(3)


@pytest.mark.parametrize("backlog_full", [False, True], ids=["accepting", "backlog-full"])
def test_live_socket_path_is_not_stolen(gw, tmp_path, backlog_full):
    """A process listening on the path keeps it, even one that stopped
    accepting: with its backlog full a blocking probe would wait for good on
    the daemon's request thread; the probe does not block."""
    path = str(tmp_path / "taken.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    other.listen(0)
    clients = []
    try:
        while backlog_full:  # fill the backlog: the next connect would block
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            clients.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        dev = gw.registry.create("vm9", MemoryPort())
        with pytest.raises(SocketInUse, match="in use by another process"):
            gw.service.listen(dev, path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # still the other's socket
    finally:
        for c in clients:
            c.close()
        other.close()


def test_sockets_are_0660_root_owned_and_a_symlink_is_never_followed(gw, tmp_path):
    _, _, path = gw.device("vm0")
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0
    for target in ("target.sock", "missing.sock"):  # a dead socket, and nothing at all
        if target == "target.sock":
            dead = socket.socket(socket.AF_UNIX)
            dead.bind(str(tmp_path / target))
            dead.close()
        link = tmp_path / f"via-{target}"
        link.symlink_to(tmp_path / target)
        dev = gw.registry.create(f"vm-{target}", MemoryPort())
        with pytest.raises(SocketInUse, match="symbolic link"):
            gw.service.listen(dev, str(link))
        assert link.is_symlink() and os.path.lexists(tmp_path / target) == (target == "target.sock")


def test_bad_front_end_is_cut_off_and_others_go_on(gw):
    _, port_a, path_a = gw.device("good")
    _, _, path_b = gw.device("evil")
    with Frontend(path_a) as good:
        good.connect().setup()
        gw.events.wait("new", "good")
        evil = socket.socket(socket.AF_UNIX)
        evil.connect(path_b)
        evil.settimeout(TIMEOUT)
        evil.sendall(p.encode(Request.GET_FEATURES) + struct.pack("<III", 77, 1, 0))
        assert len(evil.recv(20)) == 20  # the reply to GET_FEATURES
        assert evil.recv(1) == b""  # then closed for the unknown request
        evil.close()
        good.transmit(frames_of(5))
        assert port_a.queue(0).wait_received(5, TIMEOUT) == frames_of(5)


def test_a_header_whose_payload_never_comes_blocks_nobody(gw):
    """DPDK 22.11's control thread blocked on such a message and no other
    device could connect. Here the half-sent message waits on its own."""
    gw.service.partial_timeout = 3600  # the deadline is the next test's subject
    _, port_a, path_a = gw.device("good")
    _, port_b, path_b = gw.device("stalled")
    stall = socket.socket(socket.AF_UNIX)
    stall.connect(path_b)
    stall.sendall(p.encode(Request.SET_FEATURES, bytes(8))[:p.HEADER.size])  # no payload
    with Frontend(path_a) as good:
        good.connect().setup()
        gw.events.wait("new", "good")
        good.transmit(frames_of(5))
        assert port_a.queue(0).wait_received(5, TIMEOUT) == frames_of(5)
    stall.setblocking(False)
    with pytest.raises(BlockingIOError):  # still open, still waiting for its payload
        stall.recv(1)
    stall.close()
    with Frontend(path_b) as late:  # the stalled device is free again once it hangs up
        late.connect().setup()
        gw.events.wait("new", "stalled")
        late.transmit(frames_of(3))
        assert port_b.queue(0).wait_received(3, TIMEOUT) == frames_of(3)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


_MEM = p.mem_table([p.Region(0, 1 << 20, 0x1000_0000, 0)])
# What a front-end sends before it stops: (bytes, does an fd come with them)
PARTIAL_MESSAGES = {
    "part-of-a-header": (p.encode(Request.GET_FEATURES)[:5], False),
    "header-without-payload": (p.encode(Request.SET_FEATURES, bytes(8))[:p.HEADER.size], False),
    "half-a-payload": (p.encode(Request.SET_MEM_TABLE, _MEM)[:p.HEADER.size + len(_MEM) // 2],
                       True),
}


@pytest.mark.parametrize("kind", list(PARTIAL_MESSAGES))
def test_a_half_sent_message_is_cut_off_after_the_deadline(gw, kind, caplog):
    """QEMU and DPDK write each message whole: a front-end that stops in the
    middle of one loses its connection, and the device takes the next one."""
    gw.service.partial_timeout = 0.2
    dev, port, path = gw.device("vm0")
    data, with_fd = PARTIAL_MESSAGES[kind]
    fds_before = _fd_count()
    stall = socket.socket(socket.AF_UNIX)
    stall.connect(path)
    stall.settimeout(TIMEOUT)
    anc = []
    if with_fd:
        mem = os.memfd_create("half", os.MFD_CLOEXEC)
        os.ftruncate(mem, 1 << 20)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", mem))]
    stall.sendmsg([data], anc)
    if with_fd:
        os.close(mem)
    assert stall.recv(1) == b""  # the back-end closed it: the deadline passed
    stall.close()
    assert ("vm0: front-end sent half a message and did not finish it in 0.2 s; closing"
            in caplog.text)
    # the fd that came with the half message is closed with the connection
    _wait_for(lambda: _fd_count() == fds_before, "an fd of the half message is still open")
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        fe.transmit(frames_of(5))
        assert port.queue(0).wait_received(5, TIMEOUT) == frames_of(5)


def test_an_idle_front_end_has_no_deadline(gw):
    """Between messages a front-end may stay silent as long as it likes."""
    gw.service.partial_timeout = 0.2
    _, port_a, path_a = gw.device("idle")
    _, _, path_b = gw.device("stalled")
    with Frontend(path_a) as fe:
        # The set-up's messages carry payloads: each one armed the deadline
        # when its header came and must have disarmed it when its payload did.
        fe.connect().setup()
        gw.events.wait("new", "idle")
        assert fe.get_u64(Request.GET_FEATURES)  # answered: everything before it was handled
        stall = socket.socket(socket.AF_UNIX)
        stall.connect(path_b)
        stall.settimeout(TIMEOUT)
        stall.sendall(p.encode(Request.SET_FEATURES, bytes(8))[:p.HEADER.size])
        # A deadline left armed by the idle front-end's messages would have
        # expired before this one, which was armed after them.
        assert stall.recv(1) == b""
        stall.close()
        fe.sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # open, nothing to read
            fe.sock.recv(1)
        fe.sock.settimeout(fe.timeout)
        assert fe.get_u64(Request.GET_FEATURES)
        fe.transmit(frames_of(5))
        assert port_a.queue(0).wait_received(5, TIMEOUT) == frames_of(5)


def test_hostile_ring_marks_the_device_broken_and_spares_the_rest(gw):
    _, port_a, path_a = gw.device("good")
    bad_dev, port_b, path_b = gw.device("bad")
    with Frontend(path_a) as good, Frontend(path_b) as bad:
        good.connect().setup()
        bad.connect().setup()
        gw.events.wait("new", "bad")
        tx = bad.rings[1]
        tx.write_desc(0, 0, 64, 0, 0)
        tx.push_avail(9999 % 65536)  # a head index beyond the ring
        os.eventfd_write(bad.kicks[1], 1)
        assert bad.wait_error(1), "the ring's error eventfd must be signalled"
        gw.events.wait("destroy", "bad")
        assert bad_dev.state == "broken"
        assert "head" in bad_dev.broken_reason
        good.transmit(frames_of(5))
        assert port_a.queue(0).wait_received(5, TIMEOUT) == frames_of(5)
        # The connection stays; kicking the same lie again changes nothing ...
        os.eventfd_write(bad.kicks[1], 1)
        assert bad.get_u64(Request.GET_FEATURES) and bad_dev.state == "broken"
        bad.reset()  # ... the guest's device reset brings it back
        gw.events.wait("new", "bad", 2)
        assert bad_dev.state == "running" and bad_dev.broken_reason is None
        bad.transmit(frames_of(3, seed=50))
        assert port_b.queue(0).wait_received(3, TIMEOUT) == frames_of(3, seed=50)
    with Frontend(path_b) as again:  # so does a new session
        again.connect().setup()
        gw.events.wait("new", "bad", 3)
        assert bad_dev.state == "running"


def test_rings_of_two_queues_over_the_same_bytes_are_refused(gw):
    """Ring 1's avail ring placed over ring 0's used ring: each ring is legal
    alone, together the RX worker's used entries would be read as TX avail
    entries. Refused when the ring starts, like a used ring over its own
    descriptor table; a new session recovers."""
    dev, port, path = gw.device("vm0")
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        tx, rx = fe.rings[1], fe.rings[0]
        with pytest.raises((FrontendError, OSError)):  # closed instead of a REPLY_ACK
            fe.request(Request.SET_VRING_ADDR, p.vring_addr(
                1, fe.qva(tx.desc_gpa), fe.qva(tx.used_gpa), fe.qva(rx.used_gpa)))
            fe.get_u64(Request.GET_FEATURES)
        assert dev.state == "broken"
        assert "ring 0: used ring" in dev.broken_reason
        assert f"overlaps ring 1's avail ring at {fe.qva(rx.used_gpa):#x}" in dev.broken_reason
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0", 2)
        fe.transmit(frames_of(3))
        assert port.queue(0).wait_received(3, TIMEOUT) == frames_of(3)


def test_rings_side_by_side_are_legal(gw):
    """Ring 1 moved to start at the first 16-byte boundary after ring 0's used
    ring (the tightest legal layout): accepted, frames intact both ways."""
    dev, port, path = gw.device("vm0")
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        rx = fe.rings[0]
        end = rx.used_gpa + 6 + 8 * fe.queue_size
        fe.get_vring_base(1)
        fe.rings[1].release()
        fe.rings[1] = DriverRing(fe.mem, (end + 15) & ~15, fe.queue_size, fe._buf_gpas[1],
                                 BUF_SIZE, event_idx=bool(fe.features >> Net.RING_EVENT_IDX & 1))
        assert fe.rings[1].desc_gpa - end < 16
        fe.start_ring(1)
        gw.events.wait("new", "vm0", 2)
        fe.transmit(frames_of(20))
        assert port.queue(0).wait_received(20, TIMEOUT) == frames_of(20)
        fe.post_rx(20)
        port.queue(0).inject(frames_of(20, seed=7))
        assert fe.receive(20) == frames_of(20, seed=7)
        assert dev.state == "running"


def _lie(fe: Frontend) -> None:
    """A head index beyond the TX ring, kicked: the worker stops on it."""
    tx = fe.rings[1]
    tx.write_desc(0, 0, 64, 0, 0)
    tx.push_avail(9999 % 65536)
    os.eventfd_write(fe.kicks[1], 1)


def test_a_replaced_error_eventfd_is_never_written_after_it_is_closed(gw, monkeypatch):
    """SET_VRING_ERR arrives while a worker is signalling the ring's old error
    eventfd. The old fd may be closed only after that worker stopped: the
    freed number is taken at once here (as the next memfd would take it), and
    nothing may be written to it."""
    dev, port, path = gw.device("vm0")
    in_write, go, blocked, taken = threading.Event(), threading.Event(), [], []

    class HeldOs:  # device.py's os: its first eventfd_write waits for `go`
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def eventfd_write(fd, value):
            if not blocked:
                blocked.append(fd)
                in_write.set()
                go.wait(TIMEOUT)
            os.eventfd_write(fd, value)

    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        old = dev.conn.rings[0].err  # the back-end's number of ring 0's error eventfd
        old_fe = fe.errs[0]
        monkeypatch.setattr(device_mod, "os", HeldOs())
        _lie(fe)
        assert in_write.wait(TIMEOUT) and blocked == [old]  # mid-signal, on ring 0's fd

        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        real_close, real_pause = backend_mod._close, dev.pause

        def close(fd):
            real_close(fd)
            if fd == old:
                os.dup2(w, old, inheritable=False)  # the freed number is someone else's now
                taken.append(old)
                go.set()

        def pause(conn, qps):
            go.set()  # the worker may finish what it was doing; pause waits for it
            real_pause(conn, qps)

        monkeypatch.setattr(backend_mod, "_close", close)
        monkeypatch.setattr(dev, "pause", pause)
        new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.request(Request.SET_VRING_ERR, p.u64(0), [new])
        fe.errs[0] = new
        gw.events.wait("destroy", "vm0")  # the worker is gone, its writes done
        monkeypatch.undo()
        try:
            with pytest.raises(BlockingIOError):  # nothing went to the reused number
                os.read(r, 8)
            assert os.eventfd_read(old_fe) == 1  # the lie, told while it was ring 0's fd
            with pytest.raises(BlockingIOError):
                os.eventfd_read(new)
            assert dev.state == "broken"
            fe.reset()  # the guest resets the device; the next lie goes to the new fd only
            gw.events.wait("new", "vm0", 2)
            _lie(fe)
            assert fe.wait_error(0) and fe.wait_error(1)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(old_fe)
            with pytest.raises(BlockingIOError):
                os.read(r, 8)
        finally:
            for fd in (r, w, old_fe, *taken):
                os.close(fd)


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_no_fd_or_mapping_leaks_over_100_sessions(gw):
    dev, port, path = gw.device()
    # one session first, so lazily created objects (threads, buffers) exist
    with Frontend(path) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
    gw.events.wait("destroy", "vm0")
    fds, maps = len(os.listdir("/proc/self/fd")), _maps()
    for i in range(100):
        with Frontend(path, queue_size=64, mem_size=1 << 20) as fe:
            fe.connect().setup()
            gw.events.wait("new", "vm0", i + 2)
        gw.events.wait("destroy", "vm0", i + 2)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _maps() <= maps + 2  # allocator arenas may settle; 100 leaks would show


def test_guest_notification_off_means_no_kicks_and_polling(gw):
    dev, port, path = gw.device()
    dev.enable_guest_notification(1, False)  # the seed's API: we poll the TX ring
    with Frontend(path, want=vf.SUPPORTED_FEATURES & ~(1 << Net.RING_EVENT_IDX)) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        tx = fe.rings[1]
        tx.add_out([bytes(fe.hdr_len), frames_of(1)[0]])  # no kick at all
        assert port.queue(0).wait_received(1, TIMEOUT) == frames_of(1)
        deadline = time.monotonic() + TIMEOUT
        while not tx.used_flags & 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # a flag in guest memory: the worker sets it after its first pass
        assert tx.used_flags & 1  # VRING_USED_F_NO_NOTIFY: the guest is told not to kick
    with pytest.raises(ValueError):
        dev.enable_guest_notification(2, False)


def test_rx_kicks_are_asked_for_only_while_frames_wait_for_buffers(gw):
    """A polling guest without EVENT_IDX kicks after every RX refill unless told
    not to: a syscall in each frame's round trip that nothing needs until
    frames wait for buffers."""
    dev, port, path = gw.device()
    with Frontend(path, want=vf.SUPPORTED_FEATURES & ~(1 << Net.RING_EVENT_IDX)) as fe:
        fe.connect().setup()
        gw.events.wait("new", "vm0")
        rx = fe.rings[0]
        frames = frames_of(15)
        fe.post_rx(5)
        port.queue(0).inject(frames[:5])
        assert fe.receive(5) == frames[:5]
        assert rx.used_flags & 1  # VRING_USED_F_NO_NOTIFY, set before the first pass
        port.queue(0).inject(frames[5:])  # no buffers: these wait
        deadline = time.monotonic() + TIMEOUT
        while rx.used_flags & 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # a flag in guest memory, cleared as the worker sleeps
        assert not rx.used_flags & 1
        fe.post_rx(10)  # kicks (kick_needed): the waiting frames follow
        assert fe.receive(10) == frames[5:]
        assert rx.used_flags & 1  # and kicks are off again


def test_registry_feature_rules():
    reg = Registry()
    with pytest.raises(ValueError, match="unsupported"):
        reg.feature_enable(1 << Net.HOST_UFO)
    reg.feature_disable(1 << Net.MRG_RXBUF)
    dev = reg.create("x", MemoryPort())
    assert not dev.features >> Net.MRG_RXBUF & 1
    reg.feature_enable(1 << Net.MRG_RXBUF)
    assert not dev.features >> Net.MRG_RXBUF & 1  # a device keeps the offer it was made with
    with pytest.raises(ValueError, match="bad device name"):
        reg.create("no spaces", MemoryPort())
