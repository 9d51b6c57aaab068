/*
 * Device side of a virtio split ring: the per-packet work of the gateway.
 *
 * Python validates the ring geometry once (SET_VRING_ADDR/NUM) and fills a
 * struct gw_vq; these calls then move whole bursts with the GIL released.
 * Every index, address and length read from guest memory is checked here:
 * the guest writes that memory concurrently and may lie. On the first lie
 * the queue is marked broken (vq->error != 0) and every later call returns -1.
 *
 * This text is read by cffi's cdef too, so it holds only declarations that
 * cdef understands (no macros with expressions, no inline functions).
 */

#define GW_MAX_REGIONS 32

/* Error codes left in gw_vq.error; gw_vq.err_detail holds the bad value. */
#define GW_E_OK 0
#define GW_E_AVAIL_IDX 1     /* avail->idx ran more than size ahead */
#define GW_E_HEAD_IDX 2      /* head index from the avail ring >= size */
#define GW_E_DESC_IDX 3      /* desc.next >= table size */
#define GW_E_CHAIN_LOOP 4    /* chain longer than the table: a loop */
#define GW_E_DESC_ADDR 5     /* addr/len not inside guest memory */
#define GW_E_INDIRECT 6      /* bad indirect table: nested, NEXT with INDIRECT, len not n*16, too long, not negotiated */
#define GW_E_DIRECTION 7     /* device-writable desc on a TX queue, or read-only on RX */
#define GW_E_BUF_ID 8        /* packed: buffer id of a chain's last descriptor >= size */
#define GW_E_WRAP 9          /* packed: a later descriptor of a chain not available in this wrap */
#define GW_E_CHAIN_LONG 10   /* a chain of more than GW_MAX_CHAIN_READS descriptor reads (ring + indirect) */

/* Work bounds (issue 12), as vhost-net's UIO_MAXIOV and its per-pass weight:
   a chain may hold at most GW_MAX_CHAIN descriptors, ring and indirect
   entries together (GW_MAX_CHAIN_READS reads counting the descriptor that
   points at an indirect table, so a full 1024-entry table stays legal); a burst reads at most GW_BURST_WALK descriptors across
   its chains. A chain that could overrun the budget is left for the next
   burst; since GW_MAX_CHAIN < GW_BURST_WALK every burst takes at least one. */
#define GW_MAX_CHAIN 1024
#define GW_MAX_CHAIN_READS 1025   /* GW_MAX_CHAIN plus the indirect descriptor naming a table */
#define GW_BURST_WALK 4096

/* Dirty-log bytes a burst collects before it ORs them into the log (gw_log.h). */
#define GW_LOG_CACHE 32

struct gw_region {
    uint64_t gpa;       /* guest-physical start */
    uint64_t size;      /* bytes */
    uint64_t qva;       /* frontend-virtual start */
    uint8_t *host;      /* where it is mapped here (mmap base + mmap_offset) */
};

/* Packed ring: a used element waiting in gw_vq.shadow until the burst publishes. */
struct gw_used_elem {
    uint16_t id;
    uint16_t ndesc;             /* ring descriptors the chain took */
    uint32_t len;
};

struct gw_mem {
    uint32_t nregions;
    struct gw_region regions[GW_MAX_REGIONS];
};

struct gw_vq {
    /* Set by Python before the first burst; not changed by C. */
    struct gw_mem *mem;
    uint8_t *desc;              /* host pointers, checked to lie in a region */
    uint8_t *avail;
    uint8_t *used;
    uint16_t size;              /* power of two, 1..32768 */
    uint8_t hdr_len;            /* virtio-net header: 12 with VERSION_1 or MRG_RXBUF, else 10 */
    uint8_t mrg_rxbuf;          /* RX frames may span several avail chains (num_buffers) */
    uint8_t event_idx;          /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint8_t indirect;           /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    int callfd;                 /* eventfd to interrupt the guest, -1 if none */

    /* Ring position: Python sets it at ring start (SET_VRING_BASE, used->idx)
       and reads last_avail back for GET_VRING_BASE. */
    uint16_t last_avail;
    uint16_t used_idx;          /* our copy of used->idx */
    uint16_t signalled_used;    /* used_idx when we last interrupted the guest */
    uint8_t signalled_valid;

    /* Out. */
    uint32_t error;             /* GW_E_*, sticky */
    uint64_t err_detail;
    uint64_t packets;           /* frames moved */
    uint64_t bytes;             /* frame bytes moved, virtio-net header excluded */
    uint64_t drop_too_big;      /* TX: frame > cap; RX: frame > guest buffers */
    uint64_t drop_short;        /* TX: chain holds no more than the header */

    /* Offloads (gw_offload.h, used by gw_xskq.c). offload is set by Python
       when the guest negotiated CSUM or HOST_TSO*, guest_csum with GUEST_CSUM,
       big/big_cap to a buffer of the worker's; the rest is per burst. */
    uint8_t offload;
    uint8_t guest_csum;
    uint8_t *big;               /* TX: one GSO frame over cap per burst may land here */
    uint32_t big_cap;
    int32_t big_slot;           /* out: the frame of the last TX burst in big, -1 none */
    uint8_t *hdrs;              /* TX: frame i's virtio-net header -> hdrs + 12 * i, or NULL */
    const uint8_t *rx_flags;    /* RX: frame i's header flags byte, or NULL (all 0) */
    uint8_t *rx_sent;           /* RX out, or NULL: frame i reached the guest (1) or was dropped (0) */
    uint64_t tx_csum;           /* checksums completed */
    uint64_t tx_gso;            /* GSO frames segmented ... */
    uint64_t tx_gso_segs;       /* ... into this many frames */
    uint64_t drop_bad_csum;     /* csum_start/offset outside the frame */
    uint64_t drop_bad_gso;      /* GSO header refused (type, size, headers) */
    uint64_t rx_csum_valid;     /* RX frames given DATA_VALID */

    /* Live migration (VHOST_F_LOG_ALL, gw_log.h). Python sets log, log_size,
       log_used, log_used_gpa while the queue is stopped; log == NULL means
       logging is off and costs one branch per write. The log has one bit per
       4 KiB guest page; a page beyond log_size is counted in log_miss, never
       written. log_n/log_off/log_bits are C's per-burst cache. */
    uint8_t *log;
    uint64_t log_size;          /* bytes */
    uint64_t log_used_gpa;      /* log_guest_addr: used-ring writes are logged from here */
    uint8_t log_used;           /* VHOST_VRING_F_LOG: log used-ring writes too */
    uint64_t log_miss;          /* out: page marks the log was too small for (not written) */
    uint32_t log_n;
    uint64_t log_off[GW_LOG_CACHE];
    uint8_t log_bits[GW_LOG_CACHE];

    /* Packed ring (VIRTIO_F_RING_PACKED, gw_packed.h). Python sets these while
       the queue is stopped. desc is then the descriptor ring, avail the driver
       event area, used the device event area; last_avail and used_idx are ring
       positions (< size, which need not be a power of two) with their wrap
       counters here. shadow has size entries: a burst's used elements wait
       there, so an RX frame that runs out of buffers takes back its chains
       with nothing written. Used descriptors are logged at desc_gpa + 16 * pos. */
    uint8_t packed;
    uint8_t avail_wrap;
    uint8_t used_wrap;
    uint8_t signalled_wrap;
    uint64_t desc_gpa;
    struct gw_used_elem *shadow;

    /* Bounded bursts (issue 12). walked: descriptors the last burst read;
       walked_max: the most any burst read. drop_no_room: RX frames that found
       no room in GW_MAX_CHAIN descriptors or in the whole ring (the chains
       stay available, as vhost-net discards). */
    uint32_t walked;
    uint32_t walked_max;
    uint64_t walked_total;      /* over the queue's life: the pump's throttle compares passes */
    uint64_t drop_no_room;
    /* RX stall: a frame ran out of available chains at stall_idx (split: the
       avail->idx the burst saw; packed: the ring position, stall_wrap its
       wrap). Until the guest makes something new available there,
       gw_vq_pending says 0 and set_notify asks for the kick at that point.
       noroom_*: the length of a frame dropped for no room and the ring state
       it saw; a frame at least that long meets the same ring and is dropped
       without a walk. Python clears both when it sets ring positions. */
    uint8_t stalled;
    uint8_t stall_wrap;
    uint16_t stall_idx;
    uint8_t noroom_valid;
    uint8_t noroom_wrap;
    uint16_t noroom_avail;      /* last_avail when it failed */
    uint16_t noroom_idx;        /* split: avail->idx it saw */
    uint32_t noroom_len;
};

/* Guest TX -> caller buffers. Pops up to n chains; frame i (header stripped)
   goes to base + offs[i], at most cap bytes, its length into lens[i].
   Returns the number of frames written, -1 if the queue is broken. Chains that
   are dropped (too big, short) are still returned to the used ring. */
int gw_vq_tx_burst(struct gw_vq *vq, uint8_t *base, const uint64_t *offs,
                   uint32_t cap, uint32_t *lens, unsigned n);

/* Caller frames -> guest RX. Frame i is lens[i] bytes at base + offs[i]; a
   zeroed virtio-net header (num_buffers set with MRG_RXBUF) goes in front.
   Returns how many frames were consumed (delivered or dropped as too big),
   stopping early when the guest has no buffers left; -1 if broken. */
int gw_vq_rx_burst(struct gw_vq *vq, const uint8_t *base, const uint64_t *offs,
                   const uint32_t *lens, unsigned n);

/* Interrupt the guest through callfd if it asked for it (used_event with
   EVENT_IDX, else VRING_AVAIL_F_NO_INTERRUPT). Returns 1 if signalled. */
int gw_vq_call(struct gw_vq *vq);

/* Ask the guest to kick (enable=1) or not (enable=0): used->flags, or
   avail_event with EVENT_IDX. Then a full barrier. Returns gw_vq_pending(). */
int gw_vq_set_notify(struct gw_vq *vq, int enable);

/* Mark [gpa, gpa+len) dirty now (tests, and Python writes into guest memory
   while logging). Returns 0, or -1 if some page was beyond the log. */
int gw_vq_log_write(struct gw_vq *vq, uint64_t gpa, uint64_t len);

/* Number of avail entries not yet taken (0..size), -1 if broken. A packed
   ring says only whether a chain is waiting (0 or 1). */
int gw_vq_pending(struct gw_vq *vq);

/* 1 if the guest may have made a chain available that the ring's owner has
   not taken, else 0: a hint for another thread (gw_xskq.c, pumps sharing a
   CPU, on the guest's TX ring). It only reads, never fails the ring, and
   may be stale; a stalled RX ring may say 1 for chains tried already. The
   owner's own pass checks everything it takes. */
int gw_vq_peek(const struct gw_vq *vq);
