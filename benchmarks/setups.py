"""What a benchmark guest plugs into: a vhost-user socket served by a setup.

Each context manager takes a topology (gateway.testing.netns) and yields the
path of a vhost-user server socket that forwards between a guest and the
topology's NIC, pinned to CPU 0 (FORWARDER_CPU); guests and traffic sources
run on CPU 1 (SOURCE_CPU). With 2 queue pairs the forwarder's workers get one
CPU each (this machine has two). Both setups are given the same CPUs and queue
count, so figures compare like with like.

  gateway   this project's data path, in this process (threads inherit CPU 0)
  testpmd   DPDK testpmd forwarding net_vhost <-> net_af_xdp in io mode
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from gateway.datapath.worker import pin_workers
from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import testpmd as tp
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

FORWARDER_CPU = 0
SOURCE_CPU = 1
GUEST_MAC = "52:54:00:be:00:01"


SHORT_SLICE_NS = 100_000
_SYS_SCHED_SETATTR = 314  # x86_64


def short_slice(pid: int, slice_ns: int = SHORT_SLICE_NS) -> int:
    """Give every thread of `pid` a short EEVDF slice (SCHED_OTHER with
    sched_runtime, kernel 6.12+), as `chrt --other --sched-runtime` would.
    Two busy-polling tasks sharing a CPU (a traffic source and a guest) then
    take turns every ~100 us instead of every ~3 ms, so the frames one
    produces while the other waits fit in the rings between them. Returns
    how many threads took it. pid 0: the calling thread only."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("IIQiIQQQ", 48, 0, 0, 0, 0, slice_ns, 0, 0))
    done = 0
    for tid in os.listdir(f"/proc/{pid}/task") if pid else ["0"]:  # 0: this thread
        done += libc.syscall(_SYS_SCHED_SETATTR, int(tid), attr, 0) == 0
    return done


def lcores(cpu: int, workers: int = 1) -> str:
    """testpmd --lcores: the main lcore and `workers` forwarding lcores, all on `cpu`."""
    return ",".join(f"{i}@{cpu}" for i in range(workers + 1))


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Threads started inside the block run on `cpu` (they inherit the affinity)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


_sock_dir: list[str] = []  # this process's directory for sockets, removed at exit
_sock_n = itertools.count()


def _sock(name: str) -> str:
    """A fresh socket path (numbered: a setup's socket may outlive it) in one
    directory per process, removed at exit: a directory per socket left
    thousands behind in /tmp."""
    if not _sock_dir:
        _sock_dir.append(tempfile.mkdtemp(prefix="gw-bench-"))
        atexit.register(shutil.rmtree, _sock_dir[0], True)
    return os.path.join(_sock_dir[0], f"{next(_sock_n)}-{name}")


def forwarder_cpus(queue_pairs: int) -> list[int]:
    return [FORWARDER_CPU] if queue_pairs == 1 else [FORWARDER_CPU, SOURCE_CPU]


@contextlib.contextmanager
def serve_gateway(topo, queue_pairs: int = 1, mac: str = GUEST_MAC) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        pin_workers(forwarder_cpus(queue_pairs))  # as `gateway daemon --cpus` does
        stack.callback(pin_workers, [])
        with pinned(FORWARDER_CPU):
            nic = Nic(topo.nic)
            stack.callback(nic.close)
            port = XdpPort(nic, "bench", mac, queue_pairs=queue_pairs)
            stack.callback(port.close)
            service = VhostService().start()
            stack.callback(service.stop)
            sock = _sock("gateway.sock")
            service.listen(Registry().create("bench", port, queue_pairs=queue_pairs), sock)
        yield sock


@contextlib.contextmanager
def serve_testpmd(topo, queue_pairs: int = 1) -> Iterator[str]:
    sock = _sock("testpmd.sock")
    vhost = f"net_vhost0,iface={sock},queues={queue_pairs}"
    with tp.Testpmd(vdev=vhost, eal_args=["--vdev", f"net_af_xdp0,iface={topo.nic},"
                                          f"queue_count={queue_pairs}"],
                    lcores=",".join(f"{i}@{c}" for i, c in enumerate(
                        [FORWARDER_CPU, *forwarder_cpus(queue_pairs)])), nb_cores=queue_pairs,
                    queues=queue_pairs, args=["--forward-mode=io"]) as fwd:
        fwd.wait_ready()
        retry(fwd)
        LAST_TESTPMD_ARGV[:] = fwd.argv
        fwd.start()
        yield sock


LAST_TESTPMD_ARGV: list[str] = []  # for the benchmark's record of command lines


def retry(fwd: tp.Testpmd) -> None:
    """DPDK at its best for vhost: a burst the guest ring cannot take now is
    retried (64 x 1 us, testpmd's defaults) instead of dropped at once, so
    frames wait in the AF_XDP ring as the gateway lets them wait."""
    fwd.cmd("set fwd io retry")


_devices: list = []  # the gateway devices serve_many runs now (worker_counters)


@contextlib.contextmanager
def serve_many(setup: str, topos: list) -> Iterator[tuple[list[str], int | None]]:
    """One forwarder for several devices, each on its own topology's NIC, as an
    operator would run them: one gateway (its workers all on FORWARDER_CPU),
    or one testpmd whose single forwarding lcore serves every vhost/af_xdp
    port pair (io mode, paired ports). Yields the sockets and testpmd's pid
    (None for the gateway, which runs in this process)."""
    if setup.startswith("gateway"):
        with contextlib.ExitStack() as stack:
            pin_workers([FORWARDER_CPU])
            stack.callback(pin_workers, [])
            with pinned(FORWARDER_CPU):
                service = VhostService().start()
                stack.callback(service.stop)
                registry, socks = Registry(), []
                for i, topo in enumerate(topos):
                    nic = Nic(topo.nic)
                    stack.callback(nic.close)
                    port = XdpPort(nic, f"bench{i}", GUEST_MAC)
                    stack.callback(port.close)
                    dev = registry.create(f"bench{i}", port)
                    _devices.append(dev)
                    stack.callback(_devices.remove, dev)
                    socks.append(_sock(f"gateway{i}.sock"))
                    service.listen(dev, socks[-1])
            yield socks, None
        return
    socks = [_sock(f"testpmd{i}.sock") for i in range(len(topos))]
    vdevs = []
    for i, (sock, topo) in enumerate(zip(socks, topos, strict=True)):
        vdevs += [f"net_vhost{i},iface={sock},queues=1",
                  f"net_af_xdp{i},iface={topo.nic},queue_count=1"]
    with tp.Testpmd(vdev=vdevs[0], eal_args=[a for v in vdevs[1:] for a in ("--vdev", v)],
                    lcores=f"0@{FORWARDER_CPU},1@{FORWARDER_CPU}", nb_cores=1,
                    args=["--forward-mode=io", "--port-topology=paired"]) as fwd:
        fwd.wait_ready()
        retry(fwd)
        fwd.start()
        yield socks, fwd.proc.pid


def set_wake_ahead(on: bool) -> None:
    """Switch wake-ahead on or off in the running gateway workers of serve_many
    (an A/B within one run: latency(ab=...))."""
    for dev in _devices:
        for w, _ in dev.workers.values():
            w.wake_ahead = on


class IdleSpinner:
    """A process spinning at SCHED_IDLE on `cpu`, switched on and off
    (`spinner(on)`, an A/B within one run: latency(ab=...)). While it spins
    the CPU never goes idle, so the vCPU never halts between pings, but it
    gives way at once to any other task, the gateway's worker first. Its on
    and off halves tell what a halted vCPU's wake-up (the host's to do)
    costs a ping from what the gateway's own sleep does; both halves share
    the host's view of the vCPU over a second, so a vCPU idle for whole runs
    can still fare worse (README, "The goal at one device")."""

    _CODE = ("import os, sys; os.sched_setaffinity(0, {%d}); "
             "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
             "print(flush=True); sys.stdout.close()\nwhile True: pass")

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None

    def __call__(self, on: bool) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", self._CODE % self.cpu],
                                         stdout=subprocess.PIPE)
            self.proc.stdout.readline()  # pinned and SCHED_IDLE before it spins
        os.kill(self.proc.pid, signal.SIGCONT if on else signal.SIGSTOP)

    def __enter__(self) -> IdleSpinner:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def worker_counters() -> dict[str, int]:
    """Summed over the live gateway workers of serve_many: sleeps, early wake-ups
    ahead of a predicted burst, and how many of those the burst then hit."""
    out = {"sleeps": 0, "early_wakes": 0, "early_hits": 0}
    for dev in _devices:
        for w, _ in dev.workers.values():
            for k in ("sleeps", "early_wakes", "early_hits"):
                out[k] += getattr(w, k)
            out["gap_us"], out["dev_us"] = w.arrivals.gap / 1e3, w.arrivals.dev / 1e3
    return out


# gateway-packed: the same server; only the guest's rings differ (bench.guest)
SERVERS = {"gateway": serve_gateway, "gateway-packed": serve_gateway, "testpmd": serve_testpmd}
