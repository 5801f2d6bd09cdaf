/*
 * Synthetic training: the viscometer simulator draws patients and produces
 * the same JSON a device sends; each document goes through the production
 * validator and feature extractor, so training sees exactly what serving
 * will see. Everything that could vary between runs (seed, thread count,
 * tree method, timestamps) is pinned, which makes the output files a pure
 * function of (seed, n_train, n_holdout) and lets CI check the bundled model
 * by regenerating it.
 */
#include "fleetml/measurement.h"
#include "fleetml/model.h"
#include "fleetml/drift.h"
#include "fleetml/viscometer.h"

#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <xgboost/c_api.h>

#define N_LABELS 3
#define ROUNDS 100
/* Any fixed instant works; it only has to be in the past so the validator
 * accepts it, and fixed so the run is reproducible. */
#define TRAIN_TAKEN_AT_MS INT64_C(1767225600000) /* 2026-01-01T00:00:00Z */

static const struct {
    const char *name, *unit, *description;
    double min, max;
} outputs[N_LABELS] = {
    {"viscosity_high_mpas", "mPa*s",
     "apparent whole-blood viscosity at 300 1/s, normalised to 37 degC", 1.5, 12.0},
    {"viscosity_low_mpas", "mPa*s",
     "apparent whole-blood viscosity at 1 1/s, normalised to 37 degC", 2.5, 80.0},
    {"hematocrit_pct", "%", "estimated hematocrit (red-cell volume fraction)", 15.0, 70.0},
};

/* Booster parameters, in the order they are applied and recorded. */
static const char *const params[][2] = {
    {"objective", "reg:squarederror"},
    {"tree_method", "hist"},
    {"max_depth", "6"},
    {"eta", "0.15"},
    {"min_child_weight", "2"},
    {"subsample", "1"},
    {"lambda", "1"},
    {"max_bin", "256"},
    {"seed", "0"},
    {"nthread", "1"},
    {"verbosity", "1"},
};
#define N_PARAMS (sizeof params / sizeof params[0])

/* Simulates rows measurements into x (rows x nf) and y (rows x N_LABELS).
 * A draw the extractor rejects (possible in principle for an extreme
 * patient) is replaced by the next one, so the data set has no holes;
 * *rejected counts them for the log. */
static int simulate(fm_rng *rng, size_t rows, const char *prefix, float *x, float *y,
                    size_t *rejected, fm_errbuf *err)
{
    size_t nf = fm_feature_count();
    size_t attempts = 0;
    for (size_t i = 0; i < rows;) {
        fm_visc_truth t;
        char id[32], *json = NULL;
        size_t len = 0;
        fm_measurement m;
        fm_verr ve;
        if (++attempts > rows * 2 + 100)
            return fm_errf(err, FM_EMODEL, "simulator: too many rejected measurements (%zu)",
                           *rejected);
        fm_visc_draw_truth(rng, &t);
        snprintf(id, sizeof id, "%s-%06zu", prefix, i);
        if (fm_visc_measurement_json(rng, &t, id, "sim-1.0", TRAIN_TAKEN_AT_MS, &json, &len) != 0)
            return fm_errf(err, FM_ENOMEM, "out of memory");
        int rc = fm_measurement_parse(json, len, &m, &ve);
        fm_free(json);
        if (rc == FM_ENOMEM)
            return fm_errf(err, FM_ENOMEM, "out of memory");
        if (rc)
            return fm_errf(err, FM_EMODEL, "simulator produced an invalid measurement: %s: %s",
                           ve.code, ve.message);
        rc = fm_features_extract(&m, x + i * nf, &ve);
        fm_measurement_free(&m);
        if (rc) {
            (*rejected)++;
            continue;
        }
        y[i * N_LABELS + 0] = (float)t.viscosity_high_mpas;
        y[i * N_LABELS + 1] = (float)t.viscosity_low_mpas;
        y[i * N_LABELS + 2] = (float)t.hematocrit_pct;
        i++;
    }
    return 0;
}

int fm_model_probe_rows(float *x, size_t rows, fm_errbuf *err)
{
    fm_rng rng;
    fm_rng_seed(&rng, 0x70726f6265ull);
    float *y = fm_malloc((rows * N_LABELS + 1) * sizeof *y);
    if (!y)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    size_t rejected = 0;
    int rc = simulate(&rng, rows, "probe", x, y, &rejected, err);
    fm_free(y);
    return rc;
}

static int xgb_fail(fm_errbuf *err, const char *what)
{
    return fm_errf(err, FM_EMODEL, "xgboost %s: %s", what, XGBGetLastError());
}

/* A DMatrix of rows x features with a 2-D label (rows x N_LABELS). */
static int labelled_matrix(const float *x, const float *y, size_t rows, DMatrixHandle *d,
                           fm_errbuf *err)
{
    size_t nf = fm_feature_count();
    if (XGDMatrixCreateFromMat(x, (bst_ulong)rows, (bst_ulong)nf, NAN, d) != 0)
        return xgb_fail(err, "DMatrix");
    /* A 2-D label (rows x outputs) makes XGBoost 1.7 train a multi-target
     * regression: one tree per output per round, one model file. The
     * array-interface setter is the C API path that carries the shape;
     * XGDMatrixSetFloatInfo would flatten it into a single column. */
    char iface[256];
    snprintf(iface, sizeof iface,
             "{\"data\":[%" PRIuPTR ",true],\"shape\":[%zu,%d],\"typestr\":\"<f4\",\"version\":3}",
             (uintptr_t)y, rows, N_LABELS);
    if (XGDMatrixSetInfoFromInterface(*d, "label", iface) != 0) {
        XGDMatrixFree(*d);
        *d = NULL;
        return xgb_fail(err, "label");
    }
    return 0;
}

/* The validation RMSE XGBoost reports after a round ("[i]\tval-rmse:x"). */
static int eval_rmse(BoosterHandle h, int it, DMatrixHandle v, double *out, fm_errbuf *err)
{
    const char *names[] = {"val"};
    const char *res = NULL;
    if (XGBoosterEvalOneIter(h, it, &v, names, 1, &res) != 0)
        return xgb_fail(err, "eval");
    const char *p = res ? strstr(res, "val-rmse:") : NULL;
    if (!p)
        return fm_errf(err, FM_EMODEL, "xgboost eval: no val-rmse in '%s'", res ? res : "");
    *out = strtod(p + strlen("val-rmse:"), NULL);
    return 0;
}

int fm_model__train(const float *x, const float *y, size_t rows, const float *xv,
                    const float *yv, size_t vrows, int max_rounds, int patience,
                    void **booster, int *best_round, fm_errbuf *err)
{
    DMatrixHandle d = NULL, v = NULL;
    BoosterHandle h = NULL;
    int rc;
    *booster = NULL;
    if ((rc = labelled_matrix(x, y, rows, &d, err)) != 0)
        return rc;
    if (vrows && (rc = labelled_matrix(xv, yv, vrows, &v, err)) != 0)
        goto out;
    if (XGBoosterCreate(&d, 1, &h) != 0) {
        rc = xgb_fail(err, "booster");
        goto out;
    }
    for (size_t i = 0; i < N_PARAMS; i++) {
        if (XGBoosterSetParam(h, params[i][0], params[i][1]) != 0) {
            rc = xgb_fail(err, params[i][0]);
            goto out;
        }
    }
    /* Early stopping: the round with the best validation RMSE, stopping
     * after `patience` rounds without a better one; the trees after it are
     * cut off. */
    double best = INFINITY;
    int best_it = max_rounds - 1;
    for (int it = 0; it < max_rounds; it++) {
        if (XGBoosterUpdateOneIter(h, it, d) != 0) {
            rc = xgb_fail(err, "update");
            goto out;
        }
        if (!v)
            continue;
        double r = INFINITY;
        if ((rc = eval_rmse(h, it, v, &r, err)) != 0)
            goto out;
        if (r < best) {
            best = r;
            best_it = it;
        } else if (it - best_it >= patience) {
            break;
        }
    }
    if (v) {
        BoosterHandle cut = NULL;
        if (XGBoosterSlice(h, 0, best_it + 1, 1, &cut) != 0) {
            rc = xgb_fail(err, "slice");
            goto out;
        }
        XGBoosterFree(h);
        h = cut;
    }
    *best_round = best_it;
    *booster = h;
    h = NULL;
    rc = 0;
out:
    if (h)
        XGBoosterFree(h);
    XGDMatrixFree(d);
    if (v)
        XGDMatrixFree(v);
    return rc;
}

static int train_booster(const float *x, const float *y, size_t rows, BoosterHandle *out,
                         fm_errbuf *err)
{
    DMatrixHandle d = NULL;
    BoosterHandle h = NULL;
    int rc;
    *out = NULL;
    if ((rc = labelled_matrix(x, y, rows, &d, err)) != 0)
        return rc;
    if (XGBoosterCreate(&d, 1, &h) != 0) {
        rc = xgb_fail(err, "booster");
        goto out;
    }
    for (size_t i = 0; i < N_PARAMS; i++) {
        if (XGBoosterSetParam(h, params[i][0], params[i][1]) != 0) {
            rc = xgb_fail(err, params[i][0]);
            goto out;
        }
    }
    for (int it = 0; it < ROUNDS; it++) {
        if (XGBoosterUpdateOneIter(h, it, d) != 0) {
            rc = xgb_fail(err, "update");
            goto out;
        }
    }
    *out = h;
    h = NULL;
    rc = 0;
out:
    if (h)
        XGBoosterFree(h);
    XGDMatrixFree(d);
    return rc;
}

/* Builds manifest.json; metrics is NULL for the provisional manifest that
 * lets fm_model_load read the freshly written model back. */
static json_t *build_manifest(uint64_t seed, size_t n_train, const double (*metrics)[3],
                              size_t n_holdout, json_t *baseline)
{
    json_t *root = json_object(), *feats = json_array(), *outs = json_array();
    json_t *training = json_object(), *ps = json_object();
    if (!root || !feats || !outs || !training || !ps)
        goto err;
    json_object_set_new(root, "name", json_string("viscosity"));
    json_object_set_new(root, "version", json_string("1.0.0"));
    json_object_set_new(root, "kind", json_string(FM_MEAS_KIND_V1));
    for (size_t i = 0; i < fm_feature_count(); i++)
        json_array_append_new(feats, json_string(fm_feature_name(i)));
    json_object_set(root, "features", feats);
    for (size_t i = 0; i < N_LABELS; i++)
        json_array_append_new(outs, json_pack("{s:s,s:s,s:f,s:f,s:s}", "name", outputs[i].name,
                                              "unit", outputs[i].unit, "min", outputs[i].min,
                                              "max", outputs[i].max, "description",
                                              outputs[i].description));
    json_object_set(root, "outputs", outs);
    for (size_t i = 0; i < N_PARAMS; i++)
        json_object_set_new(ps, params[i][0], json_string(params[i][1]));
    json_object_set_new(ps, "num_boost_round", json_integer(ROUNDS));
    json_object_set_new(training, "source", json_string("synthetic"));
    json_object_set_new(training, "generator", json_string("fleetml viscometer simulator"));
    json_object_set_new(training, "seed", json_integer((json_int_t)seed));
    json_object_set_new(training, "rows", json_integer((json_int_t)n_train));
    json_object_set(training, "params", ps);
    json_object_set(root, "training", training);
    if (metrics) {
        json_t *hold = json_object(), *mm = json_object();
        json_object_set_new(hold, "rows", json_integer((json_int_t)n_holdout));
        for (size_t i = 0; i < N_LABELS; i++)
            json_object_set_new(mm, outputs[i].name,
                                json_pack("{s:f,s:f,s:f}", "rmse", metrics[i][0], "mae",
                                          metrics[i][1], "r2", metrics[i][2]));
        json_object_set_new(hold, "metrics", mm);
        json_object_set_new(root, "holdout", hold);
    }
    if (baseline)
        json_object_set(root, "feature_baseline", baseline);
    json_object_set_new(root, "created_by", json_string("fleetml model train --synthetic"));
    /* Every builder above returns NULL on allocation failure, which the
     * setters turn into a missing key; checking the finished document's
     * shape once is simpler than checking each call. */
    size_t want = (metrics ? 8 : 7) + (baseline ? 1 : 0);
    if (json_object_size(root) != want || json_array_size(feats) != fm_feature_count() ||
        json_array_size(outs) != N_LABELS)
        goto err;
    json_decref(feats);
    json_decref(outs);
    json_decref(training);
    json_decref(ps);
    return root;
err:
    json_decref(feats);
    json_decref(outs);
    json_decref(training);
    json_decref(ps);
    json_decref(root);
    return NULL;
}

static int write_json(const char *dir, const char *file, json_t *doc, fm_errbuf *err)
{
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, file) >= sizeof path)
        return fm_errf(err, FM_EINVAL, "%s: path too long", dir);
    /* Six significant digits keep metrics readable and, unlike the default
     * 17, do not leak last-bit noise into a file meant to be diffed. */
    char *s = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    size_t len = strlen(s);
    int rc = fm_write_file_atomic(path, s, len, 0644);
    free(s);
    if (rc)
        return fm_errf(err, rc, "%s: write failed: %s", path, fm_strerror(rc));
    return 0;
}

static int write_model(const char *dir, BoosterHandle h, fm_errbuf *err)
{
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/model.json", dir) >= sizeof path)
        return fm_errf(err, FM_EINVAL, "%s: path too long", dir);
    bst_ulong len = 0;
    const char *buf = NULL;
    if (XGBoosterSaveModelToBuffer(h, "{\"format\":\"json\"}", &len, &buf) != 0)
        return xgb_fail(err, "save");
    int rc = fm_write_file_atomic(path, buf, (size_t)len, 0644);
    if (rc)
        return fm_errf(err, rc, "%s: write failed: %s", path, fm_strerror(rc));
    return 0;
}

int fm_model_train_synthetic(const char *out_dir, uint64_t seed, size_t n_train,
                             size_t n_holdout, fm_errbuf *err)
{
    size_t nf = fm_feature_count();
    float *x = NULL, *y = NULL, *pred = NULL;
    BoosterHandle h = NULL;
    fm_model *model = NULL;
    json_t *man = NULL;
    size_t rejected = 0;
    int rc;

    if (n_train < 10 || n_train > 10000000 || n_holdout > 10000000)
        return fm_errf(err, FM_EINVAL, "rows: need 10..10000000 training rows, got %zu", n_train);
    size_t total = n_train + n_holdout;
    x = fm_calloc(total * nf, sizeof *x);
    y = fm_calloc(total * N_LABELS, sizeof *y);
    pred = fm_calloc(n_holdout ? n_holdout * N_LABELS : 1, sizeof *pred);
    if (!x || !y || !pred) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    if (fm_mkdirs(out_dir, 0755) != 0) {
        rc = fm_errf(err, FM_EIO, "%s: cannot create directory", out_dir);
        goto out;
    }

    /* Training and holdout come from separate streams derived from the
     * seed, so changing n_holdout does not change the training set. */
    fm_rng rng;
    fm_rng_seed(&rng, seed);
    if ((rc = simulate(&rng, n_train, "train", x, y, &rejected, err)) != 0)
        goto out;
    fm_rng_seed(&rng, seed ^ UINT64_C(0x686f6c646f7574)); /* "holdout" */
    if ((rc = simulate(&rng, n_holdout, "holdout", x + n_train * nf, y + n_train * N_LABELS,
                       &rejected, err)) != 0)
        goto out;
    if (rejected)
        fm_logf(FM_LOG_INFO, "model", "simulator: %zu measurements rejected by the extractor",
                rejected);

    if ((rc = train_booster(x, y, n_train, &h, err)) != 0)
        goto out;
    if ((rc = write_model(out_dir, h, err)) != 0)
        goto out;

    /* Holdout metrics are computed through fm_model_load/fm_model_predict
     * on the files just written, so they describe the artefact that will be
     * served, not the in-memory booster. */
    man = build_manifest(seed, n_train, NULL, 0, NULL);
    if (!man) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = write_json(out_dir, "manifest.json", man, err)) != 0)
        goto out;
    json_decref(man);
    man = NULL;
    if ((rc = fm_model_load(out_dir, &model, err)) != 0)
        goto out;
    if (n_holdout &&
        (rc = fm_model_predict(model, x + n_train * nf, n_holdout, pred, err)) != 0)
        goto out;

    double metrics[N_LABELS][3];
    for (size_t k = 0; k < N_LABELS; k++) {
        double se = 0, ae = 0, mean = 0, var = 0;
        const float *yt = y + n_train * N_LABELS;
        for (size_t i = 0; i < n_holdout; i++)
            mean += yt[i * N_LABELS + k];
        mean = n_holdout ? mean / (double)n_holdout : 0.0;
        for (size_t i = 0; i < n_holdout; i++) {
            double d = (double)pred[i * N_LABELS + k] - yt[i * N_LABELS + k];
            se += d * d;
            ae += fabs(d);
            var += (yt[i * N_LABELS + k] - mean) * (yt[i * N_LABELS + k] - mean);
        }
        double nh = n_holdout ? (double)n_holdout : 1.0;
        metrics[k][0] = sqrt(se / nh);
        metrics[k][1] = ae / nh;
        metrics[k][2] = var > 0 ? 1.0 - se / var : 0.0;
    }
    /* The drift baseline: quantile bins of the training features. */
    json_t *baseline = fm_drift_baseline_json(x, n_train);
    man = baseline ? build_manifest(seed, n_train, (const double (*)[3])metrics, n_holdout,
                                    baseline)
                   : NULL;
    json_decref(baseline);
    if (!man) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    rc = write_json(out_dir, "manifest.json", man, err);
out:
    json_decref(man);
    fm_model_free(model);
    if (h)
        XGBoosterFree(h);
    fm_free(pred);
    fm_free(y);
    fm_free(x);
    return rc;
}
