/*
 * Quantized REDUCE_PROD (int8, and int16 activations), bit-exact with TFLite's reference kernel: the product is
 * rescaled at every step (by input_scale / output_scale^(1/n), so n rescales make input_scale^n / output_scale)
 * with TFLite's 64-bit MultiplyByQuantizedMultiplier, whose multiplier is rounded to 15 bits.
 *
 * The graph puts the reduced axes last: rows of n elements. params: {rows, n, input_zero_point, output_zero_point,
 * reduced_multiplier (15-bit), total_shift}, from tinymlaas.ops.int8.reduce_prod.
 */
#include <stdint.h>

static int32_t rescale64(int64_t x, int32_t reduced_multiplier, int total_shift)
{
    return (int32_t)((x * reduced_multiplier + ((int64_t)1 << (total_shift - 1))) >> total_shift);
}

#define REDUCE_PROD(T, LO, HI)                                                                                    \
    const int rows = params[0], n = params[1];                                                                    \
    const int32_t zp_in = params[2], zp_out = params[3], multiplier = params[4];                                   \
    const int shift = params[5];                                                                                  \
    for (int r = 0; r < rows; r++) {                                                                              \
        const T *row = input + r * n;                                                                             \
        int32_t acc = (int32_t)row[0] - zp_in;                                                                    \
        for (int k = 1; k < n; k++)                                                                               \
            acc = rescale64((int64_t)acc * ((int32_t)row[k] - zp_in), multiplier, shift);                         \
        int32_t v = rescale64(acc, multiplier, shift) + zp_out;                                                   \
        output[r] = (T)(v < (LO) ? (LO) : v > (HI) ? (HI) : v);                                                   \
    }

void tinymlaas_reduce_prod_s8(const int8_t *input, const int32_t *params, int8_t *output)
{
    REDUCE_PROD(int8_t, -128, 127)
}

void tinymlaas_reduce_prod_s16(const int16_t *input, const int32_t *params, int16_t *output)
{
    REDUCE_PROD(int16_t, -32768, 32767)
}
