"""Latency at light load without spinning (issue 15): a worker's wake-up set-up.

The predictor (`Arrivals`) is a pure function of the arrival times it is
given; the worker's side is checked by counting its sleeps and early
wake-ups, never by timing: it is on by default, it wakes ahead of a burst at
most PHASE_KEEP times after traffic stops and then stays asleep, and the switch turns it
off. What it buys in microseconds is the benchmark's business
(benchmarks/latency.py).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from gateway._native import ffi, lib

from gateway.datapath import worker, xdp_port
from gateway.datapath.worker import (
    DUTY,
    MAX_GAP_NS,
    MAX_WINDOW_NS,
    MIN_GAP_NS,
    SLACK_NS,
    WAKE_LATE_NS,
    Arrivals,
    _poll,
)
from gateway.testing.wait import until as wait_until
from gateway.testing.wired import wired_guest

MS = 1_000_000
GUEST_MAC = "52:54:00:aa:00:15"
TIMEOUT = 20


def regular(gap: int, n: int, jitter: int = 0, t0: int = 10**12) -> Arrivals:
    a = Arrivals()
    for i in range(n + 1):
        a.seen(t0 + i * gap + (jitter if i % 2 else -jitter))
    return a


# -- the predictor --------------------------------------------------------------

def test_regular_bursts_get_a_bounded_window_around_the_next_one():
    a = regular(10 * MS, 20, jitter=5_000)
    assert a.gap == 10 * MS and a.dev == 10_000  # gaps alternate 10 ms -/+ 10 us
    now = a.last + 1 * MS
    sleep, until = a.window(now)
    margin = 3 * a.dev + SLACK_NS
    due = a.last + a.gap
    budget = min(MAX_WINDOW_NS, DUTY * a.gap)
    assert now + sleep == due - margin - WAKE_LATE_NS  # from a wake-up that runs late ...
    assert until == due + budget  # ... to the late side's own budget (only late frames pay)
    assert due - (now + sleep) + margin <= budget  # lead and early side twice: one budget


def test_the_wake_up_learns_how_late_its_timer_runs():
    a = regular(10 * MS, 20)
    for _ in range(Arrivals.HISTORY):
        a.seen(a.last + 10 * MS)
        a.woke_late(30_000)
    sleep, until = a.window(a.last)
    assert a.late == 30_000 and a.last + sleep == a.last + 10 * MS - SLACK_NS - 30_000
    for _ in range(Arrivals.HISTORY):
        a.woke_late(2 * MS)  # a host that wakes us 2 ms late: the lead stays in the budget
    sleep, until = a.window(a.last)
    due = a.last + 10 * MS
    assert due - (a.last + sleep) == DUTY * a.gap - SLACK_NS  # the lead cut to the budget ...
    assert until == due + DUTY * a.gap  # ... and the window itself kept


def test_no_window_until_enough_gaps_nor_gaps_after_the_last_burst():
    a = regular(10 * MS, Arrivals.MIN_SAMPLES - 1)
    assert a.window(a.last) is None  # not a pattern yet
    a.seen(a.last + 10 * MS)
    sleep, until = a.window(a.last)
    assert until == a.last + 10 * MS + DUTY * a.gap
    # due passed (the frame is late, or lost): the next one, a gap on ...
    sleep, until = a.window(a.last + 10 * MS)
    assert until == a.last + 20 * MS + DUTY * a.gap
    # ... up to PHASE_KEEP gaps after the last burst; then the traffic stopped
    assert a.window(a.last + (Arrivals.PHASE_KEEP - 1) * 10 * MS) is not None
    assert a.window(a.last + Arrivals.PHASE_KEEP * 10 * MS) is None


def test_the_late_side_is_a_budget_of_its_own_whatever_the_jitter():
    """A late frame costs the polling up to it; an on-time one ends it. So the
    late side reaches the budget even for a sender with no jitter at all,
    while the early side, paid on every burst, stays the jitter's."""
    for jitter in (0, 20_000):
        a = regular(10 * MS, 20, jitter=jitter)
        sleep, until = a.window(a.last)
        due = a.last + a.gap
        assert until == due + DUTY * a.gap
        assert a.last + sleep == due - (3 * a.dev + SLACK_NS) - WAKE_LATE_NS
    a = regular(100 * MS, 20)  # 5 % of 100 ms is more than MAX_WINDOW_NS
    assert a.window(a.last)[1] == a.last + a.gap + MAX_WINDOW_NS


def test_a_frame_that_woke_the_worker_is_dated_back_by_the_wake_up():
    """A woken worker sees a frame a wake-up late; dating it there would move
    the next window as late, and the next frame would wake it too."""
    a = regular(10 * MS, 20)
    for _ in range(Arrivals.HISTORY):
        a.woke_late(100_000)
    arrival = a.last + 10 * MS
    a.seen(a.arrived(arrival + 100_000))  # the poll returned a wake-up after it came
    assert a.last == arrival and a.dev == 0


def test_an_outlier_does_not_stop_the_predictions():
    a = regular(10 * MS, 20)
    a.seen(a.last + 15 * MS)  # one frame 5 ms late (a busy host)
    a.seen(a.last + 10 * MS)
    assert a.gap == 10 * MS and a.dev == 0 and a.window(a.last) is not None


def test_irregular_traffic_gets_no_window():
    a = Arrivals()
    t = 10**12
    for i in range(50):  # gaps alternate 2 ms and 18 ms: same mean, dev far too big
        t += (2 if i % 2 else 18) * MS
        a.seen(t)
    assert len(a.gaps) == Arrivals.HISTORY and a.window(a.last) is None


def test_gaps_outside_the_bounds_are_not_predicted():
    close = regular(MIN_GAP_NS // 2, 20)  # the pump's spin covers these
    assert close.gaps == [] and close.window(close.last) is None
    far = regular(MAX_GAP_NS + MS, 20)  # too far apart for a timer each
    assert far.gaps == [] and far.window(far.last) is None
    a = regular(10 * MS, 10)
    a.seen(a.last + MAX_GAP_NS + 1)  # a pause in the traffic starts over
    assert a.gaps == [] and a.window(a.last) is None


def test_poll_window_never_exceeds_its_share_of_the_gap():
    # 400 us apart: even with no jitter WAKE_LATE_NS + 2 SLACK_NS > 5 % of it
    a = regular(400_000, 20)
    assert a.window(a.last) is None


# -- the sleep --------------------------------------------------------------------

def test_poll_reports_the_ready_fds_and_times_out():
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert _poll([a, b], 1_000) == []
        os.eventfd_write(b, 1)
        assert _poll([a, b], -1) == [b]
        revents = ffi.new("short[]", 1)
        assert lib.gw_poll(ffi.new("int[]", [a]), revents, 10_000, 0) < 0  # too many fds
    finally:
        os.close(a)
        os.close(b)


# -- the worker ----------------------------------------------------------------------

def _no_ipv6(topo) -> None:
    """No IPv6 on the far host: its router solicitations and MLD reports would
    wake the worker at random (these tests count wake-ups)."""
    topo.run("sysctl", "-qw", f"net.ipv6.conf.{topo.peer}.disable_ipv6=1")


@pytest.fixture
def device(tmp_path):
    with wired_guest(str(tmp_path), GUEST_MAC, name="vm15", on_topology=_no_ipv6) as (
            topo, _port, dev, fe):
        fe.post_rx(64)
        dev.topo, dev.fe = topo, fe  # for tests that send from the far host
        yield dev


def until(cond, what: str) -> None:
    wait_until(cond, what, TIMEOUT, every=0.005)  # a counter another thread sets


def thread_id(name: str) -> str:
    """The tid of this process's thread whose OS name is `name` (a thread
    just started names itself first thing: wait for it)."""
    found: list[str] = []

    def look() -> bool:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    found.append(tid)
                    return True
        return False

    until(look, f"no thread named {name}")
    return found[0]


def test_worker_is_named_with_short_slice_and_no_timer_slack(device):
    w, _ = device.workers[0]
    assert w.wake_ahead  # on by default
    tid = thread_id("gw-vm15/q0")
    with open(f"/proc/{tid}/timerslack_ns") as f:  # a tid works there, unlisted
        assert f.read().strip() == "1"
    with open(f"/proc/self/task/{tid}/sched") as f:
        sched = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in f if ":" in ln)}
    if tuple(map(int, os.uname().release.split(".")[:2])) >= (6, 12):  # sched_runtime = slice
        assert int(sched["se.slice"]) == worker.SLICE_NS


def wire_frame(tag: bytes, mac: str = GUEST_MAC) -> bytes:
    """A frame from the far host to a guest's MAC, an unassigned EtherType."""
    return bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("020000000001") \
        + b"\x88\xb5" + tag.ljust(46, b"\0")


RAW_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for i in range(int(sys.argv[3])):
    s.send(bytes.fromhex(sys.argv[2]) + i.to_bytes(2, "big"))
"""


def test_a_frame_from_the_wire_is_stamped_and_learned(device):
    w, _ = device.workers[0]
    assert w.arrivals.last == 0
    before = lib.gw_now_ns()
    device.topo.run(sys.executable, "-c", RAW_SEND, device.topo.peer,
                    wire_frame(b"wake-ahead").hex(), "1")
    until(lambda: device.stats()["rx_packets"] >= 1, "the frame never reached the guest")
    until(lambda: w.arrivals.last != 0, "the worker never learned the arrival")
    assert before < w.arrivals.last <= lib.gw_now_ns()  # the pump's CLOCK_MONOTONIC stamp
    assert w.early_wakes == 0 and w.arrivals.gaps == []  # one arrival: nothing to predict
    # forwarded by the pump run in the sleep's own C call (gw_pump_sleep), not
    # after a return to Python
    assert w.pumped_wakes >= 1


def test_pump_sleep_returns_without_a_run_for_python_work_and_plain_timeouts():
    """gw_pump_sleep's branches that must not run the pump (a zeroed pump would
    crash if they did): a RETURN fd ready (the worker's eventfd: stop, posted
    frames), a timeout with no window, a window that passed while it woke."""
    p = ffi.new("struct gw_pump *")
    a, k = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    fds, flags = ffi.new("int[]", [a, k]), ffi.new("uint8_t[]", [lib.GW_WAKE_RETURN,
                                                                lib.GW_WAKE_DRAIN])
    revents = ffi.new("short[]", 2)
    try:
        os.eventfd_write(a, 1)
        os.eventfd_write(k, 1)
        before = lib.gw_now_ns()
        assert lib.gw_pump_sleep(p, fds, flags, revents, 2, -1, 0, 0, 0) == 2
        assert (p.pumped, bool(revents[0]), bool(revents[1])) == (0, True, True)
        assert before <= p.woke_ns <= lib.gw_now_ns()
        assert os.eventfd_read(a) == 1 and os.eventfd_read(k) == 1  # Python drains these
        assert lib.gw_pump_sleep(p, fds, flags, revents, 2, 1_000, 0, 0, 0) == 0
        assert (p.pumped, p.early) == (0, 0)
        assert lib.gw_pump_sleep(p, fds, flags, revents, 2, 1_000, before, 0, 0) == 0
        assert (p.pumped, p.early) == (0, 0)  # the window passed
    finally:
        os.close(a)
        os.close(k)


def _history_due_in(w, ms: int) -> None:
    """A regular history whose next burst is due `ms` from now, with a window
    (+-320 us, from a timer expected 300 us late) that a loaded host's late
    timer still finds open."""
    now = lib.gw_now_ns()
    a = Arrivals()
    a.gaps = [90 * MS] * Arrivals.HISTORY
    a.gap, a.dev = 90.0 * MS, 100_000.0
    a.lates, a.late = [300_000], 300_000.0
    a.last = now + ms * MS - 90 * MS
    assert a.window(now) is not None
    w.arrivals = a


def test_idle_worker_wakes_ahead_once_then_stays_asleep(device):
    w, _ = device.workers[0]
    _history_due_in(w, 150)  # far enough that a worker slow to wake still sleeps first
    before = w.sleeps
    w.post(b"\xff" * 6 + bytes.fromhex(GUEST_MAC.replace(":", "")) + b"\x88\xb5" + bytes(46))
    keep = Arrivals.PHASE_KEEP
    until(lambda: w.early_wakes >= 1, "the worker never woke ahead of the predicted burst")
    # nothing came: the next gaps are tried too (a late or lost frame), no more
    until(lambda: w.early_wakes == keep, "the worker did not try the following gaps")
    until(lambda: w.sleeps >= before + keep + 1, "the worker did not go back to sleep")
    assert w.early_hits == 0
    settled, given = w.sleeps, device.stats()["rx_packets"]
    time.sleep(0.3)  # an idle window: nothing to await, we count what happened in it
    # Every further wake-up is a frame for the guest (the far host's own IPv6
    # multicast reaches it through the flood tap), none an early one.
    assert w.early_wakes == keep
    assert w.sleeps - settled <= device.stats()["rx_packets"] - given


def a_frame(device, tag: bytes, n: int = 1) -> None:
    """n frames from the far host to the guest, back to back; back when all
    arrived and the worker went back to sleep."""
    w, _ = device.workers[0]
    given, slept = device.stats()["rx_packets"], w.sleeps
    device.topo.run(sys.executable, "-c", RAW_SEND, device.topo.peer, wire_frame(tag).hex(),
                    str(n))
    until(lambda: device.stats()["rx_packets"] >= given + n, "frames never reached the guest")
    until(lambda: w.sleeps > slept, "the worker never went back to sleep")


def test_one_pump_polls_per_cpu(device):
    """Workers of several devices share a forwarder CPU: two polling at once
    took turns only at the scheduler's tick. A pump with nothing moving polls
    only while no other pump polls on its CPU; else it hands over at once
    and its worker sleeps (on a busy CPU a wake-up is cheap). The other pump
    is pretended (gw_pollers_pretend) on every CPU: the test cannot say
    where the worker runs."""
    w, _ = device.workers[0]
    until(lambda: w.port._pump is not None, "the worker never made its pump")
    pump = w.port._pump
    assert pump.share_cpu == 1

    a_frame(device, b"alone")  # it polls after the frame: nobody else does
    assert pump.handed == 0
    lib.gw_pollers_pretend(1)
    try:
        a_frame(device, b"beside another")
        assert pump.handed > 0
    finally:
        lib.gw_pollers_pretend(0)


def test_a_busy_pump_yields_only_while_another_pump_of_its_cpu_has_work(device):
    """A pump moving a load yields its CPU (every 20 us at most) while another
    pump of its CPU has work waiting (a woken one would otherwise wait until
    the busy one sleeps), and never otherwise: a lone device loses nothing.
    The other pump's work is pretended (gw_work_pretend)."""
    w, _ = device.workers[0]
    until(lambda: w.port._pump is not None, "the worker never made its pump")
    pump = w.port._pump
    assert pump.yield_busy == 1
    device.fe.post_rx(180)
    a_frame(device, b"load", 100)
    assert pump.yields == 0
    lib.gw_work_pretend(1)
    try:
        a_frame(device, b"load", 100)
        assert pump.yields > 0
    finally:
        lib.gw_work_pretend(0)


def test_a_polling_pump_gives_way_to_a_woken_pump_of_its_cpu(tmp_path):
    """Two devices' workers on one CPU: A polls after its frame (1 s here),
    holding the CPU's poll flag; B sleeps. A frame for B wakes B's worker,
    which the scheduler does not run at once beside a poller (a ping waited
    for the other ping's pump to sleep). A sees the frame in B's socket and
    yields: B's frame arrives and A counts the give-way."""
    b_mac = "52:54:00:aa:00:16"
    worker.pin_workers([0])
    xdp_port.set_busy_poll(1_000_000)
    try:
        with wired_guest(str(tmp_path), GUEST_MAC, name="vm15a", on_topology=_no_ipv6) as (
                ta, _pa, a, fa), \
             wired_guest(str(tmp_path), b_mac, name="vm15b", on_topology=_no_ipv6) as (
                tb, _pb, b, fb):
            fa.post_rx(8)
            fb.post_rx(8)
            wa, _ = a.workers[0]
            until(lambda: wa.port._pump is not None, "A's worker never made its pump")
            pump = wa.port._pump
            assert pump.give_way == 1
            ta.run(sys.executable, "-c", RAW_SEND, ta.peer, wire_frame(b"A").hex(), "1")
            until(lambda: a.stats()["rx_packets"] >= 1, "A's frame never arrived")
            assert pump.gave_way == 0  # nobody else had work
            tb.run(sys.executable, "-c", RAW_SEND, tb.peer, wire_frame(b"B", b_mac).hex(), "1")
            until(lambda: b.stats()["rx_packets"] >= 1, "B's frame never arrived")
            assert pump.gave_way >= 1
            assert fb.receive(1) == [wire_frame(b"B", b_mac) + (0).to_bytes(2, "big")]
            # B throttled just now (its guest made us walk for nothing): A,
            # polling again after a frame of its own, does not give way to it,
            # and B's frame still arrives when B's worker gets the CPU.
            wb, _ = b.workers[0]
            wb.port._pump.throttled_ns = lib.gw_now_ns()
            ta.run(sys.executable, "-c", RAW_SEND, ta.peer, wire_frame(b"A2").hex(), "1")
            until(lambda: a.stats()["rx_packets"] >= 2, "A's second frame never arrived")
            gave = pump.gave_way
            tb.run(sys.executable, "-c", RAW_SEND, tb.peer, wire_frame(b"B2", b_mac).hex(), "1")
            until(lambda: b.stats()["rx_packets"] >= 2, "B's second frame never arrived")
            assert pump.gave_way == gave
            assert fb.receive(1) == [wire_frame(b"B2", b_mac) + (0).to_bytes(2, "big")]
    finally:
        xdp_port.set_busy_poll(xdp_port.SPIN_NS // 1000)
        worker.pin_workers([])


def test_wake_ahead_can_be_switched_off(tmp_path):
    worker.set_wake_ahead(False)
    try:
        with wired_guest(str(tmp_path), GUEST_MAC, name="vm16") as (_topo, _port, dev, _fe):
            w, _ = dev.workers[0]
            assert not w.wake_ahead
            _history_due_in(w, 150)
            before = w.sleeps
            w.post(bytes(60))
            until(lambda: w.sleeps >= before + 1, "the worker never slept again")
            time.sleep(0.3)  # past the due time: an early wake-up would have come
            assert w.early_wakes == 0
    finally:
        worker.set_wake_ahead(True)
