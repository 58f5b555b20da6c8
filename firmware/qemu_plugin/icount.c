/*
 * tinymlaas QEMU TCG plugin: exact instruction and memory-access counts between two marker
 * functions of the guest (tinymlaas_mark_begin / tinymlaas_mark_end).
 *
 * Debian's QEMU 7.2 ships no plugin headers, so the few API-v1 declarations used here are
 * declared locally; they match include/qemu/qemu-plugin.h of that release.
 *
 * Arguments: begin=ADDR,end=ADDR,out=PATH. Each completed begin..end region appends one line
 * "region <instructions> <memory accesses>" to PATH. (QEMU 7.2 miscounts inline memory ops filtered
 * to loads or stores only, so loads and stores are counted together.)
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W, QEMU_PLUGIN_MEM_RW };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_mem_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_mem_rw rw,
                                          enum qemu_plugin_op op, void *ptr, uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insns, accesses;
static uint64_t begin_insns, begin_accesses;
static uint64_t begin_addr = UINT64_MAX, end_addr = UINT64_MAX;
static FILE *out;

/* blocks=1: per translated block, how often it ran inside each region ("block VADDR NINSNS COUNT" lines after
 * the region's line): the per-block profile a cycle estimate multiplies with each block's cost. */
struct block {
    uint64_t vaddr, end, count, at_begin, taken, taken_at_begin;
    size_t ninsns;
    struct block *next;
};
static int profile_blocks;
static struct block *blocks, *previous;

/* Each block's exit to anywhere but the next address is a taken branch, jump, call or return: the cores' pipelines
 * pay for those, and a per-block static cost cannot see them. */
static void on_block(unsigned int vcpu, void *udata)
{
    (void)vcpu;
    struct block *b = udata;
    if (previous && b->vaddr != previous->end)
        previous->taken++;
    previous = b;
}

static void snapshot_blocks(void)
{
    for (struct block *b = blocks; b; b = b->next)
        b->at_begin = b->count, b->taken_at_begin = b->taken;
}

static void print_blocks(void)
{
    for (struct block *b = blocks; b; b = b->next)
        if (b->count != b->at_begin)
            fprintf(out, "block %#" PRIx64 " %zu %" PRIu64 " %" PRIu64 "\n", b->vaddr, b->ninsns, b->count - b->at_begin,
                    b->taken - b->taken_at_begin);
}

static void on_begin(unsigned int vcpu, void *udata)
{
    (void)vcpu, (void)udata;
    begin_insns = insns;
    begin_accesses = accesses;
    if (profile_blocks)
        snapshot_blocks();
}

static void on_end(unsigned int vcpu, void *udata)
{
    (void)vcpu, (void)udata;
    fprintf(out, "region %" PRIu64 " %" PRIu64 "\n", insns - begin_insns, accesses - begin_accesses);
    if (profile_blocks)
        print_blocks();
    fflush(out);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    /* Marker callbacks first, so each sees the count before its own block is added. */
    if (pc == begin_addr)
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_begin, QEMU_PLUGIN_CB_NO_REGS, NULL);
    if (pc == end_addr)
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_end, QEMU_PLUGIN_CB_NO_REGS, NULL);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    if (profile_blocks) { /* a block translated again (same address and length) keeps one counter */
        struct block *b = blocks;
        while (b && !(b->vaddr == pc && b->ninsns == n))
            b = b->next;
        if (!b) {
            struct qemu_plugin_insn *last = qemu_plugin_tb_get_insn(tb, n - 1);
            b = calloc(1, sizeof *b);
            b->vaddr = pc, b->ninsns = n, b->next = blocks;
            b->end = qemu_plugin_insn_vaddr(last) + qemu_plugin_insn_size(last);
            blocks = b;
        }
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block, QEMU_PLUGIN_CB_NO_REGS, b);
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        qemu_plugin_register_vcpu_mem_inline(insn, QEMU_PLUGIN_MEM_RW, QEMU_PLUGIN_INLINE_ADD_U64, &accesses, 1);
    }
}

static void on_plugin_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id, (void)udata;
    fprintf(out, "total %" PRIu64 " %" PRIu64 "\n", insns, accesses);
    fclose(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "begin=", 6) == 0)
            begin_addr = strtoull(argv[i] + 6, NULL, 0);
        else if (strncmp(argv[i], "end=", 4) == 0)
            end_addr = strtoull(argv[i] + 4, NULL, 0);
        else if (strncmp(argv[i], "out=", 4) == 0)
            path = argv[i] + 4;
        else if (strcmp(argv[i], "blocks=1") == 0)
            profile_blocks = 1;
    }
    if (!path || begin_addr == UINT64_MAX || end_addr == UINT64_MAX) {
        fprintf(stderr, "tinymlaas icount plugin: needs begin=, end= and out=\n");
        return -1;
    }
    out = fopen(path, "w");
    if (!out)
        return -1;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
    return 0;
}
