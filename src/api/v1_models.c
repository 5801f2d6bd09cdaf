/*
 * API v1: the model registry and deployment (fleetml/modelreg.h).
 *
 *   POST /models/{name}/versions                 upload (models.manage)
 *   GET  /models/{name}/versions                 list (models.read)
 *   GET  /models/{name}/versions/{version}       one, with manifest (models.read)
 *   POST /models/{name}/versions/{version}/approve | reject  (models.approve)
 *   GET  /models/{name}/aliases                  the tenant's aliases (models.read)
 *   PUT  /models/{name}/aliases/{alias}          deploy / roll back (models.deploy)
 *
 * Versions belong to the tenant that uploaded them ("" = the platform,
 * uploaded with the CLI): a user sees and deploys their own tenant's
 * versions and the platform's; an operator sees all.
 */
#include "api/api_int.h"
#include "fleetml/modelreg.h"
#include "fleetml/drift.h"

#include <math.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define MSG 192

static bool visible(const api_req *r, const fm_model_rec *v)
{
    return (r->who.role_mask & FM_ROLE_OPERATOR) || v->owner_tenant[0] == '\0' ||
           strcmp(v->owner_tenant, r->who.tenant) == 0;
}

/* Strict standard base64 (RFC 4648 section 4, padded). Returns the decoded
 * bytes (fm_malloc'd) or NULL. */
static unsigned char *b64_decode(const char *s, size_t n, size_t *out_len)
{
    if (n == 0 || n % 4 != 0 || n > (size_t)INT32_MAX)
        return NULL;
    size_t pad = (s[n - 1] == '=') + (s[n - 2] == '=');
    for (size_t i = 0; i < n - pad; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/'))
            return NULL;
    }
    unsigned char *out = fm_malloc(n / 4 * 3 + 1);
    if (!out)
        return NULL;
    int len = EVP_DecodeBlock(out, (const unsigned char *)s, (int)n);
    if (len < 0 || (size_t)len < pad) {
        fm_free(out);
        return NULL;
    }
    *out_len = (size_t)len - pad;
    return out;
}

void v1_model_push(api_req *r)
{
    const char *name = r->params[0];
    json_t *man = json_object_get(r->json, "manifest");
    const char *b64 = json_string_value(json_object_get(r->json, "model"));
    if (!json_is_object(man) || !b64) {
        api_error(r, 400, "invalid_request",
                  "expected {\"manifest\": {...}, \"model\": \"<base64 of the XGBoost model "
                  "file>\"}");
        return;
    }
    size_t flen = 0;
    unsigned char *file = b64_decode(b64, json_string_length(json_object_get(r->json, "model")),
                                     &flen);
    if (!file) {
        api_error(r, 400, "invalid_request", "field 'model' is not standard padded base64");
        return;
    }
    char *mtext = json_dumps(man, JSON_COMPACT | JSON_PRESERVE_ORDER);
    size_t mlen = mtext ? strlen(mtext) : 0;
    fm_errbuf err;
    int rc = mtext ? 0 : fm_errf(&err, FM_ENOMEM, "out of memory");
    /* An MLflow model: its MLmodel text beside the manifest. */
    json_t *mlm = json_object_get(r->json, "mlmodel");
    if (!rc && mlm && !json_is_string(mlm))
        rc = fm_errf(&err, FM_EINVAL, "field 'mlmodel' must be the text of an MLmodel file");
    else if (!rc && mlm)
        rc = fm_mlflow_join(json_string_value(mlm), json_string_length(mlm), &mtext, &mlen, &err);
    fm_model_upload u = {.name = name, .manifest = mtext, .manifest_len = mlen,
                         .file = file, .file_len = flen, .owner_tenant = r->who.tenant,
                         .actor = r->actor, .now_ms = r->now_ms};
    fm_model_rec v;
    if (!rc)
        rc = fm_modelreg_push(r->store, &r->h->cfg, &u, &v, &err);
    fm_free(file);
    fm_free(mtext);
    if (rc == 0) {
        api_audit(r, NULL, "model.upload", name, "ok",
                  json_pack("{s:s,s:s}", "version", v.version, "sha256", v.sha256));
        api_json(r, 201, fm_model_version_json(&v, false));
    } else if (rc == FM_EINVAL || rc == FM_EMODEL) {
        api_audit(r, NULL, "model.upload", name, "failed", json_pack("{s:s}", "reason", err.msg));
        api_error(r, 422, "validation_failed", "%s", err.msg);
    } else if (rc == FM_EEXIST) {
        api_error(r, 409, "conflict", "%s", err.msg);
    } else {
        api_store_error(r, rc);
    }
}

typedef struct list_ctx {
    api_req *r;
    json_t *items;
} list_ctx;

static int on_version(void *ud, const fm_model_rec *v)
{
    list_ctx *c = ud;
    if (visible(c->r, v))
        json_array_append_new(c->items, fm_model_version_json(v, false));
    return 0;
}

void v1_model_versions(api_req *r)
{
    list_ctx c = {.r = r, .items = json_array()};
    int rc = c.items ? r->store->models->version_list(r->store, r->params[0], on_version, &c)
                     : FM_ENOMEM;
    api_page_answer(r, rc, c.items, NULL);
}

/* The version of the path, when it exists and the caller may see it;
 * otherwise answered (404) and false. */
static bool find_version(api_req *r, fm_model_rec *v)
{
    int rc = r->store->models->version_get(r->store, r->params[0], r->params[1], v);
    if (rc == 0 && !visible(r, v))
        rc = FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND)
        api_error(r, 404, "not_found", "no such model version");
    else if (rc)
        api_store_error(r, rc);
    if (rc)
        fm_model_rec_clear(v);
    return rc == 0;
}

void v1_model_version_get(api_req *r)
{
    fm_model_rec v;
    if (!find_version(r, &v))
        return;
    api_json(r, 200, fm_model_version_json(&v, true));
    fm_model_rec_clear(&v);
}

static void decide(api_req *r, int status)
{
    fm_model_rec v;
    if (!find_version(r, &v))
        return;
    fm_model_rec_clear(&v);
    const char *note = NULL;
    char msg[MSG];
    if (r->json && fm_api_get_str(r->json, "note", false, 255, &note, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    fm_errbuf err;
    int rc = r->store->models->version_decide(r->store, r->params[0], r->params[1], status,
                                              r->actor, note ? note : "", r->now_ms, &err);
    const char *action = status == FM_MODEL_APPROVED ? "model.approve" : "model.reject";
    if (rc == FM_ESTATE) {
        api_error(r, 409, "conflict", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, NULL, action, r->params[0], "ok",
              json_pack("{s:s,s:s}", "version", r->params[1], "note", note ? note : ""));
    if (find_version(r, &v)) {
        api_json(r, 200, fm_model_version_json(&v, false));
        fm_model_rec_clear(&v);
    }
}

void v1_model_approve(api_req *r) { decide(r, FM_MODEL_APPROVED); }
void v1_model_reject(api_req *r) { decide(r, FM_MODEL_REJECTED); }

typedef struct alias_ctx {
    const char *name;
    json_t *items;
} alias_ctx;

static int on_alias(void *ud, const fm_model_alias *a)
{
    alias_ctx *c = ud;
    if (strcmp(a->name, c->name) != 0)
        return 0;
    json_t *o = fm_model_alias_json(a);
    json_array_append_new(c->items, o);
    return 0;
}

void v1_model_aliases(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    alias_ctx c = {.name = r->params[0], .items = json_array()};
    int rc = c.items ? r->store->models->alias_list(r->store, tenant, on_alias, &c) : FM_ENOMEM;
    api_page_answer(r, rc, c.items, NULL);
}

void v1_model_alias_put(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    const char *alias = r->params[1];
    if (!fm_modelreg_alias_valid(alias)) {
        api_error(r, 404, "not_found", "aliases are '%s', '%s' and '%s'", FM_ALIAS_PRODUCTION,
                  FM_ALIAS_CANARY, FM_ALIAS_SHADOW);
        return;
    }
    const char *version = NULL;
    long long share = 100;
    char msg[MSG];
    bool canary = strcmp(alias, FM_ALIAS_CANARY) == 0;
    json_t *vj = json_object_get(r->json, "version");
    if (json_is_null(vj)) {
        version = "";
    } else if (fm_api_get_str(r->json, "version", true, 32, &version, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s (null removes the alias)", msg);
        return;
    }
    if (fm_api_get_int(r->json, "share_pct", canary && *version, 1, 100, &share, msg,
                       sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (!canary && json_object_get(r->json, "share_pct")) {
        api_error(r, 400, "invalid_request", "share_pct is for the canary alias only");
        return;
    }
    fm_model_rec v;
    if (*version) {
        int rc = r->store->models->version_get(r->store, r->params[0], version, &v);
        if (rc == 0 && !visible(r, &v))
            rc = FM_ENOTFOUND;
        bool approved = rc == 0 && v.status == FM_MODEL_APPROVED;
        fm_model_rec_clear(&v);
        if (rc == FM_ENOTFOUND) {
            api_error(r, 404, "not_found", "no such model version");
            return;
        }
        if (rc) {
            api_store_error(r, rc);
            return;
        }
        if (!approved) {
            api_error(r, 409, "conflict", "only an approved version can be deployed");
            return;
        }
    }
    fm_model_alias a = {.share_pct = canary ? (int)share : 100, .updated_ms = r->now_ms};
    snprintf(a.tenant, sizeof a.tenant, "%s", tenant);
    snprintf(a.name, sizeof a.name, "%s", r->params[0]);
    snprintf(a.alias, sizeof a.alias, "%s", alias);
    snprintf(a.version, sizeof a.version, "%s", version);
    snprintf(a.updated_by, sizeof a.updated_by, "%s", r->actor);
    fm_errbuf err;
    int rc = r->store->models->alias_set(r->store, &a, &err);
    if (rc == FM_ESTATE || rc == FM_ENOTFOUND) {
        api_error(r, 409, "conflict", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, tenant, "model.deploy", r->params[0], "ok",
              json_pack("{s:s,s:s,s:i}", "alias", alias, "version", version, "share_pct",
                        a.share_pct));
    char at[40];
    json_t *o = json_pack("{s:s,s:s,s:s?,s:s,s:s}", "tenant", tenant, "alias", alias, "version",
                          *version ? version : NULL, "updated_by", a.updated_by, "updated_at",
                          fm_rfc3339(a.updated_ms, at, sizeof at));
    if (o && canary)
        json_object_set_new(o, "share_pct", json_integer(a.share_pct));
    api_json(r, 200, o);
}

/* ---- models the HTTP threads score with ---------------------------------------- */

void api_models_free(fm_http *h)
{
    for (size_t i = 0; i < h->nmodels; i++) {
        if (h->models[i]->owned)
            fm_model_free(h->models[i]->model);
        pthread_mutex_destroy(&h->models[i]->mu);
        fm_free(h->models[i]);
    }
    fm_free(h->models);
    h->models = NULL;
    h->nmodels = 0;
    pthread_mutex_destroy(&h->models_mu);
}

typedef struct prod_ctx {
    const char *name;
    char version[33];
} prod_ctx;

static int on_prod(void *ud, const fm_model_alias *a)
{
    prod_ctx *c = ud;
    if (strcmp(a->name, c->name) == 0 && strcmp(a->alias, FM_ALIAS_PRODUCTION) == 0)
        snprintf(c->version, sizeof c->version, "%s", a->version);
    return 0;
}

/* The cached entry for name@version, loading it from the catalogue. Called
 * with models_mu held. */
static api_model *load_entry(api_req *r, const char *name, const char *version)
{
    fm_http *h = r->h;
    char ref[128];
    snprintf(ref, sizeof ref, "%s@%s", name, version);
    for (size_t i = 0; i < h->nmodels; i++)
        if (strcmp(h->models[i]->ref, ref) == 0)
            return h->models[i];
    fm_model_rec v;
    void *file = NULL;
    size_t len = 0;
    int rc = r->store->models->version_get(r->store, name, version, &v);
    if (!rc)
        rc = r->store->models->version_file(r->store, name, version, &file, &len);
    fm_model *m = NULL;
    fm_errbuf err;
    if (!rc)
        rc = fm_model_load_mem(v.manifest_json, strlen(v.manifest_json), file, len, &m, &err);
    fm_model_rec_clear(&v);
    fm_free(file);
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no such model version");
        return NULL;
    }
    if (rc == FM_EINVAL || rc == FM_EMODEL) {
        api_error(r, 422, "validation_failed", "%s", err.msg);
        return NULL;
    }
    if (rc) {
        api_store_error(r, rc);
        return NULL;
    }
    api_model **nm = fm_realloc(h->models, (h->nmodels + 1) * sizeof *nm);
    api_model *e = nm ? fm_calloc(1, sizeof *e) : NULL;
    if (nm)
        h->models = nm;
    if (!e) {
        fm_model_free(m);
        api_error(r, 500, "internal", "out of memory");
        return NULL;
    }
    e->model = m;
    e->owned = true;
    snprintf(e->ref, sizeof e->ref, "%s", ref);
    pthread_mutex_init(&e->mu, NULL);
    h->models[h->nmodels++] = e;
    return e;
}

api_model *api_model_for(api_req *r, const char *name, const char *version)
{
    fm_http *h = r->h;
    prod_ctx c = {.name = name};
    if (version) {
        fm_model_rec v;
        int rc = r->store->models->version_get(r->store, name, version, &v);
        if (rc == 0 && !visible(r, &v))
            rc = FM_ENOTFOUND;
        fm_model_rec_clear(&v);
        if (rc == FM_ENOTFOUND) {
            api_error(r, 404, "not_found", "no such model version");
            return NULL;
        }
        if (rc) {
            api_store_error(r, rc);
            return NULL;
        }
    } else {
        int rc = r->store->models->alias_list(r->store, r->who.tenant, on_prod, &c);
        if (rc) {
            api_store_error(r, rc);
            return NULL;
        }
        if (c.version[0]) {
            version = c.version;
        } else if (strcmp(name, fm_model_name(h->model)) == 0) {
            return h->models[0];
        } else {
            api_error(r, 404, "not_found", "no such model");
            return NULL;
        }
    }
    pthread_mutex_lock(&h->models_mu);
    api_model *e = load_entry(r, name, version);
    pthread_mutex_unlock(&h->models_mu);
    return e;
}

/* ---- MLflow's scoring protocol ------------------------------------------------------ */

#define INVOCATION_ROWS_MAX 10000

/* Answers in MLflow's error shape ({"error_code", "message"}), which its
 * scoring clients read. */
static void mlflow_error(api_req *r, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void mlflow_error(api_req *r, unsigned status, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    api_json(r, status, json_pack("{s:s,s:s}", "error_code",
                                  status == 400 ? "BAD_REQUEST" : "INTERNAL_ERROR", "message",
                                  msg));
}

/* One value of the input: a number, or null for a missing value. */
static bool cell(json_t *v, float *out)
{
    if (json_is_null(v)) {
        *out = NAN;
        return true;
    }
    if (!json_is_number(v))
        return false;
    double d = json_number_value(v);
    if (!isfinite(d))
        return false;
    *out = (float)d;
    return true;
}

/* Index of column name among the features, or -1. */
static int feature_index(const char *name)
{
    for (size_t i = 0; name && i < fm_feature_count(); i++)
        if (strcmp(fm_feature_name(i), name) == 0)
            return (int)i;
    return -1;
}

/* Fills row from an object {feature: value}; every feature must be there
 * and nothing else. */
static bool record_row(json_t *rec, float *row, char *why, size_t len)
{
    if (!json_is_object(rec)) {
        snprintf(why, len, "a record must be an object of feature columns");
        return false;
    }
    size_t nf = fm_feature_count();
    if (json_object_size(rec) != nf) {
        snprintf(why, len, "a record must have exactly the %zu feature columns", nf);
        return false;
    }
    const char *k;
    json_t *v;
    json_object_foreach(rec, k, v) {
        int i = feature_index(k);
        if (i < 0) {
            snprintf(why, len, "unknown column '%.64s'", k);
            return false;
        }
        if (!cell(v, &row[i])) {
            snprintf(why, len, "column '%.64s' must be a finite number or null", k);
            return false;
        }
    }
    return true;
}

/* Fills row from a list in feature order (cols maps position -> feature;
 * NULL: the features' own order). */
static bool list_row(json_t *list, const int *cols, float *row, char *why, size_t len)
{
    size_t nf = fm_feature_count();
    if (!json_is_array(list) || json_array_size(list) != nf) {
        snprintf(why, len, "a row must be an array of the %zu features", nf);
        return false;
    }
    for (size_t j = 0; j < nf; j++)
        if (!cell(json_array_get(list, j), &row[cols ? (size_t)cols[j] : j])) {
            snprintf(why, len, "row values must be finite numbers or null");
            return false;
        }
    return true;
}

/* Reads the request into a rows x features matrix (fm_malloc'd). */
static float *read_frame(json_t *body, size_t *rows, char *why, size_t len)
{
    size_t nf = fm_feature_count();
    json_t *split = json_object_get(body, "dataframe_split");
    json_t *records = json_object_get(body, "dataframe_records");
    json_t *inst = json_object_get(body, "instances");
    json_t *inputs = json_object_get(body, "inputs");
    int given = !!split + !!records + !!inst + !!inputs;
    if (given != 1 || json_object_size(body) != 1) {
        snprintf(why, len, "the body must have exactly one of dataframe_split, "
                           "dataframe_records, instances, inputs");
        return NULL;
    }
    json_t *data = NULL, *columns = NULL, *colmap = NULL;
    if (split) {
        columns = json_object_get(split, "columns");
        data = json_object_get(split, "data");
    } else if (records) {
        data = records;
    } else {
        data = inst ? inst : inputs;
        if (json_is_object(data)) /* {"feature": [values...]}: columns */
            colmap = data;
    }
    size_t n = 0;
    if (colmap) {
        json_t *first = json_object_get(colmap, fm_feature_name(0));
        n = json_array_size(first);
    } else if (json_is_array(data)) {
        n = json_array_size(data);
    } else {
        snprintf(why, len, "the rows must be an array");
        return NULL;
    }
    if (n == 0 || n > INVOCATION_ROWS_MAX) {
        snprintf(why, len, "between 1 and %d rows per request", INVOCATION_ROWS_MAX);
        return NULL;
    }
    int cols[FM_FEATURES_MAX];
    if (split) {
        if (!json_is_array(columns) || json_array_size(columns) != nf) {
            snprintf(why, len, "dataframe_split.columns must name the %zu features", nf);
            return NULL;
        }
        bool seen[FM_FEATURES_MAX] = {false};
        for (size_t j = 0; j < nf; j++) {
            int i = feature_index(json_string_value(json_array_get(columns, j)));
            if (i < 0 || seen[i]) {
                snprintf(why, len, "dataframe_split.columns[%zu] is not a feature (or repeats)",
                         j);
                return NULL;
            }
            seen[i] = true;
            cols[j] = i;
        }
    }
    float *x = fm_malloc(n * nf * sizeof *x);
    if (!x) {
        snprintf(why, len, "out of memory");
        return NULL;
    }
    bool ok = true;
    if (colmap) {
        ok = json_object_size(colmap) == nf;
        for (size_t i = 0; ok && i < nf; i++) {
            json_t *col = json_object_get(colmap, fm_feature_name(i));
            ok = json_is_array(col) && json_array_size(col) == n;
            for (size_t r = 0; ok && r < n; r++)
                ok = cell(json_array_get(col, r), &x[r * nf + i]);
        }
        if (!ok)
            snprintf(why, len, "inputs as columns: every feature, each an array of %zu finite "
                               "numbers or nulls, and nothing else", n);
    } else {
        for (size_t r = 0; ok && r < n; r++) {
            json_t *row = json_array_get(data, r);
            ok = json_is_object(row) ? record_row(row, x + r * nf, why, len)
                                     : list_row(row, split ? cols : NULL, x + r * nf, why, len);
        }
    }
    if (!ok) {
        fm_free(x);
        return NULL;
    }
    *rows = n;
    return x;
}

void v1_model_invocations(api_req *r)
{
    char why[256] = "";
    size_t rows = 0;
    float *x = read_frame(r->json, &rows, why, sizeof why);
    if (!x) {
        mlflow_error(r, 400, "%s", why);
        return;
    }
    api_model *am = api_model_for(r, r->params[0], api_query(r, "version"));
    if (!am) {
        fm_free(x);
        return;
    }
    size_t no = fm_model_output_count(am->model);
    float *y = fm_malloc(rows * no * sizeof *y);
    fm_errbuf err;
    int rc = FM_ENOMEM;
    if (y) {
        pthread_mutex_lock(&am->mu);
        rc = fm_model_predict(am->model, x, rows, y, &err);
        pthread_mutex_unlock(&am->mu);
    }
    fm_free(x);
    if (rc) {
        fm_free(y);
        mlflow_error(r, 500, "inference failed");
        return;
    }
    /* As `mlflow models serve` answers a multi-output regressor: one list of
     * outputs per row (a bare number per row for a single output). */
    json_t *pred = json_array();
    for (size_t i = 0; pred && i < rows; i++) {
        if (no == 1) {
            json_array_append_new(pred, json_real(y[i]));
            continue;
        }
        json_t *row = json_array();
        for (size_t k = 0; k < no; k++)
            json_array_append_new(row, json_real(y[i * no + k]));
        json_array_append_new(pred, row);
    }
    fm_free(y);
    api_audit(r, NULL, "model.invocations", am->ref, "ok", json_pack("{s:I}", "rows",
                                                                      (json_int_t)rows));
    api_json(r, 200, json_pack("{s:o}", "predictions", pred));
}

/* ---- lineage of a prediction ------------------------------------------------------ */

/* The manifest's training section of the bundled model (model.dir). */
static json_t *bundled_training(const fm_http *h)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/manifest.json", h->cfg.model_dir);
    json_t *man = json_load_file(path, 0, NULL);
    json_t *tr = json_incref(json_object_get(man, "training"));
    json_decref(man);
    return tr ? tr : json_null();
}

/* {"features": {name: value}, "contributions": {output: {feature: c,
 * "bias": b}}} for the measurement under model e. NULL on failure. */
static json_t *explain(api_model *e, json_t *measurement)
{
    char *text = json_dumps(measurement, JSON_COMPACT);
    if (!text)
        return NULL;
    fm_measurement m;
    fm_verr ve;
    float feat[FM_FEATURES_MAX], c[FM_OUTPUTS_MAX * (FM_FEATURES_MAX + 1)];
    int rc = fm_measurement_parse(text, strlen(text), &m, &ve);
    fm_free(text);
    if (rc)
        return NULL;
    rc = fm_features_extract(&m, feat, &ve);
    fm_measurement_free(&m);
    if (rc)
        return NULL;
    fm_errbuf err;
    pthread_mutex_lock(&e->mu);
    rc = fm_model_contributions(e->model, feat, c, &err);
    pthread_mutex_unlock(&e->mu);
    if (rc)
        return NULL;
    size_t nf = fm_feature_count(), no = fm_model_output_count(e->model);
    json_t *features = json_object(), *contrib = json_object();
    for (size_t f = 0; f < nf; f++)
        json_object_set_new(features, fm_feature_name(f),
                            isfinite(feat[f]) ? json_real(feat[f]) : json_null());
    for (size_t o = 0; o < no; o++) {
        json_t *row = json_object();
        for (size_t f = 0; f < nf; f++)
            json_object_set_new(row, fm_feature_name(f), json_real(c[o * (nf + 1) + f]));
        json_object_set_new(row, "bias", json_real(c[o * (nf + 1) + nf]));
        json_object_set_new(contrib, fm_model_output_at(e->model, o)->name, row);
    }
    return json_pack("{s:s,s:o,s:o,s:s}", "model", e->ref, "features", features,
                     "contributions", contrib, "method", "TreeSHAP (XGBoost pred_contribs)");
}

bool api_lineage_model(api_req *r, const char *ref, json_t *measurement, json_t **out)
{
    fm_http *h = r->h;
    char name[65] = "", version[33] = "";
    const char *at = strchr(ref, '@');
    if (at && (size_t)(at - ref) < sizeof name && strlen(at + 1) < sizeof version) {
        memcpy(name, ref, (size_t)(at - ref));
        snprintf(version, sizeof version, "%s", at + 1);
    }
    json_t *info = NULL;
    api_model *e = NULL;
    fm_model_rec v;
    int rc = name[0] ? r->store->models->version_get(r->store, name, version, &v) : FM_ENOTFOUND;
    if (rc == 0 && visible(r, &v)) {
        info = fm_model_version_json(&v, false);
        json_t *man = json_loads(v.manifest_json, 0, NULL);
        json_object_set_new(info, "registered", json_true());
        json_object_set(info, "training", json_object_get(man, "training"));
        json_decref(man);
        fm_model_rec_clear(&v);
        pthread_mutex_lock(&h->models_mu);
        e = load_entry(r, name, version);
        pthread_mutex_unlock(&h->models_mu);
        if (!e) { /* answered by load_entry; lineage still stands without it */
            json_decref(r->out);
            r->out = NULL;
            r->status = 0;
        }
    } else if (rc == 0 || rc == FM_ENOTFOUND) {
        if (rc == 0)
            fm_model_rec_clear(&v);
        bool bundled = strcmp(ref, h->model_ref) == 0;
        info = json_pack("{s:s,s:s,s:b,s:s?}", "name", name, "version", version, "registered", 0,
                         "source", bundled ? "bundled (model.dir)" : NULL);
        if (bundled) {
            json_object_set_new(info, "training", bundled_training(h));
            e = h->models[0];
        }
    } else {
        api_store_error(r, rc);
        return false;
    }
    json_t *ex = e ? explain(e, measurement) : NULL;
    *out = json_pack("{s:o,s:o}", "version_info", info ? info : json_null(), "explanation",
                     ex ? ex : json_null());
    return true;
}

/* ---- drift --------------------------------------------------------------------------- */

typedef struct drift_ctx {
    api_req *r;
    const char *name;
    json_t *items;
    int rc;
} drift_ctx;

/* The model behind ref for drift: the bundled one or a registered version
 * (loaded when needed); NULL when it cannot be had. */
static api_model *model_of_ref(api_req *r, const char *ref)
{
    fm_http *h = r->h;
    if (strcmp(ref, h->model_ref) == 0)
        return h->models[0];
    char name[65], version[33];
    const char *at = strchr(ref, '@');
    if (!at || (size_t)(at - ref) >= sizeof name || strlen(at + 1) >= sizeof version)
        return NULL;
    memcpy(name, ref, (size_t)(at - ref));
    name[at - ref] = '\0';
    snprintf(version, sizeof version, "%s", at + 1);
    pthread_mutex_lock(&h->models_mu);
    api_model *e = load_entry(r, name, version);
    pthread_mutex_unlock(&h->models_mu);
    if (!e) { /* load_entry answered; drift reports the version without PSI */
        json_decref(r->out);
        r->out = NULL;
        r->status = 0;
    }
    return e;
}

static int on_drift(void *ud, const fm_drift_counts *c)
{
    drift_ctx *k = ud;
    size_t nl = strlen(k->name);
    if (strncmp(c->model, k->name, nl) != 0 || c->model[nl] != '@')
        return 0;
    api_model *e = model_of_ref(k->r, c->model);
    json_t *o = json_pack("{s:s,s:I}", "model", c->model, "measurements", (json_int_t)c->n);
    if (!e || !fm_model_has_baseline(e->model)) {
        json_object_set_new(o, "psi", json_null());
        json_object_set_new(o, "note", json_string("this version has no feature baseline"));
    } else {
        double psi[FM_FEATURES_MAX];
        size_t worst;
        double max = fm_drift_psi_all(e->model, c, psi, &worst);
        json_t *pf = json_object();
        for (size_t f = 0; f < fm_feature_count(); f++)
            json_object_set_new(pf, fm_feature_name(f), json_real(psi[f]));
        const fm_config *cfg = &k->r->h->cfg;
        json_object_set_new(o, "psi_max", json_real(max));
        json_object_set_new(o, "worst_feature", json_string(fm_feature_name(worst)));
        json_object_set_new(o, "psi", pf);
        json_object_set_new(o, "alert", json_boolean(max * 100.0 >= cfg->drift_psi_pct &&
                                                     c->n >= (uint64_t)cfg->drift_min_count));
    }
    json_array_append_new(k->items, o);
    return 0;
}

void v1_model_drift(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    int64_t day = r->now_ms / 86400000;
    const char *ds = api_query(r, "day");
    if (ds) {
        char buf[40];
        int64_t ms;
        snprintf(buf, sizeof buf, "%.10sT00:00:00Z", ds);
        if (strlen(ds) != 10 || fm_rfc3339_parse(buf, &ms) != 0) {
            api_error(r, 400, "invalid_request", "day must be YYYY-MM-DD (UTC)");
            return;
        }
        day = ms / 86400000;
    }
    drift_ctx k = {.r = r, .name = r->params[0], .items = json_array()};
    int rc = k.items ? r->store->models->drift_get(r->store, tenant, day, on_drift, &k)
                     : FM_ENOMEM;
    if (rc) {
        json_decref(k.items);
        api_store_error(r, rc);
        return;
    }
    char dbuf[40];
    fm_rfc3339(day * 86400000, dbuf, sizeof dbuf);
    dbuf[10] = '\0';
    api_json(r, 200,
             json_pack("{s:s,s:s,s:f,s:i,s:o}", "tenant", tenant, "day", dbuf, "threshold",
                       r->h->cfg.drift_psi_pct / 100.0, "min_measurements",
                       r->h->cfg.drift_min_count, "items", k.items));
}

/* ---- training jobs -------------------------------------------------------------------- */

static json_t *job_json(const fm_train_job *j, const char *family)
{
    char c[40], u[40], ref[128];
    snprintf(ref, sizeof ref, "%s@%s", family, j->version);
    json_t *o = json_pack("{s:I,s:s,s:s,s:s,s:i,s:s,s:I,s:s,s:s,s:s,s:s}", "id", (json_int_t)j->id,
                          "tenant", j->tenant, "status", j->status, "phase", j->phase, "percent",
                          j->percent, "version", j->version, "rows", (json_int_t)j->rows, "node",
                          j->node, "requested_by", j->requested_by, "created_at",
                          fm_rfc3339(j->created_ms, c, sizeof c), "updated_at",
                          fm_rfc3339(j->updated_ms, u, sizeof u));
    if (o && j->error[0])
        json_object_set_new(o, "error", json_string(j->error));
    if (o && strcmp(j->status, "done") == 0)
        json_object_set_new(o, "model", json_string(ref));
    return o;
}

void v1_training_job_create(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    const char *version = NULL, *from = NULL, *to = NULL;
    char msg[MSG];
    fm_train_job j = {.created_ms = r->now_ms};
    if (fm_api_get_str(r->json, "version", true, 32, &version, msg, sizeof msg) ||
        fm_api_get_str(r->json, "from", false, 40, &from, msg, sizeof msg) ||
        fm_api_get_str(r->json, "to", false, 40, &to, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (!fm_modelreg_version_valid(version) || (from && fm_rfc3339_parse(from, &j.from_ms)) ||
        (to && fm_rfc3339_parse(to, &j.to_ms))) {
        api_error(r, 400, "invalid_request",
                  "version must be [A-Za-z0-9][A-Za-z0-9._-]{0,31}; from and to RFC 3339 times");
        return;
    }
    snprintf(j.tenant, sizeof j.tenant, "%s", tenant);
    snprintf(j.node, sizeof j.node, "%s", r->h->cfg.node_id);
    snprintf(j.version, sizeof j.version, "%s", version);
    snprintf(j.requested_by, sizeof j.requested_by, "%s", r->actor);
    fm_errbuf err;
    int rc = r->store->models->job_add(r->store, &j, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    snprintf(j.phase, sizeof j.phase, "queued");
    j.updated_ms = j.created_ms;
    fm_thread_lock(&r->h->trainer);
    fm_thread_wake(&r->h->trainer);
    fm_thread_unlock(&r->h->trainer);
    api_audit(r, tenant, "training.start", version, "ok", json_pack("{s:I}", "job",
                                                                     (json_int_t)j.id));
    api_json(r, 202, job_json(&j, fm_model_name(r->h->model)));
}

void v1_training_job_get(api_req *r)
{
    char *end;
    long long id = strtoll(r->params[0], &end, 10);
    fm_train_job j;
    int rc = *end || id <= 0 ? FM_ENOTFOUND : r->store->models->job_get(r->store, id, &j);
    if (rc == 0 && !fm_auth_tenant_allowed(&r->who, j.tenant))
        rc = FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no such training job");
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_json(r, 200, job_json(&j, fm_model_name(r->h->model)));
}

typedef struct progress_ctx {
    fm_store *st;
    fm_train_job *job;
} progress_ctx;

static void job_progress(void *ud, const char *phase, int percent)
{
    progress_ctx *c = ud;
    snprintf(c->job->phase, sizeof c->job->phase, "%s", phase);
    c->job->percent = percent;
    c->job->updated_ms = fm_wall_ms();
    fm_errbuf err;
    c->st->models->job_update(c->st, c->job, &err);
}

static void run_job(fm_http *h, fm_store *st, fm_train_job *j)
{
    fm_lake_train_opts o = {.name = fm_model_name(h->model), .version = j->version,
                            .tenant = j->tenant, .from_ms = j->from_ms, .to_ms = j->to_ms,
                            .owner_tenant = j->tenant, .actor = j->requested_by,
                            .job_id = j->id};
    progress_ctx pc = {.st = st, .job = j};
    o.progress = job_progress;
    o.progress_ud = &pc;
    fm_lake_train_report rep;
    fm_errbuf err;
    int rc = fm_model_train_lake(&h->cfg, st, &o, &rep, &err);
    j->rows = (int64_t)rep.labelled;
    j->updated_ms = fm_wall_ms();
    if (rc == 0) {
        snprintf(j->status, sizeof j->status, "done");
        snprintf(j->phase, sizeof j->phase, "done");
        j->percent = 100;
    } else {
        snprintf(j->status, sizeof j->status, "failed");
        snprintf(j->error, sizeof j->error, "%.255s", err.msg);
    }
    st->models->job_update(st, j, &err);
    fm_logkv(rc ? FM_LOG_WARN : FM_LOG_INFO, "model", rc ? "training job failed" : "training job done",
             "version", j->version, "tenant", j->tenant, rc ? "error" : NULL, j->error, NULL);
}

static void *trainer_main(void *arg)
{
    fm_http *h = arg;
    /* Training never competes with ingestion: this thread runs at the
     * lowest priority, one job at a time, XGBoost on one thread. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    fm_store *st = NULL;
    fm_errbuf err;
    if (fm_store_open(&h->cfg, &st, &err) != 0) {
        fm_logkv(FM_LOG_ERROR, "model", "training jobs unavailable", "error", err.msg, NULL);
        return NULL;
    }
    /* A job that was running when this node stopped registered nothing
     * (registration is its last, single step): say so. */
    st->models->job_fail_running(st, h->cfg.node_id, fm_wall_ms(), &err);
    fm_thread_lock(&h->trainer);
    while (!fm_thread_should_stop(&h->trainer)) {
        fm_thread_unlock(&h->trainer);
        fm_train_job j;
        bool ran = st->models->job_take(st, h->cfg.node_id, fm_wall_ms(), &j) == 0;
        if (ran)
            run_job(h, st, &j);
        fm_thread_lock(&h->trainer);
        if (!ran && !fm_thread_should_stop(&h->trainer))
            fm_thread_wait_ns(&h->trainer, 1000ll * 1000000ll);
    }
    fm_thread_unlock(&h->trainer);
    fm_store_close(st);
    return NULL;
}

int api_trainer_start(fm_http *h, fm_errbuf *err)
{
    if (fm_thread_start(&h->trainer, "fm-train", trainer_main, h) != 0)
        return fm_errf(err, FM_ENOMEM, "cannot start the training thread");
    return 0;
}

void api_trainer_stop(fm_http *h) { fm_thread_stop(&h->trainer); }
