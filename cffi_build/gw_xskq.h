/*
 * AF_XDP <-> virtqueue bursts: one copy per frame, between guest buffers and
 * UMEM frames, with the GIL released. Needs gw_ring.h and gw_xsk.h first.
 *
 * One struct gw_umemq per NIC queue, over that queue's Umem (xdp/xsk.py).
 * Every device socket on the queue shares the UMEM, so their workers share
 * its fill and completion rings and its free-frame stack: those are touched
 * only under `lock`, a spinlock held for a few ring operations per burst.
 * Each socket's own RX and TX rings belong to one worker and need no lock.
 * Once workers run, Python must not use Umem.alloc/free/fill/reap: frames for
 * the wire go through gw_xsk_send.
 *
 * Read by cffi's cdef too: declarations only.
 */

struct gw_umemq {
    uint8_t *area;
    __u64 frame_size;          /* power of two */
    __u64 mask;                /* ~(frame_size - 1): any address -> its frame */
    struct xsk_ring_prod *fill;
    struct xsk_ring_cons *comp;
    __u64 *pool;               /* free frames: a stack pool[0..*npool) */
    unsigned *npool;
    unsigned nframes;
    unsigned fill_target;      /* keep about this many frames lent to the kernel */
    int fd;                    /* the UMEM owner socket, for fill-ring wake-ups */
    uint32_t lock;
    uint64_t tx_no_frame;      /* TX bursts cut short for want of a free frame */
    uint64_t tx_ring_full;     /* ... or of room in the socket's TX ring */
    uint64_t rx_bad_desc;      /* RX descriptors outside the UMEM: skipped, frame unknown */
};

/* What a guest's TX burst must know beyond its rings. Frames that must
   (also) reach other guests on the same NIC, which the wire will not bring
   back: broadcast and multicast (sent to the wire as well) and unicast to a
   local guest's MAC (not sent). The burst copies them into base + offs[n],
   n < cap; Python hands them on. And the guest's own MAC: with check_src, a
   frame with any other source MAC is dropped, so a guest cannot pose as
   another host. */
struct gw_local {
    const uint64_t *macs;      /* local guests' VID << 48 | MAC (48-bit big-endian), */
    const unsigned *nmacs;     /* ... this many: the NIC's table, shared by its queues */
    uint8_t *base;
    const uint64_t *offs;
    uint32_t *lens;
    unsigned cap;              /* slots, each at least a frame long */
    unsigned n;                /* frames copied; the caller resets it */
    uint64_t dropped;          /* local frames beyond cap */
    uint64_t own_mac;          /* the guest's MAC, a 48-bit big-endian number */
    unsigned check_src;        /* drop frames whose source is not own_mac */
    uint64_t spoofed;          /* frames dropped for their source MAC */
    uint64_t runts;            /* frames dropped for being shorter than 14 bytes */
    /* VLANs: the device's VLAN ID, 0 = untagged. Its frames leave tagged with it
       (802.1Q, priority 0), and macs[] entries carry their device's VID above
       the 48 MAC bits, so unicast stays local only within the VLAN. A guest
       frame that carries a VLAN tag of its own (TPID 0x8100 or 0x88a8) is
       dropped and counted, from any device: the gateway assigns VLANs, and a
       guest must not put frames on another VLAN of the wire. */
    unsigned vlan;
    uint64_t tagged;           /* frames dropped for carrying their own VLAN tag */
    /* The device's MTU (issue 12): the longest frame the guest may send, its
       Ethernet header included and the gateway's VLAN tag not (XdpPort.max_frame);
       0 = the UMEM frame is the only limit. Longer frames are dropped, GSO frames
       whose segments would be longer too. */
    uint32_t max_frame;
    uint64_t over_mtu;         /* frames dropped for max_frame */
    /* `gateway capture` (gw_capture.h): the ring this queue pair's frames are
       copied into, NULL when nobody captures; bursts using it count in capture_busy. */
    struct gw_cap *capture;
    uint32_t capture_busy;
};

/* Return completed TX frames to the pool and top up the fill ring. */
void gw_umemq_refill(struct gw_umemq *u);

/* Guest TX -> socket TX, up to n frames (local ones and source checks as
   struct gw_local says; local may be NULL: runts are dropped all the same). Frames taken from the guest, or -1 if the guest broke
   the ring (vq->error says how). */
int gw_xsk_from_guest(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_prod *tx, int fd,
                      unsigned n, struct gw_local *local);

/* Socket RX -> guest RX, up to n frames. Frames delivered or dropped as too
   big, or -1; those the guest has no buffers for stay in the RX ring. A
   descriptor outside the UMEM is consumed, counted (u->rx_bad_desc) and
   neither delivered nor given back to the pool: its frame is unknown. What
   it consumed is subtracted from *held (the XDP program's count of frames
   this socket holds, bpf/gateway_xdp.c `held`; may be NULL). What reached
   the guest, and only that, goes to local's capture hook (local may be NULL). */
int gw_xsk_to_guest(struct gw_vq *vq, struct gw_umemq *u, struct xsk_ring_cons *rx, unsigned n,
                    uint64_t *held, struct gw_local *local);

/* *held -= n, atomically, clamped at 0 (the XDP program adds concurrently). */
void gw_held_sub(uint64_t *held, uint64_t n);

/* Every frame in a socket's RX ring back to the pool, none to a guest: a
   socket about to close. Returns how many descriptors it consumed
   (those outside the UMEM are counted in rx_bad_desc, not pooled). */
unsigned gw_xsk_rx_drain(struct gw_umemq *u, struct xsk_ring_cons *rx);

/* A socket about to close: kick until the kernel took its TX ring, and with
   reclaim (copy mode, where only a kick or poll makes the kernel read the
   ring) give what it never took back to the pool. Returns how many frames
   went back that way. */
unsigned gw_xsk_tx_drain(struct gw_umemq *u, struct xsk_ring_prod *tx, int fd, int reclaim);

/* Frames (base + offs[i], lens[i]) to the wire, copied into UMEM frames: the
   slow path for control frames. Returns how many were queued. */
int gw_xsk_send(struct gw_umemq *u, struct xsk_ring_prod *tx, int fd, const uint8_t *base,
                const uint64_t *offs, const uint32_t *lens, unsigned n);

/* Frames waiting in a socket's RX ring. */
unsigned gw_xsk_rx_waiting(struct xsk_ring_cons *rx);

/* A worker's whole steady state, so that no Python runs per burst: one queue
   pair's rings and the sockets it serves (TX on one NIC queue, RX from up to
   GW_PUMP_MAX_RX). Python fills it once when the worker starts. */
#define GW_PUMP_MAX_RX 16

/* A pass that read more than GW_THROTTLE_WALK descriptors and more than
   GW_THROTTLE_PER_FRAME per frame it moved is a guest making us walk for
   nothing (issue 12): gw_pump_run returns at once with throttled set and the
   worker sleeps GW_THROTTLE_MS before the next pass, so such a guest costs a
   bounded share of a CPU. Honest chains take 1..3 descriptors per frame. */
#define GW_THROTTLE_WALK 1024
#define GW_THROTTLE_PER_FRAME 64
#define GW_THROTTLE_MS 1

struct gw_rxsock {
    struct gw_umemq *u;
    struct xsk_ring_cons *rx;
    uint64_t *held;            /* the socket's count in the XDP program's `held` map */
};

struct gw_pump {
    struct gw_vq *txq;         /* the guest's TX ring ... */
    struct gw_vq *rxq;         /* ... and RX ring */
    struct gw_umemq *tx_u;
    struct xsk_ring_prod *tx;
    int tx_fd;
    struct gw_local *local;    /* may be NULL */
    unsigned nrx;
    struct gw_rxsock rx[GW_PUMP_MAX_RX];
    uint32_t *attention;       /* another thread set it: return now (it is cleared) */
    /* In: how long to poll for the first frame of this run before returning
       idle; 0 = spin_ns. The worker sets it when it woke early, ahead of a
       frame its arrival history says is near (worker.py, `Arrivals`). */
    uint64_t first_wait_ns;
    /* In: 1 = one pump polls per CPU. A pump with nothing moving polls only if
       no other pump polls on its CPU; else it returns idle and its worker
       sleeps: the CPU is busy, so its wake-up is a cheap preemption, not a
       halted vCPU's. Workers of several devices share a forwarder CPU, and
       two polling at once took turns only at the scheduler's tick (4 ms
       here). Yielding between polls instead pushed the yielder's EEVDF
       deadline a slice per yield, and any other task then ran first. */
    int share_cpu;
    /* In: 1 = a run that moved GW_BURST frames or more looks every
       GW_YIELD_NS (20 us) whether another pump of its CPU, inside
       gw_pump_sleep or gw_pump_run and not throttled within the last
       second, has work in its rings (as give_way does), and yields the CPU
       if so. Without it a worker woken beside a busy pump (a ping beside a
       load) waited until that pump slept, 200-3500 us (perf sched_switch):
       EEVDF preempts at wake-up only if the woken task is eligible, and it
       was not, having polled its own windows, and no tick came meanwhile.
       A yield pushes the yielder's deadline a slice later, so only a pump
       moving a load yields, not one waiting for its next ping (yielding
       from both: +40 us at p50). Yielding every 20 us for a second after
       any hand-over on the CPU instead (until 2026-12-04) made some 30 000
       sched_yield calls a second beside a ping (this rule: 47-179 in a
       run's A/B halves), and the ping's p50/p95/p99 were 83/189/259 and
       65/172/258 us pooled against 72/168/263 and 61/149/242 (A/B every
       second, 4 and 6 runs of 1500 pings beside 0.13 Mpps). A throttled
       pump is not yielded to: yielding to a guest that makes us walk for
       nothing cost the healthy guest beside it 8 % (noisy bench). */
    int yield_busy;
    /* In: 1 = a pump polling with nothing moving (it holds its CPU's poll
       flag) gives way, at most every GW_YIELD_NS: it drops the flag and
       yields when another pump of its CPU, inside gw_pump_sleep or
       gw_pump_run, has work in its rings (a frame in an RX socket, a chain
       on its guest's TX ring). That pump's worker was woken for it but could
       not run: the poller is not preempted at a wake-up (see yield_busy), so
       two devices pinged at once had one ping wait for the other's pump to
       sleep, 150 us after that ping's answer. */
    int give_way;
    /* Out. */
    unsigned waiting;          /* frames left in the RX rings: the guest had no buffers */
    int broken;                /* 1: the TX ring broke, 2: the RX ring (vq->error says how) */
    int idle;                  /* the last return was for spin_ns without a frame */
    int throttled;             /* the last pass walked far more than it moved: sleep a little */
    uint64_t passes;           /* rounds over both directions, for profiles */
    uint64_t handed;           /* idle polls given up: another pump polled on this CPU */
    uint64_t yields;           /* sched_yield() calls (yield_busy) */
    uint64_t gave_way;         /* sched_yield() calls for another pump's work (give_way) */
    uint64_t throttled_ns;     /* CLOCK_MONOTONIC of the last throttled return (the
                                  other pumps of its CPU read it) */
    uint64_t first_ns;         /* CLOCK_MONOTONIC when this run first moved a frame from
                                  the wire (an RX socket) to the guest, or 0: the guest's
                                  own frames follow the wire's or come with a kick */
    /* Out, of gw_pump_sleep. */
    uint64_t woke_ns;          /* CLOCK_MONOTONIC when the sleep ended */
    int pumped;                /* 1: gw_pump_run ran after it (its outputs above are new) */
    int early;                 /* ... and it was the timer, ahead of a predicted burst */
    long moved;                /* ... what that run returned */
};

/* Tests: pretend (1) or not (0) that another pump polls on every CPU (share_cpu). */
void gw_pollers_pretend(int on);
/* Tests: pretend (1) or not (0) that another pump of every CPU has work
   (yield_busy, give_way). */
void gw_work_pretend(int on);

/* Moves bursts both ways, interrupting the guest as it asks, until nothing
   moved for spin_ns (then the caller sleeps on the kick fds), local frames
   wait for Python (local->n), attention is set, or budget_ns ran out.
   Returns frames moved, or -1 if a ring broke. */
long gw_pump_run(struct gw_pump *p, uint64_t spin_ns, uint64_t budget_ns);

/* gw_pump_sleep's flags per fd. */
#define GW_WAKE_RETURN 1       /* Python has work when it is ready: no pump (the
                                  worker's own eventfd, the inbox's) */
#define GW_WAKE_DRAIN 2        /* an eventfd to read empty when ready (a kick) */

/* A worker's sleep (gw_poll on fds), then at once, still in C, the pump run
   it woke for (issue 15): Python between the wake-up and the pump cost 38 us
   median on the test VM, on the path of every frame that wakes a worker.
   The pump runs if a ring's fd (flags 0: an XSK socket) or a kick (DRAIN)
   woke it, or the timer did and poll_until_ns (CLOCK_MONOTONIC, 0: none) is
   still ahead, a predicted burst: then it polls for the first frame until
   then (first_wait_ns). It does not if a RETURN fd is ready or the timer
   ran out otherwise. Returns gw_poll's result (revents filled) or -errno;
   woke_ns, pumped, early and moved say what happened. n <= GW_PUMP_MAX_RX + 8. */
int gw_pump_sleep(struct gw_pump *p, const int *fds, const uint8_t *flags, short *revents,
                  unsigned n, int64_t timeout_ns, uint64_t poll_until_ns, uint64_t spin_ns,
                  uint64_t budget_ns);

/* poll() with a nanosecond timeout (ppoll; timeout_ns < 0: none), for a
   worker's sleep: poll(2) rounds to milliseconds, too coarse to wake a little
   ahead of a frame. cffi releases the GIL around it. revents[i] gets
   fds[i]'s events. Returns the number of ready fds, 0 on timeout, -errno. */
int gw_poll(const int *fds, short *revents, unsigned n, int64_t timeout_ns);

/* CLOCK_MONOTONIC in ns, the clock of gw_pump.first_ns. */
uint64_t gw_now_ns(void);
