"""The `gateway` command: thin click wrappers over the daemon's control socket.

Every refusal is one line on stderr and exit code 2; success is exit 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import click

from gateway.api import GatewayError

RUN_DIR = "/run/gateway"
STATE_DIR = "/var/lib/gateway"

run_dir_option = click.option(
    "--run-dir", envvar="GATEWAY_RUN_DIR", default=RUN_DIR, show_default=True,
    help="where the control socket (gateway.sock) and default vhost sockets live")


def fail(msg: str, code: int = 2):
    click.echo(f"gateway: {msg}", err=True)
    sys.exit(code)


def call(run_dir: str, cmd: str, **args):
    from gateway.control import DaemonNotRunning, request

    try:
        return request(run_dir, cmd, **args)
    except DaemonNotRunning:
        fail(f"the daemon is not running (no {run_dir}/gateway.sock): start it with "
             f"'sudo gateway daemon --run-dir {run_dir}' or 'systemctl start gateway'")
    except PermissionError:
        fail(f"no permission on {run_dir}/gateway.sock: run as root or as a member of its group")
    except GatewayError as e:
        fail(str(e))


@click.group()
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """vhost-user back-end that bridges virtual machines to a NIC over AF_XDP."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def preflight() -> None:
    """What the daemon needs, each missing piece named with its fix."""
    if os.geteuid() != 0:
        fail("the daemon needs root (XDP programs, AF_XDP sockets, netlink): run it with sudo")
    try:
        import gateway._native  # noqa: F401  (libxdp)
    except ImportError as e:
        fail(f"the AF_XDP extension does not load ({e}): apt-get install libxdp1 libbpf1, "
             "then reinstall gateway")
    from gateway.xdp.program import XdpError, bcc_available, find_kernel_headers

    try:
        bcc_available()  # not imported here: only the compiler process maps bcc/LLVM
        find_kernel_headers()
    except XdpError as e:
        fail(str(e))


def parse_cpus(text: str) -> list[int]:
    """"2,3" or "2-5,7", as taskset and DPDK's -l take them."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            fail(f"--cpus: {part.strip()!r} is not a CPU number or range (e.g. 2,3 or 2-5)")
        if a < 0 or b < a:
            fail(f"--cpus: {part.strip()!r} is not a CPU range")
        cpus.update(range(a, b + 1))
    return sorted(cpus)


@main.command()
@run_dir_option
@click.option("--state-dir", default=STATE_DIR, show_default=True,
              help="where attachments are kept across restarts")
@click.option("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics here")
@click.option("--cpus", metavar="LIST", help="run data-path workers on these CPUs, e.g. 2,3 or 2-5")
@click.option("--busy-poll-us", type=click.IntRange(0, 1_000_000), metavar="US",
              help="workers poll this long after the last frame before sleeping "
                   "[default: 150]; e.g. 20000 for DPDK-like latency, at a CPU per busy worker")
@click.option("--config", "config_file", metavar="FILE",
              type=click.Path(dir_okay=False),
              help="apply this device file (as `gateway apply`) at start and on SIGHUP")
@click.option("--wake-ahead/--no-wake-ahead", default=True, show_default=True,
              help="wake a worker just ahead of traffic that arrives regularly (at most "
                   "5 % of a CPU per worker)")
def daemon(run_dir: str, state_dir: str, metrics_listen: str | None, cpus: str | None,
           busy_poll_us: int | None, config_file: str | None, wake_ahead: bool) -> None:
    """Hold every device; the other commands talk to this process."""
    cpu_list = parse_cpus(cpus) if cpus else None
    preflight()
    from gateway.daemon import run

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # a daemon says what it does
    try:
        run(run_dir, state_dir, metrics_listen=metrics_listen, cpus=cpu_list,
            busy_poll_us=busy_poll_us, config_file=config_file, wake_ahead=wake_ahead,
            ready=lambda msg: click.echo(msg, err=True))
    except GatewayError as e:
        fail(str(e))


@main.command()
@run_dir_option
@click.argument("name")
@click.argument("iface")
@click.option("--mac", help="guest MAC (default: derived from NAME, locally administered)")
@click.option("--queues", default=1, show_default=True, type=int, help="queue pairs")
@click.option("--socket", "server_path", metavar="PATH",
              help="listen here, QEMU connects (default $RUN_DIR/NAME.sock)")
@click.option("--client", "client_path", metavar="PATH",
              help="QEMU listens here (server=on); the gateway connects and reconnects")
@click.option("--mtu", default=1500, show_default=True, type=int)
@click.option("--allow-spoofing", is_flag=True,
              help="let the guest send with source MACs other than its own (default: dropped)")
@click.option("--vlan", type=int, metavar="ID",
              help="put the device on 802.1Q VLAN ID (1-4094): tagged on the wire, "
                   "untagged in the guest")
@click.option("--migrate-from", metavar="SRC", default="",
              help="live migration: NAME is the destination QEMU's device for the VM now on "
                   "device SRC (same NIC, MAC, VLAN and queues); the MAC moves to NAME when "
                   "the VM resumes there")
@click.option("--json", "as_json", is_flag=True, help="print the device as JSON")
def attach(run_dir, name, iface, mac, queues, server_path, client_path, mtu, allow_spoofing,
           vlan, migrate_from, as_json) -> None:
    """Create device NAME on NIC IFACE and print what QEMU or libvirt need."""
    if server_path and client_path:
        fail("give --socket or --client, not both")
    if vlan is not None and not 1 <= vlan <= 4094:
        fail(f"--vlan {vlan} is outside 1..4094")
    args = {"name": name, "iface": iface, "mac": mac or "", "queues": queues, "mtu": mtu,
            "vlan": vlan or 0,
            "allow_spoofing": allow_spoofing, "mode": "client" if client_path else "server",
            "migrate_from": migrate_from,
            "socket": os.path.abspath(client_path or server_path) if (client_path or server_path)
            else ""}
    d = call(run_dir, "attach", **args)
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    on = f"{d['iface']} VLAN {d['vlan']}" if d.get("vlan") else d["iface"]
    click.echo(f"{d['name']}: attached to {on} as {d['mac']} "
               f"({'we connect to' if d['mode'] == 'client' else 'listening on'} {d['socket']})")
    click.echo("\nQEMU (replace <RAM> with the guest's memory size, e.g. 1G):\n  "
               + " ".join(d["qemu_args"]))
    click.echo("\nlibvirt: in the domain's XML, <memoryBacking> once and this <interface> "
               f"('gateway xml {d['name']}' prints it alone, for virsh attach-device):\n"
               + d["libvirt_xml"])
    if d.get("libvirt_note"):
        click.echo(f"\nnote: {d['libvirt_note']}")


def queue_size(ctx, param, value):
    from gateway.libvirt_xml import check_queue_size

    if value is not None:
        try:
            check_queue_size(f"--{param.name.replace('_', '-')}", value)
        except ValueError as e:
            fail(str(e))
    return value


@main.command()
@run_dir_option
@click.argument("name", required=False)
@click.option("--memory-backing", is_flag=True,
              help="print the domain's <memoryBacking> element instead (shared memory, "
                   "once per domain)")
@click.option("--rx-queue-size", type=int, callback=queue_size, metavar="N",
              help="virtio RX ring size: 256, 512 or 1024 [default: QEMU's, 256]")
@click.option("--tx-queue-size", type=int, callback=queue_size, metavar="N",
              help="virtio TX ring size: 256, 512 or 1024 [default: QEMU's, 256]")
def xml(run_dir, name, memory_backing, rx_queue_size, tx_queue_size) -> None:
    """libvirt's <interface> element for device NAME, e.g. for
    'virsh attach-device DOMAIN FILE --live'."""
    from gateway.libvirt_xml import MEMORY_BACKING, interface

    if memory_backing:
        click.echo(MEMORY_BACKING)
        return
    if not name:
        fail("give a device NAME (or --memory-backing)")
    for d in call(run_dir, "list"):
        if d["name"] == name:
            click.echo(interface(mac=d["mac"], socket=d["socket"], mode=d["mode"],
                                 queues=d["queues"], rx_queue_size=rx_queue_size,
                                 tx_queue_size=tx_queue_size))
            if d.get("libvirt_note"):
                click.echo(f"gateway: note: {d['libvirt_note']}", err=True)
            return
    fail(f"no device named {name}")


@main.command(name="apply")
@run_dir_option
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--dry-run", is_flag=True, help="print the plan, change nothing")
@click.option("--json", "as_json", is_flag=True, help="print the plan and its outcome as JSON")
def apply_(run_dir: str, file: str, dry_run: bool, as_json: bool) -> None:
    """Bring the daemon to the devices in FILE (TOML): attach, change, detach.

    Every device is checked before anything changes; a refusal is one line naming
    FILE, the device and the field (exit 2). A failure while carrying the plan
    out is undone (exit 1, the line says what failed and what was undone)."""
    from gateway.apply import read, summary
    from gateway.config import ConfigError
    from gateway.control import MAX_REQUEST

    if file == "-":
        source, text = "<stdin>", sys.stdin.read()
    else:
        try:
            source, text = file, read(file)
        except ConfigError as e:
            fail(str(e))
    if len(json.dumps(text)) > MAX_REQUEST - 1024:
        fail(f"{source}: too big for the control socket ({MAX_REQUEST // 1024} KiB a request)")
    result = call(run_dir, "apply", text=text, source=source, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        for step in result["plan"]:
            click.echo(step["text"])
        if not result["error"]:
            click.echo(summary(result))
    if result["error"]:
        if not as_json:
            click.echo(f"gateway: {result['error']}", err=True)
        sys.exit(1)


@main.command()
@run_dir_option
@click.argument("name")
def detach(run_dir: str, name: str) -> None:
    """Remove device NAME and everything it set up."""
    call(run_dir, "detach", name=name)


@main.command(name="list")
@run_dir_option
@click.option("--json", "as_json", is_flag=True)
def list_(run_dir: str, as_json: bool) -> None:
    """Devices with their state, features, queues and modes."""
    devices = call(run_dir, "list")
    if as_json:
        click.echo(json.dumps({"devices": devices}, indent=1))
        return
    if not devices:
        click.echo("no devices")
    for d in devices:
        state = d["state"] + (f" ({d['reason']})" if d["reason"] else "")
        vlan = f"  vlan {d['vlan']}" if d.get("vlan") else ""
        click.echo(f"{d['name']}: {state}\n"
                   f"  nic {d['iface']}{vlan}  mac {d['mac']}  queues {d['queues']}  "
                   f"mtu {d['mtu']}\n"
                   f"  socket {d['socket']} ({d['mode']} mode)\n"
                   f"  xdp {d.get('xdp_mode', '-')}  af_xdp {d.get('bind_mode', '-')}\n"
                   f"  features {' '.join(d['features']) or '-'}")
        peer = d.get("migration_peer")
        if peer:
            where = "here" if d["mac_steered_here"] else f"to {peer}"
            click.echo(f"  live migration with {peer}: MAC steered {where}")
        cap = d.get("capture")
        if cap:
            click.echo(f"  capture by pid {cap['pid']}: {cap['direction']}, "
                       f"{cap['buffer'] // 1024} KiB buffer")


@main.command()
@run_dir_option
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="live table with per-second rates")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60))
def stats(run_dir: str, name: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Per-device counters and drops by reason."""
    if watch:
        from gateway.watch import watch as live

        live(lambda: call(run_dir, "stats", name=name), interval)
        return
    s = call(run_dir, "stats", name=name)
    if as_json:
        click.echo(json.dumps(s))
        return
    for dev, c in s["devices"].items():
        drops = " ".join(f"{k}={v}" for k, v in c["drops"].items() if v) or "none"
        offload = " ".join(f"{k}={v}" for k, v in c["offload"].items() if v)
        click.echo(f"{dev}: rx {c['rx_packets']} pkts {c['rx_bytes']} B  "
                   f"tx {c['tx_packets']} pkts {c['tx_bytes']} B  drops: {drops}"
                   + (f"  offload: {offload}" if offload else ""))


@main.command()
@run_dir_option
@click.argument("name")
@click.option("-w", "write", metavar="FILE|-",
              help="write pcap to FILE, or to stdout with '-' (e.g. | tcpdump -r -); "
                   "default: print the frames with tcpdump")
@click.option("--direction", type=click.Choice(["rx", "tx", "both"]), default="both",
              show_default=True, help="rx: frames to the guest; tx: frames from the guest")
@click.option("-c", "count", type=int, metavar="COUNT", help="stop after COUNT frames")
@click.option("-s", "snaplen", type=int, default=65535, show_default=True, metavar="SNAPLEN",
              help="bytes kept of each frame")
@click.option("-B", "buffer_kib", type=int, default=4096, show_default=True, metavar="KIB",
              help="capture buffer in the daemon, split over the queue pairs; frames that "
                   "do not fit are dropped from the capture (never from the guest's traffic)")
@click.option("--pcapng", is_flag=True,
              help="write pcapng, each frame marked inbound (to the guest) or outbound")
def capture(run_dir: str, name: str, write: str | None, direction: str, count: int | None,
            snaplen: int, buffer_kib: int, pcapng: bool) -> None:
    """Capture device NAME's frames as its guest sees them, in pcap."""
    from gateway import capture_reader as cr
    from gateway.capture import MAX_BUFFER_KIB, MAX_SNAPLEN
    from gateway.control import socket_path

    if count is not None and count < 1:
        fail(f"-c {count}: give a count of at least 1")
    if not 1 <= snaplen <= MAX_SNAPLEN:
        fail(f"-s {snaplen} is outside 1..{MAX_SNAPLEN}")
    if not 64 <= buffer_kib <= MAX_BUFFER_KIB:
        fail(f"-B {buffer_kib} is outside 64..{MAX_BUFFER_KIB} (KiB)")
    procs = []

    def open_out() -> int:  # once the daemon said yes: a refusal leaves no file
        if write is not None:
            return cr.open_output(write)
        procs.append(cr.decoder())
        return procs[0].stdin.fileno()

    try:
        on = f"{name} ({'rx and tx' if direction == 'both' else direction})"
        res = cr.capture(socket_path(run_dir), name, open_out, direction=direction, count=count,
                         snaplen=snaplen, buffer_kib=buffer_kib, pcapng=pcapng,
                         started=lambda: click.echo(f"gateway: capturing on {on}, snapshot "
                                                    f"length {snaplen} bytes", err=True))
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"the daemon is not running (no {socket_path(run_dir)})")
    except PermissionError:
        fail(f"no permission on {socket_path(run_dir)}: run as root or as a member of its group")
    except cr.CaptureFailed as e:
        fail(str(e), e.code)
    except KeyboardInterrupt:  # Ctrl-C before the capture began: nothing to say
        sys.exit(130)
    finally:
        for proc in procs:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait()
    if res.broken_pipe:
        sys.exit(0)  # the reader went away (| head): quietly, like tcpdump
    click.echo(cr.summary(res), err=True)
    if res.ended:
        fail(f"capture ended: {res.ended}", 1)


@main.command()
@click.option("--no-wait", is_flag=True, envvar="GATEWAY_DEMO_NO_WAIT",
              help="clean up at the end instead of waiting for Ctrl-C")
def demo(no_wait: bool) -> None:
    """Far host, NIC, daemon and a real Linux guest, all built here and removed after."""
    from gateway.demo import DemoFailed, run_demo

    try:
        run_demo(wait=not no_wait, say=lambda msg: click.echo(msg))
    except DemoFailed as e:
        fail(f"demo failed: {e}", 1)
    except KeyboardInterrupt:
        click.echo("interrupted: cleaned up")
        sys.exit(130)
    click.echo("demo ok")


if __name__ == "__main__":
    main()
