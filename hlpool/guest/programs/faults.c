/* faults: functions that fail in every way a guest can, to show the host's reports. */
#include <hlpool.h>
#include <stdio.h>
#include <stdlib.h>

static volatile int zero = 0;

static hl_value null_deref(const hl_args *args) {
    (void)args;
    volatile int *p = (volatile int *)(uintptr_t)zero;
    return hl_int(*p);
}

static hl_value divide_by_zero(const hl_args *args) {
    (void)args;
    return hl_int(42 / zero);
}

static hl_value invalid_opcode(const hl_args *args) {
    (void)args;
    __asm__ volatile("ud2");
    return hl_none();
}

static int recurse(int depth) {
    volatile char pad[1024];
    pad[0] = (char)depth;
    return recurse(depth + 1) + pad[0];
}

static hl_value stack_overflow(const hl_args *args) {
    (void)args;
    return hl_int(recurse(0));
}

static hl_value infinite_loop(const hl_args *args) {
    (void)args;
    for (;;) __asm__ volatile("" ::: "memory");
    return hl_none();
}

static hl_value write_code(const hl_args *args) {
    (void)args;
    *(volatile uint8_t *)(uintptr_t)&write_code = 0xcc; /* code pages are read-only */
    return hl_none();
}

static hl_value fail(const hl_args *args) { return hl_error("failed on purpose: %s", hl_arg_str(args, 0, NULL)); }

static hl_value call_abort(const hl_args *args) {
    (void)args;
    fprintf(stderr, "about to abort\n");
    abort();
}

static hl_value call_exit(const hl_args *args) { exit((int)hl_arg_int(args, 0)); }

/* Uses a mapped host file if present: returns its first `n` bytes. */
static hl_value read_file(const hl_args *args) {
    size_t size;
    const char *name = hl_arg_str(args, 0, NULL);
    const uint8_t *data = hl_mapped_file(name, &size);
    if (!data) return hl_error("no mapped file named %s", name);
    int64_t n = hl_arg_int(args, 1);
    if (n < 0 || (size_t)n > size) n = (int64_t)size;
    return hl_bytes(data, (size_t)n);
}

static hl_value write_file(const hl_args *args) {
    size_t size;
    uint8_t *data = (uint8_t *)hl_mapped_file(hl_arg_str(args, 0, NULL), &size);
    if (!data) return hl_error("not mapped");
    data[0] = 1; /* mapped files are read-only */
    return hl_none();
}

int hl_main(void) {
    hl_export("null_deref", null_deref);
    hl_export("divide_by_zero", divide_by_zero);
    hl_export("invalid_opcode", invalid_opcode);
    hl_export("stack_overflow", stack_overflow);
    hl_export("infinite_loop", infinite_loop);
    hl_export("write_code", write_code);
    hl_export("fail", fail);
    hl_export("abort", call_abort);
    hl_export("exit", call_exit);
    hl_export("read_file", read_file);
    hl_export("write_file", write_file);
    return 0;
}
