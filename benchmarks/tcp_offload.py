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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=int, default=8, help="MiB each way (default 8)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    results: dict[str, list] = {"offloads on": [], "offloads off": []}
    with tempfile.TemporaryDirectory(prefix="gw-tcp-offload-") as tmp:
        for run in range(args.runs):
            for name, opts in (("offloads on", ""), ("offloads off", NO_OFFLOADS)):
                r = run_stream(Path(tmp) / f"{run}-{name.split()[1]}", mbytes=args.mbytes,
                               device_opts=opts)
                if not (r.up_ok and r.down_ok):
                    sys.exit(f"{name}: transfer corrupted (up ok {r.up_ok}, down ok {r.down_ok})")
                off = r.stats["offload"]
                print(f"{name:13s} guest->far {r.up_mbit:7.1f} Mbit/s   far->guest "
                      f"{r.down_mbit:7.1f} Mbit/s   gso frames {off['tx_gso']} -> "
                      f"{off['tx_gso_segs']} segments, csum {off['tx_csum']}, "
                      f"rx csum valid {off['rx_csum_valid']}", flush=True)
                results[name].append(r)
    for name, rs in results.items():
        print(f"median {name:13s} guest->far "
              f"{statistics.median(r.up_mbit for r in rs):7.1f} Mbit/s   far->guest "
              f"{statistics.median(r.down_mbit for r in rs):7.1f} Mbit/s")


if __name__ == "__main__":
    main()
