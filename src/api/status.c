/*
 * GET /status on the operations listener: one node at a glance, for
 * `fleetml status` and for people (docs/operations.md, "Status"). Read-only,
 * built from what the node already keeps: its health, its metrics, the
 * store's devices and presence, and its certificates.
 */
#include "api/api_int.h"
#include "fleetml/json.h"
#include "fleetml/metrics.h"
#include "fleetml/pki.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Certificates inside this many days of their end are flagged. */
#define CERT_WARN_DAYS 30
#define DAY_MS 86400000LL
/* Reply latency is shown over the last minute or so: snapshots every 10 s,
 * the window starting at the newest one at least a minute old (or the
 * oldest kept). */
#define STATUS_SNAP_S 10
#define STATUS_WINDOW_S 60
#define NSNAPS ((int)(sizeof ((fm_http *)0)->reply_snaps / sizeof ((fm_http *)0)->reply_snaps[0]))

typedef struct tally {
    json_t *tenants; /* {tenant: {"online", "offline", "inactive"}} */
    int64_t here;    /* devices connected to this node's broker */
} tally;

static int on_count(void *ud, const fm_presence_count *c)
{
    tally *t = ud;
    t->here += c->on_node;
    json_object_set_new(t->tenants, c->tenant,
                        json_pack("{s:I,s:I,s:I}", "online", (json_int_t)c->online, "offline",
                                  (json_int_t)c->offline, "inactive", (json_int_t)c->inactive));
    return 0;
}

/* {tenant: counts}, or NULL when the store cannot be read; *here the
 * devices connected to this node's broker. */
static json_t *devices(fm_store *st, const char *node, int64_t *here)
{
    tally t = {.tenants = json_object()};
    if (fm_store_presence_counts(st, node, on_count, &t) != 0) {
        json_decref(t.tenants);
        return NULL;
    }
    *here = t.here;
    return t.tenants;
}

static json_t *cert(const fm_config *cfg, const char *name, int64_t now_ms)
{
    char rel[64], path[PATH_MAX], serial[80];
    snprintf(rel, sizeof rel, "pki/%s.crt", name);
    char *pem = NULL;
    size_t len = 0;
    int64_t end = 0;
    if (!fm_config_path(cfg, rel, path, sizeof path) || fm_read_file(path, &pem, &len) != 0)
        return json_pack("{s:s,s:s,s:n,s:n,s:b}", "name", name, "file", rel, "not_after",
                         "days_left", "warn", 1);
    int rc = fm_cert_pem_info(pem, len, serial, sizeof serial, NULL, 0, &end);
    fm_free(pem);
    if (rc != 0)
        return json_pack("{s:s,s:s,s:n,s:n,s:b}", "name", name, "file", rel, "not_after",
                         "days_left", "warn", 1);
    int64_t days = (end - now_ms) / DAY_MS;
    return json_pack("{s:s,s:s,s:o,s:I,s:b}", "name", name, "file", rel, "not_after",
                     fm_json_time(end), "days_left", (json_int_t)days, "warn",
                     end - now_ms < CERT_WARN_DAYS * DAY_MS);
}

static json_t *ms_or_null(double seconds)
{
    return seconds < 0 ? json_null() : json_real((double)(int64_t)(seconds * 1e6) / 1e3);
}

void api_status_tick(fm_http *h, uint64_t now_ns)
{
    int last = (h->reply_snap_next + NSNAPS - 1) % NSNAPS;
    if (h->reply_nsnaps > 0 && now_ns - h->reply_snap_ns[last] < STATUS_SNAP_S * 1000000000ull)
        return;
    fm_hist_snap_take(&fm_metrics_get()->reply_seconds, &h->reply_snaps[h->reply_snap_next]);
    h->reply_snap_ns[h->reply_snap_next] = now_ns;
    h->reply_snap_next = (h->reply_snap_next + 1) % NSNAPS;
    if (h->reply_nsnaps < NSNAPS)
        h->reply_nsnaps++;
}

/* {"window_s", "p50", "p99", "p999", "max_since_start"}: milliseconds over
 * the last minute (null when nothing was answered in it). */
static json_t *reply_latency(fm_http *h)
{
    const fm_hist *reply = &fm_metrics_get()->reply_seconds;
    fm_hist_snap older, now;
    uint64_t now_ns = fm_mono_ns(), from_ns = now_ns;
    bool have = false;
    fm_thread_lock(&h->edge);
    /* From the newest back: the first snapshot old enough, else the oldest
     * there is. */
    for (int k = 0; k < h->reply_nsnaps; k++) {
        int i = (h->reply_snap_next + NSNAPS - 1 - k) % NSNAPS;
        older = h->reply_snaps[i];
        from_ns = h->reply_snap_ns[i];
        have = true;
        if (now_ns - from_ns >= STATUS_WINDOW_S * 1000000000ull)
            break;
    }
    fm_thread_unlock(&h->edge);
    fm_hist_snap_take(reply, &now);
    const fm_hist_snap *o = have ? &older : NULL;
    double w = (double)(now_ns - from_ns) / 1e9;
    return json_pack("{s:f,s:o,s:o,s:o,s:o}", "window_s", (double)(int64_t)(w * 10) / 10, "p50",
                     ms_or_null(fm_hist_snap_quantile(reply, o, &now, 0.5)), "p99",
                     ms_or_null(fm_hist_snap_quantile(reply, o, &now, 0.99)), "p999",
                     ms_or_null(fm_hist_snap_quantile(reply, o, &now, 0.999)), "max_since_start",
                     ms_or_null(atomic_load(&reply->count)
                                    ? (double)atomic_load(&reply->max_micro) / 1e6
                                    : -1));
}

json_t *api_status_json(fm_http *h, fm_store *st)
{
    fm_health hs = {0};
    h->health(h->ud, &hs);
    fm_metrics *m = fm_metrics_get();
    int64_t now = fm_wall_ms();
    int64_t here = 0;
    json_t *devs = st ? devices(st, h->cfg.node_id, &here) : NULL;
    json_t *certs = json_array();
    static const char *const names[] = {"ca", "broker", "service"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        json_array_append_new(certs, cert(&h->cfg, names[i], now));
    return json_pack(
        "{s:s,s:s,s:o,s:{s:b,s:i,s:I,s:b},s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:o},"
        "s:{s:I,s:b,s:I},s:{s:s,s:b},s:b,s:o}",
        "node", h->cfg.node_id, "version", FM_VERSION, "time", fm_json_time(now), "broker",
        "up", hs.broker_up != 0, "pid", hs.broker_pid, "devices_connected", (json_int_t)here,
        "mqtt_connected", hs.mqtt_connected != 0,
        "devices", devs ? devs : json_null(), "pipeline", "queue",
        (json_int_t)atomic_load(&m->queue_depth), "received",
        (json_int_t)atomic_load(&m->received), "stored", (json_int_t)atomic_load(&m->stored),
        "replied", (json_int_t)atomic_load(&m->replied), "duplicates",
        (json_int_t)atomic_load(&m->duplicates), "commit_failures",
        (json_int_t)atomic_load(&m->commit_failures), "reply_ms", reply_latency(h),
        "lake", "backlog", (json_int_t)atomic_load(&m->lake_backlog), "exporting",
        atomic_load(&m->lake_lease_held) != 0, "errors", (json_int_t)atomic_load(&m->lake_errors),
        "model", "serving", hs.model, "loaded", hs.model_loaded != 0, "store_ok",
        hs.store_ok != 0, "certificates", certs);
}
