/*
 * Weights below eight bits unpacked into RAM right before the kernel that reads them (tinymlaas/ir/weight_decode.py):
 * 4-bit values, and palettized ones.
 *
 * packed: groups of eight values in four bytes, byte i holding value i in its low nibble and value i + 4 in its high
 * nibble (tinymlaas/ir/weight_decode.py pack_words), so one word gives two words of output without reordering:
 * the low nibbles are values 0..3, the high ones 4..7. A nibble holds its value v as v + 8 (0..15), which becomes
 * the signed byte v as (v + 8 + 120) ^ 128, on four bytes at once with no carry between them (v + 128 <= 135).
 * params: {values}; the output holds `values` int8 (or int16) values; the packed input is padded to whole groups.
 * Constants and arena buffers are 16-byte aligned (the driver's layout): whole words are read and written.
 */
#include <stdint.h>
#include <string.h>

static inline uint32_t signed_nibbles(uint32_t nibbles) /* four nibbles v + 8, one per byte -> four int8 v */
{
    return (nibbles + 0x78787878u) ^ 0x80808080u;
}

void tinymlaas_unpack_int4_s8(const int8_t *restrict packed, const int32_t *restrict params, int8_t *restrict out)
{
    const int n = params[0];
    const uint32_t *words = (const uint32_t *)(const void *)packed;
    uint32_t *outw = (uint32_t *)(void *)out;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const uint32_t w = *words++;
        *outw++ = signed_nibbles(w & 0x0F0F0F0Fu);
        *outw++ = signed_nibbles((w >> 4) & 0x0F0F0F0Fu);
    }
    if (i < n) { /* the last group, fewer than eight values */
        int8_t tail[8];
        uint32_t lo, hi;
        const uint32_t w = *words;
        lo = signed_nibbles(w & 0x0F0F0F0Fu);
        hi = signed_nibbles((w >> 4) & 0x0F0F0F0Fu);
        memcpy(tail, &lo, 4);
        memcpy(tail + 4, &hi, 4);
        memcpy(out + i, tail, (size_t)(n - i));
    }
}

void tinymlaas_unpack_int4_s16(const int8_t *restrict packed, const int32_t *restrict params, int16_t *restrict out)
{
    const int n = params[0];
    const uint32_t *words = (const uint32_t *)(const void *)packed;
    for (int i = 0; i < n; i += 8) {
        const uint32_t w = *words++;
        uint32_t lo, hi;
        int8_t values[8];
        lo = signed_nibbles(w & 0x0F0F0F0Fu);
        hi = signed_nibbles((w >> 4) & 0x0F0F0F0Fu);
        memcpy(values, &lo, 4);
        memcpy(values + 4, &hi, 4);
        for (int k = 0; k < 8 && i + k < n; k++)
            out[i + k] = values[k];
    }
}

/*
 * Palettized weights (tinymlaas/ir/weight_decode.py pack_palette): each value an index of `bits` bits into a table,
 * as many to a 32-bit word as fit whole (32 / bits: 2 -> 16, 3 -> 10, 4 -> 8, 5 -> 6, 6 -> 5), the first in the low
 * bits. params: {values, bits}.
 */
#define TINYMLAAS_UNPACK_PALETTE(name, value_t)                                                            \
    void name(const int8_t *restrict packed, const value_t *restrict table, const int32_t *restrict params,    \
              value_t *restrict out)                                                                         \
    {                                                                                                        \
        const int n = params[0], bits = params[1], per_word = 32 / bits;                                     \
        const uint32_t mask = (1u << bits) - 1, *words = (const uint32_t *)(const void *)packed;             \
        for (int i = 0; i < n;) {                                                                            \
            uint32_t w = *words++;                                                                           \
            for (int k = 0; k < per_word && i < n; k++, i++, w >>= bits)                                     \
                out[i] = table[w & mask];                                                                    \
        }                                                                                                    \
    }
TINYMLAAS_UNPACK_PALETTE(tinymlaas_unpack_palette_s8, int8_t)
TINYMLAAS_UNPACK_PALETTE(tinymlaas_unpack_palette_s16, int16_t)
