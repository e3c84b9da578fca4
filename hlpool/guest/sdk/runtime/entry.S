/*
 * entry.S - the guest's first instruction, the `syscall` entry and the
 * exception vectors. Everything here runs at CPL0 in 64-bit mode with paging
 * set up by the host (see hlpool/layout.py).
 */
#include "hlpool_abi.h"

    .section .text.hl_entry, "ax"

/* Host starts the vCPU here: rsp = top of the stack, rdi = &hl_boot_info. */
    .globl _start
    .type _start, @function
_start:
    xorl %ebp, %ebp
    andq $-16, %rsp
    call hl__start_c
1:  ud2
    jmp 1b
    .size _start, . - _start

/*
 * `syscall` from musl lands here (MSR_LSTAR). The instruction saved the
 * return address in rcx and rflags in r11 and did not touch the stack. We
 * switch to a private stack at once: the caller may keep live data in the
 * 128-byte red zone below its rsp, so nothing may be pushed there. The user's
 * SSE state is saved with fxsave because the C handler may use SSE registers
 * and Linux system calls preserve them.
 */
    .globl hl__syscall_entry
    .type hl__syscall_entry, @function
hl__syscall_entry:
    movq %rsp, hl__syscall_user_rsp(%rip)
    leaq hl__syscall_stack_top(%rip), %rsp
    pushq %rcx                  /* user rip */
    pushq %r11                  /* user rflags */
    pushq %rdi
    pushq %rsi
    pushq %rdx
    pushq %r10
    pushq %r8
    pushq %r9
    fxsave64 hl__syscall_fxsave(%rip)
    subq $8, %rsp               /* keep rsp 16-byte aligned at the call */
    pushq %rax                  /* 7th C argument: the system call number */
    movq %r10, %rcx             /* 4th argument: Linux passes it in r10 */
    call hl__syscall
    addq $16, %rsp
    fxrstor64 hl__syscall_fxsave(%rip)
    popq %r9
    popq %r8
    popq %r10
    popq %rdx
    popq %rsi
    popq %rdi
    popq %r11
    popq %rcx
    /* Return without sysret (which would drop to CPL3): restore rflags on
     * our private stack, then switch back and jump. mov/jmp leave flags alone. */
    pushq %r11
    popfq
    movq hl__syscall_user_rsp(%rip), %rsp
    jmpq *%rcx
    .size hl__syscall_entry, . - hl__syscall_entry

/*
 * Exception vectors 0-31. Every gate uses IST1 (a separate stack set up by
 * the host in the TSS), so a stack overflow into the guard page is still
 * reported. Each stub pushes a dummy error code where the CPU pushes none,
 * then the vector number, and jumps to the common handler.
 */
.macro HL_VECTOR num, has_error
    .globl hl__vector_\num
hl__vector_\num:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\num
    jmp hl__exception_common
.endm

    HL_VECTOR 0, 0
    HL_VECTOR 1, 0
    HL_VECTOR 2, 0
    HL_VECTOR 3, 0
    HL_VECTOR 4, 0
    HL_VECTOR 5, 0
    HL_VECTOR 6, 0
    HL_VECTOR 7, 0
    HL_VECTOR 8, 1
    HL_VECTOR 9, 0
    HL_VECTOR 10, 1
    HL_VECTOR 11, 1
    HL_VECTOR 12, 1
    HL_VECTOR 13, 1
    HL_VECTOR 14, 1
    HL_VECTOR 15, 0
    HL_VECTOR 16, 0
    HL_VECTOR 17, 1
    HL_VECTOR 18, 0
    HL_VECTOR 19, 0
    HL_VECTOR 20, 0
    HL_VECTOR 21, 1
    HL_VECTOR 22, 0
    HL_VECTOR 23, 0
    HL_VECTOR 24, 0
    HL_VECTOR 25, 0
    HL_VECTOR 26, 0
    HL_VECTOR 27, 0
    HL_VECTOR 28, 0
    HL_VECTOR 29, 1
    HL_VECTOR 30, 1
    HL_VECTOR 31, 0

/* Stack on entry: vector, error code, rip, cs, rflags, rsp, ss. */
hl__exception_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call hl__exception          /* does not return */
2:  hlt
    jmp 2b

/* The table of vector entry points, read by hl__install_idt(). It holds
 * absolute addresses, so it lives in relocated (writable) data. */
    .section .data.rel.ro, "aw"
    .balign 8
    .globl hl__vector_table
hl__vector_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad hl__vector_\n
    .endr

    .section .bss
    .balign 16
hl__syscall_fxsave:
    .skip 512
    .balign 16
hl__syscall_stack:
    .skip 16384
hl__syscall_stack_top:
    .balign 8
hl__syscall_user_rsp:
    .skip 8

    .section .note.GNU-stack, "", @progbits
