/*
 * PostgreSQL backend: the lake's side of the store (see sqlite_lake.c for
 * the contract). Rows are scanned in seq order; inserts into each stream
 * take the stream's advisory lock (pg_int.h), so a scan never sees seq
 * n + 1 committed while seq n is still in flight.
 */
#include "store/pg_int.h"

#include <stdlib.h>
#include <string.h>

static int64_t lim(size_t n) { return n > (size_t)INT64_MAX ? INT64_MAX : (int64_t)n; }

static int q_scan_records(fm_store *base, int64_t after, size_t limit, fm_record_cb cb, void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, device_id, tenant, measurement_id, received_ms, taken_ms,"
                          " payload, result, model, shadow FROM measurements WHERE seq > $1"
                          " ORDER BY seq LIMIT $2",
                          &a, "scan", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
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
    return 0;
}

static int q_scan_quarantine(fm_store *base, int64_t after, size_t limit, fm_quarantine_cb cb,
                             void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, device_id, tenant, received_ms, payload, error_code,"
                          " error_message FROM quarantine WHERE seq > $1 ORDER BY seq LIMIT $2",
                          &a, "scan", &rc, NULL);
    if (!r)
        return rc;
    rc = 0;
    for (int i = 0, n = PQntuples(r); i < n && !rc; i++) {
        void *payload;
        size_t len;
        if ((rc = pg__bytea(r, i, 4, &payload, &len)))
            break;
        fm_quarantine q = {.seq = pg__int(r, i, 0), .device_id = pg__str(r, i, 1),
                           .tenant = pg__str(r, i, 2), .received_ms = pg__int(r, i, 3),
                           .payload = payload, .payload_len = len,
                           .error_code = pg__str(r, i, 5), .error_message = pg__str(r, i, 6)};
        int stop = cb(ud, &q);
        fm_free(payload);
        if (stop)
            break;
    }
    PQclear(r);
    return rc;
}

static int q_scan_labels(fm_store *base, int64_t after, size_t limit, fm_label_cb cb, void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, device_id, tenant, measurement_id, outputs, source,"
                          " labelled_by, at_ms FROM label_log WHERE seq > $1 ORDER BY seq"
                          " LIMIT $2",
                          &a, "scan", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_label l = {.seq = pg__int(r, i, 0), .device_id = pg__str(r, i, 1),
                      .tenant = pg__str(r, i, 2), .measurement_id = pg__str(r, i, 3),
                      .outputs_json = pg__str(r, i, 4), .source = pg__str(r, i, 5),
                      .labelled_by = pg__str(r, i, 6), .at_ms = pg__int(r, i, 7)};
        if (cb(ud, &l))
            break;
    }
    PQclear(r);
    return 0;
}

static int q_scan_audit(fm_store *base, int64_t after, size_t limit, fm_audit_cb cb, void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, at_ms, tenant, actor, action, target, outcome, client,"
                          " details FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                          &a, "scan", &rc, NULL);
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

/* The sequence's high-water mark, which stays right when the newest rows
 * have been pruned (as sqlite_sequence does for SQLite). */
static int q_max_seq(fm_store *base, enum fm_lake_stream stream, int64_t *out)
{
    const char *sql;
    switch (stream) {
    case FM_STREAM_RAW:
        sql = "SELECT COALESCE(pg_sequence_last_value('measurements_seq_seq'), 0)";
        break;
    case FM_STREAM_QUARANTINE:
        sql = "SELECT COALESCE(pg_sequence_last_value('quarantine_seq_seq'), 0)";
        break;
    case FM_STREAM_LABELS:
        sql = "SELECT COALESCE(pg_sequence_last_value('label_log_seq_seq'), 0)";
        break;
    case FM_STREAM_AUDIT:
        sql = "SELECT COALESCE(pg_sequence_last_value('audit_seq_seq'), 0)";
        break;
    default:
        return FM_EINVAL;
    }
    int rc;
    PGresult *r = pg__run((pg_store *)base, sql, NULL, "max seq", &rc, NULL);
    if (!r)
        return rc;
    *out = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

static int q_cursor_get(fm_store *base, const char *node, enum fm_lake_stream stream,
                        fm_lake_cursor *out)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__text(&a, node);
    pg__i64(&a, (int64_t)stream);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT last_seq, pending_key, pending_spool FROM lake_cursors"
                          " WHERE node = $1 AND stream = $2",
                          &a, "lake cursor", &rc, NULL);
    if (!r)
        return rc;
    if (PQntuples(r) > 0) {
        out->last_seq = pg__int(r, 0, 0);
        pg__copy(out->pending_key, sizeof out->pending_key, r, 0, 1);
        pg__copy(out->pending_spool, sizeof out->pending_spool, r, 0, 2);
    }
    PQclear(r);
    return 0;
}

static int q_cursor_set(fm_store *base, const char *node, enum fm_lake_stream stream,
                        const fm_lake_cursor *c, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, node);
    pg__i64(&a, (int64_t)stream);
    pg__i64(&a, c->last_seq);
    pg__text(&a, c->pending_key);
    pg__text(&a, c->pending_spool);
    return pg__cmd((pg_store *)base,
                   "INSERT INTO lake_cursors(node, stream, last_seq, pending_key, pending_spool)"
                   " VALUES($1, $2, $3, $4, $5) ON CONFLICT (node, stream) DO UPDATE SET"
                   " last_seq = excluded.last_seq, pending_key = excluded.pending_key,"
                   " pending_spool = excluded.pending_spool",
                   &a, "lake cursor", NULL, err);
}

static int settle_tx(pg_store *s, const char *node, enum fm_lake_stream stream,
                     const fm_lake_cursor *c, const fm_lake_object *objs, size_t n,
                     fm_errbuf *err)
{
    int rc = q_cursor_set(&s->base, node, stream, c, err);
    int64_t now = fm_wall_ms();
    for (size_t i = 0; rc == 0 && i < n; i++) {
        pg_args a = {0};
        pg__text(&a, objs[i].tenant ? objs[i].tenant : "");
        pg__text(&a, objs[i].area);
        pg__text(&a, objs[i].key);
        pg__i64(&a, objs[i].rows);
        pg__i64(&a, now);
        rc = pg__cmd(s,
                     "INSERT INTO lake_object_log(tenant, area, key, rows, at_ms)"
                     " VALUES($1, $2, $3, $4, $5)",
                     &a, "lake object log", NULL, err);
    }
    return rc;
}

static int q_settle(fm_store *base, const char *node, enum fm_lake_stream stream,
                    const fm_lake_cursor *c, const fm_lake_object *objs, size_t n,
                    fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, settle_tx(s, node, stream, c, objs, n, err));
}

static int q_objects(fm_store *base, int64_t after, size_t limit, fm_lake_object_cb cb,
                     void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, lim(limit));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, tenant, area, key, rows, at_ms FROM lake_object_log"
                          " WHERE seq > $1 ORDER BY seq LIMIT $2",
                          &a, "scan", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_lake_object o = {.seq = pg__int(r, i, 0), .tenant = pg__str(r, i, 1),
                            .area = pg__str(r, i, 2), .key = pg__str(r, i, 3),
                            .rows = pg__int(r, i, 4), .at_ms = pg__int(r, i, 5)};
        if (cb(ud, &o))
            break;
    }
    PQclear(r);
    return 0;
}

static int q_objects_max(fm_store *base, int64_t *out)
{
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT COALESCE(max(seq), 0) FROM lake_object_log",
                          NULL, "max seq", &rc, NULL);
    if (!r)
        return rc;
    *out = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

const fm_store_lake_vt pg__lake_vt = {
    .scan_records = q_scan_records,
    .scan_quarantine = q_scan_quarantine,
    .scan_labels = q_scan_labels,
    .scan_audit = q_scan_audit,
    .max_seq = q_max_seq,
    .lake_cursor_get = q_cursor_get,
    .lake_cursor_set = q_cursor_set,
    .lake_settle = q_settle,
    .lake_objects = q_objects,
    .lake_objects_max = q_objects_max,
};
