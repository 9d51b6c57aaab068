"""The `gateway` command: thin click wrappers over the library.

Only `demo` exists so far; attach/detach/list/stats and the daemon come with
the daemon issue. Errors are one clear line and a non-zero exit.
"""

from __future__ import annotations

import logging
import sys

import click


@click.group()
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """vhost-user back-end that bridges virtual machines to a NIC."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--frames", default=20000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--size", default=64, show_default=True, type=click.IntRange(60, 1514),
              help="frame size in bytes")
def demo(frames: int, size: int) -> None:
    """Run a device with a built-in front-end and move frames both ways."""
    from gateway.demo import DemoFailed, run_demo

    try:
        run_demo(frames, size)
    except DemoFailed as e:
        click.echo(f"demo failed: {e}", err=True)
        sys.exit(1)
    click.echo("demo ok")


if __name__ == "__main__":
    main()
