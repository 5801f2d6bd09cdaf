/*
 * Training from the lake (fleetml/modelreg.h, fm_model_train_lake): the
 * measurements of raw/ joined with the newest label of each from labels/,
 * features from the serving code, a split by device, XGBoost with early
 * stopping, metrics next to the version in production on the same
 * validation rows, and a pending version whose manifest names its dataset.
 */
#include "fleetml/drift.h"
#include "fleetml/lake.h"
#include "fleetml/modelreg.h"

#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xgboost/c_api.h>

/* src/model/train.c */
int fm_model__train(const float *x, const float *y, size_t rows, const float *xv,
                    const float *yv, size_t vrows, int max_rounds, int patience,
                    void **booster, int *best_round, fm_errbuf *err);

#define NOUT 3

/* Progress to the caller, when it asked. */
static void fm_progress(const fm_lake_train_opts *o, const char *phase, int pct)
{
    if (o->progress)
        o->progress(o->progress_ud, phase, pct);
}
#define MAX_ROUNDS 300
#define PATIENCE 20
#define VAL_PCT 20 /* devices whose bucket is below this validate */

typedef struct label {
    char device[65], mid[65];
    int64_t seq;
    float y[NOUT];
    bool full; /* every output of the family labelled */
    bool used; /* its measurement is a row already (the export is at least once) */
} label;

typedef struct job {
    const fm_lake_train_opts *o;
    const fm_model *base; /* outputs and features of the family */
    label *labels;
    size_t nlabels, labels_cap;
    float *x, *y;
    char (*dev)[65], (*ten)[65]; /* per row */
    size_t rows, cap, raw_rows;
    EVP_MD_CTX *hash;
    const char *last_key;
    size_t raw_objects_used;
    char last_raw_key[512];
} job;

static int cmp_label(const void *a, const void *b)
{
    const label *x = a, *y = b;
    int c = strcmp(x->device, y->device);
    return c ? c : strcmp(x->mid, y->mid);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Distinct devices among the rows (sorted pointers: n log n). */
static size_t count_devices(char (*dev)[65], size_t rows)
{
    const char **p = fm_malloc((rows + 1) * sizeof *p);
    if (!p)
        return 0;
    for (size_t i = 0; i < rows; i++)
        p[i] = dev[i];
    qsort(p, rows, sizeof *p, cmp_str);
    size_t n = 0;
    for (size_t i = 0; i < rows; i++)
        n += i == 0 || strcmp(p[i - 1], p[i]) != 0;
    fm_free(p);
    return n;
}

static int on_label(void *ud, const char *key, const char *line, size_t len)
{
    (void)key;
    job *j = ud;
    json_t *o = json_loadb(line, len, 0, NULL);
    const char *dev = json_string_value(json_object_get(o, "device_id"));
    const char *mid = json_string_value(json_object_get(o, "measurement_id"));
    const char *tenant = json_string_value(json_object_get(o, "tenant"));
    json_t *outs = json_object_get(o, "outputs");
    if (!dev || !mid || !json_is_object(outs) || strlen(dev) > 64 || strlen(mid) > 64 ||
        (j->o->tenant && (!tenant || strcmp(tenant, j->o->tenant) != 0))) {
        json_decref(o);
        return 0;
    }
    if (j->nlabels == j->labels_cap) {
        size_t cap = j->labels_cap ? j->labels_cap * 2 : 256;
        label *nl = fm_realloc(j->labels, cap * sizeof *nl);
        if (!nl) {
            json_decref(o);
            return FM_ENOMEM;
        }
        j->labels = nl;
        j->labels_cap = cap;
    }
    label *l = &j->labels[j->nlabels++];
    memset(l, 0, sizeof *l);
    snprintf(l->device, sizeof l->device, "%s", dev);
    snprintf(l->mid, sizeof l->mid, "%s", mid);
    l->seq = json_integer_value(json_object_get(o, "seq"));
    l->full = true;
    for (int k = 0; k < NOUT; k++) {
        json_t *v = json_object_get(outs, fm_model_output_at(j->base, (size_t)k)->name);
        l->full &= json_is_number(v);
        l->y[k] = v ? (float)json_number_value(v) : NAN;
    }
    json_decref(o);
    return 0;
}

/* Keeps the newest label (largest seq) of each measurement. */
static void newest_labels(job *j)
{
    if (!j->nlabels)
        return;
    qsort(j->labels, j->nlabels, sizeof *j->labels, cmp_label);
    size_t w = 0;
    for (size_t i = 0; i < j->nlabels; i++) {
        if (w && cmp_label(&j->labels[w - 1], &j->labels[i]) == 0) {
            if (j->labels[i].seq > j->labels[w - 1].seq)
                j->labels[w - 1] = j->labels[i];
            continue;
        }
        j->labels[w++] = j->labels[i];
    }
    j->nlabels = w;
}

static int on_raw(void *ud, const char *key, const char *line, size_t len)
{
    job *j = ud;
    j->raw_rows++;
    json_t *o = json_loadb(line, len, 0, NULL);
    label probe;
    const char *dev = json_string_value(json_object_get(o, "device_id"));
    const char *mid = json_string_value(json_object_get(o, "measurement_id"));
    const char *recv = json_string_value(json_object_get(o, "received_at"));
    const char *tenant = json_string_value(json_object_get(o, "tenant"));
    int64_t at = 0;
    int rc = 0;
    if (!dev || !mid || !tenant || strlen(dev) > 64 || strlen(mid) > 64 || strlen(tenant) > 64 ||
        !recv ||
        fm_rfc3339_parse(recv, &at) != 0 || (j->o->from_ms && at < j->o->from_ms) ||
        (j->o->to_ms && at >= j->o->to_ms))
        goto out;
    snprintf(probe.device, sizeof probe.device, "%s", dev);
    snprintf(probe.mid, sizeof probe.mid, "%s", mid);
    label *l = j->nlabels ? bsearch(&probe, j->labels, j->nlabels, sizeof *l, cmp_label) : NULL;
    if (!l || !l->full || l->used)
        goto out;
    char *text = json_dumps(json_object_get(o, "measurement"), JSON_COMPACT);
    fm_measurement m;
    fm_verr ve;
    size_t nf = fm_feature_count();
    float feat[FM_FEATURES_MAX];
    int prc = text ? fm_measurement_parse(text, strlen(text), &m, &ve) : FM_ENOMEM;
    fm_free(text);
    if (prc)
        goto out;
    prc = fm_features_extract(&m, feat, &ve);
    fm_measurement_free(&m);
    if (prc)
        goto out;
    if (j->rows == j->cap) {
        size_t cap = j->cap ? j->cap * 2 : 1024;
        float *nx = fm_realloc(j->x, cap * nf * sizeof *nx);
        if (nx)
            j->x = nx;
        float *ny = nx ? fm_realloc(j->y, cap * NOUT * sizeof *ny) : NULL;
        if (ny)
            j->y = ny;
        char(*nd)[65] = ny ? fm_realloc(j->dev, cap * sizeof *nd) : NULL;
        if (nd)
            j->dev = nd;
        char(*nt)[65] = nd ? fm_realloc(j->ten, cap * sizeof *nt) : NULL;
        if (!nt) {
            rc = FM_ENOMEM;
            goto out;
        }
        j->ten = nt;
        j->cap = cap;
    }
    memcpy(j->x + j->rows * nf, feat, nf * sizeof *feat);
    memcpy(j->y + j->rows * NOUT, l->y, NOUT * sizeof *l->y);
    snprintf(j->dev[j->rows], sizeof j->dev[0], "%s", dev);
    snprintf(j->ten[j->rows], sizeof j->ten[0], "%s", tenant);
    j->rows++;
    l->used = true;
    /* The dataset snapshot: every object used, every label (and which
     * correction of it) used. */
    if (strcmp(j->last_raw_key, key) != 0) {
        snprintf(j->last_raw_key, sizeof j->last_raw_key, "%s", key);
        j->raw_objects_used++;
        EVP_DigestUpdate(j->hash, key, strlen(key));
        EVP_DigestUpdate(j->hash, "\n", 1);
    }
    char lk[200];
    int n = snprintf(lk, sizeof lk, "%s|%s|%lld\n", l->device, l->mid, (long long)l->seq);
    EVP_DigestUpdate(j->hash, lk, (size_t)n);
out:
    json_decref(o);
    return rc;
}

/* MAE and RMSE per output of model m on rows (x, y). */
static int evaluate(fm_model *m, const float *x, const float *y, size_t rows, double *mae,
                    double *rmse, fm_errbuf *err)
{
    float *p = fm_malloc((rows * NOUT + 1) * sizeof *p);
    if (!p)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    int rc = fm_model_predict(m, x, rows, p, err);
    for (int k = 0; !rc && k < NOUT; k++) {
        double ae = 0, se = 0;
        for (size_t i = 0; i < rows; i++) {
            double d = (double)p[i * NOUT + k] - y[i * NOUT + k];
            ae += fabs(d);
            se += d * d;
        }
        mae[k] = ae / (double)rows;
        rmse[k] = sqrt(se / (double)rows);
    }
    fm_free(p);
    return rc;
}

static json_t *metrics_json(const fm_model *m, const double *mae, const double *rmse)
{
    json_t *o = json_object();
    for (int k = 0; k < NOUT; k++)
        json_object_set_new(o, fm_model_output_at(m, (size_t)k)->name,
                            json_pack("{s:f,s:f}", "mae", mae[k], "rmse", rmse[k]));
    return o;
}

typedef struct prod_walk {
    const char *name;
    char version[33];
} prod_walk;

static int on_prod_alias(void *ud, const fm_model_alias *a)
{
    prod_walk *w = ud;
    if (strcmp(a->name, w->name) == 0 && strcmp(a->alias, FM_ALIAS_PRODUCTION) == 0)
        snprintf(w->version, sizeof w->version, "%s", a->version);
    return 0;
}

/* The model in production for tenant (else the bundled one), and its ref. */
static int production(fm_store *st, const fm_config *cfg, const char *name, const char *tenant,
                      fm_model **out, char *ref, size_t reflen, fm_errbuf *err)
{
    prod_walk w = {.name = name};
    if (tenant)
        st->models->alias_list(st, tenant, on_prod_alias, &w);
    if (!w.version[0]) {
        int rc = fm_model_load(cfg->model_dir, out, err);
        if (!rc)
            snprintf(ref, reflen, "%s@%s", fm_model_name(*out), fm_model_version(*out));
        return rc;
    }
    fm_model_rec v;
    void *file = NULL;
    size_t len = 0;
    int rc = st->models->version_get(st, name, w.version, &v);
    if (!rc)
        rc = st->models->version_file(st, name, w.version, &file, &len);
    if (!rc)
        rc = fm_model_load_mem(v.manifest_json, strlen(v.manifest_json), file, len, out, err);
    else
        fm_errf(err, rc, "cannot read %s@%s", name, w.version);
    fm_model_rec_clear(&v);
    fm_free(file);
    if (!rc)
        snprintf(ref, reflen, "%s@%s", name, w.version);
    return rc;
}

/* The new version and production on each tenant's validation rows:
 * *res = {tenant: {"rows", "metrics", "production"}}. Returns 0 or an
 * error (err says which). */
static int tenant_metrics(const fm_model *base, fm_model *cand, fm_model *prod, const float *xv,
                          const float *yv, char (*vten)[65], size_t vrows, json_t **res,
                          fm_errbuf *err)
{
    int rc = 0;
    size_t nf = fm_feature_count();
    json_t *out = json_object();
    float *x = fm_malloc((vrows * nf + 1) * sizeof *x);
    float *y = fm_malloc((vrows * NOUT + 1) * sizeof *y);
    bool *done = fm_calloc(vrows + 1, sizeof *done);
    if (!out || !x || !y || !done)
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
    for (size_t i = 0; !rc && i < vrows; i++) {
        if (done[i])
            continue;
        size_t n = 0;
        for (size_t k = i; k < vrows; k++) {
            if (done[k] || strcmp(vten[k], vten[i]) != 0)
                continue;
            done[k] = true;
            memcpy(x + n * nf, xv + k * nf, nf * sizeof *x);
            memcpy(y + n * NOUT, yv + k * NOUT, NOUT * sizeof *y);
            n++;
        }
        double mae[NOUT], rmse[NOUT], pmae[NOUT], prmse[NOUT];
        if (!(rc = evaluate(cand, x, y, n, mae, rmse, err)) &&
            !(rc = evaluate(prod, x, y, n, pmae, prmse, err)))
            json_object_set_new(out, vten[i],
                                json_pack("{s:I,s:o,s:o}", "rows", (json_int_t)n, "metrics",
                                          metrics_json(base, mae, rmse), "production",
                                          metrics_json(base, pmae, prmse)));
    }
    fm_free(x);
    fm_free(y);
    fm_free(done);
    if (rc) {
        json_decref(out);
        return rc;
    }
    *res = out;
    return 0;
}

static void job_free(job *j)
{
    fm_free(j->labels);
    fm_free(j->x);
    fm_free(j->y);
    fm_free(j->dev);
    fm_free(j->ten);
    if (j->hash)
        EVP_MD_CTX_free(j->hash);
}

int fm_model_train_lake(const fm_config *cfg, fm_store *st, const fm_lake_train_opts *o,
                        fm_lake_train_report *rep, fm_errbuf *err)
{
    memset(rep, 0, sizeof *rep);
    if (!fm_modelreg_version_valid(o->version))
        return fm_errf(err, FM_EINVAL, "version: expected [A-Za-z0-9][A-Za-z0-9._-]{0,31}");
    fm_model *base = NULL, *prod = NULL, *cand = NULL;
    int rc = fm_model_load(cfg->model_dir, &base, err);
    if (rc)
        return rc;
    if (strcmp(fm_model_name(base), o->name) != 0 || fm_model_output_count(base) != NOUT) {
        fm_model_free(base);
        return fm_errf(err, FM_EINVAL, "training from the lake is for the served family '%s'",
                       fm_model_name(base));
    }
    job j = {.o = o, .base = base, .hash = EVP_MD_CTX_new()};
    void *booster = NULL;
    json_t *man = NULL;
    char *text = NULL, *mtext = NULL;
    float *xt = NULL, *yt = NULL, *xv = NULL, *yv = NULL;
    char(*vten)[65] = NULL;
    if (!j.hash || EVP_DigestInit_ex(j.hash, EVP_sha256(), NULL) != 1) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    fm_progress(o, "reading labels", 0);
    if ((rc = fm_lake_read_area(cfg, "labels", o->tenant, on_label, &j, &rep->label_objects,
                                err)))
        goto out;
    newest_labels(&j);
    fm_progress(o, "reading measurements", 10);
    if ((rc = fm_lake_read_area(cfg, "raw", o->tenant, on_raw, &j, &rep->raw_objects, err)))
        goto out;
    rep->raw_rows = j.raw_rows;
    rep->labelled = j.rows;
    /* Split by device: a device is wholly in training or in validation. */
    size_t nf = fm_feature_count();
    xt = fm_malloc((j.rows * nf + 1) * sizeof *xt);
    yt = fm_malloc((j.rows * NOUT + 1) * sizeof *yt);
    xv = fm_malloc((j.rows * nf + 1) * sizeof *xv);
    yv = fm_malloc((j.rows * NOUT + 1) * sizeof *yv);
    vten = fm_malloc((j.rows + 1) * sizeof *vten);
    if (!xt || !yt || !xv || !yv || !vten) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < j.rows; i++) {
        bool val = fm_serving_bucket(j.dev[i]) < VAL_PCT;
        float *dx = val ? xv + rep->val_rows * nf : xt + rep->train_rows * nf;
        float *dy = val ? yv + rep->val_rows * NOUT : yt + rep->train_rows * NOUT;
        memcpy(dx, j.x + i * nf, nf * sizeof *dx);
        memcpy(dy, j.y + i * NOUT, NOUT * sizeof *dy);
        if (val)
            memcpy(vten[rep->val_rows++], j.ten[i], sizeof vten[0]);
        else
            rep->train_rows++;
    }
    rep->devices = count_devices(j.dev, j.rows);
    if (rep->train_rows < 20 || rep->val_rows < 5) {
        rc = fm_errf(err, FM_EINVAL,
                     "not enough labelled measurements: %zu for training and %zu for validation "
                     "(of %zu measurements, %zu labelled with every output); at least 20 and 5 "
                     "are needed, on devices on both sides of the split",
                     rep->train_rows, rep->val_rows, rep->raw_rows, rep->labelled);
        goto out;
    }
    fm_progress(o, "training", 30);
    if ((rc = fm_model__train(xt, yt, rep->train_rows, xv, yv, rep->val_rows, MAX_ROUNDS,
                              PATIENCE, &booster, &rep->best_round, err)))
        goto out;
    fm_progress(o, "evaluating", 80);
    bst_ulong blen = 0;
    const char *buf = NULL;
    if (XGBoosterSaveModelToBuffer(booster, "{\"format\":\"json\"}", &blen, &buf) != 0) {
        rc = fm_errf(err, FM_EMODEL, "xgboost save: %s", XGBGetLastError());
        goto out;
    }
    text = fm_strndup(buf, (size_t)blen);
    unsigned char md[32];
    unsigned int mdlen = 0;
    char digest[65];
    EVP_DigestFinal_ex(j.hash, md, &mdlen);
    for (unsigned i = 0; i < mdlen && i < 32; i++)
        snprintf(digest + 2 * i, 3, "%02x", md[i]);
    /* The manifest: the family's features and outputs, where the data came
     * from, and how the version did next to production. */
    json_t *feats = json_array(), *outs = json_array();
    for (size_t f = 0; f < nf; f++)
        json_array_append_new(feats, json_string(fm_feature_name(f)));
    for (int k = 0; k < NOUT; k++) {
        const fm_model_output *mo = fm_model_output_at(base, (size_t)k);
        json_array_append_new(outs, json_pack("{s:s,s:s,s:f,s:f}", "name", mo->name, "unit",
                                              mo->unit, "min", mo->min, "max", mo->max));
    }
    char from[40] = "", to[40] = "";
    if (o->from_ms)
        fm_rfc3339(o->from_ms, from, sizeof from);
    if (o->to_ms)
        fm_rfc3339(o->to_ms, to, sizeof to);
    json_t *dataset = json_pack(
        "{s:s,s:s?,s:s?,s:s?,s:I,s:I,s:I,s:I,s:s}", "source", "lake", "tenant", o->tenant,
        "from", o->from_ms ? from : NULL, "to", o->to_ms ? to : NULL, "raw_objects",
        (json_int_t)j.raw_objects_used, "label_objects", (json_int_t)rep->label_objects,
        "measurements", (json_int_t)j.rows, "devices", (json_int_t)rep->devices, "sha256",
        digest);
    json_t *baseline = fm_drift_baseline_json(xt, rep->train_rows);
    man = json_pack("{s:s,s:s,s:s,s:o,s:o}", "name", o->name, "version", o->version, "kind",
                    FM_MEAS_KIND_V1, "features", feats, "outputs", outs);
    json_object_set_new(man, "training",
                        json_pack("{s:s,s:o,s:{s:s,s:i},s:I,s:I,s:i,s:i}", "source", "lake",
                                  "dataset", dataset, "split", "method", "by device",
                                  "validation_pct", VAL_PCT, "train_rows",
                                  (json_int_t)rep->train_rows, "validation_rows",
                                  (json_int_t)rep->val_rows, "best_round", rep->best_round,
                                  "max_rounds", MAX_ROUNDS));
    if (o->job_id)
        json_object_set_new(json_object_get(man, "training"), "job", json_integer(o->job_id));
    if (baseline)
        json_object_set_new(man, "feature_baseline", baseline);
    json_object_set_new(man, "created_by", json_string("fleetml model train --from-lake"));
    mtext = json_dumps(man, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text || !mtext) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = fm_model_load_mem(mtext, strlen(mtext), text, strlen(text), &cand, err)) ||
        (rc = evaluate(cand, xv, yv, rep->val_rows, rep->mae, rep->rmse, err)) ||
        (rc = production(st, cfg, o->name, o->tenant, &prod, rep->prod_ref,
                         sizeof rep->prod_ref, err)) ||
        (rc = evaluate(prod, xv, yv, rep->val_rows, rep->prod_mae, rep->prod_rmse, err)))
        goto out;
    /* A constant predictor (the training mean) as the floor to beat. */
    for (int k = 0; k < NOUT; k++) {
        double mean = 0, ae = 0;
        for (size_t i = 0; i < rep->train_rows; i++)
            mean += yt[i * NOUT + k];
        mean /= (double)rep->train_rows;
        for (size_t i = 0; i < rep->val_rows; i++)
            ae += fabs(yv[i * NOUT + k] - mean);
        rep->const_mae[k] = ae / (double)rep->val_rows;
    }
    json_t *cmae = json_object();
    for (int k = 0; k < NOUT; k++)
        json_object_set_new(cmae, fm_model_output_at(base, (size_t)k)->name,
                            json_real(rep->const_mae[k]));
    json_t *per_tenant = NULL;
    if ((rc = tenant_metrics(base, cand, prod, xv, yv, vten, rep->val_rows, &per_tenant, err))) {
        json_decref(cmae);
        goto out;
    }
    json_object_set_new(man, "validation",
                        json_pack("{s:I,s:o,s:{s:s,s:o},s:o,s:o}", "rows",
                                  (json_int_t)rep->val_rows, "metrics",
                                  metrics_json(base, rep->mae, rep->rmse), "production", "model",
                                  rep->prod_ref, "metrics",
                                  metrics_json(base, rep->prod_mae, rep->prod_rmse),
                                  "constant_mae", cmae, "per_tenant", per_tenant));
    fm_free(mtext);
    mtext = json_dumps(man, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!mtext) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    fm_progress(o, "registering", 95);
    fm_model_upload u = {.name = o->name, .manifest = mtext, .manifest_len = strlen(mtext),
                         .file = text, .file_len = strlen(text),
                         .owner_tenant = o->owner_tenant ? o->owner_tenant : "",
                         .actor = o->actor ? o->actor : "", .now_ms = fm_wall_ms()};
    rc = fm_modelreg_push(st, cfg, &u, &rep->version, err);
    if (!rc)
        fm_progress(o, "done", 100);
out:
    json_decref(man);
    fm_free(mtext);
    fm_free(text);
    fm_free(xt);
    fm_free(yt);
    fm_free(xv);
    fm_free(yv);
    fm_free(vten);
    if (booster)
        XGBoosterFree(booster);
    fm_model_free(cand);
    fm_model_free(prod);
    fm_model_free(base);
    job_free(&j);
    return rc;
}
