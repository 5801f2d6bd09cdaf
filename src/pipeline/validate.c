/*
 * Device contract v1: parsing and validation of `viscosity.sweep.v1`
 * measurements. See include/fleetml/measurement.h for the interface and
 * docs/protocol.md for the contract devices are held to.
 *
 * Everything here treats the payload as hostile. The order of checks is
 * deliberate: size before parsing (so a huge payload costs nothing), syntax
 * before structure, and `kind` before unknown fields, so that a device
 * speaking a future contract version hears "unknown_kind" rather than a
 * confusing complaint about a field that version introduced.
 */
#include "fleetml/contract.h"
#include "fleetml/measurement.h"
#include "fleetml/jsonmem.h"
#include "pipeline/validate_int.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Longest piece of device-supplied text quoted back in a message. Quoting
 * helps the device's developer, but the whole message must fit in
 * fm_verr.message together with the path. */
#define QUOTE_MAX 40

/* ---- errors ---------------------------------------------------------------- */

/* Replaces every byte outside printable ASCII with '?'. Messages quote
 * device input (keys, values, jansson's "near '...'" excerpts) and may be
 * truncated mid-character by vsnprintf; after this pass they are always safe
 * to put into a JSON string or a log line. */
static void sanitize_ascii(char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c > 0x7e)
            *s = '?';
    }
}

int fm_verrf(fm_verr *e, const char *code, const char *fmt, ...)
{
    if (e) {
        snprintf(e->code, sizeof e->code, "%s", code);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof e->message, fmt, ap);
        va_end(ap);
        sanitize_ascii(e->message);
    }
    return FM_EINVAL;
}

/* Allocation failure is not the device's fault, so it gets the "internal"
 * code and FM_ENOMEM; the pipeline answers such measurements with a
 * retryable error instead of a permanent rejection. */
static int verr_nomem(fm_verr *e)
{
    fm_verrf(e, FM_VERR_INTERNAL, "payload: out of memory while validating");
    return FM_ENOMEM;
}

/* Names a JSON type the way the contract documentation does. Integers and
 * reals are both "number" because the contract does not distinguish them. */
static const char *jtype(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER:
    case JSON_REAL: return "number";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    case JSON_NULL: return "null";
    }
    return "unknown";
}

/* ---- identifiers ------------------------------------------------------------ */

/* ---- field helpers ---------------------------------------------------------- */

/* Checks that every key of obj is in allowed. The contract is strict: an
 * unknown key is more likely a typo (a misspelt optional field would
 * otherwise be silently dropped) than a deliberate extension. */
static int check_unknown_fields(json_t *obj, const char *const *allowed, const char *prefix,
                                fm_verr *e)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        bool known = false;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(key, *a) == 0) {
                known = true;
                break;
            }
        if (!known)
            return fm_verrf(e, FM_VERR_UNKNOWN_FIELD,
                            "%s%s%.*s: unknown field (contract %s accepts no extra fields)",
                            prefix, *prefix ? "." : "", QUOTE_MAX, key, FM_MEAS_KIND_V1);
    }
    return 0;
}

/* Fetches a required string field. */
static int get_string(json_t *obj, const char *name, const char **s, size_t *len, fm_verr *e)
{
    json_t *v = json_object_get(obj, name);
    if (!v)
        return fm_verrf(e, FM_VERR_MISSING_FIELD, "%s: missing required field", name);
    if (!json_is_string(v))
        return fm_verrf(e, FM_VERR_INVALID_TYPE, "%s: expected a string, got %s", name, jtype(v));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return 0;
}

/* Reads a finite number within [lo, hi] from v; path names it in messages.
 * JSON has no NaN or Infinity literals and jansson refuses overflowing
 * literals, so the isfinite() test is a second line of defence only. */
static int get_number_in(json_t *v, const char *path, double lo, double hi, double *out,
                         fm_verr *e)
{
    if (!json_is_number(v))
        return fm_verrf(e, FM_VERR_INVALID_TYPE, "%s: expected a finite number, got %s", path,
                        jtype(v));
    double d = json_number_value(v);
    if (!isfinite(d))
        return fm_verrf(e, FM_VERR_INVALID_VALUE, "%s: number is not finite", path);
    if (d < lo || d > hi)
        return fm_verrf(e, FM_VERR_OUT_OF_RANGE, "%s: %g is outside %g..%g", path, d, lo, hi);
    *out = d;
    return 0;
}

/* ---- top-level fields --------------------------------------------------------- */

static int check_id(json_t *root, fm_measurement *m, fm_verr *e)
{
    const char *s;
    size_t len;
    int rc = get_string(root, "id", &s, &len, e);
    if (rc)
        return rc;
    if (len < 1 || len > FM_MEAS_ID_MAX)
        return fm_verrf(e, FM_VERR_INVALID_VALUE, "id: length %zu is outside 1..%d", len,
                        FM_MEAS_ID_MAX);
    for (size_t i = 0; i < len; i++)
        if (!fm_measurement_id_char((unsigned char)s[i]))
            return fm_verrf(e, FM_VERR_INVALID_VALUE,
                            "id: character at offset %zu is not allowed (use [A-Za-z0-9._:-])",
                            i);
    memcpy(m->id, s, len);
    m->id[len] = '\0';
    return 0;
}

static int check_kind(json_t *root, fm_measurement *m, fm_verr *e)
{
    const char *s;
    size_t len;
    int rc = get_string(root, "kind", &s, &len, e);
    if (rc)
        return rc;
    if (strcmp(s, FM_MEAS_KIND_V1) != 0)
        return fm_verrf(e, FM_VERR_UNKNOWN_KIND, "kind: \"%.*s\" is not supported (expected \"%s\")",
                        QUOTE_MAX, s, FM_MEAS_KIND_V1);
    snprintf(m->kind, sizeof m->kind, "%s", FM_MEAS_KIND_V1);
    return 0;
}

static int check_taken_at(json_t *root, int64_t now_ms, fm_measurement *m, fm_verr *e)
{
    const char *s;
    size_t len;
    int rc = get_string(root, "taken_at", &s, &len, e);
    if (rc)
        return rc;
    int64_t ms;
    if (fm_rfc3339_parse(s, &ms) != 0)
        return fm_verrf(e, FM_VERR_INVALID_VALUE,
                        "taken_at: \"%.*s\" is not an RFC 3339 date-time "
                        "(e.g. 2026-11-26T07:00:00.123Z)",
                        QUOTE_MAX, s);
    /* Only the future is bounded: devices legitimately upload old
     * measurements after being offline, but one dated a day ahead comes
     * from a broken clock and would corrupt time-ordered queries. */
    if (ms > now_ms && ms - now_ms > FM_MEAS_FUTURE_MAX_MS)
        return fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                        "taken_at: %.*s is more than 24 h ahead of the server clock", QUOTE_MAX,
                        s);
    m->taken_at_ms = ms;
    return 0;
}

static int check_temperature(json_t *root, fm_measurement *m, fm_verr *e)
{
    json_t *v = json_object_get(root, "temperature_c");
    if (!v)
        return fm_verrf(e, FM_VERR_MISSING_FIELD, "temperature_c: missing required field");
    return get_number_in(v, "temperature_c", FM_MEAS_TEMP_MIN_C, FM_MEAS_TEMP_MAX_C,
                         &m->temperature_c, e);
}

static int check_firmware(json_t *root, fm_measurement *m, fm_verr *e)
{
    const char *s;
    size_t len;
    int rc = get_string(root, "firmware", &s, &len, e);
    if (rc)
        return rc;
    if (len < 1 || len > FM_MEAS_FIRMWARE_MAX)
        return fm_verrf(e, FM_VERR_INVALID_VALUE, "firmware: length %zu is outside 1..%d", len,
                        FM_MEAS_FIRMWARE_MAX);
    /* Printable ASCII only: the firmware string ends up in logs, metrics
     * labels and the dashboard, none of which should see control bytes. */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e)
            return fm_verrf(e, FM_VERR_INVALID_VALUE,
                            "firmware: byte at offset %zu is not printable ASCII", i);
    }
    memcpy(m->firmware, s, len);
    m->firmware[len] = '\0';
    return 0;
}

static int check_meta(json_t *root, fm_verr *e)
{
    json_t *v = json_object_get(root, "meta");
    if (!v)
        return 0;
    if (!json_is_object(v))
        return fm_verrf(e, FM_VERR_INVALID_TYPE, "meta: expected an object, got %s", jtype(v));
    if (fm_json_too_deep(v, FM_JSON_DEPTH_MAX))
        return fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                        "meta: nested more than %d levels deep (objects and arrays)",
                        FM_JSON_DEPTH_MAX);
    /* Measuring with a NULL buffer makes jansson count the bytes without
     * building the string, so an oversized meta costs no allocation. */
    size_t n = json_dumpb(v, NULL, 0, JSON_COMPACT);
    if (n == 0)
        return verr_nomem(e);
    if (n > FM_MEAS_META_MAX)
        return fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                        "meta: compact serialisation is %zu bytes, more than the limit of %d", n,
                        FM_MEAS_META_MAX);
    return 0;
}

/* Validates the sweep array and counts the samples. Values are copied in a
 * second pass once the total is known, so exactly one buffer is allocated
 * and only for payloads that are already known to be valid. */
static int check_sweep(json_t *root, fm_measurement *m, size_t *total, fm_verr *e)
{
    static const char *const step_fields[] = {"shear_rate_s", "samples", NULL};
    char path[64];
    json_t *sw = json_object_get(root, "sweep");
    if (!sw)
        return fm_verrf(e, FM_VERR_MISSING_FIELD, "sweep: missing required field");
    if (!json_is_array(sw))
        return fm_verrf(e, FM_VERR_INVALID_TYPE, "sweep: expected array of steps, got %s",
                        jtype(sw));
    size_t n_steps = json_array_size(sw);
    if (n_steps < FM_MEAS_MIN_STEPS || n_steps > FM_MEAS_MAX_STEPS)
        return fm_verrf(e, FM_VERR_OUT_OF_RANGE, "sweep: expected %d..%d steps, got %zu",
                        FM_MEAS_MIN_STEPS, FM_MEAS_MAX_STEPS, n_steps);

    size_t sum = 0;
    double prev_rate = 0.0;
    for (size_t i = 0; i < n_steps; i++) {
        json_t *st = json_array_get(sw, i);
        if (!json_is_object(st))
            return fm_verrf(e, FM_VERR_INVALID_TYPE, "sweep[%zu]: expected an object, got %s", i,
                            jtype(st));
        snprintf(path, sizeof path, "sweep[%zu]", i);
        int rc = check_unknown_fields(st, step_fields, path, e);
        if (rc)
            return rc;

        json_t *rate = json_object_get(st, "shear_rate_s");
        if (!rate)
            return fm_verrf(e, FM_VERR_MISSING_FIELD,
                            "sweep[%zu].shear_rate_s: missing required field", i);
        snprintf(path, sizeof path, "sweep[%zu].shear_rate_s", i);
        double r;
        rc = get_number_in(rate, path, FM_MEAS_SHEAR_MIN, FM_MEAS_SHEAR_MAX, &r, e);
        if (rc)
            return rc;
        /* The models interpolate along the shear axis; a repeated or
         * descending rate means the device's step table is corrupt. */
        if (i > 0 && !(r > prev_rate))
            return fm_verrf(e, FM_VERR_INVALID_VALUE,
                            "sweep[%zu].shear_rate_s: %g is not greater than %g in sweep[%zu] "
                            "(shear rates must strictly increase)",
                            i, r, prev_rate, i - 1);
        prev_rate = r;
        m->steps[i].shear_rate_s = r;

        json_t *smp = json_object_get(st, "samples");
        if (!smp)
            return fm_verrf(e, FM_VERR_MISSING_FIELD, "sweep[%zu].samples: missing required field",
                            i);
        if (!json_is_array(smp))
            return fm_verrf(e, FM_VERR_INVALID_TYPE,
                            "sweep[%zu].samples: expected array of numbers, got %s", i,
                            jtype(smp));
        size_t ns = json_array_size(smp);
        if (ns < FM_MEAS_MIN_SAMPLES || ns > FM_MEAS_MAX_SAMPLES)
            return fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                            "sweep[%zu].samples: expected %d..%d samples, got %zu", i,
                            FM_MEAS_MIN_SAMPLES, FM_MEAS_MAX_SAMPLES, ns);
        for (size_t k = 0; k < ns; k++) {
            /* Fast path for the common, valid sample: formatting the
             * element's path for every sample cost more than parsing it.
             * Anything unusual takes the full check, which names the path. */
            json_t *v = json_array_get(smp, k);
            if (json_is_number(v)) {
                double x = json_number_value(v);
                if (isfinite(x) && x >= -FM_MEAS_SAMPLE_ABS_MAX && x <= FM_MEAS_SAMPLE_ABS_MAX)
                    continue;
            }
            double d;
            snprintf(path, sizeof path, "sweep[%zu].samples[%zu]", i, k);
            rc = get_number_in(json_array_get(smp, k), path, -FM_MEAS_SAMPLE_ABS_MAX,
                               FM_MEAS_SAMPLE_ABS_MAX, &d, e);
            if (rc)
                return rc;
        }
        m->steps[i].n_samples = ns;
        sum += ns;
    }
    m->n_steps = n_steps;
    *total = sum;
    return 0;
}

/* Copies the already-validated samples into one owned buffer. */
static int fill_samples(json_t *root, fm_measurement *m, size_t total, fm_verr *e)
{
    double *buf = fm_malloc(total * sizeof *buf);
    if (!buf)
        return verr_nomem(e);
    json_t *sw = json_object_get(root, "sweep");
    size_t off = 0;
    for (size_t i = 0; i < m->n_steps; i++) {
        json_t *smp = json_object_get(json_array_get(sw, i), "samples");
        m->steps[i].samples = buf + off;
        for (size_t k = 0; k < m->steps[i].n_samples; k++)
            buf[off++] = json_number_value(json_array_get(smp, k));
    }
    m->sample_buf = buf;
    m->n_samples_total = total;
    return 0;
}

/* ---- entry points ------------------------------------------------------------- */

/* Turns a jansson load failure into a contract error. */
static int load_error(const json_error_t *je, fm_verr *e)
{
    /* jansson reports some of its allocation failures (for instance while
     * setting up the lexer) without filling in the error at all; a real
     * syntax error always comes with a text. */
    if (je->text[0] == '\0')
        return verr_nomem(e);
    switch (json_error_code(je)) {
    case json_error_out_of_memory:
        return verr_nomem(e);
    case json_error_numeric_overflow:
        /* JSON has no NaN/Infinity literals, so the only way a device can
         * send a non-finite number is a literal like 1e999; jansson's own
         * wording ("real number overflow") does not say why that matters. */
        return fm_verrf(e, FM_VERR_MALFORMED_JSON,
                        "line %d column %d: number is not finite (%s)", je->line, je->column,
                        je->text);
    default:
        return fm_verrf(e, FM_VERR_MALFORMED_JSON, "line %d column %d: %s", je->line,
                        je->column, je->text);
    }
}

static int parse_at(const char *buf, size_t len, int64_t now_ms, fm_measurement *m, fm_verr *e);

int validate__reference(const char *buf, size_t len, int64_t now_ms, fm_measurement *m,
                        fm_verr *e)
{
    /* The whole jansson document lives and dies inside this call, which is
     * what the arena needs (see fleetml/jsonmem.h). */
    fm_jsonmem_begin();
    int rc = parse_at(buf, len, now_ms, m, e);
    fm_jsonmem_end();
    return rc;
}

bool validate__meta_fits(const char *meta, size_t len)
{
    fm_jsonmem_begin();
    json_error_t je;
    json_t *v = json_loadb(meta, len, JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL, &je);
    size_t n = v && json_is_object(v) && !fm_json_too_deep(v, FM_JSON_DEPTH_MAX)
                   ? json_dumpb(v, NULL, 0, JSON_COMPACT)
                   : 0;
    json_decref(v);
    fm_jsonmem_end();
    return n > 0 && n <= FM_MEAS_META_MAX;
}

int fm_measurement_parse_at(const char *buf, size_t len, int64_t now_ms, fm_measurement *m,
                            fm_verr *e)
{
    if (!m)
        return fm_verrf(e, FM_VERR_INTERNAL, "payload: no output measurement given");
    /* Valid payloads take the fast path; anything it is unsure of gets the
     * reference validator's verdict and message (see validate_int.h). */
    int rc = validate__fast(buf, len, now_ms, m);
    if (rc == FM_ENOMEM)
        return verr_nomem(e);
    if (rc == VALIDATE_FAST_OK)
        return 0;
    return validate__reference(buf, len, now_ms, m, e);
}

static int parse_at(const char *buf, size_t len, int64_t now_ms, fm_measurement *m, fm_verr *e)
{
    static const char *const top_fields[] = {"id",    "taken_at", "kind", "temperature_c",
                                              "sweep", "firmware", "meta", NULL};
    if (!m)
        return fm_verrf(e, FM_VERR_INTERNAL, "payload: no output measurement given");
    memset(m, 0, sizeof *m);
    if (len > FM_MEAS_MAX_BYTES)
        return fm_verrf(e, FM_VERR_TOO_LARGE, "payload: %zu bytes exceeds the limit of %d bytes",
                        len, FM_MEAS_MAX_BYTES);
    if (!buf || len == 0)
        return fm_verrf(e, FM_VERR_MALFORMED_JSON, "payload: empty");

    /* REJECT_DUPLICATES: with duplicates, which value "wins" depends on
     * the parser, so the device and the cloud could disagree about what
     * was measured. DECODE_INT_AS_REAL: every number becomes a double, so
     * an over-long integer literal is judged by range like any other
     * number instead of failing as "too big integer". DECODE_ANY lets a
     * top-level scalar reach the clearer "expected an object" check. */
    json_error_t je;
    json_t *root = json_loadb(buf, len,
                              JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL | JSON_DECODE_ANY,
                              &je);
    if (!root)
        return load_error(&je, e);

    int rc;
    size_t total = 0;
    if (!json_is_object(root)) {
        rc = fm_verrf(e, FM_VERR_INVALID_TYPE, "payload: expected a JSON object, got %s",
                      jtype(root));
        goto out;
    }
    if ((rc = check_id(root, m, e)) || (rc = check_kind(root, m, e)) ||
        (rc = check_unknown_fields(root, top_fields, "", e)) ||
        (rc = check_taken_at(root, now_ms, m, e)) || (rc = check_temperature(root, m, e)) ||
        (rc = check_sweep(root, m, &total, e)) || (rc = check_firmware(root, m, e)) ||
        (rc = check_meta(root, e)))
        goto out;
    rc = fill_samples(root, m, total, e);
out:
    json_decref(root);
    if (rc)
        memset(m, 0, sizeof *m);
    return rc;
}

int fm_measurement_parse(const char *buf, size_t len, fm_measurement *m, fm_verr *e)
{
    return fm_measurement_parse_at(buf, len, fm_wall_ms(), m, e);
}

void fm_measurement_free(fm_measurement *m)
{
    if (!m)
        return;
    fm_free(m->sample_buf);
    memset(m, 0, sizeof *m);
}

/* ---- best-effort id extraction ------------------------------------------------ */

static void copy_if_valid(const char *s, size_t len, char *out)
{
    if (fm_measurement_id_valid(s, len)) {
        memcpy(out, s, len);
        out[len] = '\0';
    }
}

static size_t skip_ws(const char *p, size_t n, size_t i)
{
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
        i++;
    return i;
}

/* Looks for `"id": "<value>"` directly inside the top-level object of a
 * payload that jansson could not parse (truncated, duplicate keys, too
 * large, bad UTF-8 elsewhere). It tracks nesting and skips strings so an
 * "id" inside meta or inside a string value is never mistaken for the
 * measurement id. Ids containing escapes are not valid ids anyway, so the
 * scanner gives up on them rather than decoding. */
static void scan_id(const char *p, size_t n, char *out)
{
    size_t i = skip_ws(p, n, 0);
    if (i >= n || p[i] != '{')
        return;
    int depth = 0;
    bool expect_key = false;
    while (i < n) {
        char c = p[i];
        if (c == '"') {
            size_t start = ++i;
            while (i < n && p[i] != '"')
                i += (p[i] == '\\') ? 2 : 1;
            if (i >= n)
                return;
            size_t end = i++;
            if (depth != 1 || !expect_key)
                continue;
            expect_key = false;
            if (end - start != 2 || memcmp(p + start, "id", 2) != 0)
                continue;
            i = skip_ws(p, n, i);
            if (i >= n || p[i] != ':')
                return;
            i = skip_ws(p, n, i + 1);
            if (i >= n || p[i] != '"')
                return;
            start = ++i;
            while (i < n && p[i] != '"' && p[i] != '\\')
                i++;
            if (i < n && p[i] == '"')
                copy_if_valid(p + start, i - start, out);
            return;
        }
        if (c == '{' || c == '[') {
            depth++;
            expect_key = (c == '{' && depth == 1);
        } else if (c == '}' || c == ']') {
            if (--depth <= 0)
                return;
        } else if (c == ',' && depth == 1) {
            expect_key = true;
        }
        i++;
    }
}

void fm_measurement_peek_id(const char *buf, size_t len, char *out)
{
    if (!out)
        return;
    out[0] = '\0';
    if (!buf || len == 0)
        return;
    /* A real parse is the most trustworthy answer when it succeeds; it is
     * lenient about duplicates (the last id wins) because peeking must not
     * fail for the same reason validation did. Oversized payloads go
     * straight to the cheap scanner. */
    if (len <= FM_MEAS_MAX_BYTES) {
        json_error_t je;
        json_t *root = json_loadb(buf, len, JSON_DECODE_INT_AS_REAL | JSON_DECODE_ANY, &je);
        if (root) {
            json_t *id = json_object_get(root, "id");
            if (json_is_string(id))
                copy_if_valid(json_string_value(id), json_string_length(id), out);
            json_decref(root);
            return;
        }
    }
    scan_id(buf, len, out);
}
