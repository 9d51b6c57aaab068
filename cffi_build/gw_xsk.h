/*
 * AF_XDP bindings of gateway._native: the part of libxdp 1.3.1's <xdp/xsk.h>
 * we use, plus the few helpers in gw_xsk.c.
 *
 * Everything above GW_XSK_C_PART is read ONLY by cffi's cdef (build_native.py):
 * the C side gets those declarations from <xdp/xsk.h> and <linux/if_xdp.h>.
 * The part below it (gw_xsk.c's prototypes) is also pasted into the C preamble. Keep it in the
 * subset cdef understands: `...;` marks structs whose layout the compiler
 * fills in (struct xsk_socket_config has an anonymous union), `#define X ...`
 * takes the value from the headers.
 *
 * The xsk_ring_* / xsk_prod_nb_free functions are inline in xsk.h: cffi wraps
 * them for Python (slow paths and tests); C code should call them directly.
 */

typedef unsigned long long __u64;
typedef unsigned int __u32;
typedef unsigned short __u16;

#define XDP_SHARED_UMEM ...
#define XDP_COPY ...
#define XDP_ZEROCOPY ...
#define XDP_USE_NEED_WAKEUP ...
#define XDP_RING_NEED_WAKEUP ...
#define XDP_OPTIONS_ZEROCOPY ...
#define XDP_PACKET_HEADROOM ...
#define XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD ...

/* Ring handles: libxdp fills them in; cached_* are this process's copies. */
struct xsk_ring_prod {
    __u32 cached_prod;
    __u32 cached_cons;
    __u32 mask;
    __u32 size;
    __u32 *producer;
    __u32 *consumer;
    void *ring;
    __u32 *flags;
};

struct xsk_ring_cons {
    __u32 cached_prod;
    __u32 cached_cons;
    __u32 mask;
    __u32 size;
    __u32 *producer;
    __u32 *consumer;
    void *ring;
    __u32 *flags;
};

struct xdp_desc {
    __u64 addr;     /* offset of the frame data in the UMEM area */
    __u32 len;
    __u32 options;
};

struct xdp_statistics {
    __u64 rx_dropped;
    __u64 rx_invalid_descs;
    __u64 tx_invalid_descs;
    __u64 rx_ring_full;
    __u64 rx_fill_ring_empty_descs;
    __u64 tx_ring_empty_descs;
};

struct xsk_umem;
struct xsk_socket;

struct xsk_umem_config {
    __u32 fill_size;
    __u32 comp_size;
    __u32 frame_size;
    __u32 frame_headroom;
    __u32 flags;
};

struct xsk_socket_config {
    __u32 rx_size;
    __u32 tx_size;
    __u32 libxdp_flags;     /* in an anonymous union with libbpf_flags */
    __u32 xdp_flags;
    __u16 bind_flags;
    ...;
};

/* libxdp: 0 or -errno. */
int xsk_umem__create(struct xsk_umem **umem, void *umem_area, __u64 size,
                     struct xsk_ring_prod *fill, struct xsk_ring_cons *comp,
                     const struct xsk_umem_config *config);
int xsk_umem__delete(struct xsk_umem *umem);
int xsk_socket__create(struct xsk_socket **xsk, const char *ifname, __u32 queue_id,
                       struct xsk_umem *umem, struct xsk_ring_cons *rx,
                       struct xsk_ring_prod *tx, const struct xsk_socket_config *config);
int xsk_socket__create_shared(struct xsk_socket **xsk_ptr, const char *ifname,
                              __u32 queue_id, struct xsk_umem *umem,
                              struct xsk_ring_cons *rx, struct xsk_ring_prod *tx,
                              struct xsk_ring_prod *fill, struct xsk_ring_cons *comp,
                              const struct xsk_socket_config *config);
void xsk_socket__delete(struct xsk_socket *xsk);
int xsk_umem__fd(const struct xsk_umem *umem);
int xsk_socket__fd(const struct xsk_socket *xsk);

/* libxdp inline ring helpers. */
__u64 *xsk_ring_prod__fill_addr(struct xsk_ring_prod *fill, __u32 idx);
const __u64 *xsk_ring_cons__comp_addr(const struct xsk_ring_cons *comp, __u32 idx);
struct xdp_desc *xsk_ring_prod__tx_desc(struct xsk_ring_prod *tx, __u32 idx);
const struct xdp_desc *xsk_ring_cons__rx_desc(const struct xsk_ring_cons *rx, __u32 idx);
int xsk_ring_prod__needs_wakeup(const struct xsk_ring_prod *r);
__u32 xsk_prod_nb_free(struct xsk_ring_prod *r, __u32 nb);
__u32 xsk_ring_prod__reserve(struct xsk_ring_prod *prod, __u32 nb, __u32 *idx);
void xsk_ring_prod__submit(struct xsk_ring_prod *prod, __u32 nb);
__u32 xsk_ring_cons__peek(struct xsk_ring_cons *cons, __u32 nb, __u32 *idx);
void xsk_ring_cons__release(struct xsk_ring_cons *cons, __u32 nb);

/* GW_XSK_C_PART: gw_xsk.c */

/* getsockopt(SOL_XDP, XDP_STATISTICS) into *out (zeroed first: older kernels
   return fewer fields). 0 or -errno. */
int gw_xsk_stats(int fd, struct xdp_statistics *out);

/* getsockopt(SOL_XDP, XDP_OPTIONS): XDP_OPTIONS_* flags (what the kernel
   actually bound: zero-copy or not), or -errno. */
int gw_xsk_options(int fd);

/* TX kick: sendto(fd, NULL, 0, MSG_DONTWAIT). EAGAIN, EBUSY and ENOBUFS
   mean "kernel busy, try again later" and return 0; other errors -errno.
   In copy mode one kick transmits at most 32 descriptors (the kernel's TX
   budget); kick again while the TX ring is not empty. */
int gw_xsk_kick(int fd);

/* Frame pool = pool[0..npool): free frame addresses, a stack.
   gw_xsk_fill pushes min(n, npool, room in fq) addresses taken from the top
   of the pool into the fill ring and returns how many (the caller lowers
   npool by that). gw_xsk_reap moves up to cap-npool completed addresses from
   cq onto the top of the pool, each ANDed with mask (~(frame_size-1) turns a
   data address back into its frame), and returns how many. */
unsigned gw_xsk_fill(struct xsk_ring_prod *fq, const __u64 *pool, unsigned npool, unsigned n);
unsigned gw_xsk_reap(struct xsk_ring_cons *cq, __u64 *pool, unsigned npool, unsigned cap,
                     __u64 mask);
