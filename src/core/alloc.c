#include "fleetml/core.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Countdown to an injected allocation failure; negative = disabled. Tests
 * use it to walk every failure path of a function (curl's "torture" idea). */
static _Atomic long fail_after = -1;

void fm_alloc_fail_after(long n) { atomic_store(&fail_after, n); }

static int should_fail(void)
{
    long cur = atomic_load_explicit(&fail_after, memory_order_relaxed);
    if (cur < 0)
        return 0;
    if (cur == 0) {
        atomic_store(&fail_after, -1);
        return 1;
    }
    atomic_fetch_sub(&fail_after, 1);
    return 0;
}

void *fm_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    return malloc(n ? n : 1);
}

void *fm_calloc(size_t nmemb, size_t size)
{
    if (should_fail())
        return NULL;
    return calloc(nmemb ? nmemb : 1, size ? size : 1);
}

void *fm_realloc(void *p, size_t n)
{
    if (should_fail())
        return NULL;
    return realloc(p, n ? n : 1);
}

void fm_free(void *p) { free(p); }

char *fm_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = fm_malloc(len + 1);
    if (!d)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *fm_strdup(const char *s) { return fm_strndup(s, strlen(s)); }
