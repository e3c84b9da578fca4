/* compute_loop.h - one compute kernel compiled both into a guest and for the
 * host, so bench/native_speed.py can compare the two as a ratio. */
#ifndef HLPOOL_COMPUTE_LOOP_H
#define HLPOOL_COMPUTE_LOOP_H
#include <stdint.h>

static inline uint64_t compute_loop(uint64_t iterations) {
    uint64_t x = 0x9E3779B97F4A7C15ull, acc = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t y = x ^ (x >> 29);
        y ^= y << 17;
        acc += y ^ (y >> 31);
    }
    return acc;
}
#endif
