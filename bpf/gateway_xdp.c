// gateway's XDP program (C for bcc): steer frames to vhost devices by VLAN and destination MAC.
//
// Loaded by gateway/xdp/program.py, which passes the sizes with -D:
//   MAX_DEVICES  device slots (0 .. MAX_DEVICES-1)
//   MAX_QUEUES   NIC RX queues covered per device
//
// Maps (names are the contract with program.py):
//   mac2slot  hash  u64 -> u32   (VLAN, destination MAC) -> device slot. Key: the 6 MAC bytes
//                                as a big-endian 48-bit number in the low bits of a u64, the
//                                VLAN ID (0 = untagged) above them, i.e.
//                                key = vid<<48 | b0<<40 | b1<<32 | b2<<24 | b3<<16 | b4<<8 | b5,
//                                so int("0011223344aa", 16) in Python for an untagged device.
//                                Built here from the bytes, so host byte order does not matter.
//   devices   array struct dev_cfg[MAX_DEVICES]  per slot: running flag and max frame length.
//   xsks      xskmap [MAX_DEVICES * MAX_QUEUES]  index slot * MAX_QUEUES + rx_queue_index:
//                                one AF_XDP socket per (device, NIC queue).
//   counters  percpu array u64 [MAX_DEVICES * NCOUNTERS]  index slot * NCOUNTERS + C_*.
//   gcounters percpu array u64 [NGLOBAL]  G_*: frames handed to the kernel stack.
//   held      array u64 [MAX_DEVICES * MAX_QUEUES], mmap-able, same index as xsks: frames
//                                redirected to that socket and not yet consumed. This program
//                                adds 1 per redirect; the gateway's bursts (gw_xsk_to_guest)
//                                subtract what the guest took, and what the kernel dropped
//                                after the redirect (rx_ring_full, rx_dropped) is subtracted
//                                once seen. A device at its dev_cfg.share gets no more of the
//                                queue's shared UMEM frames: a guest that posts no RX buffers
//                                cannot drain the fill ring the other devices need.
//
// Verdicts:
//   runt (< 14 bytes, < 18 with an 802.1Q tag) XDP_PASS, G_RUNT (the kernel drops it)
//   broadcast                                  XDP_PASS, G_BROADCAST (gateway taps it)
//   multicast                                  XDP_PASS, G_MULTICAST
//   unicast, MAC not in mac2slot               XDP_PASS, G_PASSED (host keeps using the NIC)
//   slot stopped                               XDP_DROP, C_DROP_STOPPED
//   frame longer than the slot's max frame     XDP_DROP, C_DROP_TOO_BIG
//   no socket for (slot, rx queue)             XDP_DROP, C_DROP_NO_SOCKET
//   held[slot, queue] >= the slot's share      XDP_DROP, C_DROP_OVER_SHARE
//   else                                       XDP_REDIRECT to xsks, C_RX_PACKETS/C_RX_BYTES
//
// An 802.1Q tag (TPID 0x8100) selects the VLAN part of the key (its VID; a priority tag,
// VID 0, counts as untagged); a steered frame loses its tag before the redirect, so guests
// only ever see untagged frames, and lengths (max frame, rx_bytes) are those without it.
// Unicast under an 802.1ad tag (0x88a8) is nobody's: G_PASSED. Group frames pass tagged
// or not: the gateway's flood tap reads their VLAN.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

#ifndef MAX_DEVICES
#define MAX_DEVICES 64
#endif
#ifndef MAX_QUEUES
#define MAX_QUEUES 16
#endif

// per-device counters (order is the contract with program.py COUNTERS)
#define C_RX_PACKETS 0
#define C_RX_BYTES 1
#define C_DROP_NO_SOCKET 2
#define C_DROP_STOPPED 3
#define C_DROP_TOO_BIG 4
#define C_DROP_OVER_SHARE 5
#define NCOUNTERS 6

// global counters (order is the contract with program.py GLOBAL_COUNTERS)
#define G_PASSED 0
#define G_BROADCAST 1
#define G_MULTICAST 2
#define G_RUNT 3
#define NGLOBAL 4

#define VLAN_HLEN 4

#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE 1024
#endif

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

struct dev_cfg {
    u32 running;    // 0: stopped, frames for it are dropped
    u32 max_frame;  // longest frame (Ethernet header included) the device accepts
    u32 share;      // most UMEM frames its socket on one queue may hold unconsumed
    u32 pad;
};

BPF_HASH(mac2slot, u64, u32, MAX_DEVICES);
BPF_ARRAY(devices, struct dev_cfg, MAX_DEVICES);
BPF_XSKMAP(xsks, MAX_DEVICES * MAX_QUEUES);
BPF_PERCPU_ARRAY(counters, u64, MAX_DEVICES * NCOUNTERS);
BPF_PERCPU_ARRAY(gcounters, u64, NGLOBAL);
BPF_F_TABLE("array", u32, u64, held, MAX_DEVICES * MAX_QUEUES, BPF_F_MMAPABLE);

static __always_inline void count_dev(u32 slot, u32 which, u64 n)
{
    u32 idx = slot * NCOUNTERS + which;
    u64 *c = counters.lookup(&idx);
    if (c)
        *c += n;  // per-CPU slot: no atomics needed
}

static __always_inline int pass_global(u32 which)
{
    u64 *c = gcounters.lookup(&which);
    if (c)
        *c += 1;
    return XDP_PASS;
}

static __always_inline u32 slot_index_for(u32 slot, u32 queue)
{
    return slot * MAX_QUEUES + queue;
}

// Drop the 802.1Q tag: the two addresses move 4 bytes up, over it, and the frame then
// starts there. Needs the caller's check that the tag is inside the frame.
static __always_inline int untag(struct xdp_md *ctx)
{
    u8 addrs[12];
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;

    if (data + 12 > data_end)
        return -1;
    __builtin_memcpy(addrs, data, 12);
    if (bpf_xdp_adjust_head(ctx, VLAN_HLEN))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (data + 12 > data_end)
        return -1;
    __builtin_memcpy(data, addrs, 12);
    return 0;
}

// Function name = BPF program name: program.py recognises its own (possibly stale) program
// on a NIC by it ("gateway_xdp", at most 15 characters).
int gateway_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return pass_global(G_RUNT);

    const u8 *d = eth->h_dest;
    u64 vid = 0;
    const u8 *type = (const u8 *)&eth->h_proto;  // bytes, like the MAC: no byte order
    int tagged = type[0] == 0x81 && type[1] == 0x00;
    if (tagged) {
        struct vlan_tag *tag = (void *)(eth + 1);
        if ((void *)(tag + 1) > data_end)
            return pass_global(G_RUNT);
        const u8 *tci = (const u8 *)&tag->tci;
        vid = ((u64)(tci[0] & 0x0f) << 8) | tci[1];
    }
    if (d[0] & 1) {  // group bit: broadcast or multicast
        if ((d[0] & d[1] & d[2] & d[3] & d[4] & d[5]) == 0xff)
            return pass_global(G_BROADCAST);
        return pass_global(G_MULTICAST);
    }

    if (type[0] == 0x88 && type[1] == 0xa8)  // 802.1ad: a VLAN no device is on
        return pass_global(G_PASSED);

    u64 key = (vid << 48) | ((u64)d[0] << 40) | ((u64)d[1] << 32) | ((u64)d[2] << 24) |
              ((u64)d[3] << 16) | ((u64)d[4] << 8) | (u64)d[5];
    u32 *slotp = mac2slot.lookup(&key);
    if (!slotp)
        return pass_global(G_PASSED);

    u32 slot = *slotp;
    if (slot >= MAX_DEVICES)
        return XDP_DROP;  // never written by program.py; keeps the verifier's bounds
    struct dev_cfg *cfg = devices.lookup(&slot);
    if (!cfg || !cfg->running) {
        count_dev(slot, C_DROP_STOPPED, 1);
        return XDP_DROP;
    }
    u64 len = data_end - data - (tagged ? VLAN_HLEN : 0);
    if (len > cfg->max_frame) {
        count_dev(slot, C_DROP_TOO_BIG, 1);
        return XDP_DROP;
    }
    u32 queue = ctx->rx_queue_index;
    if (queue >= MAX_QUEUES) {
        count_dev(slot, C_DROP_NO_SOCKET, 1);
        return XDP_DROP;
    }
    int idx = slot_index_for(slot, queue);
    // redirect_map cannot tell us that the entry was empty (it just returns the
    // fallback action), so look first: lookups on an XSKMAP work from kernel 5.3.
    if (!xsks.lookup(&idx)) {
        count_dev(slot, C_DROP_NO_SOCKET, 1);
        return XDP_DROP;
    }
    // The fair share (issue 12): frames this socket holds unconsumed. Checked and then
    // added without a lock: CPUs racing on one socket may overshoot the share by at
    // most one frame each, a bound the share's sizing (nic.py) leaves room for.
    u32 hidx = idx;
    u64 *held_n = held.lookup(&hidx);
    if (!held_n || *held_n >= cfg->share) {
        count_dev(slot, C_DROP_OVER_SHARE, 1);
        return XDP_DROP;
    }
    if (tagged && untag(ctx) < 0)
        return XDP_DROP;  // not seen: the head moves 4 bytes inside a frame of >= 18
    __sync_fetch_and_add(held_n, 1);
    count_dev(slot, C_RX_PACKETS, 1);
    count_dev(slot, C_RX_BYTES, len);
    return xsks.redirect_map(idx, XDP_DROP);
}
