/*
 * Board support for Renode's MCU models (any platform whose flash and RAM the image is linked for): the image
 * touches no peripheral and holds no inputs. The runner's generated .resc hooks these functions by address:
 * tinymlaas_renode_read (the hook copies the next input from the host's inputs.bin into the buffer and sets
 * renode_read_ok), tinymlaas_renode_write (a line of console text: the hook reads it from the argument
 * registers), the two marks (the hooks read the core's executed-instruction counter, as QEMU's plugin counts
 * between the same two addresses), and tinymlaas_renode_exit (the hook records the status; the run ends).
 */
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define LINE_BYTES 256

void __attribute__((noinline, used)) tinymlaas_renode_write(const char *buf, uint32_t nbytes)
{
    __asm__ volatile("" ::"r"(buf), "r"(nbytes) : "memory");
}

void __attribute__((noinline, used)) tinymlaas_renode_exit(int status)
{
    __asm__ volatile("" ::"r"(status) : "memory");
    for (;;)
        ;
}

void __attribute__((noinline, used)) tinymlaas_renode_read(void *buf, uint32_t nbytes, uint32_t offset)
{
    __asm__ volatile("" ::"r"(buf), "r"(nbytes), "r"(offset) : "memory");
}

volatile uint32_t tinymlaas_renode_read_ok;
static uint32_t input_offset;

#if defined(__riscv)
/* The C library installs no trap handler on RISC-V: an exception (an instruction the core lacks, a bad address)
 * ends the run with its cause instead of a hang. (On Arm the runner hooks the library's fault handler.) */
static void __attribute__((noinline, used, aligned(4))) tinymlaas_renode_trap(void)
{
    uint32_t cause, epc;
    __asm__ volatile(".option push\n.option arch, +zicsr\ncsrr %0, mcause\ncsrr %1, mepc\n.option pop"
                     : "=r"(cause), "=r"(epc));
    printf("tinymlaas: trap mcause=%lu mepc=0x%lx\n", (unsigned long)cause, (unsigned long)epc);
    _exit(6);
}
#endif

int io_open(void)
{
#if defined(__riscv)
    __asm__ volatile(".option push\n.option arch, +zicsr\ncsrw mtvec, %0\n.option pop" ::"r"(tinymlaas_renode_trap));
#endif
    input_offset = 0;
    return 1;
}

int io_read_input(void *buf, uint32_t nbytes)
{
    tinymlaas_renode_read_ok = 0;
    tinymlaas_renode_read(buf, nbytes, input_offset);
    if (!tinymlaas_renode_read_ok)
        return 0;
    input_offset += nbytes;
    return 1;
}

void __attribute__((noinline)) tinymlaas_mark_begin(void) { __asm__ volatile("" ::: "memory"); }
void __attribute__((noinline)) tinymlaas_mark_end(void) { __asm__ volatile("" ::: "memory"); }

static char line[LINE_BYTES];
static uint32_t line_len;

int board_putc(char c, FILE *file)
{
    (void)file;
    line[line_len++] = c;
    if (c == '\n' || line_len == LINE_BYTES) {
        tinymlaas_renode_write(line, line_len);
        line_len = 0;
    }
    return (unsigned char)c;
}

void _exit(int status)
{
    if (line_len)
        tinymlaas_renode_write(line, line_len);
    tinymlaas_renode_exit(status);
    for (;;)
        ;
}
