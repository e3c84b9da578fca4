/* hostcall: calls host functions and returns what they answered. */
#include <hlpool.h>
#include <stdio.h>

/* ask(name, args...) calls host function `name` with the remaining arguments. */
static hl_value ask(const hl_args *args) {
    int n = hl_argc(args);
    if (n < 1) return hl_error("ask(name, args...) needs a host function name");
    hl_value argv[16];
    if (n - 1 > 16) return hl_error("at most 16 arguments");
    for (int i = 1; i < n; i++) argv[i - 1] = hl_arg(args, i);
    return hl_call_host(hl_arg_str(args, 0, NULL), n - 1, argv);
}

/* greet(name): builds a greeting with the host's `prefix()` and prints it. */
static hl_value greet(const hl_args *args) {
    hl_value prefix = hl_call_host("prefix", 0, NULL);
    const char *p = hl_as_str(prefix, "prefix() result", NULL);
    char buf[256];
    snprintf(buf, sizeof buf, "%s, %s!", p, hl_arg_str(args, 0, NULL));
    printf("greeting %s\n", hl_arg_str(args, 0, NULL));
    return hl_str(buf);
}

/* total(n): adds up host `value(i)` for i in [0, n): n host calls in one call. */
static hl_value total(const hl_args *args) {
    int64_t n = hl_arg_int(args, 0), sum = 0;
    for (int64_t i = 0; i < n; i++) {
        hl_value v = hl_int(i);
        sum += hl_as_int(hl_call_host("value", 1, &v), "value() result");
    }
    return hl_int(sum);
}

int hl_main(void) {
    hl_export("ask", ask);
    hl_export("greet", greet);
    hl_export("total", total);
    return 0;
}
