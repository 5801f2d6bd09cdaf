/* Internals of the HTTP API shared by src/api/http.c and the v1_*.c
 * handler files. */
#ifndef FLEETML_API_INT_H
#define FLEETML_API_INT_H

#include "fleetml/api.h"
#include "fleetml/auth.h"
#include "fleetml/json.h"
#include "fleetml/model.h"
#include "fleetml/metrics.h"
#include "fleetml/store.h"
#include "fleetml/thread.h"

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>

#define API_PREFIX "/api/v1"
#define API_MAX_PARAMS 3
#define API_BODY_SMALL (16 * 1024)   /* sign-in, passwords, users */
#define API_BODY_DEFAULT (64 * 1024)
#define API_BODY_PREDICT (256 * 1024)
#define API_BODY_MODEL (48 * 1024 * 1024) /* a model file, base64 in JSON */
#define API_BODY_INVOCATIONS (4 * 1024 * 1024) /* MLflow scoring: up to 10,000 rows */
#define API_BODY_EMPTY_MAX 64        /* routes without a body: "{}" at most */
#define API_PAGE_DEFAULT 50
#define API_PAGE_MAX 500
#define API_PREDICT_WAIT_MS 10000

/* A pool of store handles: one per HTTP thread at most, handed out per
 * request (SQLite handles must not be shared between threads at once). */
typedef struct api_store_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fm_store **free;
    size_t nfree, cap;
} api_store_pool;

struct conn_track;
struct addr_count;

/* A model the HTTP threads score with (predict, invocations): the bundled
 * one, or a registered version loaded on first use and kept until the
 * listener stops. XGBoost boosters take one caller at a time: mu. */
typedef struct api_model {
    fm_model *model;
    char ref[128];   /* name@version */
    bool owned;      /* loaded here (the bundled one is h->model) */
    pthread_mutex_t mu;
} api_model;

typedef struct api_stream api_stream;

struct fm_http {
    struct MHD_Daemon *daemon; /* the API listener */
    struct MHD_Daemon *ops;    /* the operations listener */
    /* The edge thread cuts slow connections; its lock guards conns and
     * inflight. */
    fm_thread edge;
    /* Snapshots of fleetml_reply_seconds every STATUS_SNAP_S (the edge
     * thread takes them, under its lock), so /status shows the latency of
     * the last minute rather than since start. */
    fm_hist_snap reply_snaps[8];
    uint64_t reply_snap_ns[8];
    int reply_nsnaps, reply_snap_next;
    struct conn_track *conns;
    struct addr_count *inflight;
    size_t ninflight, inflight_cap;
    fm_config cfg;
    fm_health_fn health;
    void *ud;
    struct fm_pipeline *pipeline;
    struct fm_fn_registry *functions; /* this node's functions (GET /functions); may be NULL */
    int fault; /* FM_FAULT_INJECTION=1 at start: /debug/fault exists */
    int tls;
    fm_jwt_key *jwt;
    api_store_pool pool;
    fm_throttle_policy throttle;
    fm_token_params tokens;
    unsigned mfa_roles;  /* roles that need a second factor (http.mfa_roles) */
    char (*proxies)[64]; /* trusted proxy addresses */
    size_t nproxies;
    char *openapi;       /* docs/openapi.yaml text, or NULL */
    size_t openapi_len;
    char *tls_cert, *tls_key;
    /* predict without storing: a model of our own, one caller at a time */
    pthread_mutex_t model_mu;
    fm_model *model;
    char model_ref[128];
    /* training jobs of this node, one at a time, at the lowest priority */
    fm_thread trainer;
    /* registered versions loaded for predict and invocations (models_mu) */
    pthread_mutex_t models_mu;
    api_model **models;
    size_t nmodels;
    _Atomic int64_t next_housekeeping_ms;
    /* live measurement streams (stream.c); streams_mu guards the list */
    pthread_mutex_t streams_mu;
    api_stream *streams;
    bool streams_stopping;
    fm_thread pump;
    bool pump_started;
    fm_store *pump_store;
};

/* One request being answered. Handlers fill status + out (or call
 * api_error) and may set retry_after / allow / location. */
typedef struct api_req {
    fm_http *h;
    struct MHD_Connection *conn;
    const char *method;
    const char *url;          /* the path as sent, e.g. /api/v1/devices/x */
    const char *params[API_MAX_PARAMS];
    char pbuf[API_MAX_PARAMS][160];
    const char *body;
    size_t body_len;
    json_t *json;             /* parsed body (routes that take one) */
    fm_store *store;
    int64_t now_ms;
    char client[64];
    bool authed;
    fm_principal who;
    char actor[160];          /* "user:<tenant>/<name>" or "anonymous" */
    /* the answer */
    unsigned status;
    json_t *out;
    char *text;               /* a non-JSON body (fm_malloc'd) with text_type */
    size_t text_len;
    const char *text_type;
    long retry_after;         /* > 0: Retry-After header */
    const char *allow;        /* 405: Allow header */
    bool www_authenticate;
    bool close;               /* Connection: close (nothing more is read) */
    api_stream *stream;       /* set by api_stream_open: answer with the stream */
} api_req;

typedef void (*api_handler)(api_req *r);
struct api_route;

typedef struct api_route {
    fm_api_route_info info;
    api_handler fn;
    size_t body_max; /* 0: no body accepted */
} api_route;

/* Finds the route for r->method and r->url (the path as sent) and copies
 * its percent-decoded path parameters into r->params. NULL when none; then
 * *path_known tells 405 from 404 and allow lists the methods the path has.
 * *bad_param: the route matched but a parameter decodes to a forbidden
 * byte (answer 400; r->params are not set). */
const api_route *api_route_find(api_req *r, char *allow, size_t allow_len, bool *path_known,
                                bool *bad_param);

/* ---- answers ---- */
void api_json(api_req *r, unsigned status, json_t *doc); /* consumes doc */
void api_error(api_req *r, unsigned status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Answers for a store failure: 503 unavailable (busy/disk/IO) or 500. */
void api_store_error(api_req *r, int rc);
void api_no_content(api_req *r);

/* ---- helpers ---- */
/* The tenant a list or create acts on: the caller's, or ?tenant= for an
 * operator (must exist). false: answered (400/404) already. */
bool api_scope_tenant(api_req *r, const char **tenant);
/* Reads device id from r, checks it exists and is visible to the caller
 * (same tenant or operator). false: answered 404 (also for another
 * tenant's device) or 5xx. */
bool api_device_visible(api_req *r, const char *id, fm_device *out);

/* The API's own Content-Security-Policy: nothing may run in its answers. */
#define API_CSP "default-src 'none'; frame-ancestors 'none'"

/* Cache-Control (cache), nosniff, no framing, the policy csp, no referrer,
 * and HSTS under TLS: the headers of every answer of the API listener. */
void api_security_headers(const fm_http *h, struct MHD_Response *resp, const char *cache,
                          const char *csp);

/* A stored measurement as the API shows it (MeasurementSummary, or with
 * full the MeasurementDetail fields but the label); a new reference. */
json_t *api_record_json(const fm_record *rec, bool full);
/* The node at a glance (GET /status on the operations listener; status.c):
 * health, devices per tenant from st (null when st is NULL or unreadable),
 * pipeline counters and reply latency since start, lake, model and
 * certificate ends. New reference. */
json_t *api_status_json(fm_http *h, fm_store *st);
/* Takes a reply-latency snapshot when the last is STATUS_SNAP_S old; the
 * edge thread calls it with its lock held. */
void api_status_tick(fm_http *h, uint64_t now_ns);

/* ---- live measurements (stream.c) ------------------------------------------
 * GET /devices/{id}/events: Server-Sent Events of the device's new
 * measurements; GET /fleet/events: devices going online and offline. A pump thread reads the records committed after its
 * position (any node's: it reads the shared store) every STREAM_POLL_MS
 * while any stream is open and appends an event to the streams of that
 * device; a stream with nothing to send suspends its connection (no thread
 * waits for it) and is resumed by the pump. */
int api_streams_start(fm_http *h, fm_errbuf *err);
/* Ends every stream (each gets end of stream) and stops the pump. */
void api_streams_stop(fm_http *h);
/* The handler's answer for a stream of device `id` (the caller has checked
 * access): sets r->stream; dispatch then answers 200 text/event-stream. */
void api_stream_open(api_req *r, const char *device_id);
/* The same for GET /fleet/events: presence changes of tenant's devices
 * (NULL: every tenant's, for an operator). */
void api_fleet_stream_open(api_req *r, const char *tenant);
/* Queues the response of r->stream on the connection. */
enum MHD_Result api_stream_answer(api_req *r);
/* limit (1..API_PAGE_MAX, default API_PAGE_DEFAULT) and the decoded cursor
 * (all zero/empty when absent). false: answered 400. */
bool api_page_args(api_req *r, size_t *limit, int64_t *ca, int64_t *cb, char *cs, size_t cs_len);
/* Parses an optional time query parameter (RFC 3339 or integer ms).
 * false: answered 400. */
bool api_time_arg(api_req *r, const char *name, int64_t *out);
/* Lists read one row more than the page holds: when items has more than
 * limit entries the extra one is removed and true returned (there is a
 * next page, whose cursor is the last entry kept). */
bool api_page_more(json_t *items, size_t limit);
/* api_page_more for lists ordered by a name (device id, username): when
 * there is a next page, next (>= 128 bytes) gets the cursor naming the
 * last entry kept (its string member `field`), else "". */
void api_page_more_by_name(json_t *items, size_t limit, const char *field, char *next,
                           size_t next_len);
/* Answers a list: a store error when rc != 0 (items freed), else 200
 * {"items": items, "next_cursor": next_cursor or null}. Consumes items. */
void api_page_answer(api_req *r, int rc, json_t *items, const char *next_cursor);
const char *api_query(api_req *r, const char *name);

/* Appends an audit entry (also exported to the lake's logs/). tenant NULL:
 * the caller's tenant. details consumed (may be NULL). Failures are logged
 * and counted, never shown to the client. */
void api_audit(api_req *r, const char *tenant, const char *action, const char *target,
               const char *outcome, json_t *details);

/* The model that scores for r on model name: version (any the caller may
 * see, pending too: for checking a candidate), else the caller's tenant's
 * production version of name, else the bundled model when name is its
 * name. NULL when answered already (404 no such model / version, 422 the
 * version cannot be loaded, 5xx). Lock e->mu around predictions. */
api_model *api_model_for(api_req *r, const char *name, const char *version);
/* For a prediction's lineage: *out = {"version_info": the version behind
 * model ref "name@version" (registration, approval, training lineage),
 * "explanation": each feature's contribution to each output for the
 * measurement document, or null when that version cannot be loaded}.
 * false when answered already (5xx). */
bool api_lineage_model(api_req *r, const char *ref, json_t *measurement, json_t **out);
/* Frees the loaded versions (at listener stop). */
void api_models_free(fm_http *h);

/* ---- handler groups (v1_*.c) ---- */
void v1_login(api_req *r);
void v1_refresh(api_req *r);
void v1_logout(api_req *r);
void v1_me(api_req *r);
void v1_me_password(api_req *r);
void v1_users_list(api_req *r);
void v1_users_create(api_req *r);
void v1_user_get(api_req *r);
void v1_user_roles(api_req *r);
void v1_user_disable(api_req *r);
void v1_user_enable(api_req *r);
void v1_mfa_totp_start(api_req *r);
void v1_mfa_totp_confirm(api_req *r);
void v1_mfa_totp_disable(api_req *r);
void v1_user_mfa_reset(api_req *r);

void v1_devices_list(api_req *r);
void v1_fleet_events(api_req *r);
void v1_device_get(api_req *r);
void v1_device_disable(api_req *r);
void v1_device_enable(api_req *r);
void v1_device_revoke(api_req *r);
void v1_shadow_get(api_req *r);
void v1_shadow_patch(api_req *r);
void v1_templates_list(api_req *r);
void v1_templates_create(api_req *r);
void v1_template_claim_cert(api_req *r);

void v1_measurements_list(api_req *r);
void v1_device_events(api_req *r);
void v1_measurement_get(api_req *r);
void v1_label_put(api_req *r);
void v1_label_history(api_req *r);
void v1_models_list(api_req *r);
void v1_predict(api_req *r);
void v1_audit_list(api_req *r);
void v1_model_push(api_req *r);
void v1_model_versions(api_req *r);
void v1_model_version_get(api_req *r);
void v1_model_approve(api_req *r);
void v1_model_reject(api_req *r);
void v1_model_aliases(api_req *r);
void v1_model_alias_put(api_req *r);
void v1_model_invocations(api_req *r);
void v1_lineage(api_req *r);
void v1_model_drift(api_req *r);
void v1_training_job_create(api_req *r);
void v1_training_job_get(api_req *r);
void v1_rules_list(api_req *r);
void v1_rule_get(api_req *r);
void v1_rule_put(api_req *r);
void v1_rule_delete(api_req *r);
void v1_rule_invocations(api_req *r);
void v1_rule_replay(api_req *r);
void v1_functions_list(api_req *r);
/* Starts / stops the training-job thread (v1_models.c). */
int api_trainer_start(fm_http *h, fm_errbuf *err);
void api_trainer_stop(fm_http *h);
void v1_openapi(api_req *r);

#endif
