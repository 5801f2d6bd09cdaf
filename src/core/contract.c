/*
 * The device contract's grammar (see include/fleetml/contract.h). Kept free
 * of the rest of fleetml so the broker plugin can compile it in.
 */
#include "fleetml/contract.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool lower_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

bool fm_device_id_valid(const char *s)
{
    if (!s)
        return false;
    size_t n = strnlen(s, FM_DEVICE_ID_MAX + 1);
    if (n < FM_DEVICE_ID_MIN || n > FM_DEVICE_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        /* The first character may not be '-', so an id is never mistaken
         * for a command-line option. */
        if (!lower_alnum(s[i]) && (i == 0 || s[i] != '-'))
            return false;
    }
    return strcmp(s, "provisioning") != 0 && strncmp(s, "fleetml-", 8) != 0;
}

bool fm_measurement_id_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == ':' || c == '-';
}

bool fm_measurement_id_valid(const char *s, size_t len)
{
    if (!s || len < 1 || len > FM_MEAS_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!fm_measurement_id_char((unsigned char)s[i]))
            return false;
    return true;
}

bool fm_topic_device(const char *topic, const char *leaf, char *out, size_t len)
{
    size_t rl = strlen(FM_TOPIC_ROOT), ll = strlen(leaf), tl = strlen(topic);
    if (tl < rl + 1 + ll + 1 || strncmp(topic, FM_TOPIC_ROOT, rl) != 0 ||
        strcmp(topic + tl - ll, leaf) != 0 || topic[tl - ll - 1] != '/')
        return false;
    size_t idl = tl - ll - 1 - rl;
    if (idl >= len)
        return false;
    memcpy(out, topic + rl, idl);
    out[idl] = '\0';
    return fm_device_id_valid(out);
}

bool fm_topic_build(char *buf, size_t len, const char *device, const char *leaf)
{
    int n = snprintf(buf, len, "%s%s/%s", FM_TOPIC_ROOT, device, leaf);
    return n > 0 && (size_t)n < len;
}

char *fm_reply_topic(const char *device_id, const char *rt, const char *default_leaf, char *buf,
                     size_t len)
{
    char prefix[FM_DEVICE_ID_MAX + sizeof FM_TOPIC_ROOT + 2];
    int n = snprintf(prefix, sizeof prefix, "%s%s/", FM_TOPIC_ROOT, device_id);
    if (rt && n > 0 && (size_t)n < sizeof prefix && strncmp(rt, prefix, (size_t)n) == 0 &&
        rt[n] != '\0' && !strpbrk(rt, "+#") && strlen(rt) < len) {
        snprintf(buf, len, "%s", rt);
        return buf;
    }
    if (!fm_topic_build(buf, len, device_id, default_leaf) && len)
        buf[0] = '\0';
    return buf;
}

size_t fm_error_doc(char *buf, size_t len, const char *mid, const char *code,
                    const char *message)
{
    json_t *doc = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", mid ? mid : "", "status", "error",
                            "error", "code", code, "message", message);
    if (!doc)
        return 0;
    size_t n = json_dumpb(doc, buf, len, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(doc);
    if (n == 0 || n >= len)
        return 0;
    buf[n] = '\0';
    return n;
}

/* The ok reply through jansson: any names and ids, any values (NULL for
 * one that is not finite, as json_real refuses it). */
static char *ok_doc_jansson(const char *mid, const char *model_ref, const char *const *names,
                            const float *values, size_t n, const char *received_at)
{
    json_t *outputs = json_object();
    if (!outputs)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        /* Three decimals keep results stable and compact. */
        double v = round((double)values[i] * 1000.0) / 1000.0;
        if (!names[i] || json_object_set_new(outputs, names[i], json_real(v)) != 0) {
            json_decref(outputs);
            return NULL;
        }
    }
    json_t *doc = json_pack("{s:s, s:s, s:s, s:o, s:s}", "id", mid, "status", "ok", "model",
                            model_ref, "outputs", outputs, "received_at", received_at);
    if (!doc)
        return NULL;
    char *s = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(doc);
    return s;
}

/* True when jansson writes s as it is between quotes: printable ASCII
 * without a quote or a backslash (ids, model references, output names and
 * times are all of that grammar; anything else takes the jansson path). */
static bool plain_string(const char *s, size_t *len)
{
    size_t i = 0;
    for (; s[i]; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return false;
    }
    *len = i;
    return true;
}

/* The value jansson writes for round(x * 1000) / 1000 at precision 10, from
 * the rounded thousandths k: "%.10g" of k / 1000 is k / 1000's decimal with
 * trailing zeros dropped (at most 9 significant digits while |k| < 1e9, so
 * nothing is rounded away), and ".0" is added when no fraction is left.
 * Returns the length written to p (at most 14 bytes), or 0 when k is
 * outside that range (the caller takes the jansson path). */
static size_t thousandths(char *p, double k)
{
    if (!(fabs(k) < 1e9))
        return 0; /* also NaN */
    char *o = p;
    if (signbit(k))
        *o++ = '-'; /* "-0.0" too, as "%g" writes a negative zero */
    long long a = llround(fabs(k));
    long long whole = a / 1000;
    int frac = (int)(a % 1000);
    char digits[16];
    int nd = 0;
    do {
        digits[nd++] = (char)('0' + whole % 10);
        whole /= 10;
    } while (whole);
    while (nd)
        *o++ = digits[--nd];
    *o++ = '.';
    if (frac == 0) {
        *o++ = '0';
    } else {
        char f[3] = {(char)('0' + frac / 100), (char)('0' + frac / 10 % 10),
                     (char)('0' + frac % 10)};
        int nf = f[2] != '0' ? 3 : f[1] != '0' ? 2 : 1;
        memcpy(o, f, (size_t)nf);
        o += nf;
    }
    return (size_t)(o - p);
}

char *fm_ok_doc(const char *mid, const char *model_ref, const char *const *names,
                const float *values, size_t n, const char *received_at)
{
    if (!mid || !model_ref || !received_at || (n && (!names || !values)))
        return NULL;
    /* Every measurement's reply is built here, on the commit thread: the
     * common case (plain strings, distinct names, values below a million)
     * is written directly, byte for byte what jansson writes (checked by
     * test_validate.c over random values); anything else goes to jansson. */
    enum { NAMES_MAX = 64, NUM_MAX = 16 };
    size_t lm, lr, lt, ln[NAMES_MAX], total = 0;
    bool fast = n <= NAMES_MAX && plain_string(mid, &lm) && plain_string(model_ref, &lr) &&
                plain_string(received_at, &lt);
    for (size_t i = 0; fast && i < n; i++) {
        fast = names[i] && plain_string(names[i], &ln[i]);
        for (size_t j = 0; fast && j < i; j++)
            fast = strcmp(names[i], names[j]) != 0;
        if (fast)
            total += ln[i] + 4 + NUM_MAX; /* "name":value, */
    }
    if (!fast)
        return ok_doc_jansson(mid, model_ref, names, values, n, received_at);
    static const char a[] = "{\"id\":\"", b[] = "\",\"status\":\"ok\",\"model\":\"",
                      c[] = "\",\"outputs\":{", d[] = "},\"received_at\":\"", e[] = "\"}";
    total += sizeof a + lm + sizeof b + lr + sizeof c + sizeof d + lt + sizeof e;
    char *out = malloc(total), *o = out;
    if (!out)
        return NULL;
#define PUT(s, l) (memcpy(o, (s), (l)), o += (l))
    PUT(a, sizeof a - 1);
    PUT(mid, lm);
    PUT(b, sizeof b - 1);
    PUT(model_ref, lr);
    PUT(c, sizeof c - 1);
    for (size_t i = 0; i < n; i++) {
        if (i)
            *o++ = ',';
        *o++ = '"';
        PUT(names[i], ln[i]);
        *o++ = '"';
        *o++ = ':';
        size_t w = thousandths(o, round((double)values[i] * 1000.0));
        if (w == 0) {
            free(out);
            return ok_doc_jansson(mid, model_ref, names, values, n, received_at);
        }
        o += w;
    }
    PUT(d, sizeof d - 1);
    PUT(received_at, lt);
    PUT(e, sizeof e); /* with the NUL */
#undef PUT
    return out;
}

bool fm_json_too_deep(const json_t *v, int max)
{
    if (!json_is_object(v) && !json_is_array(v))
        return false;
    if (max <= 0)
        return true;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (fm_json_too_deep(json_array_get(v, i), max - 1))
                return true;
        return false;
    }
    const char *k;
    json_t *c;
    json_object_foreach((json_t *)v, k, c) {
        if (fm_json_too_deep(c, max - 1))
            return true;
    }
    return false;
}
