/*
 * int8 convolution, 1x1 convolution and fully connected layers as a matrix product on the DSP extension.
 *
 * Each pair of output pixels is gathered once, with the input offset added, into an int16 patch on the
 * stack (im2col; padding is 0 there, which is what (zero point - zero point) contributes). The inner
 * loop computes two pixels x two output channels per four input channels with eight SMLAD.
 * Weights come in three variants, the compiler picks one per layer:
 *   w8:  int8 in flash (as in the model); two SXTB16 widen each weight word in the loop
 *   w16: pre-widened to int16 (twice the flash); one LDM loads two channels' four weights, no widening
 *   w4:  4-bit values (--weights int4), a channel pair's four weights in one word, read in the loop: no unpacked
 *        copy in RAM (each channel's nibbles masked into the high nibbles, see TINYMLAAS_QUAD4)
 *
 * Layouts, k = (ky, kx, c) flattened and padded with zeros to quads of four; on DSP cores a depth of 4n - 1
 * (an RGB image) is padded per tap to 4n first (tap_depth): each tap is then whole words of the input, the
 * extra lane reading the next pixel's first byte, which meets a zero weight:
 *   patch   [quad][pixel 0..1][k0 k2 | k1 k3]         int16, the order SXTAB16/SXTB16 produce
 *   weights [OC/2][quad][channel 0..1][k0 k1 k2 k3]   int8  (gemm: output channels in pairs)
 *           [OC/2][quad][channel 0..1][k0 k2 | k1 k3] int16
 *           [OC/2][quad][k0 k1 k2 k3]         gemm_w4: values -8..7, a byte holding channel 0's value in its low
 *                                              nibble and channel 1's in its high one
 *           [OC/4][quad][channel 0..3][...]           gemv: one pixel, four channels per step
 *           [OC/4][quad][pair 0..1][k0 k1 k2 k3]      gemv_w4: values -8..7, a byte holding channel 2p's value
 *                                                      in its low nibble and channel 2p + 1's in its high one
 *   requant [OC][bias, multiplier, round, shift]       see struct tinymlaas_rq (gemv_*_pt: [OC] biases, then
 *                                                      one multiplier, round, shift)
 *
 * Requantization is TFLite's, bit-exact, in its cheapest exact form: the compiler proved for the layer
 * that no intermediate overflows (tinymlaas/ops/dsp_layouts.py requant_table) and folded the output zero point
 * into the rounding constant. Layers it cannot prove use conv_s8.c.
 *
 * params: struct tinymlaas_conv_params (conv_params.h), read as int32 with its P_* indices
 */
#include <stdint.h>
#include <string.h>

#include "conv_params.h"
#include "fixedpoint_s8.h"

/*
 * double rounding (conv): (smmulr(2 * acc + bias, mult) + round - (x < 0)) >> shift, bias = 2 * TFLite bias,
 *   == RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc + bias, mult), shift) + zp_out
 * single rounding (the interpreter's fully connected): (smmul(acc + bias, mult) + round) >> shift
 *   == ((acc + bias) * mult + 2^(30 - s)) >> (31 - s) + zp_out, s the TFLite shift
 */
struct tinymlaas_rq {
    int32_t bias, mult, round, shift;
};

static inline int32_t smmulr(int32_t a, int32_t b)
{
#if defined(__ARM_FEATURE_DSP)
    int32_t r;
    __asm__("smmulr %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
#else
    return (int32_t)(((int64_t)a * b + 0x80000000ll) >> 32);
#endif
}

static inline int32_t smmul(int32_t a, int32_t b)
{
    return (int32_t)(((int64_t)a * b) >> 32); /* gcc: one SMMUL */
}

/* the end of requantization: v = the rounded, shifted value with the zero point; saturate, clamp */
static inline __attribute__((always_inline)) int8_t saturate(int32_t v, int clamp, int32_t lo, int32_t hi)
{
#if defined(__ARM_FEATURE_DSP)
    v = __ssat(v, 8);
#else
    v = v < -128 ? -128 : v > 127 ? 127 : v;
#endif
    if (clamp)
        v = v < lo ? lo : v > hi ? hi : v;
    return (int8_t)v;
}

/* double rounding of an accumulator already doubled, bias included (2 * acc + 2 * TFLite bias) */
static inline __attribute__((always_inline)) int8_t requantize_doubled(int32_t acc2, const struct tinymlaas_rq *q,
                                                                       int clamp, int32_t lo, int32_t hi)
{
    const int32_t x = smmulr(acc2, q->mult);
    return saturate((x + q->round - (int32_t)((uint32_t)x >> 31)) >> q->shift, clamp, lo, hi);
}

static inline __attribute__((always_inline)) int8_t requantize(int32_t acc, const struct tinymlaas_rq *q,
                                                               int single, int clamp, int32_t lo, int32_t hi)
{
    if (single)
        return saturate((smmul(acc + q->bias, q->mult) + q->round) >> q->shift, clamp, lo, hi);
    return requantize_doubled(2 * acc + q->bias, q, clamp, lo, hi);
}

/* four int8 inputs + offset -> two words, (k0 k2) at dst and (k1 k3) at dst + hi (int16 elements) */
static inline __attribute__((always_inline)) void widen4_at(const int8_t *x, int32_t offset, int16_t *dst, int hi)
{
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    int32_t v;
    memcpy(&v, x, 4);
    int32_t even = __sxtab16(off2, v), odd = tinymlaas_sxtab16_ror8(off2, v);
    memcpy(dst, &even, 4);
    memcpy(dst + hi, &odd, 4);
#else
    dst[0] = (int16_t)(x[0] + offset), dst[1] = (int16_t)(x[2] + offset);
    dst[hi] = (int16_t)(x[1] + offset), dst[hi + 1] = (int16_t)(x[3] + offset);
#endif
}

/* four int8 inputs + offset -> two words (k0 k2 | k1 k3) */
static inline void widen4(const int8_t *x, int32_t offset, int16_t *dst)
{
    widen4_at(x, offset, dst, 2);
}

/* a few bytes, a word at a time where the core allows unaligned words (the library's memcpy copies bytes one by
   one: it is built for size) */
static inline __attribute__((always_inline)) void copy_small(int8_t *dst, const int8_t *src, int n)
{
#if defined(__ARM_FEATURE_UNALIGNED)
    for (; n >= 4; n -= 4, dst += 4, src += 4) {
        int32_t v;
        memcpy(&v, src, 4);
        memcpy(dst, &v, 4);
    }
#endif
    for (; n > 0; n--)
        *dst++ = *src++;
}

/* channels of one tap in the patch */
static inline __attribute__((always_inline)) int tap_depth(int C)
{
#if defined(__ARM_FEATURE_DSP)
    return C % 4 == 3 && C > 3 ? C + 1 : C; /* fewer: split_rows */
#else /* the scalar products would pay more for the extra lane than the gathering saves */
    return C;
#endif
}

/* slot of k within its quad: (k0 k2 | k1 k3) */
static const uint8_t lane_of[4] = {0, 2, 1, 3};

/* a patch whose taps are all inside the image (and not on its last pixel when a tap reads one byte further):
   whole quads, widened straight from the input */
static inline __attribute__((always_inline)) int inside(const int32_t *params, int y0, int x0)
{
    const int H = params[P_H], W = params[P_W], C = params[P_C], D = tap_depth(C);
    const int y1 = y0 + (params[P_KH] - 1) * params[P_DH], x1 = x0 + (params[P_KW] - 1) * params[P_DW];
    const int whole = D % 4 == 0 || (params[P_DW] == 1 && params[P_KW] * C % 4 == 0); /* taps or tap rows */
    return whole && y0 >= 0 && x0 >= 0 && y1 < H && x1 < W && (D == C || y1 < H - 1 || x1 < W - 1);
}

/* the patch of the window at `row` (its top-left tap), taps `dy` bytes apart down and `dx` across, D channels a
   tap in whole quads */
static inline __attribute__((always_inline)) void gather_inside(const int8_t *row, int KH, int KW, int dy, int dx,
                                                                int D, int32_t offset, int16_t *dst, const int step,
                                                                const int hi)
{
    if (D == 4) { /* one quad a tap (an RGB image's first layer) */
        for (int ky = 0; ky < KH; ky++, row += dy) {
            const int8_t *src = row;
            for (int kx = 0; kx < KW; kx++, src += dx, dst += step)
                widen4_at(src, offset, dst, hi);
        }
        return;
    }
    if (dx == D) { /* a tap row is KW * D contiguous bytes, whole quads (inside() checked it) */
        for (int ky = 0; ky < KH; ky++, row += dy)
            for (int q = 0; q < KW * D; q += 4, dst += step)
                widen4_at(row + q, offset, dst, hi);
        return;
    }
    for (int ky = 0; ky < KH; ky++, row += dy) {
        const int8_t *src = row;
        for (int kx = 0; kx < KW; kx++, src += dx)
            for (int c = 0; c < D; c += 4, dst += step)
                widen4_at(src + c, offset, dst, hi);
    }
}

/* Taps of one to three channels whose tap rows are not whole quads (an RGB image's 3x3 window: rows of nine
   bytes): each tap row's whole quads first, in k order, then the rows' leftover bytes together (k order, 0 after
   them), so that every quad but the last lies in one row of the input: 3x3x3 in 7 quads, six of them widened
   straight from the input, against 9 with each tap padded to a word. The weights' k order matches
   (tinymlaas/ops/int8.py, _gemm_matrix). */
static inline __attribute__((always_inline)) int split_rows(int C, int KW, int DW)
{
#if defined(__ARM_FEATURE_DSP)
    return C < 4 && DW == 1 && KW * C % 4 != 0;
#else
    (void)C, (void)KW, (void)DW;
    return 0;
#endif
}

/* KH tap rows of R bytes, `dy` apart, in split_rows' order */
static inline __attribute__((always_inline)) void gather_split(const int8_t *row, int KH, int R, int dy,
                                                               int32_t offset, int16_t *dst, const int step,
                                                               const int hi)
{
    const int whole = R & ~3, left = R & 3;
    const int8_t *r = row;
    for (int ky = 0; ky < KH; ky++, r += dy)
        for (int q = 0; q < whole; q += 4, dst += step)
            widen4_at(r + q, offset, dst, hi);
    for (int q = 0; q < KH * left; q += 4) { /* the leftover quads, their tail 0 */
        memset(dst + (q >> 2) * step, 0, 4);
        memset(dst + (q >> 2) * step + hi, 0, 4);
    }
    for (int ky = 0, t = 0; ky < KH; ky++, row += dy)
        for (int i = whole; i < R; i++, t++) /* value t: quad t / 4, lane (k0 k2 | k1 k3) */
            dst[(t >> 2) * step + ((t & 1) ? hi : 0) + ((t >> 1) & 1)] = (int16_t)(row[i] + offset);
}

/* gather_split for three rows of nine bytes (a 3x3 RGB window) into a gemm4 patch (step 16, hi 8), unrolled: the
   general loops spill their counters in gemm4_layer */
static __attribute__((noinline)) void gather_split_3x9(const int8_t *row, int dy, int32_t offset, int16_t *dst)
{
    const int8_t *r1 = row + dy, *r2 = r1 + dy;
    widen4_at(row, offset, dst, 8);
    widen4_at(row + 4, offset, dst + 16, 8);
    widen4_at(r1, offset, dst + 32, 8);
    widen4_at(r1 + 4, offset, dst + 48, 8);
    widen4_at(r2, offset, dst + 64, 8);
    widen4_at(r2 + 4, offset, dst + 80, 8);
    const uint32_t even = (uint16_t)(row[8] + offset) | ((uint32_t)(uint16_t)(r2[8] + offset) << 16);
    const uint32_t odd = (uint16_t)(r1[8] + offset);
    memcpy(dst + 96, &even, 4);
    memcpy(dst + 104, &odd, 4);
}

/*
 * One output pixel's input patch, offset added, from dst on: each quad's (k0 k2) word at dst, its (k1 k3) word at
 * dst + hi, the next quad at dst + step (int16 elements; the layouts below fix step and hi). Padding and the tail
 * of the last quad are 0.
 */
static inline __attribute__((always_inline)) void gather_into(const int8_t *in, const int32_t *params, int oy,
                                                              int ox, int16_t *dst, const int step, const int hi)
{
    const int H = params[P_H], W = params[P_W], C = params[P_C];
    const int KH = params[P_KH], KW = params[P_KW], DH = params[P_DH], DW = params[P_DW];
    const int y0 = oy * params[P_SH] - params[P_PT], x0 = ox * params[P_SW] - params[P_PL];
    const int32_t offset = -params[P_ZP_IN];
    const int D = tap_depth(C);
    if (inside(params, y0, x0)) {
        gather_inside(in + (y0 * W + x0) * C, KH, KW, DH * W * C, DW * C, D, offset, dst, step, hi);
        return;
    }
    if (split_rows(C, KW, DW)) {
        const int R = KW * C;
        if (y0 >= 0 && x0 >= 0 && y0 + (KH - 1) * DH < H && x0 + KW <= W) {
            gather_split(in + (y0 * W + x0) * C, KH, R, DH * W * C, offset, dst, step, hi);
            return;
        }
        int8_t rows[KH * R]; /* clipped: the rows' bytes, padding the input zero point (0 widened) */
        memset(rows, params[P_ZP_IN], (size_t)(KH * R));
        for (int ky = 0; ky < KH; ky++) {
            const int iy = y0 + ky * DH, k0 = x0 < 0 ? -x0 : 0, k1 = W - x0 < KW ? W - x0 : KW;
            if (iy >= 0 && iy < H && k1 > k0)
                memcpy(rows + ky * R + k0 * C, in + (iy * W + x0 + k0) * C, (size_t)((k1 - k0) * C));
        }
        gather_split(rows, KH, R, R, offset, dst, step, hi);
        return;
    }
    if (D % 4 == 0) { /* whole quads per tap */
        const int8_t *last = in + (H * W - 1) * C; /* its padded tap would read past the tensor */
        int8_t tail[4] __attribute__((aligned(4))) = {0};
        for (int ky = 0; ky < KH; ky++) {
            const int iy = y0 + ky * DH;
            for (int kx = 0; kx < KW; kx++) {
                const int ix = x0 + kx * DW;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
                    for (int c = 0; c < D; c += 4, dst += step) {
                        memset(dst, 0, 4);
                        memset(dst + hi, 0, 4);
                    }
                    continue;
                }
                const int8_t *src = in + (iy * W + ix) * C, *end = src + D - 4;
                for (; src < end; src += 4, dst += step)
                    widen4_at(src, offset, dst, hi);
                if (D != C && src == last + D - 4) {
                    memcpy(tail, src, 3);
                    src = tail;
                }
                widen4_at(src, offset, dst, hi);
                dst += step;
            }
        }
        return;
    }
    const int row_bytes = KW * C;
    if (DW == 1 && row_bytes % 4 == 0) { /* each tap row whole quads (one channel, four taps across: a spectrogram's
                                           first layer): widened straight from the input where it lies inside */
        for (int ky = 0; ky < KH; ky++) {
            const int iy = y0 + ky * DH;
            if (iy < 0 || iy >= H) {
                for (int q = 0; q < row_bytes; q += 4, dst += step) {
                    memset(dst, 0, 4);
                    memset(dst + hi, 0, 4);
                }
                continue;
            }
            const int8_t *row = in + iy * W * C;
            if (x0 < 0 || x0 + KW > W) { /* clipped: the row's bytes, padding the input zero point (0 widened) */
                int8_t raw[row_bytes] __attribute__((aligned(4)));
                memset(raw, params[P_ZP_IN], (size_t)row_bytes);
                const int k0 = x0 < 0 ? -x0 : 0, k1 = W - x0 < KW ? W - x0 : KW;
                if (k1 > k0)
                    memcpy(raw + k0 * C, row + (x0 + k0) * C, (size_t)((k1 - k0) * C));
                for (int q = 0; q < row_bytes; q += 4, dst += step)
                    widen4_at(raw + q, offset, dst, hi);
                continue;
            }
            for (int q = 0; q < row_bytes; q += 4, dst += step)
                widen4_at(row + x0 * C + q, offset, dst, hi);
        }
        return;
    }
    /* other depths: the patch's bytes in k order first (padding = the input zero point, which the offset
       turns into 0), then whole quads widened as above */
    const int K = KH * KW * C, quads = (K + 3) / 4;
    int8_t raw[quads * 4] __attribute__((aligned(4)));
    int8_t *r = raw;
    for (int ky = 0; ky < KH; ky++) {
        const int iy = y0 + ky * DH;
        const int row_inside = iy >= 0 && iy < H;
        const int8_t *src_row = in + iy * W * C;
        if (row_inside && DW == 1 && x0 >= 0 && x0 + KW <= W) { /* the tap row is contiguous in the input */
            copy_small(r, src_row + x0 * C, KW * C);
            r += KW * C;
            continue;
        }
        for (int kx = 0; kx < KW; kx++, r += C) {
            const int ix = x0 + kx * DW;
            if (row_inside && ix >= 0 && ix < W)
                copy_small(r, src_row + ix * C, C);
            else
                memset(r, params[P_ZP_IN], (size_t)C);
        }
    }
    memset(r, params[P_ZP_IN], (size_t)(quads * 4 - K));
    for (int q = 0; q < quads; q++, dst += step)
        widen4_at(raw + q * 4, offset, dst, hi);
}

/* pixel `pixel` of a pair's patch: [quad][pixel 0..1][k0 k2 | k1 k3] */
static void gather_patch(const int8_t *in, const int32_t *params, int oy, int ox, int pixel, int16_t *patch)
{
    gather_into(in, params, oy, ox, patch + pixel * 4, 8, 2);
}



/* The loop of the 2x2 products: `quad` twice per pass (n = quads / 2), once before it when quads is odd. */
#define TINYMLAAS_TWO_QUADS_PER_PASS(quad)                                                                \
    "lsrs %[n], %[n], #1\n\t"                                                                             \
    "bcc 1f\n\t" quad                                                                                     \
    "1:\n\t"                                                                                              \
    "cmp %[n], #0\n\t"                                                                                    \
    "beq 3f\n\t"                                                                                          \
    "2:\n\t" quad quad                                                                                    \
    "subs %[n], %[n], #1\n\t"                                                                             \
    "bne 2b\n\t"                                                                                          \
    "3:\n\t"

/*
 * Without DSP (RV32, Cortex-M0/M3) the same products in C, with scalar accumulators so that each input and weight
 * is loaded once for all the products it takes part in. k's patch slot: lane_of[k] (int8 weights are in k order,
 * int16 ones already in the patch's lane order).
 */
static inline __attribute__((always_inline)) int slot(int wide, int k)
{
    return wide ? k : lane_of[k];
}

static inline __attribute__((always_inline)) int32_t weight(const void *weights, int wide, int i)
{
    return wide ? ((const int16_t *)weights)[i] : ((const int8_t *)weights)[i];
}

/* 2 pixels x 2 channels (the gemm), weights [quad][channel 0..1][4] */
static inline __attribute__((always_inline)) void mac2x2_scalar(const int16_t *patch, const void *weights, int wide,
                                                                int quads, int32_t acc[4])
{
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0;
    for (int q = 0; q < quads; q++, patch += 8) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const int32_t x0 = patch[slot(wide, k)], x1 = patch[4 + slot(wide, k)];
            const int32_t w0 = weight(weights, wide, q * 8 + k), w1 = weight(weights, wide, q * 8 + 4 + k);
            a00 += x0 * w0, a01 += x0 * w1, a10 += x1 * w0, a11 += x1 * w1;
        }
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

/* the same with 4-bit weights, [quad][k0 k1 k2 k3] bytes of channel 0 | channel 1 << 4: each nibble taken as 16 x
   its value (a sign-extended byte with its low nibble cleared, and the low nibble shifted up), one or two
   operations per weight instead of a load; the sums are 16 x the products' and shifted back (exact) */
static inline __attribute__((always_inline)) void mac2x2_scalar_w4(const int16_t *patch, const int8_t *weights,
                                                                   int quads, int32_t acc[4])
{
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0;
    for (int q = 0; q < quads; q++, patch += 8, weights += 4) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const int32_t b = weights[k], x0 = patch[lane_of[k]], x1 = patch[4 + lane_of[k]];
            const int32_t w0 = (int32_t)((uint32_t)b << 28) >> 24, w1 = b & ~15;
            a00 += x0 * w0, a01 += x0 * w1, a10 += x1 * w0, a11 += x1 * w1;
        }
    }
    acc[0] = a00 >> 4, acc[1] = a01 >> 4, acc[2] = a10 >> 4, acc[3] = a11 >> 4;
}

/* 1 pixel x 4 channels (the gemv), weights [quad][channel 0..3][4] */
static inline __attribute__((always_inline)) void mac1x4_scalar(const int16_t *patch, const void *weights, int wide,
                                                                int quads, int32_t acc[4])
{
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int q = 0; q < quads; q++, patch += 4) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const int32_t x = patch[slot(wide, k)];
            a0 += x * weight(weights, wide, q * 16 + k), a1 += x * weight(weights, wide, q * 16 + 4 + k);
            a2 += x * weight(weights, wide, q * 16 + 8 + k), a3 += x * weight(weights, wide, q * 16 + 12 + k);
        }
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

#if defined(__ARM_FEATURE_DSP)
/* One quad of the 2x2 product (pixels 0 and 1 of the patch x channels 0 and 1 of the weights) into
   a<pixel><channel>. int8 weights: two SXTB16 widen each channel's word (k0 k2 | k1 k3, the patch's order). */
#define TINYMLAAS_QUAD_PRODUCTS /* w0, w1: the two channels' int8 words */                               \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t" /* pixel 0 */                                                    \
    "sxtb16 %[w2], %[w0]\n\t"                                                                           \
    "sxtb16 %[w3], %[w0], ror #8\n\t"                                                                   \
    "smlad %[a00], %[xa], %[w2], %[a00]\n\t"                                                            \
    "smlad %[a00], %[xb], %[w3], %[a00]\n\t"                                                            \
    "sxtb16 %[w0], %[w1]\n\t"                                                                           \
    "sxtb16 %[w1], %[w1], ror #8\n\t"                                                                   \
    "smlad %[a01], %[xa], %[w0], %[a01]\n\t"                                                            \
    "smlad %[a01], %[xb], %[w1], %[a01]\n\t"                                                            \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t" /* pixel 1 */                                                    \
    "smlad %[a10], %[xa], %[w2], %[a10]\n\t"                                                            \
    "smlad %[a10], %[xb], %[w3], %[a10]\n\t"                                                            \
    "smlad %[a11], %[xa], %[w0], %[a11]\n\t"                                                            \
    "smlad %[a11], %[xb], %[w1], %[a11]\n\t"
#define TINYMLAAS_QUAD8                                                                                  \
    "ldrd %[w0], %[w1], [%[w]], #8\n\t" /* channel 0 and 1, four weights each */                         \
    TINYMLAAS_QUAD_PRODUCTS
/* 4-bit weights: one word holds both channels' four weights (byte i: channel 0's k_i | channel 1's << 4); each
   channel's nibbles masked into the high nibbles (m = 0xF0F0F0F0 in a register, so that the shift comes with the
   AND) make int8 words of 16 x the values, which the rest of QUAD8 takes as they are: 16 instructions for 16 MACs
   against QUAD8's 15. The sums come out 16 x the products' (exact while 16 x the largest sum fits in 32 bits: the
   compiler checks it) and are shifted back after the loop. */
#define TINYMLAAS_QUAD4                                                                                  \
    "ldr %[w1], [%[w]], #4\n\t"                                                                          \
    "and %[w0], %[m], %[w1], lsl #4\n\t" /* channel 0 */                                                 \
    "and %[w1], %[w1], %[m]\n\t"         /* channel 1 */                                                 \
    TINYMLAAS_QUAD_PRODUCTS
/* the 4-bit loops' sums back to the products' (exact: every term is a multiple of 16) */
#define TINYMLAAS_UNSCALE4                                                                               \
    "asr %[a00], %[a00], #4\n\t"                                                                         \
    "asr %[a01], %[a01], #4\n\t"                                                                         \
    "asr %[a10], %[a10], #4\n\t"                                                                         \
    "asr %[a11], %[a11], #4\n\t"
/* int16 weights: one LDM (w0..w3 in ascending registers) loads both channels' four weights */
#define TINYMLAAS_QUAD16                                                                                 \
    "ldmia %[w]!, {%[w0], %[w1], %[w2], %[w3]}\n\t"                                                      \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t"                                                                  \
    "smlad %[a00], %[xa], %[w0], %[a00]\n\t"                                                             \
    "smlad %[a00], %[xb], %[w1], %[a00]\n\t"                                                             \
    "smlad %[a01], %[xa], %[w2], %[a01]\n\t"                                                             \
    "smlad %[a01], %[xb], %[w3], %[a01]\n\t"                                                             \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t"                                                                  \
    "smlad %[a10], %[xa], %[w0], %[a10]\n\t"                                                             \
    "smlad %[a10], %[xb], %[w1], %[a10]\n\t"                                                             \
    "smlad %[a11], %[xa], %[w2], %[a11]\n\t"                                                             \
    "smlad %[a11], %[xb], %[w3], %[a11]\n\t"
#define TINYMLAAS_QUAD_OPERANDS                                                                          \
    [a00] "+r"(a00), [a01] "+r"(a01), [a10] "+r"(a10), [a11] "+r"(a11), [xa] "=&r"(xa), [xb] "=&r"(xb),    \
        [w0] "=&r"(w0), [w1] "=&r"(w1), [w2] "=&r"(w2), [w3] "=&r"(w3), [x] "+r"(x), [w] "+r"(w),         \
        [n] "+r"(n)

/* acc[pixel * 2 + channel] = sum over quads of patch x weights (2 pixels x 2 channels) */
#define TINYMLAAS_MAC2X2(name, wtype, quad, unscale, ...)                                                  \
    static inline __attribute__((always_inline)) void name(const int16_t *patch, const wtype *weights,      \
                                                           int quads, int32_t acc[4])                       \
    {                                                                                                       \
        register int32_t w0 __asm__("r8"), w1 __asm__("r9"), w2 __asm__("r10"), w3 __asm__("r11");          \
        int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, xa, xb;                                                 \
        const int16_t *x = patch;                                                                           \
        const wtype *w = weights;                                                                           \
        int n = quads;                                                                                      \
        __asm__ volatile(TINYMLAAS_TWO_QUADS_PER_PASS(quad) unscale                                         \
                         : TINYMLAAS_QUAD_OPERANDS : __VA_ARGS__ : "cc", "memory");                         \
        acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;                                             \
    }
TINYMLAAS_MAC2X2(mac2x2_w8, int8_t, TINYMLAAS_QUAD8, "")
TINYMLAAS_MAC2X2(mac2x2_w16, int16_t, TINYMLAAS_QUAD16, "")
TINYMLAAS_MAC2X2(mac2x2_w4, int8_t, TINYMLAAS_QUAD4, TINYMLAAS_UNSCALE4, [m] "r"(0xF0F0F0F0u))

/*
 * The same for `pairs` channel pairs in one loop, every register pinned (the compiler, given the loop in C,
 * reloaded the pointers from the stack for each pair): run[4 * k ...] = channel 2k x pixels 0, 1, then
 * channel 2k + 1 x pixels 0, 1 (STM stores a00 a10 a01 a11 in that order: ascending registers).
 */
#define TINYMLAAS_PRODUCTS(name, wtype, quad)                                                              \
    static __attribute__((noinline)) void name(const int16_t *patch, const wtype *weights, int quads,      \
                                               int pairs, int32_t *run)                                    \
    {                                                                                                       \
        register const int16_t *x __asm__("r0");                                                            \
        register const wtype *w __asm__("r1") = weights;                                                    \
        register int32_t a00 __asm__("r2"), a10 __asm__("r3"), a01 __asm__("r4"), a11 __asm__("r5");        \
        register int32_t xa __asm__("r6"), xb __asm__("r7");                                                \
        register int32_t w0 __asm__("r8"), w1 __asm__("r9"), w2 __asm__("r10"), w3 __asm__("r11");          \
        register int n __asm__("r12");                                                                      \
        register int32_t *out __asm__("lr") = run;                                                          \
        const int32_t *const end = run + 4 * pairs;                                                         \
        __asm__ volatile("4:\n\t"                                                                           \
                         "movs %[a00], #0\n\t"                                                              \
                         "movs %[a10], #0\n\t"                                                              \
                         "movs %[a01], #0\n\t"                                                              \
                         "movs %[a11], #0\n\t"                                                              \
                         "ldr %[x], %[patch]\n\t"                                                           \
                         "ldr %[n], %[quads]\n\t" TINYMLAAS_TWO_QUADS_PER_PASS(quad)                        \
                         "stmia %[out]!, {%[a00], %[a10], %[a01], %[a11]}\n\t"                              \
                         "ldr %[xa], %[end]\n\t"                                                            \
                         "cmp %[out], %[xa]\n\t"                                                            \
                         "bne 4b\n\t"                                                                       \
                         : TINYMLAAS_QUAD_OPERANDS, [out] "+r"(out)                                         \
                         : [patch] "m"(patch), [quads] "m"(quads), [end] "m"(end)                           \
                         : "cc", "memory");                                                                 \
    }
TINYMLAAS_PRODUCTS(products_w8, int8_t, TINYMLAAS_QUAD8)
TINYMLAAS_PRODUCTS(products_w16, int16_t, TINYMLAAS_QUAD16)

/* the same with 4-bit weights: the mask takes lr, so the output pointer lives in memory (two more instructions a
   channel pair, one fewer a quad) */
static __attribute__((noinline)) void products_w4(const int16_t *patch, const int8_t *weights, int quads, int pairs,
                                                  int32_t *run)
{
    register const int16_t *x __asm__("r0");
    register const int8_t *w __asm__("r1") = weights;
    register int32_t a00 __asm__("r2"), a10 __asm__("r3"), a01 __asm__("r4"), a11 __asm__("r5");
    register int32_t xa __asm__("r6"), xb __asm__("r7");
    register int32_t w0 __asm__("r8"), w1 __asm__("r9"), w2 __asm__("r10"), w3 __asm__("r11");
    register int n __asm__("r12");
    register uint32_t m __asm__("lr") = 0xF0F0F0F0u;
    int32_t *out = run;
    const int32_t *const end = run + 4 * pairs;
    __asm__ volatile("4:\n\t"
                     "movs %[a00], #0\n\t"
                     "movs %[a10], #0\n\t"
                     "movs %[a01], #0\n\t"
                     "movs %[a11], #0\n\t"
                     "ldr %[x], %[patch]\n\t"
                     "ldr %[n], %[quads]\n\t" TINYMLAAS_TWO_QUADS_PER_PASS(TINYMLAAS_QUAD4) TINYMLAAS_UNSCALE4
                     "ldr %[xa], %[out]\n\t"
                     "stmia %[xa]!, {%[a00], %[a10], %[a01], %[a11]}\n\t"
                     "str %[xa], %[out]\n\t"
                     "ldr %[xb], %[end]\n\t"
                     "cmp %[xa], %[xb]\n\t"
                     "bne 4b\n\t"
                     : TINYMLAAS_QUAD_OPERANDS, [out] "+m"(out)
                     : [patch] "m"(patch), [quads] "m"(quads), [end] "m"(end), [m] "r"(m)
                     : "cc", "memory");
}
#else
static inline __attribute__((always_inline)) void mac2x2_w8(const int16_t *patch, const int8_t *weights, int quads,
                                                            int32_t acc[4])
{
    mac2x2_scalar(patch, weights, 0, quads, acc);
}

static inline __attribute__((always_inline)) void mac2x2_w16(const int16_t *patch, const int16_t *weights, int quads,
                                                             int32_t acc[4])
{
    mac2x2_scalar(patch, weights, 1, quads, acc);
}

static inline __attribute__((always_inline)) void mac2x2_w4(const int16_t *patch, const int8_t *weights, int quads,
                                                            int32_t acc[4])
{
    mac2x2_scalar_w4(patch, weights, quads, acc);
}
#endif

#if defined(__ARM_FEATURE_DSP)
/* Double rounding without a clamp, for n channels of two pixels: acc[2 * ch + pixel], doubled and biased here.
   In asm because all of a channel's values then stay in registers (the compiler spilled the output pointers:
   51 instructions per two channels in C, 38 here). */
static void requantize_run(const int32_t *acc, const struct tinymlaas_rq *rq, int n, int8_t *out0, int8_t *out1)
{
    int32_t a0, a1, bias, mult, round, shift;
    __asm__ volatile(
        "1:\n\t"
        "ldrd %[a0], %[a1], [%[acc]], #8\n\t"
        "ldrd %[bias], %[mult], [%[rq]], #8\n\t"
        "ldrd %[round], %[shift], [%[rq]], #8\n\t"
        "add %[a0], %[bias], %[a0], lsl #1\n\t"
        "add %[a1], %[bias], %[a1], lsl #1\n\t"
        "smmulr %[a0], %[a0], %[mult]\n\t"
        "smmulr %[a1], %[a1], %[mult]\n\t"
        "add %[bias], %[round], %[a0]\n\t" /* x + round - (x < 0) */
        "sub %[bias], %[bias], %[a0], lsr #31\n\t"
        "asr %[bias], %[bias], %[shift]\n\t"
        "ssat %[bias], #8, %[bias]\n\t"
        "strb %[bias], [%[out0]], #1\n\t"
        "add %[round], %[round], %[a1]\n\t"
        "sub %[round], %[round], %[a1], lsr #31\n\t"
        "asr %[round], %[round], %[shift]\n\t"
        "ssat %[round], #8, %[round]\n\t"
        "strb %[round], [%[out1]], #1\n\t"
        "subs %[n], %[n], #1\n\t"
        "bne 1b\n\t"
        : [a0] "=&r"(a0), [a1] "=&r"(a1), [bias] "=&r"(bias), [mult] "=&r"(mult), [round] "=&r"(round),
          [shift] "=&r"(shift), [acc] "+r"(acc), [rq] "+r"(rq), [n] "+r"(n), [out0] "+r"(out0), [out1] "+r"(out1)
        :
        : "cc", "memory");
}
#endif

/* the 2x2 product of a channel pair; wide: the weights' width (0: int8, 1: int16, 2 and 3: 4-bit) */
static inline __attribute__((always_inline)) void mac2x2(const int16_t *patch, const uint8_t *w, int wide, int quads,
                                                         int32_t acc[4])
{
    if (wide >= 2)
        mac2x2_w4(patch, (const int8_t *)w, quads, acc);
    else if (wide)
        mac2x2_w16(patch, (const int16_t *)w, quads, acc);
    else
        mac2x2_w8(patch, (const int8_t *)w, quads, acc);
}

/* requantize(), or with `left` (a 4-bit layer's table: its 4-bit scales push some multipliers to 1/2 or more, where
   TFLite shifts left before its high multiply: both roundings are then one SMMULR) a row of such a multiplier, stored
   with shift -(k + 1) and round zp_out (tinymlaas/ops/dsp_layouts.py requant_table, left) */
static inline __attribute__((always_inline)) int8_t requantize_left(int32_t acc, const struct tinymlaas_rq *q, int left,
                                                                    int single, int clamp, int32_t lo, int32_t hi)
{
    if (left && q->shift < 0)
        return saturate(smmulr((int32_t)((uint32_t)(acc + q->bias) << (-q->shift - 1)), q->mult) + q->round, clamp,
                        lo, hi);
    return requantize(acc, q, single, clamp, lo, hi);
}

/* two pixels' outputs for all OC channels (out1 == out0: one pixel in both lanes); wide: as mac2x2's, 3: 4-bit with
   rows of a left shift in the table */
static inline __attribute__((always_inline)) void gemm_pixels(const int16_t *patch, const void *weights,
                                                              const struct tinymlaas_rq *rq, int quads, int OC,
                                                              int8_t *out0, int8_t *out1, int wide, int single,
                                                              int clamp, int32_t lo, int32_t hi)
{
    const uint8_t *w = weights;
    const int step = quads * (wide >= 2 ? 4 : wide ? 16 : 8); /* bytes of one channel pair */
    const int left = wide == 3;
    int32_t acc[4];
    int oc = 0;
#if defined(__ARM_FEATURE_DSP)
    if (!single && !clamp && !left) { /* the products of up to 32 channels, then their requantization in one run */
        enum { CHUNK = 32 };
        int32_t run[2 * CHUNK] __attribute__((aligned(8)));
        for (int oc0 = 0; oc0 < OC; oc0 += CHUNK) {
            const int n = OC - oc0 < CHUNK ? OC - oc0 : CHUNK;
            const int pairs = (n + 1) / 2; /* an odd last channel's partner: zero weights, not stored */
            if (wide >= 2)
                products_w4(patch, (const int8_t *)w, quads, pairs, run);
            else if (wide)
                products_w16(patch, (const int16_t *)w, quads, pairs, run);
            else
                products_w8(patch, (const int8_t *)w, quads, pairs, run);
            w += pairs * step;
            requantize_run(run, rq + oc0, n, out0 + oc0, out1 + oc0);
        }
        return;
    }
#endif
    for (; oc + 2 <= OC; oc += 2, w += step) {
        mac2x2(patch, w, wide, quads, acc);
        const struct tinymlaas_rq r0 = rq[oc], r1 = rq[oc + 1]; /* loaded once: the stores could alias them */
        out0[oc] = requantize_left(acc[0], &r0, left, single, clamp, lo, hi);
        out0[oc + 1] = requantize_left(acc[1], &r1, left, single, clamp, lo, hi);
        out1[oc] = requantize_left(acc[2], &r0, left, single, clamp, lo, hi);
        out1[oc + 1] = requantize_left(acc[3], &r1, left, single, clamp, lo, hi);
    }
    if (oc < OC) { /* odd OC: the pair's second channel is zero padding */
        mac2x2(patch, w, wide, quads, acc);
        out0[oc] = requantize_left(acc[0], rq + oc, left, single, clamp, lo, hi);
        out1[oc] = requantize_left(acc[2], rq + oc, left, single, clamp, lo, hi);
    }
}

#define TINYMLAAS_PIXELS(name, wide, single, clamp)                                                             \
    static __attribute__((noinline)) void name(const int16_t *patch, const void *weights,                      \
                                               const struct tinymlaas_rq *rq, int quads, int OC, int8_t *out0, \
                                               int8_t *out1, int32_t lo, int32_t hi)                           \
    {                                                                                                           \
        gemm_pixels(patch, weights, rq, quads, OC, out0, out1, wide, single, clamp, lo, hi);                    \
    }
TINYMLAAS_PIXELS(pixels_w8_d, 0, 0, 0)
TINYMLAAS_PIXELS(pixels_w8_dc, 0, 0, 1)
TINYMLAAS_PIXELS(pixels_w8_s, 0, 1, 0)
TINYMLAAS_PIXELS(pixels_w8_sc, 0, 1, 1)
TINYMLAAS_PIXELS(pixels_w16_d, 1, 0, 0)
TINYMLAAS_PIXELS(pixels_w16_dc, 1, 0, 1)
TINYMLAAS_PIXELS(pixels_w16_s, 1, 1, 0)
TINYMLAAS_PIXELS(pixels_w16_sc, 1, 1, 1)
TINYMLAAS_PIXELS(pixels_w4_d, 2, 0, 0)
TINYMLAAS_PIXELS(pixels_w4_dc, 2, 0, 1)
TINYMLAAS_PIXELS(pixels_w4_s, 2, 1, 0)
TINYMLAAS_PIXELS(pixels_w4_sc, 2, 1, 1)
TINYMLAAS_PIXELS(pixels_w4l_d, 3, 0, 0)
TINYMLAAS_PIXELS(pixels_w4l_dc, 3, 0, 1)
TINYMLAAS_PIXELS(pixels_w4l_s, 3, 1, 0)
TINYMLAAS_PIXELS(pixels_w4l_sc, 3, 1, 1)
#undef TINYMLAAS_PIXELS

typedef void (*pixels_fn)(const int16_t *, const void *, const struct tinymlaas_rq *, int, int, int8_t *, int8_t *,
                          int32_t, int32_t);

static inline __attribute__((always_inline)) void gemm_layer(const int8_t *input, const void *weights,
                                                             const struct tinymlaas_rq *rq, const int32_t *params,
                                                             int8_t *output, int16_t *patch, int quads, int wide,
                                                             int single, int clamp)
{
    static const pixels_fn table[8] = {pixels_w8_d,  pixels_w8_dc,  pixels_w8_s,  pixels_w8_sc,
                                       pixels_w16_d, pixels_w16_dc, pixels_w16_s, pixels_w16_sc};
    /* tables of their own: a 4-bit entry point links only its own loops */
    static const pixels_fn table4[4] = {pixels_w4_d, pixels_w4_dc, pixels_w4_s, pixels_w4_sc};
    static const pixels_fn table4l[4] = {pixels_w4l_d, pixels_w4l_dc, pixels_w4l_s, pixels_w4l_sc};
    const pixels_fn pixels = wide == 3   ? table4l[single * 2 + clamp]
                             : wide == 2 ? table4[single * 2 + clamp]
                                         : table[wide * 4 + single * 2 + clamp];
    const int OH = params[P_OH], OW = params[P_OW], OC = params[P_OC];
    const int P = params[P_N] * OH * OW, image = params[P_H] * params[P_W] * params[P_C];
    const int32_t lo = params[P_ACT_MIN], hi = params[P_ACT_MAX];
    const int C = params[P_C];
    const int OS = params[P_OUT_STRIDE] ? params[P_OUT_STRIDE] : OC; /* output pixel to pixel */
    if (params[P_KH] == 1 && params[P_KW] == 1 && params[P_SH] == 1 && params[P_SW] == 1 && params[P_PT] == 0 &&
        params[P_PL] == 0 && C % 4 == 0) { /* pointwise: pixel q's patch is the input's q-th run of C */
        const int32_t offset = -params[P_ZP_IN];
        for (int p = 0; p < P; p += 2) {
            const int8_t *src0 = input + p * C, *src1 = p + 1 < P ? src0 + C : src0;
            int16_t *dst = patch;
            for (int c = 0; c < C; c += 4, dst += 8) {
                widen4(src0 + c, offset, dst);
                widen4(src1 + c, offset, dst + 4);
            }
            pixels(patch, weights, rq, quads, OC, output + p * OS, output + (p + 1 < P ? p + 1 : p) * OS, lo, hi);
        }
        return;
    }
    for (int p = 0; p < P; p += 2) {
        const int two = p + 1 < P;
        for (int j = 0; j < 2; j++) {
            const int q = two ? p + j : p; /* a lone last pixel fills both lanes */
            const int n = q / (OH * OW), oy = q / OW % OH, ox = q % OW;
            gather_patch(input + n * image, params, oy, ox, j, patch);
        }
        pixels(patch, weights, rq, quads, OC, output + p * OS, output + (two ? p + 1 : p) * OS, lo, hi);
    }
}

/* constant flags: each combination gets its own copy of the loops */
#define TINYMLAAS_DISPATCH(layer, wide, ...)                                                              \
    do {                                                                                                  \
        const int clamp_ = params[P_ACT_MIN] > -128 || params[P_ACT_MAX] < 127;                           \
        if (params[P_SINGLE])                                                                             \
            clamp_ ? layer(__VA_ARGS__, wide, 1, 1) : layer(__VA_ARGS__, wide, 1, 0);                     \
        else                                                                                              \
            clamp_ ? layer(__VA_ARGS__, wide, 0, 1) : layer(__VA_ARGS__, wide, 0, 0);                     \
    } while (0)

/* An exported entry: the patch on the stack (measured with the rest), the layer's loops for its weights (0: int8,
   1: int16, 2: 4-bit, 3: 4-bit with rows of a left shift); `io` is `restrict`, or nothing for the in-place twin. */
#define TINYMLAAS_GEMM_ENTRY(name, wtype, kind, io)                                                       \
    void name(const int8_t *io input, const wtype *restrict weights, const struct tinymlaas_rq *restrict rq, \
              const int32_t *restrict params, int8_t *io output)                                            \
    {                                                                                                     \
        const int quads = (params[P_KH] * params[P_KW] * tap_depth(params[P_C]) + 3) / 4;                 \
        int16_t patch[quads * 8] __attribute__((aligned(8)));                                             \
        TINYMLAAS_DISPATCH(gemm_layer, kind, input, weights, rq, params, output, patch, quads);            \
    }

TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w8, int8_t, 0, restrict)
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w16, int16_t, 1, restrict)
/* 4-bit weights (--weights int4), read in the loop: no unpacked copy in RAM. _w4l: the table has rows of a left
   shift (negative shift: a multiplier of 1/2 or more), requantized in C, never in requantize_run (the compiler
   names the variant, so that a model links only the loops it calls). */
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w4, int8_t, 2, restrict)
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w4l, int8_t, 3, restrict)

/*
 * In-place twins (here and below): the same loops without `restrict` on input and output, which the memory planner
 * (tinymlaas/ir/memory.py) may overlap, the output behind the input's read front by a distance it derives from this
 * loop order: a pair of pixels is gathered whole before its outputs are written, pixels in raster order.
 */
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w8_inplace, int8_t, 0, )
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w16_inplace, int16_t, 1, )
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w4_inplace, int8_t, 2, )
TINYMLAAS_GEMM_ENTRY(tinymlaas_gemm_w4l_inplace, int8_t, 3, )
#undef TINYMLAAS_GEMM_ENTRY

#if defined(__ARM_FEATURE_DSP) /* the compiler offers these kernels on DSP cores only */
/*
 * Four pixels at a time, int16 weights: two channels x four pixels in eight accumulators, so that each loaded word
 * takes part in four products where the 2x2 loop's takes part in two. A quad costs six LDRD and sixteen SMLAD
 * (34 cycles for 32 MACs by the Cortex-M4 TRM's load timing; the 2x2 loop: 19 for 16, its LDM of four weights
 * included). With every register an operand, the loop ends on the patch pointer against its end in memory.
 * The weights are doubled, so the accumulators start at the table's bias (2 * TFLite's, proven not to overflow)
 * and end as requantize_run's doubled sum: the eight are requantized in their registers right after the loop.
 *   patch   [quad][k0 k2 | k1 k3][pixel 0..3]            int16 pairs (gather_patch4)
 *   weights [OC/2][quad][k0 k2 | k1 k3][channel 0..1]    int16 pairs, doubled (tinymlaas/ops/dsp_layouts.py)
 *   requant [OC rounded up to even][bias, multiplier, round, shift]
 */
#define TINYMLAAS_G4_CHUNK 32 /* channels per call: the staging rows' length */
#define TINYMLAAS_HALF4                                                                                   \
    "ldrd %[w0], %[w1], [%[w]], #8\n\t" /* channels 0 and 1 */                                            \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t" /* pixels 0 and 1 */                                              \
    "smlad %[a00], %[xa], %[w0], %[a00]\n\t"                                                              \
    "smlad %[a10], %[xa], %[w1], %[a10]\n\t"                                                              \
    "smlad %[a01], %[xb], %[w0], %[a01]\n\t"                                                              \
    "smlad %[a11], %[xb], %[w1], %[a11]\n\t"                                                              \
    "ldrd %[xa], %[xb], [%[x]], #8\n\t" /* pixels 2 and 3 */                                              \
    "smlad %[a02], %[xa], %[w0], %[a02]\n\t"                                                              \
    "smlad %[a12], %[xa], %[w1], %[a12]\n\t"                                                              \
    "smlad %[a03], %[xb], %[w0], %[a03]\n\t"                                                              \
    "smlad %[a13], %[xb], %[w1], %[a13]\n\t"
#define TINYMLAAS_QUAD4 TINYMLAAS_HALF4 TINYMLAAS_HALF4
/* double rounding of a doubled, biased sum in its register: (smmulr(a, mult) + round - (x < 0)) >> shift,
   saturated (xa = multiplier, xb = round, w0 = shift, w1 scratch) */
#define TINYMLAAS_REQ(a)                                                                                  \
    "smmlar %[w1], %[" a "], %[xa], %[xb]\n\t"                                                            \
    "smmulr %[" a "], %[" a "], %[xa]\n\t"                                                                \
    "add %[w1], %[w1], %[" a "], asr #31\n\t"                                                             \
    "asr %[w1], %[w1], %[w0]\n\t"                                                                         \
    "ssat %[" a "], #8, %[w1]\n\t"
#define TINYMLAAS_STR(s) #s
#define TINYMLAAS_XSTR(s) TINYMLAAS_STR(s)
#define TINYMLAAS_ROW(j, c) TINYMLAAS_XSTR(j * TINYMLAAS_G4_CHUNK + c)

/*
 * `pairs` channel pairs x four pixels, requantized: stage[j * TINYMLAAS_G4_CHUNK + ch] = pixel j's output of
 * channel ch (the caller copies the rows out, clamping them where the activation asks).
 */
static __attribute__((noinline)) void products4(const int16_t *patch, const int16_t *weights,
                                                const struct tinymlaas_rq *rq, int quads, int pairs, int8_t *stage)
{
    register const int16_t *x __asm__("r0");
    register const int16_t *w __asm__("r1") = weights;
    register int32_t a00 __asm__("r2"), a01 __asm__("r3"), a10 __asm__("r4"), a11 __asm__("r5");
    register int32_t a02 __asm__("r6"), a03 __asm__("r7"), a12 __asm__("r8"), a13 __asm__("r9");
    register int32_t xa __asm__("r10"), xb __asm__("r11"), w0 __asm__("r12"), w1 __asm__("lr");
    const int16_t *const end = patch + quads * 16;
    const int odd = quads & 1;
    int8_t *const stop = stage + 2 * pairs;
    __asm__ volatile("4:\n\t"
                     "ldr %[xa], %[rq]\n\t"
                     "ldr %[xb], [%[xa]]\n\t"      /* channel 0's bias */
                     "ldr %[w0], [%[xa], #16]\n\t" /* channel 1's */
                     "mov %[a00], %[xb]\n\t"
                     "mov %[a01], %[xb]\n\t"
                     "mov %[a02], %[xb]\n\t"
                     "mov %[a03], %[xb]\n\t"
                     "mov %[a10], %[w0]\n\t"
                     "mov %[a11], %[w0]\n\t"
                     "mov %[a12], %[w0]\n\t"
                     "mov %[a13], %[w0]\n\t"
                     "ldr %[x], %[patch]\n\t"
                     "ldr %[xa], %[odd]\n\t"
                     "cmp %[xa], #0\n\t"
                     "beq 1f\n\t" TINYMLAAS_QUAD4
                     "1:\n\t"
                     "ldr %[xa], %[end]\n\t"
                     "cmp %[x], %[xa]\n\t"
                     "beq 3f\n\t"
                     "2:\n\t" TINYMLAAS_QUAD4 TINYMLAAS_QUAD4
                     "ldr %[xa], %[end]\n\t"
                     "cmp %[x], %[xa]\n\t"
                     "bne 2b\n\t"
                     "3:\n\t"
                     "ldr %[x], %[rq]\n\t"
                     "ldrd %[xa], %[xb], [%[x], #4]\n\t" /* channel 0: multiplier, round */
                     "ldr %[w0], [%[x], #12]\n\t"        /* shift */
                     TINYMLAAS_REQ("a00") TINYMLAAS_REQ("a01") TINYMLAAS_REQ("a02") TINYMLAAS_REQ("a03")
                     "ldrd %[xa], %[xb], [%[x], #20]\n\t" /* channel 1 */
                     "ldr %[w0], [%[x], #28]\n\t"
                     TINYMLAAS_REQ("a10") TINYMLAAS_REQ("a11") TINYMLAAS_REQ("a12") TINYMLAAS_REQ("a13")
                     "add %[x], %[x], #32\n\t"
                     "str %[x], %[rq]\n\t"
                     "ldr %[x], %[stage]\n\t"
                     "strb %[a00], [%[x], #" TINYMLAAS_ROW(0, 0) "]\n\t"
                     "strb %[a01], [%[x], #" TINYMLAAS_ROW(1, 0) "]\n\t"
                     "strb %[a02], [%[x], #" TINYMLAAS_ROW(2, 0) "]\n\t"
                     "strb %[a03], [%[x], #" TINYMLAAS_ROW(3, 0) "]\n\t"
                     "strb %[a10], [%[x], #" TINYMLAAS_ROW(0, 1) "]\n\t"
                     "strb %[a11], [%[x], #" TINYMLAAS_ROW(1, 1) "]\n\t"
                     "strb %[a12], [%[x], #" TINYMLAAS_ROW(2, 1) "]\n\t"
                     "strb %[a13], [%[x], #" TINYMLAAS_ROW(3, 1) "]\n\t"
                     "add %[x], %[x], #2\n\t"
                     "str %[x], %[stage]\n\t"
                     "ldr %[xa], %[stop]\n\t"
                     "cmp %[x], %[xa]\n\t"
                     "bne 4b\n\t"
                     : [a00] "=&r"(a00), [a01] "=&r"(a01), [a10] "=&r"(a10), [a11] "=&r"(a11), [a02] "=&r"(a02),
                       [a03] "=&r"(a03), [a12] "=&r"(a12), [a13] "=&r"(a13), [xa] "=&r"(xa), [xb] "=&r"(xb),
                       [w0] "=&r"(w0), [w1] "=&r"(w1), [x] "=&r"(x), [w] "+r"(w), [rq] "+m"(rq), [stage] "+m"(stage)
                     : [patch] "m"(patch), [end] "m"(end), [odd] "m"(odd), [stop] "m"(stop)
                     : "cc", "memory");
}
#undef TINYMLAAS_ROW
#undef TINYMLAAS_XSTR
#undef TINYMLAAS_STR
#undef TINYMLAAS_REQ
#undef TINYMLAAS_QUAD4
#undef TINYMLAAS_HALF4

/* a staging row (word aligned) out to the output: sixteen bytes per LDM/STM where the output is word aligned
   (10 cycles by the Cortex-M4 TRM), else a word at a time; the compiler, left to a loop, would call the library's
   memcpy, which copies bytes one by one */
static inline __attribute__((always_inline, optimize("no-tree-loop-distribute-patterns"))) void
copy_row(int8_t *out, const int8_t *row, int n)
{
    int i = 0;
    if (((uintptr_t)out & 3) == 0)
        for (; i + 16 <= n; i += 16)
            __asm__ volatile("ldmia %1, {r4, r5, r6, r8}\n\t" /* r7: the frame pointer */
                             "stmia %0, {r4, r5, r6, r8}\n\t"
                             :
                             : "r"(out + i), "r"(row + i)
                             : "r4", "r5", "r6", "r8", "memory");
#if defined(__ARM_FEATURE_UNALIGNED)
    for (; i + 4 <= n; i += 4) {
        uint32_t v = *(const uint32_t *)(const void *)(row + i);
        __asm__ volatile("str %1, [%0]" : : "r"(out + i), "r"(v) : "memory"); /* an unaligned word store */
    }
#endif
    for (; i < n; i++)
        out[i] = row[i];
}

/* pixel `pixel` of a group's patch: [quad][k0 k2 | k1 k3][pixel 0..3] */
static void gather_patch4(const int8_t *in, const int32_t *params, int oy, int ox, int pixel, int16_t *patch)
{
    gather_into(in, params, oy, ox, patch + pixel * 2, 16, 8);
}

/* four pixels' channels (C a multiple of 4) into a group's patch: [quad][k0 k2 | k1 k3][pixel 0..3] */
static inline __attribute__((always_inline)) void widen_pixels4(const int8_t *s0, const int8_t *s1,
                                                                const int8_t *s2, const int8_t *s3, int C,
                                                                int32_t offset, int16_t *patch)
{
    for (int c = 0; c < C; c += 4, patch += 16) {
        widen4_at(s0 + c, offset, patch, 8);
        widen4_at(s1 + c, offset, patch + 2, 8);
        widen4_at(s2 + c, offset, patch + 4, 8);
        widen4_at(s3 + c, offset, patch + 6, 8);
    }
}

/* The layer four output pixels at a time (a last group of fewer repeats its last pixel: same outputs, written
   again); the requantization proven (double rounding, no overflow), the activation's clamp on the way out. Each
   group's input and output addresses are found once; a window inside the image is widened straight from it. */
static inline __attribute__((always_inline)) void gemm4_layer(const int8_t *input, const int16_t *weights,
                                                              const struct tinymlaas_rq *rq, const int32_t *params,
                                                              int8_t *output, int16_t *patch, int quads)
{
    int8_t stage[4 * TINYMLAAS_G4_CHUNK] __attribute__((aligned(4)));
    const int OH = params[P_OH], OW = params[P_OW], OC = params[P_OC], C = params[P_C];
    const int P = params[P_N] * OH * OW, image = params[P_H] * params[P_W] * C;
    const int32_t lo = params[P_ACT_MIN], hi = params[P_ACT_MAX], offset = -params[P_ZP_IN];
    const int clamp = lo > -128 || hi < 127;
    const int OS = params[P_OUT_STRIDE] ? params[P_OUT_STRIDE] : OC;
    const int pointwise = params[P_KH] == 1 && params[P_KW] == 1 && params[P_SH] == 1 && params[P_SW] == 1 &&
                          params[P_PT] == 0 && params[P_PL] == 0 && C % 4 == 0;
    const int KH = params[P_KH], KW = params[P_KW], SH = params[P_SH], SW = params[P_SW];
    const int dy = params[P_DH] * params[P_W] * C, dx = params[P_DW] * C, D = tap_depth(C);
    const int split = split_rows(C, KW, params[P_DW]);
    const int16_t *const w_end = weights + ((OC + 1) / 2) * quads * 8;
    for (int p = 0; p < P; p += 4) {
        int8_t *out[4];
        const int8_t *src[4];
        for (int j = 0; j < 4; j++) {
            const int q = p + j < P ? p + j : P - 1;
            out[j] = output + q * OS;
            src[j] = input + q * C; /* pointwise: pixel q's patch is the input's q-th run of C */
        }
        if (pointwise) {
            widen_pixels4(src[0], src[1], src[2], src[3], C, offset, patch);
        } else {
            for (int j = 0; j < 4; j++) {
                const int q = p + j < P ? p + j : P - 1;
                const int n = q / (OH * OW), oy = q / OW % OH, ox = q % OW;
                const int y0 = oy * SH - params[P_PT], x0 = ox * SW - params[P_PL];
                if (split && y0 >= 0 && x0 >= 0 && y0 + (KH - 1) * params[P_DH] < params[P_H] &&
                    x0 + KW <= params[P_W])
                    if (KH == 3 && KW * C == 9)
                        gather_split_3x9(input + n * image + (y0 * params[P_W] + x0) * C, dy, offset,
                                         patch + 2 * j);
                    else
                        gather_split(input + n * image + (y0 * params[P_W] + x0) * C, KH, KW * C, dy, offset,
                                     patch + 2 * j, 16, 8);
                else if (inside(params, y0, x0))
                    gather_inside(input + n * image + (y0 * params[P_W] + x0) * C, KH, KW, dy, dx, D, offset,
                                  patch + 2 * j, 16, 8);
                else
                    gather_patch4(input + n * image, params, oy, ox, j, patch);
            }
        }
        const int16_t *w = weights;
        for (int oc0 = 0; w < w_end; oc0 += TINYMLAAS_G4_CHUNK) {
            const int n = OC - oc0 < TINYMLAAS_G4_CHUNK ? OC - oc0 : TINYMLAAS_G4_CHUNK;
            const int pairs = (n + 1) / 2; /* an odd last channel's partner: zero weights, not stored */
            products4(patch, w, rq + oc0, quads, pairs, stage);
            w += pairs * quads * 8;
            for (int j = 0; j < 4; j++) {
                int8_t *o = out[j] + oc0;
                const int8_t *row = stage + j * TINYMLAAS_G4_CHUNK;
                if (clamp)
                    for (int i = 0; i < n; i++)
                        o[i] = (int8_t)(row[i] < lo ? lo : row[i] > hi ? hi : row[i]);
                else
                    copy_row(o, row, n);
            }
        }
    }
}

void tinymlaas_gemm4_w16(const int8_t *restrict input, const int16_t *restrict weights,
                         const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                         int8_t *restrict output)
{
    const int quads = (params[P_KH] * params[P_KW] * tap_depth(params[P_C]) + 3) / 4;
    int16_t patch[quads * 16] __attribute__((aligned(8)));
    gemm4_layer(input, weights, rq, params, output, patch, quads);
}

/* in place: a group's four patches are gathered whole before its outputs are written, groups in raster order */
void tinymlaas_gemm4_w16_inplace(const int8_t *input, const int16_t *restrict weights,
                                 const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                                 int8_t *output)
{
    const int quads = (params[P_KH] * params[P_KW] * tap_depth(params[P_C]) + 3) / 4;
    int16_t patch[quads * 16] __attribute__((aligned(8)));
    gemm4_layer(input, weights, rq, params, output, patch, quads);
}
#endif

#if defined(__ARM_FEATURE_DSP)
/* a word of four int8 weights (k0 k1 k2 k3) into `acc` against the patch's xa = (k0 k2), xb = (k1 k3) */
#define TINYMLAAS_SMLAD_BYTES(word, acc)                                                                  \
    "sxtb16 %[t0], %[" word "]\n\t"                                                                        \
    "sxtb16 %[t1], %[" word "], ror #8\n\t"                                                                \
    "smlad %[" acc "], %[xa], %[t0], %[" acc "]\n\t"                                                       \
    "smlad %[" acc "], %[xb], %[t1], %[" acc "]\n\t"
/* int8 weights: two channels' words in one LDRD */
#define TINYMLAAS_PAIR8(acc_a, acc_b)                                                                     \
    "ldrd %[wa], %[wb], [%[w]], #8\n\t" TINYMLAAS_SMLAD_BYTES("wa", acc_a) TINYMLAAS_SMLAD_BYTES("wb", acc_b)
/* 4-bit weights: one word per channel pair, each channel's nibbles masked into the high nibbles (16 x the value) */
#define TINYMLAAS_PAIR4(acc_a, acc_b)                                                                     \
    "ldr %[wa], [%[w]], #4\n\t"                                                                            \
    "lsl %[wb], %[wa], #4\n\t"                                                                             \
    "and %[wb], %[wb], #0xF0F0F0F0\n\t" /* channel a */                                                     \
    "and %[wa], %[wa], #0xF0F0F0F0\n\t" /* channel b */                                                     \
    TINYMLAAS_SMLAD_BYTES("wb", acc_a) TINYMLAAS_SMLAD_BYTES("wa", acc_b)
/* one pixel x four channels over `quads`, each quad's patch words then two channel pairs read by `pair` */
#define TINYMLAAS_MAC1X4_LOOP(pair)                                                                       \
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, xa, xb, wa, wb, t0, t1;                                       \
    const int16_t *x = patch;                                                                             \
    const int8_t *w = weights;                                                                            \
    int n = quads;                                                                                        \
    __asm__ volatile("1:\n\t"                                                                              \
                     "ldrd %[xa], %[xb], [%[x]], #8\n\t" pair("a0", "a1") pair("a2", "a3")                 \
                     "subs %[n], %[n], #1\n\t"                                                             \
                     "bne 1b\n\t"                                                                          \
                     : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [xa] "=&r"(xa),          \
                       [xb] "=&r"(xb), [wa] "=&r"(wa), [wb] "=&r"(wb), [t0] "=&r"(t0), [t1] "=&r"(t1),      \
                       [x] "+r"(x), [w] "+r"(w), [n] "+r"(n)                                                \
                     :                                                                                    \
                     : "cc", "memory")
#endif

/* acc[j] = patch . weights of channel j, one pixel, four channels, int8 weights */
static inline __attribute__((always_inline)) void mac1x4_w8(const int16_t *patch, const int8_t *weights, int quads,
                                                            int32_t acc[4])
{
#if defined(__ARM_FEATURE_DSP)
    TINYMLAAS_MAC1X4_LOOP(TINYMLAAS_PAIR8);
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
#else
    mac1x4_scalar(patch, weights, 0, quads, acc);
#endif
}

/* the same with int16 weights */
static inline __attribute__((always_inline)) void mac1x4_w16(const int16_t *patch, const int16_t *weights, int quads,
                                                         int32_t acc[4])
{
#if defined(__ARM_FEATURE_DSP)
    register int32_t w0 __asm__("r8"), w1 __asm__("r9"), w2 __asm__("r10"), w3 __asm__("r11");
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, xa, xb;
    const int16_t *x = patch, *w = weights;
    int n = quads;
    __asm__ volatile(
        "1:\n\t"
        "ldrd %[xa], %[xb], [%[x]], #8\n\t"
        "ldmia %[w]!, {%[w0], %[w1], %[w2], %[w3]}\n\t"
        "smlad %[a0], %[xa], %[w0], %[a0]\n\t"
        "smlad %[a0], %[xb], %[w1], %[a0]\n\t"
        "smlad %[a1], %[xa], %[w2], %[a1]\n\t"
        "smlad %[a1], %[xb], %[w3], %[a1]\n\t"
        "ldmia %[w]!, {%[w0], %[w1], %[w2], %[w3]}\n\t"
        "smlad %[a2], %[xa], %[w0], %[a2]\n\t"
        "smlad %[a2], %[xb], %[w1], %[a2]\n\t"
        "smlad %[a3], %[xa], %[w2], %[a3]\n\t"
        "smlad %[a3], %[xb], %[w3], %[a3]\n\t"
        "subs %[n], %[n], #1\n\t"
        "bne 1b\n\t"
        : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [xa] "=&r"(xa), [xb] "=&r"(xb),
          [w0] "=&r"(w0), [w1] "=&r"(w1), [w2] "=&r"(w2), [w3] "=&r"(w3), [x] "+r"(x), [w] "+r"(w), [n] "+r"(n)
        :
        : "cc", "memory");
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
#else
    mac1x4_scalar(patch, weights, 1, quads, acc);
#endif
}

/* the same with 4-bit weights, a word per channel pair and quad: each half of the pair's nibbles masked into the
   high nibbles of a word (16 x the value: SXTB16 then takes them as int8 words, exactly), so the sums come out
   16 x the products' and are shifted back (exact: every term is a multiple of 16) */
static inline __attribute__((always_inline)) void mac1x4_w4(const int16_t *patch, const int8_t *weights, int quads,
                                                            int32_t acc[4])
{
#if defined(__ARM_FEATURE_DSP)
    TINYMLAAS_MAC1X4_LOOP(TINYMLAAS_PAIR4);
    acc[0] = a0 >> 4, acc[1] = a1 >> 4, acc[2] = a2 >> 4, acc[3] = a3 >> 4;
#else
    int32_t a[4] = {0, 0, 0, 0};
    for (int q = 0; q < quads; q++, patch += 4, weights += 8) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const int32_t x = patch[slot(0, k)];
            const uint8_t lo = (uint8_t)weights[k], hi = (uint8_t)weights[4 + k]; /* channels 0 | 1, 2 | 3 */
            a[0] += x * ((int8_t)(uint8_t)(lo << 4) >> 4), a[1] += x * ((int8_t)lo >> 4);
            a[2] += x * ((int8_t)(uint8_t)(hi << 4) >> 4), a[3] += x * ((int8_t)hi >> 4);
        }
    }
    acc[0] = a[0], acc[1] = a[1], acc[2] = a[2], acc[3] = a[3];
#endif
}

/* the same with palettized weights: a byte per channel and half quad, its two 4-bit indices (k0 | k2 << 4, then
   k1 | k3 << 4) looked up in `pairs`, a 256-entry table of the two values as an int16 pair: the lanes SMLAD takes
   against the patch's (k0 k2) and (k1 k3) words, with no unpacked copy of the weights anywhere */
static inline __attribute__((always_inline)) void mac1x4_p4(const int16_t *patch, const uint8_t *weights,
                                                            const int32_t *pairs, int quads, int32_t acc[4])
{
#if defined(__ARM_FEATURE_DSP)
#define TINYMLAAS_P4_BYTE(rot, acc, x)                                                                     \
    "uxtb %[t], %[wa]" rot "\n\t"                                                                         \
    "ldr %[t], [%[T], %[t], lsl #2]\n\t"                                                                   \
    "smlad %[" acc "], %[" x "], %[t], %[" acc "]\n\t"
#define TINYMLAAS_P4_WORD(acc_a, acc_b)                                                                    \
    "ldr %[wa], [%[w]], #4\n\t" TINYMLAAS_P4_BYTE("", acc_a, "xa") TINYMLAAS_P4_BYTE(", ror #8", acc_a, "xb") \
    TINYMLAAS_P4_BYTE(", ror #16", acc_b, "xa") TINYMLAAS_P4_BYTE(", ror #24", acc_b, "xb")
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, xa, xb, wa, t;
    const int16_t *x = patch;
    const uint8_t *w = weights;
    int n = quads;
    __asm__ volatile("1:\n\t"
                     "ldrd %[xa], %[xb], [%[x]], #8\n\t" TINYMLAAS_P4_WORD("a0", "a1") TINYMLAAS_P4_WORD("a2", "a3")
                     "subs %[n], %[n], #1\n\t"
                     "bne 1b\n\t"
                     : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [xa] "=&r"(xa), [xb] "=&r"(xb),
                       [wa] "=&r"(wa), [t] "=&r"(t), [x] "+r"(x), [w] "+r"(w), [n] "+r"(n)
                     : [T] "r"(pairs)
                     : "cc", "memory");
#undef TINYMLAAS_P4_WORD
#undef TINYMLAAS_P4_BYTE
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
#else
    int32_t a[4] = {0, 0, 0, 0};
    for (int q = 0; q < quads; q++, patch += 4, weights += 8) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const int32_t even = pairs[weights[2 * j]], odd = pairs[weights[2 * j + 1]]; /* (k0 k2), (k1 k3) */
            a[j] += patch[0] * (int16_t)even + patch[1] * (even >> 16) + patch[2] * (int16_t)odd +
                    patch[3] * (odd >> 16);
        }
    }
    acc[0] = a[0], acc[1] = a[1], acc[2] = a[2], acc[3] = a[3];
#endif
}

static inline __attribute__((always_inline)) void gemv_layer(const int8_t *input, const void *weights,
                                                             const struct tinymlaas_rq *rq, const int32_t *params,
                                                             int8_t *output, int16_t *patch, int quads,
                                                             const int32_t *pairs, int shared, int wide, int single,
                                                             int clamp)
{
    const int C = params[P_C], OC = params[P_OC], batch = params[P_N];
    const int32_t offset = -params[P_ZP_IN], lo = params[P_ACT_MIN], hi = params[P_ACT_MAX];
    /* bytes of four channels (wide 2: 4-bit values, 3: 4-bit palette indices, 1: int16, 0: int8) */
    const int step = quads * (wide >= 2 ? 8 : wide ? 32 : 16);
    /* channel o's bias and {mult, round, shift}: rows of four words, or (shared) the biases, then one triple */
    const int32_t *bias = shared ? (const int32_t *)rq : &rq->bias;
    const int32_t *factors = shared ? (const int32_t *)rq + OC : &rq->mult;
    const int bias_step = shared ? 1 : 4, factors_step = shared ? 0 : 4;
    for (int b = 0; b < batch; b++, input += C, output += OC) {
        int c = 0;
        for (; c + 4 <= C; c += 4)
            widen4(input + c, offset, patch + c);
        for (; c < quads * 4; c++)
            patch[(c & ~3) + lane_of[c & 3]] = c < C ? (int16_t)(input[c] + offset) : 0;
        const uint8_t *w = weights;
        const int32_t *b = bias, *f = factors; /* channel oc + j's */
        for (int oc = 0; oc < OC; oc += 4, w += step) {
            int32_t acc[4];
            if (wide == 3)
                mac1x4_p4(patch, w, pairs, quads, acc);
            else if (wide == 2)
                mac1x4_w4(patch, (const int8_t *)w, quads, acc);
            else if (wide)
                mac1x4_w16(patch, (const int16_t *)w, quads, acc);
            else
                mac1x4_w8(patch, (const int8_t *)w, quads, acc);
            for (int j = 0; j < 4 && oc + j < OC; j++, b += bias_step, f += factors_step) {
                const struct tinymlaas_rq q = {*b, f[0], f[1], f[2]};
                if (wide == 2 && q.shift < 0) /* 4-bit rows: a multiplier of 1/2 or more (shift -(k + 1), round zp) */
                    output[oc + j] = saturate(
                        smmulr((int32_t)((uint32_t)(acc[j] + q.bias) << (-q.shift - 1)), q.mult) + q.round, clamp,
                        lo, hi);
                else
                    output[oc + j] = requantize(acc[j], &q, single, clamp, lo, hi);
            }
        }
    }
}

/* Fully connected, one row at a time: weights in blocks of four output channels. Twelve entry points from one
   body: int8, int16 or 4-bit weights; in place (no `restrict` on input and output: a row is widened whole before its
   outputs are written); per tensor (_pt: `rq` is every channel's bias, then one {mult, round, shift}, kept in
   registers: 4 B of table a channel instead of 16). */
#define TINYMLAAS_GEMV(name, weight_t, wide, shared, noalias)                                                 \
    void name(const int8_t *noalias input, const weight_t *restrict weights,                                  \
              const struct tinymlaas_rq *restrict rq, const int32_t *restrict params, int8_t *noalias output) \
    {                                                                                                         \
        const int quads = (params[P_C] + 3) / 4;                                                              \
        int16_t patch[quads * 4] __attribute__((aligned(8)));                                                 \
        TINYMLAAS_DISPATCH(gemv_layer, wide, input, weights, rq, params, output, patch, quads, 0, shared);    \
    }
/* palettized weights (--weights palette, a layer of at most 16 values): 4-bit indices and their pair table */
#define TINYMLAAS_GEMV_P4(name, shared, noalias)                                                              \
    void name(const int8_t *noalias input, const uint8_t *restrict indices, const int32_t *restrict pairs,    \
              const struct tinymlaas_rq *restrict rq, const int32_t *restrict params, int8_t *noalias output) \
    {                                                                                                         \
        const int quads = (params[P_C] + 3) / 4;                                                              \
        int16_t patch[quads * 4] __attribute__((aligned(8)));                                                 \
        TINYMLAAS_DISPATCH(gemv_layer, 3, input, indices, rq, params, output, patch, quads, pairs, shared);   \
    }
#define TINYMLAAS_NOALIAS restrict
#define TINYMLAAS_ALIASED
TINYMLAAS_GEMV(tinymlaas_gemv_w8, int8_t, 0, 0, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w16, int16_t, 1, 0, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w8_inplace, int8_t, 0, 0, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV(tinymlaas_gemv_w16_inplace, int16_t, 1, 0, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV(tinymlaas_gemv_w8_pt, int8_t, 0, 1, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w16_pt, int16_t, 1, 1, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w8_pt_inplace, int8_t, 0, 1, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV(tinymlaas_gemv_w16_pt_inplace, int16_t, 1, 1, TINYMLAAS_ALIASED)
/* 4-bit weights (--weights int4), read in the loop: no unpacked copy in RAM */
TINYMLAAS_GEMV(tinymlaas_gemv_w4, int8_t, 2, 0, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w4_inplace, int8_t, 2, 0, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV(tinymlaas_gemv_w4_pt, int8_t, 2, 1, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV(tinymlaas_gemv_w4_pt_inplace, int8_t, 2, 1, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV_P4(tinymlaas_gemv_p4, 0, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV_P4(tinymlaas_gemv_p4_inplace, 0, TINYMLAAS_ALIASED)
TINYMLAAS_GEMV_P4(tinymlaas_gemv_p4_pt, 1, TINYMLAAS_NOALIAS)
TINYMLAAS_GEMV_P4(tinymlaas_gemv_p4_pt_inplace, 1, TINYMLAAS_ALIASED)
#undef TINYMLAAS_GEMV_P4
#undef TINYMLAAS_GEMV
#undef TINYMLAAS_NOALIAS
#undef TINYMLAAS_ALIASED

/*
 * 3x3 depthwise, dilation 1, depth multiplier 1, C a multiple of 4, weights laid out [C/4][9 taps][4 lanes]
 * (int8 c0 c1 c2 c3, or int16 c0 c2 | c1 c3): per tap one load of weights, one LDR and two SXTAB16 of
 * inputs, four 16x16 multiply-accumulates (SMLABB/SMLATT).
 */
static inline __attribute__((always_inline)) void depthwise3x3_layer(const int8_t *input, const void *weights,
                                                                     const struct tinymlaas_rq *rq,
                                                                     const int32_t *params, int8_t *output,
                                                                     int wide, int clamp)
{
    const int N = params[P_N], H = params[P_H], W = params[P_W], C = params[P_C];
    const int OH = params[P_OH], OW = params[P_OW], SH = params[P_SH], SW = params[P_SW];
    const int PT = params[P_PT], PL = params[P_PL];
    const int32_t offset = -params[P_ZP_IN], lo = params[P_ACT_MIN], hi = params[P_ACT_MAX];
    const int row = W * C;
#if defined(__ARM_FEATURE_DSP)
    int8_t padding[C] __attribute__((aligned(4))); /* input zero point: (x + offset) == 0 */
    memset(padding, (int)params[P_ZP_IN], (size_t)C);
#endif
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
#endif
    for (int n = 0; n < N; n++) {
        const int8_t *in = input + n * H * row;
        for (int oy = 0; oy < OH; oy++) {
            const int y0 = oy * SH - PT;
            const int ky0 = y0 < 0 ? -y0 : 0, ky1 = H - y0 < 3 ? H - y0 : 3;
            for (int ox = 0; ox < OW; ox++) {
                const int x0 = ox * SW - PL;
                const int kx0 = x0 < 0 ? -x0 : 0, kx1 = W - x0 < 3 ? W - x0 : 3;
                const int interior = ky0 == 0 && ky1 == 3 && kx0 == 0 && kx1 == 3;
                int8_t *out = output + ((n * OH + oy) * OW + ox) * C;
                const int8_t *base = in + y0 * row + x0 * C;
#if defined(__ARM_FEATURE_DSP)
                const int8_t *tap[9]; /* border pixels: taps outside read the zero-point row (contributes 0) */
                if (!interior)
                    for (int t = 0; t < 9; t++) {
                        const int ky = t / 3, kx = t % 3;
                        tap[t] = ky >= ky0 && ky < ky1 && kx >= kx0 && kx < kx1 ? base + ky * row + kx * C : padding;
                    }
#endif
                const int8_t *w8 = weights;
                const int16_t *w16 = weights;
                for (int c = 0; c < C; c += 4, w8 += 36, w16 += 36) {
                    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#if defined(__ARM_FEATURE_DSP)
#define TAP(ptr, t)                                                                                        \
    do {                                                                                                   \
        int32_t xv, wl, wh;                                                                                \
        memcpy(&xv, ptr, 4);                                                                               \
        if (wide) {                                                                                        \
            memcpy(&wl, w16 + 4 * (t), 4);                                                                 \
            memcpy(&wh, w16 + 4 * (t) + 2, 4);                                                             \
        } else {                                                                                           \
            int32_t wv;                                                                                    \
            memcpy(&wv, w8 + 4 * (t), 4);                                                                  \
            wl = __sxtb16(wv), wh = tinymlaas_sxtb16_ror8(wv);                                                       \
        }                                                                                                  \
        int32_t xl = __sxtab16(off2, xv), xh = tinymlaas_sxtab16_ror8(off2, xv);                                     \
        a0 = __smlabb(xl, wl, a0), a2 = __smlatt(xl, wl, a2);                                              \
        a1 = __smlabb(xh, wh, a1), a3 = __smlatt(xh, wh, a3);                                              \
    } while (0)
#else
#define TAP(ptr, t)                                                                                        \
    do {                                                                                                   \
        const int8_t *p_ = (ptr); /* int16 weights are in lane order (c0 c2 | c1 c3) */                      \
        a0 += (p_[0] + offset) * (wide ? w16[4 * (t)] : w8[4 * (t)]);                                      \
        a1 += (p_[1] + offset) * (wide ? w16[4 * (t) + 2] : w8[4 * (t) + 1]);                              \
        a2 += (p_[2] + offset) * (wide ? w16[4 * (t) + 1] : w8[4 * (t) + 2]);                              \
        a3 += (p_[3] + offset) * (wide ? w16[4 * (t) + 3] : w8[4 * (t) + 3]);                              \
    } while (0)
#endif
                    if (interior) {
                        const int8_t *r0 = base + c, *r1 = r0 + row, *r2 = r1 + row;
                        TAP(r0, 0); TAP(r0 + C, 1); TAP(r0 + 2 * C, 2);
                        TAP(r1, 3); TAP(r1 + C, 4); TAP(r1 + 2 * C, 5);
                        TAP(r2, 6); TAP(r2 + C, 7); TAP(r2 + 2 * C, 8);
                    } else {
#if defined(__ARM_FEATURE_DSP) /* all nine taps unrolled beat a loop over the inside ones */
                        TAP(tap[0] + c, 0); TAP(tap[1] + c, 1); TAP(tap[2] + c, 2);
                        TAP(tap[3] + c, 3); TAP(tap[4] + c, 4); TAP(tap[5] + c, 5);
                        TAP(tap[6] + c, 6); TAP(tap[7] + c, 7); TAP(tap[8] + c, 8);
#else /* without DSP a skipped tap saves more than the loop costs */
                        for (int ky = ky0; ky < ky1; ky++)
                            for (int kx = kx0; kx < kx1; kx++)
                                TAP(base + ky * row + kx * C + c, ky * 3 + kx);
#endif
                    }
#undef TAP
                    out[c] = requantize(a0, rq + c, 0, clamp, lo, hi);
                    out[c + 1] = requantize(a1, rq + c + 1, 0, clamp, lo, hi);
                    out[c + 2] = requantize(a2, rq + c + 2, 0, clamp, lo, hi);
                    out[c + 3] = requantize(a3, rq + c + 3, 0, clamp, lo, hi);
                }
            }
        }
    }
}

/* convolutions: double rounding only; the clamp decided once, each case its own copy of the loops */
#define TINYMLAAS_DEPTHWISE3X3(wide)                                                                     \
    do {                                                                                                 \
        if (params[P_ACT_MIN] > -128 || params[P_ACT_MAX] < 127)                                         \
            depthwise3x3_layer(input, weights, rq, params, output, wide, 1);                              \
        else                                                                                             \
            depthwise3x3_layer(input, weights, rq, params, output, wide, 0);                              \
    } while (0)

void tinymlaas_depthwise3x3_w8(const int8_t *restrict input, const int8_t *restrict weights,
                               const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                               int8_t *restrict output)
{
    TINYMLAAS_DEPTHWISE3X3(0);
}

void tinymlaas_depthwise3x3_w16(const int8_t *restrict input, const int16_t *restrict weights,
                                const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                                int8_t *restrict output)
{
    TINYMLAAS_DEPTHWISE3X3(1);
}

/* in place: pixels in raster order, each pixel's four channels written after their nine taps are read */
void tinymlaas_depthwise3x3_w8_inplace(const int8_t *input, const int8_t *restrict weights,
                                       const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                                       int8_t *output)
{
    TINYMLAAS_DEPTHWISE3X3(0);
}

void tinymlaas_depthwise3x3_w16_inplace(const int8_t *input, const int16_t *restrict weights,
                                        const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                                        int8_t *output)
{
    TINYMLAAS_DEPTHWISE3X3(1);
}
#undef TINYMLAAS_DEPTHWISE3X3

#if defined(__ARM_FEATURE_DSP) /* the compiler offers this kernel on DSP cores only */
/*
 * 3x3 depthwise, dilation 1, depth multiplier 1, strides 1 or 2, any depth: one channel at a time over a window
 * of three input rows. Each input row of four channels is widened once (input offset added) into one int16 row
 * per channel, padding columns 0, so that a row's first two taps are one word and one SMLAD and the third one
 * SMLABB: per output three SMLAD, three SMLABB, six loads, against nine multiply-accumulates, nine widenings and
 * border tests in depthwise3x3_layer.
 * The window: padded row r is kept in slot r % 3 and, when r % 3 < 2, again in slot r % 3 + 3, so that the three
 * rows of any output row are three adjacent slots.
 * The layer may be walked transposed (params[P_TRANSPOSED]; the compiler picks the longer output side as rows,
 * since each row costs a fixed overhead): rows are then the input's columns, with the weights transposed to match.
 * weights: [C][3 rows][w0 w1 w2 0] int16, doubled, so that the accumulator starts at the table's bias (2 * the
 * TFLite bias) and requantization skips its doubling. The table proves 2 * |acc| + 2 * |bias| < 2^31.
 */
#define TINYMLAAS_ROWS_GROUP 4

/* the layer as the kernel walks it: rows of `cols` elements, element strides in the input and output */
struct rows_view {
    int rows, cols, out_rows, out_cols, row_step, col_step, pad_top, pad_left;
    int in_row, in_col, out_row, out_col; /* strides in elements */
    int width;                             /* PW: int16 per window row */
};

/* n words of 0: the library's memset (which gcc would call for such a loop) stores bytes one at a time */
static __attribute__((optimize("no-tree-loop-distribute-patterns"))) void zero_words(void *p, int n)
{
    uint32_t *w = p;
#pragma GCC unroll 4
    for (int i = 0; i < n; i++)
        w[i] = 0;
}

/* padded row r = input row r - pad_top of channels c0 .. c0 + g into slot r % 3 (and r % 3 + 3) */
static void widen_row(const int8_t *in, const struct rows_view *v, int32_t offset, int r, int c0, int g,
                      int16_t *window)
{
    const int iy = r - v->pad_top, slot = r % 3, PW = v->width, cols = v->cols, step = v->in_col;
    for (int k = 0; k < (slot < 2 ? 2 : 1); k++) {
        int16_t *d0 = window + (slot + 3 * k) * PW + v->pad_left; /* channel j: d0 + j * 5 * PW */
        if (iy < 0 || iy >= v->rows) {
            for (int j = 0; j < g; j++)
                zero_words(d0 - v->pad_left + j * 5 * PW, PW / 2);
            continue;
        }
        const int8_t *src = in + iy * v->in_row + c0;
        if (g == TINYMLAAS_ROWS_GROUP) {
            const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
            for (int x = 0; x < cols; x++, src += step) {
                int32_t w;
                memcpy(&w, src, 4);
                const int32_t lo = __sxtab16(off2, w), hi = tinymlaas_sxtab16_ror8(off2, w); /* c0 c2 | c1 c3 */
                d0[x] = (int16_t)lo, d0[10 * PW + x] = (int16_t)(lo >> 16);
                d0[5 * PW + x] = (int16_t)hi, d0[15 * PW + x] = (int16_t)(hi >> 16);
            }
            continue;
        }
        for (int j = 0; j < g; j++)
            for (int x = 0; x < cols; x++)
                d0[j * 5 * PW + x] = (int16_t)(src[x * step + j] + offset);
    }
}

static inline __attribute__((always_inline)) int32_t load_pair(const int16_t *p)
{
    int32_t v;
    memcpy(&v, p, 4); /* may be unaligned (odd columns): one LDR on ARMv7E-M and later */
    return v;
}

/*
 * Accumulators of one output row of one channel, stored to acc[]: rows = the three window rows (PW apart),
 * w = [3][4]. Requantization is a pass of its own: the loop then fits the registers (14 on Thumb-2, the
 * function not inlined so that no frame pointer takes one).
 */
#define TINYMLAAS_ROW_TAPS(row, step, wpair, wlast, op, from)                                                  \
    "ldrsh %[t], [%[" row "], #4]\n\t"                                                                      \
    "ldr %[x], [%[" row "]], #" step "\n\t"                                                                 \
    "smlad %[a], %[x], %[" wpair "], %[" from "]\n\t"                                                       \
    op " %[a], %[t], %[" wlast "], %[a]\n\t"
#define TINYMLAAS_ROW_OUTPUT(step)                                                                             \
    TINYMLAAS_ROW_TAPS("r0", step, "w0", "w02_12", "smlabb", "bias")                                          \
    TINYMLAAS_ROW_TAPS("r1", step, "w1", "w02_12", "smlabt", "a")                                             \
    TINYMLAAS_ROW_TAPS("r2", step, "w2", "w22", "smlabb", "a")                                                \
    "str %[a], [%[acc]], #4\n\t"
/* two outputs per pass, one before them when n is odd */
#define TINYMLAAS_ROW_LOOP(step)                                                                               \
    __asm__ volatile("lsrs %[n], %[n], #1\n\t"                                                                \
                     "bcc 1f\n\t" TINYMLAAS_ROW_OUTPUT(step)                                                  \
                     "1:\n\t"                                                                                 \
                     "cmp %[n], #0\n\t"                                                                       \
                     "beq 3f\n\t"                                                                             \
                     "2:\n\t" TINYMLAAS_ROW_OUTPUT(step) TINYMLAAS_ROW_OUTPUT(step)                            \
                     "subs %[n], %[n], #1\n\t"                                                                \
                     "bne 2b\n\t"                                                                             \
                     "3:\n\t"                                                                                 \
                     : [a] "=&r"(a), [x] "=&r"(x), [t] "=&r"(t), [r0] "+r"(r0), [r1] "+r"(r1), [r2] "+r"(r2),   \
                       [acc] "+r"(acc), [n] "+r"(n)                                                           \
                     : [w0] "r"(w0), [w1] "r"(w1), [w2] "r"(w2), [w02_12] "r"(w02_12), [w22] "r"(w22),        \
                       [bias] "r"(bias)                                                                       \
                     : "cc", "memory")

static __attribute__((noinline)) void depthwise_row(const int16_t *rows, int PW, const int16_t *w, int32_t bias,
                                                    int n, int SW, int32_t *acc)
{
    const int16_t *r0 = rows, *r1 = rows + PW, *r2 = rows + 2 * PW;
    const int32_t w0 = load_pair(w), w1 = load_pair(w + 4), w2 = load_pair(w + 8);
    const int32_t w02_12 = (int32_t)(((uint32_t)(uint16_t)w[6] << 16) | (uint16_t)w[2]), w22 = w[10];
    int32_t a, x, t;
    if (SW == 1)
        TINYMLAAS_ROW_LOOP("2");
    else
        TINYMLAAS_ROW_LOOP("4");
}

static inline __attribute__((always_inline)) void requantize_row(const int32_t *acc, const struct tinymlaas_rq *q,
                                                                 int n, int stride, int8_t *out, int clamp,
                                                                 int32_t lo, int32_t hi)
{
    const struct tinymlaas_rq r = *q; /* in registers: the stores could alias the table */
#pragma GCC unroll 2
    for (; n > 0; n--, out += stride)
        *out = requantize_doubled(*acc++, &r, clamp, lo, hi);
}

static __attribute__((noinline)) void requantize_row_clamped(const int32_t *acc, const struct tinymlaas_rq *q,
                                                             int n, int stride, int8_t *out, int32_t lo, int32_t hi)
{
    requantize_row(acc, q, n, stride, out, 1, lo, hi);
}

static __attribute__((noinline)) void requantize_row_saturated(const int32_t *acc, const struct tinymlaas_rq *q,
                                                               int n, int stride, int8_t *out)
{
    requantize_row(acc, q, n, stride, out, 0, -128, 127);
}

static struct rows_view rows_view_of(const int32_t *params)
{
    const int H = params[P_H], W = params[P_W], C = params[P_C], OH = params[P_OH], OW = params[P_OW];
    struct rows_view v;
    if (params[P_TRANSPOSED])
        v = (struct rows_view){W, H, OW, OH, params[P_SW], params[P_SH], params[P_PL], params[P_PT],
                               C, W * C, C, OW * C, 0};
    else
        v = (struct rows_view){H, W, OH, OW, params[P_SH], params[P_SW], params[P_PT], params[P_PL],
                               W * C, C, OW * C, C, 0};
    /* a window row: (out_cols - 1) * col_step + 3 columns and one more for the last pair's word load, at least
       the input row with its left padding (VALID), even so that rows stay word-aligned */
    const int need = (v.out_cols - 1) * v.col_step + 4, have = v.pad_left + v.cols;
    v.width = ((need > have ? need : have) + 1) & ~1;
    return v;
}

static void depthwise3x3_rows_layer(const int8_t *input, const int16_t *weights, const struct tinymlaas_rq *rq,
                                    const int32_t *params, int8_t *output, const struct rows_view *v,
                                    int16_t *window, int32_t *acc)
{
    const int N = params[P_N], C = params[P_C], PW = v->width;
    const int32_t offset = -params[P_ZP_IN], lo = params[P_ACT_MIN], hi = params[P_ACT_MAX];
    const int clamp = lo > -128 || hi < 127;
    zero_words(window, TINYMLAAS_ROWS_GROUP * 5 * PW / 2); /* the padding columns stay 0 */
    for (int n = 0; n < N; n++) {
        const int8_t *in = input + n * params[P_H] * params[P_W] * C;
        int8_t *out_image = output + n * params[P_OH] * params[P_OW] * C;
        for (int c0 = 0; c0 < C; c0 += TINYMLAAS_ROWS_GROUP) {
            const int g = C - c0 < TINYMLAAS_ROWS_GROUP ? C - c0 : TINYMLAAS_ROWS_GROUP;
            int next = 0; /* the next padded row to widen */
            for (int oy = 0; oy < v->out_rows; oy++) {
                const int r = oy * v->row_step;
                for (; next <= r + 2; next++)
                    widen_row(in, v, offset, next, c0, g, window);
                for (int j = 0; j < g; j++) {
                    const int c = c0 + j;
                    int8_t *out = out_image + oy * v->out_row + c;
                    depthwise_row(window + (j * 5 + r % 3) * PW, PW, weights + c * 12, rq[c].bias, v->out_cols,
                                  v->col_step, acc);
                    if (clamp)
                        requantize_row_clamped(acc, rq + c, v->out_cols, v->out_col, out, lo, hi);
                    else
                        requantize_row_saturated(acc, rq + c, v->out_cols, v->out_col, out);
                }
            }
        }
    }
}

void tinymlaas_depthwise3x3_rows(const int8_t *restrict input, const int16_t *restrict weights,
                                 const struct tinymlaas_rq *restrict rq, const int32_t *restrict params,
                                 int8_t *restrict output)
{
    const struct rows_view v = rows_view_of(params);
    int16_t window[TINYMLAAS_ROWS_GROUP * 5 * v.width] __attribute__((aligned(4)));
    int32_t acc[v.out_cols];
    depthwise3x3_rows_layer(input, weights, rq, params, output, &v, window, acc);
}
#endif
