/*
 * int8 softmax, bit-exact with TFLite's reference kernel (reference_ops::Softmax for int8 in and out,
 * output scale 1/256, zero point -128): gemmlowp fixed-point exp of the scaled difference to the row
 * maximum, a fixed-point reciprocal of the sum, rounding shifts.
 *
 * params: {input_multiplier, input_left_shift, diff_min, depth, total_elements}, computed at compile time
 * by tinymlaas.quantized.softmax_params exactly as TFLite's Prepare computes them.
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

static int32_t srdhm(int32_t a, int32_t b)
{
    if (a == b && a == INT32_MIN)
        return INT32_MAX;
    int64_t ab = (int64_t)a * (int64_t)b;
    int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
    return (int32_t)((ab + nudge) / (1ll << 31));
}

static int32_t rounding_divide_by_pot(int32_t x, int exponent)
{
    int32_t mask = (int32_t)((1ll << exponent) - 1);
    int32_t remainder = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

/* exp(a) for a in [-1/4, 0), Q0.31 in and out */
static int32_t exp_quarter(int32_t a)
{
    const int32_t constant_term = 1895147668;  /* exp(-1/8) */
    const int32_t constant_1_over_3 = 715827883;
    int32_t x = a + (1 << 28);                   /* a + 1/8 */
    int32_t x2 = srdhm(x, x);
    int32_t x3 = srdhm(x2, x);
    int32_t x4 = srdhm(x2, x2);
    int32_t x4_over_4 = rounding_divide_by_pot(x4, 2);
    int32_t poly = rounding_divide_by_pot(srdhm(x4_over_4 + x3, constant_1_over_3) + x2, 1);
    return constant_term + srdhm(constant_term, x + poly);
}

/* exp(a) for a <= 0 given in Q5.26; result Q0.31 */
static int32_t exp_on_negative_values(int32_t a)
{
    const int fractional_bits = 26;
    const int32_t one_quarter = 1 << 24;
    int32_t mask = one_quarter - 1;
    int32_t a_mod_quarter_minus_one_quarter = (a & mask) - one_quarter;
    int32_t result = exp_quarter(tinymlaas_saturating_shift_left(a_mod_quarter_minus_one_quarter, 5));
    int32_t remainder = a_mod_quarter_minus_one_quarter - a;
    static const int32_t multipliers[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
    for (int i = 0; i < 7; i++) {
        int exponent = i - 2;
        if (remainder & (1 << (fractional_bits + exponent)))
            result = srdhm(result, multipliers[i]);
    }
    if (a == 0)
        result = INT32_MAX;
    return result;
}

void tinymlaas_softmax_s8(const int8_t *input, const int32_t *params, int8_t *output)
{
    const int32_t input_multiplier = params[0];
    const int input_left_shift = params[1];
    const int32_t diff_min = params[2];
    const int depth = params[3];
    const int outer = params[4] / depth;
    for (int i = 0; i < outer; i++) {
        const int8_t *in = input + i * depth;
        int8_t *out = output + i * depth;
        int8_t max_in_row = -128;
        for (int c = 0; c < depth; c++)
            max_in_row = in[c] > max_in_row ? in[c] : max_in_row;
        int32_t sum_of_exps = 0; /* Q12.19 */
        for (int c = 0; c < depth; c++) {
            int32_t diff = (int32_t)in[c] - max_in_row;
            if (diff >= diff_min) {
                int32_t scaled = srdhm(diff * (1 << input_left_shift), input_multiplier);
                sum_of_exps += rounding_divide_by_pot(exp_on_negative_values(scaled), 12);
            }
        }
        int headroom_plus_one = tinymlaas_count_leading_zeros((uint32_t)sum_of_exps);
        int num_bits_over_unit = 12 - headroom_plus_one;
        int32_t shifted_sum_minus_one = (int32_t)(((uint32_t)sum_of_exps << headroom_plus_one) - (1u << 31));
        int32_t shifted_scale = tinymlaas_one_over_one_plus_x(shifted_sum_minus_one);
        for (int c = 0; c < depth; c++) {
            int32_t diff = (int32_t)in[c] - max_in_row;
            if (diff >= diff_min) {
                int32_t scaled = srdhm(diff * (1 << input_left_shift), input_multiplier);
                int32_t exp_in_0 = exp_on_negative_values(scaled);
                int32_t unsat = rounding_divide_by_pot(srdhm(shifted_scale, exp_in_0), num_bits_over_unit + 31 - 8);
                int32_t shifted = unsat - 128;
                out[c] = (int8_t)(shifted > 127 ? 127 : shifted < -128 ? -128 : shifted);
            } else {
                out[c] = -128;
            }
        }
    }
}
