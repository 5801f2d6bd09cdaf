/*
 * Unit tests for the device contract v1 validator (src/pipeline/validate.c).
 *
 * Most error cases start from one valid document, change a single field by
 * path and check the exact error code and that the message names the path.
 * Cases that cannot be produced by editing a parsed document (syntax
 * errors, raw bytes, duplicate keys) use literal payloads.
 */
#include "fleetml/measurement.h"
#include "pipeline/validate_int.h"

#include <float.h>
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "fleetml/contract.h"
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static const char VALID[] =
    "{\"id\":\"m-0001:a_b.c\","
    "\"taken_at\":\"2026-11-26T07:00:00.123Z\","
    "\"kind\":\"viscosity.sweep.v1\","
    "\"temperature_c\":37.0,"
    "\"sweep\":["
    "{\"shear_rate_s\":1.5,\"samples\":[10.5,11,12.25]},"
    "{\"shear_rate_s\":10,\"samples\":[20,21,22,23]},"
    "{\"shear_rate_s\":100,\"samples\":[1,2,3,4,5,6,7,8,-9.5]}"
    "],"
    "\"firmware\":\"visco-fw 2.3.1\","
    "\"meta\":{\"operator\":\"nurse-7\",\"cartridge\":{\"lot\":\"L42\"}}}";

/* The validator's "now": one hour after the valid document's taken_at. */
static int64_t now_ms;

static int setup_clock(void **state)
{
    (void)state;
    assert_int_equal(fm_rfc3339_parse("2026-11-26T08:00:00.123Z", &now_ms), 0);
    return 0;
}

static int parse_str(const char *s, size_t len, fm_measurement *m, fm_verr *e)
{
    memset(e, 0, sizeof *e);
    return fm_measurement_parse_at(s, len, now_ms, m, e);
}

static void assert_zeroed(const fm_measurement *m)
{
    static const fm_measurement zero;
    assert_memory_equal(m, &zero, sizeof zero);
}

/* ---- document editing helpers ---------------------------------------------- */

static json_t *load_json(const char *text)
{
    json_error_t je;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &je);
    if (!v)
        fail_msg("test JSON does not parse: %s (%s)", je.text, text);
    return v;
}

/* Sets (value_json != NULL) or deletes the element at path, where path is
 * like "sweep[2].samples[7]" or "id". */
static void doc_set(json_t *doc, const char *path, const char *value_json)
{
    json_t *cur = doc;
    char key[64];
    const char *p = path;
    for (;;) {
        size_t n = strcspn(p, ".[");
        bool is_index = false;
        size_t idx = 0;
        if (n == 0 && *p == '[') {
            is_index = true;
            idx = strtoul(p + 1, NULL, 10);
            p = strchr(p, ']') + 1;
        } else {
            assert_true(n < sizeof key);
            memcpy(key, p, n);
            key[n] = '\0';
            p += n;
        }
        bool last = (*p == '\0');
        if (last) {
            json_t *v = value_json ? load_json(value_json) : NULL;
            if (is_index) {
                if (v)
                    assert_int_equal(json_array_set_new(cur, idx, v), 0);
                else
                    assert_int_equal(json_array_remove(cur, idx), 0);
            } else {
                if (v)
                    assert_int_equal(json_object_set_new(cur, key, v), 0);
                else
                    assert_int_equal(json_object_del(cur, key), 0);
            }
            return;
        }
        cur = is_index ? json_array_get(cur, idx) : json_object_get(cur, key);
        assert_non_null(cur);
        if (*p == '.')
            p++;
    }
}

static int parse_doc(json_t *doc, fm_measurement *m, fm_verr *e)
{
    char *s = json_dumps(doc, JSON_COMPACT | JSON_ENCODE_ANY);
    assert_non_null(s);
    int rc = parse_str(s, strlen(s), m, e);
    free(s);
    return rc;
}

static void expect_err(int rc, const fm_measurement *m, const fm_verr *e, const char *code,
                       const char *msg_sub, const char *what)
{
    if (rc != FM_EINVAL || strcmp(e->code, code) != 0 || !strstr(e->message, msg_sub))
        fail_msg("%s: got rc=%d code=%s message=\"%s\"; want code=%s message containing \"%s\"",
                 what, rc, e->code, e->message, code, msg_sub);
    assert_zeroed(m);
}

/* ---- valid documents --------------------------------------------------------- */

static void test_valid_parses(void **state)
{
    (void)state;
    fm_measurement m;
    fm_verr e;
    assert_int_equal(parse_str(VALID, strlen(VALID), &m, &e), 0);
    assert_string_equal(m.id, "m-0001:a_b.c");
    assert_string_equal(m.kind, FM_MEAS_KIND_V1);
    assert_string_equal(m.firmware, "visco-fw 2.3.1");
    int64_t t;
    assert_int_equal(fm_rfc3339_parse("2026-11-26T07:00:00.123Z", &t), 0);
    assert_int_equal(m.taken_at_ms, t);
    assert_true(m.temperature_c == 37.0);
    assert_int_equal(m.n_steps, 3);
    assert_int_equal(m.n_samples_total, 16);
    assert_true(m.steps[0].shear_rate_s == 1.5);
    assert_true(m.steps[1].shear_rate_s == 10.0);
    assert_true(m.steps[2].shear_rate_s == 100.0);
    assert_int_equal(m.steps[0].n_samples, 3);
    assert_int_equal(m.steps[1].n_samples, 4);
    assert_int_equal(m.steps[2].n_samples, 9);
    /* Steps point back to back into the one owned buffer. */
    assert_ptr_equal(m.steps[0].samples, m.sample_buf);
    assert_ptr_equal(m.steps[1].samples, m.sample_buf + 3);
    assert_ptr_equal(m.steps[2].samples, m.sample_buf + 7);
    assert_true(m.steps[0].samples[0] == 10.5);
    assert_true(m.steps[0].samples[2] == 12.25);
    assert_true(m.steps[1].samples[3] == 23.0);
    assert_true(m.steps[2].samples[8] == -9.5);
    fm_measurement_free(&m);
    assert_null(m.sample_buf);
    fm_measurement_free(&m); /* idempotent on a freed struct */
}

static void test_valid_variants(void **state)
{
    (void)state;
    static const struct {
        const char *path, *value; /* value NULL = delete */
    } cases[] = {
        {"meta", NULL},                              /* meta is optional */
        {"meta", "{}"},
        {"temperature_c", "37"},                     /* integer where a number is expected */
        {"temperature_c", "10"},                     /* inclusive bounds */
        {"temperature_c", "45.0"},
        {"sweep[0].shear_rate_s", "0.01"},
        {"sweep[2].shear_rate_s", "5000"},
        {"sweep[2].samples[0]", "1000000"},
        {"sweep[2].samples[1]", "-1000000"},
        {"taken_at", "\"2026-11-26T09:00:00+02:00\""}, /* numeric offset */
        {"taken_at", "\"2026-11-27T08:00:00.123Z\""},  /* exactly 24 h ahead */
        {"taken_at", "\"1999-01-01T00:00:00Z\""},      /* old uploads are fine */
        {"id", "\"A\""},
        {"id", "\"0123456789012345678901234567890123456789012345678901234567890123\""},
        {"firmware", "\"~ !\""},
        /* meta itself and 15 arrays: 16 levels, the most FM_JSON_DEPTH_MAX allows */
        {"meta", "{\"a\":[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *doc = load_json(VALID);
        doc_set(doc, cases[i].path, cases[i].value);
        fm_measurement m;
        fm_verr e;
        int rc = parse_doc(doc, &m, &e);
        if (rc != 0)
            fail_msg("%s=%s: rc=%d %s: %s", cases[i].path, cases[i].value ? cases[i].value : "-",
                     rc, e.code, e.message);
        fm_measurement_free(&m);
        json_decref(doc);
    }
}

/* A number literal that underflows to zero is finite and in range. */
static void test_valid_underflow_is_zero(void **state)
{
    (void)state;
    char buf[1024];
    snprintf(buf, sizeof buf, "%.*s1e-999%s", (int)(strstr(VALID, "10.5") - VALID), VALID,
             strstr(VALID, "10.5") + 4);
    fm_measurement m;
    fm_verr e;
    assert_int_equal(parse_str(buf, strlen(buf), &m, &e), 0);
    assert_true(m.steps[0].samples[0] == 0.0);
    fm_measurement_free(&m);
}

/* fm_measurement_parse uses the wall clock; a measurement from 2026 is not
 * in the future of any clock this test runs under... unless it runs before
 * 2026-11-25, so use a document dated now. */
static void test_wall_clock(void **state)
{
    (void)state;
    char ts[32];
    fm_rfc3339(fm_wall_ms() + 60 * 1000, ts, sizeof ts); /* small clock skew */
    json_t *doc = load_json(VALID);
    char v[48];
    snprintf(v, sizeof v, "\"%s\"", ts);
    doc_set(doc, "taken_at", v);
    char *s = json_dumps(doc, JSON_COMPACT);
    fm_measurement m;
    fm_verr e;
    assert_int_equal(fm_measurement_parse(s, strlen(s), &m, &e), 0);
    fm_measurement_free(&m);
    fm_rfc3339(fm_wall_ms() + FM_MEAS_FUTURE_MAX_MS + 3600 * 1000, ts, sizeof ts);
    snprintf(v, sizeof v, "\"%s\"", ts);
    doc_set(doc, "taken_at", v);
    free(s);
    s = json_dumps(doc, JSON_COMPACT);
    int rc = fm_measurement_parse(s, strlen(s), &m, &e);
    expect_err(rc, &m, &e, FM_VERR_OUT_OF_RANGE, "taken_at:", "wall clock future");
    free(s);
    json_decref(doc);
}

/* ---- field errors -------------------------------------------------------------- */

struct field_case {
    const char *path;
    const char *value; /* JSON text, NULL = delete the field */
    const char *code;
    const char *msg; /* substring the message must contain */
};

static const struct field_case field_cases[] = {
    /* id */
    {"id", NULL, FM_VERR_MISSING_FIELD, "id: missing required field"},
    {"id", "5", FM_VERR_INVALID_TYPE, "id: expected a string, got number"},
    {"id", "null", FM_VERR_INVALID_TYPE, "id: expected a string, got null"},
    {"id", "\"\"", FM_VERR_INVALID_VALUE, "id: length 0 is outside 1..64"},
    {"id", "\"01234567890123456789012345678901234567890123456789012345678901234\"",
     FM_VERR_INVALID_VALUE, "id: length 65"},
    {"id", "\"a/b\"", FM_VERR_INVALID_VALUE, "id: character at offset 1"},
    {"id", "\"a b\"", FM_VERR_INVALID_VALUE, "id: character at offset 1"},
    {"id", "\"caf\\u00e9\"", FM_VERR_INVALID_VALUE, "id: character at offset 3"},
    {"id", "\"a\\nb\"", FM_VERR_INVALID_VALUE, "id: character"},
    /* kind */
    {"kind", NULL, FM_VERR_MISSING_FIELD, "kind: missing required field"},
    {"kind", "1", FM_VERR_INVALID_TYPE, "kind: expected a string, got number"},
    {"kind", "\"viscosity.sweep.v2\"", FM_VERR_UNKNOWN_KIND, "kind: \"viscosity.sweep.v2\""},
    {"kind", "\"\"", FM_VERR_UNKNOWN_KIND, "kind:"},
    /* unknown fields */
    {"colour", "\"red\"", FM_VERR_UNKNOWN_FIELD, "colour: unknown field"},
    {"Id", "\"x\"", FM_VERR_UNKNOWN_FIELD, "Id: unknown field"},
    {"sweep[1].extra", "1", FM_VERR_UNKNOWN_FIELD, "sweep[1].extra: unknown field"},
    /* taken_at */
    {"taken_at", NULL, FM_VERR_MISSING_FIELD, "taken_at: missing required field"},
    {"taken_at", "1700000000", FM_VERR_INVALID_TYPE, "taken_at: expected a string, got number"},
    {"taken_at", "\"yesterday\"", FM_VERR_INVALID_VALUE, "taken_at: \"yesterday\" is not an RFC 3339"},
    {"taken_at", "\"2026-13-01T00:00:00Z\"", FM_VERR_INVALID_VALUE, "taken_at:"},
    {"taken_at", "\"2026-11-26T07:00:00\"", FM_VERR_INVALID_VALUE, "taken_at:"},
    {"taken_at", "\"2026-11-27T08:00:00.124Z\"", FM_VERR_OUT_OF_RANGE,
     "taken_at: 2026-11-27T08:00:00.124Z is more than 24 h ahead"},
    /* temperature_c */
    {"temperature_c", NULL, FM_VERR_MISSING_FIELD, "temperature_c: missing required field"},
    {"temperature_c", "\"37\"", FM_VERR_INVALID_TYPE,
     "temperature_c: expected a finite number, got string"},
    {"temperature_c", "true", FM_VERR_INVALID_TYPE, "temperature_c: expected a finite number, got boolean"},
    {"temperature_c", "null", FM_VERR_INVALID_TYPE, "got null"},
    {"temperature_c", "80", FM_VERR_OUT_OF_RANGE, "temperature_c: 80 is outside 10..45"},
    {"temperature_c", "9.99", FM_VERR_OUT_OF_RANGE, "temperature_c: 9.99 is outside 10..45"},
    {"temperature_c", "-1e308", FM_VERR_OUT_OF_RANGE, "temperature_c:"},
    /* sweep */
    {"sweep", NULL, FM_VERR_MISSING_FIELD, "sweep: missing required field"},
    {"sweep", "{}", FM_VERR_INVALID_TYPE, "sweep: expected array of steps, got object"},
    {"sweep", "[]", FM_VERR_OUT_OF_RANGE, "sweep: expected 2..64 steps, got 0"},
    {"sweep", "[{\"shear_rate_s\":1,\"samples\":[1,2,3]}]", FM_VERR_OUT_OF_RANGE,
     "sweep: expected 2..64 steps, got 1"},
    {"sweep[1]", "5", FM_VERR_INVALID_TYPE, "sweep[1]: expected an object, got number"},
    {"sweep[1]", "[]", FM_VERR_INVALID_TYPE, "sweep[1]: expected an object, got array"},
    {"sweep[1].shear_rate_s", NULL, FM_VERR_MISSING_FIELD,
     "sweep[1].shear_rate_s: missing required field"},
    {"sweep[1].shear_rate_s", "\"10\"", FM_VERR_INVALID_TYPE,
     "sweep[1].shear_rate_s: expected a finite number, got string"},
    {"sweep[0].shear_rate_s", "0", FM_VERR_OUT_OF_RANGE,
     "sweep[0].shear_rate_s: 0 is outside 0.01..5000"},
    {"sweep[2].shear_rate_s", "5000.5", FM_VERR_OUT_OF_RANGE,
     "sweep[2].shear_rate_s: 5000.5 is outside"},
    {"sweep[1].shear_rate_s", "1.5", FM_VERR_INVALID_VALUE,
     "sweep[1].shear_rate_s: 1.5 is not greater than 1.5 in sweep[0]"},
    {"sweep[2].shear_rate_s", "5", FM_VERR_INVALID_VALUE, "sweep[2].shear_rate_s:"},
    {"sweep[2].samples", NULL, FM_VERR_MISSING_FIELD, "sweep[2].samples: missing required field"},
    {"sweep[2].samples", "\"abc\"", FM_VERR_INVALID_TYPE,
     "sweep[2].samples: expected array of numbers, got string"},
    {"sweep[2].samples", "{}", FM_VERR_INVALID_TYPE,
     "sweep[2].samples: expected array of numbers, got object"},
    {"sweep[2].samples", "[1,2]", FM_VERR_OUT_OF_RANGE,
     "sweep[2].samples: expected 3..4096 samples, got 2"},
    {"sweep[2].samples[7]", "\"x\"", FM_VERR_INVALID_TYPE,
     "sweep[2].samples[7]: expected a finite number, got string"},
    {"sweep[2].samples[7]", "null", FM_VERR_INVALID_TYPE,
     "sweep[2].samples[7]: expected a finite number, got null"},
    {"sweep[2].samples[7]", "[1]", FM_VERR_INVALID_TYPE,
     "sweep[2].samples[7]: expected a finite number, got array"},
    {"sweep[2].samples[7]", "2000000", FM_VERR_OUT_OF_RANGE,
     "sweep[2].samples[7]: 2e+06 is outside -1e+06..1e+06"},
    {"sweep[2].samples[0]", "-1000000.5", FM_VERR_OUT_OF_RANGE, "sweep[2].samples[0]:"},
    /* firmware */
    {"firmware", NULL, FM_VERR_MISSING_FIELD, "firmware: missing required field"},
    {"firmware", "231", FM_VERR_INVALID_TYPE, "firmware: expected a string, got number"},
    {"firmware", "\"\"", FM_VERR_INVALID_VALUE, "firmware: length 0 is outside 1..64"},
    {"firmware", "\"01234567890123456789012345678901234567890123456789012345678901234\"",
     FM_VERR_INVALID_VALUE, "firmware: length 65"},
    {"firmware", "\"fw\\n1\"", FM_VERR_INVALID_VALUE, "firmware: byte at offset 2"},
    {"firmware", "\"fw\\u00e9\"", FM_VERR_INVALID_VALUE, "firmware: byte at offset 2"},
    /* meta */
    {"meta", "[]", FM_VERR_INVALID_TYPE, "meta: expected an object, got array"},
    {"meta", "null", FM_VERR_INVALID_TYPE, "meta: expected an object, got null"},
    {"meta", "\"x\"", FM_VERR_INVALID_TYPE, "meta: expected an object, got string"},
    {"meta", "{\"a\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}", FM_VERR_OUT_OF_RANGE,
     "meta: nested more than 16 levels deep"},
    {"meta", "{\"a\":{\"b\":[{},[[[[[[[[[[[[[{\"c\":1}]]]]]]]]]]]]]]}}", FM_VERR_OUT_OF_RANGE,
     "meta: nested more than 16 levels deep"},
};

static void test_field_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof field_cases / sizeof field_cases[0]; i++) {
        const struct field_case *c = &field_cases[i];
        json_t *doc = load_json(VALID);
        doc_set(doc, c->path, c->value);
        fm_measurement m;
        fm_verr e;
        int rc = parse_doc(doc, &m, &e);
        char what[160];
        snprintf(what, sizeof what, "%s=%s", c->path, c->value ? c->value : "(deleted)");
        expect_err(rc, &m, &e, c->code, c->msg, what);
        json_decref(doc);
    }
}

/* Kind is checked before unknown fields, so a device speaking a future
 * contract hears about the version rather than about its new fields. */
static void test_kind_before_unknown_fields(void **state)
{
    (void)state;
    json_t *doc = load_json(VALID);
    doc_set(doc, "kind", "\"viscosity.sweep.v2\"");
    doc_set(doc, "new_in_v2", "1");
    fm_measurement m;
    fm_verr e;
    int rc = parse_doc(doc, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_UNKNOWN_KIND, "kind:", "v2 with new field");
    json_decref(doc);
}

static json_t *make_steps(size_t n_steps, size_t n_samples)
{
    json_t *sw = json_array();
    for (size_t i = 0; i < n_steps; i++) {
        json_t *smp = json_array();
        for (size_t k = 0; k < n_samples; k++)
            json_array_append_new(smp, json_integer((json_int_t)k));
        json_t *st = json_object();
        json_object_set_new(st, "shear_rate_s", json_real(1.0 + (double)i));
        json_object_set_new(st, "samples", smp);
        json_array_append_new(sw, st);
    }
    return sw;
}

static void test_count_limits(void **state)
{
    (void)state;
    static const struct {
        size_t steps, samples;
        int ok;
        const char *msg;
    } cases[] = {
        {FM_MEAS_MAX_STEPS, FM_MEAS_MIN_SAMPLES, 1, NULL},
        {FM_MEAS_MAX_STEPS + 1, FM_MEAS_MIN_SAMPLES, 0, "sweep: expected 2..64 steps, got 65"},
        {FM_MEAS_MIN_STEPS, FM_MEAS_MAX_SAMPLES, 1, NULL},
        {FM_MEAS_MIN_STEPS, FM_MEAS_MAX_SAMPLES + 1, 0,
         "sweep[0].samples: expected 3..4096 samples, got 4097"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *doc = load_json(VALID);
        json_object_set_new(doc, "sweep", make_steps(cases[i].steps, cases[i].samples));
        fm_measurement m;
        fm_verr e;
        int rc = parse_doc(doc, &m, &e);
        if (cases[i].ok) {
            assert_int_equal(rc, 0);
            assert_int_equal(m.n_steps, cases[i].steps);
            assert_int_equal(m.n_samples_total, cases[i].steps * cases[i].samples);
            assert_true(m.steps[m.n_steps - 1].samples[cases[i].samples - 1] ==
                        (double)(cases[i].samples - 1));
            fm_measurement_free(&m);
        } else {
            expect_err(rc, &m, &e, FM_VERR_OUT_OF_RANGE, cases[i].msg, "count limit");
        }
        json_decref(doc);
    }
}

static void test_meta_too_large(void **state)
{
    (void)state;
    json_t *doc = load_json(VALID);
    char *big = malloc(FM_MEAS_META_MAX + 1);
    memset(big, 'x', FM_MEAS_META_MAX);
    big[FM_MEAS_META_MAX] = '\0';
    json_t *meta = json_object();
    json_object_set_new(meta, "note", json_string(big));
    json_object_set_new(doc, "meta", meta);
    fm_measurement m;
    fm_verr e;
    int rc = parse_doc(doc, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_OUT_OF_RANGE, "meta: compact serialisation", "big meta");

    /* {"note":"<s>"} is 11 bytes of framing: exactly at the limit passes. */
    big[FM_MEAS_META_MAX - 11] = '\0';
    json_object_set_new(meta, "note", json_string(big));
    assert_int_equal(parse_doc(doc, &m, &e), 0);
    fm_measurement_free(&m);
    free(big);
    json_decref(doc);
}

/* ---- payload-level errors ------------------------------------------------------- */

struct raw_case {
    const char *payload;
    size_t len; /* 0 = strlen */
    const char *code;
    const char *msg;
};

static const struct raw_case raw_cases[] = {
    {"[]", 0, FM_VERR_INVALID_TYPE, "payload: expected a JSON object, got array"},
    {"42", 0, FM_VERR_INVALID_TYPE, "payload: expected a JSON object, got number"},
    {"\"s\"", 0, FM_VERR_INVALID_TYPE, "payload: expected a JSON object, got string"},
    {"null", 0, FM_VERR_INVALID_TYPE, "payload: expected a JSON object, got null"},
    {"{}", 0, FM_VERR_MISSING_FIELD, "id: missing required field"},
    {"{", 0, FM_VERR_MALFORMED_JSON, "line 1 column 1:"},
    {"{\"id\":}", 0, FM_VERR_MALFORMED_JSON, "line 1 column 7:"},
    {"{\n  \"id\": x}", 0, FM_VERR_MALFORMED_JSON, "line 2 column"},
    {"{} x", 0, FM_VERR_MALFORMED_JSON, "end of file expected"},
    {"   \n ", 0, FM_VERR_MALFORMED_JSON, "line"},
    {"{'id':'a'}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"id\":\"a\",}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    /* JSON has no NaN or Infinity; overflowing literals are the only way to
     * smuggle a non-finite number in, and the message must say so. */
    {"{\"temperature_c\":NaN}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"temperature_c\":Infinity}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"temperature_c\":1e999}", 0, FM_VERR_MALFORMED_JSON,
     "line 1 column 22: number is not finite (real number overflow"},
    {"{\"temperature_c\":-1e999}", 0, FM_VERR_MALFORMED_JSON, "number is not finite"},
    {"{\"a\":[1e400]}", 0, FM_VERR_MALFORMED_JSON, "number is not finite"},
    /* Not valid UTF-8: a stray byte, an overlong encoding, a surrogate, a
     * truncated sequence at the end of a string. */
    {"{\"id\":\"\xff\"}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"id\":\"\xc0\xaf\"}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"id\":\"\xed\xa0\x80\"}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"id\":\"\xe2\x82\"}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"\xfe\":1}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"\xef\xbb\xbf{}", 0, FM_VERR_MALFORMED_JSON, "line 1"}, /* BOM */
    /* NUL bytes, raw or escaped. */
    {"{\"id\":\"a\0b\"}", 12, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{\"id\":\"a\\u0000b\"}", 0, FM_VERR_MALFORMED_JSON, "line 1"},
    {"{}\0", 3, FM_VERR_MALFORMED_JSON, "line 1"},
    /* Duplicate keys at any level. */
    {"{\"id\":\"a\",\"id\":\"b\"}", 0, FM_VERR_MALFORMED_JSON, "duplicate object key"},
    {"{\"sweep\":[{\"samples\":[1],\"samples\":[2]}]}", 0, FM_VERR_MALFORMED_JSON,
     "duplicate object key"},
    {"{\"meta\":{\"a\":1,\"a\":1}}", 0, FM_VERR_MALFORMED_JSON, "duplicate object key"},
};

static void test_raw_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof raw_cases / sizeof raw_cases[0]; i++) {
        const struct raw_case *c = &raw_cases[i];
        size_t len = c->len ? c->len : strlen(c->payload);
        fm_measurement m;
        fm_verr e;
        int rc = parse_str(c->payload, len, &m, &e);
        char what[64];
        snprintf(what, sizeof what, "raw case %zu", i);
        expect_err(rc, &m, &e, c->code, c->msg, what);
        /* Messages quote hostile bytes but must stay printable ASCII. */
        for (const char *p = e.message; *p; p++)
            assert_true(*p >= 0x20 && *p <= 0x7e);
    }
}

static void test_empty_payload(void **state)
{
    (void)state;
    fm_measurement m;
    fm_verr e;
    int rc = parse_str("", 0, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_MALFORMED_JSON, "payload: empty", "empty");
    rc = parse_str(NULL, 0, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_MALFORMED_JSON, "payload: empty", "NULL");
}

/* Pads VALID with trailing whitespace to exactly len bytes. */
static char *padded_valid(size_t len)
{
    char *buf = malloc(len);
    size_t n = strlen(VALID);
    memcpy(buf, VALID, n);
    memset(buf + n, ' ', len - n);
    return buf;
}

static void test_payload_size(void **state)
{
    (void)state;
    fm_measurement m;
    fm_verr e;
    char *buf = padded_valid(FM_MEAS_MAX_BYTES);
    assert_int_equal(parse_str(buf, FM_MEAS_MAX_BYTES, &m, &e), 0);
    fm_measurement_free(&m);
    free(buf);

    buf = padded_valid(FM_MEAS_MAX_BYTES + 1);
    int rc = parse_str(buf, FM_MEAS_MAX_BYTES + 1, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_TOO_LARGE, "payload: 131073 bytes exceeds the limit",
               "oversize");
    free(buf);

    /* The size check comes first: garbage beyond the limit is still
     * "too large", not "malformed". */
    buf = malloc(10 * FM_MEAS_MAX_BYTES);
    memset(buf, 0xff, 10 * FM_MEAS_MAX_BYTES);
    rc = parse_str(buf, 10 * FM_MEAS_MAX_BYTES, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_TOO_LARGE, "payload:", "oversize garbage");
    free(buf);
}

/* Deep nesting must neither overflow the stack nor be accepted blindly:
 * jansson stops at its depth limit (2048), which surfaces as malformed_json. */
static void test_deep_nesting(void **state)
{
    (void)state;
    const size_t depth = 60000; /* 120 kB of brackets, under the size limit */
    const char *pre = "{\"meta\":{\"a\":";
    size_t plen = strlen(pre);
    char *buf = malloc(plen + 2 * depth + 2);
    memcpy(buf, pre, plen);
    memset(buf + plen, '[', depth);
    memset(buf + plen + depth, ']', depth);
    memcpy(buf + plen + 2 * depth, "}}", 2);
    size_t len = plen + 2 * depth + 2;
    assert_true(len <= FM_MEAS_MAX_BYTES);
    fm_measurement m;
    fm_verr e;
    int rc = parse_str(buf, len, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_MALFORMED_JSON, "line 1 column", "deep nesting");
    assert_non_null(strstr(e.message, "depth"));

    /* Nesting inside a sample position is a type error at a known path. */
    char doc[2048];
    char *v = strstr(VALID, "10.5");
    snprintf(doc, sizeof doc, "%.*s[[[[[[[[[[1]]]]]]]]]]%s", (int)(v - VALID), VALID, v + 4);
    rc = parse_str(doc, strlen(doc), &m, &e);
    expect_err(rc, &m, &e, FM_VERR_INVALID_TYPE,
               "sweep[0].samples[0]: expected a finite number, got array", "nested sample");
    free(buf);
}

/* Huge but finite numbers are range errors at their path; integer literals
 * too long for int64 are read as doubles instead of failing the parse. */
static void test_huge_numbers(void **state)
{
    (void)state;
    static const struct {
        const char *path, *value, *msg;
    } cases[] = {
        {"temperature_c", "1.7976931348623157e308", "temperature_c: 1.79769e+308 is outside"},
        {"sweep[2].samples[7]", "123456789012345678901234567890", "sweep[2].samples[7]: 1.23457e+29"},
        {"sweep[2].samples[7]", "-99999999999999999999", "sweep[2].samples[7]: -1e+20"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* Substitute the literal textually: jansson's own loader (used by
         * doc_set) would reject the over-long integers. */
        json_t *doc = load_json(VALID);
        doc_set(doc, cases[i].path, "\"@@\"");
        char *s = json_dumps(doc, JSON_COMPACT);
        char out[2048];
        char *at = strstr(s, "\"@@\"");
        snprintf(out, sizeof out, "%.*s%s%s", (int)(at - s), s, cases[i].value, at + 4);
        fm_measurement m;
        fm_verr e;
        int rc = parse_str(out, strlen(out), &m, &e);
        expect_err(rc, &m, &e, FM_VERR_OUT_OF_RANGE, cases[i].msg, cases[i].value);
        free(s);
        json_decref(doc);
    }
    /* 400 digits overflow a double: that is a non-finite number. */
    char out[1024];
    char digits[401];
    memset(digits, '9', 400);
    digits[400] = '\0';
    snprintf(out, sizeof out, "{\"temperature_c\":%s}", digits);
    fm_measurement m;
    fm_verr e;
    int rc = parse_str(out, strlen(out), &m, &e);
    expect_err(rc, &m, &e, FM_VERR_MALFORMED_JSON, "number is not finite", "400 digits");
}

/* Long hostile keys and values are truncated in messages, which still fit
 * and stay printable. */
static void test_long_key_message(void **state)
{
    (void)state;
    json_t *doc = load_json(VALID);
    char key[1000];
    memset(key, 'k', sizeof key - 1);
    key[sizeof key - 1] = '\0';
    key[3] = '\x01';
    json_object_set_new(doc, key, json_true());
    fm_measurement m;
    fm_verr e;
    int rc = parse_doc(doc, &m, &e);
    expect_err(rc, &m, &e, FM_VERR_UNKNOWN_FIELD, "kkk?kkkk", "long key");
    assert_non_null(strstr(e.message, ": unknown field"));
    json_decref(doc);
}

/* ---- allocation failure ---------------------------------------------------------- */

/* jansson allocates through these wrappers in this test binary (see main),
 * so injected failures reach the JSON parser and serialiser as well as the
 * validator. The flag records whether the failed allocation was jansson's. */
static bool jansson_alloc_failed;

static void *json_malloc_hook(size_t n)
{
    void *p = fm_malloc(n);
    if (!p)
        jansson_alloc_failed = true;
    return p;
}

/* Walks every allocation of a successful parse, failing each in turn. The
 * validator's own allocations must fail cleanly with FM_ENOMEM. jansson
 * 2.14 reports most of its allocation failures as out-of-memory, but a
 * failure while decoding a string token surfaces as a syntax error, so when
 * the failed allocation was jansson's any clean error is accepted. (Worse,
 * its lexer ignores a failure to grow the token buffer for strings longer
 * than 16 bytes and silently drops a byte; in this document the only such
 * string is taken_at, whose strict format turns that into invalid_value.)
 * In every case nothing may leak (ASan) and a failed parse leaves the
 * output empty. Run on the reference validator (jansson) alone and on
 * fm_measurement_parse_at, whose fast path (simdjson) hands the payload to
 * the reference when its own allocation fails, so there a success may
 * follow a failed allocation; its content is then checked in full. */
typedef int (*parse_fn)(const char *, size_t, int64_t, fm_measurement *, fm_verr *);

static void alloc_failures(parse_fn parse, bool reference)
{
    bool succeeded = false;
    int enomem = 0;
    for (long n = 0; n < 10000 && !succeeded; n++) {
        fm_measurement m;
        fm_verr e;
        memset(&e, 0, sizeof e);
        jansson_alloc_failed = false;
        fm_alloc_fail_after(n);
        int rc = parse(VALID, strlen(VALID), now_ms, &m, &e);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            succeeded = true;
            if (reference)
                assert_false(jansson_alloc_failed);
            assert_string_equal(m.id, "m-0001:a_b.c");
            assert_string_equal(m.firmware, "visco-fw 2.3.1");
            assert_int_equal(m.n_samples_total, 16);
            assert_true(m.steps[2].samples[8] == -9.5);
            fm_measurement_free(&m);
            continue;
        }
        assert_zeroed(&m);
        if (rc == FM_ENOMEM) {
            assert_string_equal(e.code, FM_VERR_INTERNAL);
            enomem++;
        } else if (!(rc == FM_EINVAL && jansson_alloc_failed)) {
            fail_msg("n=%ld: rc=%d code=%s message=%s", n, rc, e.code, e.message);
        }
    }
    assert_true(succeeded);
    /* jansson's reported failures and our own (the fast path's failures
     * mostly end in the reference's success) */
    if (reference)
        assert_true(enomem > 1);
}

static void test_alloc_failures(void **state)
{
    (void)state;
    alloc_failures(validate__reference, true);
    alloc_failures(fm_measurement_parse_at, false);
}

static void test_peek_alloc_failures(void **state)
{
    (void)state;
    for (long n = 0; n < 200; n++) {
        char out[FM_MEAS_ID_MAX + 1];
        fm_alloc_fail_after(n);
        fm_measurement_peek_id(VALID, strlen(VALID), out);
        fm_alloc_fail_after(-1);
        /* With the parse failing, the scanner still finds the id. */
        assert_string_equal(out, "m-0001:a_b.c");
    }
}

/* ---- peek_id ------------------------------------------------------------------------ */

static void test_peek_id(void **state)
{
    (void)state;
    static const struct {
        const char *payload;
        size_t len;
        const char *want;
    } cases[] = {
        {"{\"id\":\"m-1\",\"kind\":5}", 0, "m-1"},
        {"{\"kind\":\"x\",\"id\":\"m-2\"", 0, "m-2"},                /* truncated */
        {"{\"id\" : \"m-3\", \"sweep\":[1,2", 0, "m-3"},             /* truncated */
        {"{\"id\":\"m-4\",\"id\":\"m-5\"}", 0, "m-5"},               /* duplicates */
        {"{\"id\":\"m-6\",\"x\":\"\xff\"}", 0, "m-6"},               /* bad UTF-8 */
        {"{\"id\":\"m-7\",\"t\":1e999}", 0, "m-7"},                  /* overflow */
        {"{\"meta\":{\"id\":\"inner\"},\"id\":\"outer\",", 0, "outer"},
        {"{\"meta\":{\"id\":\"inner\"}", 0, ""},
        {"{\"note\":\"\\\"id\\\":\\\"evil\\\"\",\"id\":\"good\",", 0, "good"},
        {"{\"note\":\"id\",\"x\":\"id\",", 0, ""},
        {"{\"id\":\"a/b\"}", 0, ""},                                  /* bad charset */
        {"{\"id\":\"a/b\",", 0, ""},
        {"{\"id\":\"\"}", 0, ""},
        {"{\"id\":5}", 0, ""},
        {"{\"id\":5,", 0, ""},
        {"{\"id\":\"a\\u0041\",", 0, ""},                             /* escapes: give up */
        {"[\"id\",\"x\"]", 0, ""},
        {"[{\"id\":\"x\"}", 0, ""},
        {"\"id\"", 0, ""},
        {"", 0, ""},
        {"{\"id\":\"open", 0, ""},
        {"{\"id\"", 0, ""},
        {"{\"id\":\"m-8\"}\0garbage", 20, "m-8"},
        {"{\"id\":\"0123456789012345678901234567890123456789012345678901234567890123x\",", 0, ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[FM_MEAS_ID_MAX + 1];
        memset(out, 'Z', sizeof out);
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].payload);
        fm_measurement_peek_id(cases[i].payload, len, out);
        if (strcmp(out, cases[i].want) != 0)
            fail_msg("peek case %zu: got \"%s\", want \"%s\"", i, out, cases[i].want);
    }
    char out[FM_MEAS_ID_MAX + 1] = "junk";
    fm_measurement_peek_id(NULL, 5, out);
    assert_string_equal(out, "");

    /* An oversized payload skips the parser; the scanner still finds it. */
    char *buf = padded_valid(FM_MEAS_MAX_BYTES * 2);
    fm_measurement_peek_id(buf, FM_MEAS_MAX_BYTES * 2, out);
    assert_string_equal(out, "m-0001:a_b.c");
    free(buf);
}

/* ---- device ids ------------------------------------------------------------------- */

static void test_device_id(void **state)
{
    (void)state;
    static const struct {
        const char *id;
        bool ok;
    } cases[] = {
        {"abc", true},
        {"dev-01", true},
        {"0visco", true},
        {"a--", true},
        {"visco-ward-3-bed-12", true},
        {"0123456789012345678901234567890123456789012345678901234567890123", true},
        {"01234567890123456789012345678901234567890123456789012345678901234", false},
        {"ab", false},
        {"", false},
        {NULL, false},
        {"-abc", false},
        {"Abc", false},
        {"abC", false},
        {"ab_c", false},
        {"ab.c", false},
        {"ab c", false},
        {"ab/c", false},
        {"ab+", false},
        {"ab#", false},
        {"abc\n", false},
        {"d\xc3\xa9v", false},
        /* Reserved: fleet/provisioning/# and the platform's own clients. */
        {"provisioning", false},
        {"fleetml-service", false},
        {"provisioning-2", true},
        {"fleetml", true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (fm_device_id_valid(cases[i].id) != cases[i].ok)
            fail_msg("device id \"%s\": expected %s", cases[i].id ? cases[i].id : "(null)",
                     cases[i].ok ? "valid" : "invalid");
}

static void test_verrf(void **state)
{
    (void)state;
    fm_verr e;
    assert_int_equal(fm_verrf(&e, FM_VERR_INVALID_VALUE, "x: %s", "a\tb\xc3\xa9"), FM_EINVAL);
    assert_string_equal(e.code, "invalid_value");
    assert_string_equal(e.message, "x: a?b??");
    assert_int_equal(fm_verrf(NULL, FM_VERR_INTERNAL, "ignored"), FM_EINVAL);
}

/* The ok reply from the contract module: order, rounding, refusals. */
static void test_ok_doc(void **state)
{
    (void)state;
    const char *names[] = {"hematocrit", "viscosity_ratio"};
    const float values[] = {42.12345f, -0.0004f};
    char *s = fm_ok_doc("m-1", "viscosity@3", names, values, 2, "2026-12-03T10:00:00.000Z");
    assert_non_null(s);
    assert_string_equal(s, "{\"id\":\"m-1\",\"status\":\"ok\",\"model\":\"viscosity@3\","
                           "\"outputs\":{\"hematocrit\":42.123,\"viscosity_ratio\":-0.0},"
                           "\"received_at\":\"2026-12-03T10:00:00.000Z\"}");
    fm_free(s);
    assert_null(fm_ok_doc(NULL, "m@1", names, values, 2, "t"));
    assert_null(fm_ok_doc("m", "m@1", NULL, values, 2, "t"));
    const char *bad[] = {"a", NULL};
    assert_null(fm_ok_doc("m", "m@1", bad, values, 2, "t"));
}

/* The reference: the ok reply as jansson writes it (what fm_ok_doc
 * produced before it wrote the common case itself). */
static char *ok_doc_reference(const char *mid, const char *ref, const char *const *names,
                              const float *values, size_t n, const char *at)
{
    json_t *outputs = json_object();
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_real(round((double)values[i] * 1000.0) / 1000.0);
        if (!v || json_object_set_new(outputs, names[i], v) != 0) {
            json_decref(outputs);
            return NULL;
        }
    }
    json_t *doc = json_pack("{s:s, s:s, s:s, s:o, s:s}", "id", mid, "status", "ok", "model", ref,
                            "outputs", outputs, "received_at", at);
    if (!doc)
        return NULL;
    char *s = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(doc);
    return s;
}

static void expect_same_doc(const char *mid, const char *ref, const char *const *names,
                            const float *values, size_t n, const char *at)
{
    char *want = ok_doc_reference(mid, ref, names, values, n, at);
    char *got = fm_ok_doc(mid, ref, names, values, n, at);
    if ((want == NULL) != (got == NULL) || (want && strcmp(want, got) != 0))
        fail_msg("ok reply differs for %.9g / %.9g / %.9g:\n  got  %s\n  want %s",
                 n > 0 ? (double)values[0] : 0.0, n > 1 ? (double)values[1] : 0.0,
                 n > 2 ? (double)values[2] : 0.0, got ? got : "(null)", want ? want : "(null)");
    fm_free(want);
    fm_free(got);
}

/* fm_ok_doc writes the common reply itself: it must be jansson's document
 * byte for byte, for values of every magnitude and sign (the halfway and
 * negative-zero cases, the edge of the direct path at a million, values
 * that are not finite) and for strings that need escaping, non-ASCII
 * names and repeated names (which take jansson's path). */
static void test_ok_doc_matches_jansson(void **state)
{
    (void)state;
    const char *names[] = {"viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct"};
    const char *at = "2026-12-04T17:30:00.123Z";
    static const float edge[] = {0.0f,         -0.0f,      0.0005f,    -0.0005f,   0.0015f,
                                 0.0004999f,   1.0f,       -1.0f,      10.0f,      999.9995f,
                                 123456.789f,  999999.9f,  999999.94f, 1000000.0f, -999999.9f,
                                 1e7f,         1.5e9f,     -3e12f,     FLT_MAX,    -FLT_MAX,
                                 1e-40f,       INFINITY,   -INFINITY,  NAN,        3.88f,
                                 15.86f,       45.123f,    2.0005f};
    size_t ne = sizeof edge / sizeof edge[0];
    for (size_t i = 0; i < ne; i++)
        for (size_t j = 0; j < ne; j += 7) {
            float v[3] = {edge[i], edge[j], edge[(i + j) % ne]};
            expect_same_doc("m-1", "viscosity@1.0.0", names, v, 3, at);
        }
    srand(20261204);
    for (int t = 0; t < 30000; t++) {
        float v[3];
        for (int k = 0; k < 3; k++) {
            double mag = pow(10.0, (double)(rand() % 14) - 5.0); /* 1e-5 .. 1e8 */
            v[k] = (float)((rand() / (double)RAND_MAX - 0.3) * mag);
        }
        expect_same_doc("m-000000123456", "viscosity@1.0.0", names, v, 3, at);
    }
    const float v[3] = {1.25f, 2.5f, 3.75f};
    const char *quoted[] = {"a\"b", "back\\slash", "tab\there"};
    const char *utf8[] = {"viscosit\xc3\xa9", "b", "c"};
    const char *twice[] = {"a", "b", "a"};
    expect_same_doc("m-1", "viscosity@1.0.0", quoted, v, 3, at);
    expect_same_doc("m-1", "viscosity@1.0.0", utf8, v, 3, at);
    expect_same_doc("m-1", "viscosity@1.0.0", twice, v, 3, at);
    expect_same_doc("m-\"1", "viscosity@1.0.0", names, v, 3, at);
    expect_same_doc("m-1", "viscosity@1.0.0", names, v, 0, at);
}

int main(void)
{
    /* Route jansson through the project allocator so allocation-failure
     * injection covers the JSON parser as well as the validator. */
    json_set_alloc_funcs(json_malloc_hook, fm_free);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_parses),
        cmocka_unit_test(test_valid_variants),
        cmocka_unit_test(test_valid_underflow_is_zero),
        cmocka_unit_test(test_wall_clock),
        cmocka_unit_test(test_field_errors),
        cmocka_unit_test(test_kind_before_unknown_fields),
        cmocka_unit_test(test_count_limits),
        cmocka_unit_test(test_meta_too_large),
        cmocka_unit_test(test_raw_errors),
        cmocka_unit_test(test_empty_payload),
        cmocka_unit_test(test_payload_size),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_huge_numbers),
        cmocka_unit_test(test_long_key_message),
        cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_peek_alloc_failures),
        cmocka_unit_test(test_peek_id),
        cmocka_unit_test(test_device_id),
        cmocka_unit_test(test_verrf),
        cmocka_unit_test(test_ok_doc),
        cmocka_unit_test(test_ok_doc_matches_jansson),
    };
    return cmocka_run_group_tests(tests, setup_clock, NULL);
}
