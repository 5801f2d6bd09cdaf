/*
 * Metrics rendering: the drift series per tenant and model version (label
 * escaping, updates in place, the oldest series making room when full) and
 * the Prometheus text format of the whole page.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/core.h"
#include "fleetml/metrics.h"

#include <stdio.h>
#include <string.h>

static char *render(void)
{
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(fm_metrics_render(fm_metrics_get(), &out, &len), 0);
    assert_int_equal(strlen(out), len);
    return out;
}

static void test_drift_series(void **state)
{
    (void)state;
    fm_metrics_drift_set("t1", "viscosity@1.0.0", 0.05);
    fm_metrics_drift_set("t2", "viscosity@2.0.0", 0.31);
    fm_metrics_drift_set("t1", "viscosity@1.0.0", 0.07); /* updated in place */
    fm_metrics_drift_set("we\"ird\\ten\nant", "m@1", 1.5);
    char *m = render();
    assert_non_null(strstr(m, "# TYPE fleetml_drift_psi gauge\n"));
    assert_non_null(strstr(m, "fleetml_drift_psi{tenant=\"t1\",model=\"viscosity@1.0.0\"} 0.07\n"));
    assert_null(strstr(m, "} 0.05\n"));
    assert_non_null(strstr(m, "fleetml_drift_psi{tenant=\"t2\",model=\"viscosity@2.0.0\"} 0.31\n"));
    assert_non_null(strstr(m, "fleetml_drift_psi{tenant=\"we\\\"ird\\\\ten\\nant\",model=\"m@1\"} 1.5\n"));
    fm_free(m);
    /* Full: the least recently set series go first: t2, t1, the escaped one. */
    char t[32];
    for (int i = 0; i < FM_DRIFT_SERIES; i++) { /* 3 + 64 series: 3 go */
        snprintf(t, sizeof t, "x%d", i);
        fm_metrics_drift_set(t, "m@1", i);
    }
    m = render();
    assert_null(strstr(m, "tenant=\"t1\""));
    assert_null(strstr(m, "tenant=\"t2\""));
    assert_null(strstr(m, "ird"));
    assert_non_null(strstr(m, "fleetml_drift_psi{tenant=\"x0\",model=\"m@1\"} 0\n"));
    snprintf(t, sizeof t, "tenant=\"x%d\"", FM_DRIFT_SERIES - 1);
    assert_non_null(strstr(m, t));
    size_t n = 0;
    for (const char *p = m; (p = strstr(p, "\nfleetml_drift_psi{")); p++)
        n++;
    assert_int_equal(n, FM_DRIFT_SERIES);
    fm_free(m);
}

/* Every sample line is `name[{labels}] value` and every name has a TYPE. */
static void test_page_format(void **state)
{
    (void)state;
    char *m = render();
    char *save = NULL;
    for (char *line = strtok_r(m, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#')
            continue;
        char name[128];
        assert_int_equal(sscanf(line, "%127[a-z_]", name), 1);
        assert_non_null(strrchr(line, ' '));
    }
    fm_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drift_series),
        cmocka_unit_test(test_page_format),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
