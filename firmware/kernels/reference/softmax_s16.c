/*
 * int16 softmax, bit-exact with TFLite's reference kernel (SoftmaxInt16: int16 in, int16 out of scale 1/32768):
 * the difference to the row maximum rescaled so that [-65535, 0] means [-10, 0], exp() read from a 513-entry
 * table with linear interpolation, the sum normalised by its leading zeros, 1/(1 + x) from a second table.
 *
 * tables: exp on [-10, 0] and 1/(1 + x) on [0, 1], 513 entries each, made at compile time by
 * tinymlaas.ops.int16.interpolation_table as TFLite's Prepare makes them.
 * params: {input_multiplier, input_left_shift, depth, total_elements}.
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

/* table[256 + (v >> 7)], interpolated over the low 7 bits with rounding */
static int16_t table_lookup(int16_t v, const int16_t *table)
{
    int index = 256 + (v >> 7);
    int32_t offset = v & 0x7f;
    int32_t base = table[index];
    int32_t slope = table[index + 1] - table[index];
    return (int16_t)(base + ((slope * offset + 64) >> 7));
}

static int16_t saturate_s16(int32_t v)
{
    return (int16_t)(v < -32768 ? -32768 : v > 32767 ? 32767 : v);
}

void tinymlaas_softmax_s16(const int16_t *input, const int16_t *exp_table, const int16_t *reciprocal_table,
                           const int32_t *params, int16_t *output)
{
    const int32_t input_multiplier = params[0];
    const int32_t input_left_shift = params[1];
    const int depth = params[2];
    const int outer = params[3] / depth;
    for (int i = 0; i < outer; i++) {
        const int16_t *in = input + i * depth;
        int16_t *out = output + i * depth;
        int16_t max_in_row = -32768;
        for (int c = 0; c < depth; c++)
            max_in_row = in[c] > max_in_row ? in[c] : max_in_row;
        int32_t sum_of_exps = 0; /* Q16.15; the exps are kept in the output row */
        for (int c = 0; c < depth; c++) {
            int32_t scaled = tinymlaas_requantize((int32_t)in[c] - max_in_row, input_multiplier, input_left_shift);
            out[c] = table_lookup(saturate_s16(scaled + 32767), exp_table);
            sum_of_exps += out[c];
        }
        int headroom_plus_one = sum_of_exps ? __builtin_clz((uint32_t)sum_of_exps) : 32;
        int32_t shifted_sum = (int32_t)((((int64_t)sum_of_exps << (headroom_plus_one - 1)) + (1 << 13)) >> 14);
        int16_t reciprocal = table_lookup(saturate_s16(shifted_sum - ((1 << 15) + (1 << 16))), reciprocal_table);
        int right_shift = 31 - headroom_plus_one;
        int64_t round = (int64_t)1 << (right_shift - 1);
        for (int c = 0; c < depth; c++) {
            int32_t result = (int32_t)(((int64_t)out[c] * reciprocal + round) >> right_shift);
            out[c] = (int16_t)(result < 0 ? 0 : result > 32767 ? 32767 : result);
        }
    }
}
