#include "fleetml/metrics.h"
#include "fleetml/measurement.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

/* Latency buckets in seconds: fine-grained below 10 ms where the reply
 * latency target lives. */
static const double latency_bounds[FM_HIST_BUCKETS] = {
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005,
    0.01,    0.025,  0.05,    0.1,    0.25,  0.5,   1.0,   5.0};
static const double batch_bounds[FM_HIST_BUCKETS] = {1, 2, 4, 8, 16, 32, 48, 64,
                                                     96, 128, 192, 256, 512, 1024, 2048, 4096};

static fm_metrics metrics;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_metrics(void)
{
    metrics.inference_seconds.bounds = latency_bounds;
    metrics.commit_seconds.bounds = latency_bounds;
    metrics.reply_seconds.bounds = latency_bounds;
    metrics.commit_batch_size.bounds = batch_bounds;
    for (int i = 0; i < FM_STAGE__COUNT; i++)
        metrics.stage_seconds[i].bounds = latency_bounds;
}

static const char *const stage_names[FM_STAGE__COUNT] = {
    [FM_STAGE_QUEUE] = "queue",     [FM_STAGE_PREPARE] = "prepare",
    [FM_STAGE_HANDOFF] = "handoff", [FM_STAGE_ADMIT] = "admit",
    [FM_STAGE_PUBLISH] = "publish",
};

const char *fm_stage_name(enum fm_stage s)
{
    return s >= 0 && s < FM_STAGE__COUNT ? stage_names[s] : "";
}

void fm_stage_observe(enum fm_stage s, uint64_t start_ns)
{
    uint64_t now = fm_mono_ns();
    fm_hist_observe(&fm_metrics_get()->stage_seconds[s],
                    now > start_ns ? (double)(now - start_ns) / 1e9 : 0.0);
}

fm_metrics *fm_metrics_get(void)
{
    pthread_once(&once, init_metrics);
    return &metrics;
}

static const char *reason_names[FM_REJ__COUNT] = {
    FM_VERR_MALFORMED_JSON, FM_VERR_TOO_LARGE,     FM_VERR_MISSING_FIELD,
    FM_VERR_INVALID_TYPE,   FM_VERR_INVALID_VALUE, FM_VERR_UNKNOWN_FIELD,
    FM_VERR_UNKNOWN_KIND,   FM_VERR_OUT_OF_RANGE,  FM_VERR_UNKNOWN_DEVICE,
    FM_VERR_DEVICE_INACTIVE, FM_VERR_UNAVAILABLE,  FM_VERR_INTERNAL,
    FM_VERR_RATE_LIMITED};

enum fm_reject_reason fm_reject_reason_from_code(const char *code)
{
    for (int i = 0; i < FM_REJ__COUNT; i++)
        if (strcmp(code, reason_names[i]) == 0)
            return (enum fm_reject_reason)i;
    return FM_REJ_INTERNAL;
}

const char *fm_reject_reason_name(enum fm_reject_reason r)
{
    return (r >= 0 && r < FM_REJ__COUNT) ? reason_names[r] : FM_VERR_INTERNAL;
}

void fm_hist_observe(fm_hist *h, double v)
{
    int i = 0;
    while (i < FM_HIST_BUCKETS && v > h->bounds[i])
        i++;
    atomic_fetch_add_explicit(&h->counts[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
    uint64_t micro = (uint64_t)(v * 1e6 + 0.5);
    atomic_fetch_add_explicit(&h->sum_micro, micro, memory_order_relaxed);
    uint64_t max = atomic_load_explicit(&h->max_micro, memory_order_relaxed);
    while (micro > max && !atomic_compare_exchange_weak_explicit(&h->max_micro, &max, micro,
                                                                 memory_order_relaxed,
                                                                 memory_order_relaxed))
        ;
}

void fm_hist_snap_take(const fm_hist *h, fm_hist_snap *out)
{
    out->count = 0;
    for (int i = 0; i <= FM_HIST_BUCKETS; i++) {
        out->counts[i] = atomic_load(&h->counts[i]);
        out->count += out->counts[i];
    }
}

double fm_hist_snap_quantile(const fm_hist *h, const fm_hist_snap *older,
                             const fm_hist_snap *newer, double q)
{
    uint64_t n = newer->count - (older ? older->count : 0);
    if (n == 0 || !h->bounds)
        return -1;
    double max = (double)atomic_load(&h->max_micro) / 1e6;
    uint64_t want = (uint64_t)(q * (double)n);
    if ((double)want < q * (double)n || want == 0)
        want++;
    uint64_t cum = 0;
    for (int i = 0; i < FM_HIST_BUCKETS; i++) {
        cum += newer->counts[i] - (older ? older->counts[i] : 0);
        if (cum >= want)
            return h->bounds[i] < max ? h->bounds[i] : max;
    }
    return max;
}

double fm_hist_quantile(const fm_hist *h, double q)
{
    fm_hist_snap now;
    fm_hist_snap_take(h, &now);
    return fm_hist_snap_quantile(h, NULL, &now, q);
}

static void counter(fm_strbuf *b, const char *name, const char *help, uint64_t v)
{
    fm_strbuf_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
        (unsigned long long)v);
}

/* A counter family with one label: n series, label=values[i] counts[i]. */
static void counter_by(fm_strbuf *b, const char *name, const char *help, const char *label,
                       const char *const *values, const uint64_t *counts, size_t n)
{
    fm_strbuf_printf(b, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
    for (size_t i = 0; i < n; i++)
        fm_strbuf_printf(b, "%s{%s=\"%s\"} %llu\n", name, label, values[i],
                         (unsigned long long)counts[i]);
}

static void gauge(fm_strbuf *b, const char *name, const char *help, int64_t v)
{
    fm_strbuf_printf(b, "# HELP %s %s\n# TYPE %s gauge\n%s %lld\n", name, help, name, name, (long long)v);
}

/* The series of one histogram; label is "" or `key="value",`. */
static void hist_series(fm_strbuf *b, const char *name, const char *label, const fm_hist *h)
{
    uint64_t cum = 0;
    for (int i = 0; i < FM_HIST_BUCKETS; i++) {
        cum += atomic_load(&h->counts[i]);
        fm_strbuf_printf(b, "%s_bucket{%sle=\"%g\"} %llu\n", name, label, h->bounds[i],
                         (unsigned long long)cum);
    }
    cum += atomic_load(&h->counts[FM_HIST_BUCKETS]);
    fm_strbuf_printf(b, "%s_bucket{%sle=\"+Inf\"} %llu\n", name, label, (unsigned long long)cum);
    size_t ll = strlen(label);
    /* The label without its trailing comma, in braces, or nothing. */
    char sel[128] = "";
    if (ll > 1 && ll < sizeof sel - 2)
        snprintf(sel, sizeof sel, "{%.*s}", (int)(ll - 1), label);
    fm_strbuf_printf(b, "%s_sum%s %.6f\n%s_count%s %llu\n", name, sel,
                     (double)atomic_load(&h->sum_micro) / 1e6, name, sel,
                     (unsigned long long)atomic_load(&h->count));
}

static void hist(fm_strbuf *b, const char *name, const char *help, const fm_hist *h)
{
    fm_strbuf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    hist_series(b, name, "", h);
}

/* ---- drift per tenant and model ---------------------------------------------- */

typedef struct drift_series {
    char tenant[65], model[100];
    double psi;
    uint64_t stamp; /* for replacing the least recently set */
} drift_series;

static pthread_mutex_t drift_mu = PTHREAD_MUTEX_INITIALIZER;
static drift_series drift[FM_DRIFT_SERIES];
static size_t ndrift;
static uint64_t drift_clock;

void fm_metrics_drift_set(const char *tenant, const char *model, double psi)
{
    pthread_mutex_lock(&drift_mu);
    drift_series *slot = NULL;
    for (size_t i = 0; i < ndrift && !slot; i++)
        if (strncmp(drift[i].tenant, tenant, sizeof drift[i].tenant - 1) == 0 &&
            strncmp(drift[i].model, model, sizeof drift[i].model - 1) == 0)
            slot = &drift[i];
    if (!slot && ndrift < FM_DRIFT_SERIES)
        slot = &drift[ndrift++];
    if (!slot) { /* full: the least recently set series makes room */
        slot = &drift[0];
        for (size_t i = 1; i < ndrift; i++)
            if (drift[i].stamp < slot->stamp)
                slot = &drift[i];
    }
    snprintf(slot->tenant, sizeof slot->tenant, "%s", tenant);
    snprintf(slot->model, sizeof slot->model, "%s", model);
    slot->psi = psi;
    slot->stamp = ++drift_clock;
    pthread_mutex_unlock(&drift_mu);
}

/* A Prometheus label value: backslash, quote and newline escaped. */
static void label_value(fm_strbuf *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            fm_strbuf_printf(b, "\\%c", *v);
        else if (*v == '\n')
            fm_strbuf_printf(b, "\\n");
        else
            fm_strbuf_add(b, v, 1);
    }
}

static void drift_render(fm_strbuf *b)
{
    fm_strbuf_printf(b, "# HELP fleetml_drift_psi Largest population stability index of any "
                        "feature of a tenant's day against the model version's training "
                        "baseline, at the last check.\n# TYPE fleetml_drift_psi gauge\n");
    pthread_mutex_lock(&drift_mu);
    for (size_t i = 0; i < ndrift; i++) {
        fm_strbuf_printf(b, "fleetml_drift_psi{tenant=\"");
        label_value(b, drift[i].tenant);
        fm_strbuf_printf(b, "\",model=\"");
        label_value(b, drift[i].model);
        fm_strbuf_printf(b, "\"} %g\n", drift[i].psi);
    }
    pthread_mutex_unlock(&drift_mu);
}

/* Subsystems' own series (fm_metrics_add_source); sources_mu is held while
 * they render so one is never removed (and its state freed) mid-render. */
static pthread_mutex_t sources_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    fm_metrics_source_fn fn;
    void *ud;
} sources[FM_METRICS_SOURCES];

int fm_metrics_add_source(fm_metrics_source_fn fn, void *ud)
{
    int rc = FM_ERANGE;
    pthread_mutex_lock(&sources_mu);
    for (int i = 0; i < FM_METRICS_SOURCES; i++)
        if (!sources[i].fn) {
            sources[i].fn = fn;
            sources[i].ud = ud;
            rc = 0;
            break;
        }
    pthread_mutex_unlock(&sources_mu);
    return rc;
}

void fm_metrics_remove_source(fm_metrics_source_fn fn, void *ud)
{
    pthread_mutex_lock(&sources_mu);
    for (int i = 0; i < FM_METRICS_SOURCES; i++)
        if (sources[i].fn == fn && sources[i].ud == ud)
            sources[i].fn = NULL;
    pthread_mutex_unlock(&sources_mu);
}

static void render_sources(fm_strbuf *b)
{
    pthread_mutex_lock(&sources_mu);
    for (int i = 0; i < FM_METRICS_SOURCES; i++)
        if (sources[i].fn)
            sources[i].fn(sources[i].ud, b);
    pthread_mutex_unlock(&sources_mu);
}

int fm_metrics_render(const fm_metrics *m, char **out, size_t *len)
{
    fm_strbuf b = {0};
    counter(&b, "fleetml_measurements_received_total", "Measurement messages received.",
            atomic_load(&m->received));
    counter(&b, "fleetml_measurements_stored_total", "Measurements durably stored.",
            atomic_load(&m->stored));
    counter(&b, "fleetml_measurements_duplicate_total",
            "Measurements whose id was already stored (answered with the original result).",
            atomic_load(&m->duplicates));
    uint64_t rejected[FM_REJ__COUNT];
    for (int i = 0; i < FM_REJ__COUNT; i++)
        rejected[i] = atomic_load(&m->rejected[i]);
    counter_by(&b, "fleetml_measurements_rejected_total", "Measurements rejected, by reason.",
               "reason", reason_names, rejected, FM_REJ__COUNT);
    counter(&b, "fleetml_replies_total", "Result messages published to devices.",
            atomic_load(&m->replied));
    counter(&b, "fleetml_commit_failures_total", "Group commits that failed (nothing acked).",
            atomic_load(&m->commit_failures));
    counter(&b, "fleetml_model_keep_warm_calls_total",
            "Rows scored by an idle commit thread to keep the model in the CPU's caches.",
            atomic_load(&m->keep_warm_calls));
    counter(&b, "fleetml_broker_restarts_total", "Times the supervised broker was restarted.",
            atomic_load(&m->broker_restarts));
    static const char *const ckpt_by[] = {"checkpointer", "idle", "bound"};
    uint64_t ckpts[] = {atomic_load(&m->wal_ckpt_background), atomic_load(&m->wal_ckpt_idle),
                        atomic_load(&m->wal_ckpt_bound)};
    counter_by(&b, "fleetml_wal_checkpoints_total",
               "SQLite WAL checkpoints of the pipeline's database, by who ran them: the"
               " checkpointer thread, the commit thread with nothing queued (idle), or a commit"
               " that found the log at its bound (bound: the commit waited for it).",
               "by", ckpt_by, ckpts, 3);
    counter(&b, "fleetml_wal_restarts_total",
            "Times the pipeline's SQLite WAL restarted from its beginning (checkpoints caught up).",
            atomic_load(&m->wal_restarts));
    gauge(&b, "fleetml_mqtt_connected", "1 when the service is connected to the broker.",
          atomic_load(&m->mqtt_connected));
    gauge(&b, "fleetml_pipeline_queue_depth", "Messages waiting for the pipeline.",
          atomic_load(&m->queue_depth));
    gauge(&b, "fleetml_store_unavailable", "1 while the store cannot commit (e.g. disk full).",
          atomic_load(&m->store_unavailable));
    counter(&b, "fleetml_lake_objects_total", "Objects published to the lake.",
            atomic_load(&m->lake_objects));
    counter(&b, "fleetml_lake_rows_total", "Rows exported to the lake.",
            atomic_load(&m->lake_rows));
    counter(&b, "fleetml_lake_errors_total", "Lake export attempts that failed.",
            atomic_load(&m->lake_errors));
    counter(&b, "fleetml_drift_alerts_total",
            "Drift alerts raised (a tenant's day crossed model.drift_psi_pct on a feature).",
            atomic_load(&m->drift_alerts));
    fm_strbuf_printf(&b,
                     "# HELP fleetml_drift_psi_max Largest population stability index of any "
                     "feature, tenant and served version today (last check).\n"
                     "# TYPE fleetml_drift_psi_max gauge\nfleetml_drift_psi_max %g\n",
                     (double)atomic_load(&m->drift_psi_max_micro) / 1e6);
    drift_render(&b);
    counter(&b, "fleetml_shadow_failures_total",
            "Batches whose shadow version could not score (live replies unaffected).",
            atomic_load(&m->shadow_failures));
    counter(&b, "fleetml_http_requests_total", "HTTP API requests answered.",
            atomic_load(&m->http_requests));
    counter(&b, "fleetml_http_errors_total", "HTTP API requests answered with a 5xx status.",
            atomic_load(&m->http_errors));
    static const char *const refused_by[] = {"framing", "target", "per_address"};
    uint64_t refused[] = {atomic_load(&m->http_refused_framing),
                          atomic_load(&m->http_refused_target),
                          atomic_load(&m->http_refused_address)};
    counter_by(&b, "fleetml_http_refused_total", "HTTP requests refused at the edge, by reason.",
               "reason", refused_by, refused, 3);
    counter(&b, "fleetml_http_slow_closed_total",
            "HTTP connections closed because a request head or body arrived too slowly.",
            atomic_load(&m->http_cut_slow));
    counter(&b, "fleetml_audit_errors_total", "Audit entries that could not be stored.",
            atomic_load(&m->http_audit_errors));
    counter(&b, "fleetml_presence_events_total", "Device connect/disconnect reports received.",
            atomic_load(&m->presence_events));
    counter(&b, "fleetml_broker_refused_messages_total",
            "Device publishes the broker refused because the device was over its rate.",
            atomic_load(&m->broker_refused_msgs));
    counter(&b, "fleetml_broker_refused_bytes_total",
            "Payload bytes of the publishes the broker refused (over rate).",
            atomic_load(&m->broker_refused_bytes));
    gauge(&b, "fleetml_lake_backlog", "Committed rows not yet exported to the lake.",
          atomic_load(&m->lake_backlog));
    gauge(&b, "fleetml_lake_export_lease",
          "1 when this node holds the cluster's lake export lease (exactly one node does).",
          atomic_load(&m->lake_lease_held));
    hist(&b, "fleetml_inference_seconds", "Model inference time per batch.",
         &m->inference_seconds);
    hist(&b, "fleetml_commit_seconds", "Group commit time (including fsync).",
         &m->commit_seconds);
    hist(&b, "fleetml_commit_batch_size", "Measurements per group commit.",
         &m->commit_batch_size);
    hist(&b, "fleetml_reply_seconds", "Time from receipt to reply publication.",
         &m->reply_seconds);
    fm_strbuf_printf(&b, "# HELP fleetml_stage_seconds Time spent in each pipeline stage "
                         "(docs/operations.md).\n# TYPE fleetml_stage_seconds histogram\n");
    for (int i = 0; i < FM_STAGE__COUNT; i++) {
        char label[64];
        snprintf(label, sizeof label, "stage=\"%s\",", stage_names[i]);
        hist_series(&b, "fleetml_stage_seconds", label, &m->stage_seconds[i]);
    }
    /* The slowest observation since start, per histogram: a stall shows
     * here even when it is one in a million. */
    fm_strbuf_printf(&b, "# HELP fleetml_slowest_seconds Largest observation since start, by "
                         "histogram.\n# TYPE fleetml_slowest_seconds gauge\n");
    const struct {
        const char *name;
        const fm_hist *h;
    } slow[] = {{"reply", &m->reply_seconds},
                {"commit", &m->commit_seconds},
                {"inference", &m->inference_seconds},
                {"queue", &m->stage_seconds[FM_STAGE_QUEUE]},
                {"prepare", &m->stage_seconds[FM_STAGE_PREPARE]},
                {"handoff", &m->stage_seconds[FM_STAGE_HANDOFF]},
                {"admit", &m->stage_seconds[FM_STAGE_ADMIT]},
                {"publish", &m->stage_seconds[FM_STAGE_PUBLISH]}};
    for (size_t i = 0; i < sizeof slow / sizeof *slow; i++)
        fm_strbuf_printf(&b, "fleetml_slowest_seconds{of=\"%s\"} %.6f\n", slow[i].name,
                         (double)atomic_load(&slow[i].h->max_micro) / 1e6);
    render_sources(&b);
    return fm_strbuf_take(&b, out, len);
}
