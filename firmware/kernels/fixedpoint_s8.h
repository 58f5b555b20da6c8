/* TFLite int8 requantization, bit-exact with tinymlaas.int8_kernels (and TFLite's reference kernels). */
#ifndef TINYMLAAS_FIXEDPOINT_S8_H
#define TINYMLAAS_FIXEDPOINT_S8_H
#include <stdint.h>

/* trunc((a*b + nudge) / 2^31) == floor((a*b + 2^30) / 2^31) for multipliers in [0, 2^31) */
static inline int32_t tinymlaas_srdhm(int32_t a, int32_t b)
{
    return (int32_t)(((int64_t)a * b + (1ll << 30)) >> 31);
}

static inline int32_t tinymlaas_rounding_divide_by_pot(int32_t x, int exponent)
{
    int32_t mask = (int32_t)((1u << exponent) - 1u);
    int32_t threshold = (mask >> 1) + (x < 0);
    return (x >> exponent) + ((x & mask) > threshold);
}

/* TFLite MultiplyByQuantizedMultiplier (double rounding), shift > 0 shifts left */
static inline int32_t tinymlaas_requantize(int32_t acc, int32_t multiplier, int32_t shift)
{
    int left = shift > 0 ? shift : 0;
    int right = shift > 0 ? 0 : -shift;
    return tinymlaas_rounding_divide_by_pot(tinymlaas_srdhm((int32_t)((uint32_t)acc << left), multiplier), right);
}

/* the interpreter's FULLY_CONNECTED: one rounding */
static inline int32_t tinymlaas_requantize_single(int32_t acc, int32_t multiplier, int32_t shift)
{
    int total = 31 - shift;
    return (int32_t)(((int64_t)acc * multiplier + (1ll << (total - 1))) >> total);
}

static inline int8_t tinymlaas_clamp_s8(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : v > hi ? hi : v);
}
#endif
