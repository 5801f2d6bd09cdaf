/*
 * Unit tests for the HTTP API's request readers, cursors and route table
 * (src/api/body.c, src/api/router.c). The HTTP behaviour itself is tested
 * black-box in tests/integration/test_4*_api_*.py.
 */
#include "fleetml/api.h"
#include "fleetml/auth.h"

#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static json_t *parse_ok(const char *text)
{
    json_t *doc = NULL;
    char msg[192] = "";
    assert_int_equal(fm_api_parse_body(text, strlen(text), &doc, msg, sizeof msg), 0);
    assert_non_null(doc);
    return doc;
}

static void test_parse_body(void **state)
{
    (void)state;
    const char *bad[] = {"", "[]", "\"x\"", "42", "{", "{\"a\":1}x", "{\"a\":1,\"a\":2}",
                         "{\"a\":\"\xff\"}", "null", "{\"a\":\"x\\u0000y\"}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *doc = (json_t *)1;
        char msg[192] = "";
        assert_int_equal(fm_api_parse_body(bad[i], strlen(bad[i]), &doc, msg, sizeof msg),
                         FM_EINVAL);
        assert_null(doc);
        assert_true(msg[0] != '\0');
    }
    /* NULL body and embedded NUL. */
    json_t *doc;
    char msg[192];
    assert_int_equal(fm_api_parse_body(NULL, 0, &doc, msg, sizeof msg), FM_EINVAL);
    assert_int_equal(fm_api_parse_body("{\"a\":1}\0", 8, &doc, msg, sizeof msg), FM_EINVAL);
    json_decref(parse_ok("{\"a\":1}"));
}

static void test_fields(void **state)
{
    (void)state;
    json_t *doc = parse_ok("{\"s\":\"ok\",\"empty\":\"\",\"ctl\":\"a\\u0001b\",\"num\":5,"
                           "\"big\":99999,\"f\":1.5,\"t\":true,\"n\":null,\"long\":\"abcdef\"}");
    char msg[192];
    const char *s = NULL;
    assert_int_equal(fm_api_get_str(doc, "s", true, 10, &s, msg, sizeof msg), 0);
    assert_string_equal(s, "ok");
    assert_int_equal(fm_api_get_str(doc, "empty", true, 10, &s, msg, sizeof msg), FM_EINVAL);
    assert_int_equal(fm_api_get_str(doc, "ctl", true, 10, &s, msg, sizeof msg), FM_EINVAL);
    assert_non_null(strstr(msg, "control"));
    assert_int_equal(fm_api_get_str(doc, "long", true, 5, &s, msg, sizeof msg), FM_EINVAL);
    assert_int_equal(fm_api_get_str(doc, "num", true, 5, &s, msg, sizeof msg), FM_EINVAL);
    assert_int_equal(fm_api_get_str(doc, "missing", true, 5, &s, msg, sizeof msg), FM_EINVAL);
    assert_non_null(strstr(msg, "'missing' is required"));
    s = "unchanged";
    assert_int_equal(fm_api_get_str(doc, "n", false, 5, &s, msg, sizeof msg), 0);
    assert_string_equal(s, "unchanged");

    long long v = 0;
    assert_int_equal(fm_api_get_int(doc, "num", true, 1, 10, &v, msg, sizeof msg), 0);
    assert_int_equal(v, 5);
    assert_int_equal(fm_api_get_int(doc, "big", true, 1, 10, &v, msg, sizeof msg), FM_EINVAL);
    assert_int_equal(fm_api_get_int(doc, "f", true, 1, 10, &v, msg, sizeof msg), FM_EINVAL);
    bool b = false;
    assert_int_equal(fm_api_get_bool(doc, "t", true, &b, msg, sizeof msg), 0);
    assert_true(b);
    assert_int_equal(fm_api_get_bool(doc, "num", true, &b, msg, sizeof msg), FM_EINVAL);
    json_decref(doc);
}

static void test_roles(void **state)
{
    (void)state;
    char msg[192];
    unsigned m = 0;
    json_t *doc = parse_ok("{\"r\":[\"clinician\",\"admin\"]}");
    assert_int_equal(fm_api_get_roles(doc, "r", &m, msg, sizeof msg), 0);
    assert_int_equal(m, FM_ROLE_ADMIN | FM_ROLE_CLINICIAN);
    json_decref(doc);
    const char *bad[] = {"{\"r\":[]}", "{\"r\":\"admin\"}", "{\"r\":[\"root\"]}",
                         "{\"r\":[\"admin\",\"admin\"]}", "{\"r\":[\"admin,clinician\"]}",
                         "{\"r\":[1]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        doc = parse_ok(bad[i]);
        assert_int_equal(fm_api_get_roles(doc, "r", &m, msg, sizeof msg), FM_EINVAL);
        json_decref(doc);
    }
}

static void test_label_outputs(void **state)
{
    (void)state;
    const char *names[] = {"viscosity_high_mpas", "hematocrit_pct"};
    char msg[192];
    json_t *doc = parse_ok("{\"o\":{\"hematocrit_pct\":44.5}}");
    assert_int_equal(fm_api_check_label_outputs(json_object_get(doc, "o"), names, 2, msg,
                                                sizeof msg),
                     0);
    json_decref(doc);
    const char *bad[] = {"{\"o\":{}}", "{\"o\":[]}", "{\"o\":{\"nope\":1}}",
                         "{\"o\":{\"hematocrit_pct\":\"44\"}}",
                         "{\"o\":{\"hematocrit_pct\":null}}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        doc = parse_ok(bad[i]);
        assert_int_equal(fm_api_check_label_outputs(json_object_get(doc, "o"), names, 2, msg,
                                                    sizeof msg),
                         FM_EINVAL);
        json_decref(doc);
    }
    assert_int_equal(fm_api_check_label_outputs(NULL, names, 2, msg, sizeof msg), FM_EINVAL);
}

static void test_cursor(void **state)
{
    (void)state;
    char enc[128], s[72];
    int64_t a, b;
    assert_int_equal(fm_api_cursor_encode(1795685837287, 42, "icu-1", enc, sizeof enc), 0);
    assert_int_equal(fm_api_cursor_decode(enc, &a, &b, s, sizeof s), 0);
    assert_int_equal(a, 1795685837287);
    assert_int_equal(b, 42);
    assert_string_equal(s, "icu-1");
    assert_int_equal(fm_api_cursor_encode(-1, 0, "", enc, sizeof enc), 0);
    assert_int_equal(fm_api_cursor_decode(enc, &a, &b, s, sizeof s), 0);
    assert_int_equal(a, -1);
    assert_string_equal(s, "");
    /* Made-up or altered cursors. */
    const char *bad[] = {"", "!!!", "abc", "MS4y", /* "1.2" (one dot) */
                         "YS5iLmM", /* "a.b.c" */
                         "MS4yLmEgYg", /* "1.2.a b" */
                         "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAuMS4"}; /* 20-digit number */
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fm_api_cursor_decode(bad[i], &a, &b, s, sizeof s), FM_EINVAL);
    /* Too small an output buffer is refused, not truncated. */
    assert_int_equal(fm_api_cursor_encode(1, 2, "x", enc, 4), FM_ERANGE);
    assert_int_equal(fm_api_cursor_encode(1, 2, "long-name", enc, sizeof enc), 0);
    assert_int_equal(fm_api_cursor_decode(enc, &a, &b, s, 4), FM_EINVAL);
}

/* Every route is unique, under /api/v1, and names a permission that some
 * role holds (or none / public): a typo in the table would otherwise deny
 * everyone silently. */
static void test_routes(void **state)
{
    (void)state;
    size_t n = fm_api_route_count();
    assert_true(n >= 20);
    const unsigned all = FM_ROLE_ADMIN | FM_ROLE_CLINICIAN | FM_ROLE_DATA_SCIENTIST |
                         FM_ROLE_DEVICE_MANAGER | FM_ROLE_OPERATOR;
    for (size_t i = 0; i < n; i++) {
        const fm_api_route_info *r = fm_api_route_at(i);
        assert_non_null(r);
        assert_int_equal(strncmp(r->path, "/api/v1/", 8), 0);
        if (r->action && strcmp(r->action, "public") != 0)
            assert_true(fm_auth_allowed(all, r->action));
        for (size_t j = 0; j < i; j++) {
            const fm_api_route_info *o = fm_api_route_at(j);
            assert_false(strcmp(o->method, r->method) == 0 && strcmp(o->path, r->path) == 0);
        }
    }
    assert_null(fm_api_route_at(n));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_body), cmocka_unit_test(test_fields),
        cmocka_unit_test(test_roles),      cmocka_unit_test(test_label_outputs),
        cmocka_unit_test(test_cursor),     cmocka_unit_test(test_routes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
