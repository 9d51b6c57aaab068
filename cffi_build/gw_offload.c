/*
 * Software checksum and TCP segmentation (contract in gw_offload.h).
 *
 * Checksums are summed as native (little-endian) 16-bit words and stored the
 * same way: the ones' complement sum does not care about byte order as long
 * as the value goes back where it was read from, so no byte swaps are needed
 * except for the header fields we rewrite. Every offset is checked against
 * the frame length before any byte at it is read or written.
 */
#include <stdint.h>
#include <string.h>

#include "gw_offload.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

/* 32-bit words into a 64-bit accumulator: cannot overflow below 16 GiB. */
static uint64_t sum_raw(const uint8_t *p, uint32_t n, uint64_t s)
{
    for (; n >= 4; p += 4, n -= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        s += w;
    }
    if (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        s += w;
        p += 2;
        n -= 2;
    }
    if (n)
        s += *p;                                /* low byte in a native word */
    return s;
}

static uint16_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* Sum of the TCP/UDP pseudo-header (RFC 793 / RFC 8200 8.1). l3 and the
   address bytes it reads were checked by the caller. */
static uint64_t pseudo_sum(const uint8_t *ip, int ipv6, uint8_t proto, uint32_t l4len)
{
    uint8_t tail[8] = { 0 };

    if (ipv6) {
        put32(tail, l4len);
        tail[7] = proto;
        return sum_raw(tail, 8, sum_raw(ip + 8, 32, 0));
    }
    tail[1] = proto;
    put16(tail + 2, (uint16_t)l4len);
    return sum_raw(tail, 4, sum_raw(ip + 12, 8, 0));
}

void gw_net_hdr_decode(const uint8_t *raw, struct gw_net_hdr *h)
{
    h->flags = raw[0];
    h->gso_type = raw[1];
    h->hdr_len = (uint16_t)(raw[2] | raw[3] << 8);
    h->gso_size = (uint16_t)(raw[4] | raw[5] << 8);
    h->csum_start = (uint16_t)(raw[6] | raw[7] << 8);
    h->csum_offset = (uint16_t)(raw[8] | raw[9] << 8);
    h->num_buffers = (uint16_t)(raw[10] | raw[11] << 8);
}

int gw_csum_complete(uint8_t *f, uint32_t len, uint16_t csum_start, uint16_t csum_offset)
{
    uint16_t c;

    if ((uint32_t)csum_start + csum_offset + 2 > len)
        return -GW_OFF_E_CSUM;
    c = (uint16_t)~fold(sum_raw(f + csum_start, len - csum_start, 0));
    /* 0 means "no checksum" to UDP; 0xffff is the same sum to everyone. */
    if (c == 0)
        c = 0xffff;
    memcpy(f + csum_start + csum_offset, &c, 2);
    return 0;
}

/* Ethernet type and IP header offset past at most one VLAN tag; 0 if short. */
static uint32_t l3_of(const uint8_t *f, uint32_t len, uint16_t *type)
{
    if (len < 14)
        return 0;
    *type = be16(f + 12);
    if (*type != ETH_P_8021Q)
        return 14;
    if (len < 18)
        return 0;
    *type = be16(f + 16);
    return 18;
}

int gw_gso_plan(const uint8_t *f, uint32_t len, const struct gw_net_hdr *h, uint32_t cap,
                struct gw_gso *plan)
{
    uint16_t type = 0;
    uint32_t l3, l4, thl, first;
    int ipv6;

    if (h->gso_type == GW_NET_HDR_GSO_TCPV4)
        ipv6 = 0;
    else if (h->gso_type == GW_NET_HDR_GSO_TCPV6)
        ipv6 = 1;
    else
        return -GW_OFF_E_GSO_TYPE;              /* UDP (UFO), ECN: never offered */
    if (h->hdr_len > len)
        return -GW_OFF_E_HDR;
    l3 = l3_of(f, len, &type);
    if (!l3)
        return -GW_OFF_E_HDR;
    if (!ipv6) {
        /* No IP options, no fragments: segments copy the header verbatim. */
        if (type != ETH_P_IP || len < l3 + 20 || f[l3] != 0x45 || f[l3 + 9] != PROTO_TCP
            || (be16(f + l3 + 6) & 0x3fff))
            return -GW_OFF_E_HDR;
        l4 = l3 + 20;
    } else {
        /* TCP right after the fixed header: extension headers not supported. */
        if (type != ETH_P_IPV6 || len < l3 + 40 || f[l3] >> 4 != 6 || f[l3 + 6] != PROTO_TCP)
            return -GW_OFF_E_HDR;
        l4 = l3 + 40;
    }
    if (len < l4 + 20)
        return -GW_OFF_E_HDR;
    thl = (uint32_t)(f[l4 + 12] >> 4) * 4;
    if (thl < 20 || len < l4 + thl)
        return -GW_OFF_E_HDR;

    plan->l3 = l3;
    plan->l4 = l4;
    plan->hdrs = l4 + thl;
    plan->payload = len - plan->hdrs;
    plan->mss = h->gso_size;
    plan->ipv6 = (uint8_t)ipv6;
    if (!plan->mss)
        return -GW_OFF_E_GSO_SIZE;
    plan->nsegs = plan->payload ? (plan->payload + plan->mss - 1) / plan->mss : 1;
    first = plan->payload < plan->mss ? plan->payload : plan->mss;
    if (plan->nsegs > GW_GSO_MAX_SEGS || plan->hdrs + first > cap)
        return -GW_OFF_E_GSO_SIZE;
    return (int)plan->nsegs;
}

uint32_t gw_gso_segment(const uint8_t *f, const struct gw_gso *p, unsigned i, uint8_t *out)
{
    uint32_t off = i * p->mss, left = p->payload - off;
    uint32_t seg = left < p->mss ? left : p->mss, l4len = p->hdrs - p->l4 + seg;
    uint8_t *ip = out + p->l3, *tcp = out + p->l4;
    uint16_t c;

    if (i >= p->nsegs)
        return 0;
    memcpy(out, f, p->hdrs);
    memcpy(out + p->hdrs, f + p->hdrs + off, seg);
    if (p->ipv6) {
        put16(ip + 4, (uint16_t)l4len);
    } else {
        put16(ip + 2, (uint16_t)(p->hdrs - p->l3 + seg));
        put16(ip + 4, (uint16_t)(be16(ip + 4) + i));
        ip[10] = ip[11] = 0;
        c = (uint16_t)~fold(sum_raw(ip, 20, 0));
        memcpy(ip + 10, &c, 2);
    }
    put32(tcp + 4, be32(tcp + 4) + off);
    if (i + 1 < p->nsegs)
        tcp[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
    if (i > 0)
        tcp[13] &= (uint8_t)~TCP_CWR;
    tcp[16] = tcp[17] = 0;
    c = (uint16_t)~fold(sum_raw(tcp, l4len, pseudo_sum(ip, p->ipv6, PROTO_TCP, l4len)));
    memcpy(tcp + 16, &c, 2);
    return p->hdrs + seg;
}

int gw_csum_verify(const uint8_t *f, uint32_t len)
{
    uint16_t type = 0;
    uint32_t l3 = l3_of(f, len, &type), l4, l4len;
    int ipv6;
    uint8_t proto;

    if (!l3)
        return 0;
    if (type == ETH_P_IP) {
        uint32_t ihl;
        if (len < l3 + 20 || f[l3] >> 4 != 4)
            return 0;
        ihl = (uint32_t)(f[l3] & 15) * 4;
        l4len = be16(f + l3 + 2);               /* total length; frames may be padded */
        if (ihl < 20 || l4len < ihl || l3 + l4len > len || (be16(f + l3 + 6) & 0x3fff))
            return 0;
        l4 = l3 + ihl;
        l4len -= ihl;
        proto = f[l3 + 9];
        ipv6 = 0;
    } else if (type == ETH_P_IPV6) {
        if (len < l3 + 40 || f[l3] >> 4 != 6)
            return 0;
        l4 = l3 + 40;
        l4len = be16(f + l3 + 4);
        if (l4 + l4len > len)
            return 0;
        proto = f[l3 + 6];
        ipv6 = 1;
    } else {
        return 0;
    }
    if (proto == PROTO_TCP) {
        if (l4len < 20)
            return 0;
    } else if (proto == PROTO_UDP) {
        /* A zero UDP checksum was never computed: nothing to vouch for. */
        if (l4len < 8 || (f[l4 + 6] == 0 && f[l4 + 7] == 0))
            return 0;
    } else {
        return 0;
    }
    return fold(sum_raw(f + l4, l4len, pseudo_sum(f + l3, ipv6, proto, l4len))) == 0xffff;
}
