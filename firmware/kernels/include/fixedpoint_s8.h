/* TFLite int8 requantization, bit-exact with tinymlaas/ops/int8_te.py (and TFLite's reference kernels), and what
 * the int8 kernels share. */
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

static inline int32_t tinymlaas_saturating_shift_left(int32_t x, int exponent)
{
    int32_t threshold = (int32_t)((1u << (31 - exponent)) - 1);
    if (x > threshold)
        return INT32_MAX;
    if (x < -threshold)
        return INT32_MIN;
    return (int32_t)((uint32_t)x << exponent);
}

static inline int tinymlaas_count_leading_zeros(uint32_t x)
{
    return x ? __builtin_clz(x) : 32;
}

/* gemmlowp's 1 / (1 + x) for x in [0, 1), Q0.31 in and out (Newton-Raphson, 3 steps, in Q2.29) */
static inline int32_t tinymlaas_one_over_one_plus_x(int32_t a)
{
    int64_t sum = (int64_t)a + INT32_MAX; /* rounding half sum of a and 1 */
    int32_t half_denominator = (int32_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
    const int32_t c48_over_17 = 1515870810;
    const int32_t cneg32_over_17 = -1010580540;
    int32_t x = c48_over_17 + tinymlaas_srdhm(half_denominator, cneg32_over_17);
    for (int i = 0; i < 3; i++) {
        int32_t one_minus = (1 << 29) - tinymlaas_srdhm(half_denominator, x);
        x = x + tinymlaas_saturating_shift_left(tinymlaas_srdhm(x, one_minus), 2);
    }
    return tinymlaas_saturating_shift_left(x, 1);
}

/* Not `inline`: the compiler's own choice keeps the softmax kernels as small as when these were local to them
 * (inlined everywhere they cost ~600 B of flash for 0.002% fewer instructions). */
#define TINYMLAAS_HELPER static __attribute__((unused))

/* gemmlowp's SaturatingRoundingDoublingHighMul for any operands (the one case that overflows saturates) */
TINYMLAAS_HELPER int32_t tinymlaas_srdhm_sat(int32_t a, int32_t b)
{
    if (a == b && a == INT32_MIN)
        return INT32_MAX;
    int64_t ab = (int64_t)a * (int64_t)b;
    int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
    return (int32_t)((ab + nudge) / (1ll << 31));
}

/* gemmlowp's exp(a) for a in [-1/4, 0), Q0.31 in and out */
TINYMLAAS_HELPER int32_t tinymlaas_exp_quarter(int32_t a)
{
    const int32_t constant_term = 1895147668;  /* exp(-1/8) */
    const int32_t constant_1_over_3 = 715827883;
    int32_t x = a + (1 << 28);                   /* a + 1/8 */
    int32_t x2 = tinymlaas_srdhm_sat(x, x);
    int32_t x3 = tinymlaas_srdhm_sat(x2, x);
    int32_t x4 = tinymlaas_srdhm_sat(x2, x2);
    int32_t x4_over_4 = tinymlaas_rounding_divide_by_pot(x4, 2);
    int32_t poly = tinymlaas_rounding_divide_by_pot(tinymlaas_srdhm_sat(x4_over_4 + x3, constant_1_over_3) + x2, 1);
    return constant_term + tinymlaas_srdhm_sat(constant_term, x + poly);
}

/* gemmlowp's exp(a) for a <= 0 given in Q5.26; result Q0.31 */
TINYMLAAS_HELPER int32_t tinymlaas_exp_on_negative_values(int32_t a)
{
    const int fractional_bits = 26;
    const int32_t one_quarter = 1 << 24;
    int32_t mask = one_quarter - 1;
    int32_t a_mod_quarter_minus_one_quarter = (a & mask) - one_quarter;
    int32_t result = tinymlaas_exp_quarter(tinymlaas_saturating_shift_left(a_mod_quarter_minus_one_quarter, 5));
    int32_t remainder = a_mod_quarter_minus_one_quarter - a;
    static const int32_t multipliers[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
    for (int i = 0; i < 7; i++) {
        int exponent = i - 2;
        if (remainder & (1 << (fractional_bits + exponent)))
            result = tinymlaas_srdhm_sat(result, multipliers[i]);
    }
    if (a == 0)
        result = INT32_MAX;
    return result;
}

/* The softmax family's first two steps over one row, as TFLite's reference kernels take them: the row maximum, and
 * the sum in Q12.19 of gemmlowp's exp of each difference to it (scaled to Q5.26), differences below diff_min out. */
TINYMLAAS_HELPER int8_t tinymlaas_row_max_s8(const int8_t *row, int depth)
{
    int8_t max_in_row = -128;
    for (int c = 0; c < depth; c++)
        max_in_row = row[c] > max_in_row ? row[c] : max_in_row;
    return max_in_row;
}

TINYMLAAS_HELPER int32_t tinymlaas_sum_of_exps_q12(const int8_t *row, int depth, int8_t max_in_row,
                                                    int32_t input_multiplier, int input_left_shift, int32_t diff_min)
{
    int32_t sum_of_exps = 0;
    for (int c = 0; c < depth; c++) {
        int32_t diff = (int32_t)row[c] - max_in_row;
        if (diff >= diff_min) {
            int32_t scaled = tinymlaas_srdhm_sat(diff * (1 << input_left_shift), input_multiplier);
            sum_of_exps += tinymlaas_rounding_divide_by_pot(tinymlaas_exp_on_negative_values(scaled), 12);
        }
    }
    return sum_of_exps;
}

static inline int8_t tinymlaas_clamp_s8(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : v > hi ? hi : v);
}

#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>

/* bytes 1 and 3, widened (and offset): the rotate is part of the instruction; gcc 12 does not fold it */
static inline int32_t tinymlaas_sxtb16_ror8(int32_t x)
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}

static inline int32_t tinymlaas_sxtab16_ror8(int32_t acc, int32_t x)
{
    int32_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(acc), "r"(x));
    return r;
}
#endif
#endif
