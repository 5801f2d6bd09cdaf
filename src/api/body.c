/*
 * Request bodies and query values: the only code that reads what an HTTP
 * client sent besides libmicrohttpd itself, so it is small, strict and
 * fuzzed (tests/fuzz/fuzz_http_body.c).
 */
#include "fleetml/api.h"
#include "fleetml/auth.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int fail(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *msg, size_t len, const char *fmt, ...)
{
    if (msg && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, len, fmt, ap);
        va_end(ap);
    }
    return FM_EINVAL;
}

int fm_api_parse_body(const char *body, size_t len, json_t **out, char *msg, size_t msg_len)
{
    *out = NULL;
    if (!body || len == 0)
        return fail(msg, msg_len, "a JSON object body is required");
    json_error_t e;
    json_t *doc = json_loadb(body, len, JSON_REJECT_DUPLICATES, &e);
    if (!doc)
        return fail(msg, msg_len, "body is not valid JSON (line %d, column %d): %s", e.line,
                    e.column, e.text);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return fail(msg, msg_len, "body must be a JSON object");
    }
    *out = doc;
    return 0;
}

int fm_api_get_str(const json_t *obj, const char *key, bool required, size_t max_len,
                   const char **out, char *msg, size_t msg_len)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return required ? fail(msg, msg_len, "field '%s' is required", key) : 0;
    if (!json_is_string(v))
        return fail(msg, msg_len, "field '%s' must be a string", key);
    size_t n = json_string_length(v);
    const char *s = json_string_value(v);
    if (n == 0)
        return fail(msg, msg_len, "field '%s' must not be empty", key);
    if (n > max_len)
        return fail(msg, msg_len, "field '%s' is longer than %zu bytes", key, max_len);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            return fail(msg, msg_len, "field '%s' contains a control character", key);
    }
    *out = s;
    return 0;
}

int fm_api_get_int(const json_t *obj, const char *key, bool required, long long min,
                   long long max, long long *out, char *msg, size_t msg_len)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return required ? fail(msg, msg_len, "field '%s' is required", key) : 0;
    if (!json_is_integer(v))
        return fail(msg, msg_len, "field '%s' must be an integer", key);
    json_int_t i = json_integer_value(v);
    if (i < min || i > max)
        return fail(msg, msg_len, "field '%s' must be between %lld and %lld", key, min, max);
    *out = (long long)i;
    return 0;
}

int fm_api_get_bool(const json_t *obj, const char *key, bool required, bool *out, char *msg,
                    size_t msg_len)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return required ? fail(msg, msg_len, "field '%s' is required", key) : 0;
    if (!json_is_boolean(v))
        return fail(msg, msg_len, "field '%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

int fm_api_get_roles(const json_t *obj, const char *key, unsigned *out, char *msg,
                     size_t msg_len)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > 8)
        return fail(msg, msg_len, "field '%s' must be an array of 1 to 8 role names", key);
    char list[160] = "";
    size_t used = 0, i;
    json_t *r;
    json_array_foreach(v, i, r) {
        const char *name = json_string_value(r);
        size_t n = name ? json_string_length(r) : 0;
        if (!name || n == 0 || n > 32 || strlen(name) != n || strchr(name, ','))
            return fail(msg, msg_len, "field '%s' must hold role names", key);
        if (used + n + 2 > sizeof list)
            return fail(msg, msg_len, "field '%s' is too long", key);
        if (used)
            list[used++] = ',';
        memcpy(list + used, name, n);
        used += n;
        list[used] = '\0';
    }
    unsigned mask = 0;
    if (fm_auth_roles_parse(list, &mask) != 0)
        return fail(msg, msg_len,
                    "field '%s' holds an unknown or repeated role (known: admin, clinician, "
                    "data_scientist, device_manager, operator)",
                    key);
    *out = mask;
    return 0;
}

int fm_api_check_label_outputs(const json_t *outputs, const char *const *names, size_t n,
                               char *msg, size_t msg_len)
{
    if (!json_is_object(outputs) || json_object_size(outputs) == 0)
        return fail(msg, msg_len, "field 'outputs' must be an object with at least one value");
    if (json_object_size(outputs) > n)
        return fail(msg, msg_len, "field 'outputs' has more values than the model has outputs");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)outputs, k, v) {
        size_t i = 0;
        while (i < n && strcmp(names[i], k) != 0)
            i++;
        if (i == n)
            return fail(msg, msg_len, "outputs: '%.64s' is not an output of the model", k);
        if (!json_is_number(v) || !isfinite(json_number_value(v)))
            return fail(msg, msg_len, "outputs: '%.64s' must be a finite number", k);
    }
    return 0;
}

/* ---- cursors ---------------------------------------------------------------
 * The plain text is "<a>.<b>.<s>" with a and b decimal (optionally
 * negative) and s of [A-Za-z0-9._@:-]; the cursor is its base64url. */

static bool cursor_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '@' || c == ':' || c == '-';
}

int fm_api_cursor_encode(int64_t a, int64_t b, const char *s, char *out, size_t len)
{
    char plain[192];
    int n = snprintf(plain, sizeof plain, "%lld.%lld.%s", (long long)a, (long long)b, s ? s : "");
    if (n < 0 || (size_t)n >= sizeof plain || len < 4 * ((size_t)n / 3 + 1) + 1)
        return FM_ERANGE;
    fm_b64url_encode((const unsigned char *)plain, (size_t)n, out);
    return 0;
}

static int parse_i64(const char *p, const char *end, int64_t *out)
{
    bool neg = p < end && *p == '-';
    if (neg)
        p++;
    if (p == end || end - p > 18)
        return FM_EINVAL;
    int64_t v = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return FM_EINVAL;
        v = v * 10 + (*p - '0');
    }
    *out = neg ? -v : v;
    return 0;
}

int fm_api_cursor_decode(const char *cursor, int64_t *a, int64_t *b, char *s, size_t s_len)
{
    size_t n = strnlen(cursor, 257);
    if (n == 0 || n > 256)
        return FM_EINVAL;
    unsigned char plain[193];
    long m = fm_b64url_decode(cursor, n, plain, sizeof plain - 1);
    if (m <= 0)
        return FM_EINVAL;
    plain[m] = '\0';
    const char *p = (const char *)plain, *end = p + m;
    const char *d1 = memchr(p, '.', (size_t)(end - p));
    const char *d2 = d1 ? memchr(d1 + 1, '.', (size_t)(end - d1 - 1)) : NULL;
    if (!d2 || parse_i64(p, d1, a) != 0 || parse_i64(d1 + 1, d2, b) != 0)
        return FM_EINVAL;
    size_t sl = (size_t)(end - d2 - 1);
    if (sl >= s_len)
        return FM_EINVAL;
    for (size_t i = 0; i < sl; i++)
        if (!cursor_char(d2[1 + i]))
            return FM_EINVAL;
    memcpy(s, d2 + 1, sl);
    s[sl] = '\0';
    return 0;
}
