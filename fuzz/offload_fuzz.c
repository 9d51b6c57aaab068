/*
 * libFuzzer target for cffi_build/gw_offload.c: whatever a guest puts in a
 * virtio-net header and a frame, the offload functions read and write only
 * inside the buffers they were given (ASan sees each frame in an exactly
 * sized allocation), and what they accept is sound: every segment fits cap,
 * the segments' payloads put together are the frame's payload, and each
 * segment's TCP checksum verifies.
 *
 * Input: 12 bytes of virtio-net header, 2 bytes of cap (little-endian), then
 * the frame.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gw_offload.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct gw_net_hdr h;
    struct gw_gso plan;
    uint32_t len, cap, done = 0;
    uint8_t *f, *out;
    int n;

    if (size < 14 || size - 14 > 70000)
        return 0;
    gw_net_hdr_decode(data, &h);
    cap = (uint32_t)(data[12] | data[13] << 8) % 9000 + 1;
    len = (uint32_t)(size - 14);
    f = malloc(len ? len : 1);
    memcpy(f, data + 14, len);

    (void)gw_csum_verify(f, len);
    if (gw_csum_complete(f, len, h.csum_start, h.csum_offset) == 0 && len)
        memcpy(f, data + 14, len);                  /* segment the original bytes */

    n = gw_gso_plan(f, len, &h, cap, &plan);
    if (n > 0) {
        if ((unsigned)n != plan.nsegs || n > GW_GSO_MAX_SEGS || plan.hdrs + plan.payload != len)
            abort();
        out = malloc(cap);
        for (int i = 0; i < n; i++) {
            uint32_t k = gw_gso_segment(f, &plan, (unsigned)i, out);
            if (k < plan.hdrs || k > cap)
                abort();
            if (memcmp(out + plan.hdrs, f + plan.hdrs + done, k - plan.hdrs))
                abort();
            done += k - plan.hdrs;
            if (!gw_csum_verify(out, k))
                abort();
        }
        if (done != plan.payload)
            abort();
        free(out);
    }
    free(f);
    return 0;
}
