/* add: integer and floating-point addition, with argument checking by the SDK. */
#include <hlpool.h>

static hl_value add(const hl_args *args) {
    if (hl_arg_type(args, 0) == HL_TYPE_FLOAT || hl_arg_type(args, 1) == HL_TYPE_FLOAT)
        return hl_float(hl_arg_float(args, 0) + hl_arg_float(args, 1));
    int64_t a = hl_arg_int(args, 0), b = hl_arg_int(args, 1), sum;
    if (__builtin_add_overflow(a, b, &sum)) return hl_error("integer overflow: %lld + %lld", (long long)a, (long long)b);
    return hl_int(sum);
}

/* Sum of a list of numbers. */
static hl_value sum(const hl_args *args) {
    hl_value list = hl_arg(args, 0);
    double total = 0;
    for (size_t i = 0; i < hl_len(list); i++) total += hl_as_float(hl_item(list, i), "list item");
    return hl_float(total);
}

int hl_main(void) {
    hl_export("add", add);
    hl_export("sum", sum);
    return 0;
}
