"""The built-in demo: one device, one front-end, frames both ways, counters.

It needs no NIC and no VM: the back-end listens on a unix socket in a
temporary directory, the Python front-end (the same one the tests use) plays
QEMU over that socket, and a MemoryPort stands in for the wire. What it prints
comes from the device's own counters and from comparing bytes, so a broken
ring shows up as a failure, not as a pretty table.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend
from gateway.vhost.transport import VhostService
from gateway.virtio import features as vf


class DemoFailed(Exception):
    pass


def _frames(n: int, size: int, tag: int) -> list[bytes]:
    head = bytes.fromhex("020000000002" "020000000001") + b"\x88\xb5"
    return [head + struct.pack("!BI", tag, i) + bytes(size - 19) for i in range(n)]


def run_demo(frames: int = 20000, size: int = 64, say: Callable[[str], None] = print) -> dict:
    registry = Registry()
    started = threading.Event()
    registry.register_callbacks(on_new_device=lambda d: started.set())
    service = VhostService().start()
    port = MemoryPort()
    tmp = tempfile.mkdtemp(prefix="gateway-demo-")
    path = os.path.join(tmp, "vm0.sock")
    try:
        dev = registry.create("vm0", port)
        service.listen(dev, path)
        say(f"vhost-user back-end listening on {path}")
        with Frontend(path) as fe:
            fe.connect().setup()
            if not started.wait(10):
                raise DemoFailed("the device never started")
            say(f"front-end connected; negotiated: {' '.join(vf.names(dev.negotiated_features))}")

            out = _frames(frames, size, 1)
            t0 = time.perf_counter()
            for i in range(0, frames, 128):
                fe.transmit(out[i : i + 128])
                fe.wait_tx_done(len(out[i : i + 128]))
            got = port.queue(0).wait_received(frames, 30)
            t_tx = time.perf_counter() - t0
            if got != out:
                raise DemoFailed(f"guest → port: sent {frames}, {len(got)} arrived intact")
            say(f"guest → port: {frames} frames of {size} B intact ({frames / t_tx:,.0f} frames/s)")

            back = _frames(frames, size, 2)
            t0 = time.perf_counter()
            port.queue(0).inject(back)
            received: list[bytes] = []
            while len(received) < frames:
                n = min(128, frames - len(received))
                fe.post_rx(n)
                received += fe.receive(n)
            t_rx = time.perf_counter() - t0
            if received != back:
                raise DemoFailed("port → guest: frames differ")
            say(f"port → guest: {frames} frames of {size} B intact ({frames / t_rx:,.0f} frames/s)")
            say("(rates are bounded by the Python front-end playing the guest, not the back-end)")
        stats = dev.stats()
        say(f"device counters: {stats}")
        return stats
    finally:
        service.stop()
        port.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(tmp)
