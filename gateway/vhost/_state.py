"""Every rule of the vhost-user state machine, in one table (like h11's _state.py).

backend.py asks this module two questions: may this request be handled now,
and where does a ring go after it. Keeping the answers here means the rules
can be read, reviewed and tested apart from the code that carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.vhost.protocol import Request
from gateway.virtio.features import Net, Proto


class RingState(Enum):
    IDLE = "idle"  # being configured: NUM/ADDR/BASE may arrive
    STARTED = "started"  # kick fd (or polling) received: the backend may process it
    STOPPED = "stopped"  # GET_VRING_BASE answered: nothing moves until set up again


@dataclass(frozen=True)
class Rule:
    owner: bool = True  # needs SET_OWNER first
    proto: Proto | None = None  # needs this protocol feature negotiated
    feature: Net | None = None  # needs this device feature offered/acked
    ring: bool = False  # payload starts with a ring index that must be valid
    replies: bool = False  # has a reply of its own (REPLY_ACK does not add one)


# Requests we handle, and what each needs. A request not in this table is
# refused (unknown, or a feature we never offered).
RULES: dict[Request, Rule] = {
    Request.GET_FEATURES: Rule(owner=False, replies=True),
    Request.SET_FEATURES: Rule(),
    Request.SET_OWNER: Rule(owner=False),
    Request.RESET_OWNER: Rule(),
    Request.GET_PROTOCOL_FEATURES: Rule(owner=False, feature=Net.PROTOCOL_FEATURES, replies=True),
    Request.SET_PROTOCOL_FEATURES: Rule(owner=False, feature=Net.PROTOCOL_FEATURES),
    Request.GET_QUEUE_NUM: Rule(owner=False, proto=Proto.MQ, replies=True),
    Request.GET_MAX_MEM_SLOTS: Rule(owner=False, proto=Proto.CONFIGURE_MEM_SLOTS, replies=True),
    Request.SET_MEM_TABLE: Rule(),
    Request.ADD_MEM_REG: Rule(proto=Proto.CONFIGURE_MEM_SLOTS),
    Request.REM_MEM_REG: Rule(proto=Proto.CONFIGURE_MEM_SLOTS),
    Request.SET_VRING_NUM: Rule(ring=True),
    Request.SET_VRING_ADDR: Rule(ring=True),
    Request.SET_VRING_BASE: Rule(ring=True),
    Request.GET_VRING_BASE: Rule(ring=True, replies=True),
    Request.SET_VRING_KICK: Rule(ring=True),
    Request.SET_VRING_CALL: Rule(ring=True),
    Request.SET_VRING_ERR: Rule(ring=True),
    Request.SET_VRING_ENABLE: Rule(ring=True, feature=Net.PROTOCOL_FEATURES),
    Request.SET_STATUS: Rule(proto=Proto.STATUS),
    Request.GET_STATUS: Rule(proto=Proto.STATUS, replies=True),
    Request.NET_SET_MTU: Rule(proto=Proto.NET_MTU),
    Request.SEND_RARP: Rule(proto=Proto.RARP),
    # Replies with an empty payload: QEMU waits for it before logging starts.
    Request.SET_LOG_BASE: Rule(proto=Proto.LOG_SHMFD, feature=Net.LOG_ALL, replies=True),
}

# Which ring states each ring request is legal in, and the state it leaves.
# None as the target means "unchanged".
RING_TRANSITIONS: dict[Request, dict[RingState, RingState | None]] = {
    Request.SET_VRING_NUM: {RingState.IDLE: None, RingState.STOPPED: RingState.IDLE},
    Request.SET_VRING_BASE: {RingState.IDLE: None, RingState.STOPPED: RingState.IDLE},
    # ADDR may be re-sent to a started ring (QEMU does when logging toggles):
    # the ring is then re-translated, not stopped.
    Request.SET_VRING_ADDR: {
        RingState.IDLE: None, RingState.STOPPED: RingState.IDLE, RingState.STARTED: None,
    },
    Request.SET_VRING_KICK: {
        RingState.IDLE: RingState.STARTED,
        RingState.STOPPED: RingState.STARTED,
        RingState.STARTED: None,
    },
    Request.GET_VRING_BASE: {
        RingState.IDLE: None, RingState.STOPPED: None, RingState.STARTED: RingState.STOPPED,
    },
    Request.SET_VRING_CALL: {s: None for s in RingState},
    Request.SET_VRING_ERR: {s: None for s in RingState},
    Request.SET_VRING_ENABLE: {s: None for s in RingState},
}

# virtio device status bits (virtio 1.2, 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128


def check(
    req: Request,
    *,
    owned: bool,
    offered: int,
    protocol: int,
    ring_count: int,
    ring_index: int | None,
) -> str | None:
    """Why `req` may not be handled now, or None if it may."""
    rule = RULES.get(req)
    if rule is None:
        return f"{req.name} is not supported by this backend"
    if rule.owner and not owned:
        return f"{req.name} before SET_OWNER"
    if rule.feature is not None and not offered >> rule.feature & 1:
        return f"{req.name} needs feature {rule.feature.name}, which was not offered"
    if rule.proto is not None and not protocol >> rule.proto & 1:
        return f"{req.name} needs protocol feature {rule.proto.name}, which was not negotiated"
    if rule.ring and ring_index is not None and not 0 <= ring_index < ring_count:
        return f"{req.name}: ring index {ring_index} out of range (device has {ring_count} rings)"
    return None


def ring_transition(req: Request, state: RingState) -> RingState | None:
    """The ring's next state, or raises ValueError when `req` is illegal in `state`."""
    table = RING_TRANSITIONS[req]
    if state not in table:
        raise ValueError(f"{req.name} while the ring is {state.value}")
    target = table[state]
    return state if target is None else target


def ring_enabled_at_start(acked_features: int) -> bool:
    """Without PROTOCOL_FEATURES a ring is enabled as soon as it starts; with it,
    it waits for SET_VRING_ENABLE (vhost-user.rst, "Ring states")."""
    return not acked_features >> Net.PROTOCOL_FEATURES & 1


def device_may_run(protocol: int, status: int) -> bool:
    """With STATUS negotiated the front-end says when it is done (DRIVER_OK);
    without it, started and enabled rings are enough."""
    if protocol >> Proto.STATUS & 1:
        return bool(status & STATUS_DRIVER_OK) and not status & STATUS_FAILED
    return True
