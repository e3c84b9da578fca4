/* echo: returns its argument unchanged, whatever its type. */
#include <hlpool.h>

static hl_value echo(const hl_args *args) {
    if (hl_argc(args) != 1) return hl_error("echo takes exactly one argument, got %d", hl_argc(args));
    return hl_arg(args, 0);
}

/* Does nothing: the cheapest possible call, for latency measurements. */
static hl_value noop(const hl_args *args) {
    (void)args;
    return hl_none();
}

int hl_main(void) {
    hl_export("echo", echo);
    hl_export("noop", noop);
    return 0;
}
