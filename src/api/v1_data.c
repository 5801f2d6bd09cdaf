/*
 * API v1: measurements and their results, labels (reference values for
 * retraining), the model as a web endpoint, the audit log and the OpenAPI
 * document.
 */
#include "api/api_int.h"
#include "fleetml/measurement.h"
#include "fleetml/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MSG 192

static json_t *parse_doc(const char *text, size_t len)
{
    json_t *j = text ? json_loadb(text, len, 0, NULL) : NULL;
    return j ? j : json_null();
}

json_t *api_record_json(const fm_record *rec, bool full)
{
    json_t *o = json_pack("{s:s,s:o,s:o,s:s}", "id", rec->measurement_id, "received_at",
                          fm_json_time(rec->received_ms), "taken_at", fm_json_time(rec->taken_ms), "model",
                          rec->model);
    if (!o)
        return NULL;
    if (full) {
        json_object_set_new(o, "device_id", json_string(rec->device_id));
        json_object_set_new(o, "measurement", parse_doc(rec->payload, rec->payload_len));
    }
    json_object_set_new(o, "result",
                        parse_doc(rec->result_json, rec->result_json ? strlen(rec->result_json) : 0));
    if (rec->shadow_json)
        json_object_set_new(o, "shadow", parse_doc(rec->shadow_json, strlen(rec->shadow_json)));
    return o;
}

typedef struct meas_page {
    json_t *items;
    int64_t last_ms, last_seq; /* the newest row seen */
    int64_t prev_ms, prev_seq; /* the row before it */
} meas_page;

static int on_record(void *ud, const fm_record *rec)
{
    meas_page *p = ud;
    json_array_append_new(p->items, api_record_json(rec, false));
    p->prev_ms = p->last_ms;
    p->prev_seq = p->last_seq;
    p->last_ms = rec->received_ms;
    p->last_seq = rec->seq;
    return 0;
}

/* GET /devices/{id}/events: the device's new measurements, live (stream.c). */
void v1_device_events(api_req *r)
{
    fm_device d;
    if (api_device_visible(r, r->params[0], &d))
        api_stream_open(r, d.id);
}

void v1_measurements_list(api_req *r)
{
    fm_device d;
    size_t limit;
    int64_t cms, cseq, from, to;
    char cs[8];
    if (!api_device_visible(r, r->params[0], &d) ||
        !api_page_args(r, &limit, &cms, &cseq, cs, sizeof cs) || !api_time_arg(r, "from", &from) ||
        !api_time_arg(r, "to", &to))
        return;
    if (from && to && to <= from) {
        api_error(r, 400, "invalid_request", "to must be later than from");
        return;
    }
    fm_measurement_query q = {.device_id = d.id, .from_ms = from, .to_ms = to,
                              .cursor_ms = cms, .cursor_seq = cseq, .limit = limit + 1};
    meas_page p = {.items = json_array()};
    int rc = fm_store_measurement_page(r->store, &q, on_record, &p);
    char next[128] = "";
    /* The cursor is the last row shown: the one before the extra row. */
    if (!rc && api_page_more(p.items, limit))
        fm_api_cursor_encode(p.prev_ms, p.prev_seq, "", next, sizeof next);
    if (!rc) {
        char target[80];
        snprintf(target, sizeof target, "device:%s", d.id);
        api_audit(r, d.tenant, "measurement.list", target, "ok",
                  json_pack("{s:I}", "count", (json_int_t)json_array_size(p.items)));
    }
    api_page_answer(r, rc, p.items, next);
}

typedef struct one_record {
    json_t *doc;
} one_record;

static int on_one(void *ud, const fm_record *rec)
{
    one_record *o = ud;
    o->doc = api_record_json(rec, true);
    return 1;
}

static json_t *label_json(const fm_label *l)
{
    return json_pack("{s:o,s:s,s:s,s:o}", "outputs",
                     parse_doc(l->outputs_json, l->outputs_json ? strlen(l->outputs_json) : 0),
                     "source", l->source ? l->source : "", "labelled_by",
                     l->labelled_by ? l->labelled_by : "", "labelled_at", fm_json_time(l->at_ms));
}

/* The measurement of the path with its result, shadow and label, for a
 * device the caller may see. NULL when answered already (404, 5xx). */
static json_t *measurement_doc(api_req *r, fm_device *d)
{
    if (!api_device_visible(r, r->params[0], d))
        return NULL;
    one_record o = {0};
    int rc = fm_store_measurement_get(r->store, d->id, r->params[1], on_one, &o);
    if (rc == FM_ENOTFOUND || (rc == 0 && !o.doc)) {
        api_error(r, 404, "not_found", "no such measurement");
        return NULL;
    }
    if (rc) {
        json_decref(o.doc);
        api_store_error(r, rc);
        return NULL;
    }
    fm_label l;
    char source[160], by[80];
    rc = fm_store_label_get(r->store, d->id, r->params[1], &l, source, sizeof source, by,
                            sizeof by);
    if (rc == 0) {
        json_object_set_new(o.doc, "label", label_json(&l));
        fm_free((char *)l.outputs_json);
    } else if (rc == FM_ENOTFOUND) {
        json_object_set_new(o.doc, "label", json_null());
    } else {
        json_decref(o.doc);
        api_store_error(r, rc);
        return NULL;
    }
    return o.doc;
}

static int on_label(void *ud, const fm_label *l)
{
    json_array_append_new(ud, label_json(l));
    return 0;
}

/* GET /devices/{id}/measurements/{mid}/labels: every label written for the
 * measurement, oldest first (the last is the current one). */
void v1_label_history(api_req *r)
{
    fm_device d;
    if (!api_device_visible(r, r->params[0], &d))
        return;
    json_t *items = json_array();
    int rc = fm_store_label_history(r->store, d.id, r->params[1], on_label, items);
    if (rc) {
        json_decref(items);
        api_store_error(r, rc);
        return;
    }
    char target[240];
    snprintf(target, sizeof target, "measurement:%s/%s", d.id, r->params[1]);
    api_audit(r, d.tenant, "label.history", target, "ok", NULL);
    api_json(r, 200, json_pack("{s:o}", "items", items));
}

void v1_measurement_get(api_req *r)
{
    fm_device d;
    json_t *doc = measurement_doc(r, &d);
    if (!doc)
        return;
    char target[240];
    snprintf(target, sizeof target, "measurement:%s/%s", d.id, r->params[1]);
    api_audit(r, d.tenant, "measurement.read", target, "ok", NULL);
    api_json(r, 200, doc);
}

/* Lineage of a prediction: the measurement, its device, the result and
 * the exact model version (with its approval and training lineage), the
 * shadow answer and the label if any, and why the model answered what it
 * did (each feature's contribution to each output, computed now, off the
 * reply path). */
void v1_lineage(api_req *r)
{
    fm_device d;
    json_t *doc = measurement_doc(r, &d);
    if (!doc)
        return;
    json_object_set_new(doc, "device",
                        json_pack("{s:s,s:s,s:s,s:s,s:s}", "id", d.id, "tenant", d.tenant, "group",
                                  d.device_group, "serial_number", d.serial_number, "model",
                                  d.model));
    const char *ref = json_string_value(json_object_get(doc, "model"));
    json_t *mj = NULL;
    if (!api_lineage_model(r, ref ? ref : "", json_object_get(doc, "measurement"), &mj)) {
        json_decref(doc);
        return;
    }
    json_object_set(doc, "model_version", json_object_get(mj, "version_info"));
    json_object_set(doc, "explanation", json_object_get(mj, "explanation"));
    json_decref(mj);
    char target[240];
    snprintf(target, sizeof target, "measurement:%s/%s", d.id, r->params[1]);
    api_audit(r, d.tenant, "measurement.lineage", target, "ok", NULL);
    api_json(r, 200, doc);
}

void v1_label_put(api_req *r)
{
    fm_device d;
    if (!api_device_visible(r, r->params[0], &d))
        return;
    json_t *outputs = json_object_get(r->json, "outputs");
    const char *source = NULL;
    char msg[MSG];
    const char *names[FM_OUTPUTS_MAX];
    size_t n = fm_model_output_count(r->h->model);
    for (size_t i = 0; i < n && i < FM_OUTPUTS_MAX; i++)
        names[i] = fm_model_output_at(r->h->model, i)->name;
    if (!json_is_object(outputs)) {
        api_error(r, 400, "invalid_request", "field 'outputs' must be an object");
        return;
    }
    if (fm_api_get_str(r->json, "source", true, 128, &source, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (fm_api_check_label_outputs(outputs, names, n, msg, sizeof msg)) {
        api_error(r, 422, "validation_failed", "%s", msg);
        return;
    }
    char *text = json_dumps(outputs, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    if (!text) {
        api_error(r, 500, "internal", "out of memory");
        return;
    }
    fm_label l = {.device_id = d.id, .tenant = d.tenant, .measurement_id = r->params[1],
                  .outputs_json = text, .source = source, .labelled_by = r->who.username,
                  .at_ms = r->now_ms};
    fm_errbuf err;
    int rc = fm_store_label_put(r->store, &l, &err);
    char target[240];
    snprintf(target, sizeof target, "measurement:%s/%s", d.id, r->params[1]);
    if (rc == FM_ENOTFOUND) {
        fm_free(text);
        api_error(r, 404, "not_found", "no such measurement");
        return;
    }
    if (rc) {
        fm_free(text);
        api_store_error(r, rc);
        return;
    }
    /* The values go into the audit entry too: the labels table keeps the
     * current label only, the audit log keeps every correction. */
    api_audit(r, d.tenant, "label.write", target, "ok",
              json_pack("{s:s,s:O}", "source", source, "outputs", outputs));
    api_json(r, 200, label_json(&l));
    fm_free(text);
}

/* ---- models ---- */

static json_t *model_json(const fm_model *m)
{
    json_t *feats = json_array(), *outs = json_array();
    for (size_t i = 0; i < fm_feature_count(); i++)
        json_array_append_new(feats, json_string(fm_feature_name(i)));
    for (size_t i = 0; i < fm_model_output_count(m); i++) {
        const fm_model_output *o = fm_model_output_at(m, i);
        json_array_append_new(outs, json_pack("{s:s,s:s,s:f,s:f}", "name", o->name, "unit",
                                              o->unit, "min", o->min, "max", o->max));
    }
    return json_pack("{s:s,s:s,s:o,s:o}", "name", fm_model_name(m), "version",
                     fm_model_version(m), "features", feats, "outputs", outs);
}

void v1_models_list(api_req *r)
{
    api_page_answer(r, 0, json_pack("[o]", model_json(r->h->model)), NULL);
}

/* Maps a result document's error to an HTTP answer. */
static void answer_result_error(api_req *r, json_t *doc)
{
    json_t *e = json_object_get(doc, "error");
    const char *code = json_string_value(json_object_get(e, "code"));
    const char *message = json_string_value(json_object_get(e, "message"));
    if (!code)
        code = FM_VERR_INTERNAL;
    unsigned st = 422;
    if (strcmp(code, FM_VERR_UNAVAILABLE) == 0 || strcmp(code, FM_VERR_RATE_LIMITED) == 0) {
        st = 503;
        r->retry_after = 1;
    } else if (strcmp(code, FM_VERR_TOO_LARGE) == 0) {
        st = 413;
    } else if (strcmp(code, FM_VERR_INTERNAL) == 0) {
        st = 500;
    } else if (strcmp(code, FM_VERR_DEVICE_INACTIVE) == 0 ||
               strcmp(code, FM_VERR_UNKNOWN_DEVICE) == 0) {
        st = 409;
    }
    api_error(r, st, code, "%s", message ? message : code);
}

/* Waiting for the pipeline's answer: shared by the HTTP thread and the
 * pipeline thread, freed by whichever lets go last. */
typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    bool done;
    char *doc;
    size_t len;
} waiter;

static void waiter_release(waiter *w)
{
    pthread_mutex_lock(&w->mu);
    int left = --w->refs;
    pthread_mutex_unlock(&w->mu);
    if (left)
        return;
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    fm_free(w->doc);
    fm_free(w);
}

static void on_reply(void *ud, const char *doc, size_t len)
{
    waiter *w = ud;
    pthread_mutex_lock(&w->mu);
    if (doc && !w->done) {
        w->doc = fm_strndup(doc, len);
        w->len = len;
    }
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    waiter_release(w);
}

/* ?store=true&device=<id>: through the pipeline, exactly as if the device
 * had published it (dedupe, group commit, lake), answered after commit. */
static void predict_store(api_req *r, const char *device)
{
    fm_device d;
    if (!api_device_visible(r, device, &d))
        return;
    if (!r->h->pipeline) {
        r->retry_after = 1;
        api_error(r, 503, "unavailable", "the measurement pipeline is not running");
        return;
    }
    waiter *w = fm_calloc(1, sizeof *w);
    fm_inmsg *m = w ? fm_inmsg_new(d.id, r->body, r->body_len, NULL, NULL, 0) : NULL;
    if (!m) {
        fm_free(w);
        api_error(r, 500, "internal", "out of memory");
        return;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->refs = 2;
    fm_inmsg_set_reply(m, on_reply, w);
    fm_inmsg_set_received(m, fm_mono_ns(), r->now_ms);
    if (fm_pipeline_submit(r->h->pipeline, m) != 0) {
        /* on_reply will never run: drop the pipeline's reference too. */
        fm_inmsg_free(m);
        waiter_release(w);
        waiter_release(w);
        r->retry_after = 1;
        api_error(r, 503, "unavailable", "platform overloaded, retry later");
        return;
    }
    struct timespec ts;
    fm_deadline_ns(&ts, CLOCK_REALTIME, (int64_t)API_PREDICT_WAIT_MS * 1000000);
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        if (pthread_cond_timedwait(&w->cv, &w->mu, &ts) != 0)
            break;
    char *doc = w->done ? w->doc : NULL;
    w->doc = NULL;
    bool done = w->done;
    pthread_mutex_unlock(&w->mu);
    waiter_release(w);
    char target[80];
    snprintf(target, sizeof target, "device:%s", d.id);
    if (!done || !doc) {
        fm_free(doc);
        r->retry_after = 1;
        api_error(r, 503, "unavailable",
                  "no answer from the pipeline in time; retry with the same measurement id");
        return;
    }
    json_t *j = json_loads(doc, 0, NULL);
    fm_free(doc);
    const char *status = json_string_value(json_object_get(j, "status"));
    api_audit(r, d.tenant, "model.predict", target,
              status && strcmp(status, "ok") == 0 ? "ok" : "failed",
              json_pack("{s:b}", "stored", 1));
    if (status && strcmp(status, "ok") == 0)
        api_json(r, 200, j);
    else {
        answer_result_error(r, j);
        json_decref(j);
    }
}

void v1_predict(api_req *r)
{
    fm_http *h = r->h;
    if ((long)r->body_len > h->cfg.max_payload) {
        api_error(r, 413, FM_VERR_TOO_LARGE, "the measurement is %zu bytes, the limit is %d",
                  r->body_len, h->cfg.max_payload);
        return;
    }
    const char *store = api_query(r, "store");
    if (store && strcmp(store, "true") != 0 && strcmp(store, "false") != 0) {
        api_error(r, 400, "invalid_request", "store must be true or false");
        return;
    }
    if (store && strcmp(store, "true") == 0) {
        const char *device = api_query(r, "device");
        if (!device || !*device) {
            api_error(r, 400, "invalid_request", "store=true needs device=<id>");
            return;
        }
        if (api_query(r, "version")) {
            api_error(r, 400, "invalid_request",
                      "store=true scores with the device's deployment; version is not allowed");
            return;
        }
        if (strcmp(r->params[0], fm_model_name(h->model)) != 0) {
            api_error(r, 404, "not_found", "no such model");
            return;
        }
        predict_store(r, device);
        return;
    }
    api_model *am = api_model_for(r, r->params[0], api_query(r, "version"));
    if (!am)
        return;
    fm_measurement m;
    fm_verr e;
    float feat[FM_FEATURES_MAX], out[FM_OUTPUTS_MAX];
    int rc = fm_measurement_parse(r->body, r->body_len, &m, &e);
    if (rc == 0) {
        rc = fm_features_extract(&m, feat, &e);
        if (rc)
            fm_measurement_free(&m);
    }
    if (rc) {
        api_audit(r, NULL, "model.predict", "", "failed", json_pack("{s:s}", "code", e.code));
        api_error(r, 422, e.code, "%s", e.message);
        return;
    }
    fm_errbuf err;
    pthread_mutex_lock(&am->mu);
    rc = fm_model_predict(am->model, feat, 1, out, &err);
    pthread_mutex_unlock(&am->mu);
    char *doc = rc ? NULL : fm_result_ok_json(am->model, am->ref, m.id, out, r->now_ms);
    fm_measurement_free(&m);
    if (!doc) {
        api_error(r, 500, "internal", "inference failed");
        return;
    }
    api_audit(r, NULL, "model.predict", "", "ok", json_pack("{s:b}", "stored", 0));
    r->status = 200;
    r->text = doc;
    r->text_len = strlen(doc);
    r->text_type = "application/json";
}

/* ---- audit ---- */

static int on_audit(void *ud, const fm_audit *a)
{
    json_t *items = ud;
    json_t *details = a->details_json ? json_loads(a->details_json, 0, NULL) : NULL;
    json_array_append_new(
        items, json_pack("{s:I,s:o,s:s,s:s,s:s,s:s,s:s,s:s,s:o}", "seq", (json_int_t)a->seq,
                            "at", fm_json_time(a->at_ms), "tenant", a->tenant, "actor", a->actor,
                            "action", a->action, "target", a->target, "outcome", a->outcome,
                            "client", a->client, "details", details ? details : json_object()));
    return 0;
}

void v1_audit_list(api_req *r)
{
    size_t limit;
    int64_t before, unused;
    char cs[8];
    fm_audit_filter f = {0};
    if (!api_page_args(r, &limit, &before, &unused, cs, sizeof cs) ||
        !api_time_arg(r, "from", &f.from_ms) || !api_time_arg(r, "to", &f.to_ms))
        return;
    /* An operator sees every tenant unless it names one. */
    const char *tenant = r->who.tenant;
    if (r->who.role_mask & FM_ROLE_OPERATOR) {
        tenant = NULL;
        if (api_query(r, "tenant") && !api_scope_tenant(r, &tenant))
            return;
    }
    f.tenant = tenant;
    f.actor = api_query(r, "actor");
    f.action = api_query(r, "action");
    f.before_seq = before;
    json_t *items = json_array();
    int rc = fm_store_audit_page(r->store, &f, limit + 1, on_audit, items);
    char next[128] = "";
    if (!rc && api_page_more(items, limit)) {
        json_t *last = json_array_get(items, limit - 1);
        fm_api_cursor_encode(json_integer_value(json_object_get(last, "seq")), 0, "", next,
                             sizeof next);
    }
    api_page_answer(r, rc, items, next);
}

void v1_openapi(api_req *r)
{
    r->status = 200;
    r->text = fm_strndup(r->h->openapi, r->h->openapi_len);
    r->text_len = r->h->openapi_len;
    r->text_type = "application/yaml";
}
