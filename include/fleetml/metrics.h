/*
 * Process-wide metrics, exported in Prometheus text format at /metrics.
 * Counters and gauges are lock-free atomics; histograms use fixed buckets.
 */
#ifndef FLEETML_METRICS_H
#define FLEETML_METRICS_H

#include "fleetml/core.h"
#include <stdatomic.h>

#define FM_HIST_BUCKETS 16

typedef struct fm_hist {
    const double *bounds; /* FM_HIST_BUCKETS upper bounds, ascending */
    _Atomic uint64_t counts[FM_HIST_BUCKETS + 1]; /* last = +Inf */
    _Atomic uint64_t count;
    _Atomic uint64_t sum_micro; /* sum in millionths of the unit */
    _Atomic uint64_t max_micro; /* largest observation, so a stall is seen */
} fm_hist;

/* Where a measurement's time goes inside the service, one histogram each
 * (fleetml_stage_seconds{stage=...}); inference and commit have their own
 * histograms. Per message: queue (receipt -> a worker, or the idle commit
 * thread, starts on it), prepare (parse, validate, features), handoff
 * (prepared by a worker -> the commit thread takes its batch: the wait for
 * the commit before; absent for messages the commit thread prepared). Per batch:
 * admit (device checks and dedupe), publish (handing the replies to the
 * MQTT client). */
enum fm_stage {
    FM_STAGE_QUEUE = 0,
    FM_STAGE_PREPARE,
    FM_STAGE_HANDOFF,
    FM_STAGE_ADMIT,
    FM_STAGE_PUBLISH,
    FM_STAGE__COUNT
};

enum fm_reject_reason {
    FM_REJ_MALFORMED_JSON = 0, FM_REJ_TOO_LARGE, FM_REJ_MISSING_FIELD,
    FM_REJ_INVALID_TYPE, FM_REJ_INVALID_VALUE, FM_REJ_UNKNOWN_FIELD, FM_REJ_UNKNOWN_KIND,
    FM_REJ_OUT_OF_RANGE, FM_REJ_UNKNOWN_DEVICE, FM_REJ_DEVICE_INACTIVE,
    FM_REJ_UNAVAILABLE, FM_REJ_INTERNAL, FM_REJ_RATE_LIMITED, FM_REJ__COUNT
};

typedef struct fm_metrics {
    _Atomic uint64_t received;
    _Atomic uint64_t stored;
    _Atomic uint64_t duplicates;
    _Atomic uint64_t rejected[FM_REJ__COUNT];
    _Atomic uint64_t replied;
    _Atomic uint64_t commit_failures;
    _Atomic uint64_t keep_warm_calls; /* idle model calls (pipeline.keep_warm_us) */
    _Atomic uint64_t broker_restarts;
    _Atomic int64_t mqtt_connected;   /* gauge 0/1 */
    _Atomic int64_t queue_depth;      /* gauge */
    _Atomic uint64_t lake_objects;
    _Atomic uint64_t lake_rows;
    _Atomic uint64_t lake_errors;
    _Atomic int64_t lake_backlog;     /* gauge: committed rows not yet in lake */
    _Atomic int64_t lake_lease_held;  /* gauge 0/1: this node runs the lake export */
    _Atomic int64_t store_unavailable; /* gauge 0/1 (e.g. disk full) */
    _Atomic uint64_t http_requests;    /* API requests answered */
    _Atomic uint64_t shadow_failures;  /* batches whose shadow scoring failed */
    _Atomic uint64_t drift_alerts;     /* drift alerts raised */
    _Atomic uint64_t drift_psi_max_micro; /* largest PSI of today's last check, x 1e6 */
    _Atomic uint64_t http_errors;      /* ... with a 5xx status */
    _Atomic uint64_t http_audit_errors; /* audit entries that could not be stored */
    /* requests/connections the HTTP edge refused or cut, by reason */
    _Atomic uint64_t http_refused_framing;  /* 400: ambiguous framing or header bytes */
    _Atomic uint64_t http_refused_target;   /* 400/414: request target or path parameter */
    _Atomic uint64_t http_refused_address;  /* 429: per-address cap (behind a proxy) */
    _Atomic uint64_t http_cut_slow;         /* connections closed for sending too slowly */
    _Atomic uint64_t presence_events;  /* device connect/disconnect reports */
    _Atomic uint64_t broker_refused_msgs;  /* publishes the broker refused (over rate) */
    _Atomic uint64_t broker_refused_bytes; /* ... and their payload bytes */
    /* SQLite WAL checkpoints of the pipeline's database, by who ran them:
     * the checkpointer thread, the commit thread with nothing queued, the
     * commit thread in a commit (the log reached its bound) */
    _Atomic uint64_t wal_ckpt_background;
    _Atomic uint64_t wal_ckpt_idle;
    _Atomic uint64_t wal_ckpt_bound;
    _Atomic uint64_t wal_restarts;     /* times the log restarted from its beginning */
    _Atomic int64_t broker_lost_ms;    /* wall ms the supervised broker last died
                                          (its sessions with it); 0: never */
    fm_hist inference_seconds;
    fm_hist commit_seconds;
    fm_hist commit_batch_size;
    fm_hist reply_seconds; /* receive -> reply published */
    fm_hist stage_seconds[FM_STAGE__COUNT];
} fm_metrics;

/* The process's metrics (zero-initialised, buckets set on first use). */
fm_metrics *fm_metrics_get(void);

/* Maps an FM_VERR_* code to a reject reason (unknown -> INTERNAL). */
enum fm_reject_reason fm_reject_reason_from_code(const char *code);
const char *fm_reject_reason_name(enum fm_reject_reason r);

void fm_hist_observe(fm_hist *h, double v);
/* An upper estimate of the q-quantile (0 < q <= 1) of what h observed: the
 * upper bound of the bucket holding it, never above the largest
 * observation. -1 when h observed nothing. */
double fm_hist_quantile(const fm_hist *h, double q);

/* A histogram's bucket counts at one moment, so that quantiles of a recent
 * window are the difference of two snapshots. */
typedef struct fm_hist_snap {
    uint64_t counts[FM_HIST_BUCKETS + 1];
    uint64_t count;
} fm_hist_snap;
void fm_hist_snap_take(const fm_hist *h, fm_hist_snap *out);
/* The q-quantile of what h observed between older and newer (taken in that
 * order), as fm_hist_quantile estimates it; the +Inf bucket reads as the
 * largest observation since start. -1 when nothing was observed between. */
double fm_hist_snap_quantile(const fm_hist *h, const fm_hist_snap *older,
                             const fm_hist_snap *newer, double q);
/* Observes the nanoseconds from start_ns to now (fm_mono_ns) on stage s. */
void fm_stage_observe(enum fm_stage s, uint64_t start_ns);
/* The stage's label value ("queue", ...); "" when out of range. */
const char *fm_stage_name(enum fm_stage s);

/* Renders all metrics as Prometheus text; caller frees *out with fm_free.
 * Returns 0 or FM_ENOMEM. */
/* Drift per tenant and model version (fleetml_drift_psi{tenant,model}):
 * the largest PSI of any feature at the last check of today's counts.
 * Thread-safe; keeps the FM_DRIFT_SERIES most recently set series (older
 * ones drop out of /metrics). Strings are copied (truncated to fit). */
#define FM_DRIFT_SERIES 64
void fm_metrics_drift_set(const char *tenant, const char *model, double psi);

int fm_metrics_render(const fm_metrics *m, char **out, size_t *len);

/* Series whose labels come and go (functions, rules) are rendered by their
 * subsystem: fn(ud, b) appends complete Prometheus families to b at the
 * end of every fm_metrics_render. At most FM_METRICS_SOURCES at once;
 * fm_metrics_add_source returns 0 or FM_ERANGE. fm_metrics_remove_source
 * waits for a render in progress, so ud may be freed once it returns. */
#define FM_METRICS_SOURCES 8
typedef void (*fm_metrics_source_fn)(void *ud, fm_strbuf *b);
int fm_metrics_add_source(fm_metrics_source_fn fn, void *ud);
void fm_metrics_remove_source(fm_metrics_source_fn fn, void *ud);

#endif
