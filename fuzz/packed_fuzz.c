/*
 * libFuzzer harness for the packed virtqueue (cffi_build/gw_packed.h through
 * gw_ring.c's burst calls).
 *
 * Each input is one hostile guest: 1..3 memory regions (adjacent or with a
 * gap in guest-physical space, each with poisoned bytes around it in host
 * memory), a packed ring of 1..256 descriptors in region 0 (descriptor ring,
 * driver and device event areas), up to 2 indirect tables, descriptors that
 * are mostly well-formed chains (available in the right wrap, ids < size,
 * NEXT, WRITE biased to TX or RX) and sometimes anything, a start position
 * and wrap counter, features (MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, header
 * 10/12, dirty log), then up to 48 calls (TX and RX bursts, call,
 * set_notify, pending) with guest rewrites of descriptors and event areas
 * in between.
 *
 * After every call (abort() = a crash for libFuzzer):
 *   - bursts return 0..n, or -1 exactly when the queue is broken; the error
 *     code never changes once set; pending returns -1, 0 or 1;
 *   - a call that breaks the queue (or finds it broken) moves no position,
 *     counts nothing and leaves the descriptor ring and event areas as they
 *     were: used descriptors are written only when a burst publishes;
 *   - positions stay < size, and after a burst the used position and wrap
 *     equal the avail ones (every chain taken is published);
 *   - a burst advances by at most size descriptors; if it advanced, the
 *     descriptor at the old position now reads as used in the old wrap;
 *   - TX lengths are 1..cap; packets (+ too-big and no-room drops on RX) =
 *     return value; no burst reads more than GW_BURST_WALK descriptors.
 * ASan catches any access outside the regions, the frame buffers or the log.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sanitizer/asan_interface.h>

#include "gw_ring.h"
#include "fuzz_input.h"

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "packed_fuzz: invariant failed at %s:%d: %s\n",      \
                    __FILE__, __LINE__, #cond);                                  \
            abort();                                                             \
        }                                                                        \
    } while (0)

#define GUARD 64
#define MAX_SIZE 256
#define RING_AREA (16 * MAX_SIZE + 64)
/* The two indirect tables follow the ring (2048 bytes apart); buffers start
   after them, so no RX write can rewrite a table and, through it, point a
   later entry at the ring. */
#define BUF_AREA (RING_AREA + 4096)
#define R0_SIZE (RING_AREA + 32768)             /* ring, tables, then data */
#define MAX_OPS 48
#define MAX_N 32
#define LOG_BYTES 8                             /* 64 pages: less than the GPA space used */

struct world {
    struct gw_mem mem;
    uint32_t nreg;
    uint8_t *arena;
    size_t arena_len;
    uint16_t size;
    uint8_t *ring;                  /* host address of the descriptor ring */
    uint64_t ind_gpa[2];
    uint32_t ind_n[2];
    uint8_t dirmode;                /* 0 raw, 1 TX chains, 2 RX chains */
};

/* A descriptor: usually a buffer inside some region, in the given wrap. */
static void gen_desc(struct in *in, const struct world *W, uint8_t *dst, int wrap, int in_table)
{
    uint8_t m = u8(in), m2 = u8(in);
    uint32_t ri = u8(in) % W->nreg;
    const struct gw_region *r = &W->mem.regions[ri];
    /* Buffers stay out of the ring and the indirect tables (a guest may put
       them there, but then RX data would land in them and "a failed burst
       leaves the ring as it was" could not be checked). */
    uint64_t lo = ri == 0 ? BUF_AREA : 0;
    uint64_t addr;
    uint32_t len;
    uint16_t id, flags;

    switch (m & 7) {
    case 0: case 1: case 2:
        addr = r->gpa + lo + u32(in) % (r->size - lo);
        break;
    case 3:                                 /* near the end: may cross into the next */
        addr = r->gpa + r->size - (u8(in) % 64 + 1);
        break;
    case 4:                                 /* an indirect table */
        if (!in_table) {
            int t = m2 & 1;
            addr = W->ind_gpa[t];
            len = 16 * W->ind_n[t] + (m2 & 0x40 ? (m2 >> 2) & 15 : 0);
            flags = 4 | (m2 & 0x80 ? 1 : 0);
            id = (uint16_t)(u8(in) % W->size);
            flags |= wrap ? 1u << 7 : 1u << 15;
            memcpy(dst, &addr, 8);
            memcpy(dst + 8, &len, 4);
            memcpy(dst + 12, &id, 2);
            memcpy(dst + 14, &flags, 2);
            return;
        }
        addr = r->gpa + lo;
        break;
    case 5:
        addr = ri == 0 ? r->gpa + lo : r->gpa - 1 - (u8(in) & 15);  /* before a region */
        break;
    default:
        addr = u64(in);
        if (addr - W->mem.regions[0].gpa < BUF_AREA)
            addr += BUF_AREA;
        break;
    }
    len = m & 0x40 ? u32(in) : 1 + u16(in) % 1600;
    id = m & 0x80 ? u16(in) : (uint16_t)(u8(in) % W->size);
    if (m2 & 0x80)
        flags = u16(in);                    /* anything */
    else if (W->dirmode == 1)
        flags = m2 & 1;
    else if (W->dirmode == 2)
        flags = (m2 & 1) | 2;
    else
        flags = m2 & 7;
    if (!(m2 & 0x80) && !in_table) {        /* available in this wrap, mostly */
        flags &= 7;
        flags |= (m2 & 0x70) == 0x70 ? (wrap ? 1u << 15 : 1u << 7)
                                     : (wrap ? 1u << 7 : 1u << 15);
    }
    memcpy(dst, &addr, 8);
    memcpy(dst + 8, &len, 4);
    memcpy(dst + 12, &id, 2);
    memcpy(dst + 14, &flags, 2);
}

static uint8_t *host_of(const struct world *W, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < W->nreg; i++) {
        const struct gw_region *r = &W->mem.regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

struct snap {
    uint16_t last_avail, used_idx;
    uint8_t avail_wrap, used_wrap;
    uint32_t error;
    uint64_t packets, bytes, too_big, no_room;
};

static void take(struct snap *s, const struct gw_vq *vq)
{
    s->last_avail = vq->last_avail;
    s->used_idx = vq->used_idx;
    s->avail_wrap = vq->avail_wrap;
    s->used_wrap = vq->used_wrap;
    s->error = vq->error;
    s->packets = vq->packets;
    s->bytes = vq->bytes;
    s->too_big = vq->drop_too_big;
    s->no_room = vq->drop_no_room;
}

static void check_after(const struct gw_vq *vq, const struct snap *b, int ret,
                        const uint8_t *ring_before, const uint8_t *ring, size_t ring_len,
                        int burst)
{
    CHECK(b->error == 0 || vq->error == b->error);
    CHECK((ret == -1) == (vq->error != 0));
    if (ret == -1) {
        CHECK(vq->error != 0);
        CHECK(vq->last_avail == b->last_avail && vq->used_idx == b->used_idx);
        CHECK(vq->avail_wrap == b->avail_wrap && vq->used_wrap == b->used_wrap);
        CHECK(vq->packets == b->packets && vq->bytes == b->bytes);
        if (burst)
            CHECK(memcmp(ring_before, ring, ring_len) == 0);
        return;
    }
    CHECK(vq->last_avail < vq->size && vq->used_idx < vq->size);
    if (!burst)
        return;
    CHECK(vq->used_idx == vq->last_avail && vq->used_wrap == vq->avail_wrap);
    uint32_t adv = vq->avail_wrap == b->avail_wrap
                       ? (uint32_t)(vq->last_avail - b->last_avail)
                       : (uint32_t)(vq->size - b->last_avail + vq->last_avail);
    CHECK(adv <= vq->size);
    if (adv || vq->avail_wrap != b->avail_wrap) {
        uint16_t f;
        memcpy(&f, ring + 16 * (size_t)b->used_idx + 14, 2);
        CHECK(!!(f & (1u << 7)) == b->used_wrap && !!(f & (1u << 15)) == b->used_wrap);
    }
}

static int one_input(struct in *in)
{
    struct world W;
    memset(&W, 0, sizeof W);
    uint8_t feat = u8(in);
    W.size = (uint16_t)(1 + u8(in) % MAX_SIZE);
    W.dirmode = u8(in) % 3;
    W.nreg = 1 + u8(in) % 3;

    uint64_t sizes[3] = { R0_SIZE, 1 + u16(in) % 16384, 1 + u16(in) % 4096 };
    W.arena_len = GUARD;
    for (uint32_t i = 0; i < W.nreg; i++)
        W.arena_len += ((sizes[i] + 63) & ~(uint64_t)63) + GUARD;
    W.arena = aligned_alloc(64, (W.arena_len + 63) & ~(size_t)63);
    if (!W.arena)
        return 0;
    ASAN_POISON_MEMORY_REGION(W.arena, W.arena_len);
    size_t at = GUARD;
    /* low GPAs so the 64-page log covers some pages and misses others */
    uint64_t gpa = 0x1000 * (1 + (uint64_t)(u8(in) % 72));
    for (uint32_t i = 0; i < W.nreg; i++) {
        struct gw_region *r = &W.mem.regions[i];
        r->gpa = gpa;
        r->size = sizes[i];
        r->qva = gpa;
        r->host = W.arena + at;
        ASAN_UNPOISON_MEMORY_REGION(r->host, sizes[i]);
        memset(r->host, 0, sizes[i]);
        at += ((sizes[i] + 63) & ~(uint64_t)63) + GUARD;
        gpa += sizes[i] + (u8(in) & 1 ? 0 : 16 + u8(in));   /* adjacent or a gap */
    }
    W.mem.nregions = W.nreg;
    W.ring = W.mem.regions[0].host;
    size_t ring_len = 16 * (size_t)W.size + 8;

    /* indirect tables in region 0's data part */
    for (int t = 0; t < 2; t++) {
        uint64_t off = 16 * MAX_SIZE + 64 + 2048 * (uint64_t)t;
        W.ind_gpa[t] = W.mem.regions[0].gpa + off;
        W.ind_n[t] = 1 + u8(in) % 8;
        for (uint32_t k = 0; k < W.ind_n[t]; k++)
            gen_desc(in, &W, W.mem.regions[0].host + off + 16 * k, 0, 1);
    }

    struct gw_vq *vq = calloc(1, sizeof *vq);
    struct gw_used_elem *shadow = calloc(W.size, sizeof *shadow);
    uint8_t *log = malloc(LOG_BYTES);
    memset(log, 0, LOG_BYTES);
    vq->mem = &W.mem;
    vq->desc = W.ring;
    vq->avail = W.ring + 16 * (size_t)W.size;         /* driver event area */
    vq->used = vq->avail + 4;                         /* device event area */
    vq->size = W.size;
    vq->mrg_rxbuf = !!(feat & 2);
    vq->hdr_len = feat & 1 && !vq->mrg_rxbuf ? 10 : 12;   /* as Python: MRG_RXBUF means 12 */
    vq->event_idx = !!(feat & 4);
    vq->indirect = !!(feat & 8);
    vq->callfd = -1;
    vq->packed = 1;
    vq->shadow = shadow;
    vq->desc_gpa = W.mem.regions[0].gpa;
    if (feat & 16) {
        vq->log = log;
        vq->log_size = LOG_BYTES;
        vq->log_used = 1;
        vq->log_used_gpa = vq->desc_gpa + 16 * (uint64_t)W.size;
    }
    uint16_t start = u16(in);
    vq->last_avail = vq->used_idx = (uint16_t)(start % W.size);
    vq->avail_wrap = vq->used_wrap = (uint8_t)(start >> 15);

    /* descriptors from the start position on, in its wrap, then the rest
       (before the start) in the other wrap's sense: already used or stale */
    for (uint32_t k = 0; k < W.size; k++) {
        uint32_t pos = (vq->last_avail + k) % W.size;
        int wrap = vq->avail_wrap ^ (vq->last_avail + k >= W.size);
        gen_desc(in, &W, W.ring + 16 * (size_t)pos, wrap, 0);
    }
    uint16_t ev[2] = { u16(in), (uint16_t)(u8(in) % 4) };
    memcpy(vq->avail, ev, 4);

    uint8_t *ring_before = malloc(ring_len);
    uint32_t ops = 1 + u8(in) % MAX_OPS;
    for (uint32_t o = 0; o < ops; o++) {
        struct snap b;
        uint8_t op = u8(in);
        int ret;

        take(&b, vq);
        memcpy(ring_before, W.ring, ring_len);
        switch (op % 7) {
        case 0: case 1: {                             /* TX burst */
            unsigned n = 1 + u8(in) % MAX_N;
            uint32_t cap = u16(in) % 4096;
            size_t stride = ((size_t)cap + 15 + 32) & ~(size_t)15, len = (size_t)n * stride;
            uint8_t *out = malloc(len);
            uint64_t offs[MAX_N];
            uint32_t lens[MAX_N];
            ASAN_POISON_MEMORY_REGION(out, len);        /* 32+ poisoned bytes after each slot */
            for (unsigned i = 0; i < n; i++) {
                offs[i] = (uint64_t)i * stride;
                ASAN_UNPOISON_MEMORY_REGION(out + offs[i], cap);
            }
            ret = gw_vq_tx_burst(vq, out, offs, cap, lens, n);
            CHECK(ret >= -1 && ret <= (int)n);
            for (int i = 0; i < ret; i++)
                CHECK(lens[i] >= 1 && lens[i] <= cap);
            if (ret >= 0) {
                CHECK(vq->packets - b.packets == (uint64_t)ret);
                CHECK(vq->walked <= GW_BURST_WALK);
            }
            check_after(vq, &b, ret, ring_before, W.ring, ring_len, 1);
            ASAN_UNPOISON_MEMORY_REGION(out, len);
            free(out);
            break;
        }
        case 2: case 3: {                             /* RX burst */
            unsigned n = 1 + u8(in) % MAX_N;
            uint8_t *frames = malloc((size_t)n * 2048);
            uint64_t offs[MAX_N];
            uint32_t lens[MAX_N];
            for (unsigned i = 0; i < n; i++) {
                offs[i] = (uint64_t)i * 2048;
                lens[i] = u16(in) % 2048;
                memset(frames + offs[i], (int)i, 2048);
            }
            ret = gw_vq_rx_burst(vq, frames, offs, lens, n);
            CHECK(ret >= -1 && ret <= (int)n);
            if (ret >= 0) {
                CHECK(vq->packets - b.packets + vq->drop_too_big - b.too_big
                      + vq->drop_no_room - b.no_room == (uint64_t)ret);
                CHECK(vq->walked <= GW_BURST_WALK);
            }
            check_after(vq, &b, ret, ring_before, W.ring, ring_len, 1);
            free(frames);
            break;
        }
        case 4:
            ret = gw_vq_call(vq);
            CHECK(ret >= -1 && ret <= 1);
            check_after(vq, &b, ret, ring_before, W.ring, ring_len, 0);
            break;
        case 5:
            ret = gw_vq_set_notify(vq, op & 8 ? 1 : 0);
            CHECK(ret >= -1 && ret <= 1);
            check_after(vq, &b, ret, ring_before, W.ring, ring_len, 0);
            break;
        default: {                                    /* the guest writes */
            ret = gw_vq_pending(vq);
            CHECK(ret >= -1 && ret <= 1);
            CHECK((ret == -1) == (vq->error != 0));
            uint8_t w = u8(in);
            if (w & 1) {
                uint32_t pos = u8(in) % W.size;
                gen_desc(in, &W, W.ring + 16 * (size_t)pos, u8(in) & 1, 0);
            }
            if (w & 2) {
                uint16_t e[2] = { u16(in), (uint16_t)(u8(in) % 4) };
                memcpy(vq->avail, e, 4);
            }
            if (w & 4) {                              /* an indirect table entry */
                int t = u8(in) & 1;
                uint8_t *h = host_of(&W, W.ind_gpa[t], 16 * (uint64_t)W.ind_n[t]);
                if (h)
                    gen_desc(in, &W, h + 16 * (u8(in) % W.ind_n[t]), 0, 1);
            }
            break;
        }
        }
    }

    free(ring_before);
    free(log);
    free(shadow);
    free(vq);
    ASAN_UNPOISON_MEMORY_REGION(W.arena, W.arena_len);
    free(W.arena);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct in in = { data, size };
    return one_input(&in);
}
