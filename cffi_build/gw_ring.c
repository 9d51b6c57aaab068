/*
 * Device side of a virtio 1.x split or packed ring (see gw_ring.h for the
 * contract; the packed layout's halves are in gw_packed.h).
 *
 * Little-endian x86 host only: ring fields are read and written as native
 * integers. Everything read from the guest is copied into a local first and
 * checked there, so a guest rewriting its ring under us cannot make us act on
 * a value we did not check. One chain iterator (chain_next) does all the
 * descriptor checks; the burst loops only ever see checked descriptors whose
 * whole [addr, addr+len) range lies in guest memory.
 */
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "gw_ring.h"
#include "gw_log.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1

/* Longest indirect table we follow. The spec bounds a whole chain by the
   queue size, but Linux builds indirect tables from an skb's fragment count
   regardless of it, so a fixed, generous bound is kinder and still stops a
   guest from making us walk gigabytes of "descriptors". */
#define MAX_INDIRECT 1024

/* Sub-reasons for GW_E_INDIRECT, kept in err_detail bits 32..39; the low 32
   bits hold the indirect descriptor's len. */
#define IND_NOT_NEGOTIATED 1
#define IND_NESTED 2
#define IND_WITH_NEXT 3
#define IND_BAD_LEN 4
#define IND_IN_CHAIN 5      /* packed: an indirect descriptor after others (2.8.21) */

/* Ring layout offsets (virtio 1.x, 2.7). */
#define AVAIL_IDX 2
#define AVAIL_RING(i) (4 + 2 * (size_t)(i))
#define USED_IDX 2
#define USED_ELEM(i) (4 + 8 * (size_t)(i))

/* Keeps the compiler from re-reading guest memory in place of a local copy. */
#define compiler_barrier() __asm__ __volatile__("" ::: "memory")

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline uint16_t ld16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

static inline uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* Record the first error only: it is the one that explains the breakage. */
static int fail(struct gw_vq *vq, uint32_t code, uint64_t detail)
{
    log_sync(vq);           /* what this burst already wrote stays logged */
    if (!vq->error) {
        vq->error = code;
        vq->err_detail = detail;
    }
    return -1;
}

/* GPA -> host pointer; *room = bytes left in that region from gpa. */
static uint8_t *xlate(const struct gw_mem *m, uint64_t gpa, uint64_t *room)
{
    uint32_t n = m->nregions < GW_MAX_REGIONS ? m->nregions : GW_MAX_REGIONS;
    for (uint32_t i = 0; i < n; i++) {
        const struct gw_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            *room = r->size - (gpa - r->gpa);
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

/* Is every byte of [gpa, gpa+len) in some region? Regions may be adjacent,
   so the range may be covered piecewise. */
static int range_ok(const struct gw_mem *m, uint64_t gpa, uint64_t len)
{
    if (len && gpa > UINT64_MAX - (len - 1))
        return 0;                               /* addr + len wraps */
    while (len) {
        uint64_t room;
        if (!xlate(m, gpa, &room))
            return 0;
        if (room >= len)
            return 1;
        gpa += room;
        len -= room;
    }
    return 1;
}

/* The two copies below run only on ranges range_ok() accepted. */
static void copy_from_guest(const struct gw_mem *m, void *dst, uint64_t gpa, uint64_t len)
{
    uint8_t *d = dst;
    while (len) {
        uint64_t room;
        uint8_t *h = xlate(m, gpa, &room);
        uint64_t k = min64(len, room);
        memcpy(d, h, k);
        d += k;
        gpa += k;
        len -= k;
    }
}

/* ---- descriptor chain iterator ---------------------------------------- */

struct chain {
    struct gw_vq *vq;
    uint64_t ind_gpa;       /* indirect table GPA, when in_indirect */
    uint32_t tsize;         /* entries in the current table */
    uint32_t idx;           /* next entry to read */
    uint32_t count;         /* entries read from the current table */
    uint8_t more;           /* idx is valid: the previous desc had NEXT */
    uint8_t in_indirect;
    uint16_t head;          /* what the used element names: split head, packed buffer id */
    /* packed only (gw_packed.h) */
    uint16_t pos;           /* next ring descriptor */
    uint8_t wrap;           /* its wrap counter */
    uint8_t first;          /* pos is the head, whose flags were checked */
    uint32_t ndesc;         /* ring descriptors read */
    uint32_t limit;         /* ring descriptors this chain may take */
    uint32_t walked;        /* descriptors read, ring and indirect (<= GW_MAX_CHAIN_READS) */
    uint32_t allow;         /* RX: reads left to the frame; past it chain_next says WALK_OUT */
};

/* chain_next: the frame's walk allowance is spent (not a guest error). */
#define WALK_OUT (-2)

/* Called before every descriptor read, ring or indirect. A chain longer than
   GW_MAX_CHAIN is a lie (no driver builds one: Linux's limit is the same as
   vhost-net's UIO_MAXIOV); a frame out of its allowance stops quietly. */
static int walk_one(struct chain *c)
{
    if (c->walked >= GW_MAX_CHAIN_READS)
        return fail(c->vq, GW_E_CHAIN_LONG, c->walked + 1);
    if (c->walked >= c->allow)
        return WALK_OUT;
    c->walked++;
    return 0;
}

static int packed_chain_next(struct chain *c, struct desc *d);

static int chain_start(struct chain *c, struct gw_vq *vq, uint16_t head)
{
    if (head >= vq->size)
        return fail(vq, GW_E_HEAD_IDX, head);
    c->vq = vq;
    c->ind_gpa = 0;
    c->tsize = vq->size;
    c->idx = head;
    c->count = 0;
    c->more = 1;
    c->in_indirect = 0;
    c->head = head;
    c->walked = 0;
    c->allow = GW_MAX_CHAIN_READS;
    return 0;
}

/* Yields the next data descriptor, fully checked: 1 = *d valid, 0 = end of
   chain, -1 = guest error (queue now broken). An indirect descriptor is
   followed, never yielded. */
static int chain_next(struct chain *c, struct desc *d)
{
    struct gw_vq *vq = c->vq;

    if (vq->packed)
        return packed_chain_next(c, d);
    for (;;) {
        if (!c->more)
            return 0;
        /* A chain can use each table entry once; more means a loop. */
        if (++c->count > c->tsize)
            return fail(vq, GW_E_CHAIN_LOOP, c->count);
        int w = walk_one(c);
        if (w < 0)
            return w;
        if (c->in_indirect)
            copy_from_guest(vq->mem, d, c->ind_gpa + 16 * (uint64_t)c->idx, 16);
        else
            memcpy(d, vq->desc + 16 * (size_t)c->idx, 16);
        compiler_barrier();

        if (d->flags & DESC_F_INDIRECT) {
            uint64_t why = 0;
            if (!vq->indirect)
                why = IND_NOT_NEGOTIATED;
            else if (c->in_indirect)
                why = IND_NESTED;
            else if (d->flags & DESC_F_NEXT)
                why = IND_WITH_NEXT;
            else if (d->len == 0 || d->len % 16 || d->len / 16 > MAX_INDIRECT)
                why = IND_BAD_LEN;
            if (why)
                return fail(vq, GW_E_INDIRECT, why << 32 | d->len);
            if (!range_ok(vq->mem, d->addr, d->len))
                return fail(vq, GW_E_DESC_ADDR, d->addr);
            /* The WRITE flag of the table descriptor itself means nothing. */
            c->ind_gpa = d->addr;
            c->tsize = d->len / 16;
            c->idx = 0;
            c->count = 0;
            c->in_indirect = 1;
            continue;
        }
        if (d->flags & DESC_F_NEXT) {
            if (d->next >= c->tsize)
                return fail(vq, GW_E_DESC_IDX, d->next);
            c->idx = d->next;
        } else {
            c->more = 0;
        }
        if (!range_ok(vq->mem, d->addr, d->len))
            return fail(vq, GW_E_DESC_ADDR, d->addr);
        return 1;
    }
}

/* ---- avail / used ------------------------------------------------------ */

/* Entries the guest has made available; acquire pairs with the guest's
   release of avail->idx so the ring entries and descriptors are visible. */
static int avail_count(struct gw_vq *vq)
{
    uint16_t idx = __atomic_load_n((uint16_t *)(vq->avail + AVAIL_IDX), __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(idx - vq->last_avail);
    if (n > vq->size)
        return fail(vq, GW_E_AVAIL_IDX, idx);
    return n;
}

static uint16_t avail_head(struct gw_vq *vq, uint16_t pos)
{
    return ld16(vq->avail + AVAIL_RING(pos & (vq->size - 1)));
}

static void used_put(struct gw_vq *vq, uint16_t pos, uint16_t id, uint32_t len)
{
    uint8_t *e = vq->used + USED_ELEM(pos & (vq->size - 1));
    st32(e, id);
    st32(e + 4, len);
    log_used(vq, USED_ELEM(pos & (vq->size - 1)), 8);
}

/* Release: the guest must see the used entries (and the data we wrote into
   its buffers) before it sees the new index. */
static void used_publish(struct gw_vq *vq, uint16_t used_idx)
{
    log_sync(vq);           /* buffers and entries are logged before the guest sees them */
    if (used_idx != vq->used_idx) {
        __atomic_store_n((uint16_t *)(vq->used + USED_IDX), used_idx, __ATOMIC_RELEASE);
        log_used(vq, USED_IDX, 2);
        log_sync(vq);
    }
    vq->used_idx = used_idx;
}

/* virtio 2.7.10: has new_idx passed event since we were at old? */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---- layout primitives: the burst loops see only these ---------------- */

/* A burst's position, committed to the vq only at its end, so that an RX
   frame that runs out of buffers can go back to where it began. */
struct cursor {
    uint16_t avail;             /* next chain to take */
    uint16_t used;              /* next used slot */
    uint8_t avail_wrap;         /* packed only */
    uint8_t used_wrap;
    int left;                   /* split: entries of this burst's avail snapshot not taken */
    uint32_t ndesc;             /* packed: ring descriptors taken this burst */
    uint32_t nshadow;           /* packed: used elements waiting in vq->shadow */
};

#include "gw_packed.h"

static int cursor_begin(struct gw_vq *vq, struct cursor *cur)
{
    cur->avail = vq->last_avail;
    cur->used = vq->used_idx;
    cur->avail_wrap = vq->avail_wrap;
    cur->used_wrap = vq->used_wrap;
    cur->ndesc = 0;
    cur->nshadow = 0;
    cur->left = 0;
    if (vq->packed)
        return pk_pos_ok(vq);
    cur->left = avail_count(vq);                /* one snapshot per burst */
    return cur->left < 0 ? -1 : 0;
}

/* Points c at the next available chain without taking it: 1, or 0 when the
   guest has none, -1 when it lied. */
static int cursor_chain(struct gw_vq *vq, struct cursor *cur, struct chain *c)
{
    if (vq->packed)
        return packed_chain_start(c, vq, cur);
    if (!cur->left)
        return 0;
    return chain_start(c, vq, avail_head(vq, cur->avail)) < 0 ? -1 : 1;
}

/* Takes the chain c walked to its end; the guest gets it back used, with
   len bytes written, when the burst commits. */
static void cursor_take(struct gw_vq *vq, struct cursor *cur, const struct chain *c, uint32_t len)
{
    if (vq->packed) {
        packed_take(vq, cur, c, len);
        return;
    }
    used_put(vq, cur->used++, c->head, len);
    cur->avail++;
    cur->left--;
}

static void cursor_commit(struct gw_vq *vq, const struct cursor *cur)
{
    if (vq->packed) {
        packed_publish(vq, cur);
        return;
    }
    vq->last_avail = cur->avail;
    used_publish(vq, cur->used);
}

/* The end of a burst: how far it walked, for tests and the worker's throttle. */
static void walk_done(struct gw_vq *vq, uint32_t walked)
{
    vq->walked = walked;
    vq->walked_total += walked;
    if (walked > vq->walked_max)
        vq->walked_max = walked;
}

/* May a burst that has read walked descriptors start one more chain (TX) or
   frame (RX)? Either reads at most GW_MAX_CHAIN_READS. */
static inline int walk_room(uint32_t walked)
{
    return walked + GW_MAX_CHAIN_READS <= GW_BURST_WALK;
}

int gw_vq_pending(struct gw_vq *vq)
{
    if (vq->error)
        return -1;
    if (vq->packed) {
        if (vq->stalled) {
            if (pk_pos_ok(vq) < 0 || vq->stall_idx >= vq->size)
                return fail(vq, GW_E_AVAIL_IDX, vq->stall_idx);
            /* Nothing new until the guest makes the stall point available. */
            return pk_avail(pk_flags_acquire(vq, vq->stall_idx), vq->stall_wrap);
        }
        return packed_pending(vq);
    }
    int n = avail_count(vq);
    if (n > 0 && vq->stalled
        && __atomic_load_n((uint16_t *)(vq->avail + AVAIL_IDX), __ATOMIC_RELAXED) == vq->stall_idx)
        return 0;       /* what is there was tried already; wait for more */
    return n;
}

int gw_vq_peek(const struct gw_vq *vq)
{
    uint16_t last = __atomic_load_n(&vq->last_avail, __ATOMIC_RELAXED), idx;

    if (__atomic_load_n(&vq->error, __ATOMIC_RELAXED) || !vq->avail || !vq->desc)
        return 0;
    if (vq->packed)     /* a position outside the ring is the owner's to refuse */
        return last < vq->size && pk_avail(pk_flags_acquire(vq, last), vq->avail_wrap);
    idx = __atomic_load_n((uint16_t *)(vq->avail + AVAIL_IDX), __ATOMIC_ACQUIRE);
    return idx != last;
}

/* ---- TX: guest -> us --------------------------------------------------- */

int gw_vq_tx_burst(struct gw_vq *vq, uint8_t *base, const uint64_t *offs,
                   uint32_t cap, uint32_t *lens, unsigned n)
{
    struct cursor cur;

    if (vq->error || cursor_begin(vq, &cur) < 0)
        return -1;

    unsigned got = 0, taken = 0;
    uint64_t bytes = 0, too_big = 0, short_ = 0;
    uint32_t walked = 0;
    int big_used = 0;

    vq->big_slot = -1;
    /* Every chain taken counts toward n, dropped or not (got <= taken), and
       the walk budget bounds the descriptors read; after a frame in big,
       stop too: big holds one per burst. */
    while (taken < n && !big_used && walk_room(walked)) {
        struct chain c;
        struct desc d;
        uint64_t skip = vq->hdr_len, flen = 0, room = cap;
        uint8_t *dst = base + offs[got];
        uint8_t *hdr = vq->hdrs ? vq->hdrs + 12 * (size_t)got : NULL;
        int r;

        if ((r = cursor_chain(vq, &cur, &c)) <= 0) {
            if (r < 0)
                return -1;
            break;
        }
        if (hdr)
            memset(hdr, 0, 12);
        /* Walk the whole chain even past cap, so every chain we hand back
           was fully checked. The header may span descriptors (ANY_LAYOUT). */
        while ((r = chain_next(&c, &d)) > 0) {
            uint64_t a = d.addr, l = d.len;
            if (d.flags & DESC_F_WRITE) {
                walk_done(vq, walked + c.walked);
                return fail(vq, GW_E_DIRECTION, d.flags);
            }
            if (skip) {
                uint64_t s = min64(skip, l);
                if (hdr)
                    copy_from_guest(vq->mem, hdr + (vq->hdr_len - skip), a, s);
                a += s;
                l -= s;
                skip -= s;
            }
            /* A GSO frame (gso_type, hdr[1], set: the header came first)
               outgrowing cap moves to big, if this burst has not used it. */
            if (hdr && hdr[1] && vq->big && dst != vq->big && flen + l > cap
                && flen + l <= vq->big_cap) {
                memcpy(vq->big, dst, flen);
                dst = vq->big;
                room = vq->big_cap;
            }
            if (l && flen < room)
                copy_from_guest(vq->mem, dst + flen, a, min64(l, room - flen));
            flen += l;
        }
        walked += c.walked;
        if (r < 0) {
            walk_done(vq, walked);
            return -1;
        }

        cursor_take(vq, &cur, &c, 0);           /* TX used len: nothing written */
        taken++;
        if (flen > room) {
            too_big++;
        } else if (flen == 0) {
            short_++;
        } else {
            if (dst == vq->big) {
                vq->big_slot = (int32_t)got;
                big_used = 1;
            }
            lens[got++] = (uint32_t)flen;
            bytes += flen;
        }
    }

    cursor_commit(vq, &cur);
    walk_done(vq, walked);
    vq->packets += got;
    vq->bytes += bytes;
    vq->drop_too_big += too_big;
    vq->drop_short += short_;
    return (int)got;
}

/* ---- RX: us -> guest --------------------------------------------------- */

/* Writes header ++ frame into guest buffers, one descriptor at a time, and
   remembers where num_buffers landed (it can only be filled in at the end,
   and a tiny first descriptor may even split it). */
struct rx_writer {
    struct gw_vq *vq;
    const struct gw_mem *mem;
    const uint8_t *frame;
    uint64_t hdr_len, total, pos;   /* pos: bytes of header ++ frame written */
    uint8_t *nb[2];                 /* host addresses of num_buffers bytes */
    uint64_t nb_gpa[2];             /* and their GPAs, to log them once written */
    uint8_t flags;                  /* the header's flags byte */
};

static uint64_t rx_put(struct rx_writer *w, uint64_t gpa, uint64_t len)
{
    uint64_t n = min64(len, w->total - w->pos), done = n, start = gpa;

    while (n) {
        uint64_t room;
        uint8_t *h = xlate(w->mem, gpa, &room);
        uint64_t k = min64(n, room), hk = 0;
        if (w->pos < w->hdr_len) {
            hk = min64(k, w->hdr_len - w->pos);
            memset(h, 0, hk);
            if (w->pos == 0)
                h[0] = w->flags;
            for (int b = 0; b < 2; b++) {
                if (10 + (uint64_t)b >= w->pos && 10 + (uint64_t)b < w->pos + hk) {
                    w->nb[b] = h + (10 + b - w->pos);
                    w->nb_gpa[b] = gpa + (10 + b - w->pos);
                }
            }
        }
        if (k > hk)
            memcpy(h + hk, w->frame + (w->pos + hk - w->hdr_len), k - hk);
        w->pos += k;
        gpa += k;
        n -= k;
    }
    /* After the copy: a bit set first could be cleared by QEMU's next sync
       before our bytes land, and that page would never be sent again. */
    log_guest(w->vq, start, done);
    return done;
}

/* Was a frame of total bytes dropped for no room against this very ring
   state? The chains a frame walked are available and the driver may not
   change them (2.7.13 / 2.8.21), so only taking chains (a moved position,
   which a shorter frame can do), more chains (split: a moved avail->idx) or
   a reset of the ring (Python clears the memo) can make room. */
static int noroom_same(const struct gw_vq *vq, const struct cursor *cur, uint64_t total)
{
    if (!vq->noroom_valid || total < vq->noroom_len || cur->avail != vq->noroom_avail)
        return 0;
    if (vq->packed)
        return cur->avail_wrap == vq->noroom_wrap;
    return (uint16_t)(cur->avail + cur->left) == vq->noroom_idx;
}

static void noroom_note(struct gw_vq *vq, const struct cursor *cur0, uint64_t total)
{
    vq->noroom_valid = 1;
    vq->noroom_len = (uint32_t)total;
    vq->noroom_avail = cur0->avail;
    vq->noroom_wrap = cur0->avail_wrap;
    vq->noroom_idx = (uint16_t)(cur0->avail + cur0->left);
}

int gw_vq_rx_burst(struct gw_vq *vq, const uint8_t *base, const uint64_t *offs,
                   const uint32_t *lens, unsigned n)
{
    struct cursor cur;

    if (vq->error || cursor_begin(vq, &cur) < 0)
        return -1;

    unsigned i;
    uint64_t packets = 0, bytes = 0, too_big = 0, no_room = 0;
    uint32_t walked = 0;

    vq->stalled = 0;
    for (i = 0; i < n; i++) {
        struct rx_writer w = { vq, vq->mem, base + offs[i], vq->hdr_len,
                               (uint64_t)vq->hdr_len + lens[i], 0, { NULL, NULL }, { 0, 0 },
                               vq->rx_flags ? vq->rx_flags[i] : 0 };
        struct cursor cur0 = cur;
        int nbufs = 0, fits = 1;
        uint32_t fwalk = 0;             /* descriptors this frame read */

        if (!walk_room(walked))
            goto out;                   /* budget spent: frame i waits for the next burst */
        if (vq->rx_sent)
            vq->rx_sent[i] = 0;         /* until it is written whole */
        if (noroom_same(vq, &cur, w.total)) {
            no_room++;
            continue;
        }
        while (w.pos < w.total) {
            struct chain c;
            struct desc d;
            uint64_t wrote = 0;
            int r = cursor_chain(vq, &cur, &c);

            if (r < 0) {
                walk_done(vq, walked);
                return -1;
            }
            if (r == 0) {
                if ((!vq->packed && (uint16_t)(cur.avail - cur0.avail) == vq->size)
                    || (vq->packed && cur.ndesc - cur0.ndesc >= vq->size)) {
                    /* The whole ring cannot hold it: no room, ever. */
                    fits = 0;
                    break;
                }
                /* Out of guest buffers mid-frame: forget this frame's chains
                   (nothing of it is published) and retry it next burst. */
                if (!vq->packed || cur.ndesc < vq->size) {
                    /* The guest has nothing more: remember where, so the
                       worker sleeps until it adds a buffer there. */
                    vq->stalled = 1;
                    vq->stall_idx = cur.avail;
                    vq->stall_wrap = cur.avail_wrap;
                }
                cur = cur0;
                goto out;
            }
            c.allow = GW_MAX_CHAIN_READS - fwalk;
            while ((r = chain_next(&c, &d)) > 0) {
                if (!(d.flags & DESC_F_WRITE)) {
                    walk_done(vq, walked + c.walked);
                    return fail(vq, GW_E_DIRECTION, d.flags);
                }
                wrote += rx_put(&w, d.addr, d.len);
            }
            fwalk += c.walked;
            walked += c.walked;
            if (r == WALK_OUT) {
                fits = 0;               /* GW_MAX_CHAIN_READS descriptors and still no room */
                break;
            }
            if (r < 0) {
                walk_done(vq, walked);
                return -1;
            }
            if (!vq->mrg_rxbuf && w.pos < w.total) {
                /* Without MRG_RXBUF a frame must fit one chain. The chain
                   stays available for the next frame; the bytes we left in
                   it are garbage the guest never sees. */
                fits = -1;
                break;
            }
            cursor_take(vq, &cur, &c, (uint32_t)wrote);
            nbufs++;
        }
        if (fits < 0) {
            too_big++;
            continue;
        }
        if (!fits) {
            /* As vhost-net discards: the frame goes, the chains it wrote
               garbage into stay available (nothing was published). */
            cur = cur0;
            noroom_note(vq, &cur0, w.total);
            no_room++;
            continue;
        }
        /* num_buffers exists with a 12-byte header; without MRG_RXBUF the
           spec wants it to be 1, which is what nbufs is then. */
        for (int b = 0; b < 2; b++) {
            if (w.nb[b]) {
                *w.nb[b] = (uint8_t)(nbufs >> (8 * b));
                log_guest(vq, w.nb_gpa[b], 1);  /* its page may have been logged and sent already */
            }
        }
        packets++;
        bytes += lens[i];
        if (vq->rx_sent)
            vq->rx_sent[i] = 1;
    }
out:
    cursor_commit(vq, &cur);
    walk_done(vq, walked);
    vq->packets += packets;
    vq->bytes += bytes;
    vq->drop_too_big += too_big;
    vq->drop_no_room += no_room;
    return (int)i;
}

/* ---- notifications ----------------------------------------------------- */

int gw_vq_call(struct gw_vq *vq)
{
    if (vq->error)
        return -1;
    if (vq->packed)
        return packed_call(vq);
    uint16_t now = vq->used_idx, old = vq->signalled_used;
    int valid = vq->signalled_valid, need;

    if (valid && now == old)
        return 0;                               /* nothing new for the guest */
    /* Our used->idx store must be visible before we read the guest's wish,
       else we can miss an interrupt it asked for in between. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vq->event_idx)
        need = !valid || need_event(ld16(vq->avail + AVAIL_RING(vq->size)), now, old);
    else
        need = !(ld16(vq->avail) & AVAIL_F_NO_INTERRUPT);
    vq->signalled_used = now;
    vq->signalled_valid = 1;
    if (need && vq->callfd >= 0) {
        uint64_t one = 1;
        if (write(vq->callfd, &one, sizeof one) < 0) {
            /* EAGAIN: counter saturated, the guest is signalled anyway. */
        }
    }
    return need;
}

int gw_vq_set_notify(struct gw_vq *vq, int enable)
{
    if (vq->error)
        return -1;
    if (vq->packed)
        return packed_set_notify(vq, enable);
    if (vq->event_idx) {
        /* Kick us as soon as anything past what we have taken is added. */
        if (enable) {
            /* Stalled RX: the entries up to stall_idx were tried already. */
            st16(vq->used + USED_ELEM(vq->size), vq->stalled ? vq->stall_idx : vq->last_avail);
            log_used(vq, USED_ELEM(vq->size), 2);
        }
    } else {
        uint16_t f = ld16(vq->used);
        st16(vq->used, enable ? f & ~USED_F_NO_NOTIFY : f | USED_F_NO_NOTIFY);
        log_used(vq, 0, 2);
    }
    log_sync(vq);
    /* The flag store must be visible before we re-check avail->idx, or a
       buffer added just before the guest saw it would wait for no kick. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return gw_vq_pending(vq);
}

int gw_vq_log_write(struct gw_vq *vq, uint64_t gpa, uint64_t len)
{
    uint64_t miss = vq->log_miss;

    if (len && gpa > UINT64_MAX - (len - 1))
        return -1;
    log_guest(vq, gpa, len);
    log_sync(vq);
    return vq->log_miss == miss ? 0 : -1;
}
