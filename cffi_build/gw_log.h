/*
 * Dirty-page logging for live migration, included by gw_ring.c only.
 *
 * While QEMU migrates a guest it copies guest memory in passes and re-copies
 * every page marked dirty since the last pass. Pages we write (RX frames,
 * used ring) are invisible to QEMU's own tracking, so we mark them in the
 * shared bitmap the front-end gave with SET_LOG_BASE: bit (gpa / 4096), LSB
 * first in each byte (vhost-user.rst, "Migration"). A page we fail to mark
 * arrives stale on the destination: silent corruption inside the guest.
 *
 * As DPDK does, a burst collects the bytes it dirtied in vq->log_off/bits
 * (a burst writes few distinct pages) and ORs them into the shared log once,
 * before the used index is published. QEMU clears bits concurrently, so
 * every store into the log is an atomic OR; byte-sized, so the log needs no
 * alignment and we never touch a byte past log_size.
 *
 * Order matters: a page is logged only after it was written. QEMU clears a
 * bit, then copies the page; a bit we set before our write could be cleared
 * and the page copied before the write lands, and nothing would send it
 * again. A full cache is flushed mid-burst, so callers add a range only once
 * its bytes are in guest memory.
 */
#ifndef GW_LOG_H
#define GW_LOG_H

#include <stdint.h>

/* struct gw_vq: gw_ring.h, included before this (it has no include guard) */

#define GW_LOG_PAGE_SHIFT 12

static void log_flush(struct gw_vq *vq)
{
    /* Release: the bytes we wrote into guest memory must be visible before
       any dirty bit QEMU can see; QEMU reads the log with an atomic exchange
       and then copies the page. Without the fence the compiler (or a weaker
       CPU than x86) may move the OR ahead of the data stores, and QEMU could
       send the old page and clear the bit for good. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint32_t i = 0; i < vq->log_n; i++)
        __atomic_fetch_or(vq->log + vq->log_off[i], vq->log_bits[i], __ATOMIC_RELAXED);
    vq->log_n = 0;
}

static void log_page(struct gw_vq *vq, uint64_t page)
{
    uint64_t off = page >> 3;
    uint8_t bit = (uint8_t)(1u << (page & 7));

    if (off >= vq->log_size) {
        vq->log_miss++;
        return;
    }
    /* Bursts write mostly to the same few pages: look back a little. */
    for (uint32_t i = vq->log_n; i-- > 0 && i + 4 >= vq->log_n;) {
        if (vq->log_off[i] == off) {
            vq->log_bits[i] |= bit;
            return;
        }
    }
    if (vq->log_n == GW_LOG_CACHE)
        log_flush(vq);
    vq->log_off[vq->log_n] = off;
    vq->log_bits[vq->log_n] = bit;
    vq->log_n++;
}

/* Every page of [gpa, gpa+len). len > 0 and gpa+len-1 must not wrap: callers
   pass ranges range_ok() accepted, or used-ring ranges checked in Python. */
static void log_range(struct gw_vq *vq, uint64_t gpa, uint64_t len)
{
    uint64_t first = gpa >> GW_LOG_PAGE_SHIFT, last = (gpa + len - 1) >> GW_LOG_PAGE_SHIFT;
    for (uint64_t p = first; p <= last; p++)
        log_page(vq, p);
}

/* A write at byte off of the used ring, logged at log_guest_addr + off. */
static inline void log_used(struct gw_vq *vq, uint64_t off, uint64_t len)
{
    if (vq->log && vq->log_used)
        log_range(vq, vq->log_used_gpa + off, len);
}

static inline void log_guest(struct gw_vq *vq, uint64_t gpa, uint64_t len)
{
    if (vq->log && len)
        log_range(vq, gpa, len);
}

static inline void log_sync(struct gw_vq *vq)
{
    if (vq->log_n)
        log_flush(vq);
}

#endif
