/*
 * Unit tests for the viscometer simulator and the feature extractor.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fleetml/measurement.h"
#include "fleetml/model.h"
#include "fleetml/viscometer.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#define TAKEN_AT INT64_C(1767225600000)

/* Simulates one measurement and parses it with the production validator. */
static void simulate(fm_rng *r, fm_visc_truth *t, fm_measurement *m)
{
    char *json = NULL;
    size_t len = 0;
    fm_verr ve;
    fm_visc_draw_truth(r, t);
    assert_int_equal(fm_visc_measurement_json(r, t, "sim-test", "fw-1", TAKEN_AT, &json, &len), 0);
    assert_non_null(json);
    assert_int_equal(len, strlen(json));
    int rc = fm_measurement_parse(json, len, m, &ve);
    if (rc)
        fail_msg("simulated measurement rejected: %s: %s", ve.code, ve.message);
    fm_free(json);
}

/* Builds a measurement document by hand: rates[i] with n samples of
 * torque[i] each (plus an optional per-sample override). */
static int parse_manual(const double *rates, const double *torque, size_t steps, size_t n,
                        fm_measurement *m, fm_verr *ve)
{
    char buf[65536];
    size_t off = 0;
    off += (size_t)snprintf(buf + off, sizeof buf - off,
                            "{\"id\":\"manual\",\"taken_at\":\"2026-01-01T00:00:00Z\","
                            "\"kind\":\"viscosity.sweep.v1\",\"temperature_c\":37.0,"
                            "\"firmware\":\"fw\",\"sweep\":[");
    for (size_t i = 0; i < steps; i++) {
        off += (size_t)snprintf(buf + off, sizeof buf - off, "%s{\"shear_rate_s\":%.17g,\"samples\":[",
                                i ? "," : "", rates[i]);
        for (size_t j = 0; j < n; j++)
            off += (size_t)snprintf(buf + off, sizeof buf - off, "%s%.17g", j ? "," : "",
                                    torque[i]);
        off += (size_t)snprintf(buf + off, sizeof buf - off, "]}");
    }
    off += (size_t)snprintf(buf + off, sizeof buf - off, "]}");
    assert_true(off < sizeof buf);
    return fm_measurement_parse(buf, off, m, ve);
}

/* Torque a Newtonian fluid of viscosity eta (mPa*s) produces at rate g. */
static double newtonian_torque(double eta, double g)
{
    double r = FM_VISC_CONE_RADIUS_M;
    return eta * 1e-3 * g * 2.0 * M_PI * r * r * r / 3.0 * 1e6;
}

static size_t feature_index(const char *name)
{
    for (size_t i = 0; i < fm_feature_count(); i++)
        if (strcmp(fm_feature_name(i), name) == 0)
            return i;
    fail_msg("no feature named %s", name);
    return 0;
}

static void test_feature_names(void **state)
{
    size_t n = fm_feature_count();
    assert_true(n >= 8 && n <= 16 && n <= FM_FEATURES_MAX);
    for (size_t i = 0; i < n; i++) {
        const char *a = fm_feature_name(i);
        assert_non_null(a);
        assert_true(strlen(a) > 0);
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(a, fm_feature_name(j));
    }
    assert_null(fm_feature_name(n));
    assert_null(fm_feature_name(SIZE_MAX));
    assert_string_equal(fm_feature_name(0), "temperature_c");
    (void)feature_index("log_visc_300_37c");
    (void)feature_index("log_visc_1_37c");
}

static void test_rng_determinism(void **state)
{
    fm_rng a, b;
    fm_rng_seed(&a, 42);
    fm_rng_seed(&b, 42);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(fm_rng_next(&a), fm_rng_next(&b));
    fm_rng_seed(&b, 43);
    assert_int_not_equal(fm_rng_next(&a), fm_rng_next(&b));
    double sum = 0, sq = 0;
    for (int i = 0; i < 20000; i++) {
        double u = fm_rng_uniform(&a);
        assert_true(u >= 0.0 && u < 1.0);
        double z = fm_rng_normal(&a, 0.0, 1.0);
        sum += z;
        sq += z * z;
    }
    assert_true(fabs(sum / 20000) < 0.05);
    assert_true(fabs(sq / 20000 - 1.0) < 0.05);
}

static void test_viscometer_determinism(void **state)
{
    char *j1 = NULL, *j2 = NULL, *j3 = NULL;
    size_t l1, l2, l3;
    fm_visc_truth t1, t2, t3;
    fm_rng a, b, c;
    fm_rng_seed(&a, 7);
    fm_rng_seed(&b, 7);
    fm_rng_seed(&c, 8);
    fm_visc_draw_truth(&a, &t1);
    fm_visc_draw_truth(&b, &t2);
    fm_visc_draw_truth(&c, &t3);
    assert_memory_equal(&t1, &t2, sizeof t1);
    assert_int_equal(fm_visc_measurement_json(&a, &t1, "d1", "fw", TAKEN_AT, &j1, &l1), 0);
    assert_int_equal(fm_visc_measurement_json(&b, &t2, "d1", "fw", TAKEN_AT, &j2, &l2), 0);
    assert_int_equal(fm_visc_measurement_json(&c, &t3, "d1", "fw", TAKEN_AT, &j3, &l3), 0);
    assert_int_equal(l1, l2);
    assert_string_equal(j1, j2);
    assert_string_not_equal(j1, j3);
    assert_non_null(strstr(j1, "\"kind\":\"viscosity.sweep.v1\""));
    assert_null(strchr(j1, '\n')); /* compact: one NDJSON line */
    fm_free(j1);
    fm_free(j2);
    fm_free(j3);
}

static void test_truth_physics(void **state)
{
    fm_rng r;
    fm_rng_seed(&r, 99);
    double sum_hct = 0, sum_hi = 0;
    int n = 5000;
    for (int i = 0; i < n; i++) {
        fm_visc_truth t;
        fm_visc_draw_truth(&r, &t);
        assert_true(t.hematocrit_pct >= 20.0 && t.hematocrit_pct <= 65.0);
        assert_true(t.plasma_mpas >= 1.10 && t.plasma_mpas <= 1.35);
        assert_true(t.viscosity_high_mpas > t.plasma_mpas);
        assert_true(t.viscosity_low_mpas > t.viscosity_high_mpas);
        /* The curve rebuilt from the record reproduces its labels. */
        assert_float_equal(fm_visc_true_viscosity(&t, 300, 37), t.viscosity_high_mpas,
                           1e-9 * t.viscosity_high_mpas);
        assert_float_equal(fm_visc_true_viscosity(&t, 1, 37), t.viscosity_low_mpas,
                           1e-9 * t.viscosity_low_mpas);
        /* Shear thinning: viscosity falls monotonically with rate. */
        double prev = INFINITY;
        for (double g = 0.5; g <= 1000; g *= 1.5) {
            double v = fm_visc_true_viscosity(&t, g, 37);
            assert_true(isfinite(v) && v < prev);
            prev = v;
        }
        /* About -2.5 % per degC. */
        double ratio = fm_visc_true_viscosity(&t, 100, 38) / fm_visc_true_viscosity(&t, 100, 37);
        assert_true(ratio > 0.97 && ratio < 0.98);
        sum_hct += t.hematocrit_pct;
        sum_hi += t.viscosity_high_mpas;
    }
    /* Population means in the textbook range. */
    assert_true(sum_hct / n > 38 && sum_hct / n < 46);
    assert_true(sum_hi / n > 3.3 && sum_hi / n < 4.5);
}

static void test_features_of_simulated_samples(void **state)
{
    fm_rng r;
    fm_rng_seed(&r, 12345);
    size_t nf = fm_feature_count();
    size_t i300 = feature_index("log_visc_300_37c"), i1 = feature_index("log_visc_1_37c");
    size_t islope = feature_index("powerlaw_slope"), itemp = feature_index("temperature_c");
    double worst_hi = 0, sum_lo = 0;
    int n = 300;
    for (int k = 0; k < n; k++) {
        fm_visc_truth t;
        fm_measurement m;
        fm_verr ve;
        float f[FM_FEATURES_MAX];
        simulate(&r, &t, &m);
        int rc = fm_features_extract(&m, f, &ve);
        if (rc)
            fail_msg("extract failed: %s: %s", ve.code, ve.message);
        for (size_t i = 0; i < nf; i++)
            assert_true(isfinite(f[i]));
        assert_float_equal(f[itemp], m.temperature_c, 1e-4);
        double rel_hi = fabs(exp(f[i300]) / t.viscosity_high_mpas - 1.0);
        double rel_lo = fabs(exp(f[i1]) / t.viscosity_low_mpas - 1.0);
        worst_hi = rel_hi > worst_hi ? rel_hi : worst_hi;
        sum_lo += rel_lo;
        assert_true(rel_hi < 0.15);
        assert_true(f[islope] < 0.0 && f[islope] > -1.0);
        fm_measurement_free(&m);
    }
    /* The low-shear point carries the transient and the absolute noise
     * floor, so it is judged on average rather than per sample. */
    assert_true(sum_lo / n < 0.15);
    assert_true(worst_hi < 0.15);
}

static void test_newtonian_fluid(void **state)
{
    /* A 4 mPa*s Newtonian oil at 37 degC: flat curve, zero slope. */
    const double rates[] = {1, 3, 10, 30, 100, 300};
    double torque[6];
    for (int i = 0; i < 6; i++)
        torque[i] = newtonian_torque(4.0, rates[i]);
    fm_measurement m;
    fm_verr ve;
    float f[FM_FEATURES_MAX];
    assert_int_equal(parse_manual(rates, torque, 6, 5, &m, &ve), 0);
    assert_int_equal(fm_features_extract(&m, f, &ve), 0);
    for (int i = 1; i <= 6; i++)
        assert_float_equal(f[i], log(4.0), 1e-5);
    assert_float_equal(f[feature_index("powerlaw_slope")], 0.0, 1e-5);
    assert_float_equal(f[feature_index("casson_visc_mpas")], 4.0, 1e-3);
    assert_float_equal(f[feature_index("noise_rel")], 0.0, 1e-9);
    fm_measurement_free(&m);
}

/* Medians (of the steady half of each step, and of the noise over steps)
 * on even counts and in every order: the steady samples are the torque
 * times {0.9, 1.0, 1.1, 1.2} shuffled differently per step, so the median
 * is 1.05 times the torque and the scaled MAD is 0.1 * 1.4826 / 1.05. */
static void test_median_exact(void **state)
{
    (void)state;
    const double rates[] = {1, 3, 10, 30, 100, 300};
    static const double perm[6][4] = {{0.9, 1.0, 1.1, 1.2}, {1.2, 1.1, 1.0, 0.9},
                                      {1.1, 0.9, 1.2, 1.0}, {1.0, 1.2, 0.9, 1.1},
                                      {1.2, 0.9, 1.0, 1.1}, {0.9, 1.2, 1.1, 1.0}};
    double buf[6 * 8];
    fm_measurement m;
    memset(&m, 0, sizeof m);
    snprintf(m.id, sizeof m.id, "median");
    m.temperature_c = 37.0;
    m.n_steps = 6;
    for (size_t i = 0; i < 6; i++) {
        double t = newtonian_torque(4.0, rates[i]);
        for (size_t j = 0; j < 4; j++) {
            buf[i * 8 + j] = t * 3.0; /* start-up transient: ignored */
            buf[i * 8 + 4 + j] = t * perm[i][j];
        }
        m.steps[i] = (fm_sweep_step){rates[i], buf + i * 8, 8};
    }
    fm_verr ve;
    float f[FM_FEATURES_MAX];
    assert_int_equal(fm_features_extract(&m, f, &ve), 0);
    for (int i = 1; i <= 6; i++)
        assert_float_equal(f[i], log(4.0 * 1.05), 1e-5);
    assert_float_equal(f[feature_index("noise_rel")], 0.1 * 1.4826 / 1.05, 1e-5);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median by sorting, the definition the extractor must match. */
static double sorted_median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The noise feature is a median (over steps) of MADs over medians (of each
 * step's steady half), so it pins every median the extractor takes. Random
 * steps of 1..80 samples (odd and even halves, both sort paths) drawn from
 * 21 levels (many ties) must give exactly what sorting gives. */
static void test_medians_match_sorting(void **state)
{
    (void)state;
    const double rates[] = {1, 3, 10, 30, 100, 300};
    enum { STEPS = 6, MAXN = 80 };
    static double buf[STEPS * MAXN];
    fm_rng r;
    fm_rng_seed(&r, 2026);
    for (int trial = 0; trial < 500; trial++) {
        fm_measurement m;
        memset(&m, 0, sizeof m);
        snprintf(m.id, sizeof m.id, "medians");
        m.temperature_c = 37.0;
        m.n_steps = STEPS;
        double noise[STEPS];
        for (size_t i = 0; i < STEPS; i++) {
            size_t n = 1 + (size_t)(fm_rng_uniform(&r) * MAXN);
            double t = newtonian_torque(4.0, rates[i]), *s = buf + i * MAXN;
            for (size_t j = 0; j < n; j++)
                s[j] = t * (0.9 + 0.01 * (double)(int)(fm_rng_uniform(&r) * 21.0));
            m.steps[i] = (fm_sweep_step){rates[i], s, n};
            size_t half = (n + 1) / 2;
            double v[MAXN], dev[MAXN];
            memcpy(v, s + n - half, half * sizeof *v);
            double med = sorted_median(v, half);
            for (size_t j = 0; j < half; j++)
                dev[j] = fabs(s[n - half + j] - med);
            double mad = sorted_median(dev, half) * 1.4826;
            noise[i] = mad / fabs(med);
        }
        float want = (float)sorted_median(noise, STEPS);
        fm_verr ve;
        float f[FM_FEATURES_MAX];
        assert_int_equal(fm_features_extract(&m, f, &ve), 0);
        if (f[feature_index("noise_rel")] != want)
            fail_msg("trial %d: noise_rel %.9g, sorting gives %.9g", trial,
                     (double)f[feature_index("noise_rel")], (double)want);
    }
}

/* Fills m by hand (bypassing the validator, which insists on strictly
 * increasing rates) so the extractor's own handling of any order can be
 * checked; samples live in buf. */
static void manual_struct(fm_measurement *m, double *buf, const double *rates, size_t steps,
                          double (*eta)(double))
{
    memset(m, 0, sizeof *m);
    snprintf(m->id, sizeof m->id, "manual");
    m->temperature_c = 37.0;
    m->n_steps = steps;
    for (size_t i = 0; i < steps; i++) {
        for (size_t j = 0; j < 4; j++)
            buf[i * 4 + j] = newtonian_torque(eta(rates[i]), rates[i]);
        m->steps[i] = (fm_sweep_step){rates[i], buf + i * 4, 4};
    }
}

static double thinning(double g) { return 10.0 / sqrt(g) + 3.0; }

static void test_order_and_duplicates(void **state)
{
    /* Sweeps reported high-to-low, or visiting a rate twice, describe the
     * same curve as the sorted sweep. */
    const double up[] = {1, 10, 100, 300};
    const double down[] = {300, 100, 10, 1, 10};
    double ba[16], bb[20];
    fm_measurement a, b;
    fm_verr ve;
    float fa[FM_FEATURES_MAX], fb[FM_FEATURES_MAX];
    manual_struct(&a, ba, up, 4, thinning);
    manual_struct(&b, bb, down, 5, thinning);
    assert_int_equal(fm_features_extract(&a, fa, &ve), 0);
    assert_int_equal(fm_features_extract(&b, fb, &ve), 0);
    for (size_t i = 0; i < fm_feature_count(); i++)
        assert_float_equal(fa[i], fb[i], 1e-5);
}

static void test_robust_to_spikes(void **state)
{
    fm_rng r;
    fm_rng_seed(&r, 2024);
    fm_visc_truth t;
    fm_measurement m;
    fm_verr ve;
    float f0[FM_FEATURES_MAX], f1[FM_FEATURES_MAX];
    simulate(&r, &t, &m);
    assert_int_equal(fm_features_extract(&m, f0, &ve), 0);
    /* One wild sample in the steady part of every step barely moves the
     * median-based features. */
    for (size_t i = 0; i < m.n_steps; i++) {
        size_t off = (size_t)(m.steps[i].samples - m.sample_buf);
        m.sample_buf[off + m.steps[i].n_samples - 2] *= 50.0;
    }
    assert_int_equal(fm_features_extract(&m, f1, &ve), 0);
    for (size_t i = 1; i <= 6; i++)
        assert_float_equal(f0[i], f1[i], 0.05);
    fm_measurement_free(&m);
}

static void test_out_of_range_coverage(void **state)
{
    const double rates[] = {5, 10, 50, 100, 300};
    double torque[5];
    for (int i = 0; i < 5; i++)
        torque[i] = newtonian_torque(4.0, rates[i]);
    fm_measurement m;
    fm_verr ve;
    float f[FM_FEATURES_MAX];
    assert_int_equal(parse_manual(rates, torque, 5, 4, &m, &ve), 0);
    memset(&ve, 0, sizeof ve);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_string_equal(ve.code, FM_VERR_OUT_OF_RANGE);
    assert_non_null(strstr(ve.message, "1..300"));
    assert_non_null(strstr(ve.message, "got 5..300"));
    fm_measurement_free(&m);

    const double low[] = {1, 2, 5, 10, 100, 200};
    double t6[6];
    for (int i = 0; i < 6; i++)
        t6[i] = newtonian_torque(4.0, low[i]);
    assert_int_equal(parse_manual(low, t6, 6, 4, &m, &ve), 0);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_non_null(strstr(ve.message, "got 1..200"));
    fm_measurement_free(&m);
}

static void test_out_of_range_few_rates(void **state)
{
    const double rates[] = {1, 300, 1, 300, 300};
    double buf[20];
    fm_measurement m;
    fm_verr ve;
    float f[FM_FEATURES_MAX];
    manual_struct(&m, buf, rates, 5, thinning);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_string_equal(ve.code, "out_of_range");
    assert_non_null(strstr(ve.message, "distinct shear rates"));

    /* Three valid, increasing rates still pass the validator but are too
     * few for the fits. */
    const double three[] = {1, 20, 300};
    double torque[3];
    for (int i = 0; i < 3; i++)
        torque[i] = newtonian_torque(thinning(three[i]), three[i]);
    assert_int_equal(parse_manual(three, torque, 3, 4, &m, &ve), 0);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_non_null(strstr(ve.message, "got 3"));
    fm_measurement_free(&m);
}

static void test_out_of_range_torque(void **state)
{
    const double rates[] = {1, 10, 100, 300};
    double torque[4];
    for (int i = 0; i < 4; i++)
        torque[i] = newtonian_torque(4.0, rates[i]);
    torque[2] = -0.5; /* a sensor with a wrong zero reads negative */
    fm_measurement m;
    fm_verr ve;
    float f[FM_FEATURES_MAX];
    assert_int_equal(parse_manual(rates, torque, 4, 6, &m, &ve), 0);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_string_equal(ve.code, "out_of_range");
    assert_non_null(strstr(ve.message, "sweep[2]"));
    assert_non_null(strstr(ve.message, "not positive"));
    fm_measurement_free(&m);

    torque[2] = newtonian_torque(5000.0, rates[2]); /* a clot: implausibly thick */
    assert_int_equal(parse_manual(rates, torque, 4, 6, &m, &ve), 0);
    assert_int_equal(fm_features_extract(&m, f, &ve), FM_ERANGE);
    assert_non_null(strstr(ve.message, "sweep[2]"));
    assert_non_null(strstr(ve.message, "plausible"));
    fm_measurement_free(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_feature_names),
        cmocka_unit_test(test_rng_determinism),
        cmocka_unit_test(test_viscometer_determinism),
        cmocka_unit_test(test_truth_physics),
        cmocka_unit_test(test_features_of_simulated_samples),
        cmocka_unit_test(test_newtonian_fluid),
        cmocka_unit_test(test_order_and_duplicates),
        cmocka_unit_test(test_robust_to_spikes),
        cmocka_unit_test(test_median_exact),
        cmocka_unit_test(test_medians_match_sorting),
        cmocka_unit_test(test_out_of_range_coverage),
        cmocka_unit_test(test_out_of_range_few_rates),
        cmocka_unit_test(test_out_of_range_torque),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
