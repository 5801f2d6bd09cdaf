/*
 * Unit tests for the XGBoost runtime and synthetic training: the bundled
 * model loads and is accurate on fresh simulated samples, bad model
 * directories fail cleanly, and training is reproducible to the byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fleetml/measurement.h"
#include "fleetml/model.h"
#include "fleetml/drift.h"
#include "fleetml/viscometer.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TAKEN_AT INT64_C(1767225600000)

static char bundled[4096];

/* The bundled model is found through FM_SOURCE_DIR (set by ctest); run by
 * hand from the source tree, the current directory works too. */
static int setup(void **state)
{
    const char *src = getenv("FM_SOURCE_DIR");
    snprintf(bundled, sizeof bundled, "%s/models/viscosity", src ? src : ".");
    return 0;
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/fm-test-model-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return fm_strdup(d);
}

static void path_of(char *buf, size_t len, const char *dir, const char *file)
{
    int n = snprintf(buf, len, "%s/%s", dir, file);
    assert_true(n > 0 && (size_t)n < len);
}

static void rm_dir(char *dir)
{
    static const char *const files[] = {"manifest.json", "model.json"};
    char p[4096];
    for (size_t i = 0; i < 2; i++) {
        path_of(p, sizeof p, dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
    fm_free(dir);
}

static void write_text(const char *dir, const char *file, const char *text)
{
    char p[4096];
    path_of(p, sizeof p, dir, file);
    assert_int_equal(fm_write_file_atomic(p, text, strlen(text), 0644), 0);
}

static void test_load_bundled(void **state)
{
    fm_model *m = NULL;
    fm_errbuf err;
    int rc = fm_model_load(bundled, &m, &err);
    if (rc)
        fail_msg("load %s: %s", bundled, err.msg);
    assert_string_equal(fm_model_name(m), "viscosity");
    assert_string_equal(fm_model_version(m), "1.0.0");
    assert_int_equal(fm_model_output_count(m), 3);
    assert_string_equal(fm_model_output_at(m, 0)->name, "viscosity_high_mpas");
    assert_string_equal(fm_model_output_at(m, 1)->name, "viscosity_low_mpas");
    assert_string_equal(fm_model_output_at(m, 2)->name, "hematocrit_pct");
    assert_string_equal(fm_model_output_at(m, 2)->unit, "%");
    assert_true(fm_model_output_at(m, 2)->min < 20 && fm_model_output_at(m, 2)->max > 65);
    assert_null(fm_model_output_at(m, 3));
    fm_model_free(m);
}

/* Contributions plus the bias add up to the prediction, for every output
 * of realistic rows; and loading from memory refuses what it must. */
static void test_contributions_add_up(void **state)
{
    (void)state;
    fm_model *m = NULL;
    fm_errbuf err;
    assert_int_equal(fm_model_load(bundled, &m, &err), 0);
    size_t nf = fm_feature_count(), no = fm_model_output_count(m);
    float x[8 * FM_FEATURES_MAX], y[8 * FM_OUTPUTS_MAX], c[FM_OUTPUTS_MAX * (FM_FEATURES_MAX + 1)];
    assert_int_equal(fm_model_probe_rows(x, 8, &err), 0);
    assert_int_equal(fm_model_predict(m, x, 8, y, &err), 0);
    for (size_t r = 0; r < 8; r++) {
        if (fm_model_contributions(m, x + r * nf, c, &err) != 0)
            fail_msg("contributions: %s", err.msg);
        for (size_t o = 0; o < no; o++) {
            double sum = 0;
            bool some = false;
            for (size_t f = 0; f <= nf; f++) {
                sum += c[o * (nf + 1) + f];
                some |= f < nf && c[o * (nf + 1) + f] != 0.0f;
            }
            assert_true(some);
            if (fabs(sum - y[r * no + o]) > 1e-3 * (1 + fabs(y[r * no + o])))
                fail_msg("row %zu output %zu: contributions sum %g, prediction %g", r, o, sum,
                         (double)y[r * no + o]);
        }
    }
    fm_model_free(m);
}

/* The bundled model carries a baseline; the simulator's population scores
 * a low PSI against it and a shifted one a high PSI. */
static void test_drift_psi(void **state)
{
    (void)state;
    fm_model *m = NULL;
    fm_errbuf err;
    assert_int_equal(fm_model_load(bundled, &m, &err), 0);
    assert_true(fm_model_has_baseline(m));
    size_t nf = fm_feature_count();
    enum { N = 400 };
    float *x = malloc(N * nf * sizeof *x);
    assert_int_equal(fm_model_probe_rows(x, N, &err), 0);
    fm_drift_counts c;
    memset(&c, 0, sizeof c);
    for (size_t r = 0; r < N; r++, c.n++)
        for (size_t f = 0; f < nf; f++)
            c.counts[f][fm_model_bin(m, f, x[r * nf + f])]++;
    double psi[FM_FEATURES_MAX];
    size_t worst;
    double same = fm_drift_psi_all(m, &c, psi, &worst);
    assert_true(same < 0.1);
    /* Everything in one bin: far from a 10-bin baseline. */
    uint64_t one[FM_DRIFT_BINS] = {[3] = 100};
    double e[FM_DRIFT_BINS];
    for (int b = 0; b < FM_DRIFT_BINS; b++)
        e[b] = 0.1;
    assert_true(fm_drift_psi(e, one, 100) > 1.0);
    uint64_t flat[FM_DRIFT_BINS] = {10, 10, 10, 10, 10, 10, 10, 10, 10, 10};
    assert_true(fm_drift_psi(e, flat, 100) < 1e-9);
    assert_true(fm_drift_psi(e, flat, 0) == 0.0);
    free(x);
    fm_model_free(m);
}

/* n simulator sweeps drawn from seed, their truths into truth[i] and
 * their features into x (row stride fm_feature_count()). */
static void fresh_features(uint64_t seed, size_t n, fm_visc_truth *truth, float *x)
{
    size_t nf = fm_feature_count();
    fm_rng r;
    fm_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) {
        char *json;
        size_t len;
        fm_measurement meas;
        fm_verr ve;
        fm_visc_draw_truth(&r, &truth[i]);
        assert_int_equal(fm_visc_measurement_json(&r, &truth[i], "t", "fw", TAKEN_AT, &json, &len), 0);
        assert_int_equal(fm_measurement_parse(json, len, &meas, &ve), 0);
        fm_free(json);
        assert_int_equal(fm_features_extract(&meas, x + i * nf, &ve), 0);
        fm_measurement_free(&meas);
    }
}

/* Threads predicting at once, each row one by one through its thread's
 * proxy, get what one batch call gives for the same rows. */
typedef struct {
    fm_model *m;
    const float *x, *want;
    size_t first, n, nf;
    int mismatches;
} predict_job;

static void *predict_rows(void *arg)
{
    predict_job *j = arg;
    fm_errbuf err;
    for (int round = 0; round < 20; round++) {
        for (size_t i = j->first; i < j->first + j->n; i++) {
            float one[3];
            if (fm_model_predict(j->m, j->x + i * j->nf, 1, one, &err) != 0 ||
                memcmp(one, j->want + i * 3, sizeof one) != 0)
                j->mismatches++;
        }
    }
    return NULL;
}

static void test_predict_from_threads(void **state)
{
    (void)state;
    enum { N = 40, T = 4 };
    size_t nf = fm_feature_count();
    float *x = fm_calloc(N * nf, sizeof *x), *y = fm_calloc(N * 3, sizeof *y);
    fm_visc_truth truth[N];
    assert_non_null(x);
    assert_non_null(y);
    fresh_features(4242, N, truth, x);
    fm_model *m = NULL;
    fm_errbuf err;
    assert_int_equal(fm_model_load(bundled, &m, &err), 0);
    assert_int_equal(fm_model_predict(m, x, N, y, &err), 0);
    pthread_t th[T];
    predict_job jobs[T];
    for (int t = 0; t < T; t++) {
        jobs[t] = (predict_job){.m = m, .x = x, .want = y, .first = (size_t)t * (N / T),
                                .n = N / T, .nf = nf};
        assert_int_equal(pthread_create(&th[t], NULL, predict_rows, &jobs[t]), 0);
    }
    for (int t = 0; t < T; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(jobs[t].mismatches, 0);
    }
    fm_model_free(m);
    fm_free(x);
    fm_free(y);
}

static void test_predict_fresh_samples(void **state)
{
    enum { N = 300 };
    size_t nf = fm_feature_count();
    float *x = fm_calloc(N * nf, sizeof *x);
    float *y = fm_calloc(N * 3, sizeof *y);
    fm_visc_truth truth[N];
    assert_non_null(x);
    assert_non_null(y);
    /* A seed the bundled model was not trained on. */
    fresh_features(777, N, truth, x);
    fm_model *m = NULL;
    fm_errbuf err;
    assert_int_equal(fm_model_load(bundled, &m, &err), 0);
    assert_int_equal(fm_model_predict(m, x, N, y, &err), 0);
    double ae_hct = 0, re_hi = 0, re_lo = 0;
    for (size_t i = 0; i < N; i++) {
        ae_hct += fabs(y[i * 3 + 2] - truth[i].hematocrit_pct);
        re_hi += fabs(y[i * 3 + 0] / truth[i].viscosity_high_mpas - 1.0);
        re_lo += fabs(y[i * 3 + 1] / truth[i].viscosity_low_mpas - 1.0);
    }
    print_message("hematocrit MAE %.2f points, viscosity rel. error high %.3f low %.3f\n",
                  ae_hct / N, re_hi / N, re_lo / N);
    assert_true(ae_hct / N < 2.5);
    assert_true(re_hi / N < 0.05);
    assert_true(re_lo / N < 0.05);

    /* Batch and one-by-one predictions agree, and zero rows is a no-op. */
    for (size_t i = 0; i < 5; i++) {
        float one[3];
        assert_int_equal(fm_model_predict(m, x + i * nf, 1, one, &err), 0);
        assert_memory_equal(one, y + i * 3, sizeof one);
    }
    assert_int_equal(fm_model_predict(m, x, 0, y, &err), 0);
    fm_model_free(m);
    fm_free(x);
    fm_free(y);
}

static void test_load_missing_dir(void **state)
{
    fm_model *m = (fm_model *)0x1;
    fm_errbuf err;
    assert_int_equal(fm_model_load("/nonexistent/fleetml-model", &m, &err), FM_ENOTFOUND);
    assert_null(m);
    assert_non_null(strstr(err.msg, "manifest.json"));
}

/* Copies the bundled manifest into dir after applying one textual edit. */
static void manifest_with(const char *dir, const char *from, const char *to)
{
    char p[4096], *text = NULL;
    size_t len;
    path_of(p, sizeof p, bundled, "manifest.json");
    assert_int_equal(fm_read_file(p, &text, &len), 0);
    char *at = strstr(text, from);
    assert_non_null(at);
    size_t out_len = len - strlen(from) + strlen(to);
    char *out = fm_malloc(out_len + 1);
    assert_non_null(out);
    size_t head = (size_t)(at - text);
    memcpy(out, text, head);
    memcpy(out + head, to, strlen(to));
    strcpy(out + head + strlen(to), at + strlen(from));
    write_text(dir, "manifest.json", out);
    fm_free(out);
    fm_free(text);
}

static void link_model(const char *dir)
{
    char src[4096], dst[4096], abs_src[4096];
    path_of(src, sizeof src, bundled, "model.json");
    assert_non_null(realpath(src, abs_src));
    path_of(dst, sizeof dst, dir, "model.json");
    assert_int_equal(symlink(abs_src, dst), 0);
}

static void test_load_feature_mismatch(void **state)
{
    char *dir = make_tmpdir();
    link_model(dir);
    fm_model *m = NULL;
    fm_errbuf err;

    /* Renamed feature. */
    manifest_with(dir, "\"noise_rel\"", "\"noise_level\"");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EINVAL);
    assert_null(m);
    assert_non_null(strstr(err.msg, "features["));
    assert_non_null(strstr(err.msg, "noise_level"));

    /* Two features swapped. */
    manifest_with(dir, "\"log_visc_1_37c\",\n    \"log_visc_3_37c\"",
                  "\"log_visc_3_37c\",\n    \"log_visc_1_37c\"");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "features[1]"));

    /* One feature too many. */
    manifest_with(dir, "\"noise_rel\"", "\"noise_rel\", \"extra\"");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "extra"));

    /* Malformed JSON. */
    write_text(dir, "manifest.json", "{\"name\": ");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "manifest.json"));

    /* No outputs. */
    manifest_with(dir, "\"outputs\"", "\"outputs_old\"");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "outputs"));

    /* The unmodified manifest loads from the copy. */
    manifest_with(dir, "\"viscosity\"", "\"viscosity\"");
    assert_int_equal(fm_model_load(dir, &m, &err), 0);
    fm_model_free(m);
    rm_dir(dir);
}

static void test_load_bad_model_file(void **state)
{
    char *dir = make_tmpdir();
    fm_model *m = NULL;
    fm_errbuf err;
    manifest_with(dir, "\"viscosity\"", "\"viscosity\"");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_ENOTFOUND);
    assert_non_null(strstr(err.msg, "model.json"));

    write_text(dir, "model.json", "{\"not\": \"a booster\"}");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EMODEL);
    assert_null(m);

    /* A manifest claiming more outputs than the booster has. */
    char p[4096];
    path_of(p, sizeof p, dir, "model.json");
    unlink(p);
    link_model(dir);
    manifest_with(dir, "\"outputs\": [",
                  "\"outputs\": [{\"name\":\"x\",\"unit\":\"u\",\"min\":0,\"max\":1},");
    assert_int_equal(fm_model_load(dir, &m, &err), FM_EMODEL);
    assert_non_null(strstr(err.msg, "shape"));
    rm_dir(dir);
}

static void test_load_alloc_failures(void **state)
{
    /* Every allocation failure inside fm_model_load is reported, not
     * crashed on, and leaves nothing behind (ASan's leak check runs at
     * exit). */
    int ok = 0;
    for (long n = 0; n < 50 && !ok; n++) {
        fm_model *m = NULL;
        fm_errbuf err;
        fm_alloc_fail_after(n);
        int rc = fm_model_load(bundled, &m, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            ok = 1;
            fm_model_free(m);
        } else {
            assert_int_equal(rc, FM_ENOMEM);
            assert_null(m);
        }
    }
    assert_true(ok);
}

static void test_train_reproducible(void **state)
{
    char *a = make_tmpdir(), *b = make_tmpdir();
    fm_errbuf err;
    int rc = fm_model_train_synthetic(a, 5, 60, 20, &err);
    if (rc)
        fail_msg("train: %s", err.msg);
    assert_int_equal(fm_model_train_synthetic(b, 5, 60, 20, &err), 0);
    static const char *const files[] = {"manifest.json", "model.json"};
    for (size_t i = 0; i < 2; i++) {
        char pa[4096], pb[4096], *ta, *tb;
        size_t la, lb;
        path_of(pa, sizeof pa, a, files[i]);
        path_of(pb, sizeof pb, b, files[i]);
        assert_int_equal(fm_read_file(pa, &ta, &la), 0);
        assert_int_equal(fm_read_file(pb, &tb, &lb), 0);
        assert_int_equal(la, lb);
        assert_memory_equal(ta, tb, la);
        if (i == 0) {
            assert_non_null(strstr(ta, "\"seed\": 5"));
            assert_non_null(strstr(ta, "\"holdout\""));
            assert_null(strstr(ta, "\"taken_at\""));
        }
        fm_free(ta);
        fm_free(tb);
    }
    fm_model *m = NULL;
    assert_int_equal(fm_model_load(a, &m, &err), 0);
    assert_int_equal(fm_model_output_count(m), 3);
    fm_model_free(m);

    /* A different seed gives a different model. */
    assert_int_equal(fm_model_train_synthetic(b, 6, 60, 20, &err), 0);
    char pa[4096], pb[4096], *ta, *tb;
    size_t la, lb;
    path_of(pa, sizeof pa, a, "model.json");
    path_of(pb, sizeof pb, b, "model.json");
    assert_int_equal(fm_read_file(pa, &ta, &la), 0);
    assert_int_equal(fm_read_file(pb, &tb, &lb), 0);
    assert_true(la != lb || memcmp(ta, tb, la) != 0);
    fm_free(ta);
    fm_free(tb);

    assert_int_equal(fm_model_train_synthetic(b, 6, 3, 0, &err), FM_EINVAL);
    rm_dir(a);
    rm_dir(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_bundled),
        cmocka_unit_test(test_predict_fresh_samples),
        cmocka_unit_test(test_predict_from_threads),
        cmocka_unit_test(test_contributions_add_up),
        cmocka_unit_test(test_drift_psi),
        cmocka_unit_test(test_load_missing_dir),
        cmocka_unit_test(test_load_feature_mismatch),
        cmocka_unit_test(test_load_bad_model_file),
        cmocka_unit_test(test_load_alloc_failures),
        cmocka_unit_test(test_train_reproducible),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
