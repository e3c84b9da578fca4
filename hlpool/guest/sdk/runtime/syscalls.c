/*
 * syscalls.c - the Linux system calls musl needs, served inside the guest.
 *
 * musl issues `syscall`; entry.S switches stacks, saves the SSE state and
 * calls hl__syscall(). Nothing here leaves the VM except getrandom (one host
 * exit per 4 KiB-ish chunk) and log flushes when the log buffer is full.
 * Unknown calls return -ENOSYS.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>

#include "runtime.h"

#define ARCH_SET_FS 0x1002
#define ARCH_GET_FS 0x1003
#define TIOCGWINSZ 0x5413

static const char *signal_name(long sig) {
    switch (sig) {
    case SIGABRT: return "SIGABRT (abort)";
    case SIGSEGV: return "SIGSEGV";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGBUS: return "SIGBUS";
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    default: return "a signal";
    }
}

static long sys_write(long fd, const char *buf, size_t len) {
    if (fd != 1 && fd != 2) return -EBADF;
    hl__log_write(buf, len);
    return (long)len;
}

static long sys_writev(long fd, const struct iovec *iov, long count) {
    if (fd != 1 && fd != 2) return -EBADF;
    if (count < 0 || count > 1024) return -EINVAL;
    long total = 0;
    for (long i = 0; i < count; i++) {
        hl__log_write(iov[i].iov_base, iov[i].iov_len);
        total += (long)iov[i].iov_len;
    }
    return total;
}

static long sys_clock_gettime(long clock, struct timespec *ts) {
    uint64_t ns;
    switch (clock) {
    case CLOCK_REALTIME:
    case CLOCK_REALTIME_COARSE: ns = hl__clock_realtime_ns(); break;
    case CLOCK_MONOTONIC:
    case CLOCK_MONOTONIC_RAW:
    case CLOCK_MONOTONIC_COARSE:
    case CLOCK_BOOTTIME:
    case CLOCK_PROCESS_CPUTIME_ID:
    case CLOCK_THREAD_CPUTIME_ID: ns = hl__clock_monotonic_ns(); break;
    default: return -EINVAL;
    }
    ts->tv_sec = (time_t)(ns / 1000000000u);
    ts->tv_nsec = (long)(ns % 1000000000u);
    return 0;
}

static long sys_exit(long status) {
    hl__out_record(HL_MSG_EXIT, 0, (uint64_t)status);
    hl__finish_call();
}

static long sys_kill(long sig) {
    const char *name = signal_name(sig);
    hl__out_record_bytes(HL_MSG_SIGNAL, name, strlen(name), (uint64_t)sig);
    hl__finish_call();
}

long hl__syscall(long a1, long a2, long a3, long a4, long a5, long a6, long nr);
long hl__syscall(long a1, long a2, long a3, long a4, long a5, long a6, long nr) {
    switch (nr) {
    case SYS_write: return sys_write(a1, (const char *)a2, (size_t)a3);
    case SYS_writev: return sys_writev(a1, (const struct iovec *)a2, a3);
    case SYS_read:
    case SYS_readv: return a1 == 0 ? 0 : -EBADF; /* stdin is empty */
    case SYS_ioctl:
        /* Tell musl stdout is a terminal so it line-buffers: output reaches
         * the log as soon as a line is complete. */
        if ((a1 == 1 || a1 == 2) && a2 == TIOCGWINSZ) {
            unsigned short *ws = (unsigned short *)a3;
            ws[0] = 24;
            ws[1] = 80;
            ws[2] = ws[3] = 0;
            return 0;
        }
        return -ENOTTY;
    case SYS_close: return a1 <= 2 ? 0 : -EBADF;
    case SYS_lseek: return -ESPIPE;
    case SYS_brk: return hl__sys_brk((uintptr_t)a1);
    case SYS_mmap: return hl__sys_mmap((uintptr_t)a1, (size_t)a2, (int)a3, (int)a4, (int)a5, a6);
    case SYS_munmap: return hl__sys_munmap((uintptr_t)a1, (size_t)a2);
    case SYS_mremap: return -ENOMEM; /* musl falls back to malloc + copy */
    case SYS_mprotect:
    case SYS_madvise: return 0;
    case SYS_clock_gettime: return sys_clock_gettime(a1, (struct timespec *)a2);
    case SYS_gettimeofday: {
        uint64_t ns = hl__clock_realtime_ns();
        long *tv = (long *)a1;
        if (tv) {
            tv[0] = (long)(ns / 1000000000u);
            tv[1] = (long)(ns % 1000000000u / 1000u);
        }
        return 0;
    }
    case SYS_time: {
        long t = (long)(hl__clock_realtime_ns() / 1000000000u);
        if (a1) *(long *)a1 = t;
        return t;
    }
    case SYS_clock_getres: {
        struct timespec *ts = (struct timespec *)a2;
        if (ts) {
            ts->tv_sec = 0;
            ts->tv_nsec = 1;
        }
        return 0;
    }
    case SYS_nanosleep:
    case SYS_clock_nanosleep:
    case SYS_sched_yield: return 0; /* no other work to yield to */
    case SYS_getrandom: return hl__get_random((void *)a1, (size_t)a2);
    case SYS_arch_prctl:
        if (a1 == ARCH_SET_FS) {
            __asm__ volatile("wrfsbase %0" : : "r"(a2));
            return 0;
        }
        if (a1 == ARCH_GET_FS) {
            unsigned long fs;
            __asm__ volatile("rdfsbase %0" : "=r"(fs));
            *(unsigned long *)a2 = fs;
            return 0;
        }
        return -EINVAL;
    case SYS_set_tid_address:
    case SYS_gettid:
    case SYS_getpid:
    case SYS_getppid: return 1;
    case SYS_getuid:
    case SYS_geteuid:
    case SYS_getgid:
    case SYS_getegid: return 0;
    case SYS_rt_sigprocmask:
    case SYS_rt_sigaction:
    case SYS_sigaltstack: return 0;
    case SYS_exit:
    case SYS_exit_group: return sys_exit(a1);
    case SYS_kill:
    case SYS_tkill: return sys_kill(a2);
    case SYS_tgkill: return sys_kill(a3);
    case SYS_uname: {
        char *u = (char *)a1; /* struct utsname: 6 fields of 65 bytes */
        memset(u, 0, 6 * 65);
        strcpy(u, "hlpool");
        strcpy(u + 65, "sandbox");
        strcpy(u + 130, "1");
        strcpy(u + 195, "1");
        strcpy(u + 260, "x86_64");
        return 0;
    }
    default:
        (void)a4;
        (void)a5;
        (void)a6;
        return -ENOSYS;
    }
}
