"""TCP throughput of a real Linux guest (QEMU TCG) through the gateway, with
the guest's checksum/TSO offloads negotiated and with them all switched off
on the QEMU side (csum=off,gso=off,...): guest -> far host (nc into a counting
sink) and far host -> guest (wget). Prints one line per run and the medians.

    python benchmarks/tcp_offload.py [--mbytes 8] [--runs 1]

A TCG guest is slow and the machine is shared: the figures compare the two
settings on the same host, nothing more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.testing.tcp_stream import NO_OFFLOADS, run_stream  # noqa: E402


def measure(mbytes: int = 8, runs: int = 1, echo=print) -> dict:
    """Medians (Mbit/s) per setting and direction, each run's line echoed."""
    results: dict[str, list] = {"offloads on": [], "offloads off": []}
    with tempfile.TemporaryDirectory(prefix="gw-tcp-offload-") as tmp:
        for run in range(runs):
            for name, opts in (("offloads on", ""), ("offloads off", NO_OFFLOADS)):
                r = run_stream(Path(tmp) / f"{run}-{name.split()[1]}", mbytes=mbytes,
                               device_opts=opts)
                if not (r.up_ok and r.down_ok):
                    raise RuntimeError(f"{name}: transfer corrupted (up ok {r.up_ok}, "
                                       f"down ok {r.down_ok})")
                off = r.stats["offload"]
                echo(f"{name:13s} guest->far {r.up_mbit:7.1f} Mbit/s   far->guest "
                     f"{r.down_mbit:7.1f} Mbit/s   gso frames {off['tx_gso']} -> "
                     f"{off['tx_gso_segs']} segments, csum {off['tx_csum']}, "
                     f"rx csum valid {off['rx_csum_valid']}")
                results[name].append(r)
    return {name: {"guest_to_far_mbit": statistics.median(r.up_mbit for r in rs),
                   "far_to_guest_mbit": statistics.median(r.down_mbit for r in rs),
                   "runs": len(rs), "mbytes": mbytes}
            for name, rs in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=int, default=8, help="MiB each way (default 8)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    try:
        out = measure(args.mbytes, args.runs, echo=lambda line: print(line, flush=True))
    except RuntimeError as e:
        sys.exit(str(e))
    for name, m in out.items():
        print(f"median {name:13s} guest->far {m['guest_to_far_mbit']:7.1f} Mbit/s   "
              f"far->guest {m['far_to_guest_mbit']:7.1f} Mbit/s")


if __name__ == "__main__":
    main()
