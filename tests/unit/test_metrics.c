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
/* Quantiles from the buckets, over everything or between two snapshots. */
static void test_hist_quantiles(void **state)
{
    (void)state;
    static const double bounds[FM_HIST_BUCKETS] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                                                   0.1,   0.2,   0.5,   1,    2,    5,
                                                   10,    20,    50,    100};
    static fm_hist h; /* zeroed: atomics start at 0 */
    h.bounds = bounds;
    assert_true(fm_hist_quantile(&h, 0.5) < 0); /* nothing observed */
    for (int i = 0; i < 98; i++)
        fm_hist_observe(&h, 0.0015); /* bucket <= 0.002 */
    fm_hist_observe(&h, 0.03);       /* <= 0.05 */
    fm_hist_observe(&h, 0.3);        /* <= 0.5, the largest */
    assert_true(fm_hist_quantile(&h, 0.5) == 0.002);
    assert_true(fm_hist_quantile(&h, 0.99) == 0.05);
    /* Never above the largest observation: the top bucket's bound is 0.5. */
    assert_true(fm_hist_quantile(&h, 1.0) == 0.3);
    fm_hist_snap a, b;
    fm_hist_snap_take(&h, &a);
    assert_int_equal(a.count, 100);
    assert_true(fm_hist_snap_quantile(&h, &a, &a, 0.5) < 0); /* an empty window */
    for (int i = 0; i < 10; i++)
        fm_hist_observe(&h, 0.008); /* <= 0.01 */
    fm_hist_snap_take(&h, &b);
    /* The window holds only the new observations; over all, p50 is still
     * the old ones'. */
    assert_true(fm_hist_snap_quantile(&h, &a, &b, 0.5) == 0.01);
    assert_true(fm_hist_snap_quantile(&h, &a, &b, 0.99) == 0.01);
    assert_true(fm_hist_snap_quantile(&h, NULL, &b, 0.5) == 0.002);
    fm_hist_observe(&h, 500); /* +Inf bucket: reads as the largest */
    fm_hist_snap_take(&h, &a);
    assert_true(fm_hist_snap_quantile(&h, &b, &a, 0.5) == 500);
}

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

/* The WAL checkpoint counters: one family, a series per path, and the
 * restarts, each with the counter's value. */
static void test_wal_series(void **state)
{
    (void)state;
    fm_metrics *mx = fm_metrics_get();
    atomic_store(&mx->wal_ckpt_background, 7);
    atomic_store(&mx->wal_ckpt_idle, 3);
    atomic_store(&mx->wal_ckpt_bound, 1);
    atomic_store(&mx->wal_restarts, 5);
    char *m = render();
    assert_non_null(strstr(m, "# TYPE fleetml_wal_checkpoints_total counter\n"));
    assert_non_null(strstr(m, "\nfleetml_wal_checkpoints_total{by=\"checkpointer\"} 7\n"));
    assert_non_null(strstr(m, "\nfleetml_wal_checkpoints_total{by=\"idle\"} 3\n"));
    assert_non_null(strstr(m, "\nfleetml_wal_checkpoints_total{by=\"bound\"} 1\n"));
    assert_non_null(strstr(m, "# TYPE fleetml_wal_restarts_total counter\n"));
    assert_non_null(strstr(m, "\nfleetml_wal_restarts_total 5\n"));
    fm_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drift_series),
        cmocka_unit_test(test_page_format),
        cmocka_unit_test(test_wal_series),
        cmocka_unit_test(test_hist_quantiles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
