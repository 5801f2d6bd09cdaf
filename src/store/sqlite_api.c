/*
 * SQLite backend: data behind the HTTP API. Device pages, presence (as the
 * broker reports it), measurement pages, labels (ground truth entered for a
 * measurement) and the audit log.
 *
 * Labels and audit entries are also lake streams: their seq comes from
 * AUTOINCREMENT, so it only ever grows (sqlite_lake.c scans them for the
 * exporter). A label is replaced in
 * place (one current label per measurement); the replacement is a new row
 * with a new, larger seq, so the exporter sees it as a new row.
 */
#include "store/sqlite_int.h"
#include "fleetml/json.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

/* SQLite reads a negative LIMIT as "no limit"; a size_t above INT64_MAX
 * would wrap to one. */
static sqlite3_int64 lim(size_t n) { return n > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)n; }

static const char *nz(const char *s) { return s ? s : ""; }

static const char *col(sqlite3_stmt *st, int i)
{
    const char *v = (const char *)sqlite3_column_text(st, i);
    return v ? v : "";
}

/* 1 when text is a JSON object. */
static int is_json_object(const char *text)
{
    json_t *j = text ? json_loads(text, 0, NULL) : NULL;
    int ok = json_is_object(j);
    json_decref(j);
    return ok;
}

/* ---- devices and presence -------------------------------------------------- */

int sql__device_page(fm_store *base, const char *tenant, const char *after_id, size_t limit,
                     fm_device_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    /* Ordered by id: the primary key, or devices_by_tenant(tenant, id). */
    if (sql__prep(s, &st,
                  tenant ? "SELECT id, tenant, status, cert_serial, created_ms, device_group,"
                           " serial_number, model, firmware FROM devices"
                           " WHERE id > ?1 AND tenant = ?3 ORDER BY id LIMIT ?2"
                         : "SELECT id, tenant, status, cert_serial, created_ms, device_group,"
                           " serial_number, model, firmware FROM devices"
                           " WHERE id > ?1 ORDER BY id LIMIT ?2",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(after_id), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, lim(limit));
    if (tenant)
        sqlite3_bind_text(st, 3, tenant, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_device d;
        sql__read_device(st, &d);
        sql__copy_col(d.model, sizeof d.model, st, 7);
        sql__copy_col(d.firmware, sizeof d.firmware, st, 8);
        if (cb(ud, &d)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int presence_tx(sqlite_store *s, const char *node, const fm_presence_update *u, size_t n,
                       fm_errbuf *err)
{
    sqlite3_stmt *st, *log;
    /* The WHERE EXISTS drops unknown devices (and is also what lets SQLite
     * parse an upsert after INSERT ... SELECT); the upsert's WHERE keeps a
     * newer state against a late, older report. A stored change is also
     * appended to presence_log (its rev: writers are serial in SQLite, so
     * revs commit in order). */
    int rc = sql__prep(s, &st,
                       "INSERT INTO device_presence(device_id, online, changed_ms, node)"
                       " SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)"
                       " ON CONFLICT(device_id) DO UPDATE SET online = excluded.online,"
                       " changed_ms = excluded.changed_ms, node = excluded.node"
                       " WHERE excluded.changed_ms >= device_presence.changed_ms",
                       err);
    if (rc)
        return rc;
    if ((rc = sql__prep(s, &log, SQL_PRESENCE_LOG("?1", "?2", "?3"), err)) != 0) {
        sqlite3_finalize(st);
        return rc;
    }
    for (size_t i = 0; i < n && !rc; i++) {
        sqlite3_bind_text(st, 1, nz(u[i].device_id), -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, u[i].online ? 1 : 0);
        sqlite3_bind_int64(st, 3, u[i].at_ms);
        sqlite3_bind_text(st, 4, nz(node), -1, SQLITE_STATIC);
        int src = sql__step_done(st);
        if (src == SQLITE_OK && sqlite3_changes(s->db) > 0) {
            sqlite3_bind_text(log, 1, nz(u[i].device_id), -1, SQLITE_STATIC);
            sqlite3_bind_int(log, 2, u[i].online ? 1 : 0);
            sqlite3_bind_int64(log, 3, u[i].at_ms);
            src = sql__step_done(log);
        }
        if (src != SQLITE_OK)
            rc = sql__err(s, err, src, "presence");
    }
    sqlite3_finalize(log);
    sqlite3_finalize(st);
    return rc;
}

int sql__presence_set(fm_store *base, const char *node, const fm_presence_update *u, size_t n)
{
    sqlite_store *s = (sqlite_store *)base;
    if (n == 0)
        return 0;
    IN_TX(s, NULL, presence_tx(s, node, u, n, NULL));
}

/* Logs, then changes, the devices a broker restart took offline. */
static int presence_reset_tx(sqlite_store *s, const char *node, int64_t at_ms)
{
    static const char *const sql[] = {SQL_PRESENCE_RESET_LOG("?1", "?2"),
                                      SQL_PRESENCE_RESET("?1", "?2")};
    for (size_t i = 0; i < 2; i++) {
        sqlite3_stmt *st;
        if (sql__prep(s, &st, sql[i], NULL))
            return FM_EDB;
        sqlite3_bind_int64(st, 1, at_ms);
        sqlite3_bind_text(st, 2, nz(node), -1, SQLITE_STATIC);
        int rc = sql__step_done(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
            return sql__map_rc(rc);
    }
    return 0;
}

int sql__presence_reset(fm_store *base, const char *node, int64_t at_ms)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, NULL, presence_reset_tx(s, node, at_ms));
}

int sql__presence_get(fm_store *base, const char *device_id, fm_presence *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    /* One statement reads both tables in one snapshot; a missing row reads
     * as NULL, i.e. 0. The newest measurement comes from the end of the
     * measurements_by_device index. */
    if (sql__prep(s, &st, SQL_PRESENCE_GET("?1"), NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(device_id), -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->online = sqlite3_column_int(st, 0) != 0;
        out->changed_ms = sqlite3_column_int64(st, 1);
        int64_t newest = sqlite3_column_int64(st, 2);
        out->last_seen_ms = newest > out->changed_ms ? newest : out->changed_ms;
        out->cert_expires_ms = sqlite3_column_int64(st, 3);
        sql__copy_col(out->node, sizeof out->node, st, 4);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : sql__map_rc(rc);
}

static int s_presence_counts(fm_store *base, const char *node, fm_presence_count_cb cb,
                             void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, SQL_PRESENCE_COUNTS("?1"), NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(node), -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_presence_count c = {.tenant = (const char *)sqlite3_column_text(st, 0),
                               .online = sqlite3_column_int64(st, 1),
                               .offline = sqlite3_column_int64(st, 2),
                               .inactive = sqlite3_column_int64(st, 3),
                               .on_node = sqlite3_column_int64(st, 4)};
        if (!c.tenant)
            c.tenant = "";
        if (cb(ud, &c)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__presence_changes(fm_store *base, int64_t after_rev, size_t limit,
                          fm_presence_change_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, SQL_PRESENCE_CHANGES("?1", "?2"), NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after_rev);
    sqlite3_bind_int64(st, 2, lim(limit));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_presence_change c = {.rev = sqlite3_column_int64(st, 0),
                                .device_id = col(st, 1),
                                .tenant = col(st, 2),
                                .online = sqlite3_column_int(st, 3) != 0,
                                .changed_ms = sqlite3_column_int64(st, 4)};
        if (cb(ud, &c)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__presence_rev(fm_store *base, int64_t *rev)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    *rev = 0;
    if (sql__prep(s, &st, "SELECT coalesce(max(rev), 0) FROM presence_log", NULL))
        return FM_EDB;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *rev = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : sql__map_rc(rc);
}

/* ---- measurements ----------------------------------------------------------- */

#define RECORD_COLS                                                                                \
    "seq, device_id, tenant, measurement_id, received_ms, taken_ms, payload, result, model, shadow"

/* Steps st and calls cb for each row. Returns 0, FM_ENOTFOUND when
 * need_row and there was none, or the mapped SQLite error. Finalizes st. */
static int record_rows(sqlite3_stmt *st, fm_record_cb cb, void *ud, int need_row)
{
    int rc, rows = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        rows++;
        fm_record r = {
            .seq = sqlite3_column_int64(st, 0),
            .device_id = col(st, 1),
            .tenant = col(st, 2),
            .measurement_id = col(st, 3),
            .received_ms = sqlite3_column_int64(st, 4),
            .taken_ms = sqlite3_column_int64(st, 5),
            .payload = col(st, 6),
            .payload_len = (size_t)sqlite3_column_bytes(st, 6),
            .result_json = col(st, 7),
            .model = col(st, 8),
            .shadow_json = (const char *)sqlite3_column_text(st, 9),
        };
        if (cb(ud, &r)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return sql__map_rc(rc);
    return need_row && rows == 0 ? FM_ENOTFOUND : 0;
}

int sql__measurement_page(fm_store *base, const fm_measurement_query *q, fm_record_cb cb,
                          void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    if (!q || !q->device_id)
        return FM_EINVAL;
    /* Every filter is a range on measurements_by_device(device_id,
     * received_ms), whose entries end with the rowid (seq): walking it
     * backwards gives (received_ms DESC, seq DESC) without a sort. The
     * redundant "received_ms <= cursor" bounds the range for the planner. */
    char sql[512];
    int n = snprintf(sql, sizeof sql, "SELECT " RECORD_COLS " FROM measurements"
                                      " WHERE device_id = ?1");
    if (q->from_ms)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND received_ms >= ?2");
    if (q->to_ms)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND received_ms < ?3");
    if (q->cursor_seq > 0)
        n += snprintf(sql + n, sizeof sql - (size_t)n,
                      " AND received_ms <= ?4 AND (received_ms < ?4 OR seq < ?5)");
    snprintf(sql + n, sizeof sql - (size_t)n, " ORDER BY received_ms DESC, seq DESC LIMIT ?6");
    sqlite3_stmt *st;
    if (sql__prep(s, &st, sql, NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, q->device_id, -1, SQLITE_STATIC);
    if (q->from_ms)
        sqlite3_bind_int64(st, 2, q->from_ms);
    if (q->to_ms)
        sqlite3_bind_int64(st, 3, q->to_ms);
    if (q->cursor_seq > 0) {
        sqlite3_bind_int64(st, 4, q->cursor_ms);
        sqlite3_bind_int64(st, 5, q->cursor_seq);
    }
    sqlite3_bind_int64(st, 6, lim(q->limit));
    return record_rows(st, cb, ud, 0);
}

int sql__measurement_get(fm_store *base, const char *device_id, const char *measurement_id,
                         fm_record_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT " RECORD_COLS " FROM measurements"
                  " WHERE device_id = ? AND measurement_id = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(device_id), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(measurement_id), -1, SQLITE_STATIC);
    return record_rows(st, cb, ud, 1);
}

/* ---- labels ------------------------------------------------------------------ */

/* Every write is appended to label_log (the lake stream, so each version
 * reaches labels/ however quickly it is corrected) and becomes the current
 * label in `labels`, in one transaction. The log row is inserted only if
 * the measurement exists (in the label's tenant, when one is given), so a
 * label never points nowhere; the tenant is the measurement's. */
static int label_put_tx(sqlite_store *s, fm_label *l, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO label_log(device_id, tenant, measurement_id, outputs,"
                       " source, labelled_by, at_ms)"
                       " SELECT device_id, tenant, measurement_id, ?3, ?4, ?5, ?6 FROM measurements"
                       " WHERE device_id = ?1 AND measurement_id = ?2"
                       " AND (?7 IS NULL OR tenant = ?7)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, l->device_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, l->measurement_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, l->outputs_json, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, nz(l->source), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, nz(l->labelled_by), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, l->at_ms);
    if (l->tenant && *l->tenant)
        sqlite3_bind_text(st, 7, l->tenant, -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "label");
    if (sqlite3_changes(s->db) == 0)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' has no measurement '%s'", l->device_id,
                       l->measurement_id);
    int64_t seq = sqlite3_last_insert_rowid(s->db);
    if ((rc = sql__prep(s, &st,
                        "INSERT OR REPLACE INTO labels(seq, device_id, tenant, measurement_id,"
                        " outputs, source, labelled_by, at_ms)"
                        " SELECT seq, device_id, tenant, measurement_id, outputs, source,"
                        " labelled_by, at_ms FROM label_log WHERE seq = ?",
                        err)) != 0)
        return rc;
    sqlite3_bind_int64(st, 1, seq);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "label");
    l->seq = seq;
    return 0;
}

int sql__label_put(fm_store *base, fm_label *l, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    l->seq = 0;
    if (!l->device_id || !l->measurement_id)
        return fm_errf(err, FM_EINVAL, "label: device and measurement are required");
    /* The lake embeds the outputs as an object: only store what it can. */
    if (!is_json_object(l->outputs_json))
        return fm_errf(err, FM_EINVAL, "label: outputs must be a JSON object");
    if (l->at_ms == 0)
        l->at_ms = fm_wall_ms();
    fm_errbuf local;
    if (!err)
        err = &local;
    IN_TX(s, err, label_put_tx(s, l, err));
}

int sql__label_get(fm_store *base, const char *device_id, const char *measurement_id,
                   fm_label *out, char *source, size_t source_len, char *by, size_t by_len)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (sql__prep(s, &st,
                  "SELECT seq, outputs, source, labelled_by, at_ms FROM labels"
                  " WHERE device_id = ? AND measurement_id = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(device_id), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(measurement_id), -1, SQLITE_STATIC);
    int rc = sqlite3_step(st), ret = 0;
    if (rc == SQLITE_ROW) {
        char *outputs = fm_strdup(col(st, 1));
        if (!outputs) {
            ret = FM_ENOMEM;
        } else {
            out->seq = sqlite3_column_int64(st, 0);
            out->outputs_json = outputs;
            out->at_ms = sqlite3_column_int64(st, 4);
            if (source && source_len) {
                sql__copy_col(source, source_len, st, 2);
                out->source = source;
            }
            if (by && by_len) {
                sql__copy_col(by, by_len, st, 3);
                out->labelled_by = by;
            }
        }
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_finalize(st);
    return ret;
}

int sql__label_history(fm_store *base, const char *device_id, const char *measurement_id,
                       fm_label_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, SQL_LABEL_HISTORY("?1", "?2"), NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(device_id), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(measurement_id), -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_label l = {.seq = sqlite3_column_int64(st, 0),
                      .device_id = col(st, 1),
                      .tenant = col(st, 2),
                      .measurement_id = col(st, 3),
                      .outputs_json = col(st, 4),
                      .source = col(st, 5),
                      .labelled_by = col(st, 6),
                      .at_ms = sqlite3_column_int64(st, 7)};
        if (cb(ud, &l)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

/* ---- audit -------------------------------------------------------------------- */

int sql__audit_append(fm_store *base, fm_audit *a, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    a->seq = 0;
    const char *details = a->details_json ? a->details_json : "{}";
    if (!is_json_object(details))
        return fm_errf(err, FM_EINVAL, "audit: details must be a JSON object");
    if (a->at_ms == 0)
        a->at_ms = fm_wall_ms();
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO audit(at_ms, tenant, actor, action, target, outcome, client,"
                       " details) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, a->at_ms);
    sqlite3_bind_text(st, 2, nz(a->tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, nz(a->actor), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, nz(a->action), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, nz(a->target), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, nz(a->outcome), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, nz(a->client), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, details, -1, SQLITE_STATIC);
    /* A single INSERT in autocommit mode is its own durable transaction
     * (synchronous=FULL). */
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "audit");
    a->seq = sqlite3_last_insert_rowid(s->db);
    return 0;
}

int sql__audit_page(fm_store *base, const fm_audit_filter *f, size_t limit, fm_audit_cb cb,
                    void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    static const fm_audit_filter none;
    if (!f)
        f = &none;
    /* Fixed parameter numbers; only the clauses in use are in the text. */
    char sql[512];
    int n = snprintf(sql, sizeof sql,
                     "SELECT seq, at_ms, tenant, actor, action, target, outcome, client, details"
                     " FROM audit WHERE 1");
    if (f->tenant)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND tenant = ?1");
    if (f->actor)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND actor = ?2");
    if (f->action)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND action = ?3");
    if (f->from_ms)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND at_ms >= ?4");
    if (f->to_ms)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND at_ms < ?5");
    if (f->before_seq > 0)
        n += snprintf(sql + n, sizeof sql - (size_t)n, " AND seq < ?6");
    snprintf(sql + n, sizeof sql - (size_t)n, " ORDER BY seq DESC LIMIT ?7");
    sqlite3_stmt *st;
    if (sql__prep(s, &st, sql, NULL))
        return FM_EDB;
    if (f->tenant)
        sqlite3_bind_text(st, 1, f->tenant, -1, SQLITE_STATIC);
    if (f->actor)
        sqlite3_bind_text(st, 2, f->actor, -1, SQLITE_STATIC);
    if (f->action)
        sqlite3_bind_text(st, 3, f->action, -1, SQLITE_STATIC);
    if (f->from_ms)
        sqlite3_bind_int64(st, 4, f->from_ms);
    if (f->to_ms)
        sqlite3_bind_int64(st, 5, f->to_ms);
    if (f->before_seq > 0)
        sqlite3_bind_int64(st, 6, f->before_seq);
    sqlite3_bind_int64(st, 7, lim(limit));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_audit a = {
            .seq = sqlite3_column_int64(st, 0),
            .at_ms = sqlite3_column_int64(st, 1),
            .tenant = col(st, 2),
            .actor = col(st, 3),
            .action = col(st, 4),
            .target = col(st, 5),
            .outcome = col(st, 6),
            .client = col(st, 7),
            .details_json = col(st, 8),
        };
        if (cb(ud, &a)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

const fm_store_api_vt sql__api_vt = {
    .device_page = sql__device_page,
    .presence_set = sql__presence_set,
    .presence_reset = sql__presence_reset,
    .presence_get = sql__presence_get,
    .presence_counts = s_presence_counts,
    .presence_changes = sql__presence_changes,
    .presence_rev = sql__presence_rev,
    .measurement_page = sql__measurement_page,
    .measurement_get = sql__measurement_get,
    .label_put = sql__label_put,
    .label_get = sql__label_get,
    .label_history = sql__label_history,
    .audit_append = sql__audit_append,
    .audit_page = sql__audit_page,
};
