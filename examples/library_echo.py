"""Use gateway as a library: one vhost-user device whose frames come back.

    sudo .venv/bin/python examples/library_echo.py /tmp/vm0.sock

then start a guest on that socket, e.g.
    qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu max -m 512M \\
      -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -chardev socket,id=c0,path=/tmp/vm0.sock \\
      -netdev vhost-user,id=n0,chardev=c0 \\
      -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0 ...
Every frame the guest sends is sent back to it with source and destination
MAC swapped (so a guest pinging a static ARP entry sees its own requests).
"""

import signal
import sys
import threading

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.vhost.transport import VhostService


def main(path: str) -> None:
    registry = Registry()
    registry.register_callbacks(
        on_new_device=lambda d: print(f"{d.name}: running"),
        on_destroy_device=lambda d: print(f"{d.name}: stopped"),
    )
    port = MemoryPort()
    dev = registry.create("vm0", port)
    service = VhostService().start()
    service.listen(dev, path)
    print(f"listening on {path}; Ctrl-C to stop")
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    q = port.queue(0)
    while not done.is_set():
        frames = q.wait_received(1, 0.5)
        q.inject([f[6:12] + f[0:6] + f[12:] for f in frames])
    service.stop()
    port.close()
    print(dev.stats())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vm0.sock")
