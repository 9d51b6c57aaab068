"""Feature bits of virtio-net and the vhost-user protocol, with their names.

Names are what `gateway list` prints and what logs say, so a negotiated set can
be read without a spec at hand.
"""

from enum import IntEnum


class Net(IntEnum):
    """virtio-net device feature bits (virtio 1.2, 5.1.3) and the transport bits we use."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26  # VHOST_F_LOG_ALL: log every guest write for a live migration
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35


class Proto(IntEnum):
    """vhost-user protocol feature bits (QEMU docs/interop/vhost-user.rst)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def mask(*bits: IntEnum) -> int:
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return m


# What this backend has built and tested. CTRL_VQ and CTRL_RX are the seed's
# bits: QEMU and DPDK virtio-user both answer the control queue themselves and
# never hand it to a vhost-user backend, so offering them costs us nothing.
SUPPORTED_FEATURES = mask(
    # Checksums and TSO from the guest are completed and segmented in C
    # (cffi_build/gw_offload.c); received checksums are verified there before
    # DATA_VALID is set. We never send the guest a GSO frame, which GUEST_TSO*
    # allows: those bits only say the guest could take one.
    Net.CSUM,
    Net.GUEST_CSUM,
    Net.HOST_TSO4,
    Net.HOST_TSO6,
    Net.GUEST_TSO4,
    Net.GUEST_TSO6,
    Net.MTU,
    Net.MRG_RXBUF,
    Net.CTRL_VQ,
    Net.CTRL_RX,
    Net.MQ,
    Net.LOG_ALL,
    Net.ANY_LAYOUT,
    Net.RING_INDIRECT_DESC,
    Net.RING_EVENT_IDX,
    Net.PROTOCOL_FEATURES,
    Net.VERSION_1,
    # Packed virtqueues (cffi_build/gw_packed.h): tests/test_packed_ring.py,
    # test_packed_dpdk.py (virtio-user packed_vq=1), test_packed_qemu.py.
    Net.RING_PACKED,
    # Buffers are taken and returned in the order they were made available,
    # both layouts (tests/test_packed_dpdk.py: DPDK's in-order paths).
    Net.IN_ORDER,
)

# Offered only on ports that finish the guest's offloads (XdpPort, whose C
# bursts do); a port that passes frames on as the guest wrote them must not
# let it hand over partial checksums or 64 KiB frames.
OFFLOADS = mask(Net.CSUM, Net.GUEST_CSUM, Net.HOST_TSO4, Net.HOST_TSO6, Net.GUEST_TSO4,
                Net.GUEST_TSO6)

SUPPORTED_PROTOCOL_FEATURES = mask(
    Proto.MQ,
    Proto.LOG_SHMFD,
    Proto.RARP,
    Proto.REPLY_ACK,
    Proto.NET_MTU,
    Proto.CONFIGURE_MEM_SLOTS,
    Proto.STATUS,
)


def names(bits: int, enum: type[IntEnum] = Net) -> list[str]:
    """Names of the set bits; unknown ones as BIT<n> so nothing is hidden."""
    out = []
    for n in range(64):
        if bits >> n & 1:
            try:
                out.append(enum(n).name)
            except ValueError:
                out.append(f"BIT{n}")
    return out


def net_hdr_len(features: int) -> int:
    """The virtio-net header grows num_buffers with VERSION_1 or MRG_RXBUF."""
    if features & mask(Net.VERSION_1, Net.MRG_RXBUF):
        return 12
    return 10
