/*
 * SQLite backend: the registry (templates, certificates, provisioning,
 * shadows, registry events). Every change the broker must hear about
 * appends a registry event in the same transaction, so a node following
 * the event log can never miss a change that was committed.
 */
#include "store/sqlite_int.h"

#include <stdio.h>
#include <string.h>

/* Runs a one-off statement with text binds (NULL-terminated list of
 * values) to completion. Returns 0 or an FM_E* code; *changes gets the row
 * count when non-NULL. */
static int run(sqlite_store *s, fm_errbuf *err, int *changes, const char *sql, ...)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, sql, err);
    if (rc)
        return rc;
    va_list ap;
    va_start(ap, sql);
    const char *v;
    for (int i = 1; (v = va_arg(ap, const char *)) != NULL; i++)
        sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
    va_end(ap);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (changes)
        *changes = sqlite3_changes(s->db);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "registry");
}

static void read_template(sqlite3_stmt *st, fm_template *t)
{
    memset(t, 0, sizeof *t);
    sql__copy_col(t->name, sizeof t->name, st, 0);
    sql__copy_col(t->tenant, sizeof t->tenant, st, 1);
    sql__copy_col(t->device_group, sizeof t->device_group, st, 2);
    sql__copy_col(t->device_prefix, sizeof t->device_prefix, st, 3);
    t->cert_days = sqlite3_column_int(st, 4);
    t->allow_reprovision = sqlite3_column_int(st, 5);
    t->rate_per_min = sqlite3_column_int(st, 6);
    t->status = sqlite3_column_int(st, 7);
    t->has_allowlist = sqlite3_column_int(st, 8);
    sql__copy_col(t->hook, sizeof t->hook, st, 9);
    t->created_ms = sqlite3_column_int64(st, 10);
}

#define TEMPLATE_COLS                                                                              \
    "name, tenant, device_group, device_prefix, cert_days, allow_reprovision, rate_per_min,"     \
    " status, has_allowlist, hook, created_ms"

static int template_insert(sqlite_store *s, const fm_template *t, const char *const *serials,
                           size_t n, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__require_tenant(s, t->tenant, err);
    if (rc)
        return rc;
    rc = sql__prep(s, &st, "INSERT INTO templates(" TEMPLATE_COLS ") VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                   err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, t->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, t->device_group, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, t->device_prefix, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 5, t->cert_days);
    sqlite3_bind_int(st, 6, t->allow_reprovision);
    sqlite3_bind_int(st, 7, t->rate_per_min);
    sqlite3_bind_int(st, 8, t->status);
    sqlite3_bind_int(st, 9, n > 0);
    sqlite3_bind_text(st, 10, t->hook, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 11, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return fm_errf(err, FM_EEXIST, "template '%s' already exists", t->name);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "template");
    for (size_t i = 0; i < n && !rc; i++)
        rc = run(s, err, NULL, "INSERT OR IGNORE INTO template_serials(template, serial) VALUES(?,?)",
                 t->name, serials[i], NULL);
    return rc ? rc : sql__event(s, FM_EVENT_TEMPLATE, t->name, err);
}

int sql__template_add(fm_store *base, const fm_template *t, const char *const *serials,
                      size_t n, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, template_insert(s, t, serials, n, err));
}

int sql__template_get(fm_store *base, const char *name, fm_template *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " TEMPLATE_COLS " FROM templates WHERE name = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        read_template(st, out);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
}

static int template_status(sqlite_store *s, const char *name, int status, fm_errbuf *err)
{
    char v[16];
    snprintf(v, sizeof v, "%d", status);
    int changed = 0;
    int rc = run(s, err, &changed, "UPDATE templates SET status = CAST(? AS INTEGER) WHERE name = ?",
                 v, name, NULL);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "template '%s' does not exist", name);
    return sql__event(s, FM_EVENT_TEMPLATE, name, err);
}

int sql__template_set_status(fm_store *base, const char *name, int status, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, template_status(s, name, status, err));
}

int sql__template_list(fm_store *base, fm_template_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " TEMPLATE_COLS " FROM templates ORDER BY name", NULL))
        return FM_EDB;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_template t;
        read_template(st, &t);
        if (cb(ud, &t)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__template_serial_allowed(fm_store *base, const char *name, const char *serial)
{
    sqlite_store *s = (sqlite_store *)base;
    fm_template t;
    int rc = sql__template_get(base, name, &t);
    if (rc)
        return rc;
    if (!t.has_allowlist)
        return 1;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT 1 FROM template_serials WHERE template = ? AND serial = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, serial, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

static int claim_insert(sqlite_store *s, const char *tmpl, const char *serial, fm_errbuf *err)
{
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)fm_wall_ms());
    int rc = run(s, err, NULL,
                 "INSERT INTO claim_certs(serial, template, status, created_ms)"
                 " VALUES(?, ?, 0, CAST(? AS INTEGER))",
                 serial, tmpl, now, NULL);
    return rc ? rc : sql__event(s, FM_EVENT_TEMPLATE, tmpl, err);
}

int sql__claim_cert_add(fm_store *base, const char *tmpl, const char *serial, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    fm_template t;
    if (sql__template_get(base, tmpl, &t) != 0)
        return fm_errf(err, FM_ENOTFOUND, "template '%s' does not exist", tmpl);
    IN_TX(s, err, claim_insert(s, tmpl, serial, err));
}

/* Calls cb(serial, status, when) for each row of a (serial, status, when)
 * query bound to one text parameter (or none when p1 is NULL). */
static int serial_query(sqlite_store *s, const char *sql, const char *p1, fm_serial_cb cb,
                        void *ud)
{
    sqlite3_stmt *st;
    if (sql__prep(s, &st, sql, NULL))
        return FM_EDB;
    if (p1)
        sqlite3_bind_text(st, 1, p1, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *serial = (const char *)sqlite3_column_text(st, 0);
        if (cb(ud, serial ? serial : "", sqlite3_column_int(st, 1), sqlite3_column_int64(st, 2))) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__claim_certs(fm_store *base, const char *tmpl, fm_serial_cb cb, void *ud)
{
    return serial_query((sqlite_store *)base,
                        "SELECT serial, status, created_ms FROM claim_certs"
                        " WHERE template = ? AND status = 0 ORDER BY serial",
                        tmpl, cb, ud);
}

int sql__cert_add(fm_store *base, const char *device_id, const char *serial, const char *pem,
                  int64_t not_after_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, sql__insert_cert(s, device_id, serial, pem, "", not_after_ms, err));
}

int sql__device_certs(fm_store *base, const char *device_id, fm_serial_cb cb, void *ud)
{
    return serial_query((sqlite_store *)base,
                        "SELECT serial, status, grace_until_ms FROM certs"
                        " WHERE device_id = ? AND status IN (0, 1) ORDER BY serial",
                        device_id, cb, ud);
}

static int revoke_device(sqlite_store *s, const char *id, fm_errbuf *err)
{
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)fm_wall_ms());
    int changed = 0;
    int rc = run(s, err, &changed, "UPDATE devices SET status = 2 WHERE id = ?", id, NULL);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", id);
    rc = run(s, err, NULL,
             "UPDATE certs SET status = 2, revoked_ms = CAST(? AS INTEGER)"
             " WHERE device_id = ? AND status != 2",
             now, id, NULL);
    return rc ? rc : sql__event(s, FM_EVENT_DEVICE, id, err);
}

int sql__device_revoke(fm_store *base, const char *id, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, revoke_device(s, id, err));
}

int sql__device_list(fm_store *base, fm_device_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT id, tenant, status, cert_serial, created_ms, device_group, serial_number"
                  " FROM devices ORDER BY id",
                  NULL))
        return FM_EDB;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_device d;
        sql__read_device(st, &d);
        if (cb(ud, &d)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__revoked_certs(fm_store *base, fm_serial_cb cb, void *ud)
{
    return serial_query((sqlite_store *)base,
                        "SELECT serial, status, revoked_ms FROM certs WHERE status = 2"
                        " ORDER BY serial",
                        NULL, cb, ud);
}

static int expire(sqlite_store *s, int64_t now, long *expired, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "SELECT DISTINCT device_id FROM certs WHERE status = 1 AND grace_until_ms <= ?",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, now);
    long n = 0;
    int src;
    while ((src = sqlite3_step(st)) == SQLITE_ROW && !rc) {
        const char *dev = (const char *)sqlite3_column_text(st, 0);
        rc = sql__event(s, FM_EVENT_DEVICE, dev ? dev : "", err);
        n++;
    }
    sqlite3_finalize(st);
    if (rc)
        return rc;
    if (src != SQLITE_DONE && src != SQLITE_ROW)
        return sql__err(s, err, src, "grace scan");
    char v[24];
    snprintf(v, sizeof v, "%lld", (long long)now);
    rc = run(s, err, NULL,
             "UPDATE certs SET status = 2, revoked_ms = CAST(?1 AS INTEGER)"
             " WHERE status = 1 AND grace_until_ms <= CAST(?1 AS INTEGER)",
             v, NULL);
    if (!rc && expired)
        *expired = n;
    return rc;
}

int sql__expire_grace(fm_store *base, int64_t now_ms, long *expired, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    if (expired)
        *expired = 0;
    /* Most calls find nothing; check before taking the write lock. */
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT 1 FROM certs WHERE status = 1 AND grace_until_ms <= ? LIMIT 1",
                  err))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, now_ms);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_DONE)
        return 0;
    if (rc != SQLITE_ROW)
        return sql__err(s, err, rc, "grace scan");
    IN_TX(s, err, expire(s, now_ms, expired, err));
}

int sql__provision_lookup(fm_store *base, const char *serial_number, char *device_id,
                          size_t id_len, char **cert_pem)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    *cert_pem = NULL;
    if (sql__prep(s, &st, "SELECT device_id FROM provisioned WHERE serial_number = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, serial_number, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        sql__copy_col(device_id, id_len, st, 0);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    if (sql__prep(s, &st,
                  "SELECT pem FROM certs WHERE device_id = ? AND status = 0"
                  " ORDER BY created_ms DESC LIMIT 1",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const char *pem = (const char *)sqlite3_column_text(st, 0);
        if (pem && *pem && !(*cert_pem = fm_strdup(pem)))
            rc = SQLITE_NOMEM;
    }
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : sql__map_rc(rc);
}

static int provision(sqlite_store *s, const fm_provision *p, fm_errbuf *err)
{
    fm_device d;
    int rc = s->base.registry->device_get(&s->base, p->device_id, &d);
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)fm_wall_ms());
    if (rc == 0) {
        if (strcmp(d.serial_number, p->serial_number) != 0)
            return fm_errf(err, FM_EEXIST, "device id '%s' belongs to another device",
                           p->device_id);
        if (d.status == FM_DEVICE_REVOKED)
            return fm_errf(err, FM_EPERM, "device '%s' is revoked", p->device_id);
        if (p->reprovision &&
            (rc = run(s, err, NULL,
                      "UPDATE certs SET status = 2, revoked_ms = CAST(? AS INTEGER)"
                      " WHERE device_id = ? AND status != 2",
                      now, p->device_id, NULL)) != 0)
            return rc;
        rc = run(s, err, NULL, "UPDATE devices SET model = ?, firmware = ? WHERE id = ?",
                 p->model, p->firmware, p->device_id, NULL);
    } else if (rc == FM_ENOTFOUND) {
        fm_device nd = {.status = FM_DEVICE_ACTIVE};
        snprintf(nd.id, sizeof nd.id, "%s", p->device_id);
        snprintf(nd.tenant, sizeof nd.tenant, "%s", p->tenant);
        snprintf(nd.device_group, sizeof nd.device_group, "%s", p->device_group);
        snprintf(nd.serial_number, sizeof nd.serial_number, "%s", p->serial_number);
        snprintf(nd.model, sizeof nd.model, "%s", p->model);
        snprintf(nd.firmware, sizeof nd.firmware, "%s", p->firmware);
        rc = sql__insert_device(s, &nd, err);
    } else {
        return fm_errf(err, rc, "device lookup failed");
    }
    if (!rc)
        rc = sql__insert_cert(s, p->device_id, p->cert_serial, p->cert_pem, p->key_id,
                              p->not_after_ms, err);
    if (!rc)
        rc = run(s, err, NULL,
                 "INSERT OR REPLACE INTO provisioned(serial_number, template, device_id, at_ms)"
                 " VALUES(?, ?, ?, CAST(? AS INTEGER))",
                 p->serial_number, p->template_name, p->device_id, now, NULL);
    if (!rc)
        rc = sql__event(s, FM_EVENT_PROVISIONED, p->device_id, err);
    return rc;
}

int sql__provision_commit(fm_store *base, const fm_provision *p, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, provision(s, p, err));
}

static int rotate(sqlite_store *s, const char *dev, const char *serial, const char *pem,
                  const char *key_id, int64_t not_after, const char *old, int64_t grace_until,
                  fm_errbuf *err)
{
    int rc = sql__insert_cert(s, dev, serial, pem, key_id, not_after, err);
    if (rc || !old || !*old)
        return rc;
    char g[24];
    snprintf(g, sizeof g, "%lld", (long long)grace_until);
    return run(s, err, NULL,
               "UPDATE certs SET status = 1, grace_until_ms = CAST(? AS INTEGER)"
               " WHERE serial = ? AND device_id = ? AND status = 0",
               g, old, dev, NULL);
}

int sql__rotate_commit(fm_store *base, const char *dev, const char *serial, const char *pem,
                       const char *key_id, int64_t not_after, const char *old,
                       int64_t grace_until, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, rotate(s, dev, serial, pem, key_id, not_after, old, grace_until, err));
}

int sql__key_owner(fm_store *base, const char *key_id, char *device_id, size_t id_len)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (!key_id || !*key_id)
        return FM_ENOTFOUND;
    if (sql__prep(s, &st,
                  "SELECT device_id FROM certs WHERE key_id = ? AND status != 2"
                  " ORDER BY created_ms DESC LIMIT 1",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, key_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        sql__copy_col(device_id, id_len, st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
}

int sql__shadow_get(fm_store *base, const char *device_id, fm_shadow *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (sql__prep(s, &st,
                  "SELECT desired, reported, version, updated_ms FROM shadows WHERE device_id = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    const char *des = "{}", *rep = "{}";
    if (rc == SQLITE_ROW) {
        des = (const char *)sqlite3_column_text(st, 0);
        rep = (const char *)sqlite3_column_text(st, 1);
        out->version = sqlite3_column_int64(st, 2);
        out->updated_ms = sqlite3_column_int64(st, 3);
    }
    int ret = (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : sql__map_rc(rc);
    if (!ret) {
        out->desired = fm_strdup(des ? des : "{}");
        out->reported = fm_strdup(rep ? rep : "{}");
        if (!out->desired || !out->reported) {
            fm_shadow_clear(out);
            ret = FM_ENOMEM;
        }
    }
    sqlite3_finalize(st);
    return ret;
}

static int shadow_write(sqlite_store *s, const char *dev, const char *desired,
                        const char *reported, int64_t expected, int64_t *new_version,
                        int notify, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "SELECT version FROM shadows WHERE device_id = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, dev, -1, SQLITE_STATIC);
    int64_t cur = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    if (expected >= 0 && expected != cur)
        return fm_errf(err, FM_EBUSY, "shadow version is %lld, expected %lld", (long long)cur,
                       (long long)expected);
    rc = sql__prep(s, &st,
                   "INSERT OR REPLACE INTO shadows(device_id, desired, reported, version, updated_ms)"
                   " VALUES(?, ?, ?, ?, ?)",
                   err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, dev, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, desired, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, reported, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, cur + 1);
    sqlite3_bind_int64(st, 5, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", dev);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "shadow");
    if (new_version)
        *new_version = cur + 1;
    return notify ? sql__event(s, FM_EVENT_SHADOW, dev, err) : 0;
}

int sql__shadow_put(fm_store *base, const char *dev, const char *desired, const char *reported,
                    int64_t expected, int64_t *new_version, int notify, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, shadow_write(s, dev, desired, reported, expected, new_version, notify, err));
}

int sql__events_after(fm_store *base, int64_t after, size_t limit, fm_event_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT seq, kind, subject FROM registry_events WHERE seq > ? ORDER BY seq LIMIT ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, after);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)limit);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *subj = (const char *)sqlite3_column_text(st, 2);
        if (cb(ud, sqlite3_column_int64(st, 0), sqlite3_column_int(st, 1), subj ? subj : "")) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

int sql__events_max(fm_store *base, int64_t *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT seq FROM sqlite_sequence WHERE name = 'registry_events'", NULL))
        return FM_EDB;
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    return (rc == SQLITE_ROW || rc == SQLITE_DONE) ? 0 : sql__map_rc(rc);
}

static int s_device_add(fm_store *base, const fm_device *d, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    int rc = sql__begin(s, err);
    if (rc)
        return rc;
    rc = sql__insert_device(s, d, err);
    if (!rc)
        rc = sql__event(s, FM_EVENT_DEVICE, d->id, err);
    if (!rc)
        return sql__commit(s, err);
    sql__rollback(s);
    return rc;
}

static int s_device_get(fm_store *base, const char *id, fm_device *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st = s->dev_get;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        sql__read_device(st, out);
        ret = 0;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

static int s_device_set_status(fm_store *base, const char *id, int status, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    fm_device d;
    int rc = s_device_get(base, id, &d);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", id);
    if (rc)
        return fm_errf(err, rc, "device '%s': %s", id, fm_strerror(rc));
    /* Revocation is final: a revoked device's certificates are gone and
     * it must be provisioned again under a new identity. */
    if (d.status == FM_DEVICE_REVOKED)
        return fm_errf(err, FM_EPERM, "device '%s' is revoked; revocation cannot be undone", id);
    sqlite3_stmt *st;
    if ((rc = sql__begin(s, err)) != 0)
        return rc;
    rc = sql__prep(s, &st, "UPDATE devices SET status = ? WHERE id = ?", err);
    if (!rc) {
        sqlite3_bind_int(st, 1, status);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        int src = sql__step_done(st);
        sqlite3_finalize(st);
        rc = src == SQLITE_OK ? 0 : sql__err(s, err, src, "device status");
    }
    if (!rc)
        rc = sql__event(s, FM_EVENT_DEVICE, id, err);
    if (!rc)
        return sql__commit(s, err);
    sql__rollback(s);
    return rc;
}

const fm_store_registry_vt sql__registry_vt = {
    .device_add = s_device_add,
    .device_get = s_device_get,
    .device_set_status = s_device_set_status,
    .template_add = sql__template_add,
    .template_get = sql__template_get,
    .template_set_status = sql__template_set_status,
    .template_list = sql__template_list,
    .template_serial_allowed = sql__template_serial_allowed,
    .claim_cert_add = sql__claim_cert_add,
    .claim_certs = sql__claim_certs,
    .cert_add = sql__cert_add,
    .device_certs = sql__device_certs,
    .device_revoke = sql__device_revoke,
    .device_list = sql__device_list,
    .revoked_certs = sql__revoked_certs,
    .expire_grace = sql__expire_grace,
    .provision_lookup = sql__provision_lookup,
    .provision_commit = sql__provision_commit,
    .rotate_commit = sql__rotate_commit,
    .key_owner = sql__key_owner,
    .shadow_get = sql__shadow_get,
    .shadow_put = sql__shadow_put,
    .events_after = sql__events_after,
    .events_max = sql__events_max,
};
