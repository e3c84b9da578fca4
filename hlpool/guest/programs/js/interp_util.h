/*
 * interp_util.h - helpers shared by the interpreter guests (js_guest.c, lua_guest.c).
 *
 * Everything here uses the public SDK (hlpool.h) only: the memory configuration
 * (hl_heap_size, hl_stack_size, hl_out_capacity) sizes the interpreters' memory
 * and stack limits, and lists/dicts are read in order with hl_iter.
 */
#ifndef HLPOOL_INTERP_UTIL_H
#define HLPOOL_INTERP_UTIL_H

#include <hlpool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline size_t guest_heap_size(void) { return hl_heap_size(); }
static inline size_t guest_stack_size(void) { return hl_stack_size(); }
static inline size_t guest_out_capacity(void) { return hl_out_capacity(); }

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
