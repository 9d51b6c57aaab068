"""One thread per queue pair: guest TX → port, port → guest RX.

The port queue moves each burst with one C call (GIL released), so Python
runs once per burst, not per frame; an AF_XDP queue goes further and `pump`s
in C until its rings have been quiet for a while, so Python runs only when the
traffic stops. When a pass moves nothing, the worker asks the guest to kick,
re-checks the rings (a kick may have been skipped just before) and sleeps in
poll() on the kick eventfds, the port's fd and its own wake-up eventfd.

Latency at light load (issue 15). A sleeping worker pays for its wake-up when
a lone frame comes: an idle vCPU's wake-up, the GIL and Python, or, on a CPU
running something else, that task's time slice. So, by default:
- a worker asks the scheduler for a short slice (sched_setattr, SCHED_OTHER
  with sched_runtime, kernel 6.12+): waking on a busy CPU it preempts the
  running task instead of waiting up to ~3 ms for its slice to end;
- its timer slack is 1 ns, so a timed sleep ends when asked;
- it learns when bursts arrive (`Arrivals`): when they come regularly it
  wakes a little ahead of the next one and polls the rings for a bounded
  window, so the frame finds it awake; irregular traffic gets no early
  wake-ups and costs what it did.
`--busy-poll-us` (xdp_port.set_busy_poll) stays the manual knob that spins
after every frame.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable

from gateway._native import ffi as _ffi
from gateway.datapath.port import PortQueue
from gateway.virtio.ring import RingBroken, VirtQueue, lib

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 1  # when the front-end never kicks (no-fd bit) or kicks are disabled
SLICE_NS = 100_000  # the scheduler's slice asked for workers (the kernel's minimum)

# Waking ahead of a burst (`Arrivals`): bounds that keep it cheap.
MIN_GAP_NS = 200_000  # bursts closer than this: the pump's own spin covers them
MAX_GAP_NS = 100_000_000  # further apart: a timer per burst is not worth it
WAKE_LATE_NS = 100_000  # how late a timed wake-up runs, until the worker measured it
SLACK_NS = 20_000  # the window's early margin beyond the arrivals' own jitter
MAX_WINDOW_NS = 1_000_000  # never poll longer than this for a predicted burst
DUTY = 0.05  # ... nor longer than this share of the gap between bursts
_wake_ahead = [True]

_cpus: list[int] = []  # CPUs for data-path threads, taken in turn; empty: anywhere
_turn = itertools.count()


def wasteful(walked: int, moved: int) -> bool:
    """The pump's throttle rule (gw_xskq.h), for ports without a pump."""
    return walked > lib.GW_THROTTLE_WALK and walked > lib.GW_THROTTLE_PER_FRAME * moved


def pin_workers(cpus: Iterable[int]) -> None:
    """Run every worker started from now on on one of `cpus`, in turn: a worker
    that keeps its CPU keeps its caches, and the operator keeps the guests' CPUs
    free. Refuses CPUs this process may not use."""
    cpus = sorted(set(cpus))
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if bad:
        raise ValueError(f"CPU {bad[0]} is not available to this process "
                         f"(allowed: {','.join(map(str, sorted(allowed)))})")
    _cpus[:] = cpus


def set_wake_ahead(enabled: bool) -> None:
    """Whether workers started from now on wake ahead of bursts their arrival
    history predicts (on by default; `gateway daemon --no-wake-ahead`)."""
    _wake_ahead[0] = bool(enabled)


class Arrivals:
    """When the next burst is due, from the gaps between the last ones.

    `seen(t)` takes the time (ns, CLOCK_MONOTONIC) a burst from the wire came
    after the worker slept: the pump's first move when it was polling for it
    (a window hit), `arrived(woke)` when the burst woke the worker (the
    guest's answers are not predicted: they follow within the pump's spin
    or kick). Of the last HISTORY gaps within MIN_GAP_NS..MAX_GAP_NS, the
    median is the gap and the median distance from it (MAD) the jitter:
    medians, because on a busy host a frame is now and then late by
    milliseconds, and one such outlier must not stop the predictions for the
    many on time (an average would). `window(now)` offers (sleep_ns,
    poll_until_ns) -- sleep that long, then poll the rings until then --
    once MIN_SAMPLES gaps are known (4: a pinger's fifth frame is the first
    a window can catch). The budget is DUTY of the gap, MAX_WINDOW_NS at
    most. A timed wake-up runs late (an idle vCPU's wake-up: 50-200 us on
    the test VM), so the worker sleeps that much less: `late`, the second
    largest of the last HISTORY lateness measures (`woke_late`),
    WAKE_LATE_NS until there are some. That lead and the early side, due -
    (3 MAD + SLACK_NS), are paid on every burst and share the budget: the
    lead is cut first, to leave the early side twice (a window the timer
    opens late is still mostly open); there is no window only if the early
    side twice does not fit, i.e. the jitter is too wide (irregular
    traffic). Refusing a window whenever the whole did not fit locked a
    noisy host out: no windows, so only woken arrivals, dated with a noisy
    wake-up cost, so a wider MAD, so no windows (2 hits in 1000 pings,
    measured). The late side is a budget of its own, due + budget: an
    on-time frame ends the polling, so only a late one pays for it, and a
    sender's lateness has a tail (a pinger's timer: 2-3 frames in 100 came
    90-200 us after a window that ended at 3 MAD, measured). So the polling
    costs at most twice DUTY of a CPU, and nothing when traffic is irregular.
    A due time that passed (the frame came late and woke us, or never came)
    moves on by whole gaps, to PHASE_KEEP gaps after the last burst; then
    nothing more is offered until the next one.
    """

    HISTORY = 16
    MIN_SAMPLES = 4
    PHASE_KEEP = 3  # due times offered after the last arrival, at most

    def __init__(self) -> None:
        self.last = 0  # the last burst's time, 0: none yet
        self.gaps: list[int] = []  # the last HISTORY gaps, oldest first
        self.gap = 0.0  # their median
        self.dev = 0.0  # their median distance from it
        self.lates: list[int] = []  # how late the last timed wake-ups ran
        self.late = float(WAKE_LATE_NS)  # ... the second largest
        self.wake_cost = float(WAKE_LATE_NS)  # ... their median

    def seen(self, t: int) -> None:
        g = t - self.last
        if self.last and MIN_GAP_NS <= g <= MAX_GAP_NS:
            self.gaps = [*self.gaps[1 - self.HISTORY:], g]
            self.gap = _median(self.gaps)
            self.dev = _median([abs(x - self.gap) for x in self.gaps])
        elif self.last and g > MAX_GAP_NS:  # a pause: start over
            self.gaps = []
        self.last = t

    def woke_late(self, ns: int) -> None:
        self.lates = [*self.lates[1 - self.HISTORY:], max(0, ns)]
        s = sorted(self.lates)
        self.late = float(s[len(s) * 7 // 8])  # the second largest of 16
        self.wake_cost = _median(s)

    def arrived(self, woke: int) -> int:
        """When a frame that woke the worker (at `woke`, CLOCK_MONOTONIC: the
        poll returned) came: a wake-up's typical cost earlier, the median
        lateness of the timed ones (the same halted-vCPU wake-up). Taking
        `woke`, or later the pump's first move, as the arrival would bias the
        phase late by the wake-up and the Python after it (50-200 us), so the
        next window opens late and misses the next frame too, and so on
        (measured: a miss followed a miss 82-89 % of the time)."""
        return woke - int(self.wake_cost)

    def window(self, now: int) -> tuple[int, int] | None:
        if len(self.gaps) < self.MIN_SAMPLES:
            return None
        early = 3 * self.dev + SLACK_NS  # +-3 MAD: ~19 frames in 20, if normal
        budget = min(MAX_WINDOW_NS, DUTY * self.gap)
        if 2 * early > budget:
            return None  # jitter too wide for the budget: irregular traffic
        # Within the budget, the timer's lead first (a window it opens late
        # is still mostly open), then the early side. The late side is a
        # budget of its own: an on-time frame ends the polling, so only a
        # late one pays for it.
        lead = min(self.late, budget - 2 * early)
        due = self.last + self.gap
        for _ in range(self.PHASE_KEEP - 1):  # passed: the frame was late, or lost
            if due - early - lead > now:
                break
            due += self.gap
        sleep = int(due - early - lead) - now
        if sleep <= 0:  # due already: the next burst wakes us
            return None
        return sleep, int(due + budget)


def _median(xs: list[int] | list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class QueuePairWorker:
    def __init__(
        self,
        name: str,
        rxq: VirtQueue,
        txq: VirtQueue,
        rx_kick: int | None,
        tx_kick: int | None,
        port: PortQueue,
        on_broken: Callable[[str], None],
        notify: Callable[[], tuple[bool, bool]] = lambda: (True, True),
    ) -> None:
        self.name = name
        self.rxq, self.txq = rxq, txq
        self.rx_kick, self.tx_kick = rx_kick, tx_kick
        self.port = port
        self.on_broken = on_broken
        self.notify = notify  # (rx, tx): may the guest kick us? (enable_guest_notification)
        self.control: list[bytes] = []  # frames from the control plane (RARP), sent to the port
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self.throttled = 0  # passes followed by a throttle pause
        self.arrivals = Arrivals()
        self.wake_ahead = _wake_ahead[0]
        self.sleeps = 0  # times the worker slept (poll)
        self.early_wakes = 0  # ... and woke ahead of a predicted burst
        self.early_hits = 0  # ... that then came within the window
        self.pumped_wakes = 0  # sleeps whose pump run followed in the same C call
        self._first_wait = 0  # the pump's first-frame window after an early wake
        self._fresh = False  # the next pump run starts after a sleep
        self._woke = 0  # when the last sleep ended
        self._thread = threading.Thread(target=self._run, name=f"gw-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._interrupt()
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._wake)

    def post(self, frame: bytes) -> None:
        """Queue a frame for the port from another thread (the control plane)."""
        with self._lock:
            self.control.append(frame)
        self._interrupt()
        os.eventfd_write(self._wake, 1)

    def _interrupt(self) -> None:
        interrupt = getattr(self.port, "interrupt", None)
        if interrupt is not None:
            interrupt()

    # -- the loop ---------------------------------------------------------------

    def _run(self) -> None:
        _short_slice()
        _name_thread(self._thread.name)  # last: a named worker has its slice (tests)
        if _cpus:
            os.sched_setaffinity(0, {_cpus[next(_turn) % len(_cpus)]})  # this thread only
        try:
            # RX kicks only while frames wait for buffers (_sleep asks then):
            # a polling guest (DPDK's virtio PMD, no EVENT_IDX) otherwise
            # writes its RX kick eventfd on every refill, a syscall in each
            # frame's round trip (virtio 1.2 2.7.10: the device may suppress).
            self.rxq.set_notify(False)
            while not self._stop:
                if not self._pass():
                    # a sleep whose pump run went idle again may go on sleeping
                    while self._sleep() and not self._stop and not self.control:
                        pass
        except RingBroken as e:
            self.on_broken(str(e))
        except Exception:  # a bug here must not kill the daemon silently
            log.exception("%s: worker failed", self.name)
            self.on_broken("internal error in the data path worker")

    def _pass(self) -> bool:
        """One round over both directions; True if anything moved."""
        if self.control:
            with self._lock:
                frames, self.control = self.control, []
            self.port.send_raw(frames)
        pump = getattr(self.port, "pump", None)
        if pump is not None:  # the port loops in C until the rings go quiet
            if self._first_wait:
                moved = pump(self.txq, self.rxq, self._first_wait)
            else:
                moved = pump(self.txq, self.rxq)
            self._learn()
            if getattr(self.port, "throttled", False):
                self._throttle()
            return moved
        walk0 = self.txq.walked_total + self.rxq.walked_total
        n = self.port.from_guest(self.txq)
        self.txq.call()  # C signals only if the used ring moved (drops included)
        k = self.port.to_guest(self.rxq)
        if k:
            self.rxq.call()
        if wasteful(self.txq.walked_total + self.rxq.walked_total - walk0, n + k):
            self._throttle()
        return bool(n or k)

    def _learn(self) -> None:
        """After the pump's first run since a sleep: when did a burst come?"""
        if self._fresh and self.port.first_ns:
            if self._first_wait:  # the pump was polling: it saw it come
                self.arrivals.seen(self.port.first_ns)
            else:
                self.arrivals.seen(min(self.port.first_ns, self.arrivals.arrived(self._woke)))
            self.early_hits += bool(self._first_wait)
        self._fresh, self._first_wait = False, 0

    def _throttle(self) -> None:
        """A guest made this pass walk descriptors for nothing (issue 12): pause
        GW_THROTTLE_MS, so it costs a bounded share of a CPU. Only the wake
        eventfd ends the pause early: stop() and post() are never delayed."""
        self.throttled += 1
        p = select.poll()
        p.register(self._wake, select.POLLIN)
        if p.poll(lib.GW_THROTTLE_MS):
            _drain(self._wake)  # the next pass sends posted frames; stop() set _stop

    def _sleep(self) -> bool:
        """Sleep until a kick, a frame, a wake-up or a timer. An AF_XDP port
        sleeps and runs the pump after it in one C call (XdpQueue.sleep), so
        no Python runs between a frame's wake-up and its forwarding. True if
        that pump run went idle again: the worker may sleep at once."""
        went = None
        rx_notify, tx_notify = self.notify()
        fds = [self._wake]
        timeout = None
        pending = self.txq.set_notify(tx_notify)
        if tx_notify and self.tx_kick is not None:
            fds.append(self.tx_kick)
        else:
            timeout = POLL_INTERVAL_MS
        backlog = self.port.backlog()
        if backlog:  # frames wait for guest buffers: wake when it adds some
            pending += self.rxq.set_notify(rx_notify)
            if rx_notify and self.rx_kick is not None:
                fds.append(self.rx_kick)
            else:
                timeout = POLL_INTERVAL_MS
        else:
            fds.extend(self.port.fds)
        if not pending and not self._stop:
            timeout_ns = -1 if timeout is None else timeout * 1_000_000
            ahead = None
            if self.wake_ahead and not backlog and hasattr(self.port, "first_ns"):
                ahead = self.arrivals.window(lib.gw_now_ns())
                if ahead is not None and 0 <= timeout_ns <= ahead[0]:
                    ahead = None  # the polling interval comes first anyway
            if ahead is not None:
                timeout_ns = ahead[0]
                wake_at = lib.gw_now_ns() + timeout_ns
            self.sleeps += 1
            sleep = getattr(self.port, "sleep", None)
            if sleep is not None and not backlog:
                ready, went = sleep(self.txq, self.rxq, fds, {self._wake},
                                    {self.tx_kick} if self.tx_kick in fds else set(),
                                    timeout_ns, ahead[1] if ahead is not None else 0)
                self._woke = self.port.woke_ns
            else:
                ready = _poll(fds, timeout_ns)
                self._woke = lib.gw_now_ns()
            for fd in ready:
                if fd not in self.port.fds:
                    _drain(fd)
            if ahead is not None:
                now = self._woke
                if now >= wake_at:  # the timer ran out (a frame may have come meanwhile)
                    self.arrivals.woke_late(now - wake_at)
                if not ready and ahead[1] > now:  # woke ahead: poll for the burst
                    self.early_wakes += 1
                    self._first_wait = ahead[1] - now
            self._fresh = True
            if went is not None:  # the pump ran in that call: what _pass does after it
                self.pumped_wakes += 1
                self._learn()
                if getattr(self.port, "throttled", False):
                    self._throttle()
                    went = True
        self.txq.set_notify(False)
        if backlog:
            self.rxq.set_notify(False)
        return went is False


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
PR_SET_TIMERSLACK = 29
SYS_SCHED_SETATTR = 314  # x86_64


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


def _short_slice() -> bool:
    """Ask for a short scheduler slice (EEVDF, kernel 6.12+: sched_runtime of a
    SCHED_OTHER thread is its slice) and a 1 ns timer slack, for this thread.
    A waking task with a shorter slice gets an earlier deadline and preempts
    a CPU hog at once; the worker's own bursts are far shorter than 100 us of
    CPU between sleeps, so it gives nothing up. Older kernels ignore the
    runtime or refuse: then only the slack changes. True if the slice took."""
    _libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    if not SLICE_NS or os.uname().machine != "x86_64" or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), policy=os.SCHED_OTHER,
                      nice=os.getpriority(os.PRIO_PROCESS, 0), runtime=SLICE_NS)
    return _libc.syscall(SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0


def _poll(fds: list[int], timeout_ns: int) -> list[int]:
    """The fds of `fds` that are readable, after waiting up to timeout_ns
    (-1: no limit) in C, the GIL released, with nanosecond resolution."""
    n = len(fds)
    cfds, revents = _ffi.new("int[]", fds), _ffi.new("short[]", n)
    r = lib.gw_poll(cfds, revents, n, timeout_ns)
    if r < 0 and r != -errno.EINTR:
        raise OSError(-r, os.strerror(-r))
    return [fds[i] for i in range(n) if revents[i]] if r > 0 else []


def _name_thread(name: str) -> None:
    """The OS name of this thread (15 bytes), so `top -H`, `ps -L` and traces
    show which device's worker a thread is."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _drain(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass
