/*
 * Packed virtqueue (virtio 1.2, 2.8), device side; included by gw_ring.c only,
 * after struct chain, struct cursor and the checked-copy helpers.
 *
 * The burst loops in gw_ring.c call the same five primitives for both
 * layouts (cursor_begin, cursor_chain, chain_next, cursor_take,
 * cursor_commit); this file holds the packed halves:
 *   - a chain starts at the descriptor at last_avail when its flags say
 *     "available in our wrap" (AVAIL bit == wrap, USED bit != wrap), read
 *     with acquire; the chain's further descriptors must say so too, or the
 *     guest lied (GW_E_WRAP), and its last one carries the buffer id (< size,
 *     GW_E_BUF_ID). An indirect descriptor stands alone (2.8.21: never in a
 *     NEXT list); its table holds plain descriptors used in order, NEXT
 *     ignored there and INDIRECT refused as nesting (only WRITE is valid).
 *   - until the burst publishes, every descriptor it took is still ours:
 *     a burst takes at most size of them (more is GW_E_CHAIN_LOOP), and its
 *     used elements wait in vq->shadow. Publishing writes them over the ring
 *     in order, the first element's flags last with release, so the driver
 *     sees the burst at once, and an RX frame rolled back (cursor restored)
 *     never overwrote a descriptor it will read again.
 *   - used descriptors are written INTO the descriptor ring, so dirty logging
 *     marks them by their guest-physical address (desc_gpa, from the memory
 *     table): the vhost-user log_guest_addr is where QEMU put the device
 *     event area (its "used" address), not the descriptor ring.
 */
#ifndef GW_PACKED_H
#define GW_PACKED_H

#define PK_F_AVAIL (1u << 7)
#define PK_F_USED (1u << 15)
#define PK_EVENT_ENABLE 0
#define PK_EVENT_DISABLE 1
#define PK_EVENT_DESC 2

/* The packed descriptor as the guest lays it out. */
struct pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

static inline int pk_avail(uint16_t flags, uint8_t wrap)
{
    return !!(flags & PK_F_AVAIL) == wrap && !!(flags & PK_F_USED) != wrap;
}

static inline uint16_t pk_flags_acquire(const struct gw_vq *vq, uint16_t pos)
{
    return __atomic_load_n((const uint16_t *)(vq->desc + 16 * (size_t)pos + 14), __ATOMIC_ACQUIRE);
}

/* Positions come from SET_VRING_BASE via Python, which checks them; this
   keeps a slip there from becoming an access past the ring. */
static int pk_pos_ok(struct gw_vq *vq)
{
    if (vq->last_avail >= vq->size || vq->used_idx >= vq->size || !vq->shadow)
        return fail(vq, GW_E_AVAIL_IDX, vq->last_avail);
    return 0;
}

static int packed_chain_start(struct chain *c, struct gw_vq *vq, const struct cursor *cur)
{
    if (cur->ndesc >= vq->size)
        return 0;               /* the whole ring is ours until we publish */
    if (!pk_avail(pk_flags_acquire(vq, cur->avail), cur->avail_wrap))
        return 0;
    c->vq = vq;
    c->ind_gpa = 0;
    c->tsize = 0;
    c->idx = 0;
    c->count = 0;
    c->more = 1;
    c->in_indirect = 0;
    c->head = 0;
    c->pos = cur->avail;
    c->wrap = cur->avail_wrap;
    c->first = 1;
    c->ndesc = 0;
    c->limit = vq->size - cur->ndesc;
    c->walked = 0;
    c->allow = GW_MAX_CHAIN_READS;
    return 1;
}

static int packed_chain_next(struct chain *c, struct desc *d)
{
    struct gw_vq *vq = c->vq;
    struct pdesc p;

    for (;;) {
        if (c->in_indirect) {
            if (c->idx >= c->tsize)
                return 0;
            int w = walk_one(c);
            if (w < 0)
                return w;
            copy_from_guest(vq->mem, &p, c->ind_gpa + 16 * (uint64_t)c->idx++, 16);
            compiler_barrier();
            if (p.flags & DESC_F_INDIRECT)
                return fail(vq, GW_E_INDIRECT, (uint64_t)IND_NESTED << 32 | p.len);
        } else {
            if (!c->more)
                return 0;
            if (++c->ndesc > c->limit)
                return fail(vq, GW_E_CHAIN_LOOP, c->ndesc);
            int w = walk_one(c);
            if (w < 0)
                return w;
            memcpy(&p, vq->desc + 16 * (size_t)c->pos, 16);
            compiler_barrier();
            /* The head's flags were checked with acquire; the rest of the
               chain must be available in the same sense (2.8.6), else the
               driver has not finished writing it or lies about it. */
            if (!c->first && !pk_avail(p.flags, c->wrap))
                return fail(vq, GW_E_WRAP, p.flags);
            c->first = 0;
            if (++c->pos == vq->size) {
                c->pos = 0;
                c->wrap ^= 1;
            }
            c->more = !!(p.flags & DESC_F_NEXT);
            if (!c->more) {
                if (p.id >= vq->size)
                    return fail(vq, GW_E_BUF_ID, p.id);
                c->head = p.id;
            }
            if (p.flags & DESC_F_INDIRECT) {
                uint64_t why = 0;
                if (!vq->indirect)
                    why = IND_NOT_NEGOTIATED;
                else if (p.flags & DESC_F_NEXT)
                    why = IND_WITH_NEXT;
                else if (c->ndesc > 1)
                    why = IND_IN_CHAIN;     /* the spec forbids it in a NEXT list */
                else if (p.len == 0 || p.len % 16 || p.len / 16 > MAX_INDIRECT)
                    why = IND_BAD_LEN;
                if (why)
                    return fail(vq, GW_E_INDIRECT, why << 32 | p.len);
                if (!range_ok(vq->mem, p.addr, p.len))
                    return fail(vq, GW_E_DESC_ADDR, p.addr);
                c->ind_gpa = p.addr;
                c->tsize = p.len / 16;
                c->idx = 0;
                c->in_indirect = 1;
                continue;
            }
        }
        d->addr = p.addr;
        d->len = p.len;
        d->flags = p.flags & (DESC_F_WRITE | DESC_F_NEXT);
        d->next = 0;
        if (!range_ok(vq->mem, d->addr, d->len))
            return fail(vq, GW_E_DESC_ADDR, d->addr);
        return 1;
    }
}

static void packed_take(struct gw_vq *vq, struct cursor *cur, const struct chain *c, uint32_t len)
{
    struct gw_used_elem *e = &vq->shadow[cur->nshadow++];   /* nshadow <= ndesc <= size */
    uint32_t u = (uint32_t)cur->used + c->ndesc;

    e->id = c->head;
    e->ndesc = (uint16_t)c->ndesc;
    e->len = len;
    cur->avail = c->pos;
    cur->avail_wrap = c->wrap;
    cur->ndesc += c->ndesc;
    if (u >= vq->size) {
        u -= vq->size;
        cur->used_wrap ^= 1;
    }
    cur->used = (uint16_t)u;
}

static inline void log_desc(struct gw_vq *vq, uint32_t pos)
{
    if (vq->log && vq->log_used)
        log_range(vq, vq->desc_gpa + 16 * (uint64_t)pos, 16);
}

static void packed_publish(struct gw_vq *vq, const struct cursor *cur)
{
    uint32_t pos = vq->used_idx;
    uint8_t wrap = vq->used_wrap;
    uint8_t *first = NULL;
    uint16_t first_flags = 0;
    uint32_t first_pos = pos;

    for (uint32_t i = 0; i < cur->nshadow; i++) {
        const struct gw_used_elem *e = &vq->shadow[i];
        uint8_t *d = vq->desc + 16 * (size_t)pos;
        /* Used: AVAIL and USED both equal to the used wrap counter; WRITE
           says len counts bytes we wrote (2.8.10). */
        uint16_t flags = (wrap ? PK_F_AVAIL | PK_F_USED : 0) | (e->len ? DESC_F_WRITE : 0);

        st32(d + 8, e->len);
        st16(d + 12, e->id);
        if (i == 0) {
            first = d;
            first_flags = flags;
        } else {
            __atomic_store_n((uint16_t *)(d + 14), flags, __ATOMIC_RELEASE);
        }
        log_desc(vq, pos);  /* after the writes: see gw_log.h */
        pos += e->ndesc;
        if (pos >= vq->size) {
            pos -= vq->size;
            wrap ^= 1;
        }
    }
    log_sync(vq);           /* the log is complete before the guest sees the burst */
    if (first) {
        __atomic_store_n((uint16_t *)(first + 14), first_flags, __ATOMIC_RELEASE);
        /* Again, now that its flags are written: QEMU may have cleared the bit
           and sent the page in between (as used_publish logs used->idx). */
        log_desc(vq, first_pos);
        log_sync(vq);
    }
    vq->used_idx = (uint16_t)pos;
    vq->used_wrap = wrap;
    vq->last_avail = cur->avail;
    vq->avail_wrap = cur->avail_wrap;
}

static int packed_pending(struct gw_vq *vq)
{
    if (pk_pos_ok(vq) < 0)
        return -1;
    return pk_avail(pk_flags_acquire(vq, vq->last_avail), vq->avail_wrap);
}

/* Driver event area (vq->avail): off_wrap, then flags. */
static int packed_call(struct gw_vq *vq)
{
    uint16_t now = vq->used_idx, old = vq->signalled_used;
    uint8_t wrap = vq->used_wrap;
    int valid = vq->signalled_valid, need;

    if (valid && now == old && wrap == vq->signalled_wrap)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = ld16(vq->avail + 2);
    if (flags == PK_EVENT_DESC && vq->event_idx) {
        if (!valid) {
            need = 1;
        } else {
            /* As ring positions with the wrap folded in (DPDK's form):
               did the used position pass off on its way old -> now? */
            uint16_t off_wrap = ld16(vq->avail);
            uint16_t off = off_wrap & 0x7fff;
            if (now <= old)
                old -= vq->size;
            if ((off_wrap >> 15) != wrap)
                off -= vq->size;
            need = need_event(off, now, old);
        }
    } else {
        /* DESC without EVENT_IDX, or a reserved value: interrupt. */
        need = flags != PK_EVENT_DISABLE;
    }
    vq->signalled_used = now;
    vq->signalled_wrap = wrap;
    vq->signalled_valid = 1;
    if (need && vq->callfd >= 0) {
        uint64_t one = 1;
        if (write(vq->callfd, &one, sizeof one) < 0) {
            /* EAGAIN: counter saturated, the guest is signalled anyway. */
        }
    }
    return need;
}

/* Device event area (vq->used): off_wrap names the next descriptor we will
   read, so with EVENT_IDX the guest kicks exactly when it makes that one
   available. Logged like the split ring's used ring: at log_guest_addr,
   which QEMU sets to this area's GPA. */
static int packed_set_notify(struct gw_vq *vq, int enable)
{
    uint16_t flags = PK_EVENT_DISABLE;

    if (pk_pos_ok(vq) < 0)
        return -1;
    if (enable && vq->event_idx) {
        /* Stalled RX: the chains before the stall point were tried already. */
        uint16_t pos = vq->stalled ? vq->stall_idx : vq->last_avail;
        uint8_t wrap = vq->stalled ? vq->stall_wrap : vq->avail_wrap;
        st16(vq->used, (uint16_t)(pos | (uint16_t)wrap << 15));
        flags = PK_EVENT_DESC;
    } else if (enable) {
        flags = PK_EVENT_ENABLE;
    }
    __atomic_store_n((uint16_t *)(vq->used + 2), flags, __ATOMIC_RELEASE);
    log_used(vq, 0, 4);
    log_sync(vq);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return gw_vq_pending(vq);
}

#endif
