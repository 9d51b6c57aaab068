/* AF_XDP <-> virtqueue bursts (contract in gw_xskq.h). */
#define _GNU_SOURCE  /* ppoll */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/if_xdp.h>
#include <xdp/xsk.h>

#include "gw_ring.h"
#include "gw_capture.h"
#include "gw_xskq.h"
#include "gw_capture_hook.h"
#include "gw_offload.h"

/* From gw_xsk.c (their contract is in gw_xsk.h, below GW_XSK_C_PART). */
int gw_xsk_kick(int fd);
unsigned gw_xsk_fill(struct xsk_ring_prod *fq, const __u64 *pool, unsigned npool, unsigned n);
unsigned gw_xsk_reap(struct xsk_ring_cons *cq, __u64 *pool, unsigned npool, unsigned cap,
                     __u64 mask);

#define MAX_BURST 256
#define GW_BURST 32    /* frames per ring per pass */
#define MAX_KICKS 16   /* copy mode sends <= 32 descriptors a kick: 16 cover a burst */
#define VLAN_HLEN 4

static void lock(struct gw_umemq *u)
{
    while (__atomic_exchange_n(&u->lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void unlock(struct gw_umemq *u)
{
    __atomic_store_n(&u->lock, 0, __ATOMIC_RELEASE);
}

/* Caller holds the lock. */
static void refill_locked(struct gw_umemq *u)
{
    unsigned lent, want;

    *u->npool += gw_xsk_reap(u->comp, u->pool, *u->npool, u->nframes, u->mask);
    lent = u->fill->size - xsk_prod_nb_free(u->fill, u->fill->size);
    want = lent < u->fill_target ? u->fill_target - lent : 0;
    if (want) {
        *u->npool -= gw_xsk_fill(u->fill, u->pool, *u->npool, want);
        if (xsk_ring_prod__needs_wakeup(u->fill))
            recvfrom(u->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
    }
}

void gw_umemq_refill(struct gw_umemq *u)
{
    lock(u);
    refill_locked(u);
    unlock(u);
}

static unsigned take_frames(struct gw_umemq *u, __u64 *addrs, unsigned n)
{
    unsigned k;

    lock(u);
    *u->npool += gw_xsk_reap(u->comp, u->pool, *u->npool, u->nframes, u->mask);
    k = n < *u->npool ? n : *u->npool;
    for (unsigned i = 0; i < k; i++)
        addrs[i] = u->pool[--*u->npool];
    unlock(u);
    return k;
}

static void give_frames(struct gw_umemq *u, const __u64 *addrs, unsigned n)
{
    lock(u);
    for (unsigned i = 0; i < n && *u->npool < u->nframes; i++)
        u->pool[(*u->npool)++] = addrs[i] & u->mask;
    unlock(u);
}

/* Put frames on the TX ring and kick until the kernel took them: in copy mode
   each kick moves at most 32, and nothing else would kick for the rest. */
static void transmit(struct xsk_ring_prod *tx, int fd, const __u64 *addrs,
                     const uint32_t *lens, unsigned n)
{
    __u32 idx;

    if (!n || xsk_ring_prod__reserve(tx, n, &idx) != n)
        return;                                 /* callers checked the room */
    for (unsigned i = 0; i < n; i++) {
        struct xdp_desc *d = xsk_ring_prod__tx_desc(tx, idx + i);
        d->addr = addrs[i];
        d->len = lens[i];
        d->options = 0;
    }
    xsk_ring_prod__submit(tx, n);
    for (int k = 0; k < MAX_KICKS && xsk_ring_prod__needs_wakeup(tx); k++) {
        gw_xsk_kick(fd);
        if (__atomic_load_n(tx->consumer, __ATOMIC_ACQUIRE) == *tx->producer)
            break;
    }
}

/* transmit() when the TX ring has room for all n, else the frames go back
   to the pool (counted): a GSO frame's segments may have used the room the
   burst was sized for. */
static void transmit_or_free(struct gw_umemq *u, struct xsk_ring_prod *tx, int fd,
                             const __u64 *addrs, const uint32_t *lens, unsigned n)
{
    if (n && xsk_prod_nb_free(tx, n) < n) {
        u->tx_ring_full++;
        give_frames(u, addrs, n);
        return;
    }
    transmit(tx, fd, addrs, lens, n);
}

static unsigned tx_room(struct gw_umemq *u, struct xsk_ring_prod *tx, unsigned n)
{
    unsigned room = xsk_prod_nb_free(tx, n);
    if (room < n) {
        u->tx_ring_full++;
        n = room;
    }
    return n > MAX_BURST ? MAX_BURST : n;
}

static uint64_t mac_at(const uint8_t *f)
{
    uint64_t m = 0;
    for (int i = 0; i < 6; i++)
        m = m << 8 | f[i];
    return m;
}

/* 1 if the frame may leave the guest at all; counts why not. */
static int allowed(struct gw_local *l, const uint8_t *f, uint32_t len)
{
    if (len < 14) {
        if (l)
            l->runts++;
        return 0;
    }
    if (l && l->check_src && mac_at(f + 6) != l->own_mac) {
        l->spoofed++;
        return 0;
    }
    if (l && ((f[12] == 0x81 && f[13] == 0x00) || (f[12] == 0x88 && f[13] == 0xa8))) {
        l->tagged++;
        return 0;
    }
    return 1;
}

/* Copies the frame for other guests if it is theirs too; 1 if it is only
   theirs (unicast to a local MAC) and must not go to the wire. */
static int keep_local(struct gw_local *l, const uint8_t *f, uint32_t len)
{
    int group, mine = 0;

    if (!l)
        return 0;
    group = f[0] & 1;
    if (!group) {
        uint64_t d = (uint64_t)(l->vlan & 0xfff) << 48 | mac_at(f);
        unsigned nm = __atomic_load_n(l->nmacs, __ATOMIC_ACQUIRE);
        for (unsigned i = 0; i < nm && !mine; i++)
            mine = l->macs[i] == d;
        if (!mine)
            return 0;
    }
    if (l->n < l->cap) {
        memcpy(l->base + l->offs[l->n], f, len);
        l->lens[l->n++] = len;
    } else {
        l->dropped++;
    }
    return mine;
}

/* Tags a guest frame that was copied VLAN_HLEN bytes into its UMEM frame `f`
   (and is at least 14 bytes long: allowed()): its two addresses move down
   to the start, the device's 802.1Q tag (priority 0) fills the gap. Returns
   the tagged length. */
static uint32_t push_vlan(uint8_t *f, uint32_t len, unsigned vid)
{
    memmove(f, f + VLAN_HLEN, 12);
    f[12] = 0x81;
    f[13] = 0x00;
    f[14] = (vid >> 8) & 0x0f;
    f[15] = vid & 0xff;
    return len + VLAN_HLEN;
}

/* A GSO frame, segmented straight into UMEM frames and sent, after the
   frames before it (order kept). Segments for local guests are copied out
   like any frame. Refused headers are counted; so is a lack of frames or
   ring room, which drops the whole frame (TCP sends it again). Each segment
   is built VLAN_HLEN bytes into its frame when vid is set, for its tag. */
static void send_gso(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_prod *tx, int fd,
                     const uint8_t *f, uint32_t len, const struct gw_net_hdr *h,
                     struct gw_local *local, unsigned vid, struct gw_cap *cap, uint64_t ts)
{
    unsigned room = vid ? VLAN_HLEN : 0;
    __u64 segs[GW_GSO_MAX_SEGS], wire[GW_GSO_MAX_SEGS], spare[GW_GSO_MAX_SEGS];
    uint32_t wire_lens[GW_GSO_MAX_SEGS];
    struct gw_gso plan;
    int n = gw_gso_plan(f, len, h, (uint32_t)u->frame_size - room, &plan);
    unsigned k, w = 0, s = 0;

    if (n < 0) {
        vq->drop_bad_gso++;
        return;
    }
    /* Segments as long as the device's MTU allows, no longer: the guest's MSS
       may not make the gateway put longer frames on the wire (issue 12). The
       first segment is the longest (gw_gso_plan). */
    if (local && local->max_frame
        && plan.hdrs + (plan.payload < plan.mss ? plan.payload : plan.mss) > local->max_frame) {
        local->over_mtu++;
        return;
    }
    if (xsk_prod_nb_free(tx, (__u32)n) < (__u32)n) {
        u->tx_ring_full++;
        return;
    }
    k = take_frames(u, segs, (unsigned)n);
    if (k < (unsigned)n) {
        u->tx_no_frame++;
        give_frames(u, segs, k);
        return;
    }
    for (unsigned i = 0; i < k; i++) {
        uint8_t *out = u->area + segs[i] + room;
        uint32_t l = gw_gso_segment(f, &plan, i, out);
        if (cap)
            gw_cap_add(cap, GW_CAP_TX, out, l, ts);   /* each segment, untagged */
        if (keep_local(local, out, l)) {
            spare[s++] = segs[i];
        } else {
            wire[w] = segs[i];
            wire_lens[w++] = vid ? push_vlan(u->area + segs[i], l, vid) : l;
        }
    }
    transmit_or_free(u, tx, fd, wire, wire_lens, w);
    give_frames(u, spare, s);
    vq->tx_gso++;
    vq->tx_gso_segs += k;
}

int gw_xsk_from_guest(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_prod *tx, int fd,
                      unsigned n, struct gw_local *local)
{
    __u64 addrs[MAX_BURST], dst[MAX_BURST], wire[MAX_BURST], spare[MAX_BURST];
    uint32_t lens[MAX_BURST], wire_lens[MAX_BURST];
    uint8_t hdrs[MAX_BURST * 12];
    unsigned k, w = 0, s = 0, vid = local ? local->vlan & 0xfff : 0;
    unsigned room = vid ? VLAN_HLEN : 0;   /* in front of the guest frame, for its tag */
    struct gw_cap *cap;
    uint64_t ts;
    int got;

    if (vq->error)
        return -1;
    if (!gw_vq_pending(vq))
        return 0;
    n = tx_room(u, tx, n);
    k = take_frames(u, addrs, n);
    if (k < n)
        u->tx_no_frame++;
    if (!k)
        return 0;
    for (unsigned i = 0; i < k; i++)
        dst[i] = addrs[i] + room;
    vq->hdrs = vq->offload ? hdrs : NULL;
    got = gw_vq_tx_burst(vq, u->area, (const uint64_t *)dst, (uint32_t)u->frame_size - room,
                         lens, k);
    vq->hdrs = NULL;
    cap = gw_cap_enter(local);   /* NULL unless someone captures: one load */
    ts = cap ? gw_cap_now() : 0;
    for (unsigned i = 0; i < k; i++) {
        uint8_t *f = (int)i == vq->big_slot ? vq->big : u->area + dst[i];
        struct gw_net_hdr h = { 0 };

        if ((int)i >= got || !allowed(local, f, lens[i])) {
            spare[s++] = addrs[i];
            continue;
        }
        if (vq->offload)
            gw_net_hdr_decode(hdrs + 12 * (size_t)i, &h);
        if (h.gso_type != GW_NET_HDR_GSO_NONE) {
            transmit_or_free(u, tx, fd, wire, wire_lens, w);
            w = 0;
            send_gso(vq, u, tx, fd, f, lens[i], &h, local, vid, cap, ts);
            spare[s++] = addrs[i];
            continue;
        }
        /* The device's MTU bounds what it sends, as a NIC's would; the UMEM
           frame (the burst's cap) is larger. */
        if (local && local->max_frame && lens[i] > local->max_frame) {
            local->over_mtu++;
            spare[s++] = addrs[i];
            continue;
        }
        if (h.flags & GW_NET_HDR_F_NEEDS_CSUM) {
            if (gw_csum_complete(f, lens[i], h.csum_start, h.csum_offset) < 0) {
                vq->drop_bad_csum++;
                spare[s++] = addrs[i];
                continue;
            }
            vq->tx_csum++;
        }
        if (cap)   /* as it leaves the guest's device: checksummed, untagged */
            gw_cap_add(cap, GW_CAP_TX, f, lens[i], ts);
        if (!keep_local(local, f, lens[i])) {
            wire[w] = addrs[i];
            wire_lens[w++] = vid ? push_vlan(u->area + addrs[i], lens[i], vid) : lens[i];
        } else {
            spare[s++] = addrs[i];
        }
    }
    if (cap)
        gw_cap_leave(local, cap);
    transmit_or_free(u, tx, fd, wire, wire_lens, w);
    give_frames(u, spare, s);
    return got;
}

/* 1 if the kernel's RX descriptor names bytes inside one UMEM frame. It
   always does; one that does not names no frame we could give back (its
   address is not one we lent), so it is skipped and counted, never turned
   into frame 0, which has an owner already. */
static int desc_inside(const struct gw_umemq *u, const struct xdp_desc *d)
{
    return d->addr < (__u64)u->nframes * u->frame_size
           && (d->addr & ~u->mask) + d->len <= u->frame_size;
}

void gw_held_sub(uint64_t *held, uint64_t n)
{
    uint64_t cur = __atomic_load_n(held, __ATOMIC_RELAXED), next;

    /* The kernel adds between our load and store: CAS until ours lands. Clamped,
       because a count reset while frames were in flight must not wrap around
       (a wrapped count would shut the device out for good). */
    do {
        next = cur > n ? cur - n : 0;
    } while (!__atomic_compare_exchange_n(held, &cur, next, 0, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
}

unsigned gw_xsk_rx_drain(struct gw_umemq *u, struct xsk_ring_cons *rx)
{
    __u64 addrs[MAX_BURST];
    unsigned total = 0;
    uint32_t idx, k;

    /* Bounded by the ring: the socket is out of the XSKMAP, nothing refills it. */
    while (total <= u->nframes && (k = xsk_ring_cons__peek(rx, MAX_BURST, &idx)) > 0) {
        for (uint32_t i = 0; i < k; i++) {
            const struct xdp_desc *d = xsk_ring_cons__rx_desc(rx, idx + i);
            /* only frames of this UMEM go back to its pool (desc_inside) */
            addrs[i] = desc_inside(u, d) ? (d->addr & u->mask) : UINT64_MAX;
            if (addrs[i] == UINT64_MAX)
                __atomic_fetch_add(&u->rx_bad_desc, 1, __ATOMIC_RELAXED);
        }
        xsk_ring_cons__release(rx, k);
        lock(u);
        for (uint32_t i = 0; i < k && *u->npool < u->nframes; i++)
            if (addrs[i] != UINT64_MAX)
                u->pool[(*u->npool)++] = addrs[i];
        refill_locked(u);
        unlock(u);
        total += k;
    }
    return total;
}

unsigned gw_xsk_tx_drain(struct gw_umemq *u, struct xsk_ring_prod *tx, int fd, int reclaim)
{
    __u64 addrs[MAX_BURST];
    uint32_t cons, prod;
    unsigned back = 0;

    /* The kernel takes what it is kicked for (copy mode: up to 32 a kick); a
       ring it keeps refusing (a busy driver) gets as many kicks as it has
       batches, then we stop asking. */
    for (uint32_t i = 0; i < tx->size / 32 + MAX_KICKS; i++) {
        if (__atomic_load_n(tx->consumer, __ATOMIC_ACQUIRE) == *tx->producer)
            return 0;
        gw_xsk_kick(fd);
    }
    if (!reclaim)
        return 0;
    /* What it still did not take: in copy mode the kernel reads this ring only
       when the socket is kicked or polled, which no one does again, so these
       frames are ours once more and go back to the pool. */
    cons = __atomic_load_n(tx->consumer, __ATOMIC_ACQUIRE);
    prod = *tx->producer;
    if (prod - cons > tx->size)
        return 0;                   /* not a ring state we made: touch nothing */
    while (cons != prod) {
        uint32_t m = 0, k = prod - cons > MAX_BURST ? MAX_BURST : prod - cons;

        for (uint32_t i = 0; i < k; i++) {
            __u64 a = xsk_ring_prod__tx_desc(tx, cons + i)->addr;
            if (a < (__u64)u->nframes * u->frame_size)  /* ours, checked all the same */
                addrs[m++] = a;
        }
        give_frames(u, addrs, m);
        back += m;
        cons += k;
    }
    return back;
}

static int to_guest(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_cons *rx, unsigned n,
                    uint64_t *held, struct gw_local *local)
{
    __u64 offs[MAX_BURST];
    uint32_t lens[MAX_BURST], pos[MAX_BURST], idx, k, g = 0, used;
    uint8_t flags[MAX_BURST], sent[MAX_BURST];
    int got = 0;

    if (vq->error)
        return -1;
    k = xsk_ring_cons__peek(rx, n > MAX_BURST ? MAX_BURST : n, &idx);
    if (!k)
        return 0;
    for (uint32_t i = 0; i < k; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(rx, idx + i);

        if (!desc_inside(u, d))
            continue;
        pos[g] = i;                 /* the good frames, in ring order */
        offs[g] = d->addr;
        lens[g] = d->len;
        /* The guest may skip checking what we verified (GUEST_CSUM). */
        flags[g] = vq->guest_csum && gw_csum_verify(u->area + offs[g], lens[g])
                   ? GW_NET_HDR_F_DATA_VALID : 0;
        g++;
    }
    if (g) {
        struct gw_cap *cap = gw_cap_enter(local);   /* one load when nobody captures */

        vq->rx_flags = flags;
        vq->rx_sent = cap ? sent : NULL;   /* a capture shows what the guest got */
        got = gw_vq_rx_burst(vq, u->area, (const uint64_t *)offs, lens, g);
        vq->rx_flags = NULL;
        vq->rx_sent = NULL;
        if (cap) {
            uint64_t ts = gw_cap_now();

            for (int i = 0; i < got; i++)
                if (sent[i])
                    gw_cap_add(cap, GW_CAP_RX, u->area + offs[i], lens[i], ts);
            gw_cap_leave(local, cap);
        }
        if (got < 0) {
            xsk_ring_cons__cancel(rx, k);
            return -1;
        }
        for (int i = 0; i < got; i++)
            vq->rx_csum_valid += flags[i] != 0;
    }
    /* The ring is consumed in order: up to the first good frame the guest had
       no buffer for (the rest waits), bad descriptors before it included. */
    used = (uint32_t)got < g ? pos[got] : k;
    if (used > (uint32_t)got)
        __atomic_fetch_add(&u->rx_bad_desc, used - (uint32_t)got, __ATOMIC_RELAXED);
    xsk_ring_cons__cancel(rx, k - used);
    xsk_ring_cons__release(rx, used);
    if (held && used)
        gw_held_sub(held, (uint64_t)used);   /* the program counted every redirect */
    lock(u);
    for (int i = 0; i < got && *u->npool < u->nframes; i++)
        u->pool[(*u->npool)++] = offs[i] & u->mask;
    refill_locked(u);
    unlock(u);
    return got;
}

int gw_xsk_to_guest(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_cons *rx, unsigned n,
                    uint64_t *held, struct gw_local *local)
{
    return to_guest(vq, u, rx, n, held, local);
}

int gw_xsk_send(struct gw_umemq *u, struct xsk_ring_prod *tx, int fd, const uint8_t *base,
                const uint64_t *offs, const uint32_t *lens, unsigned n)
{
    __u64 addrs[MAX_BURST], sent[MAX_BURST], spare[MAX_BURST];
    uint32_t sent_lens[MAX_BURST];
    unsigned k, m = 0, s = 0;

    k = take_frames(u, addrs, tx_room(u, tx, n));
    for (unsigned i = 0; i < k; i++) {
        if (lens[i] == 0 || lens[i] > u->frame_size) {
            spare[s++] = addrs[i];
            continue;
        }
        memcpy(u->area + addrs[i], base + offs[i], lens[i]);
        sent_lens[m] = lens[i];
        sent[m++] = addrs[i];
    }
    transmit(tx, fd, sent, sent_lens, m);
    give_frames(u, spare, s);
    return (int)m;
}

unsigned gw_xsk_rx_waiting(struct xsk_ring_cons *rx)
{
    return xsk_cons_nb_avail(rx, UINT32_MAX);
}

static uint64_t now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

uint64_t gw_now_ns(void)
{
    return now_ns();
}

int gw_poll(const int *fds, short *revents, unsigned n, int64_t timeout_ns)
{
    struct pollfd pfd[GW_PUMP_MAX_RX + 8];
    struct timespec ts, *tp = NULL;
    int r;

    if (n > sizeof(pfd) / sizeof(pfd[0]))
        return -E2BIG;                  /* the worker polls a handful of fds */
    for (unsigned i = 0; i < n; i++) {
        pfd[i].fd = fds[i];
        pfd[i].events = POLLIN;
        pfd[i].revents = 0;
    }
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tp = &ts;
    }
    r = ppoll(pfd, n, tp, NULL);
    if (r < 0)
        return -errno;
    for (unsigned i = 0; i < n; i++)
        revents[i] = pfd[i].revents;
    return r;
}

/* What the pumps of one CPU share (gw_pump.share_cpu, yield_busy,
   give_way). poller: 1 while a pump polls there with nothing moving, so the
   others sleep instead of polling beside it. p: the pumps inside
   gw_pump_sleep or gw_pump_run there (more than GW_CPU_PUMPS go unlisted
   and are only never yielded to); lock makes a listed pump's rings safe to
   read from another thread: its worker stays inside that call, and its
   rings mapped, until it has left the list. A pump throttled within
   GW_THROTTLED_NS is never yielded to: yielding to a guest that makes us
   walk for nothing cost the healthy guest beside it 8 % (noisy bench). */
#define GW_MAX_CPUS 1024
#define GW_CPU_PUMPS 16
#define GW_THROTTLED_NS 1000000000ull
#define GW_YIELD_NS 20000ull
struct gw_cpu {
    uint32_t poller;
    uint32_t lock;
    uint32_t n;
    struct gw_pump *p[GW_CPU_PUMPS];
};
static struct gw_cpu cpus[GW_MAX_CPUS];

void gw_pollers_pretend(int on)
{
    for (unsigned i = 0; i < GW_MAX_CPUS; i++)
        __atomic_store_n(&cpus[i].poller, on ? 1u : 0u, __ATOMIC_RELEASE);
}

static uint32_t work_pretended;

void gw_work_pretend(int on)
{
    __atomic_store_n(&work_pretended, on ? 1u : 0u, __ATOMIC_RELEASE);
}

static void pumps_lock(struct gw_cpu *c)
{
    while (__atomic_exchange_n(&c->lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();          /* its holder may be preempted on this CPU */
}

static void pumps_unlock(struct gw_cpu *c)
{
    __atomic_store_n(&c->lock, 0, __ATOMIC_RELEASE);
}

/* The CPU a pump sharing it runs on, or NULL (not sharing, or unknown). */
static struct gw_cpu *this_cpu(const struct gw_pump *p)
{
    int cpu = sched_getcpu();

    return p->share_cpu && cpu >= 0 && cpu < GW_MAX_CPUS ? &cpus[cpu] : NULL;
}

/* List p on c: its slot, or -1 (c NULL, or the list is full). */
static int pumps_join(struct gw_pump *p, struct gw_cpu *c)
{
    int slot = -1;

    if (!c)
        return -1;
    pumps_lock(c);
    for (int i = 0; i < GW_CPU_PUMPS && slot < 0; i++)
        if (!c->p[i]) {
            c->p[i] = p;
            __atomic_store_n(&c->n, c->n + 1, __ATOMIC_RELAXED);
            slot = i;
        }
    pumps_unlock(c);
    return slot;
}

static void pumps_leave(struct gw_cpu *c, int slot)
{
    if (slot < 0)
        return;
    pumps_lock(c);
    c->p[slot] = NULL;
    __atomic_store_n(&c->n, c->n - 1, __ATOMIC_RELAXED);
    pumps_unlock(c);
}

/* 1 if q's rings hold work its worker is woken for: a frame in an RX socket
   (unless frames wait there for guest buffers already: it sleeps on the
   guest's RX kick then) or a chain on the guest's TX ring; 0 if q was
   throttled within GW_THROTTLED_NS. Reads only: gw_xsk_rx_waiting would
   move q's cached producer. */
static int has_work(const struct gw_pump *q, uint64_t now)
{
    uint64_t throttled = __atomic_load_n(&q->throttled_ns, __ATOMIC_RELAXED);

    if (throttled && now < throttled + GW_THROTTLED_NS)
        return 0;                   /* (also if stamped after our `now` was read) */
    if (!__atomic_load_n(&q->waiting, __ATOMIC_RELAXED))
        for (unsigned i = 0; i < q->nrx && i < GW_PUMP_MAX_RX; i++) {
            const struct xsk_ring_cons *r = q->rx[i].rx;

            if (__atomic_load_n(r->producer, __ATOMIC_ACQUIRE)
                != __atomic_load_n(r->consumer, __ATOMIC_RELAXED))
                return 1;
        }
    return gw_vq_peek(q->txq);
}

/* 1 if another pump listed on c has work (GW_CPU_PUMPS reads at most). A
   list being changed now is looked at on a later pass. */
static int others_have_work(const struct gw_pump *p, struct gw_cpu *c, uint64_t now)
{
    int found = 0;

    if (__atomic_load_n(&work_pretended, __ATOMIC_ACQUIRE))
        return 1;
    if (__atomic_load_n(&c->n, __ATOMIC_RELAXED) < 2
        || __atomic_exchange_n(&c->lock, 1, __ATOMIC_ACQUIRE))
        return 0;
    for (int i = 0; i < GW_CPU_PUMPS && !found; i++)
        found = c->p[i] && c->p[i] != p && has_work(c->p[i], now);
    pumps_unlock(c);
    return found;
}

/* c: the CPU's shared state (this_cpu), or NULL. marked: this pump set
   c->poller; the caller clears it after. */
static long pump_loop(struct gw_pump *p, uint64_t spin_ns, uint64_t budget_ns,
                      struct gw_cpu *c, int *marked)
{
    uint64_t start = now_ns(), active = start, t, yielded = start;
    uint64_t quiet = p->first_wait_ns ? p->first_wait_ns : spin_ns;
    long moved = 0;

    p->idle = 0;
    p->throttled = 0;
    p->first_ns = 0;
    for (;;) {
        unsigned waiting = 0;
        int n, k = 0, r;
        uint64_t walk0 = p->txq->walked_total + p->rxq->walked_total, walk;

        p->passes++;
        n = gw_xsk_from_guest(p->txq, p->tx_u, p->tx, p->tx_fd, GW_BURST, p->local);
        if (n < 0 || gw_vq_call(p->txq) < 0) {
            p->broken = 1;
            return -1;
        }
        for (unsigned i = 0; i < p->nrx && i < GW_PUMP_MAX_RX; i++) {
            r = to_guest(p->rxq, p->rx[i].u, p->rx[i].rx, GW_BURST, p->rx[i].held, p->local);
            if (r < 0) {
                p->broken = 2;
                return -1;
            }
            k += r;
            waiting += gw_xsk_rx_waiting(p->rx[i].rx);
        }
        if (k && gw_vq_call(p->rxq) < 0) {
            p->broken = 2;
            return -1;
        }
        p->waiting = waiting;
        moved += n + k;
        walk = p->txq->walked_total + p->rxq->walked_total - walk0;
        if (walk > GW_THROTTLE_WALK && walk > GW_THROTTLE_PER_FRAME * (uint64_t)(n + k)) {
            p->throttled = 1;       /* the worker sleeps GW_THROTTLE_MS */
            __atomic_store_n(&p->throttled_ns, now_ns(), __ATOMIC_RELAXED);
            return moved;
        }
        if ((p->local && p->local->n) || __atomic_exchange_n(p->attention, 0, __ATOMIC_ACQ_REL))
            return moved;
        t = now_ns();
        if (n || k) {
            if (k && !p->first_ns)      /* the wire's arrivals: what a worker predicts */
                p->first_ns = t;
            active = t;
            quiet = spin_ns;            /* after a frame: the usual window */
            if (*marked) {
                __atomic_store_n(&c->poller, 0, __ATOMIC_RELEASE);
                *marked = 0;
            }
        }
        else if (t - active >= quiet) {
            p->idle = 1;
            return moved;
        }
        else {
            uint32_t none = 0;

            if (c && !*marked
                && !__atomic_compare_exchange_n(&c->poller, &none, 1, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_RELAXED)) {
                p->handed++;            /* another pump polls here: the CPU is busy, */
                p->idle = 1;            /* so a wake-up costs little; polling beside */
                return moved;           /* it cost its frames a scheduler tick */
            }
            *marked = c != NULL;
            if (*marked && p->give_way && t - yielded >= GW_YIELD_NS
                && others_have_work(p, c, t)) {
                __atomic_store_n(&c->poller, 0, __ATOMIC_RELEASE);
                *marked = 0;            /* the flag is the woken pump's to take */
                sched_yield();
                p->gave_way++;
                yielded = t = now_ns();
                if (others_have_work(p, c, t)) {
                    p->idle = 1;        /* it did not run (EEVDF found it not */
                    return moved;       /* eligible): sleeping lets it */
                }
            }
            else
                __builtin_ia32_pause();
        }
        if (p->yield_busy && moved >= GW_BURST && c && t - yielded >= GW_YIELD_NS) {
            if (others_have_work(p, c, t)) {
                sched_yield();          /* a woken pump of this CPU runs now, not when */
                p->yields++;            /* this one sleeps (yield_busy) */
            }
            yielded = t = now_ns();     /* looked at most every GW_YIELD_NS */
        }
        if (t - start >= budget_ns)
            return moved;
    }
}

static long run_here(struct gw_pump *p, uint64_t spin_ns, uint64_t budget_ns)
{
    struct gw_cpu *c = this_cpu(p);
    int marked = 0;
    long r = pump_loop(p, spin_ns, budget_ns, c, &marked);

    if (marked)
        __atomic_store_n(&c->poller, 0, __ATOMIC_RELEASE);
    return r;
}

long gw_pump_run(struct gw_pump *p, uint64_t spin_ns, uint64_t budget_ns)
{
    struct gw_cpu *c = this_cpu(p);
    int slot = pumps_join(p, c);
    long r = run_here(p, spin_ns, budget_ns);

    pumps_leave(c, slot);
    return r;
}

static int sleep_and_run(struct gw_pump *p, const int *fds, const uint8_t *flags,
                         short *revents, unsigned n, int64_t timeout_ns,
                         uint64_t poll_until_ns, uint64_t spin_ns, uint64_t budget_ns)
{
    int r = gw_poll(fds, revents, n, timeout_ns);
    uint64_t v;

    p->woke_ns = now_ns();
    p->pumped = 0;
    p->early = 0;
    if (r < 0)
        return r;
    for (unsigned i = 0; i < n; i++)
        if (revents[i] && (flags[i] & GW_WAKE_RETURN))
            return r;
    for (unsigned i = 0; i < n; i++)
        if (revents[i] && (flags[i] & GW_WAKE_DRAIN))
            (void)!read(fds[i], &v, sizeof(v));   /* EAGAIN: empty already */
    if (r == 0) {
        if (poll_until_ns <= p->woke_ns)
            return 0;               /* a plain timeout, or the window passed while we woke */
        p->early = 1;
        p->first_wait_ns = poll_until_ns - p->woke_ns;
    }
    /* The guest's kicks off while we poll anyway (the worker asked for them
       to sleep): one it sent during the run would only end the next sleep at
       once, for nothing. An error here shows in the run (vq->error). */
    gw_vq_set_notify(p->txq, 0);
    p->moved = run_here(p, spin_ns, budget_ns);
    p->first_wait_ns = 0;
    p->pumped = 1;
    return r;
}

int gw_pump_sleep(struct gw_pump *p, const int *fds, const uint8_t *flags, short *revents,
                  unsigned n, int64_t timeout_ns, uint64_t poll_until_ns, uint64_t spin_ns,
                  uint64_t budget_ns)
{
    struct gw_cpu *c = this_cpu(p);
    int slot = pumps_join(p, c);    /* asleep too: it may be woken */
    int r = sleep_and_run(p, fds, flags, revents, n, timeout_ns, poll_until_ns, spin_ns,
                          budget_ns);

    pumps_leave(c, slot);
    return r;
}
