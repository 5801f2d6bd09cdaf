/*
 * libFuzzer target: the HTTP edge as fleetml sees a request (src/api/edge.c):
 * the request line's target and the header fields libmicrohttpd hands over.
 *
 * Input: a request head, "METHOD TARGET VERSION" then header lines, split
 * on LF (a CR before it is dropped), "name: value" per line. The target
 * goes through fm_http_target_path, each path segment through
 * fm_http_param_decode, the fields through fm_http_head_add and then
 * fm_http_head_check.
 *
 * Invariants on top of ASan/UBSan:
 *  - an accepted path starts with '/', is a prefix of the target, holds only
 *    visible ASCII and no '?' or '#', and every '%' in it starts a
 *    well-formed escape;
 *  - a decoded parameter is non-empty, not "." or "..", and holds no '/',
 *    '\\', NUL or control byte;
 *  - an accepted head never has Content-Length and Transfer-Encoding
 *    together, has at most one coding and it is chunked, never two
 *    different lengths, one Host on HTTP/1.1, and field names that are
 *    tokens;
 *  - the verdict does not depend on the order of identical repeated
 *    fields' positions (checked by replaying the fields reversed).
 */
#include "fleetml/api.h"
#include "fuzz_common.h"

#include <ctype.h>

#define MAX_FIELDS 64

typedef struct field {
    const char *name, *value;
    size_t nlen, vlen;
} field;

static bool ishex(char c) { return isxdigit((unsigned char)c) != 0; }

static void check_target(const char *target)
{
    char path[256];
    int rc = fm_http_target_path(target, path, sizeof path);
    if (rc != 0) {
        FUZZ_CHECK(rc == FM_EINVAL || rc == FM_ERANGE);
        return;
    }
    size_t n = strlen(path);
    FUZZ_CHECK(n >= 1 && path[0] == '/' && strncmp(path, target, n) == 0);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)path[i];
        FUZZ_CHECK(c > 0x20 && c < 0x7f && c != '?' && c != '#');
        if (c == '%')
            FUZZ_CHECK(i + 2 < n && ishex(path[i + 1]) && ishex(path[i + 2]));
    }
    /* Every segment as a route parameter. */
    const char *seg = path + 1;
    while (*seg) {
        const char *end = strchr(seg, '/');
        size_t sl = end ? (size_t)(end - seg) : strlen(seg);
        char out[160];
        if (fm_http_param_decode(seg, sl, out, sizeof out) == 0) {
            size_t ol = strlen(out);
            FUZZ_CHECK(ol >= 1 && ol <= sl);
            FUZZ_CHECK(strcmp(out, ".") != 0 && strcmp(out, "..") != 0);
            for (size_t i = 0; i < ol; i++) {
                unsigned char c = (unsigned char)out[i];
                FUZZ_CHECK(c >= 0x20 && c != 0x7f && c != '/' && c != '\\');
            }
        }
        seg += sl + (end ? 1 : 0);
        if (!end)
            break;
    }
}

static const char *verdict(const field *f, size_t nf, bool http10, bool reverse,
                           fm_http_head *out)
{
    fm_http_head h = {.http10 = http10};
    for (size_t k = 0; k < nf; k++) {
        const field *x = &f[reverse ? nf - 1 - k : k];
        fm_http_head_add(&h, x->name, x->nlen, x->value, x->vlen);
    }
    *out = h;
    return fm_http_head_check(&h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_cstr(data, size);
    /* Request line. */
    char *nl = strchr(s, '\n');
    if (nl)
        *nl = '\0';
    char *sp1 = strchr(s, ' ');
    char *sp2 = sp1 ? strrchr(sp1 + 1, ' ') : NULL;
    if (sp1 && sp2) {
        *sp2 = '\0';
        check_target(sp1 + 1);
        *sp2 = ' ';
    } else if (sp1) {
        check_target(sp1 + 1);
    }
    bool http10 = sp2 && strncmp(sp2 + 1, "HTTP/1.0", 8) == 0;
    /* Header fields (as libmicrohttpd splits them: at the first colon). */
    field f[MAX_FIELDS];
    size_t nf = 0;
    char *line = nl ? nl + 1 : NULL;
    while (line && *line && nf < MAX_FIELDS) {
        char *e = memchr(line, '\n', size - (size_t)(line - s));
        size_t len = e ? (size_t)(e - line) : strlen(line);
        if (len && line[len - 1] == '\r')
            len--;
        char *colon = memchr(line, ':', len);
        if (colon) {
            const char *v = colon + 1;
            size_t vl = len - (size_t)(v - line);
            f[nf++] = (field){line, v, (size_t)(colon - line), vl};
        }
        line = e ? e + 1 : NULL;
    }
    fm_http_head h, h2;
    const char *why = verdict(f, nf, http10, false, &h);
    const char *why2 = verdict(f, nf, http10, true, &h2);
    if (!why) {
        FUZZ_CHECK(!(h.n_length && h.n_coding));
        FUZZ_CHECK(h.n_coding <= 1 && (!h.n_coding || (h.coding_chunked && !http10)));
        FUZZ_CHECK(!h.length_conflict && (!h.n_length || h.length_ok));
        FUZZ_CHECK(http10 || h.n_host == 1);
        FUZZ_CHECK(!h.bad_name && !h.bad_value);
    }
    /* Acceptance never depends on field order. */
    FUZZ_CHECK((why == NULL) == (why2 == NULL));
    free(s);
    return 0;
}
