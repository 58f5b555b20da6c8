/*
 * int8 L2_NORMALIZATION, bit-exact with TFLite's reference kernel: per row, the sum of squares of x - zp, its
 * inverse square root as a fixed-point multiplier (Newton-Raphson in Q3.28, gemmlowp arithmetic), then each
 * element rescaled to the output's fixed scale of 1/128.
 *
 * params: {input zero point, depth, total elements}
 */
#include <stdint.h>

#include "fixedpoint_s8.h"

/* TFLite's GetInvSqrtQuantizedMultiplierExp with reverse_shift -1: 1/sqrt(input) as multiplier and left shift */
static void inverse_sqrt(int32_t input, int32_t *multiplier, int *shift)
{
    if (input <= 1) {
        *multiplier = INT32_MAX;
        *shift = 0;
        return;
    }
    int s = 11;
    while (input >= (1 << 29)) {
        input /= 4;
        ++s;
    }
    int pairs = (tinymlaas_count_leading_zeros((uint32_t)input) - 1) / 2 - 1;
    s -= pairs;
    input <<= 2 * pairs;
    const int32_t half_input = tinymlaas_rounding_divide_by_pot(input >> 1, 1); /* Q3.28 */
    const int32_t half_three = (1 << 28) + (1 << 27);
    int32_t x = 1 << 28;
    for (int i = 0; i < 5; i++) {
        int32_t x3 = tinymlaas_saturating_shift_left(tinymlaas_srdhm(tinymlaas_srdhm(x, x), x), 6);
        int32_t d = (int32_t)((uint32_t)tinymlaas_srdhm(half_three, x) - (uint32_t)tinymlaas_srdhm(half_input, x3));
        x = tinymlaas_saturating_shift_left(d, 3);
    }
    x = tinymlaas_srdhm(x, 1518500250); /* sqrt(2) / 2 */
    if (s < 0) {
        x = (int32_t)((uint32_t)x << -s);
        s = 0;
    }
    *multiplier = x;
    *shift = -s;
}

void tinymlaas_l2norm_s8(const int8_t *input, const int32_t *params, int8_t *output)
{
    const int32_t zp = params[0];
    const int depth = params[1];
    const int outer = params[2] / depth;
    for (int i = 0; i < outer; i++) {
        const int8_t *in = input + i * depth;
        int32_t acc = 0;
        for (int c = 0; c < depth; c++) {
            int32_t v = in[c] - zp;
            acc += v * v;
        }
        int32_t multiplier;
        int shift;
        inverse_sqrt(acc, &multiplier, &shift);
        for (int c = 0; c < depth; c++) {
            int32_t v = tinymlaas_requantize(in[c] - zp, multiplier, shift + 7);
            output[i * depth + c] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        }
    }
}
