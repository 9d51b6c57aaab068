"""`gateway daemon`: holds every device; the other commands talk to it.

Start-up restores the attachments saved in the state directory; SIGTERM or
SIGINT undoes all kernel state (XDP programs, MAC filters, sockets) and
leaves the saved attachments for the next start, so a VM whose QEMU uses a
client-mode socket gets its network back when the daemon returns.

One daemon per state directory: it holds a flock on `$STATE_DIR/daemon.lock`
(with its pid) for its whole life. A second daemon on the same directory is
refused before it touches anything (no NIC, no socket): it would restore the
same attachments onto the NICs the first one drives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal

from gateway.api import Gateway, GatewayError
from gateway.control import serve, socket_path
from gateway.datapath.worker import pin_workers, set_wake_ahead
from gateway.datapath.xdp_port import set_busy_poll
from gateway.linkwatch import LinkWatch
from gateway.metrics import serve_metrics
from gateway.pidlock import Held, PidLock

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"


def lock_state_dir(state_dir: str) -> PidLock:
    """The state directory's lock, or a GatewayError naming the daemon holding it."""
    path = os.path.join(state_dir, LOCK_NAME)
    try:
        return PidLock.take(path)
    except Held as e:
        who = f"pid {e.pid}" if e.pid else "another process"
        raise GatewayError(f"another gateway daemon ({who}) is running on state directory "
                           f"{state_dir} ({path}); not starting") from None
    except OSError as e:
        raise GatewayError(f"cannot lock state directory {state_dir}: {e}") from None


def run(run_dir: str, state_dir: str, *, metrics_listen: str | None = None,
        cpus: list[int] | None = None, busy_poll_us: int | None = None,
        wake_ahead: bool = True, ready=print) -> None:
    os.makedirs(state_dir, exist_ok=True)
    owner = lock_state_dir(state_dir)  # first: a second daemon must change nothing
    try:
        set_wake_ahead(wake_ahead)
        _run(run_dir, state_dir, metrics_listen, cpus, busy_poll_us, ready)
    finally:
        owner.release()


def _run(run_dir: str, state_dir: str, metrics_listen: str | None, cpus: list[int] | None,
         busy_poll_us: int | None, ready) -> None:
    if busy_poll_us is not None:
        try:
            set_busy_poll(busy_poll_us)
        except ValueError as e:
            raise GatewayError(f"--busy-poll-us: {e}") from None
    if cpus:
        try:
            pin_workers(cpus)
        except ValueError as e:
            raise GatewayError(f"--cpus: {e}") from None
    os.makedirs(run_dir, exist_ok=True)
    gw = Gateway(run_dir, state_dir)
    metrics = None
    try:
        if metrics_listen:
            try:
                metrics = serve_metrics(gw, metrics_listen)
            except (ValueError, OSError) as e:
                raise GatewayError(f"metrics endpoint: {e}") from None
        asyncio.run(_main(gw, run_dir, ready))
    finally:
        if metrics is not None:
            metrics[0].shutdown()
        gw.shutdown()
        log.info("stopped; kernel state undone")


async def _main(gw: Gateway, run_dir: str, ready) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    one_at_a_time = concurrent.futures.ThreadPoolExecutor(1)
    server = await serve(gw, run_dir, one_at_a_time)

    def on_link(*event) -> None:  # in the request thread: never alongside a request
        try:
            gw.on_link(*event)
        except Exception:
            log.exception("handling link event %s failed", event)

    # watching first: a NIC that appears during the restore is not missed
    watch = LinkWatch(lambda *ev: one_at_a_time.submit(on_link, *ev)).start()
    try:
        restored = await loop.run_in_executor(one_at_a_time, gw.restore)
        if restored:
            log.info("restored: %s", ", ".join(restored))
        ready(f"gateway daemon ready on {socket_path(run_dir)}")
        await stop.wait()
    finally:
        watch.stop()
        server.close()
        await server.wait_closed()
        try:
            os.unlink(socket_path(run_dir))
        except FileNotFoundError:
            pass
