/*
 * PostgreSQL backend: the model registry (see sqlite_models.c for the
 * contract): versions with their manifest and model file (bytea), the
 * approval decision, deployment aliases with their history, drift counts
 * added by every node, and training jobs handed to exactly one runner.
 */
#include "store/pg_int.h"
#include "fleetml/drift.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

static const char *nz(const char *s) { return s ? s : ""; }

#define VERSION_COLS                                                                            \
    "name, version, owner_tenant, status, format, sha256, size, created_by, created_ms,"        \
    " decided_by, decided_ms, note"

static void read_version(const PGresult *r, int i, fm_model_rec *v)
{
    memset(v, 0, sizeof *v);
    pg__copy(v->name, sizeof v->name, r, i, 0);
    pg__copy(v->version, sizeof v->version, r, i, 1);
    pg__copy(v->owner_tenant, sizeof v->owner_tenant, r, i, 2);
    v->status = (int)pg__int(r, i, 3);
    pg__copy(v->format, sizeof v->format, r, i, 4);
    pg__copy(v->sha256, sizeof v->sha256, r, i, 5);
    v->size = pg__int(r, i, 6);
    pg__copy(v->created_by, sizeof v->created_by, r, i, 7);
    v->created_ms = pg__int(r, i, 8);
    pg__copy(v->decided_by, sizeof v->decided_by, r, i, 9);
    v->decided_ms = pg__int(r, i, 10);
    pg__copy(v->note, sizeof v->note, r, i, 11);
}

static int m_version_add(fm_store *base, const fm_model_rec *v, const void *file, size_t len,
                         fm_errbuf *err)
{
    /* A bytea parameter's length is an int (and a bytea holds 1 GB at most). */
    if (len > INT_MAX)
        return fm_errf(err, FM_EDB, "model version: the model file is too large (%zu bytes)",
                       len);
    pg_args a = {0};
    pg__text(&a, v->name);
    pg__text(&a, v->version);
    pg__text(&a, v->owner_tenant);
    pg__text(&a, v->format);
    pg__text(&a, v->sha256);
    pg__i64(&a, (int64_t)len);
    pg__text(&a, v->created_by);
    pg__i64(&a, v->created_ms);
    pg__text(&a, nz(v->manifest_json));
    pg__bin(&a, file, len);
    int rc = pg__cmd((pg_store *)base,
                     "INSERT INTO model_versions(name, version, owner_tenant, status, format,"
                     " sha256, size, created_by, created_ms, manifest, file)"
                     " VALUES($1, $2, $3, 0, $4, $5, $6, $7, $8, $9, $10)",
                     &a, "model version", NULL, err);
    if (rc == FM_EEXIST)
        return fm_errf(err, FM_EEXIST, "model %s version %s already exists", v->name,
                       v->version);
    return rc;
}

static int m_version_get(fm_store *base, const char *name, const char *version,
                         fm_model_rec *out)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__text(&a, name);
    pg__text(&a, version);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " VERSION_COLS ", manifest FROM model_versions"
                          " WHERE name = $1 AND version = $2",
                          &a, "model version", &rc, NULL);
    if (!r)
        return rc;
    rc = 0;
    if (PQntuples(r) == 0) {
        rc = FM_ENOTFOUND;
    } else {
        read_version(r, 0, out);
        out->manifest_json = fm_strdup(pg__null(r, 0, 12) ? "{}" : pg__str(r, 0, 12));
        if (!out->manifest_json)
            rc = FM_ENOMEM;
    }
    PQclear(r);
    return rc;
}

static int m_version_file(fm_store *base, const char *name, const char *version, void **file,
                          size_t *len)
{
    *file = NULL;
    *len = 0;
    pg_args a = {0};
    pg__text(&a, name);
    pg__text(&a, version);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT file FROM model_versions WHERE name = $1 AND version = $2", &a,
                          "model file", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) == 0 ? FM_ENOTFOUND : pg__bytea(r, 0, 0, file, len);
    PQclear(r);
    return rc;
}

static int m_version_list(fm_store *base, const char *name, fm_model_rec_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, name);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " VERSION_COLS " FROM model_versions"
                          " WHERE $1::text IS NULL OR name = $1"
                          " ORDER BY created_ms DESC, seq DESC",
                          &a, "model versions", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_model_rec v;
        read_version(r, i, &v);
        if (cb(ud, &v) != 0)
            break;
    }
    PQclear(r);
    return 0;
}

static int decide(pg_store *s, const char *name, const char *version, int status,
                  const char *by, const char *note, int64_t at_ms, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_MODELS, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__i64(&a, status);
    pg__text(&a, nz(by));
    pg__i64(&a, at_ms);
    pg__text(&a, nz(note));
    pg__text(&a, name);
    pg__text(&a, version);
    long changed = 0;
    rc = pg__cmd(s,
                 "UPDATE model_versions SET status = $1, decided_by = $2, decided_ms = $3,"
                 " note = $4 WHERE name = $5 AND version = $6 AND status = 0",
                 &a, "model decision", &changed, err);
    if (rc || changed == 1)
        return rc;
    fm_model_rec v;
    int g = m_version_get(&s->base, name, version, &v);
    fm_model_rec_clear(&v);
    if (g == FM_ENOTFOUND)
        return fm_errf(err, FM_ENOTFOUND, "no model %s version %s", name, version);
    return fm_errf(err, g ? g : FM_ESTATE, "model %s version %s was already %s", name, version,
                   v.status == FM_MODEL_APPROVED ? "approved" : "rejected");
}

static int m_version_decide(fm_store *base, const char *name, const char *version, int status,
                            const char *by, const char *note, int64_t at_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    if (status != FM_MODEL_APPROVED && status != FM_MODEL_REJECTED)
        return fm_errf(err, FM_EINVAL, "a decision is approved or rejected");
    PG_TX(s, err, decide(s, name, version, status, by, note, at_ms, err));
}

static int alias_write(pg_store *s, const fm_model_alias *al, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_MODELS, err);
    if (rc)
        return rc;
    if (al->version[0]) {
        pg_args q = {0};
        pg__text(&q, al->name);
        pg__text(&q, al->version);
        PGresult *r = pg__run(s,
                              "SELECT status FROM model_versions WHERE name = $1 AND version = $2",
                              &q, "model alias", &rc, err);
        if (!r)
            return rc;
        int status = PQntuples(r) ? (int)pg__int(r, 0, 0) : -1;
        PQclear(r);
        if (status < 0)
            return fm_errf(err, FM_ENOTFOUND, "no model %s version %s", al->name, al->version);
        if (status != FM_MODEL_APPROVED)
            return fm_errf(err, FM_ESTATE, "model %s version %s is not approved", al->name,
                           al->version);
    }
    pg_args a = {0};
    pg__text(&a, al->tenant);
    pg__text(&a, al->name);
    pg__text(&a, al->alias);
    pg__text(&a, al->version);
    pg__i64(&a, al->share_pct);
    pg__text(&a, al->updated_by);
    pg__i64(&a, al->updated_ms);
    if (al->version[0])
        rc = pg__cmd(s,
                     "INSERT INTO model_aliases(tenant, name, alias, version, share_pct,"
                     " updated_by, updated_ms) VALUES($1, $2, $3, $4, $5, $6, $7)"
                     " ON CONFLICT (tenant, name, alias) DO UPDATE SET version = excluded.version,"
                     " share_pct = excluded.share_pct, updated_by = excluded.updated_by,"
                     " updated_ms = excluded.updated_ms",
                     &a, "model alias", NULL, err);
    else {
        pg_args d = {0};
        pg__text(&d, al->tenant);
        pg__text(&d, al->name);
        pg__text(&d, al->alias);
        rc = pg__cmd(s, "DELETE FROM model_aliases WHERE tenant = $1 AND name = $2 AND alias = $3",
                     &d, "model alias", NULL, err);
    }
    if (!rc)
        rc = pg__cmd(s,
                     "INSERT INTO model_alias_log(tenant, name, alias, version, share_pct,"
                     " updated_by, updated_ms) VALUES($1, $2, $3, $4, $5, $6, $7)",
                     &a, "model alias history", NULL, err);
    return rc;
}

static int m_alias_set(fm_store *base, const fm_model_alias *a, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, alias_write(s, a, err));
}

static int m_alias_list(fm_store *base, const char *tenant, fm_model_alias_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT tenant, name, alias, version, share_pct, updated_by, updated_ms"
                          " FROM model_aliases WHERE $1::text IS NULL OR tenant = $1"
                          " ORDER BY tenant COLLATE \"C\", name COLLATE \"C\", alias COLLATE \"C\"",
                          &a, "model aliases", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_model_alias al;
        memset(&al, 0, sizeof al);
        pg__copy(al.tenant, sizeof al.tenant, r, i, 0);
        pg__copy(al.name, sizeof al.name, r, i, 1);
        pg__copy(al.alias, sizeof al.alias, r, i, 2);
        pg__copy(al.version, sizeof al.version, r, i, 3);
        al.share_pct = (int)pg__int(r, i, 4);
        pg__copy(al.updated_by, sizeof al.updated_by, r, i, 5);
        al.updated_ms = pg__int(r, i, 6);
        if (cb(ud, &al) != 0)
            break;
    }
    PQclear(r);
    return 0;
}

static int m_alias_log(fm_store *base, int64_t after_seq, size_t limit,
                       int (*cb)(void *ud, int64_t seq, const fm_model_alias *a), void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after_seq);
    pg__i64(&a, (int64_t)(limit ? limit : 1));
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, tenant, name, alias, version, share_pct, updated_by,"
                          " updated_ms FROM model_alias_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                          &a, "model alias history", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_model_alias al;
        memset(&al, 0, sizeof al);
        pg__copy(al.tenant, sizeof al.tenant, r, i, 1);
        pg__copy(al.name, sizeof al.name, r, i, 2);
        pg__copy(al.alias, sizeof al.alias, r, i, 3);
        pg__copy(al.version, sizeof al.version, r, i, 4);
        al.share_pct = (int)pg__int(r, i, 5);
        pg__copy(al.updated_by, sizeof al.updated_by, r, i, 6);
        al.updated_ms = pg__int(r, i, 7);
        if (cb(ud, pg__int(r, i, 0), &al) != 0)
            break;
    }
    PQclear(r);
    return 0;
}

static int m_deploy_seq(fm_store *base, int64_t *out)
{
    *out = 0;
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT COALESCE(max(seq), 0) FROM model_alias_log",
                          NULL, "deploy seq", &rc, NULL);
    if (!r)
        return rc;
    *out = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

static int drift_merge(pg_store *s, const fm_drift_counts *c, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_MODELS, err);
    if (rc)
        return rc;
    fm_drift_counts sum = *c;
    pg_args a = {0};
    pg__text(&a, c->tenant);
    pg__i64(&a, c->day);
    pg__text(&a, c->model);
    PGresult *r = pg__run(s,
                          "SELECT n, counts FROM drift_counts WHERE tenant = $1 AND day = $2"
                          " AND model = $3",
                          &a, "drift", &rc, err);
    if (!r)
        return rc;
    if (PQntuples(r) > 0) {
        fm_drift_counts old;
        memset(&old, 0, sizeof old);
        store__drift_read(pg__str(r, 0, 1), &old);
        sum.n += (uint64_t)pg__int(r, 0, 0);
        for (size_t f = 0; f < FM_FEATURES_MAX; f++)
            for (int b = 0; b < FM_DRIFT_BINS; b++)
                sum.counts[f][b] += old.counts[f][b];
    }
    PQclear(r);
    char *text = store__drift_text(&sum);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    pg__i64(&a, (int64_t)sum.n);
    pg__text(&a, text);
    rc = pg__cmd(s,
                 "INSERT INTO drift_counts(tenant, day, model, n, counts) VALUES($1, $2, $3, $4, $5)"
                 " ON CONFLICT (tenant, day, model) DO UPDATE SET n = excluded.n,"
                 " counts = excluded.counts",
                 &a, "drift", NULL, err);
    fm_free(text);
    return rc;
}

static int m_drift_add(fm_store *base, const fm_drift_counts *c, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, drift_merge(s, c, err));
}

static int m_drift_get(fm_store *base, const char *tenant, int64_t day,
                       int (*cb)(void *ud, const fm_drift_counts *c), void *ud)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    pg__i64(&a, day);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT model, n, counts FROM drift_counts WHERE tenant = $1"
                          " AND day = $2 ORDER BY model COLLATE \"C\"",
                          &a, "drift", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_drift_counts c;
        memset(&c, 0, sizeof c);
        snprintf(c.tenant, sizeof c.tenant, "%s", tenant);
        pg__copy(c.model, sizeof c.model, r, i, 0);
        c.day = day;
        c.n = (uint64_t)pg__int(r, i, 1);
        store__drift_read(pg__str(r, i, 2), &c);
        if (cb(ud, &c) != 0)
            break;
    }
    PQclear(r);
    return 0;
}

/* ---- training jobs ---- */

#define JOB_COLS                                                                                \
    "id, tenant, node, status, phase, percent, version, from_ms, to_ms, requested_by, error,"   \
    " rows, created_ms, updated_ms"

static void read_job(const PGresult *r, int i, fm_train_job *j)
{
    memset(j, 0, sizeof *j);
    j->id = pg__int(r, i, 0);
    pg__copy(j->tenant, sizeof j->tenant, r, i, 1);
    pg__copy(j->node, sizeof j->node, r, i, 2);
    pg__copy(j->status, sizeof j->status, r, i, 3);
    pg__copy(j->phase, sizeof j->phase, r, i, 4);
    j->percent = (int)pg__int(r, i, 5);
    pg__copy(j->version, sizeof j->version, r, i, 6);
    j->from_ms = pg__int(r, i, 7);
    j->to_ms = pg__int(r, i, 8);
    pg__copy(j->requested_by, sizeof j->requested_by, r, i, 9);
    pg__copy(j->error, sizeof j->error, r, i, 10);
    j->rows = pg__int(r, i, 11);
    j->created_ms = pg__int(r, i, 12);
    j->updated_ms = pg__int(r, i, 13);
}

static int m_job_add(fm_store *base, fm_train_job *j, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, j->tenant);
    pg__text(&a, j->node);
    pg__text(&a, j->version);
    pg__i64(&a, j->from_ms);
    pg__i64(&a, j->to_ms);
    pg__text(&a, j->requested_by);
    pg__i64(&a, j->created_ms);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "INSERT INTO training_jobs(tenant, node, status, phase, percent, version,"
                          " from_ms, to_ms, requested_by, error, rows, created_ms, updated_ms)"
                          " VALUES($1, $2, 'queued', 'queued', 0, $3, $4, $5, $6, '', 0, $7, $7)"
                          " RETURNING id",
                          &a, "training job", &rc, err);
    if (!r)
        return rc;
    j->id = pg__int(r, 0, 0);
    PQclear(r);
    snprintf(j->status, sizeof j->status, "queued");
    return 0;
}

static int job_update_tx(pg_store *s, const fm_train_job *j, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, j->status);
    pg__text(&a, j->phase);
    pg__i64(&a, j->percent);
    pg__text(&a, j->error);
    pg__i64(&a, j->rows);
    pg__i64(&a, j->updated_ms);
    pg__i64(&a, j->id);
    int rc = pg__cmd(s,
                     "UPDATE training_jobs SET status = $1, phase = $2, percent = $3, error = $4,"
                     " rows = $5, updated_ms = $6 WHERE id = $7",
                     &a, "training job", NULL, err);
    fm_audit au;
    char details[512];
    if (!rc && store__job_final(j, &au, details, sizeof details))
        rc = pg__audit_tx(s, &au, details, err);
    return rc;
}

/* A job's final state and its audit entry (training.finished) commit
 * together. */
static int m_job_update(fm_store *base, const fm_train_job *j, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, job_update_tx(s, j, err));
}

static int m_job_get(fm_store *base, int64_t id, fm_train_job *out)
{
    pg_args a = {0};
    pg__i64(&a, id);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT " JOB_COLS " FROM training_jobs WHERE id = $1",
                          &a, "training job", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        read_job(r, 0, out);
    PQclear(r);
    return rc;
}

/* The oldest queued job of node becomes running, in one statement: two
 * runners can never take the same job (SKIP LOCKED). */
static int m_job_take(fm_store *base, const char *node, int64_t now_ms, fm_train_job *out)
{
    pg_args a = {0};
    pg__text(&a, node);
    pg__i64(&a, now_ms);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "UPDATE training_jobs SET status = 'running', phase = 'starting',"
                          " updated_ms = $2 WHERE id = (SELECT id FROM training_jobs"
                          " WHERE node = $1 AND status = 'queued' ORDER BY id LIMIT 1"
                          " FOR UPDATE SKIP LOCKED) RETURNING " JOB_COLS,
                          &a, "training job", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        read_job(r, 0, out);
    PQclear(r);
    return rc;
}

/* Each running job of the node, failed through job_update_tx, so each
 * writes its training.finished entry. */
static int fail_running(pg_store *s, const char *node, int64_t now_ms, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, node);
    int rc;
    PGresult *r = pg__run(s,
                          "SELECT " JOB_COLS " FROM training_jobs WHERE node = $1 AND"
                          " status = 'running' ORDER BY id FOR UPDATE",
                          &a, "training job", &rc, err);
    if (!r)
        return rc;
    rc = 0;
    for (int i = 0, n = PQntuples(r); i < n && !rc; i++) {
        fm_train_job j;
        read_job(r, i, &j);
        store__job_interrupted(&j, now_ms);
        rc = job_update_tx(s, &j, err);
    }
    PQclear(r);
    return rc;
}

static int m_job_fail_running(fm_store *base, const char *node, int64_t now_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, fail_running(s, node, now_ms, err));
}

const fm_store_models_vt pg__models_vt = {
    .version_add = m_version_add,
    .version_get = m_version_get,
    .version_file = m_version_file,
    .version_list = m_version_list,
    .version_decide = m_version_decide,
    .alias_set = m_alias_set,
    .alias_list = m_alias_list,
    .deploy_seq = m_deploy_seq,
    .alias_log = m_alias_log,
    .drift_add = m_drift_add,
    .drift_get = m_drift_get,
    .job_add = m_job_add,
    .job_update = m_job_update,
    .job_get = m_job_get,
    .job_take = m_job_take,
    .job_fail_running = m_job_fail_running,
};
