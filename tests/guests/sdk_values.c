/*
 * sdk_values.c - reading and building lists and dicts through the public SDK
 * (tests/test_sdk.py). Functions that measure return the guest-side time in
 * nanoseconds (CLOCK_MONOTONIC) next to their result, so the host's encoding,
 * decoding and VM exit are not part of the measurement.
 */
#include <hlpool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static hl_value pair(int64_t a, int64_t b) {
    hl_value items[2] = {hl_int(a), hl_int(b)};
    return hl_list(2, items);
}

/* iter_sum(list) -> [sum of the int items, ns] (hl_iter) */
static hl_value iter_sum(const hl_args *a) {
    hl_value list = hl_arg(a, 0);
    int64_t t0 = now_ns(), sum = 0;
    hl_iter it;
    hl_value key, item;
    hl_iter_init(&it, list);
    while (hl_iter_next(&it, &key, &item)) {
        if (key.type != HL_TYPE_MISSING) return hl_error("a list item came with a key");
        sum += hl_as_int(item, "list item");
    }
    return pair(sum, now_ns() - t0);
}

/* item_sum(list) -> [sum, ns] (hl_item in order) */
static hl_value item_sum(const hl_args *a) {
    hl_value list = hl_arg(a, 0);
    int64_t t0 = now_ns(), sum = 0;
    size_t n = hl_len(list);
    for (size_t i = 0; i < n; i++) sum += hl_as_int(hl_item(list, i), "list item");
    return pair(sum, now_ns() - t0);
}

/* item_sum_backwards(list) -> sum (hl_item from the last item to the first) */
static hl_value item_sum_backwards(const hl_args *a) {
    hl_value list = hl_arg(a, 0);
    int64_t sum = 0;
    for (size_t i = hl_len(list); i-- > 0;) sum += hl_as_int(hl_item(list, i), "list item");
    return hl_int(sum);
}

/* dict_sum(dict) -> [pairs, sum of the values, total key length, ns] */
static hl_value dict_sum(const hl_args *a) {
    hl_value dict = hl_arg(a, 0);
    int64_t t0 = now_ns(), n = 0, sum = 0, keys = 0;
    hl_iter it;
    hl_value key, item;
    hl_iter_init(&it, dict);
    while (hl_iter_next(&it, &key, &item)) {
        if (key.type != HL_TYPE_STR) return hl_error("a dict key is not a str");
        keys += (int64_t)hl_len(key);
        sum += hl_as_int(item, "dict value");
        n++;
    }
    int64_t dt = now_ns() - t0;
    hl_value out[4] = {hl_int(n), hl_int(sum), hl_int(keys), hl_int(dt)};
    return hl_list(4, out);
}

/* pairs(dict) -> [[key, value], ...] through hl_iter (NULL key/item pointers too) */
static hl_value pairs(const hl_args *a) {
    hl_value dict = hl_arg(a, 0);
    size_t n = hl_len(dict), i = 0;
    hl_value out[64];
    if (n > 64) return hl_error("at most 64 pairs");
    hl_iter it, keys_only, items_only;
    hl_value key, item;
    hl_iter_init(&it, dict);
    hl_iter_init(&keys_only, dict);
    hl_iter_init(&items_only, dict);
    while (hl_iter_next(&it, &key, &item)) {
        hl_value k2, v2;
        if (!hl_iter_next(&keys_only, &k2, NULL) || !hl_iter_next(&items_only, NULL, &v2))
            return hl_error("the iterators disagree on the length");
        if (k2.len != key.len || memcmp(k2.u.p, key.u.p, key.len) != 0) return hl_error("keys disagree");
        if (v2.type != item.type) return hl_error("values disagree");
        /* random access agrees with the iterator */
        hl_value k3 = hl_key(dict, i), v3 = hl_item(dict, i);
        if (k3.len != key.len || memcmp(k3.u.p, key.u.p, key.len) != 0 || v3.type != item.type)
            return hl_error("hl_key/hl_item disagree with hl_iter at %zu", i);
        hl_value kv[2] = {key, item};
        out[i++] = hl_list(2, kv);
    }
    if (hl_iter_next(&keys_only, NULL, NULL) || hl_iter_next(&it, NULL, NULL)) return hl_error("iterator went past the end");
    return hl_list(i, out);
}

/* built() -> what hl_iter, hl_item, hl_key and hl_get read from values built in this call */
static hl_value built(const hl_args *a) {
    (void)a;
    hl_value nums[3] = {hl_int(1), hl_int(2), hl_int(3)};
    hl_value list = hl_list(3, nums);
    const char *keys[2] = {"a", "b"};
    hl_value values[2] = {hl_str("x"), list};
    hl_value dict = hl_dict(2, keys, values);
    int64_t sum = 0;
    hl_iter it;
    hl_value key, item;
    hl_iter_init(&it, list);
    while (hl_iter_next(&it, NULL, &item)) sum += hl_as_int(item, "item");
    char joined[64] = "";
    hl_iter_init(&it, dict);
    while (hl_iter_next(&it, &key, &item)) {
        strcat(joined, hl_as_str(key, "key", NULL));
        strcat(joined, item.type == HL_TYPE_STR ? hl_as_str(item, "value", NULL) : "[list]");
    }
    hl_value out[5] = {hl_int(sum), hl_str(joined), hl_key(dict, 1), hl_item(hl_get(dict, "b"), 2),
                       hl_bool(hl_get(dict, "zz").type == HL_TYPE_MISSING)};
    return hl_list(5, out);
}

/* iter_wrong(value): hl_iter_init on a value that is not a list or dict */
static hl_value iter_wrong(const hl_args *a) {
    hl_iter it;
    hl_iter_init(&it, hl_arg(a, 0));
    return hl_none();
}

/* from_host(n) -> sum of the items of the list the host function "numbers"(n) returns */
static hl_value from_host(const hl_args *a) {
    hl_value n = hl_int(hl_arg_int(a, 0));
    hl_value list = hl_call_host("numbers", 1, &n);
    int64_t sum = 0;
    hl_iter it;
    hl_value item;
    hl_iter_init(&it, list);
    while (hl_iter_next(&it, NULL, &item)) sum += hl_as_int(item, "item");
    return hl_int(sum);
}

/* ---- construction ------------------------------------------------------------------------ */

static hl_value deep_value(int64_t depth) {
    hl_value v = hl_int(depth);
    for (int64_t i = 0; i < depth; i++) {
        hl_value items[2] = {v, hl_int(i)};
        v = hl_list(2, items);
    }
    return v;
}

/* A list of n records {"id": i, "name": "item-<i>", "tags": [i, i+1, "t"], "sub": {"x": [1.5]}}. */
static hl_value wide_value(int64_t n) {
    if (n < 0 || n > 1000000) return hl_error("n out of range");
    hl_value *rows = malloc((size_t)(n ? n : 1) * sizeof *rows); /* hl_list copies it */
    if (!rows) return hl_error("out of memory");
    for (int64_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "item-%lld", (long long)i);
        hl_value tags[3] = {hl_int(i), hl_int(i + 1), hl_str("t")};
        hl_value x = hl_float(1.5);
        const char *sub_keys[1] = {"x"};
        hl_value sub_values[1] = {hl_list(1, &x)};
        const char *keys[4] = {"id", "name", "tags", "sub"};
        hl_value values[4] = {hl_int(i), hl_str(name), hl_list(3, tags), hl_dict(1, sub_keys, sub_values)};
        rows[i] = hl_dict(4, keys, values);
    }
    hl_value list = hl_list((size_t)n, rows);
    free(rows);
    return list;
}

/* deep(depth) -> [[...[depth, 0]..., depth-2], depth-1]: `depth` nested lists */
static hl_value deep(const hl_args *a) { return deep_value(hl_arg_int(a, 0)); }

/* wide(n) -> the list of n records */
static hl_value wide(const hl_args *a) { return wide_value(hl_arg_int(a, 0)); }

/* build_time(kind, n, repeat, pretouch) -> the fastest of `repeat` constructions, in ns ("deep" or
 * "wide"). With pretouch > 0, first writes and frees that many bytes of heap, so that the construction
 * finds its memory already written in this call (the first write to a page is what costs most). */
static hl_value build_time(const hl_args *a) {
    const char *kind = hl_arg_str(a, 0, NULL);
    int64_t n = hl_arg_int(a, 1), repeat = hl_arg_int(a, 2), best = INT64_MAX;
    int64_t pretouch = hl_argc(a) > 3 ? hl_arg_int(a, 3) : 0;
    if (pretouch > 0) {
        char *p = malloc((size_t)pretouch);
        if (!p) return hl_error("cannot pre-touch %lld bytes", (long long)pretouch);
        memset(p, 1, (size_t)pretouch);
        free(p);
    }
    for (int64_t r = 0; r < repeat; r++) {
        int64_t t0 = now_ns();
        hl_value v = strcmp(kind, "deep") == 0 ? deep_value(n) : wide_value(n);
        int64_t dt = now_ns() - t0;
        if (v.type == HL_TYPE_ERROR) return v;
        if (dt < best) best = dt;
    }
    return hl_int(best);
}

int hl_main(void) {
    hl_export("iter_sum", iter_sum);
    hl_export("item_sum", item_sum);
    hl_export("item_sum_backwards", item_sum_backwards);
    hl_export("dict_sum", dict_sum);
    hl_export("pairs", pairs);
    hl_export("built", built);
    hl_export("iter_wrong", iter_wrong);
    hl_export("from_host", from_host);
    hl_export("deep", deep);
    hl_export("wide", wide);
    hl_export("build_time", build_time);
    return 0;
}
