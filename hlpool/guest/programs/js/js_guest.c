/*
 * js_guest.c - QuickJS as an hlpool guest.
 *
 * Exports:
 *   eval(source)          -> the completion value of the script `source`
 *   load(source)          -> None; runs `source` in the global scope (defines functions)
 *   call(name, args=[])   -> calls the global function `name` ("a.b.c" walks properties)
 *
 * The runtime and context are created once in hl_main, so they are part of the
 * snapshot; every call starts from it (or from a layered snapshot taken after
 * load()). A thrown JS error ends the call with hl_error("<message>\n<stack>").
 * The interpreter's memory limit is 3/4 of the guest heap: an allocation bomb
 * is a JS "out of memory" InternalError, reported the same way.
 *
 * Scripts reach the host with host.call(name, ...args) (hl_call_host: the
 * host's validation applies; a failing host function ends the whole call with
 * HostFunctionError), and print with console.log(...) / print(...).
 *
 * Value mapping: see hlpool/interpreters.py (and js_to_hl / hl_to_js below).
 */
#include <hlpool.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "quickjs.h"
#include "interp_util.h"
#include "pack_alloc.h"

static JSRuntime *rt;
static JSContext *ctx;
static size_t memory_limit;
static JSValue ctor_promise, ctor_array_buffer, ctor_uint8array, ctor_typed_array, settle_fn;

/* ---- errors ------------------------------------------------------------------------------ */

/* Conversion failures: -1 with a message in conv_error, or -2 when a JS exception is pending. */
#define CONV_ERROR (-1)
#define CONV_EXCEPTION (-2)
static char conv_error[512];

static int conv_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int conv_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(conv_error, sizeof conv_error, fmt, ap);
    va_end(ap);
    return CONV_ERROR;
}

/* A C string of a JS value for messages (never NULL; "?" if even that fails). */
static void describe(JSValueConst v, char *buf, size_t cap) {
    const char *s = JS_ToCString(ctx, v);
    if (!s) {
        JS_FreeValue(ctx, JS_GetException(ctx));
        snprintf(buf, cap, "?");
        return;
    }
    snprintf(buf, cap, "%s", s);
    JS_FreeCString(ctx, s);
}

/* The pending JS exception as an hl_error: "<Name>: <message>\n<stack>". */
static hl_value exception_error(void) {
    /* Formatting the error needs a little memory even when the script used it all up. */
    JS_SetMemoryLimit(rt, memory_limit + 4 * 1024 * 1024);
    JSValue exc = JS_GetException(ctx);
    char message[768], stack[1536];
    stack[0] = 0;
    if (JS_IsNull(exc) || JS_IsUninitialized(exc)) {
        snprintf(message, sizeof message, "InternalError: out of memory");
    } else if (JS_IsError(ctx, exc)) {
        describe(exc, message, sizeof message);
        JSValue st = JS_GetPropertyStr(ctx, exc, "stack");
        if (JS_IsString(st)) describe(st, stack, sizeof stack);
        JS_FreeValue(ctx, st);
    } else {
        char what[700];
        describe(exc, what, sizeof what);
        snprintf(message, sizeof message, "uncaught exception: %s", what);
    }
    JS_FreeValue(ctx, exc);
    JS_SetMemoryLimit(rt, memory_limit);
    size_t n = strlen(stack);
    while (n && (stack[n - 1] == '\n' || stack[n - 1] == ' ')) stack[--n] = 0;
    /* Keep the first frames (a runaway recursion repeats one line hundreds of times). */
    int lines = 0;
    for (size_t i = 0; i < n; i++) {
        if (stack[i] == '\n' && ++lines == 12) {
            snprintf(stack + i, sizeof stack - i, "\n    ...");
            n = strlen(stack);
            break;
        }
    }
    char *clean = utf8_sanitize_dup(message, strlen(message));
    char *clean_stack = utf8_sanitize_dup(stack, n);
    hl_value err = n ? hl_error("%s\n%s", clean, clean_stack) : hl_error("%s", clean);
    free(clean);
    free(clean_stack);
    return err;
}

static hl_value conversion_error(int rc, const char *what) {
    if (rc == CONV_EXCEPTION) return exception_error();
    return hl_error("%s: %s", what, conv_error);
}

/* ---- JS -> host values ------------------------------------------------------------------ */

static int js_to_hl(JSValueConst v, int depth, hl_value *out);

static hl_value number_value(double d) {
    if (d == trunc(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0 && !(d == 0 && signbit(d)))
        return hl_int((int64_t)d);
    return hl_float(d);
}

static int string_to_hl(JSValueConst v, hl_value *out, int bytes) {
    size_t len;
    const char *s = JS_ToCStringLen(ctx, &len, v);
    if (!s) return CONV_EXCEPTION;
    if (bytes || utf8_valid(s, len)) {
        *out = bytes ? hl_bytes(s, len) : hl_strn(s, len);
    } else {
        char *clean = utf8_sanitize_dup(s, len);
        *out = hl_str(clean);
        free(clean);
    }
    JS_FreeCString(ctx, s);
    return 0;
}

static int is_instance(JSValueConst v, JSValueConst ctor) {
    int r = JS_IsInstanceOf(ctx, v, ctor);
    if (r < 0) JS_FreeValue(ctx, JS_GetException(ctx));
    return r > 0;
}

static int length_of(JSValueConst v, uint32_t *n) {
    JSValue len = JS_GetPropertyStr(ctx, v, "length");
    if (JS_IsException(len)) return CONV_EXCEPTION;
    int64_t l;
    int rc = JS_ToInt64(ctx, &l, len);
    JS_FreeValue(ctx, len);
    if (rc < 0) return CONV_EXCEPTION;
    if (l < 0) l = 0;
    if ((uint64_t)l > guest_out_capacity()) return conv_fail("array of %lld items does not fit the output buffer",
                                                             (long long)l);
    *n = (uint32_t)l;
    return 0;
}

static int array_to_hl(JSValueConst v, int depth, hl_value *out) {
    uint32_t n = 0;
    int rc = length_of(v, &n);
    if (rc) return rc;
    hl_value *items = malloc((n ? n : 1) * sizeof *items);
    if (!items) return conv_fail("out of memory converting an array of %u items", n);
    for (uint32_t i = 0; i < n; i++) {
        JSValue e = JS_GetPropertyUint32(ctx, v, i);
        if (JS_IsException(e)) {
            free(items);
            return CONV_EXCEPTION;
        }
        rc = js_to_hl(e, depth + 1, &items[i]);
        JS_FreeValue(ctx, e);
        if (rc) {
            if (rc == CONV_ERROR) {
                char inner[sizeof conv_error];
                memcpy(inner, conv_error, sizeof inner);
                conv_fail("[%u]%s%s", i, inner[0] == '[' ? "" : ": ", inner);
            }
            free(items);
            return rc;
        }
    }
    *out = hl_list(n, items);
    free(items);
    return 0;
}

static int buffer_to_hl(JSValueConst v, int typed, hl_value *out) {
    size_t offset = 0, length = 0, size, bpe;
    JSValue buf = JS_DupValue(ctx, v);
    if (typed) {
        JS_FreeValue(ctx, buf);
        buf = JS_GetTypedArrayBuffer(ctx, v, &offset, &length, &bpe);
        if (JS_IsException(buf)) return CONV_EXCEPTION;
    }
    uint8_t *data = JS_GetArrayBuffer(ctx, &size, buf);
    JS_FreeValue(ctx, buf);
    if (!data) return CONV_EXCEPTION; /* detached */
    if (!typed) length = size;
    if (offset > size || length > size - offset) return conv_fail("typed array out of its buffer's bounds");
    *out = hl_bytes(data + offset, length);
    return 0;
}

static int object_to_hl(JSValueConst v, int depth, hl_value *out) {
    JSPropertyEnum *tab;
    uint32_t n;
    if (JS_GetOwnPropertyNames(ctx, &tab, &n, v, JS_GPN_STRING_MASK | JS_GPN_ENUM_ONLY) < 0) return CONV_EXCEPTION;
    const char **keys = malloc((n ? n : 1) * sizeof *keys);
    hl_value *values = malloc((n ? n : 1) * sizeof *values);
    int rc = 0;
    if (!keys || !values) rc = conv_fail("out of memory converting an object of %u properties", n);
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        const char *k = JS_AtomToCString(ctx, tab[i].atom);
        if (!k) {
            rc = CONV_EXCEPTION;
            break;
        }
        hl_value key = utf8_valid(k, strlen(k)) ? hl_str(k) : hl_none();
        if (key.type == HL_TYPE_NONE) {
            char *clean = utf8_sanitize_dup(k, strlen(k));
            key = hl_str(clean);
            free(clean);
        }
        JS_FreeCString(ctx, k);
        keys[i] = (const char *)key.u.p; /* NUL-terminated copy in the call's arena */
        JSValue e = JS_GetProperty(ctx, v, tab[i].atom);
        if (JS_IsException(e)) {
            rc = CONV_EXCEPTION;
            break;
        }
        rc = js_to_hl(e, depth + 1, &values[i]);
        JS_FreeValue(ctx, e);
        if (rc == CONV_ERROR) {
            char inner[sizeof conv_error];
            memcpy(inner, conv_error, sizeof inner);
            conv_fail("[\"%.64s\"]%s%s", keys[i], inner[0] == '[' ? "" : ": ", inner);
        }
    }
    for (uint32_t i = 0; i < n; i++) JS_FreeAtom(ctx, tab[i].atom);
    js_free(ctx, tab);
    if (rc == 0) *out = hl_dict(n, keys, values);
    free(keys);
    free(values);
    return rc;
}

static int js_to_hl(JSValueConst v, int depth, hl_value *out) {
    switch (JS_VALUE_GET_NORM_TAG(v)) {
    case JS_TAG_INT: *out = hl_int(JS_VALUE_GET_INT(v)); return 0;
    case JS_TAG_BOOL: *out = hl_bool(JS_VALUE_GET_BOOL(v)); return 0;
    case JS_TAG_NULL:
    case JS_TAG_UNDEFINED:
    case JS_TAG_UNINITIALIZED: *out = hl_none(); return 0;
    case JS_TAG_FLOAT64: *out = number_value(JS_VALUE_GET_FLOAT64(v)); return 0;
    case JS_TAG_STRING: return string_to_hl(v, out, 0);
    case JS_TAG_BIG_INT: {
        const char *s = JS_ToCString(ctx, v);
        if (!s) return CONV_EXCEPTION;
        char *end;
        errno = 0;
        long long i = strtoll(s, &end, 10);
        int bad = errno != 0 || *end != 0;
        JS_FreeCString(ctx, s);
        if (bad) return conv_fail("BigInt does not fit in 64 bits");
        *out = hl_int(i);
        return 0;
    }
    case JS_TAG_SYMBOL: return conv_fail("a Symbol cannot be passed to the host");
    case JS_TAG_OBJECT: break;
    default: return conv_fail("a value of this type (tag %d) cannot be passed to the host",
                              (int)JS_VALUE_GET_TAG(v));
    }
    if (depth >= HL_MAX_DEPTH)
        return conv_fail("value nested deeper than %d levels (or cyclic)", HL_MAX_DEPTH);
    if (JS_IsFunction(ctx, v)) return conv_fail("a function cannot be passed to the host");
    int is_array = JS_IsArray(ctx, v);
    if (is_array < 0) return CONV_EXCEPTION;
    if (is_array) return array_to_hl(v, depth, out);
    if (is_instance(v, ctor_uint8array)) return buffer_to_hl(v, 1, out);
    if (is_instance(v, ctor_array_buffer)) return buffer_to_hl(v, 0, out);
    if (is_instance(v, ctor_typed_array)) return array_to_hl(v, depth, out);
    JSValue to_json = JS_GetPropertyStr(ctx, v, "toJSON");
    if (JS_IsException(to_json)) return CONV_EXCEPTION;
    if (JS_IsFunction(ctx, to_json)) {
        JSValue r = JS_Call(ctx, to_json, v, 0, NULL);
        JS_FreeValue(ctx, to_json);
        if (JS_IsException(r)) return CONV_EXCEPTION;
        int rc = js_to_hl(r, depth + 1, out);
        JS_FreeValue(ctx, r);
        return rc;
    }
    JS_FreeValue(ctx, to_json);
    return object_to_hl(v, depth, out);
}

/* ---- host values -> JS ------------------------------------------------------------------ */

static JSValue hl_to_js(hl_value v, int depth);

static JSValue container_to_js(hl_value v, int depth) {
    if (depth >= HL_MAX_DEPTH) return JS_ThrowRangeError(ctx, "value nested deeper than %d levels", HL_MAX_DEPTH);
    int is_list = v.type == HL_TYPE_LIST;
    JSValue obj = is_list ? JS_NewArray(ctx) : JS_NewObject(ctx);
    if (JS_IsException(obj)) return obj;
    hl_iter it;
    hl_value key, item;
    hl_iter_init(&it, v);
    for (uint32_t i = 0; hl_iter_next(&it, &key, &item); i++) {
        JSValue e = hl_to_js(item, depth + 1);
        if (JS_IsException(e)) {
            JS_FreeValue(ctx, obj);
            return e;
        }
        int rc;
        if (is_list) {
            rc = JS_SetPropertyUint32(ctx, obj, i, e);
        } else {
            if (key.type != HL_TYPE_STR) hl_as_str(key, "dict key", NULL); /* the CallError */
            JSAtom atom = JS_NewAtomLen(ctx, (const char *)key.u.p, key.len);
            if (atom == JS_ATOM_NULL) {
                JS_FreeValue(ctx, e);
                rc = -1;
            } else {
                rc = JS_DefinePropertyValue(ctx, obj, atom, e, JS_PROP_C_W_E);
                JS_FreeAtom(ctx, atom);
            }
        }
        if (rc < 0) {
            JS_FreeValue(ctx, obj);
            return JS_EXCEPTION;
        }
    }
    return obj;
}

static JSValue hl_to_js(hl_value v, int depth) {
    switch (v.type) {
    case HL_TYPE_NONE: return JS_NULL;
    case HL_TYPE_BOOL: return JS_NewBool(ctx, v.u.b);
    case HL_TYPE_INT: return JS_NewInt64(ctx, v.u.i);
    case HL_TYPE_FLOAT: return JS_NewFloat64(ctx, v.u.f);
    case HL_TYPE_STR: {
        size_t len;
        const char *s = hl_as_str(v, "string", &len);
        return JS_NewStringLen(ctx, s, len);
    }
    case HL_TYPE_BYTES: {
        size_t len;
        const void *data = hl_as_bytes(v, "bytes", &len);
        JSValue buf = JS_NewArrayBufferCopy(ctx, data, len);
        if (JS_IsException(buf)) return buf;
        JSValue arr = JS_CallConstructor(ctx, ctor_uint8array, 1, (JSValueConst *)&buf);
        JS_FreeValue(ctx, buf);
        return arr;
    }
    case HL_TYPE_LIST:
    case HL_TYPE_DICT: return container_to_js(v, depth);
    default: return JS_ThrowTypeError(ctx, "unsupported host value type %s", hl_type_name(v.type));
    }
}

/* ---- running code ---------------------------------------------------------------------- */

/* Run queued promise jobs; -1 with the exception pending if one threw. */
static int run_jobs(void) {
    JSContext *job_ctx;
    for (;;) {
        int r = JS_ExecutePendingJob(rt, &job_ctx);
        if (r == 0) return 0;
        if (r < 0) return -1;
    }
}

/* Math.random: seeded from getrandom() on first use in each call. The seed
 * flag lives in guest memory, which every call restores, so no two calls
 * (and no two sandboxes of a snapshot) share a random sequence. */
static uint64_t rng[2];
static int rng_seeded;

static JSValue js_math_random(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    (void)argc;
    (void)argv;
    if (!rng_seeded) {
        if (getrandom(rng, sizeof rng, 0) != sizeof rng || (rng[0] | rng[1]) == 0) rng[0] = 0x9e3779b97f4a7c15ull;
        rng_seeded = 1;
    }
    /* xorshift128+ */
    uint64_t s1 = rng[0], s0 = rng[1];
    rng[0] = s0;
    s1 ^= s1 << 23;
    rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return JS_NewFloat64(c, (double)((rng[1] + s0) >> 11) * 0x1.0p-53);
}

static void begin_call(void) { JS_UpdateStackTop(rt); }

/* Take ownership of `v` (the result of an evaluation), settle it if it is a
 * promise, convert it. */
static hl_value finish(JSValue v, int want_value) {
    if (JS_IsException(v)) return exception_error();
    if (run_jobs() < 0) {
        JS_FreeValue(ctx, v);
        return exception_error();
    }
    if (want_value && JS_IsObject(v) && is_instance(v, ctor_promise)) {
        JSValue box = JS_Call(ctx, settle_fn, JS_UNDEFINED, 1, (JSValueConst *)&v);
        JS_FreeValue(ctx, v);
        if (JS_IsException(box)) return exception_error();
        if (run_jobs() < 0) {
            JS_FreeValue(ctx, box);
            return exception_error();
        }
        JSValue state = JS_GetPropertyStr(ctx, box, "state");
        int st = JS_IsNumber(state) ? JS_VALUE_GET_INT(state) : 0;
        JS_FreeValue(ctx, state);
        JSValue value = JS_GetPropertyStr(ctx, box, "value");
        JS_FreeValue(ctx, box);
        if (st == 0) {
            JS_FreeValue(ctx, value);
            return hl_error("the returned promise did not settle (no pending jobs left)");
        }
        if (st == 2) {
            JS_Throw(ctx, value);
            return exception_error();
        }
        v = value;
    }
    if (!want_value) {
        JS_FreeValue(ctx, v);
        return hl_none();
    }
    hl_value out;
    int rc = js_to_hl(v, 0, &out);
    JS_FreeValue(ctx, v);
    if (rc) return conversion_error(rc, "cannot convert the result");
    return out;
}

static hl_value fn_eval(const hl_args *a) {
    size_t len;
    const char *src = hl_arg_str(a, 0, &len);
    begin_call();
    return finish(JS_Eval(ctx, src, len, "<eval>", JS_EVAL_TYPE_GLOBAL), 1);
}

static hl_value fn_load(const hl_args *a) {
    size_t len;
    const char *src = hl_arg_str(a, 0, &len);
    /* What this load allocates goes to fresh, contiguous pages (its snapshot layer stays small). */
    pack_begin_load(PACK_LOAD_BUDGET);
    begin_call();
    hl_value r = finish(JS_Eval(ctx, src, len, "<script>", JS_EVAL_TYPE_GLOBAL), 0);
    pack_end_load();
    /* A snapshot is usually taken after load(): do not freeze a random sequence into it. */
    rng_seeded = 0;
    memset(rng, 0, sizeof rng);
    return r;
}

static int is_identifier(const char *s, size_t len) {
    if (len == 0) return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        int ok = c == '_' || c == '$' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80 ||
                 (i > 0 && c >= '0' && c <= '9');
        if (!ok) return 0;
    }
    return 1;
}

/* Resolve "a.b.c": *fn = the value, *this_obj = its holder. */
static hl_value resolve(const char *name, JSValue *fn, JSValue *this_obj) {
    JSValue holder = JS_GetGlobalObject(ctx);
    JSValue cur = JS_UNDEFINED;
    const char *p = name;
    int first = 1;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t seg = dot ? (size_t)(dot - p) : strlen(p);
        if (seg == 0) {
            JS_FreeValue(ctx, holder);
            return hl_error("invalid function name \"%s\"", name);
        }
        JSAtom atom = JS_NewAtomLen(ctx, p, seg);
        int has = JS_HasProperty(ctx, holder, atom);
        if (has > 0) {
            cur = JS_GetProperty(ctx, holder, atom);
        } else if (first && has == 0 && is_identifier(p, seg)) {
            /* A top-level let/const/class binding: in the global lexical scope, not on globalThis. */
            cur = JS_Eval(ctx, p, seg, "<call>", JS_EVAL_TYPE_GLOBAL);
            if (JS_IsException(cur)) {
                JS_FreeValue(ctx, JS_GetException(ctx));
                cur = JS_UNDEFINED;
            }
        } else {
            cur = has < 0 ? JS_EXCEPTION : JS_UNDEFINED;
        }
        JS_FreeAtom(ctx, atom);
        if (JS_IsException(cur)) {
            JS_FreeValue(ctx, holder);
            return exception_error();
        }
        if (!dot) break;
        if (!JS_IsObject(cur)) {
            JS_FreeValue(ctx, cur);
            JS_FreeValue(ctx, holder);
            return hl_error("no function named \"%s\" (\"%.*s\" is not an object)", name,
                            (int)(dot - name), name);
        }
        JS_FreeValue(ctx, holder);
        holder = cur;
        p = dot + 1;
        first = 0;
    }
    if (!JS_IsFunction(ctx, cur)) {
        int undefined = JS_IsUndefined(cur);
        JS_FreeValue(ctx, cur);
        JS_FreeValue(ctx, holder);
        return undefined ? hl_error("no function named \"%s\" is defined", name)
                         : hl_error("\"%s\" is not a function", name);
    }
    *fn = cur;
    *this_obj = holder;
    return hl_none();
}

static hl_value fn_call(const hl_args *a) {
    const char *name = hl_arg_str(a, 0, NULL);
    hl_value args = hl_arg(a, 1);
    if (args.type != HL_TYPE_LIST && args.type != HL_TYPE_NONE && args.type != HL_TYPE_MISSING)
        return hl_error("call(name, args): args must be a list, not %s", hl_type_name(args.type));
    if (hl_argc(a) > 2) return hl_error("call(name, args): pass the arguments as one list");
    begin_call();
    JSValue fn, this_obj;
    hl_value err = resolve(name, &fn, &this_obj);
    if (err.type == HL_TYPE_ERROR) return err;
    uint32_t n = args.type == HL_TYPE_LIST ? args.count : 0;
    JSValue *argv = malloc((n ? n : 1) * sizeof *argv);
    if (!argv) return hl_error("out of memory");
    hl_iter it;
    hl_value item;
    if (n) hl_iter_init(&it, args);
    for (uint32_t i = 0; i < n && hl_iter_next(&it, NULL, &item); i++) {
        argv[i] = hl_to_js(item, 1);
        if (JS_IsException(argv[i])) {
            for (uint32_t j = 0; j < i; j++) JS_FreeValue(ctx, argv[j]);
            free(argv);
            JS_FreeValue(ctx, fn);
            JS_FreeValue(ctx, this_obj);
            return exception_error();
        }
    }
    JSValue r = JS_Call(ctx, fn, this_obj, (int)n, (JSValueConst *)argv);
    for (uint32_t i = 0; i < n; i++) JS_FreeValue(ctx, argv[i]);
    free(argv);
    JS_FreeValue(ctx, fn);
    JS_FreeValue(ctx, this_obj);
    return finish(r, 1);
}

/* ---- host access from scripts --------------------------------------------------------- */

static JSValue js_host_call(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    if (argc < 1 || !JS_IsString(argv[0])) return JS_ThrowTypeError(c, "host.call(name, ...args): name must be a string");
    if (argc - 1 > 64) return JS_ThrowRangeError(c, "host.call: at most 64 arguments");
    hl_value values[64];
    for (int i = 1; i < argc; i++) {
        int rc = js_to_hl(argv[i], 1, &values[i - 1]);
        if (rc == CONV_EXCEPTION) return JS_EXCEPTION;
        if (rc) return JS_ThrowTypeError(c, "host.call: argument %d: %s", i, conv_error);
    }
    const char *name = JS_ToCString(c, argv[0]);
    if (!name) return JS_EXCEPTION;
    hl_value name_copy = hl_str(name);
    JS_FreeCString(c, name);
    /* If the host function fails, the whole call ends here with HostFunctionError. */
    hl_value r = hl_call_host((const char *)name_copy.u.p, argc - 1, values);
    return hl_to_js(r, 0);
}

static JSValue js_print(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    for (int i = 0; i < argc; i++) {
        const char *s = JS_ToCString(c, argv[i]);
        if (!s) return JS_EXCEPTION;
        fputs(s, stdout);
        if (i + 1 < argc) fputc(' ', stdout);
        JS_FreeCString(c, s);
    }
    fputc('\n', stdout);
    return JS_UNDEFINED;
}

static JSValue global_ref(JSValueConst global, const char *name) {
    return JS_GetPropertyStr(ctx, global, name);
}

/* ---- memory: QuickJS's allocation hooks over pack_alloc.h, with QuickJS's own accounting ---- */

#define JS_BLOCK_OVERHEAD PACK_HEADER

static void *js_pack_malloc(JSMallocState *s, size_t size) {
    if (size > s->malloc_limit || s->malloc_size + size > s->malloc_limit) return NULL;
    void *p = pack_malloc(size);
    if (!p) return NULL;
    s->malloc_count++;
    s->malloc_size += pack_usable_size(p) + JS_BLOCK_OVERHEAD;
    return p;
}

static void js_pack_free(JSMallocState *s, void *p) {
    if (!p) return;
    s->malloc_count--;
    s->malloc_size -= pack_usable_size(p) + JS_BLOCK_OVERHEAD;
    pack_free(p);
}

static void *js_pack_realloc(JSMallocState *s, void *p, size_t size) {
    if (!p) return size ? js_pack_malloc(s, size) : NULL;
    size_t old = pack_usable_size(p);
    if (size == 0) {
        js_pack_free(s, p);
        return NULL;
    }
    if (size > old && (size - old > s->malloc_limit || s->malloc_size + (size - old) > s->malloc_limit)) return NULL;
    void *q = pack_realloc(p, size);
    if (!q) return NULL;
    s->malloc_size = s->malloc_size - old + pack_usable_size(q);
    return q;
}

static const JSMallocFunctions pack_malloc_functions = {
    js_pack_malloc, js_pack_free, js_pack_realloc, pack_usable_size,
};

static const char SETTLE_SOURCE[] =
    "(function (p) {\n"
    "    var box = { state: 0, value: undefined };\n"
    "    p.then(function (v) { box.state = 1; box.value = v; },\n"
    "           function (e) { box.state = 2; box.value = e; });\n"
    "    return box;\n"
    "})";

int hl_main(void) {
    memory_limit = guest_heap_size() / 4 * 3;
    pack_init(guest_heap_size());
    rt = JS_NewRuntime2(&pack_malloc_functions, NULL);
    if (!rt) return 1;
    JS_SetMemoryLimit(rt, memory_limit);
    /* Leave a margin below the guest stack for C frames between QuickJS's checks. */
    size_t stack = guest_stack_size();
    JS_SetMaxStackSize(rt, stack > 512 * 1024 ? stack - 256 * 1024 : stack / 2);
    ctx = JS_NewContext(rt);
    if (!ctx) return 2;

    JSValue global = JS_GetGlobalObject(ctx);
    JSValue host = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, host, "call", JS_NewCFunction(ctx, js_host_call, "call", 1));
    JS_SetPropertyStr(ctx, global, "host", host);
    JSValue console = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, console, "log", JS_NewCFunction(ctx, js_print, "log", 1));
    JS_SetPropertyStr(ctx, console, "error", JS_NewCFunction(ctx, js_print, "error", 1));
    JS_SetPropertyStr(ctx, global, "console", console);
    JS_SetPropertyStr(ctx, global, "print", JS_NewCFunction(ctx, js_print, "print", 1));
    JSValue math = JS_GetPropertyStr(ctx, global, "Math");
    JS_SetPropertyStr(ctx, math, "random", JS_NewCFunction(ctx, js_math_random, "random", 0));
    JS_FreeValue(ctx, math);

    ctor_promise = global_ref(global, "Promise");
    ctor_array_buffer = global_ref(global, "ArrayBuffer");
    ctor_uint8array = global_ref(global, "Uint8Array");
    ctor_typed_array = JS_GetPrototype(ctx, ctor_uint8array); /* %TypedArray% (a new reference) */
    JS_FreeValue(ctx, global);
    settle_fn = JS_Eval(ctx, SETTLE_SOURCE, sizeof SETTLE_SOURCE - 1, "<hlpool>", JS_EVAL_TYPE_GLOBAL);
    if (JS_IsException(settle_fn)) return 3;
    /* Start every call with a collected heap (fewer pages for calls to touch). */
    JS_RunGC(rt);

    hl_export("eval", fn_eval);
    hl_export("load", fn_load);
    hl_export("call", fn_call);
    return 0;
}
