/* argv_secrets: keep secrets off a program's command line (/proc/<pid>/cmdline, `ps`).
 *
 * Loaded with LD_PRELOAD into a program that only takes a secret as a flag (tritonserver's
 * --grpc-restricted-protocol / --http-restricted-api keys). The program is started with placeholders
 * "@@SEGLLM_SECRET:NAME@@" in its arguments and the secrets in its environment (which only its own user
 * can read: /proc/<pid>/environ is mode 0400). Before main() runs, every placeholder is replaced by
 * $NAME in a heap copy of argv that main() receives; the original argv (what /proc/<pid>/cmdline shows)
 * keeps the placeholders. Then the secret variables and this library are removed from the environment, so
 * the program's children (Triton's python-backend stubs) inherit neither.
 *
 * A placeholder without its variable stops the program (exit 97) with a message: it never runs with a
 * literal placeholder as a key. Built by segllm_edge/serving/argv_secrets.py (cc -shared -fPIC).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*main_fn)(int, char **, char **);
typedef int (*start_fn)(main_fn, int, char **, void (*)(void), void (*)(void), void (*)(void), void *);

#define OPEN "@@SEGLLM_SECRET:"
#define CLOSE "@@"
#define MAX_NAMES 64

static char *names[MAX_NAMES];
static int n_names;

static void die(const char *what, const char *detail) {
    fprintf(stderr, "segllm-edge argv_secrets: %s%s\n", what, detail);
    _exit(97);
}

static void *grow(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("out of memory", "");
    return p;
}

static void remember(const char *name) {
    int i;
    for (i = 0; i < n_names; i++)
        if (!strcmp(names[i], name)) return;
    if (n_names == MAX_NAMES) die("too many secrets", "");
    names[n_names++] = strdup(name);
}

/* a heap copy of arg with every placeholder replaced by its variable's value */
static char *expand(const char *arg) {
    size_t cap = strlen(arg) + 1, len = 0;
    char *out = grow(NULL, cap);
    const char *p = arg;
    for (;;) {
        const char *open = strstr(p, OPEN), *name, *close, *value;
        char key[128];
        size_t n, k;
        if (!open) open = p + strlen(p);
        n = (size_t)(open - p);
        out = grow(out, cap = len + n + 1);
        memcpy(out + len, p, n);
        len += n;
        if (!*open) break;
        name = open + strlen(OPEN);
        close = strstr(name, CLOSE);
        if (!close) die("unterminated placeholder in an argument", "");
        k = (size_t)(close - name);
        if (k == 0 || k >= sizeof key) die("bad placeholder name in an argument", "");
        memcpy(key, name, k);
        key[k] = 0;
        value = getenv(key);
        if (!value || !*value) die("no value in the environment for ", key);
        remember(key);
        n = strlen(value);
        out = grow(out, cap = len + n + 1);
        memcpy(out + len, value, n);
        len += n;
        p = close + strlen(CLOSE);
    }
    out[len] = 0;
    return out;
}

/* LD_PRELOAD without this library (its first entry) */
static void drop_self_from_preload(void) {
    const char *pre = getenv("LD_PRELOAD");
    const char *rest;
    if (!pre) return;
    rest = pre + strcspn(pre, ": ");
    rest += strspn(rest, ": ");
    if (*rest) {
        char *copy = strdup(rest);
        if (!copy) die("out of memory", "");
        setenv("LD_PRELOAD", copy, 1);
        free(copy);
    } else {
        unsetenv("LD_PRELOAD");
    }
}

int __libc_start_main(main_fn main, int argc, char **argv, void (*init)(void), void (*fini)(void),
                      void (*rtld_fini)(void), void *stack_end) {
    start_fn real = (start_fn)dlsym(RTLD_NEXT, "__libc_start_main");
    char **args = calloc((size_t)argc + 1, sizeof(char *));
    int i;
    if (!real || !args) die("cannot start the program", "");
    for (i = 0; i < argc; i++) args[i] = strstr(argv[i], OPEN) ? expand(argv[i]) : argv[i];
    for (i = 0; i < n_names; i++) unsetenv(names[i]);
    drop_self_from_preload();
    return real(main, argc, args, init, fini, rtld_fini, stack_end);
}
