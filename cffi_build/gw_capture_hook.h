/*
 * The capture hook as the bursts use it (C only, not for cdef): a burst calls
 * gw_cap_enter() once, copies frames with gw_cap_add() while it holds a ring,
 * then gw_cap_leave() publishes them. Needs gw_capture.h and gw_xskq.h first.
 */
#ifndef GW_CAPTURE_HOOK_H
#define GW_CAPTURE_HOOK_H

/* The ring to copy this burst's frames into, or NULL. Nobody capturing costs
   the one relaxed load. Otherwise the burst counts itself busy before it
   looks again (both sequentially consistent, against gw_cap_hook's store and
   the unhooker's reads of capture_busy): an unhooker that saw capture_busy == 0 after
   clearing cap knows no burst still holds the old ring. */
static inline struct gw_cap *gw_cap_enter(struct gw_local *l)
{
    struct gw_cap *c;

    if (!l || !__atomic_load_n(&l->capture, __ATOMIC_RELAXED))
        return NULL;
    __atomic_add_fetch(&l->capture_busy, 1, __ATOMIC_SEQ_CST);
    c = __atomic_load_n(&l->capture, __ATOMIC_SEQ_CST);
    if (!c)
        __atomic_sub_fetch(&l->capture_busy, 1, __ATOMIC_RELEASE);
    return c;
}

/* After the last gw_cap_add of a burst that got ring c from gw_cap_enter:
   the burst's records are published, then the ring is let go. */
static inline void gw_cap_leave(struct gw_local *l, struct gw_cap *c)
{
    gw_cap_publish(c);
    __atomic_sub_fetch(&l->capture_busy, 1, __ATOMIC_RELEASE);
}

#endif
