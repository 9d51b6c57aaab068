"""`gateway stats --watch`: a live table of counters and per-second rates."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table


def table(now: dict, before: dict | None, dt: float) -> Table:
    t = Table(title="gateway stats (Ctrl-C to stop)")
    for col in ("device", "rx pkts", "rx pkt/s", "rx Mbit/s", "tx pkts", "tx pkt/s",
                "tx Mbit/s", "drops"):
        t.add_column(col, justify="left" if col in ("device", "drops") else "right")
    for name, c in now["devices"].items():
        p = (before or {}).get("devices", {}).get(name, c)

        def rate(key: str, c=c, p=p) -> float:
            return (c[key] - p[key]) / dt if dt > 0 else 0.0

        drops = " ".join(f"{k}={v}" for k, v in c["drops"].items() if v) or "-"
        t.add_row(name, f"{c['rx_packets']:,}", f"{rate('rx_packets'):,.0f}",
                  f"{rate('rx_bytes') * 8 / 1e6:,.1f}", f"{c['tx_packets']:,}",
                  f"{rate('tx_packets'):,.0f}", f"{rate('tx_bytes') * 8 / 1e6:,.1f}", drops)
    return t


def watch(fetch: Callable[[], dict], interval: float) -> None:
    """Redraw in place on a terminal; into a pipe or a log, one table per interval."""
    console = Console()
    before, t0 = fetch(), time.monotonic()
    try:
        if not console.is_terminal:
            console.print(table(before, None, 0))
            while True:
                time.sleep(interval)  # the refresh period the operator asked for
                now, t1 = fetch(), time.monotonic()
                console.print(table(now, before, t1 - t0))
                console.file.flush()
                before, t0 = now, t1
        with Live(table(before, None, 0), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                now, t1 = fetch(), time.monotonic()
                live.update(table(now, before, t1 - t0))
                before, t0 = now, t1
    except KeyboardInterrupt:
        pass
