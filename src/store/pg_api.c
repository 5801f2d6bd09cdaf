/*
 * PostgreSQL backend: data behind the HTTP API (see sqlite_api.c for the
 * contract): device pages, presence, measurement pages, labels (the current
 * one and every version in label_log, a lake stream) and the audit log
 * (a lake stream too).
 */
#include "store/pg_int.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

static int64_t lim(size_t n) { return n > (size_t)INT64_MAX ? INT64_MAX : (int64_t)n; }

static const char *nz(const char *s) { return s ? s : ""; }

/* 1 when text is a JSON object. */
static int is_json_object(const char *text)
{
    json_t *j = text ? json_loads(text, 0, NULL) : NULL;
    int ok = json_is_object(j);
    json_decref(j);
    return ok;
}

/* ---- devices and presence -------------------------------------------------- */

static int a_device_page(fm_store *base, const char *tenant, const char *after_id, size_t limit,
                         fm_device_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, nz(after_id));
    pg__i64(&a, lim(limit));
    pg__text(&a, tenant);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " PG_DEVICE_COLS " FROM devices WHERE id > $1"
                          " AND ($3::text IS NULL OR tenant = $3) ORDER BY id LIMIT $2",
                          &a, "devices", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_device d;
        pg__read_device(r, i, &d);
        if (cb(ud, &d))
            break;
    }
    PQclear(r);
    return 0;
}

static int presence_tx(pg_store *s, const char *node, const fm_presence_update *u, size_t n)
{
    /* The log is written under the lock, so revs commit in the order they
     * were given and a reader of presence changes never skips one. */
    int rc = pg__lock(s, PG_LOCK_PRESENCE, NULL);
    /* Unknown devices are dropped; a late, older report never overwrites
     * a newer state (and is not logged). */
    for (size_t i = 0; i < n && !rc; i++) {
        pg_args a = {0};
        pg__text(&a, nz(u[i].device_id));
        pg__i64(&a, u[i].online ? 1 : 0);
        pg__i64(&a, u[i].at_ms);
        pg__text(&a, nz(node));
        long changed = 0;
        rc = pg__cmd(s,
                     "INSERT INTO device_presence(device_id, online, changed_ms, node)"
                     " SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1)"
                     " ON CONFLICT (device_id) DO UPDATE SET online = excluded.online,"
                     " changed_ms = excluded.changed_ms, node = excluded.node"
                     " WHERE excluded.changed_ms >= device_presence.changed_ms",
                     &a, "presence", &changed, NULL);
        if (!rc && changed > 0) {
            pg_args l = {0};
            pg__text(&l, nz(u[i].device_id));
            pg__i64(&l, u[i].online ? 1 : 0);
            pg__i64(&l, u[i].at_ms);
            rc = pg__cmd(s, SQL_PRESENCE_LOG("$1", "$2", "$3"), &l, "presence", NULL, NULL);
        }
    }
    return rc;
}

static int a_presence_set(fm_store *base, const char *node, const fm_presence_update *u,
                          size_t n)
{
    pg_store *s = (pg_store *)base;
    if (n == 0)
        return 0;
    PG_TX(s, NULL, presence_tx(s, node, u, n));
}

static int presence_reset_tx(pg_store *s, const char *node, int64_t at_ms)
{
    int rc = pg__lock(s, PG_LOCK_PRESENCE, NULL);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__i64(&a, at_ms);
    pg__text(&a, nz(node));
    rc = pg__cmd(s, SQL_PRESENCE_RESET_LOG("$1", "$2"), &a, "presence", NULL, NULL);
    return rc ? rc : pg__cmd(s, SQL_PRESENCE_RESET("$1", "$2"), &a, "presence", NULL, NULL);
}

static int a_presence_reset(fm_store *base, const char *node, int64_t at_ms)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, NULL, presence_reset_tx(s, node, at_ms));
}

static int a_presence_changes(fm_store *base, int64_t after_rev, size_t limit,
                              fm_presence_change_cb cb, void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after_rev);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base, SQL_PRESENCE_CHANGES("$1", "$2"), &a, "presence",
                          &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_presence_change c = {.rev = pg__int(r, i, 0),
                                .device_id = pg__str(r, i, 1),
                                .tenant = pg__str(r, i, 2),
                                .online = pg__int(r, i, 3) != 0,
                                .changed_ms = pg__int(r, i, 4)};
        if (cb(ud, &c))
            break;
    }
    PQclear(r);
    return 0;
}

static int a_presence_rev(fm_store *base, int64_t *rev)
{
    *rev = 0;
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT coalesce(max(rev), 0) FROM presence_log",
                          NULL, "presence", &rc, NULL);
    if (!r)
        return rc;
    *rev = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

static int a_presence_get(fm_store *base, const char *device_id, fm_presence *out)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__text(&a, nz(device_id));
    int rc;
    PGresult *r = pg__run((pg_store *)base, SQL_PRESENCE_GET("$1"), &a, "presence", &rc, NULL);
    if (!r)
        return rc;
    out->online = pg__int(r, 0, 0) != 0;
    out->changed_ms = pg__int(r, 0, 1);
    int64_t newest = pg__int(r, 0, 2);
    out->last_seen_ms = newest > out->changed_ms ? newest : out->changed_ms;
    out->cert_expires_ms = pg__int(r, 0, 3);
    pg__copy(out->node, sizeof out->node, r, 0, 4);
    PQclear(r);
    return 0;
}

static int a_presence_counts(fm_store *base, const char *node, fm_presence_count_cb cb,
                             void *ud)
{
    pg_args a = {0};
    pg__text(&a, nz(node));
    int rc;
    PGresult *r = pg__run((pg_store *)base, SQL_PRESENCE_COUNTS("$1"), &a, "presence", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_presence_count c = {.tenant = pg__str(r, i, 0), .online = pg__int(r, i, 1),
                               .offline = pg__int(r, i, 2), .inactive = pg__int(r, i, 3),
                               .on_node = pg__int(r, i, 4)};
        if (cb(ud, &c))
            break;
    }
    PQclear(r);
    return 0;
}

/* ---- measurements ----------------------------------------------------------- */

#define RECORD_COLS                                                                                \
    "seq, device_id, tenant, measurement_id, received_ms, taken_ms, payload, result, model, shadow"

/* Calls cb for each row of r (PQclear'ed here). FM_ENOTFOUND when need_row
 * and there was none. */
static int record_rows(PGresult *r, fm_record_cb cb, void *ud, int need_row)
{
    int n = PQntuples(r);
    for (int i = 0; i < n; i++) {
        fm_record x = {
            .seq = pg__int(r, i, 0),
            .device_id = pg__str(r, i, 1),
            .tenant = pg__str(r, i, 2),
            .measurement_id = pg__str(r, i, 3),
            .received_ms = pg__int(r, i, 4),
            .taken_ms = pg__int(r, i, 5),
            .payload = pg__str(r, i, 6),
            .payload_len = (size_t)PQgetlength(r, i, 6),
            .result_json = pg__str(r, i, 7),
            .model = pg__str(r, i, 8),
            .shadow_json = pg__null(r, i, 9) ? NULL : pg__str(r, i, 9),
        };
        if (cb(ud, &x))
            break;
    }
    PQclear(r);
    return need_row && n == 0 ? FM_ENOTFOUND : 0;
}

static int a_measurement_page(fm_store *base, const fm_measurement_query *q, fm_record_cb cb,
                              void *ud)
{
    if (!q || !q->device_id)
        return FM_EINVAL;
    pg_args a = {0};
    pg__text(&a, q->device_id);
    if (q->from_ms)
        pg__i64(&a, q->from_ms);
    else
        pg__text(&a, NULL);
    if (q->to_ms)
        pg__i64(&a, q->to_ms);
    else
        pg__text(&a, NULL);
    if (q->cursor_seq > 0) {
        pg__i64(&a, q->cursor_ms);
        pg__i64(&a, q->cursor_seq);
    } else {
        pg__text(&a, NULL);
        pg__text(&a, NULL);
    }
    pg__i64(&a, lim(q->limit));
    int rc;
    /* measurements_by_device(device_id, received_ms) walked backwards; the
     * cursor is the last row of the previous page. */
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " RECORD_COLS " FROM measurements WHERE device_id = $1"
                          " AND ($2::bigint IS NULL OR received_ms >= $2)"
                          " AND ($3::bigint IS NULL OR received_ms < $3)"
                          " AND ($5::bigint IS NULL OR received_ms < $4::bigint"
                          " OR (received_ms = $4 AND seq < $5))"
                          " ORDER BY received_ms DESC, seq DESC LIMIT $6",
                          &a, "measurements", &rc, NULL);
    return r ? record_rows(r, cb, ud, 0) : rc;
}

static int a_measurement_get(fm_store *base, const char *device_id, const char *measurement_id,
                             fm_record_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, nz(device_id));
    pg__text(&a, nz(measurement_id));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " RECORD_COLS " FROM measurements"
                          " WHERE device_id = $1 AND measurement_id = $2",
                          &a, "measurement", &rc, NULL);
    return r ? record_rows(r, cb, ud, 1) : rc;
}

/* ---- labels ------------------------------------------------------------------ */

static int label_put_tx(pg_store *s, fm_label *l, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_API, err);
    if (!rc)
        rc = pg__lock_stream(s, FM_STREAM_LABELS, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, l->device_id);
    pg__text(&a, l->measurement_id);
    pg__text(&a, l->outputs_json);
    pg__text(&a, nz(l->source));
    pg__text(&a, nz(l->labelled_by));
    pg__i64(&a, l->at_ms);
    pg__text(&a, l->tenant && *l->tenant ? l->tenant : NULL);
    PGresult *r = pg__run(s,
                          "INSERT INTO label_log(device_id, tenant, measurement_id, outputs,"
                          " source, labelled_by, at_ms)"
                          " SELECT device_id, tenant, measurement_id, $3, $4, $5, $6"
                          " FROM measurements WHERE device_id = $1 AND measurement_id = $2"
                          " AND ($7::text IS NULL OR tenant = $7) RETURNING seq",
                          &a, "label", &rc, err);
    if (!r)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return fm_errf(err, FM_ENOTFOUND, "device '%s' has no measurement '%s'", l->device_id,
                       l->measurement_id);
    }
    int64_t seq = pg__int(r, 0, 0);
    PQclear(r);
    pg_args b = {0};
    pg__i64(&b, seq);
    rc = pg__cmd(s,
                 "INSERT INTO labels(seq, device_id, tenant, measurement_id, outputs, source,"
                 " labelled_by, at_ms)"
                 " SELECT seq, device_id, tenant, measurement_id, outputs, source, labelled_by,"
                 " at_ms FROM label_log WHERE seq = $1"
                 " ON CONFLICT (device_id, measurement_id) DO UPDATE SET seq = excluded.seq,"
                 " tenant = excluded.tenant, outputs = excluded.outputs,"
                 " source = excluded.source, labelled_by = excluded.labelled_by,"
                 " at_ms = excluded.at_ms",
                 &b, "label", NULL, err);
    if (!rc)
        l->seq = seq;
    return rc;
}

static int a_label_put(fm_store *base, fm_label *l, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    l->seq = 0;
    if (!l->device_id || !l->measurement_id)
        return fm_errf(err, FM_EINVAL, "label: device and measurement are required");
    if (!is_json_object(l->outputs_json))
        return fm_errf(err, FM_EINVAL, "label: outputs must be a JSON object");
    if (l->at_ms == 0)
        l->at_ms = fm_wall_ms();
    fm_errbuf local;
    if (!err)
        err = &local;
    PG_TX(s, err, label_put_tx(s, l, err));
}

static int a_label_get(fm_store *base, const char *device_id, const char *measurement_id,
                       fm_label *out, char *source, size_t source_len, char *by, size_t by_len)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__text(&a, nz(device_id));
    pg__text(&a, nz(measurement_id));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, outputs, source, labelled_by, at_ms FROM labels"
                          " WHERE device_id = $1 AND measurement_id = $2",
                          &a, "label", &rc, NULL);
    if (!r)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return FM_ENOTFOUND;
    }
    char *outputs = fm_strdup(pg__str(r, 0, 1));
    if (!outputs) {
        PQclear(r);
        return FM_ENOMEM;
    }
    out->seq = pg__int(r, 0, 0);
    out->outputs_json = outputs;
    out->at_ms = pg__int(r, 0, 4);
    if (source && source_len) {
        pg__copy(source, source_len, r, 0, 2);
        out->source = source;
    }
    if (by && by_len) {
        pg__copy(by, by_len, r, 0, 3);
        out->labelled_by = by;
    }
    PQclear(r);
    return 0;
}

static int a_label_history(fm_store *base, const char *device_id, const char *measurement_id,
                           fm_label_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, nz(device_id));
    pg__text(&a, nz(measurement_id));
    int rc;
    PGresult *r = pg__run((pg_store *)base, SQL_LABEL_HISTORY("$1", "$2"), &a, "label", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_label l = {.seq = pg__int(r, i, 0),
                      .device_id = pg__str(r, i, 1),
                      .tenant = pg__str(r, i, 2),
                      .measurement_id = pg__str(r, i, 3),
                      .outputs_json = pg__str(r, i, 4),
                      .source = pg__str(r, i, 5),
                      .labelled_by = pg__str(r, i, 6),
                      .at_ms = pg__int(r, i, 7)};
        if (cb(ud, &l))
            break;
    }
    PQclear(r);
    return 0;
}

/* ---- audit -------------------------------------------------------------------- */

int pg__audit_tx(pg_store *s, fm_audit *a, const char *details, fm_errbuf *err)
{
    int rc = pg__lock_stream(s, FM_STREAM_AUDIT, err);
    if (rc)
        return rc;
    pg_args p = {0};
    pg__i64(&p, a->at_ms);
    pg__text(&p, nz(a->tenant));
    pg__text(&p, nz(a->actor));
    pg__text(&p, nz(a->action));
    pg__text(&p, nz(a->target));
    pg__text(&p, nz(a->outcome));
    pg__text(&p, nz(a->client));
    pg__text(&p, details);
    PGresult *r = pg__run(s,
                          "INSERT INTO audit(at_ms, tenant, actor, action, target, outcome,"
                          " client, details) VALUES($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq",
                          &p, "audit", &rc, err);
    if (!r)
        return rc;
    a->seq = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

static int a_audit_append(fm_store *base, fm_audit *a, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    a->seq = 0;
    const char *details = a->details_json ? a->details_json : "{}";
    if (!is_json_object(details))
        return fm_errf(err, FM_EINVAL, "audit: details must be a JSON object");
    if (a->at_ms == 0)
        a->at_ms = fm_wall_ms();
    PG_TX(s, err, pg__audit_tx(s, a, details, err));
}

static int a_audit_page(fm_store *base, const fm_audit_filter *f, size_t limit, fm_audit_cb cb,
                        void *ud)
{
    static const fm_audit_filter none;
    if (!f)
        f = &none;
    pg_args a = {0};
    pg__text(&a, f->tenant);
    pg__text(&a, f->actor);
    pg__text(&a, f->action);
    if (f->from_ms)
        pg__i64(&a, f->from_ms);
    else
        pg__text(&a, NULL);
    if (f->to_ms)
        pg__i64(&a, f->to_ms);
    else
        pg__text(&a, NULL);
    if (f->before_seq > 0)
        pg__i64(&a, f->before_seq);
    else
        pg__text(&a, NULL);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, at_ms, tenant, actor, action, target, outcome, client,"
                          " details FROM audit WHERE ($1::text IS NULL OR tenant = $1)"
                          " AND ($2::text IS NULL OR actor = $2)"
                          " AND ($3::text IS NULL OR action = $3)"
                          " AND ($4::bigint IS NULL OR at_ms >= $4)"
                          " AND ($5::bigint IS NULL OR at_ms < $5)"
                          " AND ($6::bigint IS NULL OR seq < $6)"
                          " ORDER BY seq DESC LIMIT $7",
                          &a, "audit", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_audit e = {.seq = pg__int(r, i, 0), .at_ms = pg__int(r, i, 1),
                      .tenant = pg__str(r, i, 2), .actor = pg__str(r, i, 3),
                      .action = pg__str(r, i, 4), .target = pg__str(r, i, 5),
                      .outcome = pg__str(r, i, 6), .client = pg__str(r, i, 7),
                      .details_json = pg__str(r, i, 8)};
        if (cb(ud, &e))
            break;
    }
    PQclear(r);
    return 0;
}

const fm_store_api_vt pg__api_vt = {
    .device_page = a_device_page,
    .presence_set = a_presence_set,
    .presence_reset = a_presence_reset,
    .presence_get = a_presence_get,
    .presence_counts = a_presence_counts,
    .presence_changes = a_presence_changes,
    .presence_rev = a_presence_rev,
    .measurement_page = a_measurement_page,
    .measurement_get = a_measurement_get,
    .label_put = a_label_put,
    .label_get = a_label_get,
    .label_history = a_label_history,
    .audit_append = a_audit_append,
    .audit_page = a_audit_page,
};
