/* The paced guest's TX loop: the driver side of one split ring, in C because
 * Python cannot post ~1 Mpps. Every descriptor i permanently describes slot i
 * (virtio-net header + a pre-built frame), so posting a frame is one avail
 * entry. Everything the device writes back is checked before it is trusted. */

#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1

struct pacer {
    uint8_t *mem;        /* guest memory, GPA 0 */
    uint64_t avail_gpa, used_gpa;
    uint32_t size;       /* ring size, a power of two */
    int kick_fd;
    int event_idx;
    uint16_t avail_idx;  /* what we published */
    uint16_t last_used;  /* next used entry to reap */
    uint16_t kicked;     /* avail_idx at the last kick decision */
    uint32_t nfree;
    uint16_t *free_ids;  /* stack of descriptors not in flight, size entries */
    uint8_t *inflight;   /* inflight[id]: posted and not yet returned */
    uint64_t kicks;
};

static inline uint16_t *avail_flags(struct pacer *p) { return (uint16_t *)(p->mem + p->avail_gpa); }
static inline uint16_t *avail_idx(struct pacer *p) { return (uint16_t *)(p->mem + p->avail_gpa + 2); }
static inline uint16_t *avail_ring(struct pacer *p) { return (uint16_t *)(p->mem + p->avail_gpa + 4); }
static inline uint16_t *used_event(struct pacer *p) { return avail_ring(p) + p->size; }
static inline uint16_t *used_flags(struct pacer *p) { return (uint16_t *)(p->mem + p->used_gpa); }
static inline uint16_t *used_idx(struct pacer *p) { return (uint16_t *)(p->mem + p->used_gpa + 2); }
static inline uint32_t *used_elem(struct pacer *p, uint32_t i) {
    return (uint32_t *)(p->mem + p->used_gpa + 4 + 8 * i);
}
static inline uint16_t *avail_event(struct pacer *p) {
    return (uint16_t *)(p->mem + p->used_gpa + 4 + 8 * p->size);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* A polling guest, like DPDK's virtio PMD: no used-ring interrupts wanted.
 * With EVENT_IDX the device ignores the flag and reads used_event instead, so
 * that is kept half the index space ahead, where used->idx cannot reach
 * before the next reap moves it again. */
static void suppress_interrupts(struct pacer *p) {
    if (p->event_idx)
        __atomic_store_n(used_event(p), (uint16_t)(p->last_used + 0x8000), __ATOMIC_RELAXED);
    else
        __atomic_store_n(avail_flags(p), AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
}

/* Returns 0, or a negative code when the device lied (see pacer_error). */
static int reap(struct pacer *p) {
    uint16_t end = __atomic_load_n(used_idx(p), __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(end - p->last_used);
    if (n == 0)
        return 0;
    if (n > p->size - p->nfree)
        return -1;
    for (; p->last_used != end; p->last_used++) {
        uint32_t id = used_elem(p, p->last_used & (p->size - 1))[0];
        if (id >= p->size)
            return -2;
        if (!p->inflight[id])
            return -3;
        p->inflight[id] = 0;
        p->free_ids[p->nfree++] = (uint16_t)id;
    }
    suppress_interrupts(p);
    return 0;
}

/* virtio 2.7.10: did the index move past event on its way old -> new? */
static inline int need_event(uint16_t event, uint16_t new, uint16_t old) {
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

static int publish(struct pacer *p) {
    __atomic_store_n(avail_idx(p), p->avail_idx, __ATOMIC_RELEASE);
    /* Our avail store before the device's notification state load: without
     * this full fence a device going to sleep could miss both. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t old = p->kicked, new = p->avail_idx;
    p->kicked = new;
    if (old == new)
        return 0;
    int kick = p->event_idx
        ? need_event(__atomic_load_n(avail_event(p), __ATOMIC_RELAXED), new, old)
        : !(__atomic_load_n(used_flags(p), __ATOMIC_RELAXED) & USED_F_NO_NOTIFY);
    if (!kick)
        return 0;
    uint64_t one = 1;
    p->kicks++;
    if (write(p->kick_fd, &one, sizeof one) != sizeof one && errno != EAGAIN)
        return -4;  /* EAGAIN: the counter is full, the device is already woken */
    return 0;
}

void pacer_init(struct pacer *p) {
    for (uint32_t i = 0; i < p->size; i++) {
        p->free_ids[i] = (uint16_t)(p->size - 1 - i);
        p->inflight[i] = 0;
    }
    p->nfree = p->size;
    suppress_interrupts(p);
}

/* Offer `count` frames at `rate` per second in bursts of `burst`, then wait up
 * to drain_ns for the device to return what is in flight. A frame due while
 * all descriptors are in flight is dropped and counted: the device did not
 * keep up. Frame k is due at k / rate; a burst that could only leave more
 * than max_late_ns after its time (this thread was not running) is skipped,
 * not offered, so the pacer's own stalls never count as the device's drops.
 * doze: wait for a burst's time in clock_nanosleep rather than polling the
 * clock, for a background load that must leave its CPU to others (a timer
 * wake-up runs late by up to ~150 us on the test VM: fine when max_late is a
 * millisecond, not for a search of the highest rate).
 * out: [sent, dropped, skipped, max lag behind schedule in ns]. */
int pacer_run(struct pacer *p, double rate, uint64_t count, uint32_t burst, uint64_t max_late_ns,
              uint64_t drain_ns, int doze, uint64_t *out) {
    uint64_t k = 0, sent = 0, dropped = 0, skipped = 0, max_lag = 0;
    uint64_t t0 = now_ns();
    int rc = 0;
    while (rc == 0 && k < count) {
        uint64_t n = count - k < burst ? count - k : burst;
        uint64_t due = t0 + (uint64_t)((double)(k + n) * 1e9 / rate);
        uint64_t t;
        /* Only the clock between bursts: polling used->idx here would bounce
         * its cache line with the device's CPU for nothing. */
        if (doze && (t = now_ns()) < due) {
            struct timespec ts = {.tv_sec = (time_t)(due / 1000000000u),
                                  .tv_nsec = (long)(due % 1000000000u)};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                ;
        }
        while ((t = now_ns()) < due)
            cpu_relax();
        if ((rc = reap(p)) != 0)
            break;
        k += n;
        if (t - due > max_lag)
            max_lag = t - due;
        if (t - due > max_late_ns) {
            skipped += n;
            continue;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (p->nfree == 0 && (rc = reap(p)) != 0)
                break;
            if (p->nfree == 0) {
                dropped++;
                continue;
            }
            uint16_t id = p->free_ids[--p->nfree];
            p->inflight[id] = 1;
            avail_ring(p)[p->avail_idx & (p->size - 1)] = id;
            p->avail_idx++;
            sent++;
        }
        if (rc == 0)
            rc = publish(p);
    }
    uint64_t deadline = now_ns() + drain_ns;
    while (rc == 0 && p->nfree < p->size && now_ns() < deadline)
        if ((rc = reap(p)) == 0)
            cpu_relax();
    out[0] = sent;
    out[1] = dropped;
    out[2] = skipped;
    out[3] = max_lag;
    return rc;
}
