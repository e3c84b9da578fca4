/*
 * runtime.c - boot, call dispatch, exports, host calls and exception reports.
 *
 * Life of a guest:
 *   1. The host starts the vCPU at _start (entry.S) with rdi = &hl_boot_info.
 *   2. hl__start_c installs the IDT and the syscall MSRs, then hands control to
 *      musl's __libc_start_main (TLS, stdio, constructors), which calls hl__main.
 *   3. hl__main runs the guest's hl_main(), reports the exported names and
 *      signals HL_EV_INIT_DONE. The host snapshots the VM at this point.
 *   4. Every call resumes the vCPU right after that signal (or after the last
 *      HL_EV_RESULT): hl__serve reads the request from IN, runs the function
 *      and signals HL_EV_RESULT. The host then puts memory and registers back.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

const struct hl_boot_info *hl__boot;

/* ---- exports ----------------------------------------------------------- */

struct hl_export_entry {
    char name[HL_NAME_MAX + 1];
    hl_fn fn;
};
static struct hl_export_entry exports[HL_EXPORTS_MAX];
static int export_count;
static int initialising;
static char init_error[256];

void hl_export(const char *name, hl_fn fn) {
    size_t len = name ? strlen(name) : 0;
    if (!initialising) {
        hl_log("hl_export(\"%s\") ignored: exports must be registered in hl_main", name ? name : "");
        return;
    }
    if (init_error[0]) return;
    if (len == 0 || len > HL_NAME_MAX || !fn) {
        snprintf(init_error, sizeof init_error, "hl_export: invalid name or function (name length %zu, max %d)",
                 len, HL_NAME_MAX);
        return;
    }
    for (int i = 0; i < export_count; i++) {
        if (strcmp(exports[i].name, name) == 0) {
            snprintf(init_error, sizeof init_error, "hl_export: \"%s\" exported twice", name);
            return;
        }
    }
    if (export_count == HL_EXPORTS_MAX) {
        snprintf(init_error, sizeof init_error, "hl_export: more than %d exports", HL_EXPORTS_MAX);
        return;
    }
    memcpy(exports[export_count].name, name, len + 1);
    exports[export_count].fn = fn;
    export_count++;
}

/* ---- records and call termination ------------------------------------------ */


void hl__out_record_bytes(uint64_t kind, const void *data, size_t length, uint64_t aux0) {
    if (length > hl__out_capacity()) length = hl__out_capacity();
    memcpy(hl__out_payload_for(length), data, length);
    hl__out_record(kind, length, aux0);
}

/* Encode a payload with `encode`: on the call page if it fits, else in the
 * OUT area. Returns -1 if it does not fit the OUT area either, -2 if a value
 * in it nests deeper than HL_MAX_DEPTH. */
#define OUT_TOO_BIG (-1)
#define OUT_TOO_DEEP (-2)
typedef void (*payload_encoder)(hl_writer *w, const void *ctx);
static int out_encoded(uint64_t kind, payload_encoder encode, const void *ctx, uint64_t aux0) {
    hl_writer w = {hl__call_page() + HL_CALL_PAGE_INLINE, HL_INLINE_MAX, 0, 0, 0};
    encode(&w, ctx);
    if (w.too_deep) return OUT_TOO_DEEP;
    if (w.overflow) {
        w = (hl_writer){(uint8_t *)(uintptr_t)hl__boot->out_base, hl__out_capacity(), 0, 0, 0};
        encode(&w, ctx);
        if (w.too_deep) return OUT_TOO_DEEP;
        if (w.overflow) return OUT_TOO_BIG;
    }
    hl__out_record(kind, w.pos, aux0);
    return 0;
}

void hl__out_record(uint64_t kind, uint64_t length, uint64_t aux0) {
    struct hl_msg_header *h = hl__out_header();
    h->kind = kind;
    h->length = length;
    h->aux0 = aux0;
    h->aux1 = h->aux2 = h->aux3 = h->aux4 = 0;
    h->magic = HL_MSG_MAGIC;
}

/* fflush() writes to the FILE even when nothing is buffered; skip it then,
 * so a call that prints nothing does not dirty libc's data page. */
static void flush_stdio(void) {
    if (__fpending(stdout)) fflush(stdout);
    if (__fpending(stderr)) fflush(stderr);
}

void hl__finish_call(void) {
    if (HL__CALL->in_call) longjmp(HL__CALL->env, 1);
    /* Outside a call (during hl_main): report and stop here. */
    flush_stdio();
    hl__signal(HL_EV_RESULT);
    for (;;) __asm__ volatile("hlt");
}

void hl__fail(uint64_t kind, const char *fmt, ...) {
    char message[HL_INLINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof message) n = sizeof message - 1;
    hl__out_record_bytes(kind, message, (size_t)n, 0);
    hl__finish_call();
}

/* ---- arguments --------------------------------------------------------- */

struct hl_args {
    int argc;
    const uint8_t *end;
    hl_value *values;
};

static const char *type_names[] = {"None", "bool", "int", "float", "str", "bytes", "list", "dict", "error", "missing"};

const char *hl_type_name(int type) {
    if (type < 0 || type > HL_TYPE_MISSING) return "unknown";
    return type_names[type];
}

static hl_value missing_value(void) {
    hl_value v;
    memset(&v, 0, sizeof v);
    v.type = HL_TYPE_MISSING;
    return v;
}

int hl_argc(const hl_args *a) { return a->argc; }

hl_value hl_arg(const hl_args *a, int i) {
    if (i < 0 || i >= a->argc) return missing_value();
    return a->values[i];
}

int hl_arg_type(const hl_args *a, int i) { return hl_arg(a, i).type; }

static hl_value arg_of(const hl_args *a, int i, int want) {
    if (i < 0 || i >= a->argc)
        hl__fail(HL_MSG_CALL_ERROR, "argument %d: expected %s, got nothing (%d argument%s passed)", i,
                 hl_type_name(want), a->argc, a->argc == 1 ? "" : "s");
    return a->values[i];
}

static void type_error(const char *what, int want, int got) {
    hl__fail(HL_MSG_CALL_ERROR, "%s: expected %s, got %s", what, hl_type_name(want), hl_type_name(got));
}

int64_t hl_as_int(hl_value v, const char *what) {
    if (v.type != HL_TYPE_INT) type_error(what, HL_TYPE_INT, v.type);
    return v.u.i;
}
double hl_as_float(hl_value v, const char *what) {
    if (v.type == HL_TYPE_INT) return (double)v.u.i;
    if (v.type != HL_TYPE_FLOAT) type_error(what, HL_TYPE_FLOAT, v.type);
    return v.u.f;
}
bool hl_as_bool(hl_value v, const char *what) {
    if (v.type != HL_TYPE_BOOL) type_error(what, HL_TYPE_BOOL, v.type);
    return v.u.b;
}
const char *hl_as_str(hl_value v, const char *what, size_t *len) {
    if (v.type != HL_TYPE_STR) type_error(what, HL_TYPE_STR, v.type);
    if (len) *len = v.len;
    if (v.flags & HL__BUILT) return (const char *)v.u.p; /* already NUL-terminated */
    /* Decoded strings point into the read-only input: copy them to add the NUL. */
    char *s = hl__arena_alloc(v.len + 1);
    memcpy(s, v.u.p, v.len);
    s[v.len] = 0;
    return s;
}
const void *hl_as_bytes(hl_value v, const char *what, size_t *len) {
    if (v.type != HL_TYPE_BYTES) type_error(what, HL_TYPE_BYTES, v.type);
    if (len) *len = v.len;
    return v.u.p;
}

static const char *arg_label(int i) {
    static char label[32];
    snprintf(label, sizeof label, "argument %d", i);
    return label;
}

int64_t hl_arg_int(const hl_args *a, int i) { return hl_as_int(arg_of(a, i, HL_TYPE_INT), arg_label(i)); }
double hl_arg_float(const hl_args *a, int i) { return hl_as_float(arg_of(a, i, HL_TYPE_FLOAT), arg_label(i)); }
bool hl_arg_bool(const hl_args *a, int i) { return hl_as_bool(arg_of(a, i, HL_TYPE_BOOL), arg_label(i)); }
const char *hl_arg_str(const hl_args *a, int i, size_t *len) {
    return hl_as_str(arg_of(a, i, HL_TYPE_STR), arg_label(i), len);
}
const void *hl_arg_bytes(const hl_args *a, int i, size_t *len) {
    return hl_as_bytes(arg_of(a, i, HL_TYPE_BYTES), arg_label(i), len);
}

/* ---- list and dict access ------------------------------------------------ */

size_t hl_len(hl_value v) {
    switch (v.type) {
    case HL_TYPE_LIST:
    case HL_TYPE_DICT: return v.count;
    case HL_TYPE_STR:
    case HL_TYPE_BYTES: return v.len;
    default: return 0;
    }
}

/* The j-th encoded element (0-based) of a decoded container. Walks from the
 * start, or from where the previous lookup in the same container stopped when
 * that is not past j: reading items in order is O(1) per item. */
static hl_value decoded_element(hl_value c, size_t j) {
    struct hl__call_state *cs = HL__CALL;
    const uint8_t *p = c.u.p, *end = p + c.len;
    size_t k = 0;
    if (cs->seek_base == c.u.p && cs->seek_len == c.len && cs->seek_index <= j) {
        p = cs->seek_pos;
        k = cs->seek_index;
    }
    for (; k < j; k++) {
        p = hl__mp_skip(p, end, 0);
        if (!p) hl__fail(HL_MSG_CALL_ERROR, "malformed container value");
    }
    cs->seek_base = c.u.p;
    cs->seek_len = c.len;
    cs->seek_index = j;
    cs->seek_pos = p;
    hl_value out;
    if (hl__mp_decode(&p, end, &out, 0) != 0) hl__fail(HL_MSG_CALL_ERROR, "malformed container value");
    return out;
}

static hl_value element(hl_value c, size_t j) {
    if (c.flags & HL__BUILT) return ((const hl_value *)c.u.p)[j];
    return decoded_element(c, j);
}

hl_value hl_item(hl_value c, size_t i) {
    if (c.type == HL_TYPE_LIST) {
        if (i >= c.count) hl__fail(HL_MSG_CALL_ERROR, "list index %zu out of range (length %u)", i, c.count);
        return element(c, i);
    }
    if (c.type == HL_TYPE_DICT) {
        if (i >= c.count) hl__fail(HL_MSG_CALL_ERROR, "dict index %zu out of range (length %u)", i, c.count);
        return element(c, 2 * i + 1);
    }
    type_error("hl_item", HL_TYPE_LIST, c.type);
    return missing_value();
}

hl_value hl_key(hl_value c, size_t i) {
    if (c.type != HL_TYPE_DICT) type_error("hl_key", HL_TYPE_DICT, c.type);
    if (i >= c.count) hl__fail(HL_MSG_CALL_ERROR, "dict index %zu out of range (length %u)", i, c.count);
    return element(c, 2 * i);
}

hl_value hl_get(hl_value c, const char *key) {
    if (c.type != HL_TYPE_DICT) type_error("hl_get", HL_TYPE_DICT, c.type);
    size_t klen = strlen(key);
    hl_iter it;
    hl_value k, v;
    hl_iter_init(&it, c);
    while (hl_iter_next(&it, &k, &v))
        if (k.type == HL_TYPE_STR && k.len == klen && memcmp(k.u.p, key, klen) == 0) return v;
    return missing_value();
}

/* ---- sequential iteration --------------------------------------------------- */

void hl_iter_init(hl_iter *it, hl_value c) {
    if (c.type != HL_TYPE_LIST && c.type != HL_TYPE_DICT)
        hl__fail(HL_MSG_CALL_ERROR, "hl_iter_init: expected list or dict, got %s", hl_type_name(c.type));
    it->container = c;
    it->index = 0;
    it->p = c.u.p;
    it->end = (c.flags & HL__BUILT) ? c.u.p : (const uint8_t *)c.u.p + c.len;
}

bool hl_iter_next(hl_iter *it, hl_value *key, hl_value *item) {
    hl_value c = it->container;
    if ((c.type != HL_TYPE_LIST && c.type != HL_TYPE_DICT) || it->index >= c.count) return false;
    int is_dict = c.type == HL_TYPE_DICT;
    hl_value k = missing_value(), v;
    if (c.flags & HL__BUILT) {
        const hl_value *items = c.u.p;
        if (is_dict) {
            k = items[2 * it->index];
            v = items[2 * it->index + 1];
        } else {
            v = items[it->index];
        }
    } else {
        const uint8_t *p = it->p, *end = it->end;
        if ((is_dict && hl__mp_decode(&p, end, &k, 0) != 0) || hl__mp_decode(&p, end, &v, 0) != 0)
            hl__fail(HL_MSG_CALL_ERROR, "malformed container value");
        it->p = p;
    }
    it->index++;
    if (key) *key = k;
    if (item) *item = v;
    return true;
}

/* ---- result constructors -------------------------------------------------- */

static hl_value scalar(int type) {
    hl_value v;
    memset(&v, 0, sizeof v);
    v.type = (uint16_t)type;
    return v;
}

hl_value hl_none(void) { return scalar(HL_TYPE_NONE); }
hl_value hl_bool(bool b) {
    hl_value v = scalar(HL_TYPE_BOOL);
    v.u.b = b;
    return v;
}
hl_value hl_int(int64_t i) {
    hl_value v = scalar(HL_TYPE_INT);
    v.u.i = i;
    return v;
}
hl_value hl_float(double f) {
    hl_value v = scalar(HL_TYPE_FLOAT);
    v.u.f = f;
    return v;
}
static hl_value copied(int type, const void *data, size_t len) {
    hl_value v = scalar(type);
    char *copy = hl__arena_alloc(len + 1);
    if (len) memcpy(copy, data, len);
    copy[len] = 0;
    v.flags = HL__BUILT;
    v.len = len;
    v.u.p = copy;
    return v;
}
hl_value hl_strn(const char *s, size_t len) { return copied(HL_TYPE_STR, s, len); }
hl_value hl_str(const char *s) { return copied(HL_TYPE_STR, s, s ? strlen(s) : 0); }
hl_value hl_bytes(const void *d, size_t len) { return copied(HL_TYPE_BYTES, d, len); }

hl_value hl_list(size_t n, const hl_value *items) {
    hl_value v = scalar(HL_TYPE_LIST);
    if (n > UINT32_MAX) hl__fail(HL_MSG_CALL_ERROR, "hl_list: too many items");
    hl_value *copy = hl__arena_alloc(n ? n * sizeof *copy : 1); /* the items' own data is referenced, not copied */
    if (n) memcpy(copy, items, n * sizeof *copy);
    v.flags = HL__BUILT;
    v.count = (uint32_t)n;
    v.u.p = copy;
    return v;
}

hl_value hl_dict(size_t n, const char *const *keys, const hl_value *values) {
    hl_value v = scalar(HL_TYPE_DICT);
    if (n > UINT32_MAX / 2) hl__fail(HL_MSG_CALL_ERROR, "hl_dict: too many items");
    hl_value *pairs = hl__arena_alloc(n ? 2 * n * sizeof *pairs : 1);
    for (size_t i = 0; i < n; i++) {
        pairs[2 * i] = hl_str(keys[i]);
        pairs[2 * i + 1] = values[i];
    }
    v.flags = HL__BUILT;
    v.count = (uint32_t)n;
    v.u.p = pairs;
    return v;
}

hl_value hl_error(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    hl_value v = copied(HL_TYPE_STR, buf, (size_t)n);
    v.type = HL_TYPE_ERROR;
    return v;
}

/* ---- host calls --------------------------------------------------------- */

struct host_request {
    const char *name;
    int argc;
    const hl_value *argv;
};

static void encode_host_request(hl_writer *w, const void *ctx) {
    const struct host_request *r = ctx;
    hl__mp_write_array_header(w, 2);
    hl__mp_write_str(w, r->name, strlen(r->name));
    hl__mp_write_array_header(w, (uint32_t)r->argc);
    for (int i = 0; i < r->argc; i++) hl__mp_write_value(w, r->argv[i], 0);
}

hl_value hl_call_host(const char *name, int argc, const hl_value *argv) {
    if (argc < 0) hl__fail(HL_MSG_CALL_ERROR, "hl_call_host: negative argc");
    struct host_request request = {name, argc, argv};
    int rc = out_encoded(HL_MSG_HOSTCALL, encode_host_request, &request, 0);
    if (rc == OUT_TOO_DEEP)
        hl__fail(HL_MSG_CALL_ERROR, "hl_call_host(\"%s\"): an argument is nested deeper than %d levels", name,
                 HL_MAX_DEPTH);
    if (rc != 0)
        hl__fail(HL_MSG_CALL_ERROR, "hl_call_host(\"%s\"): arguments do not fit the output buffer (%zu bytes)",
                 name, hl__out_capacity());
    hl__signal(HL_EV_HOSTCALL);

    /* The host answered in REPLY (read-only to us). Copy the payload into
     * the arena so the value stays valid after the next host call. */
    const struct hl_msg_header *r = hl__reply_header();
    uint64_t len = r->length;
    if (r->magic != HL_MSG_MAGIC || r->kind != HL_MSG_REPLY_OK || len > hl__boot->reply_size - HL_MSG_HEADER_SIZE)
        hl__fail(HL_MSG_CALL_ERROR, "hl_call_host(\"%s\"): malformed reply", name);
    uint8_t *copy = hl__arena_alloc(len + 1);
    memcpy(copy, (const uint8_t *)r + HL_MSG_HEADER_SIZE, len);
    const uint8_t *p = copy;
    hl_value out;
    if (hl__mp_decode(&p, copy + len, &out, 0) != 0)
        hl__fail(HL_MSG_CALL_ERROR, "hl_call_host(\"%s\"): malformed reply", name);
    return out;
}

/* ---- memory configuration ------------------------------------------------ */

size_t hl_heap_size(void) { return (size_t)hl__boot->heap_size; }
size_t hl_stack_size(void) { return (size_t)hl__boot->stack_size; }
size_t hl_out_capacity(void) { return hl__out_capacity(); }

/* ---- mapped files -------------------------------------------------------- */

const void *hl_mapped_file(const char *name, size_t *size) {
    const struct hl_files_table *t = (const struct hl_files_table *)(uintptr_t)hl__boot->files_table;
    if (!t) return NULL;
    for (int i = 0; i < HL_FILES_MAX; i++) {
        const struct hl_file_entry *e = &t->entries[i];
        if (e->guest_address && strncmp(e->name, name, sizeof e->name) == 0) {
            if (size) *size = e->size;
            return (const void *)(uintptr_t)e->guest_address;
        }
    }
    return NULL;
}

/* ---- call dispatch --------------------------------------------------------- */

static void encode_value(hl_writer *w, const void *ctx) { hl__mp_write_value(w, *(const hl_value *)ctx, 0); }

static void write_result(hl_value v) {
    if (v.type == HL_TYPE_ERROR) {
        hl__out_record_bytes(HL_MSG_GUEST_ERROR, v.u.p, v.len, 0);
        return;
    }
    int rc = out_encoded(HL_MSG_OK, encode_value, &v, 0);
    if (rc == OUT_TOO_DEEP)
        hl__fail(HL_MSG_CALL_ERROR, "result nested deeper than %d levels (the limit for values crossing the boundary)",
                 HL_MAX_DEPTH);
    if (rc != 0)
        hl__fail(HL_MSG_CALL_ERROR, "result does not fit the output buffer (%zu bytes)", hl__out_capacity());
}

static void run_call(void) {
    const struct hl_msg_header *in = hl__in_header();
    hl__clock_set_base(in->aux1, hl__rdtsc());
    if (in->magic != HL_MSG_MAGIC || in->kind != HL_MSG_CALL || in->length > hl__boot->in_size - HL_MSG_HEADER_SIZE)
        hl__fail(HL_MSG_CALL_ERROR, "malformed call request");
    uint64_t index = in->aux0;
    if (index >= (uint64_t)export_count) hl__fail(HL_MSG_CALL_ERROR, "no exported function #%llu", (unsigned long long)index);

    const uint8_t *p = (const uint8_t *)in + HL_MSG_HEADER_SIZE, *end = p + in->length;
    hl_value arglist;
    /* depth -1: the argument array itself does not count, so each argument may nest
     * HL_MAX_DEPTH levels, as the host allows. */
    if (hl__mp_decode(&p, end, &arglist, -1) != 0 || arglist.type != HL_TYPE_LIST)
        hl__fail(HL_MSG_CALL_ERROR, "malformed call arguments");
    hl_args args = {(int)arglist.count, end, NULL};
    args.values = hl__arena_alloc((arglist.count + 1) * sizeof(hl_value));
    const uint8_t *q = arglist.u.p, *qend = q + arglist.len;
    for (uint32_t i = 0; i < arglist.count; i++)
        if (hl__mp_decode(&q, qend, &args.values[i], 0) != 0) hl__fail(HL_MSG_CALL_ERROR, "malformed argument %u", i);

    write_result(exports[index].fn(&args));
}

/* Runs forever: one iteration per call. The host snapshots the VM while it
 * is stopped at the HL_EV_INIT_DONE signal, so every call begins here. */
static HL_NORETURN void serve(void) {
    hl__signal(HL_EV_INIT_DONE);
    for (;;) {
        hl__log_reset();
        hl__arena_reset();
        HL__CALL->seek_base = NULL;
        HL__CALL->in_call = 1;
        if (setjmp(HL__CALL->env) == 0) run_call();
        HL__CALL->in_call = 0;
        flush_stdio();
        hl__signal(HL_EV_RESULT);
    }
}

static void encode_exports(hl_writer *w, const void *ctx) {
    (void)ctx;
    hl__mp_write_array_header(w, (uint32_t)export_count);
    for (int i = 0; i < export_count; i++) hl__mp_write_str(w, exports[i].name, strlen(exports[i].name));
}

/* Called by musl's __libc_start_main once libc is initialised. */
static int hl__main(int argc, char **argv, char **envp) {
    (void)argc;
    (void)argv;
    (void)envp;
    int rc = hl_main();
    initialising = 0;
    flush_stdio();
    if (init_error[0]) hl__fail(HL_MSG_CALL_ERROR, "%s", init_error);

    if (out_encoded(HL_MSG_INIT, encode_exports, NULL, (uint64_t)(int64_t)rc) != 0)
        hl__fail(HL_MSG_CALL_ERROR, "the export list does not fit the output buffer");
    serve();
}

/* ---- boot ----------------------------------------------------------------- */

#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_SFMASK 0xC0000084u
/* rflags bits cleared on syscall entry: TF, DF, IOPL, NT, AC. Not IF: on PVM a
 * popfq cannot set IF again (see PVM.md). */
#define SYSCALL_FLAG_MASK 0x47500u

static inline void wrmsr(uint32_t msr, uint64_t v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

extern void hl__syscall_entry(void);
extern const uint64_t hl__vector_table[32];

struct idt_gate {
    uint16_t offset_low, selector;
    uint8_t ist, type_attr;
    uint16_t offset_mid;
    uint32_t offset_high, zero;
};
static struct idt_gate idt[32] __attribute__((aligned(16)));

static void install_idt(void) {
    for (int v = 0; v < 32; v++) {
        uint64_t h = hl__vector_table[v];
        idt[v].offset_low = (uint16_t)h;
        idt[v].selector = 0x08;
        idt[v].ist = 1;            /* always switch to the exception stack */
        idt[v].type_attr = 0x8e;   /* present, DPL0, 64-bit interrupt gate */
        idt[v].offset_mid = (uint16_t)(h >> 16);
        idt[v].offset_high = (uint32_t)(h >> 32);
        idt[v].zero = 0;
    }
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr = {sizeof idt - 1, (uint64_t)(uintptr_t)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

extern int __libc_start_main(int (*)(int, char **, char **), int, char **, void (*)(void), void (*)(void),
                             void (*)(void));

#define AT_NULL 0
#define AT_PHDR 3
#define AT_PHENT 4
#define AT_PHNUM 5
#define AT_PAGESZ 6
#define AT_RANDOM 25

void hl__start_c(const struct hl_boot_info *boot);
void hl__start_c(const struct hl_boot_info *boot) {
    hl__boot = boot;
    if (boot->magic != HL_BOOT_MAGIC || boot->abi_version != HL_ABI_VERSION) {
        hl__signal(HL_EV_FAULT); /* the host checks the ABI itself; this cannot be reported better */
        for (;;) __asm__ volatile("hlt");
    }
    install_idt();
    wrmsr(MSR_STAR, (uint64_t)0x08 << 32);
    wrmsr(MSR_LSTAR, (uint64_t)(uintptr_t)hl__syscall_entry);
    wrmsr(MSR_SFMASK, SYSCALL_FLAG_MASK);
    hl__heap_init();
    initialising = 1; /* constructors may export functions too */
    hl__clock_set_base(hl__in_header()->aux1, hl__rdtsc());

    static unsigned char random_bytes[16];
    hl__get_random(random_bytes, sizeof random_bytes);
    static char argv0[] = "hlpool-guest";
    /* argv, then envp (empty), then the auxiliary vector: the layout musl
     * expects after argc on a process's initial stack. */
    static size_t start_block[] = {
        0, 0,  /* argv[0], NULL */
        0,     /* envp: NULL */
        AT_PHDR, 0, AT_PHNUM, 0, AT_PHENT, 0, AT_PAGESZ, HL_PAGE_SIZE, AT_RANDOM, 0, AT_NULL, 0,
    };
    start_block[0] = (size_t)argv0;
    start_block[4] = boot->phdr;
    start_block[6] = boot->phnum;
    start_block[8] = boot->phent;
    start_block[12] = (size_t)random_bytes;
    __libc_start_main(hl__main, 1, (char **)start_block, 0, 0, 0);
    for (;;) __asm__ volatile("hlt");
}

/* ---- exceptions ------------------------------------------------------------ */

struct exception_frame {
    uint64_t vector, error_code, rip, cs, rflags, rsp, ss;
};

void hl__exception(const struct exception_frame *f);
void hl__exception(const struct exception_frame *f) {
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    struct hl_msg_header *h = hl__out_header();
    h->kind = HL_MSG_FAULT;
    h->length = 8;
    h->aux0 = f->vector;
    h->aux1 = f->error_code;
    h->aux2 = f->rip;
    h->aux3 = cr2;
    h->aux4 = 0;
    memcpy(hl__out_payload_for(8), &f->rsp, 8);
    h->magic = HL_MSG_MAGIC;
    for (;;) {
        hl__signal(HL_EV_FAULT);
        __asm__ volatile("hlt");
    }
}

/* gcc may reference it for atexit handlers in C++-compiled code. */
void *__dso_handle = &__dso_handle;
