/*
 * lua_guest.c - Lua 5.4 as an hlpool guest.
 *
 * Exports:
 *   eval(source)          -> the first value of `return <source>` if that compiles, else of the chunk
 *   load(source)          -> None; runs the chunk `source` (defines global functions and state)
 *   call(name, args=[])   -> calls the global function `name` ("a.b" walks tables), first result
 *
 * The state is created once in hl_main with an allocator that enforces a byte
 * limit (3/4 of the guest heap): an allocation bomb is Lua's "not enough
 * memory" error, reported as hl_error. Runtime errors carry Lua's traceback.
 * Only text chunks are accepted (no precompiled bytecode, also not via load()).
 *
 * Libraries: base (without dofile/loadfile), coroutine, table, string, math,
 * utf8, and os with clock/date/difftime/time only. No io, package or debug.
 * Scripts reach the host with host.call(name, ...) and print with print().
 * math.random is seeded from getrandom() on the first use in each call
 * (unless the script seeds it itself with math.randomseed).
 *
 * Value mapping: see hlpool/interpreters.py (and to_hl / push_hl below).
 */
#include <hlpool.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

#include "interp_util.h"
#include "pack_alloc.h"

static lua_State *L;
static size_t mem_used, mem_limit;
/* The message of the last plain error (raised by this glue: conversions, bad names,
 * syntax errors): compared by address only, so the handler adds no traceback to it. */
static const char *plain_message;
static int rng_seeded, rng_explicit;

/* ---- memory ---------------------------------------------------------------------------- */

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    (void)ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        pack_free(ptr);
        mem_used -= old;
        return NULL;
    }
    if (nsize > old && (nsize - old > mem_limit || mem_used + (nsize - old) > mem_limit)) return NULL;
    void *p = pack_realloc(ptr, nsize);
    if (!p) {
        if (ptr && nsize <= old) { /* Lua expects shrinking to succeed: keep the bigger block */
            mem_used -= old - nsize;
            return ptr;
        }
        return NULL;
    }
    mem_used = mem_used - old + nsize;
    return p;
}

static int panic(lua_State *l) {
    const char *msg = lua_tostring(l, -1);
    fprintf(stderr, "lua panic: %s\n", msg ? msg : "(error object is not a string)");
    abort();
}

/* ---- errors ------------------------------------------------------------------------------ */

static int msghandler(lua_State *l) {
    const char *msg = lua_tostring(l, 1);
    if (msg && msg == plain_message) return 1;
    if (msg == NULL) {
        if (luaL_callmeta(l, 1, "__tostring") && lua_type(l, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(l, "(error object is a %s value)", luaL_typename(l, 1));
    }
    luaL_traceback(l, l, msg, 1);
    return 1;
}

/* Raise a plain error (conversion problems, bad calls): message without traceback. */
static int plain_error(lua_State *l, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    plain_message = lua_pushvfstring(l, fmt, ap);
    va_end(ap);
    return lua_error(l);
}

/* ---- Lua -> host values ------------------------------------------------------------------ */

static void to_hl(lua_State *l, int idx, int depth, hl_value *out);

static void string_to_hl(lua_State *l, int idx, hl_value *out) {
    size_t len;
    const char *s = lua_tolstring(l, idx, &len);
    *out = utf8_valid(s, len) ? hl_strn(s, len) : hl_bytes(s, len);
}

static void table_to_hl(lua_State *l, int idx, int depth, hl_value *out) {
    if (depth >= HL_MAX_DEPTH) plain_error(l, "value nested deeper than %d levels (or cyclic)", HL_MAX_DEPTH);
    luaL_checkstack(l, 6, "value nested too deeply");
    /* A table whose keys are all integers 1..n is a list; holes (nil) are allowed as long as
     * at least half of 1..n is present (like a Python list with None items). */
    size_t count = 0;
    lua_Integer maxkey = 0;
    int all_int = 1;
    lua_pushnil(l);
    while (lua_next(l, idx)) {
        count++;
        if (all_int) {
            if (!lua_isinteger(l, -2)) {
                all_int = 0;
            } else {
                lua_Integer k = lua_tointeger(l, -2);
                if (k < 1) all_int = 0;
                else if (k > maxkey) maxkey = k;
            }
        }
        lua_pop(l, 1);
    }
    if (count > guest_out_capacity()) plain_error(l, "table of %d entries does not fit the output buffer", (int)count);
    if (all_int && count > 0 && (lua_Unsigned)maxkey <= 2 * (lua_Unsigned)count) {
        size_t n = (size_t)maxkey;
        /* Scratch space as a userdata: counted against the limit, collected even after an error. */
        hl_value *items = lua_newuserdatauv(l, n * sizeof *items, 0);
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(l, idx, (lua_Integer)i + 1);
            to_hl(l, -1, depth + 1, &items[i]);
            lua_pop(l, 1);
        }
        *out = hl_list(n, items);
        lua_pop(l, 1);
        return;
    }
    const char **keys = lua_newuserdatauv(l, (count ? count : 1) * sizeof *keys, 0);
    hl_value *values = lua_newuserdatauv(l, (count ? count : 1) * sizeof *values, 0);
    size_t i = 0;
    lua_pushnil(l);
    while (lua_next(l, idx)) {
        if (i == count) plain_error(l, "table changed while it was being converted");
        if (lua_type(l, -2) != LUA_TSTRING) {
            if (lua_type(l, -2) == LUA_TNUMBER)
                plain_error(l, "table key %s is not a string (a table with keys 1..n is a list; others need string keys)",
                            lua_tostring(l, -2) ? lua_tostring(l, -2) : "?");
            plain_error(l, "table key of type %s is not a string", luaL_typename(l, -2));
        }
        size_t klen;
        const char *k = lua_tolstring(l, -2, &klen);
        if (!utf8_valid(k, klen) || strlen(k) != klen) plain_error(l, "table key is not valid UTF-8 text");
        hl_value key = hl_strn(k, klen);
        keys[i] = (const char *)key.u.p;
        to_hl(l, -1, depth + 1, &values[i]);
        lua_pop(l, 1);
        i++;
    }
    *out = hl_dict(i, keys, values);
    lua_pop(l, 2);
}

static void to_hl(lua_State *l, int idx, int depth, hl_value *out) {
    idx = lua_absindex(l, idx);
    switch (lua_type(l, idx)) {
    case LUA_TNONE:
    case LUA_TNIL: *out = hl_none(); return;
    case LUA_TBOOLEAN: *out = hl_bool(lua_toboolean(l, idx)); return;
    case LUA_TNUMBER:
        *out = lua_isinteger(l, idx) ? hl_int((int64_t)lua_tointeger(l, idx)) : hl_float((double)lua_tonumber(l, idx));
        return;
    case LUA_TSTRING: string_to_hl(l, idx, out); return;
    case LUA_TTABLE: table_to_hl(l, idx, depth, out); return;
    default: plain_error(l, "a %s cannot be passed to the host", luaL_typename(l, idx));
    }
}

/* ---- host values -> Lua ------------------------------------------------------------------ */

static void push_hl(lua_State *l, hl_value v, int depth) {
    switch (v.type) {
    case HL_TYPE_NONE: lua_pushnil(l); return;
    case HL_TYPE_BOOL: lua_pushboolean(l, v.u.b); return;
    case HL_TYPE_INT: lua_pushinteger(l, (lua_Integer)v.u.i); return;
    case HL_TYPE_FLOAT: lua_pushnumber(l, (lua_Number)v.u.f); return;
    case HL_TYPE_STR:
    case HL_TYPE_BYTES: lua_pushlstring(l, (const char *)v.u.p, v.len); return;
    case HL_TYPE_LIST:
    case HL_TYPE_DICT: break;
    default: plain_error(l, "unsupported host value type %s", hl_type_name(v.type));
    }
    if (depth >= HL_MAX_DEPTH) plain_error(l, "value nested deeper than %d levels", HL_MAX_DEPTH);
    luaL_checkstack(l, 4, "value nested too deeply");
    int is_list = v.type == HL_TYPE_LIST;
    lua_createtable(l, is_list ? (int)v.count : 0, is_list ? 0 : (int)v.count);
    hl_iter it;
    hl_value key, item;
    hl_iter_init(&it, v);
    for (lua_Integer i = 1; hl_iter_next(&it, &key, &item); i++) {
        if (is_list) {
            push_hl(l, item, depth + 1);
            lua_rawseti(l, -2, i);
        } else {
            if (key.type != HL_TYPE_STR) plain_error(l, "dict key is not a string");
            lua_pushlstring(l, (const char *)key.u.p, key.len);
            push_hl(l, item, depth + 1);
            lua_rawset(l, -3);
        }
    }
}

/* ---- jobs: everything that touches Lua runs inside one protected call ------------------- */

enum { JOB_EVAL, JOB_LOAD, JOB_CALL };

struct job {
    int kind;
    const char *src;
    size_t len;
    const char *name;
    hl_value args;
    hl_value result;
};

static void load_chunk(lua_State *l, const char *src, size_t len, const char *chunkname) {
    if (luaL_loadbufferx(l, src, len, chunkname, "t") != LUA_OK) {
        plain_message = lua_tostring(l, -1); /* a syntax error: the message says where */
        lua_error(l);
    }
}

static void resolve(lua_State *l, const char *name) {
    lua_pushglobaltable(l);
    const char *p = name;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t seg = dot ? (size_t)(dot - p) : strlen(p);
        if (seg == 0) plain_error(l, "invalid function name \"%s\"", name);
        lua_pushlstring(l, p, seg);
        lua_gettable(l, -2);
        lua_remove(l, -2);
        if (!dot) break;
        if (!lua_istable(l, -1)) plain_error(l, "no function named \"%s\" (\"%s\" is not a table)", name,
                                             lua_pushlstring(l, name, (size_t)(dot - name)));
        p = dot + 1;
    }
    if (lua_isnil(l, -1)) plain_error(l, "no function named \"%s\" is defined", name);
    if (!lua_isfunction(l, -1)) {
        if (luaL_getmetafield(l, -1, "__call") == LUA_TNIL)
            plain_error(l, "\"%s\" is not a function (it is a %s)", name, luaL_typename(l, -1));
        lua_pop(l, 1); /* the __call field: callable */
    }
}

static int protected_job(lua_State *l) {
    struct job *j = lua_touserdata(l, 1);
    lua_settop(l, 0);
    switch (j->kind) {
    case JOB_EVAL: {
        lua_pushliteral(l, "return ");
        lua_pushlstring(l, j->src, j->len);
        lua_concat(l, 2);
        size_t len;
        const char *expr = lua_tolstring(l, -1, &len);
        if (luaL_loadbufferx(l, expr, len, "=eval", "t") != LUA_OK) {
            lua_settop(l, 0);
            load_chunk(l, j->src, j->len, "=eval");
        } else {
            lua_remove(l, 1);
        }
        lua_call(l, 0, 1);
        to_hl(l, -1, 0, &j->result);
        return 0;
    }
    case JOB_LOAD:
        load_chunk(l, j->src, j->len, "=script");
        lua_call(l, 0, 0);
        j->result = hl_none();
        return 0;
    case JOB_CALL: {
        resolve(l, j->name);
        int n = j->args.type == HL_TYPE_LIST ? (int)j->args.count : 0;
        luaL_checkstack(l, n + 4, "too many arguments");
        hl_iter it;
        hl_value item;
        if (n) hl_iter_init(&it, j->args);
        for (int i = 0; i < n && hl_iter_next(&it, NULL, &item); i++) push_hl(l, item, 1);
        lua_call(l, n, 1);
        to_hl(l, -1, 0, &j->result);
        return 0;
    }
    }
    return 0;
}

static hl_value run_job(struct job *j) {
    lua_settop(L, 0);
    plain_message = NULL;
    lua_pushcfunction(L, msghandler);
    lua_pushcfunction(L, protected_job);
    lua_pushlightuserdata(L, j);
    int status = lua_pcall(L, 1, 0, 1);
    if (status == LUA_OK) {
        lua_settop(L, 0);
        return j->result;
    }
    size_t len = 0;
    const char *msg = lua_tolstring(L, -1, &len);
    hl_value err;
    if (!msg) {
        err = hl_error("(error object is not a string)");
    } else {
        char *clean = utf8_sanitize_dup(msg, len);
        err = hl_error("%s", clean ? clean : "not enough memory");
        free(clean);
    }
    lua_settop(L, 0);
    plain_message = NULL;
    return err;
}

static hl_value fn_eval(const hl_args *a) {
    struct job j = {.kind = JOB_EVAL};
    j.src = hl_arg_str(a, 0, &j.len);
    return run_job(&j);
}

static hl_value fn_load(const hl_args *a) {
    struct job j = {.kind = JOB_LOAD};
    j.src = hl_arg_str(a, 0, &j.len);
    /* What this load allocates goes to fresh, contiguous pages (its snapshot layer stays small). */
    pack_begin_load(PACK_LOAD_BUDGET);
    hl_value r = run_job(&j);
    pack_end_load();
    /* A snapshot is usually taken after load(): do not freeze a random sequence into it. */
    if (!rng_explicit) rng_seeded = 0;
    return r;
}

static hl_value fn_call(const hl_args *a) {
    struct job j = {.kind = JOB_CALL};
    j.name = hl_arg_str(a, 0, NULL);
    j.args = hl_arg(a, 1);
    if (j.args.type != HL_TYPE_LIST && j.args.type != HL_TYPE_NONE && j.args.type != HL_TYPE_MISSING)
        return hl_error("call(name, args): args must be a list, not %s", hl_type_name(j.args.type));
    if (hl_argc(a) > 2) return hl_error("call(name, args): pass the arguments as one list");
    return run_job(&j);
}

/* ---- host access and libraries --------------------------------------------------------- */

static int l_host_call(lua_State *l) {
    size_t nlen;
    const char *name = luaL_checklstring(l, 1, &nlen);
    int n = lua_gettop(l) - 1;
    if (n > 64) return luaL_error(l, "host.call: at most 64 arguments");
    hl_value values[64];
    for (int i = 0; i < n; i++) to_hl(l, i + 2, 1, &values[i]);
    hl_value name_copy = hl_strn(name, nlen);
    /* If the host function fails, the whole call ends here with HostFunctionError. */
    hl_value r = hl_call_host((const char *)name_copy.u.p, n, values);
    push_hl(l, r, 0);
    return 1;
}

static int l_random(lua_State *l) {
    if (!rng_seeded) {
        uint64_t seed[2] = {0, 0};
        if (getrandom(seed, sizeof seed, 0) != sizeof seed) seed[0] = 0x9e3779b97f4a7c15ull;
        lua_pushvalue(l, lua_upvalueindex(2));
        lua_pushinteger(l, (lua_Integer)seed[0]);
        lua_pushinteger(l, (lua_Integer)seed[1]);
        lua_call(l, 2, 0);
        rng_seeded = 1;
    }
    int n = lua_gettop(l);
    lua_pushvalue(l, lua_upvalueindex(1));
    lua_insert(l, 1);
    lua_call(l, n, LUA_MULTRET);
    return lua_gettop(l);
}

static int l_randomseed(lua_State *l) {
    int n = lua_gettop(l);
    lua_pushvalue(l, lua_upvalueindex(1));
    lua_insert(l, 1);
    lua_call(l, n, LUA_MULTRET);
    rng_seeded = 1;
    rng_explicit = n > 0;
    return lua_gettop(l);
}

static const char PRELUDE[] =
    "local rawload = load\n"
    "load = function(chunk, name, mode, ...)\n"
    "  if select('#', ...) > 0 then return rawload(chunk, name, 't', (...)) end\n"
    "  return rawload(chunk, name, 't')\n"
    "end\n"
    "dofile, loadfile = nil, nil\n"
    "os.execute, os.exit, os.getenv, os.remove, os.rename, os.tmpname, os.setlocale = nil, nil, nil, nil, nil, nil, nil\n";

static int open_libs(lua_State *l) {
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},          {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_STRLIBNAME, luaopen_string},   {LUA_MATHLIBNAME, luaopen_math},    {LUA_UTF8LIBNAME, luaopen_utf8},
        {LUA_OSLIBNAME, luaopen_os},        {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func; lib++) {
        luaL_requiref(l, lib->name, lib->func, 1);
        lua_pop(l, 1);
    }
    lua_newtable(l);
    lua_pushcfunction(l, l_host_call);
    lua_setfield(l, -2, "call");
    lua_setglobal(l, "host");

    lua_getglobal(l, "math");
    lua_getfield(l, -1, "random");
    lua_getfield(l, -2, "randomseed");
    lua_pushcclosure(l, l_random, 2);
    lua_setfield(l, -2, "random");
    lua_getfield(l, -1, "randomseed");
    lua_pushcclosure(l, l_randomseed, 1);
    lua_setfield(l, -2, "randomseed");
    lua_pop(l, 1);

    if (luaL_loadbufferx(l, PRELUDE, sizeof PRELUDE - 1, "=prelude", "t") != LUA_OK) return lua_error(l);
    lua_call(l, 0, 0);
    return 0;
}

int hl_main(void) {
    mem_limit = guest_heap_size() / 4 * 3;
    pack_init(guest_heap_size());
    L = lua_newstate(limited_alloc, NULL);
    if (!L) return 1;
    lua_atpanic(L, panic);
    lua_pushcfunction(L, open_libs);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        fprintf(stderr, "lua initialisation failed: %s\n", lua_tostring(L, -1));
        return 2;
    }
    rng_seeded = 0;
    lua_gc(L, LUA_GCCOLLECT);
    hl_export("eval", fn_eval);
    hl_export("load", fn_load);
    hl_export("call", fn_call);
    return 0;
}
