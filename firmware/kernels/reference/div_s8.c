/*
 * int8 / int16 DIV, bit-exact with TFLite's reference kernel: the divisor's reciprocal in fixed point (gemmlowp's
 * 1/(1 + x) of its normalised value), the dividend normalised by its headroom, one rescale to the output.
 * Inputs are broadcast to the output's shape beforehand (in the graph), so this is elementwise.
 *
 * params: {output_multiplier, output_shift, zp_a, zp_b, zp_out, act_min, act_max, elements}
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

/* leading redundant sign bits (31 for 0 and -1) */
static int count_leading_sign_bits(int32_t x)
{
    return tinymlaas_count_leading_zeros((uint32_t)(x >= 0 ? x : ~x)) - 1;
}

/* RoundingDivideByPOT as the interpreter computes it on x86-64 also for exponents of 32 and more, which occur for
 * dividends 0 and -1: its mask is then all ones and its shift count is taken modulo 32. */
static int32_t rounding_divide_by_pot_wide(int32_t x, int exponent)
{
    if (exponent < 32)
        return tinymlaas_rounding_divide_by_pot(x, exponent);
    int32_t threshold = (-1 >> 1) + (x < 0);
    return (x >> (exponent & 31)) + (x > threshold);
}

static int32_t divide(int32_t a, int32_t b, const int32_t *params)
{
    if (b < 0) { /* a positive reciprocal: the sign moves to the dividend */
        a = -a;
        b = -b;
    }
    int headroom_plus_one = tinymlaas_count_leading_zeros((uint32_t)b);
    int recip_shift = 31 - headroom_plus_one;
    int32_t reciprocal = tinymlaas_one_over_one_plus_x((int32_t)(((uint32_t)b << headroom_plus_one) - (1u << 31)));
    int headroom = count_leading_sign_bits(a);
    int32_t quotient = tinymlaas_srdhm((int32_t)((uint32_t)a << headroom), reciprocal);
    int total_shift = params[1] - recip_shift - headroom;
    int32_t v = params[4] + rounding_divide_by_pot_wide(tinymlaas_srdhm(quotient, params[0]), -total_shift);
    return v < params[5] ? params[5] : v > params[6] ? params[6] : v;
}

void tinymlaas_div_s8(const int8_t *a, const int8_t *b, const int32_t *params, int8_t *output)
{
    for (int32_t i = 0; i < params[7]; i++)
        output[i] = (int8_t)divide((int32_t)a[i] - params[2], (int32_t)b[i] - params[3], params);
}

void tinymlaas_div_s16(const int16_t *a, const int16_t *b, const int32_t *params, int16_t *output)
{
    for (int32_t i = 0; i < params[7]; i++)
        output[i] = (int16_t)divide((int32_t)a[i] - params[2], (int32_t)b[i] - params[3], params);
}
