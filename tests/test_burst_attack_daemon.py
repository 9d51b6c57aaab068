"""Bounded bursts through a real daemon (issue 12): a guest that keeps offering
long chains of zero-length descriptors on TX and RX, with split or packed
rings, does not starve a healthy guest on the same NIC, `gateway list`
answers, and its reset and detach complete. Counts are exact; no timing is
asserted (the timeouts are generous). The packed attacker's re-arm is also
checked on the C ring alone."""

from __future__ import annotations

import json
import os
import threading

import pytest
from test_bounded_bursts import Env
from test_hostile_guest import FarHost, frame, wait_for

from gateway import control
from gateway.testing import attacker
from gateway.testing.frontend import Frontend
from gateway.virtio.features import Net
from gateway.virtio.ring import FrameBuffer

GOOD, BAD = "52:54:00:00:12:01", "52:54:00:00:12:02"
N = 64


SPARE_RX = 16  # room for the far host's multicast besides the N frames
RING = 1024  # QEMU's largest; every chain as long as the cap (GW_MAX_CHAIN)


class Rearm(threading.Thread):
    """The attacker's only work: put the whole TX ring back on offer and kick
    (split: move avail->idx on; packed: rewrite the flags once the device
    took every chain)."""

    def __init__(self, fe: Frontend) -> None:
        super().__init__(name="attacker", daemon=True)
        self.fe = fe
        self.halt = threading.Event()
        self.rounds = 0
        tx = fe.rings[1]
        if fe.packed:
            self._packed = attacker.PackedRearm(tx, RING, write=False)
            self._packed.rearm()
        else:
            self._packed = None
            attacker.split_chain(tx, RING, write=False)
            attacker.split_fill(tx)
        os.eventfd_write(fe.kicks[1], 1)

    def run(self) -> None:
        tx = self.fe.rings[1]
        while not self.halt.is_set():
            if self._packed is None:
                attacker.split_rearm(tx)
            elif not self._packed.rearm():
                self.halt.wait(0.001)
                continue
            os.eventfd_write(self.fe.kicks[1], 1)
            self.rounds += 1
            self.halt.wait(0.001)


def arm_rx(fe: Frontend) -> None:
    """Every RX buffer the attacker offers is a chain of zero-length,
    device-writable descriptors: with MRG_RXBUF a frame finds no room in it."""
    rx = fe.rings[0]
    if fe.packed:
        attacker.packed_fill(rx, RING, write=True)
    else:
        attacker.split_chain(rx, RING, write=True)
        attacker.split_fill(rx)
    os.eventfd_write(fe.kicks[0], 1)


def drops(d, name: str) -> dict:
    """What `gateway stats` shows for name's drops (its control request)."""
    return control.request(d.run_dir, "stats", name=name)["devices"][name]["drops"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_attacker_keeps_rearming_healthy_guest_moves_exact_counts(env, packed):
    topo, d = env
    d.ok("attach", "good", topo.nic, "--mac", GOOD)
    d.ok("attach", "bad", topo.nic, "--mac", BAD)
    far = FarHost(topo)
    bad = Frontend(os.path.join(d.run_dir, "bad.sock"), queue_size=RING, timeout=30,
                   packed=packed).connect()
    bad.setup()
    assert bad.features >> Net.MRG_RXBUF & 1
    good = Frontend(os.path.join(d.run_dir, "good.sock"), timeout=30).connect().setup()
    rearm = None
    try:
        # The attack: both rings offer chains of 1024 zero-length descriptors
        # (split: every avail entry names one; packed: one fills the ring).
        arm_rx(bad)
        rearm = Rearm(bad)
        rearm.start()
        # Taken, dropped and offered again: more chains than one ring holds.
        wait_for("the attacker's chains dropped, re-armed and dropped again",
                 lambda: drops(d, "bad")["tx_short"] > (RING if not packed else 1))

        far.send(BAD.replace(":", ""), "tobad", N)
        # Each is dropped for no room (at least N: the far host's kernel may
        # also broadcast, and every guest gets a copy of that).
        wait_for(f"{N} no-room drops",
                 lambda: drops(d, "bad")["rx_no_room"] >= N)

        good.post_rx(N + SPARE_RX)
        good.transmit([frame(far.mac, GOOD.replace(":", ""), f"g{i}") for i in range(N)])
        good.wait_tx_done(N)
        far.wait_count(GOOD.replace(":", ""), N)
        far.send(GOOD.replace(":", ""), "togood", N)
        # The far host's kernel multicasts too (IPv6 MLD, router solicitations),
        # and every guest gets a copy: count the frames sent to this guest.
        got = []
        while len(got) < N:
            got += [f for f in good.receive(1) if f[0] & 1 == 0]  # unicast only
        assert len(got) == N and all(f[14:22] == b"togood  " for f in got)
        # Every one of the healthy guest's frames reached the far host intact.
        sent = {f"g{i}": frame(far.mac, GOOD.replace(":", ""), f"g{i}") for i in range(N)}
        arrived = {tag: far.frame(tag) for tag in sent}
        assert {t for t in sent if arrived[t] != sent[t]} == set(), arrived

        states = {x["name"]: x["state"] for x in json.loads(d.ok("list", "--json"))["devices"]}
        # The attacker broke no rule: its device runs (a broken one would not be attacking).
        assert states == {"good": "running", "bad": "running"}
        assert drops(d, "bad")["rx_too_big"] == 0  # no-room has its own reason

        # The attacker's reset (GET_VRING_BASE stops its workers) completes
        # while it keeps re-arming; then its detach.
        for i in range(len(bad.rings)):
            bad.get_vring_base(i)
        rearm.halt.set()
        rearm.join(30)
        rearm = None
        d.ok("detach", "bad")
        names = {x["name"] for x in json.loads(d.ok("list", "--json"))["devices"]}
        assert names == {"good"}
    finally:
        if rearm is not None:
            rearm.halt.set()
            rearm.join(30)
        far.close()
        good.close()
        bad.close()


@pytest.mark.parametrize(("size", "chain"), [(1024, 1024), (256, 64), (256, 100)])
def test_packed_rearm_offers_the_ring_again_only_once_it_was_taken(size, chain):
    """The packed attacker above, on the C ring alone: a re-arm before the
    device took every chain changes nothing; after, the same chains are
    taken again, each dropped tx_short (a last partial chain included)."""
    env = Env(size, packed=True)
    pr = attacker.PackedRearm(env.drv, chain, write=False)
    nchains = -(-size // chain)
    buf = FrameBuffer(64, 2048)
    for rounds in range(1, 4):
        assert pr.rearm()
        before = bytes(env.map[env.drv.desc_gpa : env.drv.desc_gpa + 16 * size])
        assert not pr.rearm()  # nothing taken yet: the ring is left alone
        assert bytes(env.map[env.drv.desc_gpa : env.drv.desc_gpa + 16 * size]) == before
        while env.vq.pending():
            assert env.vq.tx_burst(buf) == 0
        assert pr.taken()
        assert env.vq.stats["drop_short"] == rounds * nchains
    assert env.vq.stats["packets"] == 0 and pr.rounds == 3
