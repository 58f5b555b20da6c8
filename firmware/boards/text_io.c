/*
 * Harness output for simulated boards without semihosting (Ibex's simple system, Renode's MCU models): each
 * output is printed as one text line "output <hex>", and stdio goes through the board's board_putc (its
 * support file beside this one, which also provides io_open and io_read_input).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int board_putc(char c, FILE *file);

static FILE board_stdio = FDEV_SETUP_STREAM(board_putc, NULL, NULL, _FDEV_SETUP_WRITE);
FILE *const stdin = &board_stdio;
FILE *const stdout = &board_stdio;
FILE *const stderr = &board_stdio;

int io_write_output(const void *buf, uint32_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *p = buf;
    fputs("output ", stdout);
    for (uint32_t i = 0; i < nbytes; i++) {
        putchar(hex[p[i] >> 4]);
        putchar(hex[p[i] & 15]);
    }
    putchar('\n');
    return 1;
}

void io_close(void) { fflush(stdout); }
