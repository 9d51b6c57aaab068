/*
 * Capture rings (`gateway capture`): copies of a device's frames for a reader
 * in another process (the CLI), through memory shared with it (a sealed memfd).
 *
 * One ring per queue pair: its worker is the only producer, the CLI the only
 * consumer. The producer never waits: a frame that does not fit is dropped
 * from the capture and counted. The shared memory is writable by the reader,
 * so the producer reads nothing from it but `tail`, and checks that: a reader
 * that writes a wrong tail only finds its own capture dropping everything.
 * Everything else the producer needs (where the data is, its size, its own
 * head) is in struct gw_cap, in the daemon's private memory.
 *
 * The hook: struct gw_local.capture (gw_xskq.h) is NULL when nobody captures, so
 * a burst pays one load. gw_cap_hook() sets or clears it; a burst that may use
 * the ring counts itself in gw_local.capture_busy, so after clearing, the daemon
 * waits for capture_busy == 0 before it unmaps the ring.
 *
 * Read by cffi's cdef too: declarations only.
 */

/* Record flags: the direction as the guest sees it. */
#define GW_CAP_RX 1          /* to the guest */
#define GW_CAP_TX 2          /* from the guest */
#define GW_CAP_PAD 4         /* filler up to the end of the ring: skip */

#define GW_CAP_REC_HDR 32    /* record header bytes; records are 32-byte aligned */
#define GW_CAP_MIN_RING 65536
#define GW_CAP_MAX_RING 268435456

/* The shared header of one ring: producer and reader fields on their own
   cache lines. */
struct gw_cap_shared {
    uint64_t head;           /* producer: bytes published (release store) */
    uint64_t pad0[7];
    uint64_t tail;           /* reader: bytes consumed */
    uint64_t pad1[7];
    uint64_t frames;         /* producer: frames written */
    uint64_t dropped;        /* producer: frames that did not fit */
    uint64_t pad2[6];
};

/* One record at data + (pos % size), 32-byte aligned, never split by the
   wrap (a GW_CAP_PAD record fills the end instead). Its last 16 bytes are
   the frame's pcap record header (nanosecond pcap, host order), and the
   frame follows: the reader writes a pcap record straight from the ring
   (gw_cap_write), without copying it first. */
struct gw_cap_rec {
    uint32_t reclen;         /* this record's bytes, header and padding included */
    uint32_t flags;          /* GW_CAP_* */
    uint64_t ts_ns;          /* CLOCK_REALTIME when copied */
    uint32_t ts_sec;         /* pcap: ts_ns in seconds ... */
    uint32_t ts_nsec;        /* ... and nanoseconds */
    uint32_t caplen;         /* pcap: bytes copied (<= snaplen) */
    uint32_t origlen;        /* pcap: the frame's length */
};

/* The producer's private view of a ring (daemon memory, not shared). */
struct gw_cap {
    struct gw_cap_shared *sh;
    uint8_t *data;
    uint64_t size;           /* power of two, GW_CAP_MIN_RING..GW_CAP_MAX_RING */
    uint64_t head;           /* what we wrote (published by gw_cap_publish) */
    uint64_t tail;           /* the reader's tail as last read (and checked) */
    uint32_t snaplen;        /* 1..65535 */
    uint32_t dirs;           /* GW_CAP_RX | GW_CAP_TX: what to capture */
    uint64_t frames;
    uint64_t dropped;
};

/* The reader's private view of a ring (CLI memory). */
struct gw_cap_view {
    struct gw_cap_shared *sh;
    uint8_t *data;
    uint64_t size;
    uint64_t tail;
};

/* Producer: one frame (dir GW_CAP_RX or GW_CAP_TX), copied if the ring has
   room (returns 1), else counted as dropped (0); the reader sees it after
   gw_cap_publish. ts_ns 0: take the clock now. A burst takes the clock once
   (gw_cap_now) for all its frames: a clock read costs a fifth of a 1500-byte
   copy, and the frames of one burst leave within microseconds of each other. */
int gw_cap_add(struct gw_cap *c, uint32_t dir, const uint8_t *f, uint32_t len, uint64_t ts_ns);
/* Producer: what gw_cap_add wrote, and the counts, to the reader (once per burst). */
void gw_cap_publish(struct gw_cap *c);
/* gw_cap_add, then gw_cap_publish. */
void gw_cap_put(struct gw_cap *c, uint32_t dir, const uint8_t *f, uint32_t len, uint64_t ts_ns);
/* CLOCK_REALTIME in ns: a burst's timestamp. */
uint64_t gw_cap_now(void);

/* The hook: for `local`'s bursts from now on (cap NULL: none). */
struct gw_local;
void gw_cap_hook(struct gw_local *local, struct gw_cap *cap);
/* Bursts that may still be using the ring hooked before: wait for 0. */
unsigned gw_cap_busy(struct gw_local *local);

/* Frames from a caller's buffers (the worker's Python slow paths: the inbox),
   through `local`'s hook if there is one. */
void gw_cap_frames(struct gw_local *local, uint32_t dir, const uint8_t *base,
                   const uint64_t *offs, const uint32_t *lens, unsigned n);

/* Reader: records of the n rings into `out` as pcap records (16-byte header,
   nanosecond timestamps) or, with pcapng set, pcapng Enhanced Packet Blocks
   (interface 0, nanosecond resolution, epb_flags saying the direction as the
   guest sees it: RX inbound, TX outbound), merged by timestamp, at most
   max_frames frames and outcap bytes; each ring's tail advances past what
   was taken. Returns the bytes written (*frames: how many frames), or -1 if
   a ring's header or a record is not one a producer writes (*bad: which
   ring). */
long gw_cap_to_pcap(struct gw_cap_view *v, unsigned n, uint8_t *out, uint64_t outcap,
                    uint64_t max_frames, uint64_t *frames, unsigned *bad, int pcapng);

/* Reader, pcap: as gw_cap_to_pcap, but written to fd straight from the rings
   (writev of each record's pcap header and bytes, GW_CAP_IOV records a
   call), each ring's tail advanced once its records are written: a copy
   fewer, at 1.5 GB/s of 1500-byte frames a good part of a CPU. Blocks while
   fd does (the reader may wait; the workers never do); EINTR is retried.
   Returns the bytes written; -1 with *bad < n for a record no producer
   writes (*bad: which ring); else -errno if writing failed (-EPIPE: the
   reader of a pipe left; *bad is then ~0). */
long gw_cap_write(struct gw_cap_view *v, unsigned n, int fd, uint64_t max_frames,
                  uint64_t *frames, unsigned *bad);
#define GW_CAP_IOV 256
