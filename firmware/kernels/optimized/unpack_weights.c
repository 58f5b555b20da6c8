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

#include "conv_params.h"

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

/*
 * Palettized convolutions and fully connected layers read through a scratch of one block (tinymlaas/ir/
 * weight_decode.py palette_gemm): the layer runs as blocks of output channels, each block's weights decoded from
 * their indices into the scratch, then the matrix kernel of int8 or int16 weights (gemm_dsp.c) runs the block for
 * every pixel, writing its slice of each output pixel (the parameter block's out_stride). The scratch is an arena
 * buffer, written by palette_first (the first block) right before the layer: the memory planner places it like any
 * tensor, so where the arena has room beside the layer's tensors it costs no RAM (the compiler then makes the block
 * the whole layer). Every weight is decoded once per inference, as an unpacked copy was; the RAM is one block's
 * weights instead of the layer's; what it costs is each pixel's gather (im2col) once per block instead of once.
 *
 * blob (int32): {bits (| 1 << 8: compact requantization rows, expand_rows), units per block, values per unit,
 * table words}, the table (2^bits values of the
 * weights' type, in whole words), then the indices of the kernel's weight layout, flattened: 32 / bits to a word,
 * the first in the low bits (as unpack_palette_* reads them). A unit's weights (a channel pair, or four channels
 * for the one-row product) are adjacent in every layout these kernels take ([OC/2][quad][...], [OC/4][quad][...]):
 * a block is a run of the stream.
 */
struct tinymlaas_rq;
void tinymlaas_gemm_w8(const int8_t *restrict input, const int8_t *restrict weights,
                       const struct tinymlaas_rq *restrict rq, const int32_t *restrict params, int8_t *restrict output);
void tinymlaas_gemm_w16(const int8_t *restrict input, const int16_t *restrict weights,
                        const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                        int8_t *restrict output);
void tinymlaas_gemm4_w16(const int8_t *restrict input, const int16_t *restrict weights,
                         const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                         int8_t *restrict output);
void tinymlaas_gemv_w8(const int8_t *restrict input, const int8_t *restrict weights,
                       const struct tinymlaas_rq *restrict rq, const int32_t *restrict params, int8_t *restrict output);
void tinymlaas_gemv_w16(const int8_t *restrict input, const int16_t *restrict weights,
                        const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                        int8_t *restrict output);
void tinymlaas_gemv_w8_pt(const int8_t *restrict input, const int8_t *restrict weights,
                          const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                          int8_t *restrict output);
void tinymlaas_gemv_w16_pt(const int8_t *restrict input, const int16_t *restrict weights,
                           const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                           int8_t *restrict output);

/* values [start, start + count) of the index stream through the table: a head up to a word boundary, whole words
   (bits a constant, so that a word's indices unroll), then the tail */
#define TINYMLAAS_PALETTE_RANGE(name, value_t)                                                               \
    static inline __attribute__((always_inline)) void name##_bits(const uint32_t *words, const value_t *table, \
                                                                  const int bits, int start, int count,        \
                                                                  value_t *out)                                \
    {                                                                                                          \
        const int per_word = 32 / bits;                                                                        \
        const uint32_t mask = (1u << bits) - 1;                                                                \
        words += start / per_word;                                                                             \
        int k = start % per_word;                                                                              \
        if (k) {                                                                                               \
            uint32_t w = *words++ >> (k * bits);                                                               \
            for (; k < per_word && count; k++, count--, w >>= bits)                                            \
                *out++ = table[w & mask];                                                                      \
        }                                                                                                      \
        for (; count >= per_word; count -= per_word) {                                                         \
            uint32_t w = *words++;                                                                             \
            _Pragma("GCC unroll 16") for (int i = 0; i < per_word; i++, w >>= bits) out[i] = table[w & mask];  \
            out += per_word;                                                                                   \
        }                                                                                                      \
        for (uint32_t w = count ? *words : 0; count; count--, w >>= bits)                                      \
            *out++ = table[w & mask];                                                                          \
    }                                                                                                          \
    static void name(const uint32_t *words, const value_t *table, int bits, int start, int count, value_t *out) \
    {                                                                                                          \
        switch (bits) {                                                                                        \
        case 2: name##_bits(words, table, 2, start, count, out); break;                                        \
        case 3: name##_bits(words, table, 3, start, count, out); break;                                        \
        case 4: name##_bits(words, table, 4, start, count, out); break;                                        \
        default: name##_bits(words, table, bits, start, count, out); break;                                    \
        }                                                                                                      \
    }
TINYMLAAS_PALETTE_RANGE(palette_range_s8, int8_t)
TINYMLAAS_PALETTE_RANGE(palette_range_s16, int16_t)
#undef TINYMLAAS_PALETTE_RANGE

enum { TINYMLAAS_CONV_PARAMS = sizeof(struct tinymlaas_conv_params) / sizeof(int32_t), TINYMLAAS_RQ_WORDS = 4 };

/* the first block (the units a block holds) into the scratch: the call that gives the scratch its arena slot */
#define TINYMLAAS_PALETTE_FIRST(name, value_t, range)                                                          \
    void name(const int32_t *restrict blob, value_t *restrict scratch)                                         \
    {                                                                                                          \
        range((const uint32_t *)(const void *)(blob + 4 + blob[3]), (const value_t *)(const void *)(blob + 4), \
              blob[0] & 0xFF, 0, blob[1] * blob[2], scratch);                                                  \
    }
TINYMLAAS_PALETTE_FIRST(tinymlaas_palette_first_s8, int8_t, palette_range_s8)
TINYMLAAS_PALETTE_FIRST(tinymlaas_palette_first_s16, int16_t, palette_range_s16)
#undef TINYMLAAS_PALETTE_FIRST

/* compact requantization rows (the blob's bits word | 1 << 8): {R, then per row {bias, mult}, then a byte of shift per
   row}; round is (1 << (shift - 1)) + (zp_out << shift), as tinymlaas/ops/dsp_layouts.py requant_table makes it (it
   proved the sum fits), or, in a row of multiplier 0 (a constant output), the bias word: rows [first, first + n)
   expanded to {bias, mult, round, shift} */
static void expand_rows(const int32_t *compact, int first, int n, int32_t zp_out, int32_t *rows)
{
    const int R = compact[0];
    const int32_t *pairs = compact + 1;
    const int8_t *shifts = (const int8_t *)(const void *)(compact + 1 + 2 * R);
    if (n > R - first)
        n = R - first;
    for (int i = first; i < first + n; i++, rows += TINYMLAAS_RQ_WORDS) {
        const int32_t b = pairs[2 * i], m = pairs[2 * i + 1], e = shifts[i];
        rows[0] = m ? b : 0;
        rows[1] = m;
        rows[2] = m ? (int32_t)((1u << (e - 1)) + ((uint32_t)zp_out << e)) : b;
        rows[3] = e;
    }
}

/* the layer in blocks of `group` channels (the layout's unit: a pair for the 2x2 and four-pixel products, four for
   the one-row product), each decoded into the scratch (the first one is there already) and run by `kernel` on its
   channels. shared (the one-row product's per-tensor table: every channel's bias, then one {mult, round, shift}):
   the block's biases and the triple copied to the stack, as the kernel reads them for a layer of the block's
   channels; compact rows (expand_rows) expanded for the block behind its weights in the scratch. The scratch is an
   arena buffer whose last reader this call is: it is written here. */
#define TINYMLAAS_PALETTE_BLOCKS(name, value_t, range, kernel, group, shared)                                  \
    void name(const int8_t *restrict input, const int32_t *restrict blob, const value_t *restrict first,        \
              const struct tinymlaas_rq *restrict rq, const int32_t *restrict params, int8_t *restrict output) \
    {                                                                                                          \
        const int bits = blob[0] & 0xFF, compact = !(shared) && (blob[0] >> 8), block = blob[1];               \
        const int per_unit = blob[2];                                                                          \
        const value_t *table = (const value_t *)(const void *)(blob + 4);                                      \
        const uint32_t *words = (const uint32_t *)(const void *)(blob + 4 + blob[3]);                          \
        const int OC = params[P_OC], units = (OC + group - 1) / group;                                         \
        const int32_t *rows = (const int32_t *)(const void *)rq; /* TINYMLAAS_RQ_WORDS a channel */            \
        value_t *scratch = (value_t *)(uintptr_t)first;                                                        \
        int32_t sub[TINYMLAAS_CONV_PARAMS];                                                                    \
        int32_t own[shared ? block * group + 3 : 1];                                                           \
        /* compact rows: expanded behind the block's weights in the scratch (the compiler made it that much larger) */ \
        int32_t *expanded = (int32_t *)(void *)(scratch + block * per_unit);                                   \
        memcpy(sub, params, sizeof(sub));                                                                      \
        sub[P_OUT_STRIDE] = params[P_OUT_STRIDE] ? params[P_OUT_STRIDE] : OC;                                  \
        for (int u = 0; u < units; u += block) {                                                               \
            const int n = units - u < block ? units - u : block, oc = group * u;                               \
            const int channels = OC - oc < group * n ? OC - oc : group * n;                                    \
            if (u)                                                                                             \
                range(words, table, bits, u * per_unit, n * per_unit, scratch);                                \
            sub[P_OC] = channels;                                                                              \
            const int32_t *block_rq = rows + oc * TINYMLAAS_RQ_WORDS;                                          \
            if (shared) {                                                                                      \
                memcpy(own, rows + oc, (size_t)channels * sizeof(int32_t));                                    \
                memcpy(own + channels, rows + OC, 3 * sizeof(int32_t));                                        \
                block_rq = own;                                                                                \
            } else if (compact) {                                                                              \
                expand_rows(rows, oc, group * n, params[P_ZP_OUT], expanded);                                  \
                block_rq = expanded;                                                                           \
            }                                                                                                  \
            kernel(input, scratch, (const struct tinymlaas_rq *)(const void *)block_rq, sub, output + oc);     \
        }                                                                                                      \
    }
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemm_p8, int8_t, palette_range_s8, tinymlaas_gemm_w8, 2, 0)
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemm_p16, int16_t, palette_range_s16, tinymlaas_gemm_w16, 2, 0)
/* one row (fully connected): the output pixel is one, out_stride is not read */
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemv_p8, int8_t, palette_range_s8, tinymlaas_gemv_w8, 4, 0)
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemv_p16, int16_t, palette_range_s16, tinymlaas_gemv_w16, 4, 0)
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemv_p8_pt, int8_t, palette_range_s8, tinymlaas_gemv_w8_pt, 4, 1)
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemv_p16_pt, int16_t, palette_range_s16, tinymlaas_gemv_w16_pt, 4, 1)
#if defined(__ARM_FEATURE_DSP) /* four pixels a pass: DSP cores only, as gemm4_w16 */
TINYMLAAS_PALETTE_BLOCKS(tinymlaas_gemm4_p16, int16_t, palette_range_s16, tinymlaas_gemm4_w16, 2, 0)
#endif
#undef TINYMLAAS_PALETTE_BLOCKS
