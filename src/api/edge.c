/*
 * The HTTP edge's own checks (fleetml/api.h, "request edge"): what
 * libmicrohttpd 0.9.75 lets through and fleetml refuses before any route
 * sees the request. Pure functions over text, so the fuzzer drives them
 * exactly as the server does.
 */
#include "fleetml/api.h"

#include <string.h>
#include <strings.h>

/* RFC 9110 5.6.2: tchar. */
static bool tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return true;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* RFC 9110 5.5: field-value bytes are VCHAR, obs-text, SP and HTAB. */
static bool field_vchar(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

static bool ieq(const char *a, size_t alen, const char *b)
{
    return alen == strlen(b) && strncasecmp(a, b, alen) == 0;
}

/* Trims optional whitespace (SP, HTAB) on both sides. */
static void trim_ows(const char **v, size_t *len)
{
    while (*len && (**v == ' ' || **v == '\t'))
        (*v)++, (*len)--;
    while (*len && ((*v)[*len - 1] == ' ' || (*v)[*len - 1] == '\t'))
        (*len)--;
}

void fm_http_head_add(fm_http_head *h, const char *name, size_t nlen, const char *value,
                      size_t vlen)
{
    if (nlen == 0)
        h->bad_name = true;
    for (size_t i = 0; i < nlen; i++)
        if (!tchar((unsigned char)name[i]))
            h->bad_name = true;
    for (size_t i = 0; i < vlen; i++)
        if (!field_vchar((unsigned char)value[i]))
            h->bad_value = true;
    trim_ows(&value, &vlen);
    if (ieq(name, nlen, "Content-Length")) {
        if (h->n_length++ == 0) {
            h->length = 0;
            h->length_ok = vlen > 0 && vlen <= 18;
            for (size_t i = 0; i < vlen && h->length_ok; i++) {
                if (value[i] < '0' || value[i] > '9')
                    h->length_ok = false;
                else
                    h->length = h->length * 10 + (unsigned long long)(value[i] - '0');
            }
            h->length_text_len = vlen < sizeof h->length_text ? vlen : sizeof h->length_text - 1;
            memcpy(h->length_text, value, h->length_text_len);
        } else if (vlen != h->length_text_len || memcmp(value, h->length_text, vlen) != 0) {
            h->length_conflict = true;
        }
    } else if (ieq(name, nlen, "Transfer-Encoding")) {
        h->n_coding++;
        h->coding_chunked = ieq(value, vlen, "chunked");
    } else if (ieq(name, nlen, "Host")) {
        h->n_host++;
    }
}

const char *fm_http_head_check(const fm_http_head *h)
{
    if (h->bad_name)
        return "a header name is not a token (whitespace before the colon?)";
    if (h->bad_value)
        return "a header value holds a control character";
    if (h->n_coding && h->n_length)
        return "Content-Length and Transfer-Encoding together are not allowed";
    if (h->n_coding > 1)
        return "more than one Transfer-Encoding header";
    if (h->n_coding && !h->coding_chunked)
        return "the only transfer coding accepted is chunked";
    if (h->n_coding && h->http10)
        return "Transfer-Encoding is not allowed in an HTTP/1.0 request";
    if (h->n_length && !h->length_ok)
        return "Content-Length must be a decimal number of at most 18 digits";
    if (h->length_conflict)
        return "conflicting Content-Length headers";
    if (!h->http10 && h->n_host != 1)
        return "an HTTP/1.1 request needs exactly one Host header";
    return NULL;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int fm_http_target_path(const char *target, char *path, size_t len)
{
    if (!target || target[0] != '/')
        return FM_EINVAL;
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)target; *p && *p != '?'; p++, n++) {
        /* Visible ASCII only; '#' never belongs in a request target. */
        if (*p <= 0x20 || *p >= 0x7f || *p == '#')
            return FM_EINVAL;
        if (*p == '%' && (hexval(p[1]) < 0 || hexval(p[2]) < 0))
            return FM_EINVAL;
    }
    for (const unsigned char *p = (const unsigned char *)target + n; *p; p++)
        if (*p <= 0x20 || *p >= 0x7f || *p == '#')
            return FM_EINVAL;
    if (n >= len)
        return FM_ERANGE;
    memcpy(path, target, n);
    path[n] = '\0';
    return 0;
}

int fm_http_param_decode(const char *seg, size_t n, char *out, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)seg[i];
        if (c == '%') {
            if (i + 2 >= n)
                return FM_EINVAL;
            int hi = hexval((unsigned char)seg[i + 1]), lo = hexval((unsigned char)seg[i + 2]);
            if (hi < 0 || lo < 0)
                return FM_EINVAL;
            c = (unsigned char)(hi * 16 + lo);
            i += 2;
        }
        if (c < 0x20 || c == 0x7f || c == '/' || c == '\\')
            return FM_EINVAL;
        if (o + 1 >= len)
            return FM_ERANGE;
        out[o++] = (char)c;
    }
    if (o == 0 || (o == 1 && out[0] == '.') || (o == 2 && out[0] == '.' && out[1] == '.'))
        return FM_EINVAL;
    out[o] = '\0';
    return 0;
}
