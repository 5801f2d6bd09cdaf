/*
 * SQLite backend: the lake's side of the store. Each export stream (raw
 * measurements, quarantine, labels, audit) is scanned in seq order, and
 * each node keeps a cursor per stream. Rows are handed over as they are
 * stored; the lake's documents are rendered by src/lake/writer.c, so the
 * format is the same whatever the backend.
 */
#include "store/sqlite_int.h"

#include <string.h>

/* SQLite reads a negative LIMIT as "no limit"; a size_t above INT64_MAX
 * would wrap to one. */
static sqlite3_int64 lim(size_t n) { return n > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)n; }

static const char *col(sqlite3_stmt *st, int i)
{
    const char *v = (const char *)sqlite3_column_text(st, i);
    return v ? v : "";
}

static int s_scan_records(fm_store *base, int64_t after, size_t limit, fm_record_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
             "SELECT seq, device_id, tenant, measurement_id, received_ms, taken_ms, payload,"
             " result, model, shadow FROM measurements WHERE seq > ? ORDER BY seq LIMIT ?",
             NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)limit);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_record r = {
            .seq = sqlite3_column_int64(st, 0),
            .device_id = (const char *)sqlite3_column_text(st, 1),
            .tenant = (const char *)sqlite3_column_text(st, 2),
            .measurement_id = (const char *)sqlite3_column_text(st, 3),
            .received_ms = sqlite3_column_int64(st, 4),
            .taken_ms = sqlite3_column_int64(st, 5),
            .payload = (const char *)sqlite3_column_text(st, 6),
            .payload_len = (size_t)sqlite3_column_bytes(st, 6),
            .result_json = (const char *)sqlite3_column_text(st, 7),
            .model = (const char *)sqlite3_column_text(st, 8),
            .shadow_json = (const char *)sqlite3_column_text(st, 9),
        };
        if (cb(ud, &r)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int s_scan_quarantine(fm_store *base, int64_t after, size_t limit, fm_quarantine_cb cb,
                             void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
             "SELECT seq, device_id, tenant, received_ms, payload, error_code, error_message"
             " FROM quarantine WHERE seq > ? ORDER BY seq LIMIT ?",
             NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)limit);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_quarantine q = {
            .seq = sqlite3_column_int64(st, 0),
            .device_id = (const char *)sqlite3_column_text(st, 1),
            .tenant = (const char *)sqlite3_column_text(st, 2),
            .received_ms = sqlite3_column_int64(st, 3),
            .payload = (const char *)sqlite3_column_blob(st, 4),
            .payload_len = (size_t)sqlite3_column_bytes(st, 4),
            .error_code = (const char *)sqlite3_column_text(st, 5),
            .error_message = (const char *)sqlite3_column_text(st, 6),
        };
        if (!q.payload)
            q.payload = "";
        if (cb(ud, &q)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int s_max_seq(fm_store *base, enum fm_lake_stream stream, int64_t *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    const char *table;
    switch (stream) {
    case FM_STREAM_RAW: table = "measurements"; break;
    case FM_STREAM_QUARANTINE: table = "quarantine"; break;
    case FM_STREAM_LABELS: table = "label_log"; break;
    case FM_STREAM_AUDIT: table = "audit"; break;
    default: return FM_EINVAL;
    }
    /* sqlite_sequence holds the AUTOINCREMENT high-water mark, which stays
     * right even when the newest rows have been pruned (quarantine). */
    if (sql__prep(s, &st, "SELECT seq FROM sqlite_sequence WHERE name = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : sql__map_rc(rc);
}

static int s_cursor_get(fm_store *base, const char *node, enum fm_lake_stream stream,
                        fm_lake_cursor *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (sql__prep(s, &st,
             "SELECT last_seq, pending_key, pending_spool FROM lake_cursors"
             " WHERE node = ? AND stream = ?",
             NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, (int)stream);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->last_seq = sqlite3_column_int64(st, 0);
        sql__copy_col(out->pending_key, sizeof out->pending_key, st, 1);
        sql__copy_col(out->pending_spool, sizeof out->pending_spool, st, 2);
    }
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : sql__map_rc(rc);
}

static int s_cursor_set(fm_store *base, const char *node, enum fm_lake_stream stream,
                        const fm_lake_cursor *c, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                  "INSERT INTO lake_cursors(node, stream, last_seq, pending_key, pending_spool)"
                  " VALUES(?, ?, ?, ?, ?) ON CONFLICT(node, stream) DO UPDATE SET"
                  " last_seq = excluded.last_seq, pending_key = excluded.pending_key,"
                  " pending_spool = excluded.pending_spool",
                  err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, (int)stream);
    sqlite3_bind_int64(st, 3, c->last_seq);
    sqlite3_bind_text(st, 4, c->pending_key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, c->pending_spool, -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "lake cursor");
}

static int s_settle(fm_store *base, const char *node, enum fm_lake_stream stream,
                    const fm_lake_cursor *c, const fm_lake_object *objs, size_t n,
                    fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    int rc = sql__begin(s, err);
    if (rc)
        return rc;
    rc = s_cursor_set(base, node, stream, c, err);
    sqlite3_stmt *st = NULL;
    if (rc == 0 && n > 0)
        rc = sql__prep(s, &st,
                       "INSERT INTO lake_object_log(tenant, area, key, rows, at_ms)"
                       " VALUES(?, ?, ?, ?, ?)",
                       err);
    int64_t now = fm_wall_ms();
    for (size_t i = 0; rc == 0 && i < n; i++) {
        sqlite3_bind_text(st, 1, objs[i].tenant ? objs[i].tenant : "", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, objs[i].area, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, objs[i].key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, objs[i].rows);
        sqlite3_bind_int64(st, 5, now);
        int step = sql__step_done(st);
        if (step != SQLITE_OK)
            rc = sql__err(s, err, step, "lake object log");
    }
    if (st)
        sqlite3_finalize(st);
    if (rc == 0)
        return sql__commit(s, err);
    sql__rollback(s);
    return rc;
}

static int s_objects(fm_store *base, int64_t after, size_t limit, fm_lake_object_cb cb,
                     void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT seq, tenant, area, key, rows, at_ms FROM lake_object_log"
                  " WHERE seq > ? ORDER BY seq LIMIT ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, lim(limit));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_lake_object o = {.seq = sqlite3_column_int64(st, 0), .tenant = col(st, 1),
                            .area = col(st, 2), .key = col(st, 3),
                            .rows = sqlite3_column_int64(st, 4),
                            .at_ms = sqlite3_column_int64(st, 5)};
        if (cb(ud, &o)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int s_objects_max(fm_store *base, int64_t *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT COALESCE(MAX(seq), 0) FROM lake_object_log", NULL))
        return FM_EDB;
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : sql__map_rc(rc);
}

static int s_scan_labels(fm_store *base, int64_t after, size_t limit, fm_label_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT seq, device_id, tenant, measurement_id, outputs, source, labelled_by,"
                  " at_ms FROM label_log WHERE seq > ? ORDER BY seq LIMIT ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, lim(limit));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_label l = {.seq = sqlite3_column_int64(st, 0), .device_id = col(st, 1),
                      .tenant = col(st, 2), .measurement_id = col(st, 3),
                      .outputs_json = col(st, 4), .source = col(st, 5),
                      .labelled_by = col(st, 6), .at_ms = sqlite3_column_int64(st, 7)};
        if (cb(ud, &l)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int s_scan_audit(fm_store *base, int64_t after, size_t limit, fm_audit_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT seq, at_ms, tenant, actor, action, target, outcome, client, details"
                  " FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, lim(limit));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_audit a = {.seq = sqlite3_column_int64(st, 0), .at_ms = sqlite3_column_int64(st, 1),
                      .tenant = col(st, 2), .actor = col(st, 3), .action = col(st, 4),
                      .target = col(st, 5), .outcome = col(st, 6), .client = col(st, 7),
                      .details_json = col(st, 8)};
        if (cb(ud, &a)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

const fm_store_lake_vt sql__lake_vt = {
    .scan_records = s_scan_records,
    .scan_quarantine = s_scan_quarantine,
    .scan_labels = s_scan_labels,
    .scan_audit = s_scan_audit,
    .max_seq = s_max_seq,
    .lake_cursor_get = s_cursor_get,
    .lake_cursor_set = s_cursor_set,
    .lake_settle = s_settle,
    .lake_objects = s_objects,
    .lake_objects_max = s_objects_max,
};
