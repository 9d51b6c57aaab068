"""Side-by-side throughput: the gateway against DPDK doing the same job.

    ./run.sh bench [--seconds 10] [--runs 3] [--json out.json] [--plot out.png]

One topology (a veth pair: the NIC in the root namespace, its peer in a
far-host namespace), one kind of traffic source (DPDK testpmd), counted where
the frames end up. Setups:

  gateway   the guest's socket is a gateway device (this project)
  gateway-packed  the same, the guest's rings packed (virtio-user packed_vq=1)
  testpmd   testpmd forwarding net_vhost <-> net_af_xdp in io mode (DPDK's answer)
  raw       testpmd on net_af_xdp on the NIC itself, no vhost at all: the limit

Directions:

  guest->wire  the guest is testpmd virtio-user in txonly; counted on the far veth
               (its rx_packets: what the NIC end handed over)
  wire->guest  testpmd net_af_xdp txonly on the far veth, addressed to the guest's
               MAC; the guest is testpmd virtio-user in rxonly and counts

The forwarder (gateway or testpmd) runs on CPU 0, sources and guests on CPU 1;
with 2 queue pairs the forwarder gets both CPUs (this machine has two). Each
figure is the median of --runs runs, with min and max. Then: zero-loss rate
(guest->wire, binary search over a paced guest), ping latency at light load,
the gateway's idle CPU, TCP throughput of a QEMU guest with its checksum/TSO
offloads on and off (tcp_offload.py), guest->wire with a `gateway capture`
running (capture_bench.py), and the footprint: start-up time to the
first attach, RSS and its breakdown (footprint.py; alone with
--footprint-only). Nothing here asserts a timing.

Noisy neighbour (noisy.py; --no-noisy skips it, --noisy-only runs it alone):
the healthy guest's throughput with 1 queue pair alone, then beside a guest
on the same NIC running the burst attack and beside one stalling its RX ring
while the far host floods it (issue 12's goal: >= 90 % of alone).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import noisy  # noqa: E402
import setups  # noqa: E402
from setups import FORWARDER_CPU, GUEST_MAC, SOURCE_CPU, forwarder_cpus, lcores  # noqa: E402

from gateway.datapath.xdp_port import SPIN_NS, set_busy_poll  # noqa: E402
from gateway.testing import testpmd as tp  # noqa: E402
from gateway.testing.netns import topology  # noqa: E402

SETUPS = ("gateway", "gateway-packed", "testpmd", "raw")
# The extras' guests (pacer.c, latency's icmpecho) drive split rings: a packed
# row there would measure the gateway with a split guest again.
EXTRA_SETUPS = ("gateway", "testpmd")
DIRECTIONS = ("guest->wire", "wire->guest")
# guest->wire frames go to a MAC nobody has: the far veth counts them as it
# receives them and its stack drops them at once (PACKET_OTHERHOST), instead
# of spending the sender's CPU routing each one -- for every setup alike.
WIRE_DST = "02:00:00:00:00:99"
WARMUP = 1.0  # seconds before the window opens: rings fill, rates settle


GUEST_RING = 1024  # the guests' virtio-user queue_size (and testpmd --rxd/--txd)
COMMANDS: dict[str, list[str]] = {}  # the last command line of each role, for the record


def guest(sock: str, queues: int, args: list[str], setup: str = "",
          ring: int | None = None) -> tp.Testpmd:
    """A testpmd virtio-user guest on SOURCE_CPU; `ring`: its queue size."""
    if ring:
        args = [*args, f"--rxd={ring}", f"--txd={ring}"]
    g = tp.Testpmd(sock, queues=queues, nb_cores=queues, lcores=lcores(SOURCE_CPU, queues),
                   mac=GUEST_MAC, args=args,
                   packed_vq=True if setup == "gateway-packed" else None)
    if ring:  # the option goes on the vdev, which Testpmd builds
        g.argv[g.argv.index(g.vdev)] = g.vdev = f"{g.vdev},queue_size={ring}"
    return g


def record(role: str, pmd: tp.Testpmd) -> tp.Testpmd:
    COMMANDS[role] = list(pmd.argv)
    return pmd


def af_xdp(iface: str, queues: int, cpus: list[int], mode: str, size: int = 64,
           dst: str = "", netns: str | None = None) -> tp.Testpmd:
    """testpmd on net_af_xdp: the raw limit, or the far host's traffic source.

    DPDK's af_xdp driver sizes itself from ethtool's combined channels, which
    veth has none of: queue_count=2 is refused. One port per queue
    (start_queue=q) reaches every queue; testpmd drives each port from its own
    forwarding lcore."""
    vdevs = [f"net_af_xdp{q},iface={iface},start_queue={q},queue_count=1" for q in range(queues)]
    eal = [a for v in vdevs[1:] for a in ("--vdev", v)]
    lc = ",".join(f"{i}@{c}" for i, c in enumerate(
        [cpus[0], *itertools.islice(itertools.cycle(cpus), queues)]))
    args = [f"--forward-mode={mode}", "--port-topology=loop"]
    if mode == "txonly":
        args += [f"--txpkts={size}", *(f"--eth-peer={q},{dst}" for q in range(queues))]
    return tp.Testpmd(vdev=vdevs[0], eal_args=eal, nb_cores=queues, lcores=lc, args=args,
                      netns=netns)


def received(pmd: tp.Testpmd, ports: int) -> int:
    return sum(pmd.port_stats(p)["RX-packets"] for p in range(ports))


def txonly(size: int, dst: str) -> list[str]:
    return ["--forward-mode=txonly", f"--txpkts={size}", f"--eth-peer=0,{dst}"]


def rate(count: Callable[[], int], seconds: float) -> float:
    """Frames per second that `count` (a cumulative counter) sees over `seconds`."""
    time.sleep(WARMUP)  # a fixed warm-up: nothing to await
    a, t0 = count(), time.monotonic()
    time.sleep(seconds)  # the measuring window itself
    b, t1 = count(), time.monotonic()
    return (b - a) / (t1 - t0)


def guest_to_wire(setup: str, topo, size: int, queues: int, seconds: float) -> float:
    def wire() -> int:
        return topo.peer_stats()["rx_packets"]

    with contextlib.ExitStack() as stack:
        if setup == "raw":
            src = stack.enter_context(af_xdp(topo.nic, queues, forwarder_cpus(queues),
                                             "txonly", size, WIRE_DST))
        else:
            sock = stack.enter_context(setups.SERVERS[setup](topo, queues))
            src = stack.enter_context(guest(sock, queues, txonly(size, WIRE_DST), setup))
            src.wait_link_up(30)
        src.start()
        return rate(wire, seconds)


def wire_to_guest(setup: str, topo, size: int, queues: int, seconds: float) -> float:
    """The source floods from the far veth on SOURCE_CPU, where the guest
    polls too, and the kernel's XDP/veth work for every frame runs there as
    well (the sender's softirq). Two busy pollers on one CPU take turns a
    scheduler slice (~1.5-3 ms) at a time, and a 256-entry guest ring cannot
    hold what arrives while the guest waits: testpmd's forwarder dropped it
    (0.03 Mpps). So the source and the guest get a short slice (100 us,
    setups.short_slice) and the guests a 1024-entry ring, for every setup
    alike; testpmd forwards with `io retry` (setups.serve_testpmd)."""
    ports = 1
    with contextlib.ExitStack() as stack:
        if setup == "raw":
            sink = stack.enter_context(record("raw sink", af_xdp(
                topo.nic, queues, forwarder_cpus(queues), "rxonly")))
            ports = queues
        else:
            sock = stack.enter_context(setups.SERVERS[setup](topo, queues))
            sink = stack.enter_context(record("wire->guest guest", guest(
                sock, queues, ["--forward-mode=rxonly"], setup, ring=GUEST_RING)))
            sink.wait_link_up(30)
            setups.short_slice(sink.proc.pid)
        sink.start()
        src = stack.enter_context(record("wire->guest source", af_xdp(
            topo.peer, queues, [SOURCE_CPU], "txonly", size, GUEST_MAC, netns=topo.ns)))
        setups.short_slice(src.proc.pid)
        src.start()
        return rate(lambda: received(sink, ports), seconds)


RUNNERS = {"guest->wire": guest_to_wire, "wire->guest": wire_to_guest}


def cpu_busy(interval: float = 0.5) -> float:
    """The busiest CPU's share of non-idle time over `interval` (0..1)."""
    def sample() -> list[list[int]]:
        with open("/proc/stat") as f:
            return [list(map(int, ln.split()[1:])) for ln in f if ln[:3] == "cpu" and ln[3] != " "]

    a = sample()
    time.sleep(interval)  # the sampling window itself
    b = sample()
    busy = []
    for x, y in zip(a, b, strict=True):
        d = [j - i for i, j in zip(x, y, strict=True)]
        busy.append(1 - (d[3] + d[4]) / max(1, sum(d)))  # idle + iowait
    return max(busy)


def wait_quiet(max_wait: float, threshold: float = 0.1) -> bool:
    """Wait until no CPU is more than `threshold` busy, so a run measures the
    setup and not whatever else this machine runs. False if it never got quiet."""
    deadline = time.monotonic() + max_wait
    while cpu_busy() > threshold:
        if time.monotonic() > deadline:
            return False
    return True


def throughput(args) -> list[dict]:
    """Runs of the setups alternate (gateway, testpmd, raw, gateway, ...), so a
    disturbance during the benchmark hits every setup alike."""
    results = []
    for direction, queues, size in itertools.product(args.directions, args.queues, args.sizes):
        names = [s for s in args.setups if s != "testpmd" or queues == 1]
        if len(names) < len(args.setups):
            print("  testpmd: skipped with 2 queue pairs: its io mode pairs whole ports, and"
                  " net_af_xdp on veth needs one port per queue", file=sys.stderr)
        pps: dict[str, list[float]] = {n: [] for n in names}
        noisy: dict[str, int] = {n: 0 for n in names}
        for _, setup in itertools.product(range(args.runs), names):
            if not wait_quiet(args.quiet_wait):
                noisy[setup] += 1
                print("  warning: other processes keep a CPU busy; measuring anyway",
                      file=sys.stderr)
            with topology(queues=queues) as topo:
                pps[setup].append(RUNNERS[direction](setup, topo, size, queues, args.seconds))
        for setup in names:
            mid = statistics.median(pps[setup])
            results.append({"setup": setup, "direction": direction, "size": size,
                            "queues": queues, "mpps": mid / 1e6,
                            "min_mpps": min(pps[setup]) / 1e6, "max_mpps": max(pps[setup]) / 1e6,
                            "gbps": mid * size * 8 / 1e9,
                            "runs_mpps": [p / 1e6 for p in pps[setup]],
                            "noisy_runs": noisy[setup]})
            print(f"  {setup} {direction} {size} B x{queues}q: {mid / 1e6:.3f} Mpps "
                  f"(runs {', '.join(f'{p / 1e6:.3f}' for p in pps[setup])})", file=sys.stderr)
    return results


def ratio(results: list[dict], r: dict, other: str) -> float | None:
    for o in results:
        if (o["setup"] == other and o["mpps"] and
                all(o[k] == r[k] for k in ("direction", "size", "queues"))):
            return r["mpps"] / o["mpps"]
    return None


def table(results: list[dict]) -> str:
    lines = [f"{'setup':<14} {'direction':<12} {'size':>5} {'qp':>2} {'Mpps':>7} {'min':>7} "
             f"{'max':>7} {'Gbit/s':>7} {'/testpmd':>8} {'/raw':>6}"]
    for r in results:
        t, w = (ratio(results, r, o) for o in ("testpmd", "raw"))
        t, w = ("-" if x is None else f"{x:.2f}" for x in (t, w))
        lines.append(f"{r['setup']:<14} {r['direction']:<12} {r['size']:>5} {r['queues']:>2} "
                     f"{r['mpps']:>7.3f} {r['min_mpps']:>7.3f} {r['max_mpps']:>7.3f} "
                     f"{r['gbps']:>7.2f} {t:>8} {w:>6}")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Grouped bars per (direction, queue pairs): one group per frame size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["direction"], r["queues"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (direction, queues) in zip(axes[0], panels, strict=True):
        rs = [r for r in results if r["direction"] == direction and r["queues"] == queues]
        sizes = sorted({r["size"] for r in rs})
        names = [s for s in SETUPS if any(r["setup"] == s for r in rs)]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, size in enumerate(sizes):
                for r in rs:
                    if r["setup"] == name and r["size"] == size:
                        xs.append(j + i * width)
                        ys.append(r["mpps"])
                        lo.append(r["mpps"] - r["min_mpps"])
                        hi.append(r["max_mpps"] - r["mpps"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name,
                   color=f"C{SETUPS.index(name)}")  # one colour per setup in every panel
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(sizes))],
                      [f"{s} B" for s in sizes])
        ax.set_title(f"{direction}, {queues} queue pair{'s' if queues > 1 else ''}")
        ax.set_ylabel("Mpps (median; bars: min-max)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BUSY_POLL_US = 20_000  # latency also with workers polling 20 ms past the last frame
ZERO_LOSS_RING = 1024  # the paced guest's TX ring: slack for a forwarder's scheduling gaps
ZERO_LOSS_TOLERANCE = 0.10  # searches spread wider than this (of the median): unstable


def zero_loss(args) -> list[dict]:
    """Guest->wire: the highest rate the paced guest offers with nothing lost,
    gateway and testpmd alike (raw AF_XDP has no vhost ring to drop on).

    One search passes or fails a whole trial on a single scheduling hiccup of
    this shared machine, so one search is not a figure: --zero-loss-runs
    searches per setup and size, setups interleaved, give the median and the
    range; a spread wider than ZERO_LOSS_TOLERANCE of the median is flagged
    `unstable` (the machine, not the forwarder, set the figure)."""
    from pacer import PacedGuest, wire_trial, zero_loss_search

    out = []
    names = [s for s in args.setups if s in EXTRA_SETUPS]
    for size in args.sizes:
        found: dict[str, list[float]] = {n: [] for n in names}
        trials: dict[str, list] = {n: [] for n in names}
        for _, setup in itertools.product(range(args.zero_loss_runs), names):
            with topology() as topo, setups.SERVERS[setup](topo) as sock, PacedGuest(
                    sock, size, dst_mac=WIRE_DST, cpu=SOURCE_CPU,
                    queue_size=ZERO_LOSS_RING) as g:
                rate, tried = zero_loss_search(wire_trial(g, topo, args.trial_seconds), 10_000,
                                               2_000_000, max_trials=args.max_trials)
            found[setup].append(rate)
            trials[setup].append([{"mpps": r / 1e6, "lost": lost} for r, lost in tried])
        for setup in names:
            mid = statistics.median(found[setup])
            spread = (max(found[setup]) - min(found[setup])) / mid if mid else 0.0
            out.append({"setup": setup, "size": size, "mpps": mid / 1e6,
                        "min_mpps": min(found[setup]) / 1e6, "max_mpps": max(found[setup]) / 1e6,
                        "runs_mpps": [r / 1e6 for r in found[setup]],
                        "unstable": spread > ZERO_LOSS_TOLERANCE,
                        "ring": ZERO_LOSS_RING, "trials": trials[setup]})
            print(f"  zero-loss {setup} {size} B: {mid / 1e6:.3f} Mpps "
                  f"(runs {', '.join(f'{r / 1e6:.3f}' for r in found[setup])})", file=sys.stderr)
    return out


def rounds(runs: list, n: int) -> list:
    """n rounds of `runs`, every other one reversed: the host has slow phases
    (seconds of round trips near 60 us, then near 125, whichever forwarder
    runs), and a fixed order puts each setup at the same point of them."""
    return list(itertools.chain.from_iterable(
        runs if i % 2 == 0 else runs[::-1] for i in range(n)))


def latency_variants(args, zero: list[dict]) -> dict:
    """Ping latency, runs of the setups interleaved: one device, two devices
    pinged at once, one device beside a background load of half this path's
    line rate (the lowest 64 B zero-loss rate of the run: what it carries
    with nothing lost) on another device of the same forwarder; and the
    gateway with --busy-poll-us, and three switches flipped every second of
    one run (its halves saw the same machine, which a comparison of separate
    runs on this host's slow and fast phases cannot promise): wake-ahead,
    to show what it buys; --busy-poll-us, to show what sleeping costs; an
    idle spinner on the worker's CPU (setups.IdleSpinner), to show what of
    that is the halted vCPU's wake-up."""
    from latency import latency

    from gateway.datapath import worker

    def busy_poll(on: bool) -> None:
        set_busy_poll(BUSY_POLL_US if on else SPIN_NS // 1000)

    rates = [z["mpps"] for z in zero if z["size"] == 64 and z["mpps"]]
    bg = args.background_pps or 0.5 * 1e6 * (min(rates) if rates else 0.6)
    spinner = setups.IdleSpinner(FORWARDER_CPU)
    runs: list[tuple[str, str, dict, Callable[[], None]]] = []
    for setup in (s for s in args.setups if s in EXTRA_SETUPS):
        runs += [(f"{setup}, 1 device", setup, {}, lambda: None),
                 (f"{setup}, 2 devices", setup, {"devices": 2}, lambda: None),
                 (f"{setup}, 1 device + {bg / 1e6:.2f} Mpps on another", setup,
                  {"background_pps": bg}, lambda: None)]
    if "gateway" in args.setups:  # and as an operator after latency runs it
        runs += [(f"gateway, --busy-poll-us {BUSY_POLL_US}", "gateway", {},
                  lambda: set_busy_poll(BUSY_POLL_US)),
                 ("gateway, wake-ahead on/off every second", "gateway",
                  {"ab": setups.set_wake_ahead}, lambda: None),
                 (f"gateway, --busy-poll-us {BUSY_POLL_US} on/off every second", "gateway",
                  {"ab": busy_poll}, lambda: None),
                 ("gateway, an idle spinner on its CPU on/off every second", "gateway",
                  {"ab": spinner}, lambda: None)]
    out: dict[str, list[dict]] = {}
    with spinner:
        for name, setup, kw, prepare in rounds(runs, args.latency_runs):
            wait_quiet(args.quiet_wait)
            prepare()
            try:
                out.setdefault(name, []).append(latency(setup, count=args.pings, **kw))
            finally:
                set_busy_poll(SPIN_NS // 1000)
                worker.set_wake_ahead(True)
                if spinner.proc is not None:
                    spinner(False)
    merged = {}
    for name, rs in out.items():
        r = merged[name] = pooled(rs)
        sides = {side for x in rs for side in x.get("ab", {})}
        for side in sorted(sides, reverse=True):  # the same runs' two halves
            merged[f"{name}: its {side} halves"] = {
                **pooled([x["ab"][side] for x in rs if side in x.get("ab", {})]),
                "cpu_pct": r["cpu_pct"]}
        for x in rs:
            x.pop("ab", None)
    return merged


def pooled(rs: list[dict]) -> dict:
    """The runs' round trips as one sample, each run's p50/p99 alongside.
    p99 of one 500-ping run is its 5th worst, which one stalled moment of
    this shared host sets on its own (the median run's p99 swung 108-1112
    us for testpmd within one bench); over 8 runs it is the 40th worst. The
    CPU is the runs' median."""
    from latency import summary

    rtts = [x for r in rs for x in r.pop("rtts_us")]
    out = summary(rtts, sum(r["sent"] for r in rs))
    if all("cpu_pct" in r for r in rs):
        out["cpu_pct"] = statistics.median(r["cpu_pct"] for r in rs)
    for key in ("devices", "background_pps", "workers"):
        if key in rs[-1]:
            out[key] = rs[-1][key]
    out["runs"] = [{k: x[k] for k in ("p50_us", "p99_us", "cpu_pct") if k in x} for x in rs]
    return out


def extras(args) -> dict:
    """Zero-loss rate, latency, idle CPU, TCP with and without offloads, and
    RSS: printed and returned for the JSON."""
    from footprint import footprint, idle_cpu, print_footprint

    out = {"zero_loss": zero_loss(args)}
    print(f"\nzero-loss guest->wire (paced guest, TX ring {ZERO_LOSS_RING}, median of "
          f"{args.zero_loss_runs} searches):")
    for z in out["zero_loss"]:
        print(f"  {z['setup']:<8} {z['size']:>5} B  {z['mpps']:.3f} Mpps  (min {z['min_mpps']:.3f}"
              f", max {z['max_mpps']:.3f}{', UNSTABLE' if z['unstable'] else ''})")
    out["latency"] = latency_variants(args, out["zero_loss"])
    print(f"\nping round trip far host -> guest -> far host ({args.pings} pings, 10 ms apart, "
          f"{args.latency_runs} runs pooled; CPU: the forwarder's, % of one core, median run):")
    for name, lat in out["latency"].items():
        print(f"  {name:<40} p50 {lat['p50_us']:5.0f} us  p95 {lat['p95_us']:5.0f} us  "
              f"p99 {lat['p99_us']:5.0f} us  CPU {lat['cpu_pct']:5.1f} %  (runs' p50/p99 "
              + ", ".join(f"{r['p50_us']:.0f}/{r['p99_us']:.0f}" for r in lat["runs"])
              + f"; {lat['received']}/{lat['sent']} answered)")
    out["idle_cpu"] = idle_cpu(args.idle_seconds)
    i = out["idle_cpu"]
    print(f"\nidle gateway daemon, % of one core over {i['seconds']:.0f} s: no guest "
          f"{i['no_guest_pct']:.2f}, Python guest {i['frontend_guest_pct']:.2f}, "
          f"testpmd guest {i['testpmd_guest_pct']:.2f}")
    if args.tcp_runs:
        from tcp_offload import measure

        print(f"\nTCP, QEMU TCG Linux guest <-> far host, {args.tcp_mbytes} MiB each way "
              f"(guest offloads negotiated, then switched off in QEMU):")
        out["tcp_offload"] = measure(args.tcp_mbytes, args.tcp_runs,
                                     echo=lambda line: print("  " + line, flush=True))
        for name, t in out["tcp_offload"].items():
            print(f"  median {name:<13} guest->far {t['guest_to_far_mbit']:6.1f} Mbit/s  "
                  f"far->guest {t['far_to_guest_mbit']:6.1f} Mbit/s")
    if args.capture_runs:
        from capture_bench import measure as capture_measure

        print("\nguest->wire with a `gateway capture` running (reader on CPU 1), against "
              "without:")
        out["capture"] = capture_measure(args.sizes, args.capture_runs, args.capture_seconds,
                                         echo=lambda line: print("  " + line, flush=True))
    out["footprint"] = footprint(args.devices)
    print()
    print_footprint(out["footprint"])
    return out


# -- noisy neighbour (issue 12): benchmarks/noisy.py -----------------------------------


def noisy_neighbour(args) -> list[dict]:
    """The healthy guest's throughput (1 queue pair, measured by RUNNERS as
    the "gateway" rows are) alone and beside each attacking neighbour on the
    same NIC; the runs alternate (alone, burst, stall, alone, ...) so a
    disturbance hits every neighbour alike."""
    neighbours = ["alone", *args.noisy_attacks]
    results = []
    for direction, size in itertools.product(args.directions, args.noisy_sizes):
        runs: dict[str, list[tuple[float, dict]]] = {n: [] for n in neighbours}
        for _, name in itertools.product(range(args.runs), neighbours):
            if not wait_quiet(args.quiet_wait):
                print("  warning: other processes keep a CPU busy; measuring anyway",
                      file=sys.stderr)
            neighbour = noisy.Neighbour(name, args.noisy_flood_kpps)
            setups.SERVERS["noisy"] = neighbour.serve  # for this run's RUNNERS call only
            try:
                with topology() as topo:
                    pps = RUNNERS[direction]("noisy", topo, size, 1, args.seconds)
            finally:
                del setups.SERVERS["noisy"]
            runs[name].append((pps, neighbour.report))
            print(f"  noisy {name} {direction} {size} B: {pps / 1e6:.3f} Mpps", file=sys.stderr)
        results += noisy.summarize(direction, size, runs)
    print(f"\nnoisy neighbour: the healthy guest's throughput, 1 queue pair; CPU {FORWARDER_CPU}:"
          f" the gateway (both devices' workers); CPU {SOURCE_CPU}: the guests, the far host's"
          f" source, the attacker, and the far host's flood to the neighbour's MAC in every row"
          f" ({args.noisy_flood_kpps} kpps asked); goal >= {noisy.GOAL:.0%} of alone;"
          f" attacker, flood: their own CPU time")
    print(noisy.table(results))
    return results


def csv_list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", type=csv_list(int), default=[64, 1500])
    ap.add_argument("--setups", type=csv_list(str), default=list(SETUPS))
    ap.add_argument("--directions", type=csv_list(str), default=list(DIRECTIONS))
    ap.add_argument("--queues", type=csv_list(int), default=[1, 2])
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each run, wait up to this long for idle CPUs")
    ap.add_argument("--trial-seconds", type=float, default=2.0, help="per zero-loss trial")
    ap.add_argument("--max-trials", type=int, default=12, help="per zero-loss search")
    ap.add_argument("--zero-loss-runs", type=int, default=3, help="searches per setup and size")
    ap.add_argument("--pings", type=int, default=500, help="latency samples per run")
    ap.add_argument("--latency-runs", type=int, default=8, help="runs per latency variant")
    ap.add_argument("--background-pps", type=float, default=0.0,
                    help="background load for the latency variant (default: half the "
                         "lowest 64 B zero-loss rate)")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=8, help="attached for the RSS figure")
    ap.add_argument("--tcp-runs", type=int, default=3,
                    help="TCP runs per offload setting with a QEMU guest (0: none)")
    ap.add_argument("--tcp-mbytes", type=int, default=8, help="MiB each way per TCP run")
    ap.add_argument("--capture-runs", type=int, default=5,
                    help="runs with and without a capture, per size (0: none)")
    ap.add_argument("--capture-seconds", type=float, default=5.0)
    ap.add_argument("--no-extras", dest="extras", action="store_false",
                    help="throughput only: no noisy neighbour, zero-loss search, latency, "
                    "idle CPU or RSS")
    ap.add_argument("--no-noisy", dest="noisy", action="store_false",
                    help="no noisy-neighbour row")
    ap.add_argument("--noisy-only", action="store_true",
                    help="the noisy-neighbour row alone (with --seconds, --runs, --directions)")
    ap.add_argument("--noisy-attacks", type=csv_list(str), default=list(noisy.DEFAULT_ATTACKS),
                    help=f"neighbours beside the healthy guest: {', '.join(noisy.ATTACKS)}")
    ap.add_argument("--noisy-sizes", type=csv_list(int), default=[64])
    ap.add_argument("--noisy-flood-kpps", type=int, default=10,
                    help="the far host's flood to the neighbour's MAC (every row), kpps")
    ap.add_argument("--footprint-only", action="store_true",
                    help="only start-up time and RSS (footprint.py), ~1 min")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args(argv)
    for name in args.setups:
        if name not in SETUPS:
            ap.error(f"unknown setup {name!r}: choose from {', '.join(SETUPS)}")
    for name in args.directions:
        if name not in DIRECTIONS:
            ap.error(f"unknown direction {name!r}: choose from {', '.join(DIRECTIONS)}")
    for name in args.noisy_attacks:
        if name not in noisy.ATTACKS:
            ap.error(f"unknown attack {name!r}: choose from {', '.join(noisy.ATTACKS)}")
    if args.noisy_flood_kpps < 1:
        ap.error(f"--noisy-flood-kpps {args.noisy_flood_kpps}: must be at least 1")
    if args.footprint_only:
        from footprint import footprint, print_footprint

        out = {"footprint": footprint(args.devices)}
        print_footprint(out["footprint"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    results = [] if args.noisy_only else throughput(args)
    if results:
        print(table(results))
    out = {"seconds": args.seconds, "runs": args.runs, "results": results,
           "commands": {**COMMANDS, "testpmd forwarder": setups.LAST_TESTPMD_ARGV}}
    if args.noisy_only or (args.extras and args.noisy):
        out["noisy"] = noisy_neighbour(args)
    if args.extras and not args.noisy_only:
        out.update(extras(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot and results:
        plot(results, args.plot)
    return out


if __name__ == "__main__":
    main()
