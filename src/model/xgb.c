/*
 * XGBoost runtime: loads a model directory (manifest.json + model.json) and
 * predicts in place from a dense float matrix. Serving calls
 * fm_model_predict once per batch, so the per-call work is limited to
 * formatting one array-interface string; no DMatrix is built per request.
 *
 * Each model keeps one DMatrix proxy (XGProxyDMatrixCreate) and hands it to
 * its in-place predictions. Without one, XGBoost 1.7 builds a proxy per
 * call, and the proxy's context reads the cgroup CPU quota files (two opens
 * and reads): 29 of the 49 us a one-row prediction cost. The proxy holds
 * the call's array interface, so one call at a time uses it: a call that
 * finds it taken (another thread predicting with the same model) does not
 * wait but goes without, as before. (Not one per thread: a thread-exit
 * destructor that frees a proxy re-registers XGBoost's thread-local state
 * after the thread's C++ destructors have run, and leaks it.)
 */
#include "fleetml/model.h"

#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <xgboost/c_api.h>

struct fm_model {
    BoosterHandle booster;
    DMatrixHandle proxy;      /* NULL if it could not be made */
    pthread_mutex_t proxy_mu; /* held by the call using proxy */
    char name[64];
    char version[32];
    size_t n_features;
    size_t n_outputs;
    fm_model_output outputs[FM_OUTPUTS_MAX];
    bool has_baseline;
    float edges[FM_FEATURES_MAX][FM_DRIFT_BINS - 1];
    double fractions[FM_FEATURES_MAX][FM_DRIFT_BINS];
};

/* Reads the optional drift baseline (see fm_model_has_baseline). */
static int parse_baseline(fm_model *m, json_t *root, fm_errbuf *err)
{
    json_t *b = json_object_get(root, "feature_baseline");
    if (!b)
        return 0;
    json_t *edges = json_object_get(b, "edges"), *fr = json_object_get(b, "fractions");
    if (!json_is_object(edges) || !json_is_object(fr))
        return fm_errf(err, FM_EINVAL, "manifest.json: feature_baseline needs edges and fractions");
    for (size_t f = 0; f < m->n_features; f++) {
        const char *name = fm_feature_name(f);
        json_t *e = json_object_get(edges, name), *p = json_object_get(fr, name);
        if (json_array_size(e) != FM_DRIFT_BINS - 1 || json_array_size(p) != FM_DRIFT_BINS)
            return fm_errf(err, FM_EINVAL,
                           "manifest.json: feature_baseline: '%s' needs %d edges and %d fractions",
                           name, FM_DRIFT_BINS - 1, FM_DRIFT_BINS);
        double sum = 0;
        for (size_t i = 0; i < FM_DRIFT_BINS; i++) {
            json_t *pv = json_array_get(p, i);
            double v = json_number_value(pv);
            if (!json_is_number(pv) || !(v >= 0 && v <= 1))
                return fm_errf(err, FM_EINVAL, "manifest.json: feature_baseline: '%s': fractions "
                               "must be numbers in 0..1", name);
            m->fractions[f][i] = v;
            sum += v;
            if (i + 1 == FM_DRIFT_BINS)
                continue;
            json_t *ev = json_array_get(e, i);
            double x = json_number_value(ev);
            if (!json_is_number(ev) || !isfinite(x) || (i && !(x >= m->edges[f][i - 1])))
                return fm_errf(err, FM_EINVAL, "manifest.json: feature_baseline: '%s': edges must "
                               "be finite and non-decreasing", name);
            m->edges[f][i] = (float)x;
        }
        if (fabs(sum - 1.0) > 0.01)
            return fm_errf(err, FM_EINVAL, "manifest.json: feature_baseline: '%s': fractions sum "
                           "to %g, not 1", name, sum);
    }
    m->has_baseline = true;
    return 0;
}

/* Prediction options, the same for every call. "missing" is NaN so a
 * feature a future extractor cannot compute goes down the trees' default
 * branch instead of being read as a number; strict_shape makes the result
 * (rows, outputs) even for a single-output model. */
static const char predict_config[] =
    "{\"type\":0,\"training\":false,\"cache_id\":0,\"iteration_begin\":0,\"iteration_end\":0,"
    "\"strict_shape\":true,\"missing\":NaN}";

static int copy_str(json_t *obj, const char *key, char *dst, size_t cap, const char *what,
                    fm_errbuf *err)
{
    const char *s = json_string_value(json_object_get(obj, key));
    if (!s || !*s || strlen(s) >= cap)
        return fm_errf(err, FM_EINVAL, "manifest.json: %s: expected a non-empty string of at most %zu chars",
                       what, cap - 1);
    memcpy(dst, s, strlen(s) + 1);
    return 0;
}

static int parse_manifest(fm_model *m, const char *text, size_t len, fm_errbuf *err)
{
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return fm_errf(err, FM_EINVAL, "manifest.json: line %d: %s", je.line, je.text);
    int rc;
    if (!json_is_object(root)) {
        rc = fm_errf(err, FM_EINVAL, "manifest.json: expected a JSON object");
        goto out;
    }
    if ((rc = copy_str(root, "name", m->name, sizeof m->name, "name", err)) ||
        (rc = copy_str(root, "version", m->version, sizeof m->version, "version", err)))
        goto out;

    /* The feature list is the contract between this build's extractor and
     * the trees: a model trained on other features (or another order)
     * would silently predict garbage, so any difference refuses the load. */
    json_t *feats = json_object_get(root, "features");
    size_t nf = fm_feature_count();
    if (!json_is_array(feats)) {
        rc = fm_errf(err, FM_EINVAL, "manifest.json: features: expected an array of names");
        goto out;
    }
    for (size_t i = 0; i < nf || i < json_array_size(feats); i++) {
        const char *have = json_string_value(json_array_get(feats, i));
        const char *want = fm_feature_name(i);
        if (!have || !want || strcmp(have, want) != 0) {
            rc = fm_errf(err, FM_EINVAL,
                         "manifest.json: features[%zu] is %s%s%s but this build computes %s%s%s "
                         "(retrain the model with `fleetml model train`)",
                         i, have ? "'" : "", have ? have : "nothing", have ? "'" : "",
                         want ? "'" : "", want ? want : "nothing", want ? "'" : "");
            goto out;
        }
    }
    m->n_features = nf;

    json_t *outs = json_object_get(root, "outputs");
    size_t no = json_array_size(outs);
    if (!json_is_array(outs) || no == 0 || no > FM_OUTPUTS_MAX) {
        rc = fm_errf(err, FM_EINVAL, "manifest.json: outputs: expected an array of 1..%d outputs",
                     FM_OUTPUTS_MAX);
        goto out;
    }
    for (size_t i = 0; i < no; i++) {
        json_t *o = json_array_get(outs, i);
        fm_model_output *dst = &m->outputs[i];
        char what[32];
        snprintf(what, sizeof what, "outputs[%zu]", i);
        json_t *mn = json_object_get(o, "min"), *mx = json_object_get(o, "max");
        if ((rc = copy_str(o, "name", dst->name, sizeof dst->name, what, err)) ||
            (rc = copy_str(o, "unit", dst->unit, sizeof dst->unit, what, err)))
            goto out;
        if (!json_is_number(mn) || !json_is_number(mx) ||
            !(json_number_value(mn) < json_number_value(mx))) {
            rc = fm_errf(err, FM_EINVAL, "manifest.json: %s: expected numbers min < max", what);
            goto out;
        }
        dst->min = json_number_value(mn);
        dst->max = json_number_value(mx);
    }
    m->n_outputs = no;
    rc = parse_baseline(m, root, err);
out:
    json_decref(root);
    return rc;
}

/* Rows of realistic features (the simulator's, fixed seed) every model
 * must score to finite numbers before it is served. */
#define PROBE_ROWS 16

int fm_model_load_mem(const char *manifest, size_t mlen, const void *file, size_t flen,
                      fm_model **out, fm_errbuf *err)
{
    *out = NULL;
    if (!manifest || !file || flen == 0)
        return fm_errf(err, FM_EINVAL, "model: empty manifest or model file");
    if (flen > (size_t)INT64_MAX)
        return fm_errf(err, FM_EINVAL, "model: file too large");
    fm_model *m = fm_calloc(1, sizeof *m);
    if (!m)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    pthread_mutex_init(&m->proxy_mu, NULL);
    if (XGProxyDMatrixCreate(&m->proxy) != 0)
        m->proxy = NULL;
    int rc = parse_manifest(m, manifest, mlen, err);
    if (rc)
        goto err;
    if (XGBoosterCreate(NULL, 0, &m->booster) != 0) {
        rc = fm_errf(err, FM_EMODEL, "xgboost: %s", XGBGetLastError());
        goto err;
    }
    /* One inference thread per service: letting OpenMP fan out inside
     * every small batch would oversubscribe the cores the broker and the
     * HTTP server share. XGBoost reads JSON and UBJSON model files here. */
    if (XGBoosterLoadModelFromBuffer(m->booster, file, (bst_ulong)flen) != 0 ||
        XGBoosterSetParam(m->booster, "nthread", "1") != 0) {
        rc = fm_errf(err, FM_EMODEL, "model file: %s", XGBGetLastError());
        goto err;
    }
    bst_ulong nf = 0;
    if (XGBoosterGetNumFeature(m->booster, &nf) != 0 || nf != m->n_features) {
        rc = fm_errf(err, FM_EMODEL, "model file: booster expects %" PRIu64
                     " features, manifest lists %zu", (uint64_t)nf, m->n_features);
        goto err;
    }
    /* A dry run checks that the booster's output width agrees with the
     * manifest and that it answers finite numbers, on an all-missing row and
     * on realistic ones, so a broken model fails here and not on the first
     * device request. */
    float probe_in[(PROBE_ROWS + 1) * FM_FEATURES_MAX], probe_out[(PROBE_ROWS + 1) * FM_OUTPUTS_MAX];
    for (size_t i = 0; i < m->n_features; i++)
        probe_in[i] = NAN;
    if ((rc = fm_model_probe_rows(probe_in + m->n_features, PROBE_ROWS, err)) != 0 ||
        (rc = fm_model_predict(m, probe_in, PROBE_ROWS + 1, probe_out, err)) != 0)
        goto err;
    for (size_t i = 0; i < (PROBE_ROWS + 1) * m->n_outputs; i++)
        if (!isfinite(probe_out[i])) {
            rc = fm_errf(err, FM_EMODEL, "model file: output '%s' is not a finite number on "
                         "the probe measurements", m->outputs[i % m->n_outputs].name);
            goto err;
        }
    *out = m;
    return 0;
err:
    fm_model_free(m);
    return rc;
}

/* Reads dir/name into *text (fm_free). */
static int read_in(const char *dir, const char *name, char **text, size_t *len, fm_errbuf *err)
{
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path)
        return fm_errf(err, FM_EINVAL, "%s: model directory path too long", dir);
    int rc = fm_read_file(path, text, len);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "%s: no such file (is %s a model directory?)", path, dir);
    if (rc)
        return fm_errf(err, rc, "%s: %s", path, fm_strerror(rc));
    return 0;
}

int fm_model_load(const char *dir, fm_model **out, fm_errbuf *err)
{
    char *manifest = NULL, *file = NULL;
    size_t mlen = 0, flen = 0;
    *out = NULL;
    int rc = read_in(dir, "manifest.json", &manifest, &mlen, err);
    if (!rc)
        rc = read_in(dir, "model.json", &file, &flen, err);
    if (!rc)
        rc = fm_model_load_mem(manifest, mlen, file, flen, out, err);
    fm_free(manifest);
    fm_free(file);
    return rc;
}

void fm_model_free(fm_model *m)
{
    if (!m)
        return;
    if (m->booster)
        XGBoosterFree(m->booster);
    if (m->proxy)
        XGDMatrixFree(m->proxy);
    pthread_mutex_destroy(&m->proxy_mu);
    fm_free(m);
}

bool fm_model_has_baseline(const fm_model *m) { return m->has_baseline; }

int fm_model_bin(const fm_model *m, size_t f, float value)
{
    if (!isfinite(value))
        return 0;
    int b = 0;
    while (b < FM_DRIFT_BINS - 1 && value > m->edges[f][b])
        b++;
    return b;
}

double fm_model_baseline_fraction(const fm_model *m, size_t f, int b)
{
    return m->fractions[f][b];
}

const char *fm_model_name(const fm_model *m) { return m->name; }
const char *fm_model_version(const fm_model *m) { return m->version; }
size_t fm_model_output_count(const fm_model *m) { return m->n_outputs; }

const fm_model_output *fm_model_output_at(const fm_model *m, size_t i)
{
    return i < m->n_outputs ? &m->outputs[i] : NULL;
}

int fm_model_contributions(fm_model *m, const float *features, float *out, fm_errbuf *err)
{
    DMatrixHandle dm = NULL;
    if (XGDMatrixCreateFromMat(features, 1, (bst_ulong)m->n_features, NAN, &dm) != 0)
        return fm_errf(err, FM_EMODEL, "xgboost: %s", XGBGetLastError());
    static const char config[] = "{\"type\":2,\"training\":false,\"iteration_begin\":0,"
                                 "\"iteration_end\":0,\"strict_shape\":true}";
    const bst_ulong *shape = NULL;
    bst_ulong dim = 0;
    const float *res = NULL;
    int rc = 0;
    if (XGBoosterPredictFromDMatrix(m->booster, dm, config, &shape, &dim, &res) != 0)
        rc = fm_errf(err, FM_EMODEL, "xgboost contributions: %s", XGBGetLastError());
    /* strict shape: (rows, outputs, features + 1) */
    else if (dim != 3 || shape[0] != 1 || shape[1] != m->n_outputs ||
             shape[2] != m->n_features + 1)
        rc = fm_errf(err, FM_EMODEL, "xgboost contributions: unexpected shape");
    else
        memcpy(out, res, m->n_outputs * (m->n_features + 1) * sizeof *out);
    XGDMatrixFree(dm);
    return rc;
}

int fm_model_predict(fm_model *m, const float *features, size_t rows, float *out,
                     fm_errbuf *err)
{
    if (rows == 0)
        return 0;
    /* The __array_interface__ protocol passes the buffer by address: XGBoost
     * reads the floats straight from the caller's memory, row-major, with
     * no copy. "<f4" is little-endian float32, which is what float is on
     * every platform the Debian package is built for. */
    char iface[256];
    snprintf(iface, sizeof iface,
             "{\"data\":[%" PRIuPTR ",true],\"shape\":[%zu,%zu],\"typestr\":\"<f4\",\"version\":3}",
             (uintptr_t)features, rows, m->n_features);
    const bst_ulong *shape = NULL;
    bst_ulong dim = 0;
    const float *res = NULL;
    bool own = m->proxy && pthread_mutex_trylock(&m->proxy_mu) == 0;
    int rc = XGBoosterPredictFromDense(m->booster, iface, predict_config, own ? m->proxy : NULL,
                                       &shape, &dim, &res);
    if (own)
        pthread_mutex_unlock(&m->proxy_mu);
    if (rc != 0)
        return fm_errf(err, FM_EMODEL, "xgboost predict: %s", XGBGetLastError());
    if (dim != 2 || shape[0] != rows || shape[1] != m->n_outputs)
        return fm_errf(err, FM_EMODEL,
                       "xgboost predict: result has shape %" PRIu64 "x%" PRIu64
                       ", expected %zux%zu",
                       (uint64_t)(dim > 0 ? shape[0] : 0), (uint64_t)(dim > 1 ? shape[1] : 0),
                       rows, m->n_outputs);
    /* The result buffer belongs to the booster and is overwritten by the
     * next call, so it is copied out before returning. */
    memcpy(out, res, rows * m->n_outputs * sizeof *out);
    return 0;
}
