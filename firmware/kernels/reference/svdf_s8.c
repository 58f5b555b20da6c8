/* TFLite's integer SVDF: int8 input and feature weights, int16 time weights and state (zero point 0), int32 bias,
 * int8 output. Bit-exact with the interpreter's reference: the new feature activations are requantized into the
 * last slot of each filter's memory, the memory is dotted with the time weights, ranks summed, bias added,
 * requantized; no activation (the interpreter applies none in this kernel). */
#include <stdint.h>
#include <string.h>

#include "fixedpoint_s8.h"

enum { P_BATCH, P_INPUT, P_FILTERS, P_MEMORY, P_RANK, P_INPUT_ZP, P_OUTPUT_ZP, P_SCALE1_A, P_SCALE1_B, P_SCALE2_A,
       P_SCALE2_B };

void tinymlaas_svdf_s8(const int8_t *input, const int8_t *w_feature, const int16_t *w_time, const int32_t *bias,
                       const int16_t *state_in, const int32_t *params, int16_t *state_out, int32_t *scratch,
                       int8_t *output)
{
    const int n_batch = params[P_BATCH], n_input = params[P_INPUT], n_filter = params[P_FILTERS];
    const int n_memory = params[P_MEMORY], n_rank = params[P_RANK], n_unit = n_filter / n_rank;
    const int total = n_batch * n_filter * n_memory;
    /* the memory shifted left by one (the whole buffer, as the interpreter; each row's last slot is rewritten) */
    memcpy(state_out, state_in + 1, (size_t)(total - 1) * sizeof(int16_t));
    for (int b = 0; b < n_batch; b++) {
        const int8_t *x = input + b * n_input;
        for (int f = 0; f < n_filter; f++) {
            int32_t dot = 0;
            for (int c = 0; c < n_input; c++)
                dot += (int32_t)w_feature[f * n_input + c] * (x[c] - params[P_INPUT_ZP]);
            dot = tinymlaas_requantize(dot, params[P_SCALE1_A], params[P_SCALE1_B]);
            state_out[(b * n_filter + f) * n_memory + n_memory - 1] =
                (int16_t)(dot > INT16_MAX ? INT16_MAX : dot < INT16_MIN ? INT16_MIN : dot);
        }
    }
    for (int b = 0; b < n_batch; b++)
        for (int f = 0; f < n_filter; f++) {
            const int16_t *memory = state_out + (b * n_filter + f) * n_memory;
            int32_t acc = 0;
            for (int m = 0; m < n_memory; m++)
                acc += (int32_t)w_time[f * n_memory + m] * memory[m];
            scratch[b * n_filter + f] = acc;
        }
    for (int b = 0; b < n_batch; b++)
        for (int u = 0; u < n_unit; u++) {
            int32_t acc = 0;
            for (int r = 0; r < n_rank; r++)
                acc += scratch[b * n_filter + u * n_rank + r];
            acc += bias[u];
            int32_t v = tinymlaas_requantize(acc, params[P_SCALE2_A], params[P_SCALE2_B]) + params[P_OUTPUT_ZP];
            output[b * n_unit + u] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
        }
}
