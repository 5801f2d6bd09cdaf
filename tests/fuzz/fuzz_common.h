/*
 * Shared bits of the libFuzzer targets (tests/fuzz/fuzz_*.c).
 *
 * FUZZ_CHECK(cond) aborts with the location when an invariant the
 * interface documents does not hold, so that libFuzzer reports it as a
 * crash and saves the input, just like a sanitizer error.
 */
#ifndef FLEETML_FUZZ_COMMON_H
#define FLEETML_FUZZ_COMMON_H

#include "fleetml/core.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond)                                                                    \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

/* A NUL-terminated copy of the input (heap, exact size, so ASan sees any
 * read past the terminator). Caller frees with free(). */
static inline char *fuzz_cstr(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        abort();
    if (size)
        memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

/* A heap copy of exactly size bytes, not NUL-terminated: lets ASan catch a
 * parser that reads one byte past a length-delimited buffer. */
static inline char *fuzz_bytes(const uint8_t *data, size_t size)
{
    char *s = malloc(size ? size : 1);
    if (!s)
        abort();
    if (size)
        memcpy(s, data, size);
    return s;
}

/* True when s is a NUL-terminated string of printable ASCII within n bytes. */
static inline int fuzz_printable(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    if (len == n)
        return 0;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return 0;
    return 1;
}

#endif
