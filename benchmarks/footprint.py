"""What an idle gateway costs: CPU when no traffic flows, memory per device.

Both are read from a real `gateway daemon` process (what an operator runs),
not from the data path in this process, so the control socket, the metrics
server and the flood reader count too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import setups

from gateway.testing.daemon import Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.testing.testpmd import Testpmd
from gateway.xdp.nic import FRAME_SIZE, NFRAMES

MIB = 1 << 20
SETTLE = 0.5  # after a guest connects: workers start, first polls run


@contextlib.contextmanager
def running_daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="gw-footprint-") as tmp:
        d = Daemon(os.path.join(tmp, "run"), os.path.join(tmp, "state")).start()
        try:
            yield d
        finally:
            if d.proc.poll() is None:
                d.stop()


def attach(d: Daemon, nic: str, name: str, mac: str) -> str:
    """Attach a device; its vhost-user socket path."""
    return json.loads(d.ok("attach", name, nic, "--mac", mac, "--json"))["socket"]


def cpu_seconds(pid: int) -> float:
    """user + system time; /proc/PID/stat sums all threads, exited ones included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_percent(pid: int, seconds: float) -> float:
    """Percent of one core over `seconds`; clock-tick resolution, so 0.1 % at 10 s."""
    time.sleep(SETTLE)
    a, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - a) / (time.monotonic() - t0)


def idle_cpu(seconds: float = 10) -> dict:
    """Daemon CPU, percent of one core, with one device and no traffic.

    Three cases, because an idle worker's cost depends on the guest: none
    connected; a guest that sleeps between frames and kicks (our Python
    front-end, like a Linux virtio-net driver); a DPDK guest (testpmd rxonly)
    that busy-polls its own rings and never sleeps.
    """
    with topology() as topo, running_daemon() as d:
        pid = d.proc.pid
        sock = attach(d, topo.nic, "idle0", setups.GUEST_MAC)
        result = {"seconds": seconds, "no_guest_pct": cpu_percent(pid, seconds)}
        with Frontend(sock) as fe:
            fe.connect().setup()
            fe.post_rx(64)
            result["frontend_guest_pct"] = cpu_percent(pid, seconds)
        with Testpmd(sock, lcores=setups.lcores(setups.SOURCE_CPU),
                     args=["--forward-mode=rxonly"]) as guest:
            guest.wait_link_up(30)
            guest.start()
            result["testpmd_guest_pct"] = cpu_percent(pid, seconds)
    return result


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and its parts; Pss splits pages shared with other processes (libraries)."""
    out = {}
    for path, keys in ((f"/proc/{pid}/status", ("VmRSS", "RssAnon", "RssFile", "RssShmem")),
                       (f"/proc/{pid}/smaps_rollup", ("Pss",))):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024 / MIB
    return out


def smaps_breakdown(pid: int) -> dict[str, float]:
    """Resident MiB by what the pages are, from /proc/PID/smaps (one line per mapping):
    the UMEM (anonymous, exactly one queue's size; the kernel pins it whole),
    thread stacks (anonymous, the stack rlimit's size), the malloc heap, other
    anonymous memory (Python's object arenas, large mallocs), guest memory
    (memfd), BPF maps (held's mmap), libpython, OpenSSL (asyncio imports ssl),
    LLVM/clang/bcc (must be 0 now), other shared libraries and Python extension
    modules, the rest."""
    umem = NFRAMES * FRAME_SIZE // 1024
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0] // 1024  # the daemon inherits it
    out: dict[str, float] = {}
    size = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header: range perms off dev inode [path]
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size, name = (hi - lo) // 1024, " ".join(parts[5:])
                continue
            if parts[0] != "Rss:":
                continue
            kb = int(parts[1])
            base = os.path.basename(name)
            if not name:  # a thread's stack: the rlimit's size less its guard page(s)
                what = ("umem" if size == umem else "thread stacks"
                        if stack - 64 <= size <= stack else "anon (Python objects, mallocs)")
            elif name == "[heap]":
                what = "heap (malloc)"
            elif name.startswith("/memfd:") or name.endswith("(deleted)"):
                what = "guest memory (memfd)"
            elif name.startswith("anon_inode:bpf"):
                what = "bpf maps"
            elif base.startswith("libpython"):
                what = "libpython"
            elif base.startswith(("libcrypto", "libssl", "_ssl")):
                what = "OpenSSL"
            elif base.startswith(("libLLVM", "libclang", "libbcc")):
                what = "LLVM/clang/bcc"
            elif ".so" in base:
                what = "other libraries and extensions"
            else:
                what = "other"
            out[what] = out.get(what, 0.0) + kb / 1024
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# What the daemon imports, in the order it does, and what each adds to a fresh
# interpreter's RSS (import order matters: shared dependencies count once).
IMPORTS = ("asyncio", "gateway._native", "pyroute2", "netaddr", "click", "gateway.api",
           "gateway.control", "gateway.linkwatch", "gateway.daemon", "gateway.cli",
           "prometheus_client", "gateway.metrics")
_PROBE = """
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
out = {"interpreter": rss()}
for m in sys.argv[1:]:
    before = rss()
    importlib.import_module(m)
    out[m] = rss() - before
print(json.dumps(out))
"""


def import_breakdown() -> dict[str, float]:
    """MiB each of the daemon's imports adds, measured in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *IMPORTS], capture_output=True,
                       text=True, check=True)
    return {k: round(v, 2) for k, v in json.loads(r.stdout).items()}


def startup_and_rss(nic: str) -> dict:
    """The start-up time from `gateway daemon` to the first attach completing, and
    RSS with no device, after the first attach and after the second (no guests).

    daemon_ready_s: process start to its "ready" line (imports, link watch,
    control socket); first_attach_s: the CLI's `attach` from start to reply,
    which includes the XDP compile in a child process (compile_s, from the
    daemon's log) and the CLI's own Python start-up; start_to_first_attach_s:
    the two in a row, what an operator waits for."""
    with tempfile.TemporaryDirectory(prefix="gw-footprint-") as tmp:
        t0 = time.monotonic()
        d = Daemon(os.path.join(tmp, "run"), os.path.join(tmp, "state")).start()
        try:
            ready = time.monotonic() - t0
            pid = d.proc.pid
            time.sleep(SETTLE)
            base = memory_mib(pid)
            base_parts = smaps_breakdown(pid)
            t1 = time.monotonic()
            attach(d, nic, "su0", "52:54:00:be:02:00")
            first_attach = time.monotonic() - t1
            time.sleep(SETTLE)
            first = memory_mib(pid)
            first_parts = smaps_breakdown(pid)
            attach(d, nic, "su1", "52:54:00:be:02:01")
            time.sleep(SETTLE)
            second = memory_mib(pid)
            compile_s = None
            for line in d.log:
                if "XDP program compiled in" in line:
                    compile_s = float(line.split("compiled in")[1].split()[0])
        finally:
            d.stop()
    return {
        "daemon_ready_s": ready,
        "first_attach_s": first_attach,
        "start_to_first_attach_s": ready + first_attach,
        "compile_s": compile_s,
        "no_device_mib": base["VmRSS"],
        "first_attach_mib": first["VmRSS"],
        "second_attach_mib": second["VmRSS"],
        "no_device_pss_mib": base["Pss"],
        "first_attach_pss_mib": first["Pss"],
        "no_device_breakdown_mib": base_parts,
        "first_attach_breakdown_mib": first_parts,
    }


def print_startup(s: dict) -> None:
    compile_s = "?" if s["compile_s"] is None else f"{s['compile_s']:.2f}"
    lo, hi = s.get("start_to_first_attach_s_range", (s["start_to_first_attach_s"],) * 2)
    print(f"start-up (median of {s.get('runs', 1)}): daemon ready in {s['daemon_ready_s']:.2f} s,"
          f" first attach (CLI, XDP compile {compile_s} s in a child) "
          f"{s['first_attach_s']:.2f} s: {s['start_to_first_attach_s']:.2f} s ({lo:.2f}-"
          f"{hi:.2f}) from `gateway daemon` to the first device")
    print(f"RSS: {s['no_device_mib']:.1f} MiB with no device, {s['first_attach_mib']:.1f} MiB "
          f"after the first attach, {s['second_attach_mib']:.1f} MiB after the second "
          f"(PSS {s['no_device_pss_mib']:.1f} / {s['first_attach_pss_mib']:.1f})")
    for title, key in (("no device", "no_device_breakdown_mib"),
                       ("first attach", "first_attach_breakdown_mib")):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in s[key].items() if v >= 0.05)
        print(f"  {title}: {parts}")


def rss_per_device(n: int = 8) -> dict:
    """Daemon memory with 0 devices, then 1 and `n` on one NIC, each with a connected guest.

    Counted: the daemon's resident pages (VmRSS). The UMEM (one per NIC queue,
    shared by the devices on it) is pinned by the kernel, so all of it is
    resident from the first attach: reported as umem_mib, in no device's share.
    The first attach also has one-time costs (one_time_mib: the NIC's threads,
    the flood tap, the held map's page; bcc/LLVM no more, they stay in the
    compiler process) that are no device's either, which is why
    per_device_mib is the marginal cost, (total - first) / (n - 1), and
    avg_per_device_mib, (total - base - UMEM) / n, charges it to the n devices.
    Guest memory (the front-end's memfd, mapped by the daemon) counts only for
    the pages the daemon touched: here idle guests, so rings only. Once traffic
    flows it grows by the guest buffers the daemon copies into, pages the guest
    owns and shares (RssShmem; Pss halves them).
    """
    with topology() as topo, running_daemon() as d, contextlib.ExitStack() as guests:
        pid = d.proc.pid
        time.sleep(SETTLE)
        base = memory_mib(pid)
        for i in range(n):
            sock = attach(d, topo.nic, f"fp{i}", f"52:54:00:be:01:{i:02x}")
            guests.enter_context(Frontend(sock)).connect().setup()
            if i == 0:
                time.sleep(SETTLE)
                first = memory_mib(pid)
        time.sleep(SETTLE)
        total = memory_mib(pid)
    umem = NFRAMES * FRAME_SIZE / MIB  # the topology's NIC has one queue
    return {
        "devices": n,
        "base_mib": base["VmRSS"],
        "first_mib": first["VmRSS"],
        "total_mib": total["VmRSS"],
        "umem_mib": umem,
        "one_time_mib": first["VmRSS"] - base["VmRSS"] - umem,
        "per_device_mib": (total["VmRSS"] - first["VmRSS"]) / max(n - 1, 1),
        "avg_per_device_mib": (total["VmRSS"] - base["VmRSS"] - umem) / n,
        "total_breakdown_mib": total,
    }


def startup_runs(nic: str, runs: int) -> dict:
    """startup_and_rss `runs` times: the median of each figure, the range of the times
    (start-up swings with whatever else the machine runs; RSS hardly moves)."""
    all_runs = [startup_and_rss(nic) for _ in range(runs)]
    out = dict(all_runs[len(all_runs) // 2])
    for key in ("daemon_ready_s", "first_attach_s", "start_to_first_attach_s", "compile_s",
                "no_device_mib", "first_attach_mib", "second_attach_mib"):
        values = [r[key] for r in all_runs if r[key] is not None]
        if values:
            out[key] = statistics.median(values)
            out[key + "_range"] = (min(values), max(values))
    out["runs"] = runs
    return out


def footprint(devices: int = 8, runs: int = 3) -> dict:
    """Start-up time and RSS (startup_and_rss, `runs` times), the import breakdown
    and RSS per device (rss_per_device): `./run.sh bench --footprint-only` prints
    this alone."""
    with topology() as topo:
        out = {"startup": startup_runs(topo.nic, runs)}
    out["imports_mib"] = import_breakdown()
    out["rss"] = rss_per_device(devices)
    return out


def print_footprint(out: dict) -> None:
    print_startup(out["startup"])
    print("  imports, MiB each adds to a fresh interpreter: " + ", ".join(
        f"{k} {v:.1f}" for k, v in out["imports_mib"].items()))
    m = out["rss"]
    print(f"  with guests connected: {m['base_mib']:.1f} MiB with no device, "
          f"{m['first_mib']:.1f} with one, {m['total_mib']:.1f} with {m['devices']}; UMEM "
          f"{m['umem_mib']:.0f} MiB per NIC queue, one-time {m['one_time_mib']:.1f} MiB, per "
          f"further device {m['per_device_mib']:.2f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--no-idle", dest="idle", action="store_false", help="memory only")
    args = ap.parse_args()
    if args.idle:
        print("idle cpu", idle_cpu(args.idle_seconds))
    print_footprint(footprint(args.devices))
