#include "fleetml/core.h"

#include <stdio.h>
#include <string.h>

void fm_strbuf_printf(fm_strbuf *b, const char *fmt, ...)
{
    if (b->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 1024;
        while (cap <= b->len + (size_t)n)
            cap *= 2;
        char *np = fm_realloc(b->p, cap);
        if (!np) {
            b->failed = 1;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
}

void fm_strbuf_add(fm_strbuf *b, const void *p, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *np = fm_realloc(b->p, cap);
        if (!np) {
            b->failed = 1;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

int fm_strbuf_take(fm_strbuf *b, char **out, size_t *len)
{
    int failed = b->failed;
    if (!failed && !b->p) {
        /* Nothing appended yet: hand out an empty string. */
        b->p = fm_malloc(1);
        if (b->p)
            b->p[0] = '\0';
        failed = b->p == NULL;
    }
    if (failed) {
        fm_free(b->p);
        *b = (fm_strbuf){0};
        return FM_ENOMEM;
    }
    *out = b->p;
    if (len)
        *len = b->len;
    *b = (fm_strbuf){0};
    return 0;
}
