/*
 * Board support for lowRISC Ibex's simple system (examples/simple_system), simulated from its RTL:
 * one 1 MB RAM at 0x100000, a character output register at 0x20000 and a halt register at 0x20008.
 * No semihosting: the inputs are linked into the image (tinymlaas_inputs_blob), outputs printed (text_io.c);
 * the marks print the core's own counters.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIM_CHAR_OUT (*(volatile uint32_t *)0x20000u)
#define SIM_HALT (*(volatile uint32_t *)0x20008u)

int board_putc(char c, FILE *file)
{
    (void)file;
    SIM_CHAR_OUT = (unsigned char)c;
    return (unsigned char)c;
}

void _exit(int status)
{
    printf("tinymlaas: exit=%d\n", status);
    SIM_HALT = 1;
    for (;;)
        ;
}

/* An exception (an instruction this core lacks, a bad address) ends the run with its cause, not a hang. */
void __attribute__((used)) tinymlaas_ibex_trap(void)
{
    uint32_t cause, epc, tval;
    __asm__ volatile(".option push\n.option arch, +zicsr\n"
                     "csrr %0, mcause\ncsrr %1, mepc\ncsrr %2, mtval\n.option pop"
                     : "=r"(cause), "=r"(epc), "=r"(tval));
    printf("tinymlaas: trap mcause=%lu mepc=0x%lx mtval=0x%lx\n", (unsigned long)cause, (unsigned long)epc,
           (unsigned long)tval);
    _exit(6);
}

/*
 * Ibex's trap vector: mtvec resets to the boot address 0x100000, vectored (exceptions at +0, interrupt N at
 * +4N); the core starts at +0x80. The link places this table at 0x100000, which also makes it the image's
 * lowest address: the simulator's ELF loader puts the lowest loaded address at the start of its RAM.
 */
__asm__(".section .ibex_vectors, \"ax\"\n"
        ".option push\n.option norvc\n"
        ".global tinymlaas_ibex_vectors\n"
        "tinymlaas_ibex_vectors:\n"
        ".rept 32\nj tinymlaas_ibex_trap\n.endr\n"
        ".option pop\n.text\n");

/*
 * Counters: mcycle, minstret and the load and store event counters (mhpmcounter5/6 in Ibex: NumLoads,
 * NumStores), read at the end of mark_begin and at the start of mark_end. What the marks themselves cost
 * is the first region's figure (the harness calls the two marks back to back first); the runner
 * subtracts it, as it does for the QEMU plugin's counts.
 */
struct counters {
    uint32_t instret, cycles, loads, stores;
};

static struct counters begin;

#define READ_COUNTERS(c)                                                                                         \
    __asm__ volatile(".option push\n.option arch, +zicsr\n"                                                      \
                     "csrr %0, minstret\ncsrr %1, mcycle\ncsrr %2, mhpmcounter5\ncsrr %3, mhpmcounter6\n"        \
                     ".option pop"                                                                               \
                     : "=r"((c).instret), "=r"((c).cycles), "=r"((c).loads), "=r"((c).stores)::"memory")

void __attribute__((noinline)) tinymlaas_mark_begin(void) { READ_COUNTERS(begin); }

void __attribute__((noinline)) tinymlaas_mark_end(void)
{
    struct counters end;
    READ_COUNTERS(end);
    printf("region %lu %lu %lu\n", (unsigned long)(end.instret - begin.instret),
           (unsigned long)(end.cycles - begin.cycles),
           (unsigned long)((end.loads - begin.loads) + (end.stores - begin.stores)));
}

extern const uint8_t tinymlaas_inputs_blob[];
extern const uint32_t tinymlaas_inputs_blob_bytes;
static uint32_t input_offset;

int io_open(void)
{
    input_offset = 0;
    return 1;
}

int io_read_input(void *buf, uint32_t nbytes)
{
    if (input_offset + nbytes > tinymlaas_inputs_blob_bytes)
        return 0;
    memcpy(buf, tinymlaas_inputs_blob + input_offset, nbytes);
    input_offset += nbytes;
    return 1;
}
