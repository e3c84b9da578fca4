/*
 * msgpack.c - the subset of MessagePack that carries hlpool values:
 * nil, bool, int (up to 64 bits), float32/64, str, bin, array, map.
 * Decoding is bounds-checked against `end` and depth-limited; encoding
 * stops at the buffer's capacity and sets `overflow`.
 */
#include <string.h>

#include "runtime.h"

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* Decode the header of one value; containers are left for the caller. */
int hl__mp_decode(const uint8_t **pp, const uint8_t *end, hl_value *out, int depth) {
    const uint8_t *p = *pp;
    memset(out, 0, sizeof *out);
    if (p >= end || depth > HL_MAX_DEPTH) return -1;
    uint8_t t = *p++;
    size_t avail = (size_t)(end - p);
    uint64_t n = 0;
    int hdr = 0, kind = -1;

    if (t <= 0x7f) {
        out->type = HL_TYPE_INT;
        out->u.i = t;
    } else if (t >= 0xe0) {
        out->type = HL_TYPE_INT;
        out->u.i = (int8_t)t;
    } else if ((t & 0xf0) == 0x80) {
        kind = HL_TYPE_DICT;
        n = t & 0x0f;
    } else if ((t & 0xf0) == 0x90) {
        kind = HL_TYPE_LIST;
        n = t & 0x0f;
    } else if ((t & 0xe0) == 0xa0) {
        kind = HL_TYPE_STR;
        n = t & 0x1f;
    } else {
        switch (t) {
        case 0xc0: out->type = HL_TYPE_NONE; break;
        case 0xc2: out->type = HL_TYPE_BOOL; out->u.b = false; break;
        case 0xc3: out->type = HL_TYPE_BOOL; out->u.b = true; break;
        case 0xcc: case 0xcd: case 0xce: case 0xcf: {
            int w = 1 << (t - 0xcc);
            if (avail < (size_t)w) return -1;
            out->type = HL_TYPE_INT;
            out->u.i = (int64_t)be(p, w);
            p += w;
            break;
        }
        case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
            int w = 1 << (t - 0xd0);
            if (avail < (size_t)w) return -1;
            uint64_t raw = be(p, w);
            int shift = 64 - 8 * w;
            out->type = HL_TYPE_INT;
            out->u.i = shift ? ((int64_t)(raw << shift)) >> shift : (int64_t)raw;
            p += w;
            break;
        }
        case 0xca: {
            if (avail < 4) return -1;
            uint32_t bits = (uint32_t)be(p, 4);
            float f;
            memcpy(&f, &bits, 4);
            out->type = HL_TYPE_FLOAT;
            out->u.f = f;
            p += 4;
            break;
        }
        case 0xcb: {
            if (avail < 8) return -1;
            uint64_t bits = be(p, 8);
            out->type = HL_TYPE_FLOAT;
            memcpy(&out->u.f, &bits, 8);
            p += 8;
            break;
        }
        case 0xd9: kind = HL_TYPE_STR; hdr = 1; break;
        case 0xda: kind = HL_TYPE_STR; hdr = 2; break;
        case 0xdb: kind = HL_TYPE_STR; hdr = 4; break;
        case 0xc4: kind = HL_TYPE_BYTES; hdr = 1; break;
        case 0xc5: kind = HL_TYPE_BYTES; hdr = 2; break;
        case 0xc6: kind = HL_TYPE_BYTES; hdr = 4; break;
        case 0xdc: kind = HL_TYPE_LIST; hdr = 2; break;
        case 0xdd: kind = HL_TYPE_LIST; hdr = 4; break;
        case 0xde: kind = HL_TYPE_DICT; hdr = 2; break;
        case 0xdf: kind = HL_TYPE_DICT; hdr = 4; break;
        default: return -1; /* ext types and reserved bytes are not hlpool values */
        }
        if (hdr) {
            if (avail < (size_t)hdr) return -1;
            n = be(p, hdr);
            p += hdr;
        }
    }

    if (kind == HL_TYPE_STR || kind == HL_TYPE_BYTES) {
        if ((uint64_t)(end - p) < n) return -1;
        out->type = (uint16_t)kind;
        out->len = (size_t)n;
        out->u.p = p;
        p += n;
    } else if (kind == HL_TYPE_LIST || kind == HL_TYPE_DICT) {
        uint64_t items = kind == HL_TYPE_DICT ? 2 * n : n;
        const uint8_t *start = p;
        for (uint64_t i = 0; i < items; i++) {
            p = hl__mp_skip(p, end, depth + 1);
            if (!p) return -1;
        }
        out->type = (uint16_t)kind;
        out->count = (uint32_t)n;
        out->len = (size_t)(p - start);
        out->u.p = start;
    }
    *pp = p;
    return 0;
}

const uint8_t *hl__mp_skip(const uint8_t *p, const uint8_t *end, int depth) {
    hl_value v;
    if (hl__mp_decode(&p, end, &v, depth) != 0) return NULL;
    return p;
}

/* ---- encoding ------------------------------------------------------------ */

static void put(hl_writer *w, const void *data, size_t n) {
    if (w->overflow || w->cap - w->pos < n) {
        w->overflow = 1;
        return;
    }
    memcpy(w->buf + w->pos, data, n);
    w->pos += n;
}

static void put_be(hl_writer *w, uint8_t tag, uint64_t v, int width) {
    uint8_t b[9];
    b[0] = tag;
    for (int i = 0; i < width; i++) b[1 + i] = (uint8_t)(v >> (8 * (width - 1 - i)));
    put(w, b, (size_t)width + 1);
}

static void put_len(hl_writer *w, uint64_t n, uint8_t fix, uint64_t fix_max, uint8_t t8, uint8_t t16, uint8_t t32) {
    if (fix && n <= fix_max) {
        uint8_t b = (uint8_t)(fix | n);
        put(w, &b, 1);
    } else if (t8 && n <= 0xff) {
        put_be(w, t8, n, 1);
    } else if (n <= 0xffff) {
        put_be(w, t16, n, 2);
    } else if (n <= 0xffffffffu) {
        put_be(w, t32, n, 4);
    } else {
        w->overflow = 1;
    }
}

void hl__mp_write_array_header(hl_writer *w, uint32_t n) { put_len(w, n, 0x90, 15, 0, 0xdc, 0xdd); }

void hl__mp_write_str(hl_writer *w, const char *s, size_t len) {
    put_len(w, len, 0xa0, 31, 0xd9, 0xda, 0xdb);
    put(w, s, len);
}

/* The shortest encoding, as msgpack encoders write it: fixint, else uint8..64
 * for non-negative and int8..64 for negative values. */
static void write_int(hl_writer *w, int64_t i) {
    if (i >= 0 && i <= 0x7f) {
        uint8_t b = (uint8_t)i;
        put(w, &b, 1);
    } else if (i < 0 && i >= -32) {
        uint8_t b = (uint8_t)(int8_t)i;
        put(w, &b, 1);
    } else if (i > 0) {
        uint64_t u = (uint64_t)i;
        if (u <= 0xff) put_be(w, 0xcc, u, 1);
        else if (u <= 0xffff) put_be(w, 0xcd, u, 2);
        else if (u <= 0xffffffffu) put_be(w, 0xce, u, 4);
        else put_be(w, 0xcf, u, 8);
    } else {
        if (i >= INT8_MIN) put_be(w, 0xd0, (uint64_t)i, 1);
        else if (i >= INT16_MIN) put_be(w, 0xd1, (uint64_t)i, 2);
        else if (i >= INT32_MIN) put_be(w, 0xd2, (uint64_t)i, 4);
        else put_be(w, 0xd3, (uint64_t)i, 8);
    }
}

void hl__mp_write_value(hl_writer *w, hl_value v, int depth) {
    if (w->overflow) return; /* nothing more can be written: stop walking the value */
    if (depth > HL_MAX_DEPTH) {
        w->overflow = 1;
        w->too_deep = 1;
        return;
    }
    switch (v.type) {
    case HL_TYPE_NONE: put(w, "\xc0", 1); break;
    case HL_TYPE_BOOL: put(w, v.u.b ? "\xc3" : "\xc2", 1); break;
    case HL_TYPE_INT: write_int(w, v.u.i); break;
    case HL_TYPE_FLOAT: {
        uint64_t bits;
        memcpy(&bits, &v.u.f, 8);
        put_be(w, 0xcb, bits, 8);
        break;
    }
    case HL_TYPE_STR: hl__mp_write_str(w, v.u.p, v.len); break;
    case HL_TYPE_BYTES:
        put_len(w, v.len, 0, 0, 0xc4, 0xc5, 0xc6);
        put(w, v.u.p, v.len);
        break;
    case HL_TYPE_LIST:
    case HL_TYPE_DICT:
        if (v.type == HL_TYPE_LIST)
            hl__mp_write_array_header(w, v.count);
        else
            put_len(w, v.count, 0x80, 15, 0, 0xde, 0xdf);
        if (v.flags & HL__BUILT) {
            const hl_value *items = v.u.p;
            size_t n = v.type == HL_TYPE_DICT ? 2 * (size_t)v.count : v.count;
            for (size_t i = 0; i < n; i++) hl__mp_write_value(w, items[i], depth + 1);
        } else {
            put(w, v.u.p, v.len); /* decoded containers are re-emitted as they came */
        }
        break;
    default: w->overflow = 1; break; /* errors and missing values are not results */
    }
}
