/* AF_XDP helpers of gateway._native; contract and docs in gw_xsk.h. */

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <xdp/xsk.h>

#ifndef SOL_XDP
#define SOL_XDP 283
#endif

int gw_xsk_stats(int fd, struct xdp_statistics *out)
{
    socklen_t len = sizeof(*out);

    memset(out, 0, sizeof(*out));
    if (getsockopt(fd, SOL_XDP, XDP_STATISTICS, out, &len) < 0)
        return -errno;
    return 0;
}

int gw_xsk_options(int fd)
{
    struct xdp_options opts = {0};
    socklen_t len = sizeof(opts);

    if (getsockopt(fd, SOL_XDP, XDP_OPTIONS, &opts, &len) < 0)
        return -errno;
    return (int)opts.flags;
}

int gw_xsk_kick(int fd)
{
    if (sendto(fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0)
        return 0;
    if (errno == EAGAIN || errno == EBUSY || errno == ENOBUFS)
        return 0;
    return -errno;
}

unsigned gw_xsk_fill(struct xsk_ring_prod *fq, const __u64 *pool, unsigned npool, unsigned n)
{
    __u32 idx = 0, room;
    unsigned i;

    if (n > npool)
        n = npool;
    room = xsk_prod_nb_free(fq, n);
    if (n > room)
        n = room;
    if (n == 0 || xsk_ring_prod__reserve(fq, n, &idx) != n)
        return 0;
    for (i = 0; i < n; i++)
        *xsk_ring_prod__fill_addr(fq, idx + i) = pool[npool - 1 - i];
    xsk_ring_prod__submit(fq, n);
    return n;
}

unsigned gw_xsk_reap(struct xsk_ring_cons *cq, __u64 *pool, unsigned npool, unsigned cap,
                     __u64 mask)
{
    __u32 idx = 0, n, i;

    if (npool >= cap)
        return 0;
    n = xsk_ring_cons__peek(cq, cap - npool, &idx);
    for (i = 0; i < n; i++)
        pool[npool + i] = *xsk_ring_cons__comp_addr(cq, idx + i) & mask;
    if (n)
        xsk_ring_cons__release(cq, n);
    return n;
}
