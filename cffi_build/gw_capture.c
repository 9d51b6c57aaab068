/* Capture rings (contract in gw_capture.h). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <sys/uio.h>
#include <linux/if_xdp.h>
#include <xdp/xsk.h>

#include "gw_ring.h"
#include "gw_capture.h"
#include "gw_xskq.h"
#include "gw_capture_hook.h"

static uint64_t realtime_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_REALTIME, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint64_t rec_bytes(uint32_t caplen)
{
    return GW_CAP_REC_HDR + (((uint64_t)caplen + GW_CAP_REC_HDR - 1) & ~(uint64_t)(GW_CAP_REC_HDR - 1));
}

/* 1 if `need` more bytes fit between the head and the reader's tail. The
   tail is trusted only inside [head - size, head]: anything else (a reader
   writing nonsense) reads as a full ring, so nothing is written over data the
   reader may still be reading, nor outside it. The unsigned difference covers
   a tail "ahead" of head as well. */
static int fits(const struct gw_cap *c, uint64_t need)
{
    return c->head - c->tail <= c->size && c->head + need - c->tail <= c->size;
}

uint64_t gw_cap_now(void)
{
    return realtime_ns();
}

int gw_cap_add(struct gw_cap *c, uint32_t dir, const uint8_t *f, uint32_t len, uint64_t ts_ns)
{
    uint32_t caplen = len < c->snaplen ? len : c->snaplen;
    uint64_t need = rec_bytes(caplen), off = c->head & (c->size - 1), to_end = c->size - off;
    uint64_t pad = need > to_end ? to_end : 0;
    struct gw_cap_rec *r;

    if (!(c->dirs & dir))
        return 0;
    /* The tail last read is read again only when it leaves no room: one
       shared cache line touched per ring's worth of records, not per frame. */
    if (!fits(c, pad + need)) {
        c->tail = __atomic_load_n(&c->sh->tail, __ATOMIC_ACQUIRE);
        if (!fits(c, pad + need)) {
            c->dropped++;
            return 0;
        }
    }
    if (pad) {   /* the record would cross the end: fill it, start over at 0 */
        r = (struct gw_cap_rec *)(c->data + off);
        memset(r, 0, sizeof(*r));
        r->reclen = (uint32_t)pad;
        r->flags = GW_CAP_PAD;
        off = 0;
    }
    r = (struct gw_cap_rec *)(c->data + off);
    r->reclen = (uint32_t)need;
    r->flags = dir;
    r->ts_ns = ts_ns ? ts_ns : realtime_ns();
    r->ts_sec = (uint32_t)(r->ts_ns / 1000000000u);
    r->ts_nsec = (uint32_t)(r->ts_ns % 1000000000u);
    r->caplen = caplen;
    r->origlen = len;
    memcpy(r + 1, f, caplen);
    c->head += pad + need;
    c->frames++;
    return 1;
}

void gw_cap_publish(struct gw_cap *c)
{
    __atomic_store_n(&c->sh->frames, c->frames, __ATOMIC_RELAXED);
    __atomic_store_n(&c->sh->dropped, c->dropped, __ATOMIC_RELAXED);
    /* The records' bytes before the head that says they are there. */
    __atomic_store_n(&c->sh->head, c->head, __ATOMIC_RELEASE);
}

void gw_cap_put(struct gw_cap *c, uint32_t dir, const uint8_t *f, uint32_t len, uint64_t ts_ns)
{
    gw_cap_add(c, dir, f, len, ts_ns);
    gw_cap_publish(c);
}

void gw_cap_hook(struct gw_local *local, struct gw_cap *cap)
{
    __atomic_store_n(&local->capture, cap, __ATOMIC_SEQ_CST);
}

unsigned gw_cap_busy(struct gw_local *local)
{
    return __atomic_load_n(&local->capture_busy, __ATOMIC_SEQ_CST);
}

void gw_cap_frames(struct gw_local *local, uint32_t dir, const uint8_t *base,
                   const uint64_t *offs, const uint32_t *lens, unsigned n)
{
    struct gw_cap *c = gw_cap_enter(local);
    uint64_t now;

    if (!c)
        return;
    now = realtime_ns();
    for (unsigned i = 0; i < n; i++)
        gw_cap_add(c, dir, base + offs[i], lens[i], now);
    gw_cap_leave(local, c);
}

/* A pcapng EPB's bytes for caplen bytes of frame (put_record). */
static uint32_t epb_bytes(uint32_t caplen)
{
    return 28 + ((caplen + 3) & ~3u) + 16;
}

/* 1 if ring v's next record at `pos` is one a producer writes. */
static int rec_ok(const struct gw_cap_view *v, uint64_t pos, uint64_t head,
                  const struct gw_cap_rec *r)
{
    uint64_t off = pos & (v->size - 1);

    if (r->reclen < GW_CAP_REC_HDR || r->reclen % GW_CAP_REC_HDR
        || r->reclen > v->size - off || r->reclen > head - pos)
        return 0;
    if (r->flags == GW_CAP_PAD)
        return 1;
    return (r->flags == GW_CAP_RX || r->flags == GW_CAP_TX)
           && r->caplen <= r->origlen && rec_bytes(r->caplen) == r->reclen;
}

/* gw_cap_write hands the ring to writev as pcap records: the header's last
   16 bytes must be the pcap record header, the frame right after them. */
_Static_assert(offsetof(struct gw_cap_rec, ts_sec) + 16 == sizeof(struct gw_cap_rec)
               && offsetof(struct gw_cap_rec, origlen) == offsetof(struct gw_cap_rec, ts_sec) + 12,
               "struct gw_cap_rec must end with the pcap record header");

/* A record's pcap record (its header's last 16 bytes and the frame). */
static const uint8_t *pcap_rec(const struct gw_cap_rec *r)
{
    return (const uint8_t *)&r->ts_sec;
}

/* One frame as a pcap record or a pcapng EPB at out; returns its bytes. */
static uint64_t put_record(uint8_t *out, const struct gw_cap_rec *r, int pcapng)
{
    if (!pcapng) {
        memcpy(out, pcap_rec(r), 16 + (size_t)r->caplen);
        return 16 + (uint64_t)r->caplen;
    }
    {
        /* EPB: type 6, length, interface 0, timestamp (ns, as the IDB's
           if_tsresol says) high and low, lengths, the data padded to 4, then
           epb_flags (code 2: direction in bits 0-1, 1 inbound, 2 outbound),
           opt_endofopt, and the length again. */
        uint32_t pad = (4 - r->caplen % 4) % 4, len = epb_bytes(r->caplen);
        uint32_t h[7] = { 6, len, 0, (uint32_t)(r->ts_ns >> 32), (uint32_t)r->ts_ns,
                          r->caplen, r->origlen };
        uint16_t opt[2] = { 2, 4 };     /* host order, as the section header's magic says */
        uint32_t t[3] = { r->flags == GW_CAP_RX ? 1u : 2u, 0, len };

        memcpy(out, h, sizeof(h));
        memcpy(out + 28, r + 1, r->caplen);
        memset(out + 28 + r->caplen, 0, pad);
        memcpy(out + 28 + r->caplen + pad, opt, 4);
        memcpy(out + 32 + r->caplen + pad, t, 12);
        return len;
    }
}

/* The rings' heads, checked; 0, or -1 with *bad set. */
static int load_heads(struct gw_cap_view *v, unsigned n, uint64_t *heads, unsigned *bad)
{
    for (unsigned i = 0; i < n; i++) {
        heads[i] = __atomic_load_n(&v[i].sh->head, __ATOMIC_ACQUIRE);
        if (heads[i] - v[i].tail > v[i].size) {
            *bad = i;
            return -1;
        }
    }
    return 0;
}

/* The next frame over the rings by timestamp, pads skipped (each ring's
   private tail moves past them): NULL if none, *bi its ring; *err -1 with
   *bad set for a record no producer writes. */
static const struct gw_cap_rec *next_rec(struct gw_cap_view *v, unsigned n, const uint64_t *heads,
                                         unsigned *bi, unsigned *bad, int *err)
{
    const struct gw_cap_rec *best = NULL;

    *err = 0;
    for (unsigned i = 0; i < n; i++) {
        const struct gw_cap_rec *r;

        /* pads first, so each ring shows its next frame */
        while (v[i].tail != heads[i]) {
            r = (const struct gw_cap_rec *)(v[i].data + (v[i].tail & (v[i].size - 1)));
            if (!rec_ok(&v[i], v[i].tail, heads[i], r)) {
                *bad = i;
                *err = -1;
                return NULL;
            }
            if (r->flags != GW_CAP_PAD)
                break;
            v[i].tail += r->reclen;
        }
        if (v[i].tail == heads[i])
            continue;
        r = (const struct gw_cap_rec *)(v[i].data + (v[i].tail & (v[i].size - 1)));
        if (!best || r->ts_ns < best->ts_ns) {
            best = r;
            *bi = i;
        }
    }
    return best;
}

static void release_tails(struct gw_cap_view *v, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        __atomic_store_n(&v[i].sh->tail, v[i].tail, __ATOMIC_RELEASE);
}

long gw_cap_to_pcap(struct gw_cap_view *v, unsigned n, uint8_t *out, uint64_t outcap,
                    uint64_t max_frames, uint64_t *frames, unsigned *bad, int pcapng)
{
    uint64_t heads[GW_PUMP_MAX_RX], used = 0, got = 0;
    int err;

    *frames = 0;
    if (n > GW_PUMP_MAX_RX)
        n = GW_PUMP_MAX_RX;
    if (load_heads(v, n, heads, bad) < 0)
        return -1;
    while (got < max_frames) {
        unsigned bi = 0;
        const struct gw_cap_rec *best = next_rec(v, n, heads, &bi, bad, &err);

        if (err)
            return -1;
        if (!best || used + (pcapng ? epb_bytes(best->caplen) : 16 + best->caplen) > outcap)
            break;
        used += put_record(out + used, best, pcapng);
        v[bi].tail += best->reclen;
        got++;
    }
    release_tails(v, n);
    *frames = got;
    return (long)used;
}

/* All of iov[0..cnt) to fd; 0 or -errno. */
static int write_all(int fd, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        ssize_t w = writev(fd, iov, cnt);

        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

long gw_cap_write(struct gw_cap_view *v, unsigned n, int fd, uint64_t max_frames,
                  uint64_t *frames, unsigned *bad)
{
    uint64_t heads[GW_PUMP_MAX_RX], used = 0, got = 0;
    struct iovec iov[GW_CAP_IOV];
    int err;

    *frames = 0;
    *bad = ~0u;
    if (n > GW_PUMP_MAX_RX)
        n = GW_PUMP_MAX_RX;
    if (load_heads(v, n, heads, bad) < 0)
        return -1;
    for (;;) {
        int cnt = 0, r;

        while (cnt < GW_CAP_IOV && got < max_frames) {
            unsigned bi = 0;
            const struct gw_cap_rec *best = next_rec(v, n, heads, &bi, bad, &err);

            if (err)
                return -1;
            if (!best)
                break;
            iov[cnt].iov_base = (void *)pcap_rec(best);
            iov[cnt].iov_len = 16 + (size_t)best->caplen;
            used += iov[cnt].iov_len;
            cnt++;
            v[bi].tail += best->reclen;
            got++;
        }
        if (!cnt) {
            release_tails(v, n);    /* pads skipped at the end */
            break;
        }
        r = write_all(fd, iov, cnt);
        if (r < 0)
            return r;
        release_tails(v, n);    /* written: the producer may have that room back */
        *frames = got;
    }
    *frames = got;
    return (long)used;
}
