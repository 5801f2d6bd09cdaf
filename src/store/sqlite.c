/*
 * SQLite backend of the store.
 *
 * Durability: WAL journal with synchronous=FULL, so a COMMIT returns only
 * after the WAL has been fsynced; the pipeline publishes replies only after
 * that. Many measurements share one transaction (group commit), which is
 * what makes FULL affordable.
 *
 * Sequence numbers use AUTOINCREMENT so that a seq is never reused, even
 * after quarantine rows are pruned: the lake exporter relies on seqs only
 * growing.
 */
#include "store/store_internal.h"

#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#define SCHEMA_VERSION 2

typedef struct sqlite_store {
    fm_store base;
    sqlite3 *db;
    sqlite3_stmt *ins_meas, *ins_quar, *lookup, *dev_get, *begin, *commit, *rollback;
} sqlite_store;

static const char *schema_v1 =
    "CREATE TABLE IF NOT EXISTS tenants ("
    "  name TEXT PRIMARY KEY, created_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS users ("
    "  id INTEGER PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  username TEXT NOT NULL, password_hash TEXT NOT NULL, roles TEXT NOT NULL,"
    "  status INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL,"
    "  UNIQUE (tenant, username));"
    "CREATE TABLE IF NOT EXISTS devices ("
    "  id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  status INTEGER NOT NULL DEFAULT 0, cert_serial TEXT NOT NULL DEFAULT '',"
    "  created_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS measurements ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, received_ms INTEGER NOT NULL, taken_ms INTEGER NOT NULL,"
    "  payload TEXT NOT NULL, result TEXT NOT NULL, model TEXT NOT NULL,"
    "  UNIQUE (device_id, measurement_id));"
    "CREATE INDEX IF NOT EXISTS measurements_by_device ON measurements(device_id, received_ms);"
    "CREATE TABLE IF NOT EXISTS quarantine ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  received_ms INTEGER NOT NULL, payload BLOB NOT NULL, error_code TEXT NOT NULL,"
    "  error_message TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS health ("
    "  id INTEGER PRIMARY KEY CHECK (id = 1), probed_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS lake_cursors ("
    "  node TEXT NOT NULL, stream INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    "  pending_key TEXT NOT NULL DEFAULT '', pending_spool TEXT NOT NULL DEFAULT '',"
    "  PRIMARY KEY (node, stream));";

static int map_rc(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW: return 0;
    case SQLITE_FULL: return FM_ENOSPC;
    case SQLITE_IOERR: return FM_EIO;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return FM_EBUSY;
    case SQLITE_CONSTRAINT: return FM_EEXIST;
    case SQLITE_NOMEM: return FM_ENOMEM;
    default: return FM_EDB;
    }
}

static int db_err(sqlite_store *s, fm_errbuf *err, int rc, const char *what)
{
    return fm_errf(err, map_rc(rc), "%s: %s", what, sqlite3_errmsg(s->db));
}

static int exec(sqlite_store *s, const char *sql, fm_errbuf *err)
{
    char *msg = NULL;
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        int code = fm_errf(err, map_rc(rc), "%s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return code;
    }
    return 0;
}

static int prep(sqlite_store *s, sqlite3_stmt **st, const char *sql, fm_errbuf *err)
{
    int rc = sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? 0 : db_err(s, err, rc, "prepare");
}

/* Runs a prepared statement to completion and resets it. */
static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int user_version(sqlite_store *s)
{
    sqlite3_stmt *st;
    int v = -1;
    if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return v;
}

static int s_migrate(fm_store *base, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    /* A database already at this version is left untouched: opening it
     * must not write (so `fleetml init` run twice changes nothing). */
    int v = user_version(s);
    if (v == SCHEMA_VERSION)
        return 0;
    if (v > SCHEMA_VERSION)
        return fm_errf(err, FM_EDB, "database schema version %d is newer than this fleetml (%d)",
                       v, SCHEMA_VERSION);
    int rc = exec(s, "BEGIN IMMEDIATE", err);
    if (rc)
        return rc;
    rc = exec(s, schema_v1, err);
    if (!rc) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", SCHEMA_VERSION);
        rc = exec(s, sql, err);
    }
    if (!rc)
        return exec(s, "COMMIT", err);
    exec(s, "ROLLBACK", NULL);
    return rc;
}

static void s_close(fm_store *base)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *sts[] = {s->ins_meas, s->ins_quar, s->lookup, s->dev_get,
                           s->begin,    s->commit,   s->rollback};
    for (size_t i = 0; i < sizeof sts / sizeof sts[0]; i++)
        sqlite3_finalize(sts[i]);
    sqlite3_close(s->db);
    fm_free(s);
}

static int s_tenant_ensure(fm_store *base, const char *name, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    /* Look first so an existing tenant costs no write transaction. */
    int rc = prep(s, &st, "SELECT 1 FROM tenants WHERE name = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_ROW)
        return 0;
    rc = prep(s, &st, "INSERT OR IGNORE INTO tenants(name, created_ms) VALUES(?, ?)", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, fm_wall_ms());
    rc = step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : db_err(s, err, rc, "tenant");
}

static int s_user_create(fm_store *base, const char *tenant, const char *username,
                         const char *hash, const char *roles, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = prep(s, &st,
                  "INSERT INTO users(tenant, username, password_hash, roles, created_ms) "
                  "VALUES(?, ?, ?, ?, ?)",
                  err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, username, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hash, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, roles, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, fm_wall_ms());
    rc = step_done(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_OK)
        return 0;
    return db_err(s, err, rc, "user");
}

static int s_user_count(fm_store *base, const char *tenant, long *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (prep(s, &st, "SELECT count(*) FROM users WHERE tenant = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *out = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : FM_EDB;
}

static int s_device_add(fm_store *base, const fm_device *d, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = prep(s, &st, "SELECT 1 FROM tenants WHERE name = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, d->tenant, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return fm_errf(err, FM_ENOTFOUND, "tenant '%s' does not exist", d->tenant);
    rc = prep(s, &st,
              "INSERT INTO devices(id, tenant, status, cert_serial, created_ms) "
              "VALUES(?, ?, ?, ?, ?)",
              err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, d->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, d->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, d->status);
    sqlite3_bind_text(st, 4, d->cert_serial, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, d->created_ms ? d->created_ms : fm_wall_ms());
    rc = step_done(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_OK)
        return 0;
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return fm_errf(err, FM_EEXIST, "device '%s' already exists", d->id);
    return db_err(s, err, rc, "device");
}

static void copy_col(char *dst, size_t n, sqlite3_stmt *st, int col)
{
    const unsigned char *v = sqlite3_column_text(st, col);
    snprintf(dst, n, "%s", v ? (const char *)v : "");
}

static int s_device_get(fm_store *base, const char *id, fm_device *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st = s->dev_get;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        memset(out, 0, sizeof *out);
        copy_col(out->id, sizeof out->id, st, 0);
        copy_col(out->tenant, sizeof out->tenant, st, 1);
        out->status = sqlite3_column_int(st, 2);
        copy_col(out->cert_serial, sizeof out->cert_serial, st, 3);
        out->created_ms = sqlite3_column_int64(st, 4);
        ret = 0;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : map_rc(rc);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

static int s_device_set_status(fm_store *base, const char *id, int status, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = prep(s, &st, "UPDATE devices SET status = ? WHERE id = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_int(st, 1, status);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    rc = step_done(st);
    int changed = sqlite3_changes(s->db);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return db_err(s, err, rc, "device status");
    return changed ? 0 : fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", id);
}

static int s_result_lookup(fm_store *base, const char *dev, const char *mid, char **result)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st = s->lookup;
    sqlite3_bind_text(st, 1, dev, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, mid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        const char *v = (const char *)sqlite3_column_text(st, 0);
        *result = fm_strdup(v ? v : "");
        ret = *result ? 0 : FM_ENOMEM;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : map_rc(rc);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

static int s_commit(fm_store *base, fm_record *recs, size_t n, fm_quarantine *q, size_t nq,
                    fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    int rc = step_done(s->begin);
    if (rc != SQLITE_OK)
        return db_err(s, err, rc, "begin");
    for (size_t i = 0; i < n && rc == SQLITE_OK; i++) {
        sqlite3_stmt *st = s->ins_meas;
        fm_record *r = &recs[i];
        sqlite3_bind_text(st, 1, r->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, r->tenant, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, r->measurement_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, r->received_ms);
        sqlite3_bind_int64(st, 5, r->taken_ms);
        sqlite3_bind_text(st, 6, r->payload, (int)r->payload_len, SQLITE_STATIC);
        sqlite3_bind_text(st, 7, r->result_json, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 8, r->model, -1, SQLITE_STATIC);
        rc = step_done(st);
        if (rc == SQLITE_OK)
            r->seq = sqlite3_last_insert_rowid(s->db);
    }
    for (size_t i = 0; i < nq && rc == SQLITE_OK; i++) {
        sqlite3_stmt *st = s->ins_quar;
        fm_quarantine *x = &q[i];
        sqlite3_bind_text(st, 1, x->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, x->tenant, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, x->received_ms);
        sqlite3_bind_blob(st, 4, x->payload, (int)x->payload_len, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, x->error_code, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 6, x->error_message, -1, SQLITE_STATIC);
        rc = step_done(st);
        if (rc == SQLITE_OK)
            x->seq = sqlite3_last_insert_rowid(s->db);
    }
    if (rc == SQLITE_OK)
        rc = step_done(s->commit);
    if (rc == SQLITE_OK)
        return 0;
    /* Keep the message before ROLLBACK overwrites it. A failed COMMIT may
     * leave the transaction open; roll it back so nothing is half-stored. */
    int code = db_err(s, err, rc, "commit");
    if (!sqlite3_get_autocommit(s->db))
        step_done(s->rollback);
    for (size_t i = 0; i < n; i++)
        recs[i].seq = 0;
    return code;
}

static int s_count_measurements(fm_store *base, const char *device_id, long *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (prep(s, &st, "SELECT count(*) FROM measurements WHERE device_id = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *out = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : FM_EDB;
}

static int s_probe_write(fm_store *base, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = prep(s, &st, "INSERT OR REPLACE INTO health(id, probed_ms) VALUES(1, ?)", err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, fm_wall_ms());
    rc = step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : db_err(s, err, rc, "probe");
}

static int s_scan_records(fm_store *base, int64_t after, size_t limit, fm_record_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (prep(s, &st,
             "SELECT seq, device_id, tenant, measurement_id, received_ms, taken_ms, payload,"
             " result, model FROM measurements WHERE seq > ? ORDER BY seq LIMIT ?",
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
        };
        if (cb(ud, &r)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : map_rc(rc);
}

static int s_scan_quarantine(fm_store *base, int64_t after, size_t limit, fm_quarantine_cb cb,
                             void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (prep(s, &st,
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
    return rc == SQLITE_DONE ? 0 : map_rc(rc);
}

static int s_max_seq(fm_store *base, enum fm_lake_stream stream, int64_t *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    /* sqlite_sequence holds the AUTOINCREMENT high-water mark, which stays
     * right even when the newest quarantine rows have been pruned. */
    if (prep(s, &st, "SELECT seq FROM sqlite_sequence WHERE name = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, stream == FM_STREAM_RAW ? "measurements" : "quarantine", -1,
                      SQLITE_STATIC);
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : map_rc(rc);
}

static int s_cursor_get(fm_store *base, const char *node, enum fm_lake_stream stream,
                        fm_lake_cursor *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (prep(s, &st,
             "SELECT last_seq, pending_key, pending_spool FROM lake_cursors"
             " WHERE node = ? AND stream = ?",
             NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, (int)stream);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->last_seq = sqlite3_column_int64(st, 0);
        copy_col(out->pending_key, sizeof out->pending_key, st, 1);
        copy_col(out->pending_spool, sizeof out->pending_spool, st, 2);
    }
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : map_rc(rc);
}

static int s_cursor_set(fm_store *base, const char *node, enum fm_lake_stream stream,
                        const fm_lake_cursor *c, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = prep(s, &st,
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
    rc = step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : db_err(s, err, rc, "lake cursor");
}

static const fm_store_vtable sqlite_vt = {
    .name = "sqlite",
    .migrate = s_migrate,
    .close = s_close,
    .tenant_ensure = s_tenant_ensure,
    .user_create = s_user_create,
    .user_count = s_user_count,
    .device_add = s_device_add,
    .device_get = s_device_get,
    .device_set_status = s_device_set_status,
    .result_lookup = s_result_lookup,
    .commit = s_commit,
    .count_measurements = s_count_measurements,
    .probe_write = s_probe_write,
    .scan_records = s_scan_records,
    .scan_quarantine = s_scan_quarantine,
    .max_seq = s_max_seq,
    .lake_cursor_get = s_cursor_get,
    .lake_cursor_set = s_cursor_set,
};

int store__sqlite_open(const fm_config *cfg, fm_store **out, fm_errbuf *err)
{
    char dir[PATH_MAX], path[PATH_MAX];
    if (!fm_config_path(cfg, "db", dir, sizeof dir) ||
        !fm_config_path(cfg, "db/fleetml.db", path, sizeof path))
        return fm_errf(err, FM_EINVAL, "data directory path too long");
    if (fm_mkdirs(dir, 0700) != 0)
        return fm_errf(err, FM_EIO, "cannot create %s", dir);
    sqlite_store *s = fm_calloc(1, sizeof *s);
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    s->base.vt = &sqlite_vt;
    int rc = sqlite3_open_v2(path, &s->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    if (rc != SQLITE_OK) {
        rc = fm_errf(err, FM_EDB, "open %s: %s", path,
                     s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_busy_timeout(s->db, 5000);
    sqlite3_extended_result_codes(s->db, 1);
    if ((rc = exec(s, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                      " PRAGMA foreign_keys=ON;",
                   err)) != 0)
        goto fail;
    if ((rc = s_migrate(&s->base, err)) != 0)
        goto fail;
    if ((rc = prep(s, &s->ins_meas,
                   "INSERT INTO measurements(device_id, tenant, measurement_id, received_ms,"
                   " taken_ms, payload, result, model) VALUES(?,?,?,?,?,?,?,?)",
                   err)) ||
        (rc = prep(s, &s->ins_quar,
                   "INSERT INTO quarantine(device_id, tenant, received_ms, payload, error_code,"
                   " error_message) VALUES(?,?,?,?,?,?)",
                   err)) ||
        (rc = prep(s, &s->lookup,
                   "SELECT result FROM measurements WHERE device_id = ? AND measurement_id = ?",
                   err)) ||
        (rc = prep(s, &s->dev_get,
                   "SELECT id, tenant, status, cert_serial, created_ms FROM devices WHERE id = ?",
                   err)) ||
        (rc = prep(s, &s->begin, "BEGIN IMMEDIATE", err)) ||
        (rc = prep(s, &s->commit, "COMMIT", err)) ||
        (rc = prep(s, &s->rollback, "ROLLBACK", err)))
        goto fail;
    *out = &s->base;
    return 0;
fail:
    s_close(&s->base);
    return rc;
}
