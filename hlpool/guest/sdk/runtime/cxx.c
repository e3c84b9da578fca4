/*
 * cxx.c - the little C++ ABI support a freestanding C++ guest needs.
 *
 * Debian has no libstdc++ built for musl, so C++ guests are compiled with
 * -fno-exceptions -fno-rtti and linked without libstdc++ (see README.md:
 * "C++ guests"). What their code still references is defined here, in C,
 * under the Itanium C++ ABI's mangled names:
 *
 *  - operator new / new[] / delete / delete[] (plain, sized and aligned):
 *    malloc/free; a failed allocation aborts (there are no exceptions to throw);
 *  - __cxa_pure_virtual (a call to a pure virtual function aborts);
 *  - __cxa_guard_acquire/release/abort for function-local statics (guests run on
 *    one vCPU with one thread, so a flag is enough).
 *
 * __cxa_atexit comes from musl and __dso_handle from runtime.c. Unused pieces
 * are dropped by --gc-sections, so C guests do not carry them.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void *cxx_alloc(size_t size, size_t align) {
    if (size == 0) size = 1;
    void *p = align > 16 ? aligned_alloc(align, (size + align - 1) / align * align) : malloc(size);
    if (!p) {
        fprintf(stderr, "operator new: out of memory (%zu bytes)\n", size);
        abort();
    }
    return p;
}

/* operator new(size_t), operator new[](size_t) */
void *_Znwm(size_t size);
void *_Znam(size_t size);
void *_Znwm(size_t size) { return cxx_alloc(size, 0); }
void *_Znam(size_t size) { return cxx_alloc(size, 0); }
/* operator new(size_t, std::align_val_t), operator new[](size_t, std::align_val_t) */
void *_ZnwmSt11align_val_t(size_t size, size_t align);
void *_ZnamSt11align_val_t(size_t size, size_t align);
void *_ZnwmSt11align_val_t(size_t size, size_t align) { return cxx_alloc(size, align); }
void *_ZnamSt11align_val_t(size_t size, size_t align) { return cxx_alloc(size, align); }

/* operator delete / delete[]: plain, sized, aligned, sized and aligned */
void _ZdlPv(void *p);
void _ZdaPv(void *p);
void _ZdlPvm(void *p, size_t size);
void _ZdaPvm(void *p, size_t size);
void _ZdlPvSt11align_val_t(void *p, size_t align);
void _ZdaPvSt11align_val_t(void *p, size_t align);
void _ZdlPvmSt11align_val_t(void *p, size_t size, size_t align);
void _ZdaPvmSt11align_val_t(void *p, size_t size, size_t align);
void _ZdlPv(void *p) { free(p); }
void _ZdaPv(void *p) { free(p); }
void _ZdlPvm(void *p, size_t size) { (void)size; free(p); }
void _ZdaPvm(void *p, size_t size) { (void)size; free(p); }
void _ZdlPvSt11align_val_t(void *p, size_t align) { (void)align; free(p); }
void _ZdaPvSt11align_val_t(void *p, size_t align) { (void)align; free(p); }
void _ZdlPvmSt11align_val_t(void *p, size_t size, size_t align) { (void)size; (void)align; free(p); }
void _ZdaPvmSt11align_val_t(void *p, size_t size, size_t align) { (void)size; (void)align; free(p); }

void __cxa_pure_virtual(void);
void __cxa_pure_virtual(void) {
    fprintf(stderr, "pure virtual function called\n");
    abort();
}

/* The guard's first byte is "initialised"; the second marks "in progress". */
int __cxa_guard_acquire(uint64_t *guard);
void __cxa_guard_release(uint64_t *guard);
void __cxa_guard_abort(uint64_t *guard);
int __cxa_guard_acquire(uint64_t *guard) {
    uint8_t *g = (uint8_t *)guard;
    if (g[0]) return 0;
    if (g[1]) {
        fprintf(stderr, "recursive initialisation of a function-local static\n");
        abort();
    }
    g[1] = 1;
    return 1;
}
void __cxa_guard_release(uint64_t *guard) {
    uint8_t *g = (uint8_t *)guard;
    g[1] = 0;
    g[0] = 1;
}
void __cxa_guard_abort(uint64_t *guard) { ((uint8_t *)guard)[1] = 0; }
