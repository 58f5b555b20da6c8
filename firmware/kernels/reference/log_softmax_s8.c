/*
 * int8 log-softmax, bit-exact with TFLite's reference kernel (output scale 16/256, zero point 127): the scaled
 * difference to the row maximum in Q5.26, gemmlowp's fixed-point exp summed in Q12.19, its logarithm in Q5.26
 * (gemmlowp's log for x >= 1: a range reduction by powers of two and sqrt(2), then a rational polynomial), and a
 * rounding shift of the difference to the output's Q4.
 *
 * params: {input_multiplier, input_left_shift, reverse_multiplier, reverse_shift, diff_min, depth, total_elements},
 * computed at compile time by tinymlaas.ops.int8.log_softmax_params as TFLite's Prepare computes them.
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

/* gemmlowp SaturatingRoundingMultiplyByPOT with a run-time exponent: left saturating, right rounding */
static int32_t multiply_by_pot(int32_t x, int exponent)
{
    if (exponent > 0)
        return tinymlaas_saturating_shift_left(x, exponent);
    if (exponent < 0)
        return tinymlaas_rounding_divide_by_pot(x, -exponent);
    return x;
}

static int32_t saturate(int64_t x) { return x > INT32_MAX ? INT32_MAX : x < INT32_MIN ? INT32_MIN : (int32_t)x; }

static int32_t wrapping_add(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }

static int32_t wrapping_sub(int32_t a, int32_t b) { return (int32_t)((uint32_t)a - (uint32_t)b); }

/* log(x) for x >= 1 given in Q12.19; the result in Q5.26 (accumulated in Q6.25) */
static int32_t log_q12_to_q5(int32_t x)
{
    enum { INPUT_BITS = 12, ACCUM_BITS = 6, OUTPUT_BITS = 5 };
    const int32_t log_2 = 1488522236, sqrt_sqrt_half = 1805811301, sqrt_half = 1518500250;
    const int32_t alpha_n = 117049297, alpha_d = 127690142, alpha_i = 1057819769, alpha_f = 638450708;
    const int32_t shifted_quarter = multiply_by_pot(536870912, -ACCUM_BITS); /* 1/4 in Q6.25 */

    int z_a_headroom_plus_1 = tinymlaas_count_leading_zeros((uint32_t)x);
    int32_t r_a_tmp = multiply_by_pot(x, z_a_headroom_plus_1 - 1);
    int32_t r_a = multiply_by_pot(tinymlaas_srdhm_sat(r_a_tmp, sqrt_half), 1);
    int32_t z_a_pow_2_adj = saturate((int64_t)multiply_by_pot(INPUT_BITS - z_a_headroom_plus_1, 31 - ACCUM_BITS)
                                     + shifted_quarter);

    int32_t z_b = tinymlaas_srdhm_sat(x, sqrt_half);
    int z_b_headroom = tinymlaas_count_leading_zeros((uint32_t)z_b) - 1;
    int32_t r_b = multiply_by_pot(x, z_b_headroom);
    int32_t z_b_pow_2_adj = saturate((int64_t)multiply_by_pot(INPUT_BITS - z_b_headroom, 31 - ACCUM_BITS)
                                     - shifted_quarter);

    int32_t r = r_a < r_b ? r_a : r_b;
    int32_t z_pow_2_adj = z_a_pow_2_adj > z_b_pow_2_adj ? z_a_pow_2_adj : z_b_pow_2_adj;

    int64_t half_sum = (int64_t)r + sqrt_sqrt_half; /* gemmlowp RoundingHalfSum */
    int32_t p = (int32_t)((half_sum + (half_sum >= 0 ? 1 : -1)) / 2);
    int32_t q = wrapping_sub(r, sqrt_sqrt_half);
    q = wrapping_add(q, q);

    int32_t common_sq = tinymlaas_srdhm_sat(q, q);
    int32_t num = wrapping_add(tinymlaas_srdhm_sat(q, r),
                               tinymlaas_srdhm_sat(tinymlaas_srdhm_sat(q, common_sq), alpha_n));
    int32_t denom_minus_one = wrapping_add(
        tinymlaas_srdhm_sat(p, wrapping_add(wrapping_add(alpha_i, q), tinymlaas_srdhm_sat(alpha_d, common_sq))),
        tinymlaas_srdhm_sat(alpha_f, q));
    int32_t recip_denom = tinymlaas_one_over_one_plus_x(denom_minus_one);

    int32_t num_scaled = multiply_by_pot(num, -ACCUM_BITS); /* Q0.31 -> Q6.25 */
    int32_t sum = wrapping_add(tinymlaas_srdhm_sat(z_pow_2_adj, log_2), tinymlaas_srdhm_sat(num_scaled, recip_denom));
    return multiply_by_pot(sum, ACCUM_BITS - OUTPUT_BITS);
}

void tinymlaas_log_softmax_s8(const int8_t *input, const int32_t *params, int8_t *output)
{
    const int32_t input_multiplier = params[0];
    const int input_left_shift = params[1];
    const int32_t reverse_multiplier = params[2];
    const int32_t reverse_shift = params[3];
    const int32_t diff_min = params[4];
    const int depth = params[5];
    const int outer = params[6] / depth;
    for (int i = 0; i < outer; i++) {
        const int8_t *in = input + i * depth;
        int8_t *out = output + i * depth;
        const int8_t max_in_row = tinymlaas_row_max_s8(in, depth);
        const int32_t sum_of_exps = /* Q12.19 */
            tinymlaas_sum_of_exps_q12(in, depth, max_in_row, input_multiplier, input_left_shift, diff_min);
        const int32_t log_sum = log_q12_to_q5(sum_of_exps);
        const int32_t reversed = tinymlaas_requantize(wrapping_add(log_sum, INT32_MIN), reverse_multiplier,
                                                      reverse_shift);
        const int32_t adjusted_diff_min = diff_min - 1 > reversed ? diff_min - 1 : reversed;
        for (int c = 0; c < depth; c++) {
            int32_t diff = (int32_t)in[c] - max_in_row;
            if (diff > adjusted_diff_min) {
                int32_t scaled = tinymlaas_requantize(diff, input_multiplier, input_left_shift);
                int32_t v = tinymlaas_rounding_divide_by_pot(wrapping_sub(scaled, log_sum), 31 - 5 - 4) + 127;
                out[c] = tinymlaas_clamp_s8(v, -128, 127);
            } else {
                out[c] = -128;
            }
        }
    }
}
