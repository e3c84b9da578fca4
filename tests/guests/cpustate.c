/* cpustate: reads and writes CPU state that memory restore alone does not cover,
 * to check that no call can see what an earlier call left in registers. */
#include <hlpool.h>

static hl_value set_xmm(const hl_args *a) {
    uint64_t v = (uint64_t)hl_arg_int(a, 0);
    __asm__ volatile("movq %0, %%xmm15\n\tmovq %0, %%xmm7" : : "r"(v));
    return hl_none();
}

static hl_value get_xmm(const hl_args *a) {
    (void)a;
    uint64_t v15, v7;
    __asm__ volatile("movq %%xmm15, %0\n\tmovq %%xmm7, %1" : "=r"(v15), "=r"(v7));
    return hl_int((int64_t)(v15 | v7));
}

static hl_value set_mxcsr(const hl_args *a) {
    uint32_t v = (uint32_t)hl_arg_int(a, 0);
    __asm__ volatile("ldmxcsr %0" : : "m"(v));
    return hl_none();
}

static hl_value get_mxcsr(const hl_args *a) {
    (void)a;
    uint32_t v;
    __asm__ volatile("stmxcsr %0" : "=m"(v));
    return hl_int(v);
}

static hl_value set_regs(const hl_args *a) {
    uint64_t v = (uint64_t)hl_arg_int(a, 0);
    __asm__ volatile("mov %0, %%r15\n\tmov %0, %%r14\n\tmov %0, %%r13\n\tmov %0, %%r12\n\tmov %0, %%rbx"
                     : : "r"(v) : "r15", "r14", "r13", "r12", "rbx");
    return hl_none();
}

static hl_value get_regs(const hl_args *a) {
    (void)a;
    uint64_t r15, r14;
    __asm__ volatile("mov %%r15, %0\n\tmov %%r14, %1" : "=r"(r15), "=r"(r14));
    return hl_int((int64_t)(r15 | r14));
}

static hl_value set_fsbase(const hl_args *a) {
    uint64_t v = (uint64_t)hl_arg_int(a, 0);
    uint64_t old;
    __asm__ volatile("rdfsbase %0" : "=r"(old));
    __asm__ volatile("wrfsbase %0" : : "r"(v));
    /* put libc's thread pointer back before returning into the runtime */
    __asm__ volatile("wrgsbase %0" : : "r"(v));
    __asm__ volatile("wrfsbase %0" : : "r"(old));
    return hl_none();
}

static hl_value get_gsbase(const hl_args *a) {
    (void)a;
    uint64_t v;
    __asm__ volatile("rdgsbase %0" : "=r"(v));
    return hl_int((int64_t)v);
}

int hl_main(void) {
    hl_export("set_xmm", set_xmm);
    hl_export("get_xmm", get_xmm);
    hl_export("set_mxcsr", set_mxcsr);
    hl_export("get_mxcsr", get_mxcsr);
    hl_export("set_regs", set_regs);
    hl_export("get_regs", get_regs);
    hl_export("set_gsbase", set_fsbase);
    hl_export("get_gsbase", get_gsbase);
    return 0;
}
