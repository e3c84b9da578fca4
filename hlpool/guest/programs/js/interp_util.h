/*
 * interp_util.h - helpers shared by the interpreter guests (js_guest.c, lua_guest.c).
 *
 * Two things here reach past the public SDK (hlpool.h) into the runtime, because
 * the SDK has no API for them yet (see hlpool/interpreters.py):
 *
 *  - the heap, stack and OUT sizes, read from the boot information the host
 *    wrote (struct hl_boot_info is public in hlpool_abi.h; the pointer to it,
 *    hl__boot, is the runtime's): the interpreters size their memory limit and
 *    stack limit from them;
 *  - walking a decoded list/dict argument in order: hl_item(v, i) re-parses the
 *    MessagePack from the start for every i (quadratic for big lists), so
 *    hl_iter_next decodes item after item with the runtime's own bounds-checked
 *    decoder, hl__mp_decode. Lists/dicts built by hl_list/hl_dict (flag bit 0,
 *    HL__BUILT in runtime.h) are arrays of hl_value.
 */
#ifndef HLPOOL_INTERP_UTIL_H
#define HLPOOL_INTERP_UTIL_H

#include <hlpool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern const struct hl_boot_info *hl__boot;
extern int hl__mp_decode(const uint8_t **p, const uint8_t *end, hl_value *out, int depth);

#define INTERP_VALUE_BUILT 1 /* HL__BUILT in sdk/runtime/runtime.h */

static inline size_t guest_heap_size(void) { return (size_t)hl__boot->heap_size; }
static inline size_t guest_stack_size(void) { return (size_t)hl__boot->stack_size; }
static inline size_t guest_out_capacity(void) { return (size_t)hl__boot->out_size; }

/* Sequential reading of a list's items (or a dict's key, value, key, value, ...). */
typedef struct hl_iter {
    hl_value container;
    size_t index, total;
    const uint8_t *p, *end;
} hl_iter;

static inline void hl_iter_init(hl_iter *it, hl_value c) {
    it->container = c;
    it->index = 0;
    it->total = c.type == HL_TYPE_DICT ? 2 * (size_t)c.count : c.count;
    it->p = (const uint8_t *)c.u.p;
    it->end = it->p + ((c.flags & INTERP_VALUE_BUILT) ? 0 : c.len);
}

static inline hl_value hl_iter_next(hl_iter *it) {
    size_t i = it->index++;
    hl_value c = it->container;
    if (i >= it->total) return hl_item(c, (size_t)c.count); /* out of range: the runtime's CallError */
    if (c.flags & INTERP_VALUE_BUILT) return ((const hl_value *)c.u.p)[i];
    hl_value out;
    if (hl__mp_decode(&it->p, it->end, &out, 0) != 0) {
        /* Cannot happen for values the runtime decoded; let it report the malformed value. */
        return c.type == HL_TYPE_DICT ? (i % 2 ? hl_item(c, i / 2) : hl_key(c, i / 2)) : hl_item(c, i);
    }
    return out;
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (RFC 3629: no overlongs, surrogates, > U+10FFFF), or 0. */
static inline size_t utf8_sequence(const unsigned char *s, size_t avail) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xc2) return 0;
    if (c < 0xe0) return avail >= 2 && (s[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c < 0xf0) {
        if (avail < 3 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80) return 0;
        if (c == 0xe0 && s[1] < 0xa0) return 0;  /* overlong */
        if (c == 0xed && s[1] >= 0xa0) return 0; /* surrogate */
        return 3;
    }
    if (c < 0xf5) {
        if (avail < 4 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80) return 0;
        if (c == 0xf0 && s[1] < 0x90) return 0;  /* overlong */
        if (c == 0xf4 && s[1] >= 0x90) return 0; /* > U+10FFFF */
        return 4;
    }
    return 0;
}

static inline int utf8_valid(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_sequence(s + i, len - i);
        if (!n) return 0;
        i += n;
    }
    return 1;
}

/* A malloc'd, NUL-terminated copy with every invalid sequence replaced by U+FFFD. */
static inline char *utf8_sanitize_dup(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    char *out = malloc(len * 3 + 1), *o = out;
    if (!out) return NULL;
    size_t i = 0;
    while (i < len) {
        size_t n = utf8_sequence(s + i, len - i);
        if (n) {
            memcpy(o, s + i, n);
            o += n;
            i += n;
        } else {
            memcpy(o, "\xef\xbf\xbd", 3);
            o += 3;
            /* A UTF-8-encoded surrogate (how QuickJS writes a lone UTF-16 surrogate) is one character. */
            if (s[i] == 0xed && len - i >= 3 && s[i + 1] >= 0xa0 && s[i + 1] <= 0xbf && (s[i + 2] & 0xc0) == 0x80)
                i += 3;
            else
                i++;
        }
    }
    *o = 0;
    return out;
}

#endif
