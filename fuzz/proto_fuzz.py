#!/usr/bin/env python3
"""Fast random-mutation driver for the vhost-user message machine.

hypothesis spends most of its time on bookkeeping, so a million examples take
hours; this driver runs the same generator (fuzz/proto_harness.py) on a plain
seeded `random.Random` and checks the same properties, a few thousand streams
per second. A failing stream is printed (and written to
fuzz/build/proto-crash-<seed>-<i>.txt) with the seed that reproduces it:

    python fuzz/proto_fuzz.py --seed S --start I --iterations 1
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proto_harness import (  # noqa: E402
    FuzzFailure,
    describe,
    fd_count,
    generate,
    memfd_mappings,
    run_stream,
)

from gateway.virtio.ring import FrameBuffer  # noqa: E402

logging.disable(logging.CRITICAL)  # refusals are expected by the thousand


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first stream index (to replay one)")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0: never)")
    ap.add_argument("--report-every", type=int, default=50_000)
    args = ap.parse_args()

    frames = FrameBuffer(4, 2048)
    base_fds, base_maps = fd_count(), memfd_mappings()
    t0 = time.monotonic()
    stats = {"streams": 0, "items": 0, "refused": 0, "replies": 0, "qps_started": 0,
             "ring_broken": 0}
    failures = 0
    end = args.start + args.iterations
    i = args.start
    for i in range(args.start, end):
        stream = generate(random.Random(f"{args.seed}:{i}"))
        try:
            # the /proc totals on every 16th stream (and the first): a leak stays
            res = run_stream(stream, frames, deep=(i - args.start) % 16 == 0)
        except FuzzFailure as e:
            failures += 1
            text = (f"seed {args.seed} stream {i}: {e}\n{traceback.format_exc()}\n"
                    f"{describe(stream)}\n")
            print(text, file=sys.stderr)
            os.makedirs(os.path.join(os.path.dirname(__file__), "build"), exist_ok=True)
            path = os.path.join(os.path.dirname(__file__), "build",
                                f"proto-crash-{args.seed}-{i}.txt")
            with open(path, "w") as f:
                f.write(text)
            if failures >= 5:
                break
            continue
        stats["streams"] += 1
        stats["items"] += len(stream.items)
        stats["refused"] += res.refused is not None
        stats["replies"] += res.replies
        stats["qps_started"] += res.ran
        stats["ring_broken"] += res.broken
        n = i + 1 - args.start
        if n % args.report_every == 0:
            dt = time.monotonic() - t0
            print(f"#{n} {dt:.0f}s {n / dt:.0f}/s {stats}", flush=True)
        if args.max_seconds and time.monotonic() - t0 > args.max_seconds:
            break
    if not failures and (fd_count(), memfd_mappings()) != (base_fds, base_maps):
        failures += 1
        print(f"leak over the run: fds {base_fds} -> {fd_count()}, memfd mappings "
              f"{base_maps} -> {memfd_mappings()}", file=sys.stderr)
    dt = time.monotonic() - t0
    n = stats["streams"] + failures
    print(f"done: {n} streams ({stats['items']} sendmsgs) in {dt:.1f}s, "
          f"{n / max(dt, 1e-9):.0f} streams/s, {failures} failures; {stats}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
