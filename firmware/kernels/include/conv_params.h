/* The parameter block of the convolution kernels (optimized/conv_s8.c, optimized/gemm_dsp.c): one constant of the
 * model per call, written by the compiler from the same layout in Python (tinymlaas/ops/conv_params.py;
 * tests/test_conv_params.py checks that both agree).
 *
 * The kernels take it as `const int32_t *params` and read it with the P_* indices below, derived from the struct:
 * the struct is the one definition, and the kernels' code is what it was with hand-numbered indices. */
#ifndef TINYMLAAS_CONV_PARAMS_H
#define TINYMLAAS_CONV_PARAMS_H
#include <stddef.h>
#include <stdint.h>

struct tinymlaas_conv_params {
    int32_t n, h, w, c;         /* input NHWC */
    int32_t oh, ow, oc;         /* output height, width, channels */
    int32_t kh, kw;             /* kernel */
    int32_t sh, sw;             /* stride */
    int32_t dh, dw;             /* dilation */
    int32_t pt, pl;             /* padding top, left */
    int32_t zp_in, zp_out;      /* zero points */
    int32_t act_min, act_max;   /* fused activation bounds */
    int32_t single;             /* one rounding (the interpreter's fully connected) instead of two */
    int32_t out_stride;         /* channels from one output pixel to the next: 0 = oc (a tensor of its own); more
                                   where the layer writes its slice of a concatenation (gemm kernels only) */
};

/* gemm_dsp.c's depthwise3x3_rows: walked transposed (rows along the longer output side) when `transposed` */
struct tinymlaas_depthwise_rows_params {
    struct tinymlaas_conv_params conv;
    int32_t transposed;
};

#define TINYMLAAS_CONV_PARAM(field) (offsetof(struct tinymlaas_conv_params, field) / sizeof(int32_t))

enum {
    P_N = TINYMLAAS_CONV_PARAM(n), P_H = TINYMLAAS_CONV_PARAM(h), P_W = TINYMLAAS_CONV_PARAM(w),
    P_C = TINYMLAAS_CONV_PARAM(c), P_OH = TINYMLAAS_CONV_PARAM(oh), P_OW = TINYMLAAS_CONV_PARAM(ow),
    P_OC = TINYMLAAS_CONV_PARAM(oc), P_KH = TINYMLAAS_CONV_PARAM(kh), P_KW = TINYMLAAS_CONV_PARAM(kw),
    P_SH = TINYMLAAS_CONV_PARAM(sh), P_SW = TINYMLAAS_CONV_PARAM(sw), P_DH = TINYMLAAS_CONV_PARAM(dh),
    P_DW = TINYMLAAS_CONV_PARAM(dw), P_PT = TINYMLAAS_CONV_PARAM(pt), P_PL = TINYMLAAS_CONV_PARAM(pl),
    P_ZP_IN = TINYMLAAS_CONV_PARAM(zp_in), P_ZP_OUT = TINYMLAAS_CONV_PARAM(zp_out),
    P_ACT_MIN = TINYMLAAS_CONV_PARAM(act_min), P_ACT_MAX = TINYMLAAS_CONV_PARAM(act_max),
    P_SINGLE = TINYMLAAS_CONV_PARAM(single), P_OUT_STRIDE = TINYMLAAS_CONV_PARAM(out_stride),
    P_TRANSPOSED = offsetof(struct tinymlaas_depthwise_rows_params, transposed) / sizeof(int32_t),
};

#endif
