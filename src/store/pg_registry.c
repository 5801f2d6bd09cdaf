/*
 * PostgreSQL backend: the registry (see sqlite_registry.c for the
 * contract): devices, templates, certificates, provisioning, shadows and
 * the registry event log. Every write takes the registry lock first
 * (pg_int.h), which both keeps read-decide-write changes atomic across
 * nodes and makes event sequence numbers visible in commit order, so a
 * node following the log never skips an event committed late.
 */
#include "store/pg_int.h"

#include <stdio.h>
#include <string.h>

static int require_tenant(pg_store *s, const char *tenant, fm_errbuf *err)
{
    int rc = pg__tenant_exists(&s->base, tenant);
    if (rc == 1)
        return 0;
    if (rc == 0)
        return fm_errf(err, FM_ENOTFOUND, "tenant '%s' does not exist", tenant);
    return fm_errf(err, rc, "tenant lookup failed");
}

static int insert_cert(pg_store *s, const char *device_id, const char *serial, const char *pem,
                       const char *key_id, int64_t not_after_ms, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, serial);
    pg__text(&a, device_id);
    pg__text(&a, pem);
    pg__i64(&a, not_after_ms);
    pg__i64(&a, fm_wall_ms());
    pg__text(&a, key_id ? key_id : "");
    int rc = pg__cmd(s,
                     "INSERT INTO certs(serial, device_id, status, pem, not_after_ms, created_ms,"
                     " key_id) VALUES($1, $2, 0, $3, $4, $5, $6)",
                     &a, "certificate", NULL, err);
    return rc ? rc : pg__event(s, FM_EVENT_DEVICE, device_id, err);
}

static int insert_device(pg_store *s, const fm_device *d, fm_errbuf *err)
{
    int rc = require_tenant(s, d->tenant, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, d->id);
    pg__text(&a, d->tenant);
    pg__i64(&a, d->status);
    pg__text(&a, d->cert_serial);
    pg__i64(&a, d->created_ms ? d->created_ms : fm_wall_ms());
    pg__text(&a, d->device_group);
    pg__text(&a, d->serial_number);
    pg__text(&a, d->model);
    pg__text(&a, d->firmware);
    rc = pg__cmd(s,
                 "INSERT INTO devices(" PG_DEVICE_COLS ") VALUES($1, $2, $3, $4, $5, $6, $7, $8,"
                 " $9)",
                 &a, "device", NULL, err);
    if (rc == FM_EEXIST)
        return fm_errf(err, FM_EEXIST, "device '%s' already exists", d->id);
    if (!rc && d->cert_serial[0])
        rc = insert_cert(s, d->id, d->cert_serial, "", "", d->cert_not_after_ms, err);
    return rc;
}

/* ---- templates -------------------------------------------------------------- */

#define TEMPLATE_COLS                                                                           \
    "name, tenant, device_group, device_prefix, cert_days, allow_reprovision, rate_per_min,"   \
    " status, has_allowlist, hook, created_ms"

static void read_template(const PGresult *r, int i, fm_template *t)
{
    memset(t, 0, sizeof *t);
    pg__copy(t->name, sizeof t->name, r, i, 0);
    pg__copy(t->tenant, sizeof t->tenant, r, i, 1);
    pg__copy(t->device_group, sizeof t->device_group, r, i, 2);
    pg__copy(t->device_prefix, sizeof t->device_prefix, r, i, 3);
    t->cert_days = (int)pg__int(r, i, 4);
    t->allow_reprovision = (int)pg__int(r, i, 5);
    t->rate_per_min = (int)pg__int(r, i, 6);
    t->status = (int)pg__int(r, i, 7);
    t->has_allowlist = (int)pg__int(r, i, 8);
    pg__copy(t->hook, sizeof t->hook, r, i, 9);
    t->created_ms = pg__int(r, i, 10);
}

static int template_insert(pg_store *s, const fm_template *t, const char *const *serials,
                           size_t n, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (!rc)
        rc = require_tenant(s, t->tenant, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, t->name);
    pg__text(&a, t->tenant);
    pg__text(&a, t->device_group);
    pg__text(&a, t->device_prefix);
    pg__i64(&a, t->cert_days);
    pg__i64(&a, t->allow_reprovision);
    pg__i64(&a, t->rate_per_min);
    pg__i64(&a, t->status);
    pg__i64(&a, n > 0);
    pg__text(&a, t->hook);
    pg__i64(&a, fm_wall_ms());
    rc = pg__cmd(s,
                 "INSERT INTO templates(" TEMPLATE_COLS ") VALUES($1, $2, $3, $4, $5, $6, $7, $8,"
                 " $9, $10, $11)",
                 &a, "template", NULL, err);
    if (rc == FM_EEXIST)
        return fm_errf(err, FM_EEXIST, "template '%s' already exists", t->name);
    for (size_t i = 0; i < n && !rc; i++) {
        pg_args b = {0};
        pg__text(&b, t->name);
        pg__text(&b, serials[i]);
        rc = pg__cmd(s,
                     "INSERT INTO template_serials(template, serial) VALUES($1, $2)"
                     " ON CONFLICT DO NOTHING",
                     &b, "template", NULL, err);
    }
    return rc ? rc : pg__event(s, FM_EVENT_TEMPLATE, t->name, err);
}

static int r_template_add(fm_store *base, const fm_template *t, const char *const *serials,
                          size_t n, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, template_insert(s, t, serials, n, err));
}

static int r_template_get(fm_store *base, const char *name, fm_template *out)
{
    pg_args a = {0};
    pg__text(&a, name);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT " TEMPLATE_COLS " FROM templates WHERE name = $1",
                          &a, "template", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        read_template(r, 0, out);
    PQclear(r);
    return rc;
}

static int template_status(pg_store *s, const char *name, int status, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__i64(&a, status);
    pg__text(&a, name);
    long changed = 0;
    rc = pg__cmd(s, "UPDATE templates SET status = $1 WHERE name = $2", &a, "template", &changed,
                 err);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "template '%s' does not exist", name);
    return pg__event(s, FM_EVENT_TEMPLATE, name, err);
}

static int r_template_set_status(fm_store *base, const char *name, int status, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, template_status(s, name, status, err));
}

static int r_template_list(fm_store *base, fm_template_cb cb, void *ud)
{
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " TEMPLATE_COLS " FROM templates ORDER BY name COLLATE \"C\"",
                          NULL, "templates", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_template t;
        read_template(r, i, &t);
        if (cb(ud, &t))
            break;
    }
    PQclear(r);
    return 0;
}

static int r_template_serial_allowed(fm_store *base, const char *name, const char *serial)
{
    fm_template t;
    int rc = r_template_get(base, name, &t);
    if (rc)
        return rc;
    if (!t.has_allowlist)
        return 1;
    pg_args a = {0};
    pg__text(&a, name);
    pg__text(&a, serial);
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT 1 FROM template_serials WHERE template = $1 AND serial = $2",
                          &a, "template", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) > 0;
    PQclear(r);
    return rc;
}

static int claim_insert(pg_store *s, const char *tmpl, const char *serial, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, serial);
    pg__text(&a, tmpl);
    pg__i64(&a, fm_wall_ms());
    rc = pg__cmd(s,
                 "INSERT INTO claim_certs(serial, template, status, created_ms)"
                 " VALUES($1, $2, 0, $3)",
                 &a, "claim certificate", NULL, err);
    return rc ? rc : pg__event(s, FM_EVENT_TEMPLATE, tmpl, err);
}

static int r_claim_cert_add(fm_store *base, const char *tmpl, const char *serial,
                            fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    fm_template t;
    if (r_template_get(base, tmpl, &t) != 0)
        return fm_errf(err, FM_ENOTFOUND, "template '%s' does not exist", tmpl);
    PG_TX(s, err, claim_insert(s, tmpl, serial, err));
}

/* Calls cb(serial, status, when) for each row of a (serial, status, when)
 * query with at most one text parameter. */
static int serial_query(pg_store *s, const char *sql, const char *p1, fm_serial_cb cb, void *ud)
{
    pg_args a = {0};
    if (p1)
        pg__text(&a, p1);
    int rc;
    PGresult *r = pg__run(s, sql, p1 ? &a : NULL, "certificates", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++)
        if (cb(ud, pg__str(r, i, 0), (int)pg__int(r, i, 1), pg__int(r, i, 2)))
            break;
    PQclear(r);
    return 0;
}

static int r_claim_certs(fm_store *base, const char *tmpl, fm_serial_cb cb, void *ud)
{
    return serial_query((pg_store *)base,
                        "SELECT serial, status, created_ms FROM claim_certs"
                        " WHERE template = $1 AND status = 0 ORDER BY serial COLLATE \"C\"",
                        tmpl, cb, ud);
}

/* ---- certificates and devices ------------------------------------------------- */

static int cert_add_tx(pg_store *s, const char *device_id, const char *serial, const char *pem,
                       int64_t not_after_ms, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    return rc ? rc : insert_cert(s, device_id, serial, pem, "", not_after_ms, err);
}

static int r_cert_add(fm_store *base, const char *device_id, const char *serial, const char *pem,
                      int64_t not_after_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, cert_add_tx(s, device_id, serial, pem, not_after_ms, err));
}

static int r_device_certs(fm_store *base, const char *device_id, fm_serial_cb cb, void *ud)
{
    return serial_query((pg_store *)base,
                        "SELECT serial, status, grace_until_ms FROM certs"
                        " WHERE device_id = $1 AND status IN (0, 1) ORDER BY serial COLLATE \"C\"",
                        device_id, cb, ud);
}

static int revoke_device(pg_store *s, const char *id, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, id);
    long changed = 0;
    rc = pg__cmd(s, "UPDATE devices SET status = 2 WHERE id = $1", &a, "device", &changed, err);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", id);
    pg__i64(&a, fm_wall_ms());
    rc = pg__cmd(s,
                 "UPDATE certs SET status = 2, revoked_ms = $2 WHERE device_id = $1"
                 " AND status <> 2",
                 &a, "certificates", NULL, err);
    return rc ? rc : pg__event(s, FM_EVENT_DEVICE, id, err);
}

static int r_device_revoke(fm_store *base, const char *id, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, revoke_device(s, id, err));
}

static int r_device_list(fm_store *base, fm_device_cb cb, void *ud)
{
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " PG_DEVICE_COLS " FROM devices ORDER BY id COLLATE \"C\"",
                          NULL, "devices", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_device d;
        pg__read_device(r, i, &d);
        /* As in the SQLite backend, the list carries no model/firmware. */
        d.model[0] = d.firmware[0] = '\0';
        if (cb(ud, &d))
            break;
    }
    PQclear(r);
    return 0;
}

static int r_revoked_certs(fm_store *base, fm_serial_cb cb, void *ud)
{
    return serial_query((pg_store *)base,
                        "SELECT serial, status, revoked_ms FROM certs WHERE status = 2"
                        " ORDER BY serial COLLATE \"C\"",
                        NULL, cb, ud);
}

static int expire(pg_store *s, int64_t now, long *expired, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__i64(&a, now);
    PGresult *r = pg__run(s,
                          "SELECT DISTINCT device_id FROM certs WHERE status = 1"
                          " AND grace_until_ms <= $1",
                          &a, "grace scan", &rc, err);
    if (!r)
        return rc;
    long n = PQntuples(r);
    for (int i = 0; i < n && !rc; i++)
        rc = pg__event(s, FM_EVENT_DEVICE, pg__str(r, i, 0), err);
    PQclear(r);
    if (!rc)
        rc = pg__cmd(s,
                     "UPDATE certs SET status = 2, revoked_ms = $1 WHERE status = 1"
                     " AND grace_until_ms <= $1",
                     &a, "grace", NULL, err);
    if (!rc && expired)
        *expired = n;
    return rc;
}

static int r_expire_grace(fm_store *base, int64_t now_ms, long *expired, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    if (expired)
        *expired = 0;
    /* Most calls find nothing; look before opening a transaction. */
    pg_args a = {0};
    pg__i64(&a, now_ms);
    int rc;
    PGresult *r = pg__run(s,
                          "SELECT 1 FROM certs WHERE status = 1 AND grace_until_ms <= $1 LIMIT 1",
                          &a, "grace scan", &rc, err);
    if (!r)
        return rc;
    int any = PQntuples(r) > 0;
    PQclear(r);
    if (!any)
        return 0;
    PG_TX(s, err, expire(s, now_ms, expired, err));
}

/* ---- provisioning and rotation --------------------------------------------------- */

static int r_provision_lookup(fm_store *base, const char *serial_number, char *device_id,
                              size_t id_len, char **cert_pem)
{
    pg_store *s = (pg_store *)base;
    *cert_pem = NULL;
    pg_args a = {0};
    pg__text(&a, serial_number);
    int rc;
    PGresult *r = pg__run(s, "SELECT device_id FROM provisioned WHERE serial_number = $1", &a,
                          "provisioning", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        pg__copy(device_id, id_len, r, 0, 0);
    PQclear(r);
    if (rc)
        return rc;
    pg_args b = {0};
    pg__text(&b, device_id);
    r = pg__run(s,
                "SELECT pem FROM certs WHERE device_id = $1 AND status = 0"
                " ORDER BY created_ms DESC LIMIT 1",
                &b, "provisioning", &rc, NULL);
    if (!r)
        return rc;
    if (PQntuples(r) && *pg__str(r, 0, 0) && !(*cert_pem = fm_strdup(pg__str(r, 0, 0))))
        rc = FM_ENOMEM;
    PQclear(r);
    return rc;
}

static int r_device_get(fm_store *base, const char *id, fm_device *out);

static int provision(pg_store *s, const fm_provision *p, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    fm_device d;
    int64_t now = fm_wall_ms();
    rc = r_device_get(&s->base, p->device_id, &d);
    if (rc == 0) {
        if (strcmp(d.serial_number, p->serial_number) != 0)
            return fm_errf(err, FM_EEXIST, "device id '%s' belongs to another device",
                           p->device_id);
        if (d.status == FM_DEVICE_REVOKED)
            return fm_errf(err, FM_EPERM, "device '%s' is revoked", p->device_id);
        if (p->reprovision) {
            pg_args a = {0};
            pg__i64(&a, now);
            pg__text(&a, p->device_id);
            if ((rc = pg__cmd(s,
                              "UPDATE certs SET status = 2, revoked_ms = $1 WHERE device_id = $2"
                              " AND status <> 2",
                              &a, "certificates", NULL, err)))
                return rc;
        }
        pg_args a = {0};
        pg__text(&a, p->model);
        pg__text(&a, p->firmware);
        pg__text(&a, p->device_id);
        rc = pg__cmd(s, "UPDATE devices SET model = $1, firmware = $2 WHERE id = $3", &a,
                     "device", NULL, err);
    } else if (rc == FM_ENOTFOUND) {
        fm_device nd = {.status = FM_DEVICE_ACTIVE};
        snprintf(nd.id, sizeof nd.id, "%s", p->device_id);
        snprintf(nd.tenant, sizeof nd.tenant, "%s", p->tenant);
        snprintf(nd.device_group, sizeof nd.device_group, "%s", p->device_group);
        snprintf(nd.serial_number, sizeof nd.serial_number, "%s", p->serial_number);
        snprintf(nd.model, sizeof nd.model, "%s", p->model);
        snprintf(nd.firmware, sizeof nd.firmware, "%s", p->firmware);
        rc = insert_device(s, &nd, err);
    } else {
        return fm_errf(err, rc, "device lookup failed");
    }
    if (!rc)
        rc = insert_cert(s, p->device_id, p->cert_serial, p->cert_pem, p->key_id,
                         p->not_after_ms, err);
    if (!rc) {
        pg_args a = {0};
        pg__text(&a, p->serial_number);
        pg__text(&a, p->template_name);
        pg__text(&a, p->device_id);
        pg__i64(&a, now);
        rc = pg__cmd(s,
                     "INSERT INTO provisioned(serial_number, template, device_id, at_ms)"
                     " VALUES($1, $2, $3, $4) ON CONFLICT (serial_number) DO UPDATE SET"
                     " template = excluded.template, device_id = excluded.device_id,"
                     " at_ms = excluded.at_ms",
                     &a, "provisioning", NULL, err);
    }
    if (!rc)
        rc = pg__event(s, FM_EVENT_PROVISIONED, p->device_id, err);
    return rc;
}

static int r_provision_commit(fm_store *base, const fm_provision *p, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, provision(s, p, err));
}

static int rotate(pg_store *s, const char *dev, const char *serial, const char *pem,
                  const char *key_id, int64_t not_after, const char *old, int64_t grace_until,
                  fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (!rc)
        rc = insert_cert(s, dev, serial, pem, key_id, not_after, err);
    if (rc || !old || !*old)
        return rc;
    pg_args a = {0};
    pg__i64(&a, grace_until);
    pg__text(&a, old);
    pg__text(&a, dev);
    return pg__cmd(s,
                   "UPDATE certs SET status = 1, grace_until_ms = $1 WHERE serial = $2"
                   " AND device_id = $3 AND status = 0",
                   &a, "rotation", NULL, err);
}

static int r_rotate_commit(fm_store *base, const char *dev, const char *serial, const char *pem,
                           const char *key_id, int64_t not_after, const char *old,
                           int64_t grace_until, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, rotate(s, dev, serial, pem, key_id, not_after, old, grace_until, err));
}

static int r_key_owner(fm_store *base, const char *key_id, char *device_id, size_t id_len)
{
    if (!key_id || !*key_id)
        return FM_ENOTFOUND;
    pg_args a = {0};
    pg__text(&a, key_id);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT device_id FROM certs WHERE key_id = $1 AND status <> 2"
                          " ORDER BY created_ms DESC LIMIT 1",
                          &a, "key owner", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        pg__copy(device_id, id_len, r, 0, 0);
    PQclear(r);
    return rc;
}

/* ---- shadows ----------------------------------------------------------------- */

static int r_shadow_get(fm_store *base, const char *device_id, fm_shadow *out)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__text(&a, device_id);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT desired, reported, version, updated_ms FROM shadows"
                          " WHERE device_id = $1",
                          &a, "shadow", &rc, NULL);
    if (!r)
        return rc;
    const char *des = "{}", *rep = "{}";
    if (PQntuples(r)) {
        des = pg__str(r, 0, 0);
        rep = pg__str(r, 0, 1);
        out->version = pg__int(r, 0, 2);
        out->updated_ms = pg__int(r, 0, 3);
    }
    out->desired = fm_strdup(des);
    out->reported = fm_strdup(rep);
    rc = 0;
    if (!out->desired || !out->reported) {
        fm_shadow_clear(out);
        rc = FM_ENOMEM;
    }
    PQclear(r);
    return rc;
}

static int shadow_write(pg_store *s, const char *dev, const char *desired, const char *reported,
                        int64_t expected, int64_t *new_version, int notify, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__text(&a, dev);
    PGresult *r = pg__run(s, "SELECT version FROM shadows WHERE device_id = $1", &a, "shadow",
                          &rc, err);
    if (!r)
        return rc;
    int64_t cur = PQntuples(r) ? pg__int(r, 0, 0) : 0;
    PQclear(r);
    if (expected >= 0 && expected != cur)
        return fm_errf(err, FM_EBUSY, "shadow version is %lld, expected %lld", (long long)cur,
                       (long long)expected);
    pg__text(&a, desired);
    pg__text(&a, reported);
    pg__i64(&a, cur + 1);
    pg__i64(&a, fm_wall_ms());
    rc = pg__cmd(s,
                 "INSERT INTO shadows(device_id, desired, reported, version, updated_ms)"
                 " VALUES($1, $2, $3, $4, $5) ON CONFLICT (device_id) DO UPDATE SET"
                 " desired = excluded.desired, reported = excluded.reported,"
                 " version = excluded.version, updated_ms = excluded.updated_ms",
                 &a, "shadow", NULL, err);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", dev);
    if (rc)
        return rc;
    if (new_version)
        *new_version = cur + 1;
    return notify ? pg__event(s, FM_EVENT_SHADOW, dev, err) : 0;
}

static int r_shadow_put(fm_store *base, const char *dev, const char *desired,
                        const char *reported, int64_t expected, int64_t *new_version, int notify,
                        fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, shadow_write(s, dev, desired, reported, expected, new_version, notify, err));
}

/* ---- the event log --------------------------------------------------------------- */

static int r_events_after(fm_store *base, int64_t after, size_t limit, fm_event_cb cb, void *ud)
{
    pg_args a = {0};
    pg__i64(&a, after);
    pg__i64(&a, limit > (size_t)INT64_MAX ? INT64_MAX : (int64_t)limit);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT seq, kind, subject FROM registry_events WHERE seq > $1"
                          " ORDER BY seq LIMIT $2",
                          &a, "events", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++)
        if (cb(ud, pg__int(r, i, 0), (int)pg__int(r, i, 1), pg__str(r, i, 2)))
            break;
    PQclear(r);
    return 0;
}

static int r_events_max(fm_store *base, int64_t *out)
{
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT COALESCE(pg_sequence_last_value('registry_events_seq_seq'), 0)",
                          NULL, "events", &rc, NULL);
    if (!r)
        return rc;
    *out = pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

/* ---- devices ----------------------------------------------------------------------- */

static int device_add_tx(pg_store *s, const fm_device *d, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (!rc)
        rc = insert_device(s, d, err);
    return rc ? rc : pg__event(s, FM_EVENT_DEVICE, d->id, err);
}

static int r_device_add(fm_store *base, const fm_device *d, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, device_add_tx(s, d, err));
}

static int r_device_get(fm_store *base, const char *id, fm_device *out)
{
    pg_args a = {0};
    pg__text(&a, id);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT " PG_DEVICE_COLS " FROM devices WHERE id = $1",
                          &a, "device", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc) {
        pg__read_device(r, 0, out);
        out->model[0] = out->firmware[0] = '\0'; /* as SQLite's device_get */
    }
    PQclear(r);
    return rc;
}

static int set_status_tx(pg_store *s, const char *id, int status, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_REGISTRY, err);
    if (rc)
        return rc;
    fm_device d;
    rc = r_device_get(&s->base, id, &d);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, FM_ENOTFOUND, "device '%s' does not exist", id);
    if (rc)
        return fm_errf(err, rc, "device '%s': %s", id, fm_strerror(rc));
    /* Revocation is final. */
    if (d.status == FM_DEVICE_REVOKED)
        return fm_errf(err, FM_EPERM, "device '%s' is revoked; revocation cannot be undone", id);
    pg_args a = {0};
    pg__i64(&a, status);
    pg__text(&a, id);
    rc = pg__cmd(s, "UPDATE devices SET status = $1 WHERE id = $2", &a, "device status", NULL,
                 err);
    return rc ? rc : pg__event(s, FM_EVENT_DEVICE, id, err);
}

static int r_device_set_status(fm_store *base, const char *id, int status, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, set_status_tx(s, id, status, err));
}

const fm_store_registry_vt pg__registry_vt = {
    .device_add = r_device_add,
    .device_get = r_device_get,
    .device_set_status = r_device_set_status,
    .template_add = r_template_add,
    .template_get = r_template_get,
    .template_set_status = r_template_set_status,
    .template_list = r_template_list,
    .template_serial_allowed = r_template_serial_allowed,
    .claim_cert_add = r_claim_cert_add,
    .claim_certs = r_claim_certs,
    .cert_add = r_cert_add,
    .device_certs = r_device_certs,
    .device_revoke = r_device_revoke,
    .device_list = r_device_list,
    .revoked_certs = r_revoked_certs,
    .expire_grace = r_expire_grace,
    .provision_lookup = r_provision_lookup,
    .provision_commit = r_provision_commit,
    .rotate_commit = r_rotate_commit,
    .key_owner = r_key_owner,
    .shadow_get = r_shadow_get,
    .shadow_put = r_shadow_put,
    .events_after = r_events_after,
    .events_max = r_events_max,
};
