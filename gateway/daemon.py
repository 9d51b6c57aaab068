"""`gateway daemon`: holds every device; the other commands talk to it.

Start-up restores the attachments saved in the state directory; SIGTERM or
SIGINT undoes all kernel state (XDP programs, MAC filters, sockets) and
leaves the saved attachments for the next start, so a VM whose QEMU uses a
client-mode socket gets its network back when the daemon returns. With
`--config FILE` the file is applied after the restore (gateway/apply.py) and
again on each SIGHUP.

One daemon per state directory: it holds a flock on `$STATE_DIR/daemon.lock`
(with its pid) for its whole life. A second daemon on the same directory is
refused before it touches anything (no NIC, no socket): it would restore the
same attachments onto the NICs the first one drives.

Under systemd (Type=notify) it reports readiness, its device count, its
shutdown and watchdog pings (systemd.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from gateway.api import Gateway, GatewayError
from gateway.apply import from_file, summary
from gateway.control import serve, socket_path
from gateway.datapath.worker import pin_workers, set_wake_ahead
from gateway.datapath.xdp_port import set_busy_poll
from gateway.linkwatch import LinkWatch
from gateway.pidlock import Held, PidLock
from gateway.systemd import Systemd

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
        config_file: str | None = None, wake_ahead: bool = True, ready=print) -> None:
    os.makedirs(state_dir, exist_ok=True)
    owner = lock_state_dir(state_dir)  # first: a second daemon must change nothing
    try:
        set_wake_ahead(wake_ahead)
        _run(run_dir, state_dir, metrics_listen, cpus, busy_poll_us, config_file, ready)
    finally:
        owner.release()


def _run(run_dir: str, state_dir: str, metrics_listen: str | None, cpus: list[int] | None,
         busy_poll_us: int | None, config_file: str | None, ready) -> None:
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
            # here, not at the top: prometheus_client costs ~1.7 MiB of RSS for nothing
            # when metrics are off (the README's footprint table)
            from gateway.metrics import serve_metrics

            try:
                metrics = serve_metrics(gw, metrics_listen)
            except (ValueError, OSError) as e:
                raise GatewayError(f"metrics endpoint: {e}") from None
        asyncio.run(_main(gw, run_dir, config_file, ready))
    finally:
        if metrics is not None:
            metrics[0].shutdown()
        gw.shutdown()
        log.info("stopped; kernel state undone")


def apply_config(gw: Gateway, path: str | None, at_start: bool) -> None:
    """`--config FILE`, at start (a refusal or a failure stops the daemon, as a bad
    nginx.conf does) and on SIGHUP (both logged; the devices stay as they were)."""
    if path is None:
        log.warning("SIGHUP: no --config file, nothing to reload")
        return
    try:
        result = from_file(gw, path)
    except GatewayError as e:
        if at_start:
            raise
        log.error("SIGHUP: %s; nothing changed", e)
        return
    except Exception:  # a bug must not take a running daemon down
        if at_start:
            raise
        log.exception("SIGHUP: applying %s failed", path)
        return
    if result["error"] and at_start:
        raise GatewayError(result["error"])
    (log.error if result["error"] else log.info)("%s", summary(result))


async def _main(gw: Gateway, run_dir: str, config_file: str | None, ready) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    systemd = Systemd(gw)
    one_at_a_time = systemd.requests  # a ThreadPoolExecutor(1): see systemd.py
    # SIGHUP: the --config file again, queued behind the restore and any request;
    # systemd hears RELOADING=1 before and READY=1 after (ExecReload= in the unit)
    loop.add_signal_handler(signal.SIGHUP, one_at_a_time.submit, systemd.reloading,
                            apply_config, gw, config_file, False)
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
        if config_file:  # after the restore: the file has the last word
            await loop.run_in_executor(one_at_a_time, apply_config, gw, config_file, True)
        await systemd.ready()
        ready(f"gateway daemon ready on {socket_path(run_dir)}")
        await stop.wait()
    finally:
        systemd.stopping()
        watch.stop()
        # captures hold their connections open: end them (each reader is told)
        # before the server closes, which waits for its connections
        await loop.run_in_executor(one_at_a_time, gw.end_captures, "the daemon is stopping")
        server.close()
        await server.wait_closed()
        try:
            os.unlink(socket_path(run_dir))
        except FileNotFoundError:
            pass
