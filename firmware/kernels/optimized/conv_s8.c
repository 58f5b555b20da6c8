/*
 * int8 convolution and depthwise convolution (NHWC activations, OHWI / 1HWC weights) with the DSP
 * extension's dual 16-bit multiply-accumulate: SXTAB16 widens two int8 lanes and adds the input offset
 * in one instruction, SMLAD multiplies two pairs and accumulates. Four output channels share each
 * input load. Requantization is TFLite's, bit-exact. Without __ARM_FEATURE_DSP the same loops run in
 * plain C. The compiler (tinymlaas/ops/int8.py) uses these for DSP layers whose requantization gemm_dsp.c
 * cannot take, and for depthwise layers other than 3x3.
 *
 * params: struct tinymlaas_conv_params (conv_params.h), read as int32 with its P_* indices
 */
#include <stdint.h>
#include <string.h>

#include "conv_params.h"
#include "fixedpoint_s8.h"

static inline int32_t load32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4); /* one unaligned LDR on Cortex-M3 and up */
    return v;
}

/* Requantization parameters held in registers: `params` would be reloaded after every int8 store. */
struct requant {
    int32_t zp_out, lo, hi, single;
};

static inline struct requant requant_of(const int32_t *params)
{
    struct requant r = {params[P_ZP_OUT], params[P_ACT_MIN], params[P_ACT_MAX], params[P_SINGLE]};
    return r;
}

static inline int8_t finish(int32_t acc, int32_t bias, int32_t mult, int32_t shift, struct requant r)
{
    acc += bias;
    int32_t v = r.single ? tinymlaas_requantize_single(acc, mult, shift) : tinymlaas_requantize(acc, mult, shift);
    return tinymlaas_clamp_s8(v + r.zp_out, r.lo, r.hi);
}

static inline void finish4(int8_t *out, const int32_t acc[4], const int32_t *bias, const int32_t *mult,
                           const int32_t *shift, struct requant r)
{
    for (int j = 0; j < 4; j++)
        out[j] = finish(acc[j], bias[j], mult[j], shift[j], r);
}

/* acc[j] += sum_c (x[c] + offset) * w_j[c] for four weight rows `stride` bytes apart */
static inline void dot4(const int8_t *x, const int8_t *w0, int c_len, int stride, int32_t offset, int32_t acc[4])
{
    const int8_t *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    int c = 0;
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    for (; c + 4 <= c_len; c += 4) {
        int32_t xv = load32(x + c);
        int32_t xl = __sxtab16(off2, xv);
        int32_t xh = tinymlaas_sxtab16_ror8(off2, xv);
        int32_t wv = load32(w0 + c);
        a0 = __smlad(xl, __sxtb16(wv), a0);
        a0 = __smlad(xh, tinymlaas_sxtb16_ror8(wv), a0);
        wv = load32(w1 + c);
        a1 = __smlad(xl, __sxtb16(wv), a1);
        a1 = __smlad(xh, tinymlaas_sxtb16_ror8(wv), a1);
        wv = load32(w2 + c);
        a2 = __smlad(xl, __sxtb16(wv), a2);
        a2 = __smlad(xh, tinymlaas_sxtb16_ror8(wv), a2);
        wv = load32(w3 + c);
        a3 = __smlad(xl, __sxtb16(wv), a3);
        a3 = __smlad(xh, tinymlaas_sxtb16_ror8(wv), a3);
    }
#endif
    for (; c < c_len; c++) {
        int32_t xv = x[c] + offset;
        a0 += xv * w0[c];
        a1 += xv * w1[c];
        a2 += xv * w2[c];
        a3 += xv * w3[c];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

static inline int32_t dot1(const int8_t *x, const int8_t *w, int c_len, int32_t offset)
{
    int32_t a = 0;
    int c = 0;
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    for (; c + 4 <= c_len; c += 4) {
        int32_t xv = load32(x + c), wv = load32(w + c);
        a = __smlad(__sxtab16(off2, xv), __sxtb16(wv), a);
        a = __smlad(tinymlaas_sxtab16_ror8(off2, xv), tinymlaas_sxtb16_ror8(wv), a);
    }
#endif
    for (; c < c_len; c++)
        a += (x[c] + offset) * w[c];
    return a;
}

/* out[oc] for all OC output channels: requantized dot products of x (len bytes) with each weight row */
static inline void matvec_s8(const int8_t *x, const int8_t *weights, int len, int OC, int32_t offset,
                             const int32_t *bias, const int32_t *mult, const int32_t *shift, struct requant rq,
                             int8_t *out)
{
    int oc = 0;
    for (; oc + 4 <= OC; oc += 4) {
        int32_t acc[4] = {0, 0, 0, 0};
        dot4(x, weights + oc * len, len, len, offset, acc);
        finish4(out + oc, acc, bias + oc, mult + oc, shift + oc, rq);
    }
    for (; oc < OC; oc++)
        out[oc] = finish(dot1(x, weights + oc * len, len, offset), bias[oc], mult[oc], shift[oc], rq);
}

static inline int max_i(int a, int b) { return a > b ? a : b; }
static inline int min_i(int a, int b) { return a < b ? a : b; }

#define IM2COL_MAX 2048 /* bytes of one output pixel's input patch gathered on the stack */

void tinymlaas_conv_s8(const int8_t *restrict input, const int8_t *restrict weights, const int32_t *restrict bias,
                       const int32_t *restrict mult, const int32_t *restrict shift, const int32_t *restrict params,
                       int8_t *restrict output)
{
    const int N = params[P_N], H = params[P_H], W = params[P_W], C = params[P_C];
    const int OH = params[P_OH], OW = params[P_OW], OC = params[P_OC];
    const int KH = params[P_KH], KW = params[P_KW], SH = params[P_SH], SW = params[P_SW];
    const int DH = params[P_DH], DW = params[P_DW], PT = params[P_PT], PL = params[P_PL];
    const int8_t zp_in = (int8_t)params[P_ZP_IN];
    const int32_t offset = -params[P_ZP_IN];
    const struct requant rq = requant_of(params);
    const int row = KH * KW * C; /* one output channel's weights, and one patch */
    const int gather = row <= IM2COL_MAX;
    int8_t patch[gather ? row : 1] __attribute__((aligned(4))); /* on the stack, measured with the rest */
    for (int n = 0; n < N; n++) {
        const int8_t *in = input + n * H * W * C;
        for (int oy = 0; oy < OH; oy++) {
            const int y0 = oy * SH - PT;
            for (int ox = 0; ox < OW; ox++) {
                const int x0 = ox * SW - PL;
                int8_t *out = output + ((n * OH + oy) * OW + ox) * OC;
                int oc = 0;
                if (gather) {
                    /* im2col: padding holds the input zero point, which contributes (zp - zp) * w = 0 */
                    int8_t *dst = patch;
                    for (int ky = 0; ky < KH; ky++) {
                        int iy = y0 + ky * DH;
                        for (int kx = 0; kx < KW; kx++, dst += C) {
                            int ix = x0 + kx * DW;
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W)
                                memset(dst, zp_in, C);
                            else
                                memcpy(dst, in + (iy * W + ix) * C, C);
                        }
                    }
                    matvec_s8(patch, weights, row, OC, offset, bias, mult, shift, rq, out);
                    continue;
                }
                for (; oc < OC; oc++) {
                    int32_t acc = 0;
                    const int8_t *w = weights + oc * row;
                    for (int ky = 0; ky < KH; ky++) {
                        int iy = y0 + ky * DH;
                        if (iy < 0 || iy >= H)
                            continue;
                        for (int kx = 0; kx < KW; kx++) {
                            int ix = x0 + kx * DW;
                            if (ix >= 0 && ix < W)
                                acc += dot1(in + (iy * W + ix) * C, w + (ky * KW + kx) * C, C, offset);
                        }
                    }
                    out[oc] = finish(acc, bias[oc], mult[oc], shift[oc], rq);
                }
            }
        }
    }
}

/* depth multiplier 1: four channels per step, per-channel products with SMLABB/SMLATT */
void tinymlaas_depthwise_s8(const int8_t *restrict input, const int8_t *restrict weights,
                            const int32_t *restrict bias, const int32_t *restrict mult,
                            const int32_t *restrict shift, const int32_t *restrict params, int8_t *restrict output)
{
    const int N = params[P_N], H = params[P_H], W = params[P_W], C = params[P_C];
    const int OH = params[P_OH], OW = params[P_OW];
    const int KH = params[P_KH], KW = params[P_KW], SH = params[P_SH], SW = params[P_SW];
    const int DH = params[P_DH], DW = params[P_DW], PT = params[P_PT], PL = params[P_PL];
    const int32_t offset = -params[P_ZP_IN];
    const struct requant rq = requant_of(params);
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
#endif
    for (int n = 0; n < N; n++) {
        const int8_t *in = input + n * H * W * C;
        for (int oy = 0; oy < OH; oy++) {
            const int y0 = oy * SH - PT;
            /* valid taps: ky in [ky0, ky1), kx in [kx0, kx1) */
            const int ky0 = max_i(0, (-y0 + DH - 1) / DH), ky1 = min_i(KH, (H - y0 + DH - 1) / DH);
            for (int ox = 0; ox < OW; ox++) {
                const int x0 = ox * SW - PL;
                const int kx0 = max_i(0, (-x0 + DW - 1) / DW), kx1 = min_i(KW, (W - x0 + DW - 1) / DW);
                int8_t *out = output + ((n * OH + oy) * OW + ox) * C;
                int c = 0;
#if defined(__ARM_FEATURE_DSP)
                for (; c + 4 <= C; c += 4) {
                    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                    for (int ky = ky0; ky < ky1; ky++) {
                        const int8_t *x = in + ((y0 + ky * DH) * W + x0) * C + c;
                        const int8_t *w = weights + ky * KW * C + c;
                        for (int kx = kx0; kx < kx1; kx++) {
                            int32_t xv = load32(x + kx * DW * C);
                            int32_t wv = load32(w + kx * C);
                            int32_t xl = __sxtab16(off2, xv), xh = tinymlaas_sxtab16_ror8(off2, xv);
                            int32_t wl = __sxtb16(wv), wh = tinymlaas_sxtb16_ror8(wv);
                            a0 = __smlabb(xl, wl, a0);
                            a2 = __smlatt(xl, wl, a2);
                            a1 = __smlabb(xh, wh, a1);
                            a3 = __smlatt(xh, wh, a3);
                        }
                    }
                    const int32_t acc[4] = {a0, a1, a2, a3};
                    finish4(out + c, acc, bias + c, mult + c, shift + c, rq);
                }
#endif
                for (; c < C; c++) {
                    int32_t acc = 0;
                    for (int ky = ky0; ky < ky1; ky++)
                        for (int kx = kx0; kx < kx1; kx++)
                            acc += (in[((y0 + ky * DH) * W + x0 + kx * DW) * C + c] + offset) *
                                   weights[(ky * KW + kx) * C + c];
                    out[c] = finish(acc, bias[c], mult[c], shift[c], rq);
                }
            }
        }
    }
}

/* two pixels x two output channels: each weight word serves both pixels */
static inline void dot2x2(const int8_t *x0, const int8_t *x1, const int8_t *w0, const int8_t *w1, int len,
                          int32_t offset, int32_t acc[4])
{
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0; /* a<pixel><channel> */
    int c = 0;
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    for (; c + 4 <= len; c += 4) {
        int32_t v0 = load32(x0 + c), v1 = load32(x1 + c);
        int32_t x0l = __sxtab16(off2, v0), x0h = tinymlaas_sxtab16_ror8(off2, v0);
        int32_t x1l = __sxtab16(off2, v1), x1h = tinymlaas_sxtab16_ror8(off2, v1);
        int32_t wv = load32(w0 + c);
        int32_t wl = __sxtb16(wv), wh = tinymlaas_sxtb16_ror8(wv);
        a00 = __smlad(x0h, wh, __smlad(x0l, wl, a00));
        a10 = __smlad(x1h, wh, __smlad(x1l, wl, a10));
        wv = load32(w1 + c);
        wl = __sxtb16(wv), wh = tinymlaas_sxtb16_ror8(wv);
        a01 = __smlad(x0h, wh, __smlad(x0l, wl, a01));
        a11 = __smlad(x1h, wh, __smlad(x1l, wl, a11));
    }
#endif
    for (; c < len; c++) {
        int32_t v0 = x0[c] + offset, v1 = x1[c] + offset;
        a00 += v0 * w0[c], a10 += v1 * w0[c];
        a01 += v0 * w1[c], a11 += v1 * w1[c];
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

/* 1x1 convolution, stride 1, no padding (pointwise layers) and fully connected layers: a matrix product
 * of P pixels x C channels by OC x C weights. */
void tinymlaas_conv1x1_s8(const int8_t *restrict input, const int8_t *restrict weights, const int32_t *restrict bias,
                          const int32_t *restrict mult, const int32_t *restrict shift, const int32_t *restrict params,
                          int8_t *restrict output)
{
    const int P = params[P_N] * params[P_H] * params[P_W], C = params[P_C], OC = params[P_OC];
    const int32_t offset = -params[P_ZP_IN];
    const struct requant rq = requant_of(params);
    int p = 0;
    for (; p + 2 <= P; p += 2) {
        const int8_t *x0 = input + p * C, *x1 = x0 + C;
        int8_t *out0 = output + p * OC, *out1 = out0 + OC;
        int oc = 0;
        for (; oc + 2 <= OC; oc += 2) {
            int32_t acc[4];
            dot2x2(x0, x1, weights + oc * C, weights + (oc + 1) * C, C, offset, acc);
            out0[oc] = finish(acc[0], bias[oc], mult[oc], shift[oc], rq);
            out0[oc + 1] = finish(acc[1], bias[oc + 1], mult[oc + 1], shift[oc + 1], rq);
            out1[oc] = finish(acc[2], bias[oc], mult[oc], shift[oc], rq);
            out1[oc + 1] = finish(acc[3], bias[oc + 1], mult[oc + 1], shift[oc + 1], rq);
        }
        for (; oc < OC; oc++) {
            out0[oc] = finish(dot1(x0, weights + oc * C, C, offset), bias[oc], mult[oc], shift[oc], rq);
            out1[oc] = finish(dot1(x1, weights + oc * C, C, offset), bias[oc], mult[oc], shift[oc], rq);
        }
    }
    for (; p < P; p++)
        matvec_s8(input + p * C, weights, C, OC, offset, bias, mult, shift, rq, output + p * OC);
}

/* 3x3 depthwise, dilation 1, depth multiplier 1, C a multiple of 4. Weights re-laid out by the compiler as
 * [C/4][9 taps][4 lanes], so a channel block's nine tap words are adjacent; interior pixels skip all bounds
 * checks. */
void tinymlaas_depthwise3x3_s8(const int8_t *restrict input, const int8_t *restrict weights,
                               const int32_t *restrict bias, const int32_t *restrict mult,
                               const int32_t *restrict shift, const int32_t *restrict params, int8_t *restrict output)
{
    const int N = params[P_N], H = params[P_H], W = params[P_W], C = params[P_C];
    const int OH = params[P_OH], OW = params[P_OW], SH = params[P_SH], SW = params[P_SW];
    const int PT = params[P_PT], PL = params[P_PL];
    const int32_t offset = -params[P_ZP_IN];
    const struct requant rq = requant_of(params);
    const int row = W * C;
#if defined(__ARM_FEATURE_DSP)
    const int32_t off2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
#endif
    for (int n = 0; n < N; n++) {
        const int8_t *in = input + n * H * row;
        for (int oy = 0; oy < OH; oy++) {
            const int y0 = oy * SH - PT;
            const int ky0 = max_i(0, -y0), ky1 = min_i(3, H - y0);
            for (int ox = 0; ox < OW; ox++) {
                const int x0 = ox * SW - PL;
                const int kx0 = max_i(0, -x0), kx1 = min_i(3, W - x0);
                const int interior = ky0 == 0 && ky1 == 3 && kx0 == 0 && kx1 == 3;
                int8_t *out = output + ((n * OH + oy) * OW + ox) * C;
                for (int c = 0; c < C; c += 4) {
                    const int8_t *w = weights + c * 9; /* block c/4: 36 bytes */
                    int32_t acc[4] = {0, 0, 0, 0};
#if defined(__ARM_FEATURE_DSP)
                    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#define TAP(ptr, t)                                                                                        \
    do {                                                                                                   \
        int32_t xv = load32(ptr), wv = load32(w + 4 * (t));                                                \
        int32_t xl = __sxtab16(off2, xv), xh = tinymlaas_sxtab16_ror8(off2, xv);                                     \
        int32_t wl = __sxtb16(wv), wh = tinymlaas_sxtb16_ror8(wv);                                                   \
        a0 = __smlabb(xl, wl, a0), a2 = __smlatt(xl, wl, a2);                                              \
        a1 = __smlabb(xh, wh, a1), a3 = __smlatt(xh, wh, a3);                                              \
    } while (0)
                    if (interior) {
                        const int8_t *r0 = in + y0 * row + x0 * C + c, *r1 = r0 + row, *r2 = r1 + row;
                        TAP(r0, 0); TAP(r0 + C, 1); TAP(r0 + 2 * C, 2);
                        TAP(r1, 3); TAP(r1 + C, 4); TAP(r1 + 2 * C, 5);
                        TAP(r2, 6); TAP(r2 + C, 7); TAP(r2 + 2 * C, 8);
                    } else {
                        for (int ky = ky0; ky < ky1; ky++)
                            for (int kx = kx0; kx < kx1; kx++)
                                TAP(in + (y0 + ky) * row + (x0 + kx) * C + c, ky * 3 + kx);
                    }
#undef TAP
                    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
#else
                    (void)interior;
                    for (int ky = ky0; ky < ky1; ky++)
                        for (int kx = kx0; kx < kx1; kx++)
                            for (int j = 0; j < 4; j++)
                                acc[j] += (in[(y0 + ky) * row + (x0 + kx) * C + c + j] + offset) * w[(ky * 3 + kx) * 4 + j];
#endif
                    finish4(out + c, acc, bias + c, mult + c, shift + c, rq);
                }
            }
        }
    }
}
