/*
 * tinymlaas measurement harness: runs the generated model on every input in inputs.bin
 * (read over semihosting), writes the outputs to outputs.bin, and brackets each inference
 * with marker calls that the QEMU counting plugin turns into exact per-inference counts.
 * The stack below main is painted first so that the inference's high-water mark can be read.
 *
 * -DTINYMLAAS_BOARD_IO (a simulated board without semihosting: the Ibex simple system, Renode's MCU models):
 * the inputs are linked in and each output is printed as one hex line "output <hex>" (boards/linked_io.c);
 * the marks are the board's (boards/<board>.c): Ibex's read the core's own counters and print one line
 * "region <instructions> <cycles> <loads+stores>" each, Renode's are hooked by the runner.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "tinymlaas_model.h"

#define STACK_PAINT 0x5AA5F00Du
#define STACK_WINDOW (64u * 1024u)

extern char __heap_start[]; /* end of .bss, from picolibc's linker script */

static uint8_t input_buf[TINYMLAAS_INPUT_BYTES_TOTAL] __attribute__((aligned(16)));
static uint8_t output_buf[TINYMLAAS_OUTPUT_BYTES_TOTAL] __attribute__((aligned(16)));

#ifdef TINYMLAAS_BOARD_IO
/* Defined by the board's support file (firmware/boards/). */
void tinymlaas_mark_begin(void);
void tinymlaas_mark_end(void);
int io_open(void);
int io_read_input(void *buf, uint32_t nbytes);
int io_write_output(const void *buf, uint32_t nbytes);
void io_close(void);
#else
/* The plugin counts between entries of these two functions; keep them out of line and empty. noipa: the
 * calls cost what calls to a board's marks (another file) cost, so a count is the same on every runner. */
void __attribute__((noipa)) tinymlaas_mark_begin(void) { __asm__ volatile("" ::: "memory"); }
void __attribute__((noipa)) tinymlaas_mark_end(void) { __asm__ volatile("" ::: "memory"); }

/* Inputs and outputs as files on the host, over semihosting. Out of line: main's frame, from which the stack
 * peak is measured, stays what it was with the calls written in it. */
static FILE *in, *out;

static int __attribute__((noinline)) io_open(void)
{
    in = fopen("inputs.bin", "rb");
    out = fopen("outputs.bin", "wb");
    return in && out;
}

static int __attribute__((noinline)) io_read_input(void *buf, uint32_t nbytes) { return fread(buf, 1, nbytes, in) == nbytes; }

static int __attribute__((noinline)) io_write_output(const void *buf, uint32_t nbytes) { return fwrite(buf, 1, nbytes, out) == nbytes; }

static void __attribute__((noinline)) io_close(void)
{
    fclose(out);
    fclose(in);
}
#endif

static uint32_t *paint_low;

#ifdef TINYMLAAS_TRACE
static FILE *trace_file;

void tinymlaas_trace(const void *data, uint32_t nbytes)
{
    fwrite(data, 1, nbytes, trace_file);
}
#endif

static void __attribute__((noinline)) paint_stack(uintptr_t top)
{
    uintptr_t low = (uintptr_t)__heap_start;
    if (top - low > STACK_WINDOW)
        low = top - STACK_WINDOW;
    paint_low = (uint32_t *)((low + 3u) & ~(uintptr_t)3u);
    /* Stop well above this function's own frame. */
    uint32_t *end = (uint32_t *)(((uintptr_t)__builtin_frame_address(0) - 256u) & ~(uintptr_t)3u);
    for (volatile uint32_t *p = paint_low; p < end; p++)
        *p = STACK_PAINT;
}

static uintptr_t lowest_touched(void)
{
    uint32_t *p = paint_low;
    while (*p == STACK_PAINT)
        p++;
    return (uintptr_t)p;
}

int main(void)
{
    if (!io_open()) {
        printf("tinymlaas: cannot open inputs.bin or outputs.bin\n");
        return 3;
    }
#ifdef TINYMLAAS_TRACE
    trace_file = fopen("trace.bin", "wb");
    if (!trace_file) {
        printf("tinymlaas: cannot open trace.bin\n");
        return 3;
    }
#endif
    const void *inputs[TINYMLAAS_NUM_INPUTS];
    void *outputs[TINYMLAAS_NUM_OUTPUTS];
    uint32_t off = 0;
    for (int i = 0; i < TINYMLAAS_NUM_INPUTS; i++) {
        inputs[i] = input_buf + off;
        off += tinymlaas_input_bytes[i];
    }
    off = 0;
    for (int i = 0; i < TINYMLAAS_NUM_OUTPUTS; i++) {
        outputs[i] = output_buf + off;
        off += tinymlaas_output_bytes[i];
    }

    /* Calibration: the cost of the two marks with nothing between them. */
    tinymlaas_mark_begin();
    tinymlaas_mark_end();

    volatile uint32_t frame_marker = 0;
    uintptr_t top = (uintptr_t)&frame_marker;
    paint_stack(top);

    unsigned count = 0;
    while (io_read_input(input_buf, sizeof input_buf)) {
        tinymlaas_mark_begin();
        int rc = tinymlaas_model_run(inputs, outputs);
        tinymlaas_mark_end();
        if (rc != 0) {
            printf("tinymlaas: inference %u failed with %d\n", count, rc);
            return 4;
        }
        if (!io_write_output(output_buf, sizeof output_buf)) {
            printf("tinymlaas: cannot write outputs.bin\n");
            return 5;
        }
        count++;
    }
    io_close();
#ifdef TINYMLAAS_TRACE
    fclose(trace_file);
#endif
    uintptr_t low = lowest_touched();
    printf("tinymlaas: inferences=%u stack_bytes=%lu stack_window=%lu overflowed_window=%d\n", count,
           (unsigned long)(top - low), (unsigned long)(top - (uintptr_t)paint_low), low == (uintptr_t)paint_low);
    return 0;
}
