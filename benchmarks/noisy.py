"""Noisy neighbour (issue 12): a healthy guest's throughput alone and beside a hostile one.

One NIC (the veth of gateway.testing.netns) and one gateway in this process
with two devices on it: the healthy guest's and its neighbour's. The healthy
guest and its traffic are bench.py's own (testpmd virtio-user in txonly or
rxonly, the far host's net_af_xdp testpmd, counted where the frames end up):
bench.py runs its runners with `Neighbour(attack).serve` as the server. The
neighbour is one of:

  alone         attached, no guest connected: the baseline
  burst         a guest whose TX ring offers a whole ring of 1024-descriptor
                chains of zero-length buffers (every avail entry names one
                chain; the gateway drops 3 per pass, the burst cap, and
                pauses), topped up every 10 ms so it never runs dry (1024
                chains last ~340 passes), and whose RX ring offers the same,
                device-writable, with MRG_RXBUF: the frames the far host sends
                it are walked and dropped rx_no_room
  burst-packed  the same with packed rings: a 1024 ring holds one such
                chain, rewritten each time the device took it (checked every
                ms: attacker.PackedRearm)
  stall         a guest that posts no RX buffers: its socket holds its UMEM
                share of the far host's frames, the XDP program drops the rest
                (xdp_over_share)

In every row, alone included, the far host sends the neighbour's MAC a
flood (10 kpps by default, a batch every 10 ms); with no guest behind the MAC
the XDP program drops it (xdp_stopped). So CPU 1 carries the same flood in
every row and only the neighbour's behaviour differs: on two CPUs the healthy
guest and the far host's source share CPU 1, and any extra waker there
changes how they take turns (in a trial run with the flood, 1 ms batches,
beside the attackers only, wire->guest alone came out lowest in each of 3
rounds, 0.05-0.08 Mpps against 0.09-0.14 beside the stalled guest, whose
process does nothing).

CPU sharing: CPU 0 is the gateway's (every worker of both devices, pinned as
`gateway daemon --cpus 0` would, and the control plane); CPU 1 holds the
healthy guest, the far host's traffic source, the attacking guest's process
and the far host's flood (`taskset -c 1`). The attacker's only work is a ring
re-arm and a kick (the stalling guest does nothing), the flood a batch of
frames from a raw socket: both report their own CPU time, printed beside the
figures, so a reader sees what they took from CPU 1 and that CPU 0 measured
the gateway alone.

    python benchmarks/noisy.py attacker burst|burst-packed|stall SOCKET

is the attacking guest itself (run by Neighbour as a child process).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from setups import FORWARDER_CPU, GUEST_MAC, SOURCE_CPU, _sock, pinned  # noqa: E402

from gateway.datapath.worker import pin_workers  # noqa: E402
from gateway.datapath.xdp_port import XdpPort  # noqa: E402
from gateway.registry import Registry  # noqa: E402
from gateway.testing import attacker  # noqa: E402
from gateway.testing.frontend import Frontend  # noqa: E402
from gateway.vhost.transport import VhostService  # noqa: E402
from gateway.xdp.nic import Nic  # noqa: E402

ATTACKS = ("burst", "burst-packed", "stall")
DEFAULT_ATTACKS = ("burst", "stall")
NEIGHBOUR_MAC = "52:54:00:be:00:66"
RING = 1024        # the attacker's rings: QEMU's largest, chains as long as the cap
# How often the attacker re-arms: split tops up a ring that lasts the gateway
# ~340 ms; packed must rewrite its one chain as soon as the device took it.
PERIOD = {"burst": 0.010, "burst-packed": 0.001, "stall": None}
FLOOD_PERIOD = 0.010  # the flood sends a batch this often
GOAL = 0.90        # of the throughput alone (issue 12)
STOP_TIMEOUT = 10.0

# The far host's flood to the neighbour: `batch` frames, then a `period` wait,
# until stdin closes; then what it sent and the CPU it took, as JSON.
FLOOD = """
import json, os, select, socket, sys, time
ifname, src, dst = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
batch, period = int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = dst + src + b"\\x88\\xb5" + bytes(46)
sent = full = 0
print("ready", flush=True)
t0, w0 = os.times(), time.monotonic()
while not select.select([sys.stdin], [], [], period)[0]:
    for _ in range(batch):
        try:
            s.send(frame)
            sent += 1
        except OSError:  # ENOBUFS: the veth queue is full; a flood loses frames
            full += 1
t1, w1 = os.times(), time.monotonic()
print(json.dumps({"sent": sent, "refused": full, "seconds": w1 - w0,
                  "cpu_s": t1.user + t1.system - t0.user - t0.system}), flush=True)
"""


# -- the attacking guest (a child process on SOURCE_CPU) ------------------------------


def arm(fe: Frontend, kind: str) -> Callable[[], bool]:
    """Lay the attack on the rings; returns the re-arm, True if it re-armed
    (a stalled guest lays nothing and never re-arms)."""
    if kind == "stall":
        return lambda: False
    tx, rx = fe.rings[1], fe.rings[0]
    if fe.packed:
        attacker.packed_fill(rx, RING, write=True)
        packed = attacker.PackedRearm(tx, RING, write=False)
        rearm = packed.rearm
    else:
        attacker.split_chain(rx, RING, write=True)
        attacker.split_fill(rx)
        attacker.split_chain(tx, RING, write=False)
        attacker.split_fill(tx)

        def rearm() -> bool:
            attacker.split_rearm(tx)  # one 16-bit store: the ring full again
            return True
    os.eventfd_write(fe.kicks[0], 1)
    return rearm


def attack(kind: str, sock: str) -> None:
    """Connect as a guest, arm the rings, re-arm each PERIOD until stdin closes;
    then print the rounds and the CPU the loop took (not the start-up's)."""
    if kind not in ATTACKS:
        raise SystemExit(f"unknown attack {kind!r}: choose from {', '.join(ATTACKS)}")
    fe = Frontend(sock, queue_size=RING, timeout=30, packed=kind == "burst-packed")
    try:
        rearm = arm(fe.connect().setup(), kind)
        print("ready", flush=True)
        rounds = 0
        wait = PERIOD[kind]  # None: a stalled guest never wakes
        t0, w0 = os.times(), time.monotonic()
        while True:
            if rearm():
                os.eventfd_write(fe.kicks[1], 1)
                rounds += 1
            if select.select([sys.stdin], [], [], wait)[0]:
                break  # stdin closed: the benchmark is done
        t1, w1 = os.times(), time.monotonic()
        print(json.dumps({"rounds": rounds, "seconds": w1 - w0,
                          "cpu_s": t1.user + t1.system - t0.user - t0.system}), flush=True)
    finally:
        fe.release()


class Child:
    """A child that prints "ready", runs until its stdin closes, then prints
    one JSON line (its report)."""

    def __init__(self, what: str, argv: list[str], topo=None) -> None:
        """In the far host's namespace if `topo` is given."""
        self.what = what
        kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        self.proc = topo.popen(*argv, **kw) if topo else subprocess.Popen(argv, **kw)
        self.report: dict = {}

    def __enter__(self) -> Child:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.__exit__()
            raise RuntimeError(f"{self.what} did not start (exit {self.proc.returncode})")
        return self

    def __exit__(self, *exc) -> None:
        try:  # communicate() closes stdin: the child's signal to stop
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if lines:
            self.report = json.loads(lines[-1])


def _pinned_argv(*argv: str) -> list[str]:
    return ["taskset", "-c", str(SOURCE_CPU), *argv]


def _cpu_pct(r: dict) -> float | None:
    """A child's CPU time over its attack, % of one CPU (never below 0: os.times() ticks)."""
    return max(0.0, 100 * r["cpu_s"] / r["seconds"]) if r.get("seconds") else None


# -- the gateway with two devices on one NIC ------------------------------------------


class Neighbour:
    """A server for bench.py's runners (setups.SERVERS' signature): the healthy
    guest's socket, beside a neighbour doing `attack` ("alone": none). What
    the neighbour did and cost is in .report after the server closed."""

    def __init__(self, attack: str, flood_kpps: int) -> None:
        if attack != "alone" and attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.attack, self.flood_kpps = attack, flood_kpps
        self.report: dict = {}

    @contextlib.contextmanager
    def serve(self, topo, queue_pairs: int = 1) -> Iterator[str]:
        if queue_pairs != 1:
            raise ValueError("the noisy-neighbour row runs with one queue pair")
        with contextlib.ExitStack() as stack:
            pin_workers([FORWARDER_CPU])  # both devices' workers: CPU 0 is the gateway's
            stack.callback(pin_workers, [])
            with pinned(FORWARDER_CPU):
                nic = Nic(topo.nic)
                stack.callback(nic.close)
                good = XdpPort(nic, "bench", GUEST_MAC)
                stack.callback(good.close)
                bad = XdpPort(nic, "neighbour", NEIGHBOUR_MAC)
                stack.callback(bad.close)
                service = VhostService().start()
                stack.callback(service.stop)
                registry = Registry()
                sock, bad_sock = _sock("gateway.sock"), _sock("neighbour.sock")
                service.listen(registry.create("bench", good), sock)
                bad_dev = registry.create("neighbour", bad)
                service.listen(bad_dev, bad_sock)
            children: dict[str, Child] = {}
            stack.callback(self._note_children, children)  # after they stopped
            children["flood"] = stack.enter_context(Child(
                "the far host's flood", _pinned_argv(
                    sys.executable, "-c", FLOOD, topo.peer, topo.peer_mac.replace(":", ""),
                    NEIGHBOUR_MAC.replace(":", ""),
                    str(max(1, round(self.flood_kpps * 1000 * FLOOD_PERIOD))),
                    str(FLOOD_PERIOD)), topo))
            if self.attack != "alone":
                children["attacker"] = stack.enter_context(Child(
                    f"the {self.attack} attacker", _pinned_argv(
                        sys.executable, os.path.abspath(__file__), "attacker", self.attack,
                        bad_sock)))
            # Runs first on the way out, while the attack still runs.
            stack.callback(self._note_gateway, good, bad, bad_dev)
            yield sock

    def _note_gateway(self, good, bad, bad_dev) -> None:
        s, p, hp = bad_dev.stats(), bad.stats(), good.stats()
        self.report["neighbour_drops"] = {
            "tx_short": s["drops"]["tx_short"], "rx_no_room": s["drops"]["rx_no_room"],
            "xdp_over_share": p["drop_over_share"], "xdp_stopped": p["drop_stopped"]}
        self.report["throttled"] = sum(w.throttled for w, _ in list(bad_dev.workers.values()))
        # Where the healthy guest's frames were lost, if the neighbour made it
        # lose any: its share, its socket's rings, the shared UMEM.
        self.report["healthy_drops"] = {k: hp[k] for k in (
            "drop_over_share", "rx_ring_full", "rx_fill_ring_empty_descs", "rx_dropped",
            "tx_no_frame", "tx_ring_full")}

    def _note_children(self, children: dict[str, Child]) -> None:
        g = children["attacker"].report if "attacker" in children else {}
        f = children["flood"].report if "flood" in children else {}
        self.report["attacker_cpu_pct"] = _cpu_pct(g)
        self.report["attacker_rounds"] = g.get("rounds")
        self.report["flood_cpu_pct"] = _cpu_pct(f)
        self.report["flood_kpps"] = f["sent"] / f["seconds"] / 1e3 if f.get("seconds") else None


# -- results -------------------------------------------------------------------------


def summarize(direction: str, size: int, runs: dict[str, list[tuple[float, dict]]]
              ) -> list[dict]:
    """One result per neighbour: median, min and max pps of the runs, the
    share of the median alone, and the neighbour's report of the median run."""
    out = []
    alone = statistics.median(p for p, _ in runs["alone"]) if runs.get("alone") else 0.0
    for attack, rs in runs.items():
        pps = sorted(p for p, _ in rs)
        mid = statistics.median(pps)
        report = min(rs, key=lambda r: abs(r[0] - mid))[1]
        out.append({"neighbour": attack, "direction": direction, "size": size, "queues": 1,
                    "mpps": mid / 1e6, "min_mpps": pps[0] / 1e6, "max_mpps": pps[-1] / 1e6,
                    "of_alone": mid / alone if alone else None,
                    "runs_mpps": [p / 1e6 for p, _ in rs], **report})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def table(results: list[dict]) -> str:
    lines = [f"{'direction':<12} {'size':>5} {'neighbour':<13} {'Mpps':>7} {'min':>7} "
             f"{'max':>7} {'/alone':>6} {'goal':>4}  {'attacker':>8} {'flood':>13}  "
             f"{'throttled':>9}  neighbour drops"]
    for r in results:
        share = r["of_alone"]
        goal = "-" if r["neighbour"] == "alone" or share is None else (
            "ok" if share >= GOAL else "LOW")
        flood = "-" if r.get("flood_kpps") is None else \
            f"{r['flood_kpps']:.1f}k {_pct(r['flood_cpu_pct'])}"
        drops = ", ".join(f"{k} {v}" for k, v in r.get("neighbour_drops", {}).items() if v)
        lines.append(
            f"{r['direction']:<12} {r['size']:>5} {r['neighbour']:<13} {r['mpps']:>7.3f} "
            f"{r['min_mpps']:>7.3f} {r['max_mpps']:>7.3f} "
            f"{'-' if share is None else f'{share:.2f}':>6} {goal:>4}  "
            f"{_pct(r.get('attacker_cpu_pct')):>8} {flood:>13}  "
            f"{r.get('throttled', 0):>9}  {drops or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "attacker":
        raise SystemExit(f"usage: {sys.argv[0]} attacker {'|'.join(ATTACKS)} SOCKET")
    attack(sys.argv[2], sys.argv[3])
