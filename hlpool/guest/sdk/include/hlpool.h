/*
 * hlpool.h - the guest SDK of hlpool.
 *
 * A guest is an ordinary C program linked against musl libc and the hlpool
 * runtime. Instead of main() it defines hl_main(), which runs once while the
 * snapshot is being built and registers the functions the host may call:
 *
 *     #include <hlpool.h>
 *
 *     static hl_value add(const hl_args *a) {
 *         return hl_int(hl_arg_int(a, 0) + hl_arg_int(a, 1));
 *     }
 *
 *     int hl_main(void) {
 *         hl_export("add", add);
 *         return 0;
 *     }
 *
 * Build it with `hlpool guest build add.c -o add.elf`.
 *
 * Arguments are numbered from 0. Reading an argument with the wrong accessor
 * (or one that was not passed) ends the call with a CallError on the host
 * ("argument 1: expected int, got str"); it never returns garbage.
 *
 * Values returned by the constructors (hl_str, hl_bytes, hl_list, ...) are
 * copied into a per-call arena, so the guest may free or reuse its buffers
 * right after constructing them. The arena is reset after every call.
 * hl_list and hl_dict copy their item arrays (one hl_value per item, the
 * items' own data is not copied again), so building a nested value costs time
 * and arena space linear in its size. Values crossing the boundary nest at
 * most HL_MAX_DEPTH (32) levels: a deeper result ends the call with a
 * CallError saying so.
 *
 * C++: the header can be included from C++ (hlpool guest build picks g++ for
 * .cpp/.cc/.cxx sources); see README.md for the subset of C++ that works.
 */
#ifndef HLPOOL_H
#define HLPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hlpool_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A value passed between host and guest. Treat the fields as read-only. */
typedef struct hl_value {
    uint16_t type;   /* HL_TYPE_* */
    uint16_t flags;  /* internal to the runtime */
    uint32_t count;  /* list: items, dict: pairs */
    size_t len;      /* str/bytes: byte length; list/dict: encoded length */
    union {
        int64_t i;
        double f;
        bool b;
        const void *p; /* str/bytes data, list/dict encoded items */
    } u;
} hl_value;

/* The arguments of one call (opaque). */
typedef struct hl_args hl_args;

/* An exported function. */
typedef hl_value (*hl_fn)(const hl_args *args);

/* Defined by the guest: runs once during initialisation. Return 0 on success. */
int hl_main(void);

/* Register `fn` under `name` (call during hl_main). */
void hl_export(const char *name, hl_fn fn);

/* --- arguments --------------------------------------------------------- */
int hl_argc(const hl_args *args);
int hl_arg_type(const hl_args *args, int i); /* HL_TYPE_*, HL_TYPE_MISSING past the end */
int64_t hl_arg_int(const hl_args *args, int i);
double hl_arg_float(const hl_args *args, int i); /* accepts int arguments too */
bool hl_arg_bool(const hl_args *args, int i);
/* Returns a NUL-terminated string; *len (if not NULL) gets its byte length. */
const char *hl_arg_str(const hl_args *args, int i, size_t *len);
const void *hl_arg_bytes(const hl_args *args, int i, size_t *len);
/* Any argument as a value (lists and dicts are read with hl_item/hl_key/hl_get). */
hl_value hl_arg(const hl_args *args, int i);

/* --- reading list and dict values --------------------------------------- */
size_t hl_len(hl_value v);                 /* items of a list, pairs of a dict, bytes of str/bytes */
/* Random access. On a list or dict that came from the host (an argument or a
 * hl_call_host result) each call walks the encoding from the start, so a loop
 * over all items with hl_item is quadratic: use hl_iter for that. */
hl_value hl_item(hl_value list, size_t i); /* i-th item of a list, i-th value of a dict */
hl_value hl_key(hl_value dict, size_t i);  /* i-th key of a dict */
hl_value hl_get(hl_value dict, const char *key); /* HL_TYPE_MISSING if absent */

/* Sequential reading, O(1) per step plus the size of the item read:
 *
 *     hl_iter it;
 *     hl_value key, item;
 *     hl_iter_init(&it, v);                    // v: a list or a dict
 *     while (hl_iter_next(&it, &key, &item)) { ... }
 *
 * For a list, `key` gets HL_TYPE_MISSING; for a dict, the pair's key (a str).
 * Either pointer may be NULL. hl_iter_init on anything but a list or dict ends
 * the call with a CallError. The iterator holds no resources: drop it at any
 * point. Its fields are internal to the runtime. */
typedef struct hl_iter {
    hl_value container;
    size_t index;               /* pairs (dict) or items (list) read so far */
    const void *p, *end;        /* position in a decoded container */
} hl_iter;
void hl_iter_init(hl_iter *it, hl_value container);
bool hl_iter_next(hl_iter *it, hl_value *key, hl_value *item);
/* Typed views of a value; a wrong type ends the call with a CallError naming `what`. */
int64_t hl_as_int(hl_value v, const char *what);
double hl_as_float(hl_value v, const char *what);
bool hl_as_bool(hl_value v, const char *what);
const char *hl_as_str(hl_value v, const char *what, size_t *len);
const void *hl_as_bytes(hl_value v, const char *what, size_t *len);
const char *hl_type_name(int type);

/* --- results ------------------------------------------------------------ */
hl_value hl_none(void);
hl_value hl_bool(bool b);
hl_value hl_int(int64_t i);
hl_value hl_float(double f);
hl_value hl_str(const char *s);
hl_value hl_strn(const char *s, size_t len);
hl_value hl_bytes(const void *data, size_t len);
hl_value hl_list(size_t n, const hl_value *items);
hl_value hl_dict(size_t n, const char *const *keys, const hl_value *values);
/* A guest-raised error: the host raises GuestError with this message. */
hl_value hl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* --- the host ----------------------------------------------------------- */
/* Call a host function by name. If it raises, the whole call ends with
 * HostFunctionError on the host; this function then does not return. */
hl_value hl_call_host(const char *name, int argc, const hl_value *argv);

/* Append a line to the host's log (printf/puts to stdout/stderr go there too). */
void hl_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The sandbox's memory configuration (bytes): the heap malloc draws from, the
 * stack, and the largest encoded result or host-call request. */
size_t hl_heap_size(void);
size_t hl_stack_size(void);
size_t hl_out_capacity(void);

/* Host files mapped into this sandbox with Sandbox.map_file(). Returns the
 * mapping's guest address and size, or NULL if no file of that base name is mapped. */
const void *hl_mapped_file(const char *name, size_t *size);

#ifdef __cplusplus
}
#endif
#endif /* HLPOOL_H */
