/*
 * Checksum and TCP segmentation offloads done in software, on byte buffers.
 *
 * A guest that negotiated CSUM / HOST_TSO4/6 hands us frames with a partial
 * checksum (NEEDS_CSUM) or one TCP segment of up to 64 KiB (GSO); the wire
 * must see complete, MTU-sized frames, so we finish the guest's job here.
 * These are pure functions of the frame bytes and the virtio-net header, so
 * they can be tested (and fuzzed) without rings or sockets. The header is a
 * copy the caller owns, never guest memory, and every value in it is checked
 * against the frame before use.
 *
 * Read by cffi's cdef too: declarations only.
 */

#define GW_NET_HDR_F_NEEDS_CSUM 1
#define GW_NET_HDR_F_DATA_VALID 2
#define GW_NET_HDR_GSO_NONE 0
#define GW_NET_HDR_GSO_TCPV4 1
#define GW_NET_HDR_GSO_UDP 3
#define GW_NET_HDR_GSO_TCPV6 4
#define GW_NET_HDR_GSO_ECN 128

/* Most segments one GSO frame may become: 64 KiB at an MSS of 256. */
#define GW_GSO_MAX_SEGS 256

/* Why a frame was refused (negative returns). */
#define GW_OFF_E_CSUM 1        /* csum_start/csum_offset outside the frame */
#define GW_OFF_E_GSO_TYPE 2    /* UDP, ECN or an unknown gso_type */
#define GW_OFF_E_GSO_SIZE 3    /* gso_size 0, a segment over cap, or too many segments */
#define GW_OFF_E_HDR 4         /* not plain IPv4/IPv6 + TCP as gso_type says, or hdr_len past the frame */

/* The virtio-net header (virtio 1.2, 5.1.6), little-endian fields decoded. */
struct gw_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* Where the headers of a GSO frame are, once gw_gso_plan accepted it. */
struct gw_gso {
    uint32_t l3;               /* IP header offset (after Ethernet and at most one VLAN tag) */
    uint32_t l4;               /* TCP header offset */
    uint32_t hdrs;             /* bytes of Ethernet + IP + TCP headers */
    uint32_t payload;          /* TCP payload bytes */
    uint32_t mss;
    uint32_t nsegs;
    uint8_t ipv6;
};

/* Fill a NEEDS_CSUM frame's checksum: the ones' complement sum from
   csum_start to the end (the guest left the pseudo-header sum in the field)
   goes to csum_start + csum_offset. 0, or -GW_OFF_E_CSUM and nothing written. */
int gw_csum_complete(uint8_t *f, uint32_t len, uint16_t csum_start, uint16_t csum_offset);

/* Check a GSO frame against its header; segments must fit cap bytes each.
   Returns the number of segments (plan filled) or -GW_OFF_E_*. */
int gw_gso_plan(const uint8_t *f, uint32_t len, const struct gw_net_hdr *h, uint32_t cap,
                struct gw_gso *plan);

/* Write segment i (< plan->nsegs) of a planned frame to out (cap bytes,
   as planned), IP and TCP headers and checksums complete. Returns its length. */
uint32_t gw_gso_segment(const uint8_t *f, const struct gw_gso *plan, unsigned i, uint8_t *out);

/* 1 if the frame is IPv4/IPv6 (unfragmented, no extension headers) carrying
   TCP or UDP (non-zero checksum) whose checksum is right: the guest may then
   skip checking it (DATA_VALID). 0 for anything else. */
int gw_csum_verify(const uint8_t *f, uint32_t len);

/* Decode the first hdr_len (10 or 12) bytes of a virtio-net header. */
void gw_net_hdr_decode(const uint8_t *raw, struct gw_net_hdr *h);
