/* TFLite's integer UNIDIRECTIONAL_SEQUENCE_LSTM (8x8->16): int8 input, weights and hidden state, int16 gates in
 * Q3.12 and an int16 cell state scaled by a power of two. Bit-exact with the interpreter's kernel, including two of
 * its quirks (kept on purpose, see tinymlaas/ops/recurrent.py): the peephole products cover n_output cells, and a
 * cell state scale below 2^-15 skips the tanh of the cell (its buffer then still holds the input gate).
 *
 * The int16 fixed-point functions follow gemmlowp's generic templates instantiated for int16 (saturating doubling
 * high multiply in 16 bits, constants rounded from their 32-bit forms). */
#include <stdint.h>
#include <string.h>

#include "fixedpoint_s8.h"

static int16_t srdhm16(int16_t a, int16_t b)
{
    if (a == b && a == INT16_MIN)
        return INT16_MAX;
    int32_t ab = (int32_t)a * b;
    int32_t nudge = ab >= 0 ? (1 << 14) : (1 - (1 << 14));
    return (int16_t)((ab + nudge) / (1 << 15));
}

static int16_t rdbp16(int16_t x, int exponent)
{
    int16_t mask = (int16_t)((1 << exponent) - 1);
    int16_t threshold = (int16_t)((mask >> 1) + (x < 0));
    return (int16_t)((x >> exponent) + ((int16_t)(x & mask) > threshold));
}

/* x * 2^exponent: saturating left shift or rounding right shift */
static int16_t mul_pot16(int16_t x, int exponent)
{
    if (exponent > 0) {
        int32_t threshold = (1 << (15 - exponent)) - 1;
        if (x > threshold)
            return INT16_MAX;
        if (x < -threshold)
            return INT16_MIN;
        return (int16_t)(x * (1 << exponent));
    }
    return exponent < 0 ? rdbp16(x, -exponent) : x;
}

static int16_t sat16(int32_t v)
{
    return (int16_t)(v > INT16_MAX ? INT16_MAX : v < INT16_MIN ? INT16_MIN : v);
}

/* a gemmlowp 32-bit constant in 16 bits */
static int16_t c16(int32_t raw32)
{
    return (int16_t)tinymlaas_rounding_divide_by_pot(raw32, 16);
}

/* exp(a) for a in [-1/4, 0), Q0.15 */
static int16_t exp_quarter16(int16_t a)
{
    const int16_t constant_term = c16(1895147668), one_third = c16(715827883);
    int16_t x = (int16_t)(a + (1 << 12));
    int16_t x2 = srdhm16(x, x), x3 = srdhm16(x2, x), x4 = srdhm16(x2, x2);
    int16_t x4_over_4 = mul_pot16(x4, -2);
    int16_t poly = mul_pot16((int16_t)(srdhm16((int16_t)(x4_over_4 + x3), one_third) + x2), -1);
    return sat16((int32_t)constant_term + srdhm16(constant_term, (int16_t)(x + poly)));
}

/* exp(a) for a <= 0 with `int_bits` integer bits; Q0.15 */
static int16_t exp_negative16(int16_t a, int int_bits)
{
    static const int32_t multipliers[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
    const int frac = 15 - int_bits;
    const int16_t one_quarter = (int16_t)(1 << (frac - 2));
    int16_t a_mod = (int16_t)((int16_t)(a & (one_quarter - 1)) - one_quarter);
    int16_t result = exp_quarter16(mul_pot16(a_mod, int_bits));
    int16_t remainder = (int16_t)(a_mod - a);
    for (int i = 0; i < 7; i++) {
        int exponent = i - 2;
        if (int_bits > exponent && (remainder & (1 << (frac + exponent))))
            result = srdhm16(result, c16(multipliers[i]));
    }
    if (int_bits > 5 && a < c16(-(1 << (36 - int_bits))))
        result = 0;
    return a == 0 ? INT16_MAX : result;
}

/* Newton-Raphson for 1 / (1 + a), a in [0, 1), in Q2.13; returns the iterate */
static int16_t reciprocal_iterate16(int16_t half_denominator)
{
    int16_t x = (int16_t)(c16(1515870810) + srdhm16(half_denominator, c16(-1010580540)));
    for (int i = 0; i < 3; i++) {
        int16_t one_minus = (int16_t)((1 << 13) - srdhm16(half_denominator, x));
        x = (int16_t)(x + mul_pot16(srdhm16(x, one_minus), 2));
    }
    return x;
}

static int16_t half_sum_with_one16(int16_t a)
{
    int32_t sum = (int32_t)a + INT16_MAX;
    return (int16_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
}

static int16_t logistic16(int16_t a, int int_bits)
{
    if (a == 0)
        return c16(1 << 30);
    int16_t abs_a = a > 0 ? a : (int16_t)-a;
    int16_t e = exp_negative16((int16_t)-abs_a, int_bits);
    int16_t positive = mul_pot16(reciprocal_iterate16(half_sum_with_one16(e)), 1);
    return a > 0 ? positive : (int16_t)(INT16_MAX - positive);
}

static int16_t tanh16(int16_t a, int int_bits)
{
    if (a == 0)
        return 0;
    int16_t n = a < 0 ? a : (int16_t)-a;
    int16_t e = exp_negative16(n, int_bits + 1);
    int16_t t = mul_pot16((int16_t)(reciprocal_iterate16(half_sum_with_one16(e)) - (1 << 13)), 2);
    return a < 0 ? (int16_t)-t : t;
}

/* gate[r] = sat16(gate[r] + requantize(bias[r] + W[r] . v)) */
static void matvec_acc16(const int8_t *v, const int32_t *bias, const int8_t *w, int32_t a, int32_t b, int n_in,
                         int n_out, int16_t *gate)
{
    for (int r = 0; r < n_out; r++) {
        int32_t acc = bias[r];
        for (int k = 0; k < n_in; k++)
            acc += (int32_t)v[k] * w[r * n_in + k];
        gate[r] = sat16(tinymlaas_requantize(acc, a, b) + gate[r]);
    }
}

enum { P_BATCH, P_STEPS, P_INPUT, P_CELL, P_OUTPUT, P_TIME_MAJOR, P_CIFG, P_PEEPHOLE, P_PROJECTION, P_CELL_SCALE,
       P_CELL_CLIP, P_PROJ_CLIP, P_HIDDEN_ZP, P_STATE_ZP, P_HIDDEN_A, P_HIDDEN_B, P_PROJ_A, P_PROJ_B, P_GATES };
/* per gate (i, f, c, o): input a, b; recurrent a, b; peephole a, b */

struct lstm {
    const int32_t *p;
    const int8_t *w_in, *w_rec, *w_proj;
    const int32_t *bias, *proj_bias;
    const int16_t *peephole;
    int16_t *scratch;
};

/* one time step for `n_batch` rows: x [n_batch, n_input], h [n_batch, n_output], c [n_batch, n_cell] */
static void lstm_step(const struct lstm *m, const int8_t *x, int8_t *h, int16_t *c, int8_t *y, int n_batch)
{
    const int32_t *p = m->p;
    const int n_input = p[P_INPUT], n_cell = p[P_CELL], n_output = p[P_OUTPUT];
    const int n = n_batch * n_cell;
    int16_t *gates[4] = {m->scratch, m->scratch + n, m->scratch + 2 * n, m->scratch + 3 * n};
    int8_t *hidden = (int8_t *)(m->scratch + 4 * n);
    static const int peephole_slot[4] = {0, 1, -1, 2};
    for (int g = 0; g < 4; g++) {
        if (g == 0 && p[P_CIFG])
            continue;
        const int32_t *s = p + P_GATES + 6 * g;
        int16_t *gate = gates[g];
        memset(gate, 0, (size_t)n * sizeof(int16_t));
        for (int b = 0; b < n_batch; b++) {
            matvec_acc16(x + b * n_input, m->bias + (2 * g) * n_cell, m->w_in + g * n_cell * n_input, s[0], s[1],
                         n_input, n_cell, gate + b * n_cell);
            matvec_acc16(h + b * n_output, m->bias + (2 * g + 1) * n_cell, m->w_rec + g * n_cell * n_output, s[2],
                         s[3], n_output, n_cell, gate + b * n_cell);
        }
        if (p[P_PEEPHOLE] && peephole_slot[g] >= 0) {
            /* as the interpreter: n_output products per row, rows n_output apart */
            const int16_t *w = m->peephole + peephole_slot[g] * n_cell;
            for (int b = 0; b < n_batch; b++)
                for (int v = 0; v < n_output; v++) {
                    int32_t prod = tinymlaas_requantize((int32_t)w[v] * c[b * n_output + v], s[4], s[5]);
                    gate[b * n_output + v] = sat16(prod + gate[b * n_output + v]);
                }
        }
        for (int k = 0; k < n; k++)
            gate[k] = g == 2 ? tanh16(gate[k], 3) : logistic16(gate[k], 3);
        if (g == 2) {
            /* the cell state update, before the output gate (whose peephole sees the new state) */
            const int shift = 30 + p[P_CELL_SCALE];
            for (int k = 0; k < n; k++) {
                int16_t forget = gates[1][k];
                int16_t kept = (int16_t)tinymlaas_rounding_divide_by_pot((int32_t)forget * c[k], 15);
                int16_t input = p[P_CIFG] ? (int16_t)(INT16_MAX - forget) : gates[0][k];
                int16_t added = (int16_t)tinymlaas_rounding_divide_by_pot((int32_t)input * gates[2][k], shift);
                int16_t v = sat16((int32_t)kept + added);
                const int16_t clip = (int16_t)p[P_CELL_CLIP];
                if (clip > 0)
                    v = v > clip ? clip : v < -clip ? (int16_t)-clip : v;
                c[k] = v;
            }
        }
    }
    /* hidden = o * tanh(c); the interpreter's tanh only knows 0..6 integer bits (else its buffer keeps the input
     * gate) */
    const int tanh_bits = 15 + p[P_CELL_SCALE];
    int16_t *tanh_c = gates[0];
    if (tanh_bits >= 0 && tanh_bits <= 6)
        for (int k = 0; k < n; k++)
            tanh_c[k] = tanh16(c[k], tanh_bits);
    for (int k = 0; k < n; k++) {
        int32_t v = tinymlaas_requantize((int32_t)gates[3][k] * tanh_c[k], p[P_HIDDEN_A], p[P_HIDDEN_B]) +
                    p[P_HIDDEN_ZP];
        hidden[k] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
    }
    if (p[P_PROJECTION]) {
        const int8_t clip = (int8_t)p[P_PROJ_CLIP];
        for (int b = 0; b < n_batch; b++)
            for (int r = 0; r < n_output; r++) {
                int32_t acc = m->proj_bias[r];
                for (int k = 0; k < n_cell; k++)
                    acc += (int32_t)hidden[b * n_cell + k] * m->w_proj[r * n_cell + k];
                int32_t v = tinymlaas_requantize(acc, p[P_PROJ_A], p[P_PROJ_B]) + p[P_STATE_ZP];
                v = v > 127 ? 127 : v < -128 ? -128 : v;
                if (clip > 0)
                    v = v > clip ? clip : v < -clip ? -clip : v;
                h[b * n_output + r] = (int8_t)v;
            }
    } else {
        memcpy(h, hidden, (size_t)n);
    }
    memcpy(y, h, (size_t)(n_batch * n_output));
}

void tinymlaas_lstm_s8(const int8_t *input, const int8_t *w_in, const int8_t *w_rec, const int32_t *bias,
                       const int16_t *peephole, const int8_t *w_proj, const int32_t *proj_bias, const int8_t *h_in,
                       const int16_t *c_in, const int32_t *params, int8_t *h_out, int16_t *c_out, int16_t *scratch,
                       int8_t *output)
{
    const int n_batch = params[P_BATCH], steps = params[P_STEPS], n_input = params[P_INPUT];
    const int n_cell = params[P_CELL], n_output = params[P_OUTPUT];
    const struct lstm m = {params, w_in, w_rec, w_proj, bias, proj_bias, peephole, scratch};
    memcpy(h_out, h_in, (size_t)(n_batch * n_output));
    memcpy(c_out, c_in, (size_t)(n_batch * n_cell) * sizeof(int16_t));
    if (params[P_TIME_MAJOR]) {
        for (int t = 0; t < steps; t++)
            lstm_step(&m, input + t * n_batch * n_input, h_out, c_out, output + t * n_batch * n_output, n_batch);
    } else {
        for (int b = 0; b < n_batch; b++)
            for (int t = 0; t < steps; t++)
                lstm_step(&m, input + (b * steps + t) * n_input, h_out + b * n_output, c_out + b * n_cell,
                          output + (b * steps + t) * n_output, 1);
    }
}
