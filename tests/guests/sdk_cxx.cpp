/*
 * sdk_cxx.cpp - a freestanding C++ guest (tests/test_sdk.py): templates, classes
 * with virtual functions, new/delete, new[]/delete[], a global constructor, a
 * function-local static, lambdas, the SDK header from C++ and extern "C" hl_main.
 * No exceptions, RTTI or C++ standard library headers (not available with musl).
 */
#include <hlpool.h>
#include <stdio.h>
#include <string.h>

namespace {
template <typename T> T twice(T x) { return x + x; }

struct Shape {
    virtual ~Shape() {}
    virtual int64_t area() const = 0;
};
struct Rect : Shape {
    int64_t w, h;
    Rect(int64_t w_, int64_t h_) : w(w_), h(h_) {}
    int64_t area() const override { return w * h; }
};

struct Counter {
    int n;
    Counter() : n(41) {}
    int next() { return ++n; }
};
Counter global_counter;  // a global with a constructor: runs before hl_main

int64_t calls_seen() {
    static Counter local;  // a function-local static
    return local.next();
}

hl_value add(const hl_args *a) { return hl_int(twice(hl_arg_int(a, 0)) / 2 + hl_arg_int(a, 1)); }

hl_value area(const hl_args *a) {
    Shape *s = new Rect(hl_arg_int(a, 0), hl_arg_int(a, 1));
    int64_t v = s->area();
    delete s;
    int64_t *arr = new int64_t[4];
    arr[3] = v;
    v = arr[3];
    delete[] arr;
    return hl_int(v);
}

hl_value counters(const hl_args *) {
    hl_value items[2] = {hl_int(global_counter.next()), hl_int(calls_seen())};
    return hl_list(2, items);
}

hl_value sum(const hl_args *a) {
    hl_iter it;
    hl_value item;
    int64_t s = 0;
    auto add_one = [&s](int64_t x) { s += x; };
    hl_iter_init(&it, hl_arg(a, 0));
    while (hl_iter_next(&it, nullptr, &item)) add_one(hl_as_int(item, "item"));
    return hl_int(s);
}

hl_value greet(const hl_args *a) {
    char buf[64];
    snprintf(buf, sizeof buf, "hello, %s", hl_arg_str(a, 0, nullptr));
    const char *keys[] = {"greeting"};
    hl_value values[] = {hl_str(buf)};
    return hl_dict(1, keys, values);
}
}  // namespace

extern "C" int hl_main(void) {
    hl_export("add", add);
    hl_export("area", area);
    hl_export("counters", counters);
    hl_export("sum", sum);
    hl_export("greet", greet);
    return 0;
}
