/*
 * int8 softmax, bit-exact with TFLite's reference kernel (reference_ops::Softmax for int8 in and out,
 * output scale 1/256, zero point -128): gemmlowp fixed-point exp of the scaled difference to the row
 * maximum, a fixed-point reciprocal of the sum, rounding shifts.
 *
 * params: {input_multiplier, input_left_shift, diff_min, depth, total_elements}, computed at compile time
 * by tinymlaas/ops/quantization.py softmax_params exactly as TFLite's Prepare computes them.
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

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
        const int8_t max_in_row = tinymlaas_row_max_s8(in, depth);
        const int32_t sum_of_exps = /* Q12.19 */
            tinymlaas_sum_of_exps_q12(in, depth, max_in_row, input_multiplier, input_left_shift, diff_min);
        int headroom_plus_one = tinymlaas_count_leading_zeros((uint32_t)sum_of_exps);
        int num_bits_over_unit = 12 - headroom_plus_one;
        int32_t shifted_sum_minus_one = (int32_t)(((uint32_t)sum_of_exps << headroom_plus_one) - (1u << 31));
        int32_t shifted_scale = tinymlaas_one_over_one_plus_x(shifted_sum_minus_one);
        for (int c = 0; c < depth; c++) {
            int32_t diff = (int32_t)in[c] - max_in_row;
            if (diff >= diff_min) {
                int32_t scaled = tinymlaas_srdhm_sat(diff * (1 << input_left_shift), input_multiplier);
                int32_t exp_in_0 = tinymlaas_exp_on_negative_values(scaled);
                int32_t unsat = tinymlaas_rounding_divide_by_pot(tinymlaas_srdhm_sat(shifted_scale, exp_in_0), num_bits_over_unit + 31 - 8);
                int32_t shifted = unsat - 128;
                out[c] = (int8_t)(shifted > 127 ? 127 : shifted < -128 ? -128 : shifted);
            } else {
                out[c] = -128;
            }
        }
    }
}
