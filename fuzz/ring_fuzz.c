/*
 * libFuzzer harness for the device side of the split ring (cffi_build/gw_ring.c).
 *
 * Each input describes one hostile guest: a memory table (1..8 regions of
 * random sizes, adjacent or with gaps in guest-physical space, anywhere up to
 * the top of the 64-bit space), where the three ring parts live (inside a
 * region or in a region of their own, exactly as long as the ring part), the
 * negotiated features (MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, header 10/12),
 * the descriptor table, indirect tables, the avail/used rings and the ring
 * position, then a sequence of calls (TX and RX bursts, call, set_notify,
 * pending) interleaved with guest writes to its rings.
 *
 * All guest memory lives in one malloc'd arena; the bytes between regions
 * (and around the caller's frame buffers) are poisoned, so AddressSanitizer
 * reports any access outside what the memory table describes, even when two
 * regions are adjacent in guest-physical space (they never are here in host
 * space). After every call the harness checks the contract of gw_ring.h:
 *   - return value within [0, n] (bursts), [0, size] (pending), or -1 exactly
 *     when the queue is broken; an error code once set never changes;
 *   - a broken queue neither moves nor touches guest memory;
 *   - last_avail and used_idx advance together, by no more than the guest
 *     made available, and used->idx in guest memory is published;
 *   - counters: packets += frames returned/delivered, bytes += their lengths,
 *     every taken chain is a frame or a counted drop;
 *   - TX lengths are within [1, cap];
 *   - without MRG_RXBUF each delivered RX frame takes exactly one chain.
 * A violation calls abort(), which libFuzzer reports as a crash.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <sanitizer/asan_interface.h>

#include "gw_ring.h"
#include "fuzz_input.h"

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "ring_fuzz: invariant failed at %s:%d: %s\n",        \
                    __FILE__, __LINE__, #cond);                                  \
            abort();                                                             \
        }                                                                        \
    } while (0)

/* A burst that returned -1 (TX or RX alike) moved nothing and counted nothing. */
static void check_broken_untouched(const struct gw_vq *vq, const struct gw_vq *before, int ret)
{
    CHECK(ret == -1 && vq->error != 0);
    CHECK(vq->last_avail == before->last_avail && vq->used_idx == before->used_idx);
    CHECK(vq->packets == before->packets && vq->bytes == before->bytes);
}

#define MAX_DATA_REGIONS 8
#define MAX_REGION_SIZE (64 * 1024)
#define GUARD 64                    /* poisoned bytes around every region */
#define MAX_OPS 48
#define MAX_TX_N 64
#define MAX_TX_CAP 4096
#define MAX_RX_N 32
#define MAX_RX_LEN 2048
#define MAX_IND_TABLES 4

/* ---- input: the reader is fuzz_input.h ----------------------------------- */

/* splitmix64: fills bulk bytes (region contents, frames) from a seed. */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill(uint8_t *p, size_t n, uint64_t seed, int mode)
{
    if (mode == 0) {
        memset(p, 0, n);
        return;
    }
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = mix(&seed);
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}

/* ---- guest memory layout ------------------------------------------------- */

struct layout {
    struct gw_mem mem;
    uint32_t ndata;                 /* regions 0..ndata-1 hold data; the rest rings */
    uint32_t nreal;                 /* regions set up (mem.nregions may claim more) */
    uint8_t dirmode;                /* descriptor flags: 0/3 raw, 1 TX-valid, 2 RX-valid */
    uint64_t host_off[GW_MAX_REGIONS];
    uint8_t *arena;
    size_t arena_len;
    /* indirect tables written into data regions */
    uint32_t nind;
    uint64_t ind_gpa[MAX_IND_TABLES];
    uint32_t ind_n[MAX_IND_TABLES];
};

static uint64_t clamp_gpa(uint64_t gpa, uint64_t size)
{
    /* Python refuses a region whose gpa + size - 1 wraps (_check_region). */
    if (gpa > UINT64_MAX - (size - 1))
        gpa = UINT64_MAX - (size - 1);
    return gpa;
}

static uint64_t pick_gpa(struct in *in, const struct layout *L, uint32_t i, uint64_t size)
{
    uint8_t how = u8(in);
    uint64_t prev_end = 0;
    if (i > 0) {
        const struct gw_region *p = &L->mem.regions[i - 1];
        prev_end = p->gpa + p->size;       /* may be 0 after the top: wraps */
    }
    switch (how & 3) {
    case 0:                                 /* adjacent to the previous region */
        return clamp_gpa(prev_end, size);
    case 1:                                 /* small gap after it */
        return clamp_gpa(prev_end + 1 + (how >> 2) * 8 + u8(in), size);
    case 2:                                 /* anywhere */
        return clamp_gpa(u64(in), size);
    default:                                /* ending at (or near) the top of the space */
        return clamp_gpa(UINT64_MAX - (size - 1) - (how >> 2), size);
    }
}

/* Does [a, a+alen) overlap a region already placed (GPA)? Python refuses overlaps. */
static int gpa_overlaps(const struct layout *L, uint32_t upto, uint64_t a, uint64_t alen)
{
    for (uint32_t j = 0; j < upto; j++) {
        const struct gw_region *r = &L->mem.regions[j];
        if (a <= r->gpa + (r->size - 1) && r->gpa <= a + (alen - 1))
            return 1;
    }
    return 0;
}

static uint64_t place_gpa(struct in *in, const struct layout *L, uint32_t i, uint64_t size)
{
    uint64_t gpa = pick_gpa(in, L, i, size);
    /* Move a clashing region up until it is clear (or give up: overlapping
       regions are legal for C, only Python refuses them). */
    for (int tries = 0; tries < 8 && gpa_overlaps(L, i, gpa, size); tries++) {
        uint64_t top = 0;
        for (uint32_t j = 0; j < i; j++) {
            const struct gw_region *r = &L->mem.regions[j];
            if (r->gpa + (r->size - 1) > top)
                top = r->gpa + (r->size - 1);
        }
        if (top >= UINT64_MAX - size - 64)
            gpa = clamp_gpa(u64(in) >> 8, size);
        else
            gpa = top + 1 + (u8(in) & 0x3f);
    }
    return gpa;
}

/* ---- descriptors ---------------------------------------------------------- */

struct vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static void gen_desc(struct in *in, const struct layout *L, uint32_t tsize, uint8_t *dst)
{
    struct vdesc d;
    uint8_t m = u8(in), m2 = u8(in);
    const struct gw_region *r = &L->mem.regions[u8(in) % L->nreal];
    uint64_t off;

    switch (m & 7) {
    case 0: case 1:                       /* inside a region */
        off = u32(in) % r->size;
        d.addr = r->gpa + off;
        break;
    case 2:                                 /* near a region's end: may cross into the next */
        off = u8(in);
        d.addr = r->gpa + (r->size > off ? r->size - off : 0);
        break;
    case 3:                                 /* just before a region */
        d.addr = r->gpa - 1 - (u8(in) & 15);
        break;
    case 4:                                 /* an indirect table */
        if (L->nind) {
            uint32_t t = u8(in) % L->nind;
            d.addr = L->ind_gpa[t];
            d.len = 16 * L->ind_n[t];
            d.flags = 4 | (m2 & 0x80 ? (m2 & 3) : 0);   /* mostly plain INDIRECT */
            d.next = (uint16_t)(u8(in) % tsize);
            if (m2 & 0x40)
                d.len += (m2 >> 2) & 15;            /* bad length sometimes */
            memcpy(dst, &d, 16);
            return;
        }
        d.addr = r->gpa;
        break;
    case 5:                                 /* region start */
        d.addr = r->gpa;
        break;
    default:                                /* raw */
        d.addr = u64(in);
        break;
    }
    switch ((m >> 3) & 3) {
    case 0:
        d.len = 64 + u8(in);
        break;
    case 1:
        d.len = u16(in) % 2048;
        break;
    case 2: {                               /* to the end of the region, +- a little */
        uint64_t room = r->gpa + r->size - d.addr;
        d.len = (uint32_t)(room + (int8_t)u8(in) % 4);
        break;
    }
    default: {                              /* tiny (header split over descriptors) or raw */
        uint8_t t = u8(in);
        d.len = t & 0x80 ? u32(in) : 1 + (t & 15);
        break;
    }
    }
    if (m >> 7)
        d.flags = u16(in);
    else if (L->dirmode == 1)
        d.flags = m2 & 1;                   /* NEXT, device-readable: a TX chain */
    else if (L->dirmode == 2)
        d.flags = (m2 & 1) | 2;             /* NEXT | WRITE: an RX chain */
    else
        d.flags = m2 & 7;                   /* NEXT | WRITE | INDIRECT */
    d.next = (m >> 5) & 1 ? u16(in) : (uint16_t)(u8(in) % tsize);
    if (((m >> 5) & 3) == 2)
        d.next = (uint16_t)(tsize - 1);
    memcpy(dst, &d, 16);
}

/* Host pointer of a GPA range that is known to lie in one region, or NULL. */
static uint8_t *host_of(const struct layout *L, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < L->nreal; i++) {
        const struct gw_region *r = &L->mem.regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

/* ---- output / input frame buffers with poisoned gaps --------------------- */

struct bufs {
    uint8_t *base;
    size_t len;
    uint64_t offs[MAX_TX_N];
};

static void bufs_make(struct bufs *b, unsigned n, const uint32_t *sizes, int reverse)
{
    size_t total = GUARD;
    for (unsigned i = 0; i < n; i++)
        total += ((sizes[i] + 15) & ~(size_t)15) + GUARD;
    b->len = total;
    b->base = malloc(total);
    ASAN_POISON_MEMORY_REGION(b->base, total);
    size_t at = GUARD;
    for (unsigned k = 0; k < n; k++) {
        unsigned i = reverse ? n - 1 - k : k;
        b->offs[i] = at;
        ASAN_UNPOISON_MEMORY_REGION(b->base + at, sizes[i]);
        at += ((sizes[i] + 15) & ~(size_t)15) + GUARD;
    }
}

static void bufs_free(struct bufs *b)
{
    ASAN_UNPOISON_MEMORY_REGION(b->base, b->len);
    free(b->base);
}


/* ---- an independent model of a TX burst ------------------------------------

   Written from the contract (gw_ring.h, virtio 1.x 2.7) rather than from
   gw_ring.c: it predicts, from guest memory before the call, the return value,
   the error code, every frame's length and bytes, and the drop counters. The
   real call writes guest memory only in the used ring, so the prediction must
   hold whenever nothing the model read lies in the used ring. */

#define MODEL_MAX_READS 4096

struct model {
    const struct layout *L;
    const struct gw_vq *vq;
    /* host ranges read, to see whether the used ring overlapped them */
    uint32_t nreads;
    uint8_t *rd_lo[MODEL_MAX_READS];
    uint64_t rd_len[MODEL_MAX_READS];
    int overflow;
};

static void model_read(struct model *m, uint8_t *p, uint64_t len)
{
    if (m->nreads == MODEL_MAX_READS) {
        m->overflow = 1;
        return;
    }
    m->rd_lo[m->nreads] = p;
    m->rd_len[m->nreads++] = len;
}

/* Reads [gpa, gpa+len) byte by byte through the table; 0 if any byte is outside. */
static int model_gpa_ok(const struct layout *L, uint64_t gpa, uint64_t len)
{
    if (len && gpa + (len - 1) < gpa)
        return 0;
    while (len) {
        uint64_t room = 0;
        int found = 0;
        for (uint32_t i = 0; i < L->nreal && i < GW_MAX_REGIONS; i++) {
            const struct gw_region *r = &L->mem.regions[i];
            if (gpa >= r->gpa && gpa - r->gpa < r->size) {
                room = r->size - (gpa - r->gpa);
                found = 1;
                break;
            }
        }
        if (!found)
            return 0;
        if (room >= len)
            return 1;
        gpa += room;
        len -= room;
    }
    return 1;
}

static void model_copy(struct model *m, uint8_t *dst, uint64_t gpa, uint64_t len)
{
    const struct layout *L = m->L;
    while (len) {
        for (uint32_t i = 0; i < L->nreal && i < GW_MAX_REGIONS; i++) {
            const struct gw_region *r = &L->mem.regions[i];
            if (gpa >= r->gpa && gpa - r->gpa < r->size) {
                uint64_t room = r->size - (gpa - r->gpa), k = room < len ? room : len;
                model_read(m, r->host + (gpa - r->gpa), k);
                if (dst) {
                    memcpy(dst, r->host + (gpa - r->gpa), k);
                    dst += k;
                }
                gpa += k;
                len -= k;
                break;
            }
        }
    }
}

struct tx_expect {
    int ret;
    uint32_t error;
    uint64_t too_big, short_;
    uint32_t lens[MAX_TX_N];
    uint8_t *frames;            /* n * cap bytes */
};

static void model_tx(struct model *m, struct tx_expect *e, uint32_t cap, unsigned n)
{
    const struct gw_vq *vq = m->vq;
    const struct layout *L = m->L;
    uint16_t size = vq->size, last = vq->last_avail, idx;
    memset(e, 0, sizeof *e - sizeof e->frames);

    model_read(m, vq->avail + 2, 2);
    memcpy(&idx, vq->avail + 2, 2);
    uint16_t avail = (uint16_t)(idx - last);
    if (avail > size) {
        e->ret = -1;
        e->error = GW_E_AVAIL_IDX;
        return;
    }
    unsigned got = 0;
    uint32_t walked = 0;
    /* Every chain counts toward n (dropped ones too); a chain starts only if
       a longest one (GW_MAX_CHAIN_READS) still fits the burst's walk budget. */
    for (unsigned taken = 0; taken < avail && taken < n
         && walked + GW_MAX_CHAIN_READS <= GW_BURST_WALK; taken++) {
        uint16_t head;
        uint8_t *hp = vq->avail + 4 + 2 * (size_t)((uint16_t)(last + taken) & (size - 1));
        model_read(m, hp, 2);
        memcpy(&head, hp, 2);
        if (head >= size) {
            e->ret = -1;
            e->error = GW_E_HEAD_IDX;
            return;
        }
        /* walk the chain */
        uint32_t tsize = size, i = head, count = 0, reads = 0;
        int in_ind = 0, more = 1;
        uint64_t ind_gpa = 0, skip = vq->hdr_len, flen = 0;
        uint8_t *out = e->frames + (size_t)got * cap;
        while (more) {
            struct vdesc d;
            if (++count > tsize) {
                e->ret = -1;
                e->error = GW_E_CHAIN_LOOP;
                return;
            }
            if (reads++ >= GW_MAX_CHAIN_READS) {
                e->ret = -1;
                e->error = GW_E_CHAIN_LONG;
                return;
            }
            walked++;
            if (in_ind) {
                model_copy(m, (uint8_t *)&d, ind_gpa + 16ULL * i, 16);
            } else {
                model_read(m, vq->desc + 16 * (size_t)i, 16);
                memcpy(&d, vq->desc + 16 * (size_t)i, 16);
            }
            if (d.flags & 4) {
                if (!vq->indirect || in_ind || (d.flags & 1) || d.len == 0 || d.len % 16 ||
                    d.len / 16 > 1024) {
                    e->ret = -1;
                    e->error = GW_E_INDIRECT;
                    return;
                }
                if (!model_gpa_ok(L, d.addr, d.len)) {
                    e->ret = -1;
                    e->error = GW_E_DESC_ADDR;
                    return;
                }
                in_ind = 1;
                ind_gpa = d.addr;
                tsize = d.len / 16;
                i = 0;
                count = 0;
                continue;
            }
            if (d.flags & 1) {
                if (d.next >= tsize) {
                    e->ret = -1;
                    e->error = GW_E_DESC_IDX;
                    return;
                }
                i = d.next;
            } else {
                more = 0;
            }
            if (!model_gpa_ok(L, d.addr, d.len)) {
                e->ret = -1;
                e->error = GW_E_DESC_ADDR;
                return;
            }
            if (d.flags & 2) {
                e->ret = -1;
                e->error = GW_E_DIRECTION;
                return;
            }
            uint64_t a = d.addr, l = d.len, s = skip < l ? skip : l;
            a += s;
            l -= s;
            skip -= s;
            if (l && flen < cap) {
                uint64_t k = l < cap - flen ? l : cap - flen;
                model_copy(m, out + flen, a, k);
            }
            flen += l;
        }
        if (flen > cap)
            e->too_big++;
        else if (flen == 0)
            e->short_++;
        else
            e->lens[got++] = (uint32_t)flen;
    }
    e->ret = (int)got;
}

/* Did the model read anything in [p, p+len)? */
static int model_touched(const struct model *m, const uint8_t *p, uint64_t len)
{
    if (m->overflow)
        return 1;
    for (uint32_t i = 0; i < m->nreads; i++)
        if (m->rd_lo[i] < p + len && p < m->rd_lo[i] + m->rd_len[i])
            return 1;
    return 0;
}


/* ---- a model of an RX burst, run on a copy of guest memory ----------------

   RX writes into guest buffers that may overlap the rings themselves (a
   hostile guest may do that), so this model works on a private copy of every
   region and performs the same reads and writes in the order the contract
   implies: per frame, chain after chain, descriptor after descriptor, the
   header zeroed, num_buffers filled in when the frame is complete, a used
   entry per chain taken, used->idx published once at the end. Afterwards the
   real memory must equal the copy byte for byte, and the return value, error
   code, ring position and counters must match. */

struct shadow {
    const struct layout *L;
    uint8_t *copy;              /* same offsets as L->arena */
};

static uint8_t *sh_ptr(const struct shadow *S, const uint8_t *real)
{
    return S->copy + (real - S->L->arena);
}

static uint8_t *sh_xlate(const struct shadow *S, uint64_t gpa, uint64_t *room)
{
    const struct layout *L = S->L;
    for (uint32_t i = 0; i < L->nreal && i < GW_MAX_REGIONS; i++) {
        const struct gw_region *r = &L->mem.regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            *room = r->size - (gpa - r->gpa);
            return S->copy + L->host_off[i] + (gpa - r->gpa);
        }
    }
    return NULL;
}

struct rx_expect {
    int ret;
    uint32_t error;
    uint16_t last_avail, used_idx;
    uint64_t packets, bytes, too_big, no_room;
};

/* sh_chain: the frame's allowance of descriptor reads is spent. */
#define MODEL_WALK_OUT 1000

/* Walks one chain on the copy; for each writable descriptor calls put().
   Returns 0, or a GW_E_* code. */
struct rx_frame {
    const uint8_t *data;
    uint64_t hdr, total, pos;
    uint8_t *nb[2];
};

static void sh_put(const struct shadow *S, struct rx_frame *f, uint64_t gpa, uint64_t len,
                   uint64_t *wrote)
{
    uint64_t want = f->total - f->pos < len ? f->total - f->pos : len;
    *wrote += want;
    for (uint64_t k = 0; k < want; k++) {
        uint64_t room;
        uint8_t *h = sh_xlate(S, gpa + k, &room);
        uint64_t at = f->pos + k;
        if (at < f->hdr) {
            *h = 0;
            if (at == 10)
                f->nb[0] = h;
            else if (at == 11)
                f->nb[1] = h;
        } else {
            *h = f->data[at - f->hdr];
        }
    }
    f->pos += want;
}

static uint32_t sh_chain(const struct shadow *S, const struct gw_vq *vq, uint16_t head,
                         struct rx_frame *f, uint64_t *wrote, uint32_t allow, uint32_t *reads)
{
    uint8_t *desc = sh_ptr(S, vq->desc);
    uint32_t tsize = vq->size, i = head, count = 0;
    int in_ind = 0;
    uint64_t ind_gpa = 0;
    *reads = 0;
    for (;;) {
        struct vdesc d;
        if (++count > tsize)
            return GW_E_CHAIN_LOOP;
        /* at most GW_MAX_CHAIN_READS reads per chain (a lie beyond), and
           no more than the frame's allowance (a drop, not a lie) */
        if (*reads >= GW_MAX_CHAIN_READS)
            return GW_E_CHAIN_LONG;
        if (*reads >= allow)
            return MODEL_WALK_OUT;
        ++*reads;
        if (in_ind) {
            for (int b = 0; b < 16; b++) {
                uint64_t room;
                ((uint8_t *)&d)[b] = *sh_xlate(S, ind_gpa + 16ULL * i + b, &room);
            }
        } else {
            memcpy(&d, desc + 16 * (size_t)i, 16);
        }
        if (d.flags & 4) {
            if (!vq->indirect || in_ind || (d.flags & 1) || d.len == 0 || d.len % 16 ||
                d.len / 16 > 1024)
                return GW_E_INDIRECT;
            if (!model_gpa_ok(S->L, d.addr, d.len))
                return GW_E_DESC_ADDR;
            in_ind = 1;
            ind_gpa = d.addr;
            tsize = d.len / 16;
            i = 0;
            count = 0;
            continue;
        }
        int more = d.flags & 1;
        if (more) {
            if (d.next >= tsize)
                return GW_E_DESC_IDX;
            i = d.next;
        }
        if (!model_gpa_ok(S->L, d.addr, d.len))
            return GW_E_DESC_ADDR;
        if (!(d.flags & 2))
            return GW_E_DIRECTION;
        sh_put(S, f, d.addr, d.len, wrote);
        if (!more)
            return 0;
    }
}

static void model_rx(const struct shadow *S, const struct gw_vq *vq, const uint8_t *base,
                     const uint64_t *offs, const uint32_t *lens, unsigned n, struct rx_expect *e)
{
    uint8_t *avail = sh_ptr(S, vq->avail), *usedr = sh_ptr(S, vq->used);
    uint16_t size = vq->size, idx, last = vq->last_avail, used = vq->used_idx;
    memset(e, 0, sizeof *e);
    e->last_avail = vq->last_avail;
    e->used_idx = vq->used_idx;
    memcpy(&idx, avail + 2, 2);
    uint16_t navail = (uint16_t)(idx - last);
    if (navail > size) {
        e->ret = -1;
        e->error = GW_E_AVAIL_IDX;
        return;
    }
    unsigned taken = 0, i;
    uint32_t walked = 0;
    /* the no-room memo, as gw_ring.h describes it: a frame at least as long
       as one dropped for no room, against the same position and avail idx */
    int nr_valid = vq->noroom_valid;
    uint32_t nr_len = vq->noroom_len;
    uint16_t nr_avail = vq->noroom_avail, nr_idx = vq->noroom_idx;
    for (i = 0; i < n; i++) {
        struct rx_frame f = { base + offs[i], vq->hdr_len, (uint64_t)vq->hdr_len + lens[i], 0,
                              { NULL, NULL } };
        uint16_t last0 = last, used0 = used;
        unsigned taken0 = taken, nbufs = 0;
        uint32_t fwalk = 0;
        int fits = 1;
        if (walked + GW_MAX_CHAIN_READS > GW_BURST_WALK)
            goto out;
        if (nr_valid && f.total >= nr_len && last == nr_avail && idx == nr_idx) {
            e->no_room++;
            continue;
        }
        while (f.pos < f.total) {
            if (taken == navail) {
                if ((uint16_t)(last - last0) == size) {
                    fits = 0;           /* the whole ring cannot hold it */
                    break;
                }
                last = last0;
                used = used0;
                taken = taken0;
                goto out;
            }
            uint16_t head;
            memcpy(&head, avail + 4 + 2 * (size_t)(last & (size - 1)), 2);
            if (head >= size) {
                e->ret = -1;
                e->error = GW_E_HEAD_IDX;
                return;
            }
            uint64_t wrote = 0;
            uint32_t reads;
            uint32_t err = sh_chain(S, vq, head, &f, &wrote, GW_MAX_CHAIN_READS - fwalk, &reads);
            fwalk += reads;
            walked += reads;
            if (err == MODEL_WALK_OUT) {
                fits = 0;
                break;
            }
            if (err) {
                e->ret = -1;
                e->error = err;
                return;
            }
            if (!vq->mrg_rxbuf && f.pos < f.total) {
                fits = -1;
                break;
            }
            uint8_t *el = usedr + 4 + 8 * (size_t)(used & (size - 1));
            uint32_t id32 = head, len32 = (uint32_t)wrote;
            memcpy(el, &id32, 4);
            memcpy(el + 4, &len32, 4);
            used++;
            last++;
            taken++;
            nbufs++;
        }
        if (fits < 0) {
            e->too_big++;
            continue;
        }
        if (!fits) {
            /* dropped for no room: its chains stay the guest's */
            last = last0;
            used = used0;
            taken = taken0;
            nr_valid = 1;
            nr_len = (uint32_t)f.total;
            nr_avail = last0;
            nr_idx = idx;
            e->no_room++;
            continue;
        }
        if (f.nb[0])
            *f.nb[0] = (uint8_t)nbufs;
        if (f.nb[1])
            *f.nb[1] = (uint8_t)(nbufs >> 8);
        e->packets++;
        e->bytes += lens[i];
    }
out:
    if (used != vq->used_idx)
        memcpy(usedr + 2, &used, 2);
    e->last_avail = last;
    e->used_idx = used;
    e->ret = (int)i;
}

/* ---- the fuzz target --------------------------------------------------- */

static int callfd = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    callfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return 0;
}

static void snapshot_vq(const struct gw_vq *a, struct gw_vq *b) { memcpy(b, a, sizeof *b); }

/* Everything a call on a broken queue must leave alone. */
static void check_broken_noop(const struct gw_vq *before, const struct gw_vq *after,
                              const uint8_t *arena_copy, const struct layout *L)
{
    CHECK(memcmp(before, after, sizeof *before) == 0);
    for (uint32_t i = 0; i < L->nreal; i++)
        CHECK(memcmp(arena_copy + L->host_off[i], L->mem.regions[i].host,
                     L->mem.regions[i].size) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct in in = { data, size };
    struct layout L;
    struct gw_vq vq;
    memset(&L, 0, sizeof L);
    memset(&vq, 0, sizeof vq);

    /* -- features and ring size -- */
    uint8_t cfg = u8(&in), cfg2 = u8(&in), cfg3 = u8(&in);
    L.dirmode = cfg3 & 3;               /* cfg3 bits 2..5: host misalignment, below */
    vq.mrg_rxbuf = cfg & 1;
    vq.event_idx = (cfg >> 1) & 1;
    vq.indirect = (cfg >> 2) & 1;
    vq.hdr_len = (cfg >> 3) & 1 ? 12 : 10;
    vq.callfd = (cfg >> 4) & 1 ? callfd : -1;
    unsigned lg = cfg2 & 15;
    if (lg > 10 && !(cfg2 & 0x80))
        lg &= 7;                            /* big rings (2k..32k) only now and then */
    uint32_t qsize = 1u << lg;
    vq.size = (uint16_t)qsize;

    /* -- data regions -- */
    uint32_t ndata = 1 + u8(&in) % MAX_DATA_REGIONS;
    uint64_t rsize[GW_MAX_REGIONS];
    for (uint32_t i = 0; i < ndata; i++) {
        uint8_t k = u8(&in);
        uint16_t s = u16(&in);
        switch (k & 3) {
        case 0: rsize[i] = 4096; break;     /* all-zero input: a sane guest */
        case 1: rsize[i] = 1 + s % 64; break;
        case 2: rsize[i] = 1 + s % 4096; break;
        default: rsize[i] = 1 + s % MAX_REGION_SIZE; break;
        }
        L.mem.regions[i].size = rsize[i];
        L.mem.regions[i].gpa = place_gpa(&in, &L, i, rsize[i]);
        L.mem.regions[i].qva = 0x7f0000000000ULL + ((uint64_t)i << 32);
        L.mem.nregions = i + 1;
    }
    L.ndata = ndata;

    /* -- ring parts: inside a data region, or in a region of their own -- */
    uint64_t rlen[3] = { 16ULL * qsize, 6 + 2ULL * qsize, 6 + 8ULL * qsize };
    uint64_t ralign[3] = { 16, 2, 4 };
    int rreg[3];
    uint64_t roff[3];
    uint64_t next_free[MAX_DATA_REGIONS] = { 0 };
    for (int p = 0; p < 3; p++) {
        uint8_t how = u8(&in);
        uint32_t k = u8(&in) % ndata;
        uint64_t o = u32(&in);
        if (!(how & 4)) {                   /* after the ring parts already there */
            o = (next_free[k] + ralign[p] - 1) / ralign[p] * ralign[p];
            if (o > rsize[k] || rsize[k] - o < rlen[p])
                o = 0;
        }
        if (how % 4 != 3 && rsize[k] >= rlen[p]) {
            o = o % (rsize[k] - rlen[p] + 1);
            o -= o % ralign[p];
            rreg[p] = (int)k;
            roff[p] = o;
            next_free[k] = o + rlen[p];
        } else {                            /* own region, exactly the ring part's length */
            uint32_t i = L.mem.nregions;
            rsize[i] = rlen[p];
            L.mem.regions[i].size = rlen[p];
            L.mem.regions[i].gpa = place_gpa(&in, &L, i, rlen[p]);
            L.mem.regions[i].gpa -= L.mem.regions[i].gpa % ralign[p];
            /* Aligning down may move it onto the region below, which
               place_gpa had kept clear of (Python refuses overlaps, and the
               model's RX writes assume none): then up to the next boundary. */
            if (gpa_overlaps(&L, i, L.mem.regions[i].gpa, rlen[p])
                && L.mem.regions[i].gpa < UINT64_MAX - rlen[p] - ralign[p])
                L.mem.regions[i].gpa += ralign[p];
            L.mem.regions[i].qva = 0x7f0000000000ULL + ((uint64_t)i << 32);
            L.mem.nregions = i + 1;
            rreg[p] = (int)i;
            roff[p] = 0;
        }
    }

    /* -- host placement: one arena, regions in rotated order, poisoned gaps -- */
    uint32_t nreg = L.mem.nregions;
    L.nreal = nreg;
    uint32_t rot = u8(&in) % nreg;
    size_t at = GUARD;
    for (uint32_t k = 0; k < nreg; k++) {
        uint32_t i = (k + rot) % nreg;
        L.host_off[i] = at;
        at += ((rsize[i] + 15) & ~(uint64_t)15) + GUARD;
    }
    L.arena_len = at;
    L.arena = malloc(L.arena_len);
    ASAN_POISON_MEMORY_REGION(L.arena, L.arena_len);
    uint64_t seed = u64(&in);
    for (uint32_t i = 0; i < nreg; i++) {
        if (cfg3 & 4)                       /* an odd mmap_offset: unaligned host addresses */
            L.host_off[i] += 1 + ((cfg3 >> 3) & 7);
        L.mem.regions[i].host = L.arena + L.host_off[i];
        ASAN_UNPOISON_MEMORY_REGION(L.mem.regions[i].host, rsize[i]);
        fill(L.mem.regions[i].host, rsize[i], seed + i, (cfg >> 5) & 1);
    }
    /* Now and then, a table whose count says more than the 32 slots. */
    if ((cfg >> 6) & 1 && (cfg2 & 0x70) == 0x70)
        L.mem.nregions = 33 + u8(&in);

    vq.mem = &L.mem;
    vq.desc = L.mem.regions[rreg[0]].host + roff[0];
    vq.avail = L.mem.regions[rreg[1]].host + roff[1];
    vq.used = L.mem.regions[rreg[2]].host + roff[2];

    /* -- indirect tables, placed inside data regions -- */
    uint32_t want_ind = u8(&in) % (MAX_IND_TABLES + 1);
    for (uint32_t t = 0; t < want_ind; t++) {
        uint32_t k = u8(&in) % ndata;
        uint32_t n = 1 + u8(&in) % 16;
        if (rsize[k] < 16ULL * n)
            n = (uint32_t)(rsize[k] / 16);
        if (n == 0)
            continue;
        uint64_t o = u32(&in) % (rsize[k] - 16ULL * n + 1);
        L.ind_gpa[L.nind] = L.mem.regions[k].gpa + o;
        L.ind_n[L.nind] = n;
        L.nind++;
    }

    /* -- descriptor table: the first entries from the input, the rest as filled -- */
    uint32_t ndesc = 1 + u8(&in) % 16;
    if (ndesc > qsize)
        ndesc = qsize;
    for (uint32_t i = 0; i < ndesc; i++)
        gen_desc(&in, &L, qsize, vq.desc + 16 * (size_t)i);
    for (uint32_t t = 0; t < L.nind; t++) {
        uint8_t *h = host_of(&L, L.ind_gpa[t], 16ULL * L.ind_n[t]);
        if (h)
            for (uint32_t j = 0; j < L.ind_n[t]; j++)
                gen_desc(&in, &L, L.ind_n[t], h + 16 * (size_t)j);
    }

    /* -- avail / used rings and the ring position -- */
    vq.last_avail = u16(&in);
    vq.used_idx = u16(&in);
    vq.signalled_used = u16(&in);
    vq.signalled_valid = u8(&in) & 1;
    {
        uint8_t m = u8(&in);
        uint16_t idx = (m & 3) == 3 ? u16(&in) : (uint16_t)(vq.last_avail + qsize - u16(&in) % (qsize + 1));
        uint16_t flags = m & 4 ? 1 : 0;     /* NO_INTERRUPT */
        memcpy(vq.avail, &flags, 2);
        memcpy(vq.avail + 2, &idx, 2);
        /* The first few heads from the input, then 0, 1, 2, ... */
        uint32_t nav = qsize < 64 ? qsize : 64, nin = 1 + u8(&in) % 16;
        for (uint32_t i = 0; i < nav; i++) {
            uint16_t pos = (uint16_t)(vq.last_avail + i) & (qsize - 1);
            uint16_t head = (uint16_t)(i % qsize);
            if (i < nin) {
                uint8_t hm = u8(&in);
                head = hm == 0xff ? u16(&in) : (uint16_t)(hm % qsize);
            }
            memcpy(vq.avail + 4 + 2 * (size_t)pos, &head, 2);
        }
        uint16_t used_event = (m & 8) ? u16(&in) : vq.used_idx;
        memcpy(vq.avail + 4 + 2 * (size_t)qsize, &used_event, 2);
        uint16_t uflags = (m >> 4) & 1, uidx = vq.used_idx;
        memcpy(vq.used, &uflags, 2);
        memcpy(vq.used + 2, &uidx, 2);
    }

    uint8_t *arena_copy = malloc(L.arena_len);
    uint32_t errcode = 0;
    uint64_t errdetail = 0;
    int broken_ops = 0;

    /* -- the calls: from the input, or a default script when it ran out -- */
    static const uint8_t script[] = {
        0, 7, 1,                    /* TX burst of 8, cap 1514 */
        2, 3, 0xff,                 /* RX burst of 4 x 1514 bytes */
        4,                          /* call */
        5, 1,                       /* set_notify(1) */
        6,                          /* pending */
        7, 0, 4,                    /* guest adds 4 more */
        2, 1, 0x00, 60, 0,          /* RX burst of 2 short frames */
        0, 3, 0,                    /* TX burst of 4, cap from the next byte */
        200, 4,
    };
    if (!in.n) {
        in.p = script;
        in.n = sizeof script;
    }
    for (int op = 0; op < MAX_OPS && in.n; op++) {
        struct gw_vq before;
        uint8_t o = u8(&in);
        int was_broken = vq.error != 0;
        if (was_broken) {
            /* Region by region: the gaps between them are poisoned. */
            for (uint32_t i = 0; i < nreg; i++)
                memcpy(arena_copy + L.host_off[i], L.mem.regions[i].host, rsize[i]);
        }
        snapshot_vq(&vq, &before);
        int ret;

        switch (o % 8) {
        case 0: case 1: {                   /* TX burst */
            unsigned n = 1 + u8(&in) % MAX_TX_N;
            uint8_t cm = u8(&in);
            uint32_t cap = (cm & 3) == 0 ? u8(&in) : (cm & 3) == 1 ? 1514 : 1 + u16(&in) % MAX_TX_CAP;
            uint32_t sizes[MAX_TX_N], lens[MAX_TX_N];
            for (unsigned i = 0; i < n; i++)
                sizes[i] = cap;
            struct bufs b;
            bufs_make(&b, n, sizes, cm & 4);
            memset(lens, 0xAB, sizeof lens);
            /* predict first, from the memory as it is now */
            static struct model mdl;
            static struct tx_expect ex;
            int predict = !was_broken;
            if (predict) {
                memset(&mdl, 0, offsetof(struct model, rd_lo));
                mdl.L = &L;
                mdl.vq = &vq;
                ex.frames = malloc((size_t)n * (cap ? cap : 1));
                model_tx(&mdl, &ex, cap, n);
            }
            ret = gw_vq_tx_burst(&vq, b.base, b.offs, cap, lens, n);
            if (predict && !model_touched(&mdl, vq.used, 6 + 8ULL * qsize)) {
                CHECK(ret == ex.ret);
                if (ret < 0) {
                    CHECK(vq.error == ex.error);
                } else {
                    CHECK(vq.drop_too_big - before.drop_too_big == ex.too_big);
                    CHECK(vq.drop_short - before.drop_short == ex.short_);
                    for (int i = 0; i < ret; i++) {
                        CHECK(lens[i] == ex.lens[i]);
                        CHECK(memcmp(b.base + b.offs[i], ex.frames + (size_t)i * cap, lens[i]) == 0);
                    }
                }
            }
            if (predict)
                free(ex.frames);
            if (ret < 0) {
                check_broken_untouched(&vq, &before, ret);
            } else {
                CHECK(!was_broken && vq.error == 0);
                CHECK((unsigned)ret <= n);
                uint16_t took = (uint16_t)(vq.last_avail - before.last_avail);
                CHECK((uint16_t)(vq.used_idx - before.used_idx) == took);
                CHECK(took <= qsize && (unsigned)ret <= took);
                CHECK(vq.packets - before.packets == (uint64_t)ret);
                CHECK((vq.drop_too_big - before.drop_too_big) + (vq.drop_short - before.drop_short)
                      == (uint64_t)(took - ret));
                CHECK(took <= n && vq.walked <= GW_BURST_WALK);     /* every chain counts toward n */
                uint64_t sum = 0;
                for (int i = 0; i < ret; i++) {
                    CHECK(lens[i] >= 1 && lens[i] <= cap);
                    sum += lens[i];
                }
                CHECK(vq.bytes - before.bytes == sum);
                if (took) {
                    uint16_t pub;
                    memcpy(&pub, vq.used + 2, 2);
                    CHECK(pub == vq.used_idx);
                }
            }
            bufs_free(&b);
            break;
        }
        case 2: case 3: {                   /* RX burst */
            unsigned n = 1 + u8(&in) % MAX_RX_N;
            uint32_t lens[MAX_RX_N];
            uint8_t lm = u8(&in);
            for (unsigned i = 0; i < n; i++) {
                switch ((lm >> (2 * (i & 3))) & 3) {
                case 0: lens[i] = u8(&in) % 64; break;
                case 1: lens[i] = 60 + u8(&in); break;
                case 2: lens[i] = u16(&in) % MAX_RX_LEN; break;
                default: lens[i] = 1514; break;
                }
            }
            struct bufs b;
            bufs_make(&b, n, lens, lm & 1);
            for (unsigned i = 0; i < n; i++)
                fill(b.base + b.offs[i], lens[i], seed ^ i, 1);
            struct shadow S = { &L, arena_copy };
            struct rx_expect rx;
            int rx_predict = !was_broken;
            if (rx_predict) {
                for (uint32_t i = 0; i < nreg; i++)
                    memcpy(arena_copy + L.host_off[i], L.mem.regions[i].host, rsize[i]);
                model_rx(&S, &vq, b.base, b.offs, lens, n, &rx);
            }
            ret = gw_vq_rx_burst(&vq, b.base, b.offs, lens, n);
            if (rx_predict) {
                CHECK(ret == rx.ret);
                if (ret < 0) {
                    CHECK(vq.error == rx.error);
                } else {
                    CHECK(vq.last_avail == rx.last_avail && vq.used_idx == rx.used_idx);
                    CHECK(vq.packets - before.packets == rx.packets);
                    CHECK(vq.bytes - before.bytes == rx.bytes);
                    CHECK(vq.drop_too_big - before.drop_too_big == rx.too_big);
                    CHECK(vq.drop_no_room - before.drop_no_room == rx.no_room);
                    CHECK(vq.walked <= GW_BURST_WALK);
                }
                for (uint32_t i = 0; i < nreg; i++)
                    CHECK(memcmp(arena_copy + L.host_off[i], L.mem.regions[i].host, rsize[i]) == 0);
            }
            if (ret < 0) {
                check_broken_untouched(&vq, &before, ret);
            } else {
                CHECK(!was_broken && vq.error == 0);
                CHECK((unsigned)ret <= n);
                uint16_t took = (uint16_t)(vq.last_avail - before.last_avail);
                CHECK((uint16_t)(vq.used_idx - before.used_idx) == took);
                CHECK(took <= qsize);
                uint64_t delivered = vq.packets - before.packets;
                CHECK(delivered + (vq.drop_too_big - before.drop_too_big)
                      + (vq.drop_no_room - before.drop_no_room) == (uint64_t)ret);
                if (vq.mrg_rxbuf)
                    CHECK(took >= delivered);
                else
                    CHECK(took == delivered);
                /* bytes: the delivered frames are a subset of the first ret ones */
                uint64_t all = 0;
                for (int i = 0; i < ret; i++)
                    all += lens[i];
                CHECK(vq.bytes - before.bytes <= all);
                if (vq.drop_too_big == before.drop_too_big && vq.drop_no_room == before.drop_no_room)
                    CHECK(vq.bytes - before.bytes == all);
                if (took) {
                    uint16_t pub;
                    memcpy(&pub, vq.used + 2, 2);
                    CHECK(pub == vq.used_idx);
                }
            }
            bufs_free(&b);
            break;
        }
        case 4: {
            /* the guest's wishes, as the spec words them (virtio 1.x 2.7.7, 2.7.10) */
            uint16_t ue, fl, now = vq.used_idx, old = vq.signalled_used;
            memcpy(&ue, vq.avail + 4 + 2 * (size_t)qsize, 2);
            memcpy(&fl, vq.avail, 2);
            int want;
            if (vq.signalled_valid && now == old)
                want = 0;                   /* nothing new since the last interrupt */
            else if (vq.event_idx)
                want = !vq.signalled_valid || (uint16_t)(now - ue - 1) < (uint16_t)(now - old);
            else
                want = !(fl & 1);           /* VRING_AVAIL_F_NO_INTERRUPT */
            uint64_t cnt;
            if (vq.callfd >= 0 && read(vq.callfd, &cnt, sizeof cnt) < 0) {
                /* EAGAIN: nothing pending */
            }
            ret = gw_vq_call(&vq);
            CHECK(was_broken ? ret == -1 : (ret == 0 || ret == 1));
            if (!was_broken) {
                CHECK(ret == want);
                CHECK(vq.signalled_valid == 1 && vq.signalled_used == vq.used_idx);
                if (vq.callfd >= 0) {
                    ssize_t r = read(vq.callfd, &cnt, sizeof cnt);
                    CHECK(ret ? (r == 8 && cnt == 1) : r < 0);
                }
            }
            break;
        }
        case 5: {
            int en = u8(&in) & 1;
            ret = gw_vq_set_notify(&vq, en);
            if (was_broken || vq.error)
                CHECK(ret == -1 && vq.error);
            else
                CHECK(ret >= 0 && (uint32_t)ret <= qsize);
            if (!was_broken) {
                uint16_t v;
                if (vq.event_idx) {
                    memcpy(&v, vq.used + 4 + 8 * (size_t)qsize, 2);   /* avail_event */
                    if (en)                 /* a stalled RX frame waits for stall_idx */
                        CHECK(v == (vq.stalled ? vq.stall_idx : vq.last_avail));
                } else {
                    memcpy(&v, vq.used, 2);                         /* used->flags */
                    CHECK((v & 1) == !en);                          /* NO_NOTIFY */
                }
            }
            CHECK(vq.last_avail == before.last_avail && vq.used_idx == before.used_idx);
            break;
        }
        case 6:
            ret = gw_vq_pending(&vq);
            if (was_broken || vq.error)
                CHECK(ret == -1 && vq.error);
            else
                CHECK(ret >= 0 && (uint32_t)ret <= qsize);
            CHECK(vq.last_avail == before.last_avail && vq.used_idx == before.used_idx);
            break;
        default: {                          /* the guest writes its rings meanwhile */
            uint8_t w = u8(&in);
            if (was_broken)
                goto guest_wrote;           /* nothing to compare against then */
            switch (w & 3) {
            case 0: {                       /* make more available */
                uint16_t idx;
                memcpy(&idx, vq.avail + 2, 2);
                idx = (uint16_t)(idx + u8(&in) % (qsize + 2));
                memcpy(vq.avail + 2, &idx, 2);
                break;
            }
            case 1: {                       /* an avail ring entry */
                uint16_t pos = u16(&in) & (qsize - 1), head = u8(&in) == 0xff ? u16(&in) : u16(&in) % qsize;
                memcpy(vq.avail + 4 + 2 * (size_t)pos, &head, 2);
                break;
            }
            case 2:                         /* a descriptor */
                gen_desc(&in, &L, qsize, vq.desc + 16 * (size_t)(u16(&in) & (qsize - 1)));
                break;
            default: {                      /* flags / used_event */
                uint16_t v = u16(&in);
                if (w & 4)
                    memcpy(vq.avail, &v, 2);
                else
                    memcpy(vq.avail + 4 + 2 * (size_t)qsize, &v, 2);
                break;
            }
            }
            continue;
        }
        }

        if (was_broken) {
            check_broken_noop(&before, &vq, arena_copy, &L);
            CHECK(vq.error == errcode && vq.err_detail == errdetail);
            if (++broken_ops > 6)
                break;
        } else if (vq.error) {
            CHECK((vq.error >= GW_E_AVAIL_IDX && vq.error <= GW_E_DIRECTION)
                  || vq.error == GW_E_CHAIN_LONG);
            errcode = vq.error;
            errdetail = vq.err_detail;
        }
        continue;
    guest_wrote:
        if (++broken_ops > 6)
            break;
    }

    free(arena_copy);
    ASAN_UNPOISON_MEMORY_REGION(L.arena, L.arena_len);
    free(L.arena);
    return 0;
}
