/*
 * SQLite backend: the model registry (fm_store_models_vt). Versions with
 * their manifest and model file, the approval decision, and deployment
 * aliases per tenant with their history (deploy_seq is the newest
 * history row, which every node polls to notice a deployment).
 */
#include "store/sqlite_int.h"
#include "fleetml/drift.h"

#include <jansson.h>

#include <stdio.h>
#include <string.h>

static const char *nz(const char *s) { return s ? s : ""; }

static const char VERSION_COLS[] =
    "name, version, owner_tenant, status, format, sha256, size, created_by, created_ms,"
    " decided_by, decided_ms, note";

static void read_version(sqlite3_stmt *st, fm_model_rec *v)
{
    memset(v, 0, sizeof *v);
    sql__copy_col(v->name, sizeof v->name, st, 0);
    sql__copy_col(v->version, sizeof v->version, st, 1);
    sql__copy_col(v->owner_tenant, sizeof v->owner_tenant, st, 2);
    v->status = sqlite3_column_int(st, 3);
    sql__copy_col(v->format, sizeof v->format, st, 4);
    sql__copy_col(v->sha256, sizeof v->sha256, st, 5);
    v->size = sqlite3_column_int64(st, 6);
    sql__copy_col(v->created_by, sizeof v->created_by, st, 7);
    v->created_ms = sqlite3_column_int64(st, 8);
    sql__copy_col(v->decided_by, sizeof v->decided_by, st, 9);
    v->decided_ms = sqlite3_column_int64(st, 10);
    sql__copy_col(v->note, sizeof v->note, st, 11);
}

static int version_add(fm_store *base, const fm_model_rec *v, const void *file, size_t len,
                       fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO model_versions(name, version, owner_tenant, status, format,"
                       " sha256, size, created_by, created_ms, manifest, file)"
                       " VALUES(?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, v->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, v->version, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, v->owner_tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, v->format, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, v->sha256, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)len);
    sqlite3_bind_text(st, 7, v->created_by, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 8, v->created_ms);
    sqlite3_bind_text(st, 9, nz(v->manifest_json), -1, SQLITE_STATIC);
    sqlite3_bind_blob64(st, 10, file, (sqlite3_uint64)len, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return fm_errf(err, FM_EEXIST, "model %s version %s already exists", v->name,
                       v->version);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "model version");
}

static int version_get(fm_store *base, const char *name, const char *version,
                       fm_model_rec *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT %s, manifest FROM model_versions WHERE name = ? AND version = ?",
             VERSION_COLS);
    memset(out, 0, sizeof *out);
    if (sql__prep(s, &st, sql, NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, version, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st), ret = 0;
    if (rc == SQLITE_ROW) {
        read_version(st, out);
        const char *m = (const char *)sqlite3_column_text(st, 12);
        out->manifest_json = fm_strdup(m ? m : "{}");
        if (!out->manifest_json)
            ret = FM_ENOMEM;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_finalize(st);
    return ret;
}

static int version_file(fm_store *base, const char *name, const char *version, void **file,
                        size_t *len)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    *file = NULL;
    *len = 0;
    if (sql__prep(s, &st, "SELECT file FROM model_versions WHERE name = ? AND version = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, version, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st), ret = 0;
    if (rc == SQLITE_ROW) {
        size_t n = (size_t)sqlite3_column_bytes(st, 0);
        const void *b = sqlite3_column_blob(st, 0);
        *file = fm_malloc(n + 1);
        if (!*file) {
            ret = FM_ENOMEM;
        } else {
            if (n)
                memcpy(*file, b, n);
            ((char *)*file)[n] = '\0';
            *len = n;
        }
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_finalize(st);
    return ret;
}

static int version_list(fm_store *base, const char *name, fm_model_rec_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT %s FROM model_versions WHERE ?1 IS NULL OR name = ?1"
             " ORDER BY created_ms DESC, rowid DESC",
             VERSION_COLS);
    if (sql__prep(s, &st, sql, NULL))
        return FM_EDB;
    if (name)
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_model_rec v;
        read_version(st, &v);
        if (cb(ud, &v) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int decide(sqlite_store *s, const char *name, const char *version, int status,
                  const char *by, const char *note, int64_t at_ms, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "UPDATE model_versions SET status = ?, decided_by = ?, decided_ms = ?,"
                       " note = ? WHERE name = ? AND version = ? AND status = 0",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int(st, 1, status);
    sqlite3_bind_text(st, 2, nz(by), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, at_ms);
    sqlite3_bind_text(st, 4, nz(note), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, version, -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "model decision");
    if (sqlite3_changes(s->db) == 1)
        return 0;
    fm_model_rec v;
    int g = version_get(&s->base, name, version, &v);
    fm_model_rec_clear(&v);
    if (g == FM_ENOTFOUND)
        return fm_errf(err, FM_ENOTFOUND, "no model %s version %s", name, version);
    return fm_errf(err, g ? g : FM_ESTATE, "model %s version %s was already %s", name, version,
                   v.status == FM_MODEL_APPROVED ? "approved" : "rejected");
}

static int version_decide(fm_store *base, const char *name, const char *version, int status,
                          const char *by, const char *note, int64_t at_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    if (status != FM_MODEL_APPROVED && status != FM_MODEL_REJECTED)
        return fm_errf(err, FM_EINVAL, "a decision is approved or rejected");
    IN_TX(s, err, decide(s, name, version, status, by, note, at_ms, err));
}

static int alias_write(sqlite_store *s, const fm_model_alias *a, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc;
    if (a->version[0]) {
        if (sql__prep(s, &st, "SELECT status FROM model_versions WHERE name = ? AND version = ?",
                      err))
            return FM_EDB;
        sqlite3_bind_text(st, 1, a->name, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, a->version, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
        int status = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : -1;
        sqlite3_finalize(st);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
            return sql__err(s, err, rc, "model alias");
        if (status < 0)
            return fm_errf(err, FM_ENOTFOUND, "no model %s version %s", a->name, a->version);
        if (status != FM_MODEL_APPROVED)
            return fm_errf(err, FM_ESTATE, "model %s version %s is not approved", a->name,
                           a->version);
        rc = sql__prep(s, &st,
                       "INSERT INTO model_aliases(tenant, name, alias, version, share_pct,"
                       " updated_by, updated_ms) VALUES(?, ?, ?, ?, ?, ?, ?)"
                       " ON CONFLICT(tenant, name, alias) DO UPDATE SET version = excluded.version,"
                       " share_pct = excluded.share_pct, updated_by = excluded.updated_by,"
                       " updated_ms = excluded.updated_ms",
                       err);
    } else {
        rc = sql__prep(s, &st,
                       "DELETE FROM model_aliases WHERE tenant = ? AND name = ? AND alias = ?",
                       err);
    }
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, a->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, a->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, a->alias, -1, SQLITE_STATIC);
    if (a->version[0]) {
        sqlite3_bind_text(st, 4, a->version, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 5, a->share_pct);
        sqlite3_bind_text(st, 6, a->updated_by, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, a->updated_ms);
    }
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "model alias");
    if (sql__prep(s, &st,
                  "INSERT INTO model_alias_log(tenant, name, alias, version, share_pct,"
                  " updated_by, updated_ms) VALUES(?, ?, ?, ?, ?, ?, ?)",
                  err))
        return FM_EDB;
    sqlite3_bind_text(st, 1, a->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, a->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, a->alias, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, a->version, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 5, a->share_pct);
    sqlite3_bind_text(st, 6, a->updated_by, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 7, a->updated_ms);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "model alias history");
}

static int alias_set(fm_store *base, const fm_model_alias *a, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, alias_write(s, a, err));
}

static int alias_list(fm_store *base, const char *tenant, fm_model_alias_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT tenant, name, alias, version, share_pct, updated_by, updated_ms"
                  " FROM model_aliases WHERE ?1 IS NULL OR tenant = ?1"
                  " ORDER BY tenant, name, alias",
                  NULL))
        return FM_EDB;
    if (tenant)
        sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_model_alias a;
        memset(&a, 0, sizeof a);
        sql__copy_col(a.tenant, sizeof a.tenant, st, 0);
        sql__copy_col(a.name, sizeof a.name, st, 1);
        sql__copy_col(a.alias, sizeof a.alias, st, 2);
        sql__copy_col(a.version, sizeof a.version, st, 3);
        a.share_pct = sqlite3_column_int(st, 4);
        sql__copy_col(a.updated_by, sizeof a.updated_by, st, 5);
        a.updated_ms = sqlite3_column_int64(st, 6);
        if (cb(ud, &a) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int alias_log(fm_store *base, int64_t after_seq, size_t limit,
                     int (*cb)(void *ud, int64_t seq, const fm_model_alias *a), void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT seq, tenant, name, alias, version, share_pct, updated_by, updated_ms"
                  " FROM model_alias_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after_seq);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)(limit ? limit : 1));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_model_alias a;
        memset(&a, 0, sizeof a);
        sql__copy_col(a.tenant, sizeof a.tenant, st, 1);
        sql__copy_col(a.name, sizeof a.name, st, 2);
        sql__copy_col(a.alias, sizeof a.alias, st, 3);
        sql__copy_col(a.version, sizeof a.version, st, 4);
        a.share_pct = sqlite3_column_int(st, 5);
        sql__copy_col(a.updated_by, sizeof a.updated_by, st, 6);
        a.updated_ms = sqlite3_column_int64(st, 7);
        if (cb(ud, sqlite3_column_int64(st, 0), &a) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int deploy_seq(fm_store *base, int64_t *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    *out = 0;
    if (sql__prep(s, &st, "SELECT COALESCE(MAX(seq), 0) FROM model_alias_log", NULL))
        return FM_EDB;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *out = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : sql__map_rc(rc);
}

static int drift_merge(sqlite_store *s, const fm_drift_counts *c, fm_errbuf *err)
{
    sqlite3_stmt *st;
    fm_drift_counts sum = *c;
    if (sql__prep(s, &st, "SELECT n, counts FROM drift_counts WHERE tenant = ? AND day = ? AND"
                          " model = ?", err))
        return FM_EDB;
    sqlite3_bind_text(st, 1, c->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, c->day);
    sqlite3_bind_text(st, 3, c->model, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        fm_drift_counts old;
        memset(&old, 0, sizeof old);
        store__drift_read((const char *)sqlite3_column_text(st, 1), &old);
        sum.n += (uint64_t)sqlite3_column_int64(st, 0);
        for (size_t f = 0; f < FM_FEATURES_MAX; f++)
            for (int b = 0; b < FM_DRIFT_BINS; b++)
                sum.counts[f][b] += old.counts[f][b];
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return sql__err(s, err, rc, "drift");
    char *text = store__drift_text(&sum);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    rc = sql__prep(s, &st, "INSERT OR REPLACE INTO drift_counts(tenant, day, model, n, counts)"
                           " VALUES(?, ?, ?, ?, ?)", err);
    if (!rc) {
        sqlite3_bind_text(st, 1, c->tenant, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, c->day);
        sqlite3_bind_text(st, 3, c->model, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)sum.n);
        sqlite3_bind_text(st, 5, text, -1, SQLITE_STATIC);
        rc = sql__step_done(st);
        sqlite3_finalize(st);
        rc = rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "drift");
    }
    fm_free(text);
    return rc;
}

static int drift_add(fm_store *base, const fm_drift_counts *c, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, drift_merge(s, c, err));
}

static int drift_get(fm_store *base, const char *tenant, int64_t day,
                     int (*cb)(void *ud, const fm_drift_counts *c), void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT model, n, counts FROM drift_counts WHERE tenant = ? AND day = ?"
                          " ORDER BY model", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, day);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_drift_counts c;
        memset(&c, 0, sizeof c);
        snprintf(c.tenant, sizeof c.tenant, "%s", tenant);
        sql__copy_col(c.model, sizeof c.model, st, 0);
        c.day = day;
        c.n = (uint64_t)sqlite3_column_int64(st, 1);
        store__drift_read((const char *)sqlite3_column_text(st, 2), &c);
        if (cb(ud, &c) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

/* ---- training jobs ---- */

#define JOB_COLS                                                                                   \
    "id, tenant, node, status, phase, percent, version, from_ms, to_ms, requested_by, error,"   \
    " rows, created_ms, updated_ms"

static void read_job(sqlite3_stmt *st, fm_train_job *j)
{
    memset(j, 0, sizeof *j);
    j->id = sqlite3_column_int64(st, 0);
    sql__copy_col(j->tenant, sizeof j->tenant, st, 1);
    sql__copy_col(j->node, sizeof j->node, st, 2);
    sql__copy_col(j->status, sizeof j->status, st, 3);
    sql__copy_col(j->phase, sizeof j->phase, st, 4);
    j->percent = sqlite3_column_int(st, 5);
    sql__copy_col(j->version, sizeof j->version, st, 6);
    j->from_ms = sqlite3_column_int64(st, 7);
    j->to_ms = sqlite3_column_int64(st, 8);
    sql__copy_col(j->requested_by, sizeof j->requested_by, st, 9);
    sql__copy_col(j->error, sizeof j->error, st, 10);
    j->rows = sqlite3_column_int64(st, 11);
    j->created_ms = sqlite3_column_int64(st, 12);
    j->updated_ms = sqlite3_column_int64(st, 13);
}

static int job_add(fm_store *base, fm_train_job *j, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO training_jobs(tenant, node, status, phase, percent, version,"
                       " from_ms, to_ms, requested_by, error, rows, created_ms, updated_ms)"
                       " VALUES(?, ?, 'queued', 'queued', 0, ?, ?, ?, ?, '', 0, ?, ?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, j->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, j->node, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, j->version, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, j->from_ms);
    sqlite3_bind_int64(st, 5, j->to_ms);
    sqlite3_bind_text(st, 6, j->requested_by, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 7, j->created_ms);
    sqlite3_bind_int64(st, 8, j->created_ms);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "training job");
    j->id = sqlite3_last_insert_rowid(s->db);
    snprintf(j->status, sizeof j->status, "queued");
    return 0;
}

static int job_update_tx(sqlite_store *s, const fm_train_job *j, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "UPDATE training_jobs SET status = ?, phase = ?, percent = ?, error = ?,"
                       " rows = ?, updated_ms = ? WHERE id = ?",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, j->status, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, j->phase, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, j->percent);
    sqlite3_bind_text(st, 4, j->error, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, j->rows);
    sqlite3_bind_int64(st, 6, j->updated_ms);
    sqlite3_bind_int64(st, 7, j->id);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "training job");
    fm_audit au;
    char details[512];
    if (store__job_final(j, &au, details, sizeof details))
        return sql__audit_append(&s->base, &au, err);
    return 0;
}

/* A job's final state and its audit entry (training.finished) commit
 * together. */
static int job_update(fm_store *base, const fm_train_job *j, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, job_update_tx(s, j, err));
}

static int job_get(fm_store *base, int64_t id, fm_train_job *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " JOB_COLS " FROM training_jobs WHERE id = ?", NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, id);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        read_job(st, out);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
}

static int take(sqlite_store *s, const char *node, int64_t now_ms, fm_train_job *out)
{
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " JOB_COLS " FROM training_jobs WHERE node = ? AND"
                          " status = 'queued' ORDER BY id LIMIT 1", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        read_job(st, out);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    snprintf(out->status, sizeof out->status, "running");
    snprintf(out->phase, sizeof out->phase, "starting");
    out->updated_ms = now_ms;
    return job_update_tx(s, out, NULL); /* already in take's transaction */
}

static int job_take(fm_store *base, const char *node, int64_t now_ms, fm_train_job *out)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, NULL, take(s, node, now_ms, out));
}

/* Each running job of the node, failed one at a time through
 * job_update_tx, so each writes its training.finished entry. */
static int fail_running(sqlite_store *s, const char *node, int64_t now_ms, fm_errbuf *err)
{
    for (;;) {
        sqlite3_stmt *st;
        if (sql__prep(s, &st, "SELECT " JOB_COLS " FROM training_jobs WHERE node = ? AND"
                              " status = 'running' ORDER BY id LIMIT 1", err))
            return FM_EDB;
        sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
        fm_train_job j;
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
            read_job(st, &j);
        sqlite3_finalize(st);
        if (rc == SQLITE_DONE)
            return 0;
        if (rc != SQLITE_ROW)
            return sql__err(s, err, rc, "training job");
        store__job_interrupted(&j, now_ms);
        if ((rc = job_update_tx(s, &j, err)) != 0)
            return rc;
    }
}

static int job_fail_running(fm_store *base, const char *node, int64_t now_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, fail_running(s, node, now_ms, err));
}

const fm_store_models_vt sql__models_vt = {
    .version_add = version_add,
    .version_get = version_get,
    .version_file = version_file,
    .version_list = version_list,
    .version_decide = version_decide,
    .alias_set = alias_set,
    .alias_list = alias_list,
    .deploy_seq = deploy_seq,
    .alias_log = alias_log,
    .drift_add = drift_add,
    .drift_get = drift_get,
    .job_add = job_add,
    .job_update = job_update,
    .job_get = job_get,
    .job_take = job_take,
    .job_fail_running = job_fail_running,
};
