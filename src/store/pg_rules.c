/*
 * PostgreSQL backend: rules (fm_store_rules_vt), the same tables and
 * statements as sqlite_rules.c (store_internal.h holds the shared SQL).
 */
#include "store/pg_int.h"

#include <stdio.h>
#include <string.h>

static const char *nz(const char *s) { return s ? s : ""; }

static int rule_put(fm_store *base, const fm_rule_row *r, int *created, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, nz(r->tenant));
    pg__text(&a, nz(r->name));
    pg__text(&a, nz(r->spec_json));
    pg__i64(&a, r->position);
    pg__text(&a, nz(r->updated_by));
    pg__i64(&a, r->updated_ms ? r->updated_ms : fm_wall_ms());
    int rc;
    /* xmax = 0 on the returned row: it was inserted, not updated (one
     * statement, so no race between checking and writing). */
    PGresult *res = pg__run((pg_store *)base,
                            SQL_RULE_PUT("$1", "$2", "$3", "$4", "$5", "$6")
                            " RETURNING (xmax = 0)::int",
                            &a, "rule", &rc, err);
    if (!res)
        return rc;
    if (created)
        *created = PQntuples(res) == 1 && pg__int(res, 0, 0) == 1;
    PQclear(res);
    return 0;
}

static int rule_list(fm_store *base, const char *tenant, const char *name, fm_rule_cb cb,
                     void *ud)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    pg__text(&a, name);
    int rc;
    PGresult *res = pg__run((pg_store *)base,
                            "SELECT " SQL_RULE_COLS " FROM rules"
                            " WHERE ($1::text IS NULL OR tenant = $1)"
                            " AND ($2::text IS NULL OR name = $2)"
                            " ORDER BY tenant COLLATE \"C\", name COLLATE \"C\"",
                            &a, "rules", &rc, NULL);
    if (!res)
        return rc;
    for (int i = 0, n = PQntuples(res); i < n; i++) {
        fm_rule_row r = {.tenant = pg__str(res, i, 0),
                         .name = pg__str(res, i, 1),
                         .spec_json = pg__str(res, i, 2),
                         .position = pg__int(res, i, 3),
                         .updated_by = pg__str(res, i, 4),
                         .updated_ms = pg__int(res, i, 5)};
        if (cb(ud, &r))
            break;
    }
    PQclear(res);
    return 0;
}

static int rule_delete_tx(pg_store *s, const char *tenant, const char *name, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, nz(tenant));
    pg__text(&a, nz(name));
    long n = 0;
    int rc = pg__cmd(s, "DELETE FROM rules WHERE tenant = $1 AND name = $2", &a, "rule", &n, err);
    if (!rc && n == 0)
        rc = fm_errf(err, FM_ENOTFOUND, "no rule '%s'", nz(name));
    if (!rc)
        rc = pg__cmd(s, "DELETE FROM rule_log WHERE tenant = $1 AND rule = $2", &a, "rule log",
                     NULL, err);
    return rc;
}

static int rule_delete(fm_store *base, const char *tenant, const char *name, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, rule_delete_tx(s, tenant, name, err));
}

static int rule_position(fm_store *base, const char *tenant, const char *name,
                         int64_t position, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, nz(tenant));
    pg__text(&a, nz(name));
    pg__i64(&a, position);
    long n = 0;
    int rc = pg__cmd((pg_store *)base,
                     "UPDATE rules SET position = $3 WHERE tenant = $1 AND name = $2", &a, "rule",
                     &n, err);
    if (!rc && n == 0)
        rc = fm_errf(err, FM_ENOTFOUND, "no rule '%s'", nz(name));
    return rc;
}

static int rule_rewind(fm_store *base, const char *tenant, const char *name, const char *source,
                       int64_t from_ms, int64_t *position, fm_errbuf *err)
{
    const char *sql = store__rule_rewind_sql(source, 1);
    if (!sql)
        return fm_errf(err, FM_EINVAL, "rules on this event cannot be replayed");
    pg_args a = {0};
    pg__text(&a, nz(tenant));
    pg__text(&a, nz(name));
    pg__i64(&a, from_ms);
    pg__i64(&a, fm_wall_ms());
    int rc;
    PGresult *res = pg__run((pg_store *)base, sql, &a, "rule", &rc, err);
    if (!res)
        return rc;
    rc = PQntuples(res) == 1 ? 0 : fm_errf(err, FM_ENOTFOUND, "no rule '%s'", nz(name));
    if (!rc)
        *position = pg__int(res, 0, 0);
    PQclear(res);
    return rc;
}

static int rule_log_add(fm_store *base, fm_rule_log *l, fm_errbuf *err)
{
    if (!l->at_ms)
        l->at_ms = fm_wall_ms();
    pg_args a = {0};
    pg__text(&a, nz(l->tenant));
    pg__text(&a, nz(l->rule));
    pg__text(&a, nz(l->event_id));
    pg__text(&a, nz(l->target));
    pg__text(&a, nz(l->outcome));
    pg__i64(&a, l->attempt);
    pg__i64(&a, l->duration_us);
    pg__text(&a, nz(l->error));
    pg__i64(&a, l->at_ms);
    int rc;
    PGresult *res = pg__run((pg_store *)base,
                            SQL_RULE_LOG_ADD("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9")
                            " RETURNING seq",
                            &a, "rule log", &rc, err);
    if (!res)
        return rc;
    l->seq = pg__int(res, 0, 0);
    PQclear(res);
    return 0;
}

static int rule_log_page(fm_store *base, const char *tenant, const char *rule, int64_t before_seq,
                         size_t limit, fm_rule_log_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, nz(tenant));
    pg__text(&a, nz(rule));
    pg__i64(&a, before_seq);
    pg__i64(&a, (int64_t)(limit ? limit : 1));
    int rc;
    PGresult *res = pg__run((pg_store *)base,
                            "SELECT " SQL_RULE_LOG_COLS " FROM rule_log WHERE tenant = $1"
                            " AND rule = $2 AND ($3 = 0 OR seq < $3) ORDER BY seq DESC LIMIT $4",
                            &a, "rule log", &rc, NULL);
    if (!res)
        return rc;
    for (int i = 0, n = PQntuples(res); i < n; i++) {
        fm_rule_log l = {.seq = pg__int(res, i, 0),
                         .tenant = pg__str(res, i, 1),
                         .rule = pg__str(res, i, 2),
                         .event_id = pg__str(res, i, 3),
                         .target = pg__str(res, i, 4),
                         .outcome = pg__str(res, i, 5),
                         .attempt = (int)pg__int(res, i, 6),
                         .duration_us = pg__int(res, i, 7),
                         .error = pg__str(res, i, 8),
                         .at_ms = pg__int(res, i, 9)};
        if (cb(ud, &l))
            break;
    }
    PQclear(res);
    return 0;
}

const fm_store_rules_vt pg__rules_vt = {
    .rule_put = rule_put,
    .rule_list = rule_list,
    .rule_delete = rule_delete,
    .rule_position = rule_position,
    .rule_rewind = rule_rewind,
    .rule_log_add = rule_log_add,
    .rule_log_page = rule_log_page,
};
