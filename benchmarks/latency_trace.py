"""Where a ping's round trip goes: kernel tracepoints around one latency run.

    python benchmarks/latency_trace.py [gateway|testpmd] [--pings 300]

Records, with `perf record -a -k CLOCK_MONOTONIC` (tracepoints only: this
kernel has no kprobes, and uprobes on the pump slow it enough to move the
figures), for every ping: the request leaving the far veth
(net:net_dev_xmit, 98 bytes), the XDP program's redirect (xdp:xdp_redirect,
on the sender's CPU, in its softirq), the worker being woken
(sched:sched_waking) and put on its CPU (sched:sched_switch; what ran there
before: idle or another task), poll() returning in the worker
(syscalls:sys_exit_poll/ppoll), the worker's sendto() that kicks the reply
out of the AF_XDP TX ring, and the reply arriving on the far veth
(net:netif_receive_skb, 84 bytes). The stages between them, as percentiles
over the pings, are the breakdown in the README. Needs perf and tracefs
(mounted here if missing). The worker is found by its thread name (gw-*).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import latency  # noqa: E402

EVENTS = ["net:net_dev_xmit", "net:netif_receive_skb", "xdp:xdp_redirect",
          "sched:sched_waking", "sched:sched_switch", "syscalls:sys_exit_poll",
          "syscalls:sys_exit_ppoll", "syscalls:sys_enter_sendto"]
LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
STAGES = [("xmit", "redirect", "far veth xmit -> XDP redirect"),
          ("redirect", "waking", "redirect -> worker woken"),
          ("waking", "oncpu", "woken -> on its CPU"),
          ("oncpu", "pollret", "on CPU -> poll() returns"),
          ("pollret", "sendto", "poll() returns -> reply's TX kick"),
          ("sendto", "rx", "TX kick -> reply on far veth"),
          ("xmit", "rx", "total")]


def record(setup: str, pings: int, out: str) -> dict:
    if not os.path.exists("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    argv = ["perf", "record", "-a", "-k", "CLOCK_MONOTONIC", "-m", "4M", "-o", out + ".data"]
    for e in EVENTS:
        argv += ["-e", e]
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # perf has opened its events
    try:
        result = latency.latency(setup, count=pings)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    with open(out, "w") as f:
        subprocess.run(["perf", "script", "-i", out + ".data", "-F",
                        "comm,tid,cpu,time,event,trace"], stdout=f, check=True)
    return result


def parse(path: str):
    evs = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                comm, tid, cpu, t, ev, rest = m.groups()
                evs.append((float(t) * 1e6, comm, int(tid), int(cpu), ev.rstrip(":"), rest))
    evs.sort(key=lambda e: e[0])
    return evs


def breakdown(evs, worker: str = "gw-") -> list[dict]:
    """One dict of stamps (us) per ping whose whole path was seen."""
    tids = {e[2] for e in evs if e[1].startswith(worker)}
    pings, n = [], len(evs)

    def find(i, pred, limit):
        for j in range(i, n):
            if evs[j][0] > limit:
                return None
            if pred(evs[j]):
                return j
        return None

    for i, e in enumerate(evs):
        if e[4] != "net:net_dev_xmit" or not re.search(r"dev=gwt\d+p .*len=98 ", e[5]):
            continue
        r, lim = {"xmit": e[0]}, e[0] + 50_000
        steps = [("redirect", lambda x: x[4] == "xdp:xdp_redirect"),
                 ("waking", lambda x: x[4] == "sched:sched_waking" and any(
                     f"pid={t} " in x[5] + " " for t in tids)),
                 ("oncpu", lambda x: x[4] == "sched:sched_switch" and any(
                     f"next_pid={t} " in x[5] + " " for t in tids)),
                 ("pollret", lambda x: x[4].startswith("syscalls:sys_exit_") and x[2] in tids),
                 ("sendto", lambda x: x[4] == "syscalls:sys_enter_sendto" and x[2] in tids),
                 ("rx", lambda x: x[4] == "net:netif_receive_skb" and re.search(
                     r"dev=gwt\d+p .*len=84", x[5]))]
        j = i
        for name, pred in steps:
            k = find(j, pred, lim)
            if k is None and name in ("waking", "oncpu", "pollret"):
                r[name] = None  # the worker was awake already (polling): no wake-up
                continue
            if k is None:
                break
            r[name], j = evs[k][0], k
            if name == "oncpu":
                r["before"] = re.search(r"prev_comm=(.*?) prev_pid", evs[k][5]).group(1)
        else:
            pings.append(r)
    return pings


def pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def report(pings: list[dict]) -> None:
    woke = [r for r in pings if r.get("oncpu") is not None]
    print(f"{len(pings)} pings traced; {len(pings) - len(woke)} found the worker awake")
    for a, b, name in STAGES:
        v = [r[b] - r[a] for r in pings if r.get(a) is not None and r.get(b) is not None]
        if v:
            print(f"  {name:<36} p50 {pct(v, 50):7.0f}  p90 {pct(v, 90):7.0f}  "
                  f"p99 {pct(v, 99):7.0f} us  ({len(v)} pings)")
    idle = sum(1 for r in woke if r["before"].startswith("swapper"))
    print(f"  the worker's CPU was idle before {idle} of {len(woke)} wake-ups")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setup", nargs="?", default="gateway", choices=["gateway", "testpmd"])
    ap.add_argument("--pings", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-trace-") as tmp:
        out = os.path.join(tmp, "trace.txt")
        print(record(args.setup, args.pings, out))
        report(breakdown(parse(out), "gw-" if args.setup == "gateway" else "rte-worker"))
