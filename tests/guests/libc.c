/* libc: ordinary C using musl's stdio, stdlib, string, math, setjmp and time, unchanged. */
#include <errno.h>
#include <hlpool.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

static hl_value format(const hl_args *a) {
    char buf[256];
    snprintf(buf, sizeof buf, "%d|%5.2f|%e|%g|%x|%s|%c|%lld", 42, 3.14159, 12345.678, 0.0001, 255, "str", 'z',
             (long long)hl_arg_int(a, 0));
    return hl_str(buf);
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* sort(list of numbers) -> sorted list, via qsort on a malloc'd array */
static hl_value sort(const hl_args *a) {
    hl_value list = hl_arg(a, 0);
    size_t n = hl_len(list);
    double *v = malloc(n * sizeof *v + 1);
    hl_value *out = malloc(n * sizeof *out + 1);
    for (size_t i = 0; i < n; i++) v[i] = hl_as_float(hl_item(list, i), "item");
    qsort(v, n, sizeof *v, cmp);
    for (size_t i = 0; i < n; i++) out[i] = hl_float(v[i]);
    hl_value r = hl_list(n, out);
    free(v);
    free(out);
    return r;
}

static hl_value math(const hl_args *a) {
    double x = hl_arg_float(a, 0);
    hl_value items[5] = {hl_float(sin(x)), hl_float(sqrt(x)), hl_float(pow(x, 3.5)), hl_float(exp(x)),
                         hl_float(strtod("2.5e3", NULL))};
    return hl_list(5, items);
}

/* alloc(total_bytes, chunk): mallocs in chunks, writes them, reallocs, frees; returns a checksum. */
static hl_value alloc(const hl_args *a) {
    int64_t total = hl_arg_int(a, 0), chunk = hl_arg_int(a, 1);
    if (chunk <= 0 || total < 0) return hl_error("bad sizes");
    size_t n = (size_t)(total / chunk);
    char **blocks = calloc(n + 1, sizeof *blocks);
    if (!blocks) return hl_error("calloc failed");
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
        blocks[i] = malloc((size_t)chunk);
        if (!blocks[i]) return hl_error("malloc of block %zu failed", i);
        memset(blocks[i], (int)(i & 0xff), (size_t)chunk);
    }
    for (size_t i = 0; i < n; i++) {
        blocks[i] = realloc(blocks[i], (size_t)chunk * 2);
        if (!blocks[i]) return hl_error("realloc failed");
        sum += (unsigned char)blocks[i][chunk - 1];
        free(blocks[i]);
    }
    free(blocks);
    return hl_int((int64_t)sum);
}

/* oom(bytes): malloc that cannot succeed returns NULL, not a crash. */
static hl_value oom(const hl_args *a) {
    void *p = malloc((size_t)hl_arg_int(a, 0));
    hl_value r = hl_bool(p != NULL);
    free(p);
    return r;
}

static jmp_buf env;
static void jump(int v) { longjmp(env, v); }

static hl_value setjmp_test(const hl_args *a) {
    volatile int count = 0;
    int v = setjmp(env);
    if (v < hl_arg_int(a, 0)) {
        count++;
        jump(v + 1);
    }
    return hl_int(count);
}

static hl_value clocks(const hl_args *a) {
    (void)a;
    struct timespec m1, m2, r;
    clock_gettime(CLOCK_MONOTONIC, &m1);
    volatile uint64_t spin = 0;
    for (int i = 0; i < 1000000; i++) spin += (uint64_t)i;
    clock_gettime(CLOCK_MONOTONIC, &m2);
    clock_gettime(CLOCK_REALTIME, &r);
    int64_t elapsed = (m2.tv_sec - m1.tv_sec) * 1000000000LL + (m2.tv_nsec - m1.tv_nsec);
    hl_value items[3] = {hl_int(elapsed), hl_int((int64_t)r.tv_sec), hl_int((int64_t)time(NULL))};
    return hl_list(3, items);
}

static hl_value random_bytes(const hl_args *a) {
    int64_t n = hl_arg_int(a, 0);
    if (n < 0 || n > (1 << 20)) return hl_error("n out of range");
    unsigned char *buf = malloc((size_t)n + 1);
    ssize_t got = getrandom(buf, (size_t)n, 0);
    if (got != n) return hl_error("getrandom returned %zd", got);
    hl_value r = hl_bytes(buf, (size_t)n);
    free(buf);
    return r;
}

/* Unsupported system calls fail cleanly with ENOSYS (or a fitting errno). */
static hl_value unsupported(const hl_args *a) {
    (void)a;
    errno = 0;
    int fd = open("/etc/passwd", O_RDONLY);
    int e1 = errno;
    errno = 0;
    pid_t p = fork();
    int e2 = errno;
    hl_value items[4] = {hl_int(fd), hl_str(strerror(e1)), hl_int(p), hl_str(strerror(e2))};
    return hl_list(4, items);
}

static hl_value say(const hl_args *a) {
    printf("stdout: %s\n", hl_arg_str(a, 0, NULL));
    fprintf(stderr, "stderr: %s\n", hl_arg_str(a, 0, NULL));
    puts("puts line");
    printf("no newline at the end");
    hl_log("hl_log %d", 7);
    return hl_none();
}

static char *global_state;
static hl_value remember(const hl_args *a) {
    free(global_state);
    global_state = strdup(hl_arg_str(a, 0, NULL));
    return hl_none();
}
static hl_value recall(const hl_args *a) {
    (void)a;
    return global_state ? hl_str(global_state) : hl_none();
}

int hl_main(void) {
    hl_export("format", format);
    hl_export("sort", sort);
    hl_export("math", math);
    hl_export("alloc", alloc);
    hl_export("oom", oom);
    hl_export("setjmp", setjmp_test);
    hl_export("clocks", clocks);
    hl_export("random", random_bytes);
    hl_export("unsupported", unsupported);
    hl_export("say", say);
    hl_export("remember", remember);
    hl_export("recall", recall);
    global_state = strdup("from hl_main");
    return 0;
}
