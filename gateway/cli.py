"""The `gateway` command: thin click wrappers over the daemon's control socket.

Every refusal is one line on stderr and exit code 2; success is exit 0.
"""

from __future__ import annotations

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
    from gateway.xdp.program import XdpError, find_kernel_headers, import_bcc

    try:
        import_bcc()
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
                   "[default: 50]; e.g. 20000 for DPDK-like latency, at a CPU per busy worker")
@click.option("--wake-ahead/--no-wake-ahead", default=True, show_default=True,
              help="wake a worker just ahead of traffic that arrives regularly (at most "
                   "5 % of a CPU per worker)")
def daemon(run_dir: str, state_dir: str, metrics_listen: str | None, cpus: str | None,
           busy_poll_us: int | None, wake_ahead: bool) -> None:
    """Hold every device; the other commands talk to this process."""
    cpu_list = parse_cpus(cpus) if cpus else None
    preflight()
    from gateway.daemon import run

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # a daemon says what it does
    try:
        run(run_dir, state_dir, metrics_listen=metrics_listen, cpus=cpu_list,
            busy_poll_us=busy_poll_us, wake_ahead=wake_ahead,
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
    click.echo("\nlibvirt domain XML:\n" + d["libvirt_xml"])


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
