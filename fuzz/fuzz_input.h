/*
 * The fuzz targets' input reader: every byte string decodes to something, a
 * short input reading as zeros, so libFuzzer's mutations always mean a case.
 * Reads are sequenced low part first, whatever the compiler's argument order.
 */
#include <stddef.h>
#include <stdint.h>

struct in {
    const uint8_t *p;
    size_t n;
};

static uint8_t u8(struct in *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static uint16_t u16(struct in *in)
{
    uint16_t lo = u8(in);
    return (uint16_t)(lo | u8(in) << 8);
}

static uint32_t u32(struct in *in)
{
    uint32_t lo = u16(in);
    return lo | (uint32_t)u16(in) << 16;
}

static uint64_t u64(struct in *in)
{
    uint64_t lo = u32(in);
    return lo | (uint64_t)u32(in) << 32;
}
