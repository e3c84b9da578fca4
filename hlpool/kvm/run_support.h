/*
 * run_support.h - C helpers for hlpool/kvm/_vcpu_run.pyx: the per-thread kick
 * timer, its signal handler and the raw KVM_RUN ioctl.
 *
 * KVM_RUN and struct kvm_run come from the kernel's <linux/kvm.h>, the same
 * header hlpool/kvm/kvm.pxd declares for the Cython modules.
 */
#ifndef HLPOOL_RUN_SUPPORT_H
#define HLPOOL_RUN_SUPPORT_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

/* The kvm_run of the vCPU this thread is running (NULL between runs). */
static __thread volatile struct kvm_run *hl_current_run;
/* This thread's kick timer. */
static __thread timer_t hl_thread_timer;
static __thread int hl_thread_timer_ok;
/* Set by the handler; covers a kick that lands while no vCPU is running. */
static __thread volatile sig_atomic_t hl_kicked;

static int hl_kick_signal(void) { return SIGRTMIN + 5; }

/* Async-signal-safe: one byte store into the mapped kvm_run. */
static void hl_kick_handler(int sig) {
    (void)sig;
    hl_kicked = 1;
    volatile struct kvm_run *run = hl_current_run;
    if (run) run->immediate_exit = 1;
}

/* POSIX timers are not inherited by fork(): forget this thread's timer in the child. */
static void hl_forget_timer_after_fork(void) {
    hl_thread_timer_ok = 0;
    hl_kicked = 0;
    hl_current_run = NULL;
}

static int hl_install_kick_handler(void) {
    if (pthread_atfork(NULL, NULL, hl_forget_timer_after_fork) != 0) return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hl_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must come back with EINTR */
    return sigaction(hl_kick_signal(), &sa, NULL);
}

static int hl_thread_timer_create(void) {
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = hl_kick_signal();
    ev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &ev, &hl_thread_timer) != 0) return -1;
    hl_thread_timer_ok = 1;
    return 0;
}

static int hl_timer_arm(int64_t deadline_ns) {
    if (!hl_thread_timer_ok && hl_thread_timer_create() != 0) return -1;
    hl_kicked = 0;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = deadline_ns / 1000000000;
    its.it_value.tv_nsec = deadline_ns % 1000000000;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    return timer_settime(hl_thread_timer, TIMER_ABSTIME, &its, NULL);
}

static int hl_timer_disarm(void) {
    hl_kicked = 0;
    if (!hl_thread_timer_ok) return 0;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    return timer_settime(hl_thread_timer, 0, &its, NULL);
}

static int hl_kvm_run(int fd, void *run) {
    hl_current_run = (volatile struct kvm_run *)run;
    /* A kick that arrived before hl_current_run was set left only hl_kicked. */
    if (hl_kicked) ((volatile struct kvm_run *)run)->immediate_exit = 1;
    int rc = ioctl(fd, KVM_RUN, 0);
    int saved = errno;
    hl_current_run = NULL;
    errno = saved;
    return rc;
}

/* Forget a kick that turned out to be early (a stale signal from an old deadline). */
static void hl_clear_kick(void *run) {
    hl_kicked = 0;
    ((volatile struct kvm_run *)run)->immediate_exit = 0;
}

static int64_t hl_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif
