/* fib: Fibonacci numbers, and a pure compute loop used by the native-speed benchmark. */
#include <hlpool.h>

static hl_value fib(const hl_args *args) {
    int64_t n = hl_arg_int(args, 0);
    if (n < 0 || n > 92) return hl_error("fib(%lld): n must be in [0, 92]", (long long)n);
    uint64_t a = 0, b = 1;
    for (int64_t i = 0; i < n; i++) {
        uint64_t t = a + b;
        a = b;
        b = t;
    }
    return hl_int((int64_t)a);
}

/* Naive recursion: lots of calls and stack traffic. */
static int64_t fib_rec(int64_t n) { return n < 2 ? n : fib_rec(n - 1) + fib_rec(n - 2); }

static hl_value fib_recursive(const hl_args *args) {
    int64_t n = hl_arg_int(args, 0);
    if (n < 0 || n > 40) return hl_error("fib_recursive(%lld): n must be in [0, 40]", (long long)n);
    return hl_int(fib_rec(n));
}

/* A compute loop: `iterations` rounds of a 64-bit LCG + xorshift mix.
 * The same code is compiled for the host by bench/native_speed.py. */
#include "compute_loop.h"

static hl_value compute(const hl_args *args) {
    return hl_int((int64_t)compute_loop((uint64_t)hl_arg_int(args, 0)));
}

int hl_main(void) {
    hl_export("fib", fib);
    hl_export("fib_recursive", fib_recursive);
    hl_export("compute", compute);
    return 0;
}
