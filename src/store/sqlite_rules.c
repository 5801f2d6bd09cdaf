/*
 * SQLite backend: rules (fm_store_rules_vt). Each tenant's rule documents
 * with the position each has reached in its event source, and the log of
 * delivery attempts the API shows.
 */
#include "store/sqlite_int.h"

#include <stdio.h>
#include <string.h>

static const char *nz(const char *s) { return s ? s : ""; }

static const char *col(sqlite3_stmt *st, int i)
{
    const unsigned char *v = sqlite3_column_text(st, i);
    return v ? (const char *)v : "";
}

static int rule_put_tx(sqlite_store *s, const fm_rule_row *r, int *created, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "SELECT 1 FROM rules WHERE tenant = ? AND name = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, nz(r->tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(r->name), -1, SQLITE_STATIC);
    int existed = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    rc = sql__prep(s, &st, SQL_RULE_PUT("?1", "?2", "?3", "?4", "?5", "?6"), err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, nz(r->tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(r->name), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, nz(r->spec_json), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, r->position);
    sqlite3_bind_text(st, 5, nz(r->updated_by), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, r->updated_ms ? r->updated_ms : fm_wall_ms());
    int src = sql__step_done(st);
    sqlite3_finalize(st);
    if (src != SQLITE_OK)
        return sql__err(s, err, src, "rule");
    if (created)
        *created = !existed;
    return 0;
}

static int rule_put(fm_store *base, const fm_rule_row *r, int *created, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    /* In one transaction: writers are serial, so whether the row existed
     * cannot change between the two statements. */
    IN_TX(s, err, rule_put_tx(s, r, created, err));
}

static int rule_list(fm_store *base, const char *tenant, const char *name, fm_rule_cb cb,
                     void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT " SQL_RULE_COLS " FROM rules WHERE (?1 IS NULL OR tenant = ?1)"
                  " AND (?2 IS NULL OR name = ?2) ORDER BY tenant, name",
                  NULL))
        return FM_EDB;
    if (tenant)
        sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    if (name)
        sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_rule_row r = {.tenant = col(st, 0),
                         .name = col(st, 1),
                         .spec_json = col(st, 2),
                         .position = sqlite3_column_int64(st, 3),
                         .updated_by = col(st, 4),
                         .updated_ms = sqlite3_column_int64(st, 5)};
        if (cb(ud, &r)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

/* Runs a statement on (tenant, name[, position]); FM_ENOTFOUND when it
 * changed nothing. */
static int on_rule(sqlite_store *s, const char *sql, const char *tenant, const char *name,
                   const int64_t *position, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, sql, err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, nz(tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(name), -1, SQLITE_STATIC);
    if (position)
        sqlite3_bind_int64(st, 3, *position);
    int src = sql__step_done(st);
    sqlite3_finalize(st);
    if (src != SQLITE_OK)
        return sql__err(s, err, src, "rule");
    if (sqlite3_changes(s->db) == 0)
        return fm_errf(err, FM_ENOTFOUND, "no rule '%s'", nz(name));
    return 0;
}

static int rule_delete_tx(sqlite_store *s, const char *tenant, const char *name, fm_errbuf *err)
{
    int rc = on_rule(s, "DELETE FROM rules WHERE tenant = ?1 AND name = ?2", tenant, name, NULL,
                     err);
    if (rc)
        return rc;
    sqlite3_stmt *st;
    rc = sql__prep(s, &st, "DELETE FROM rule_log WHERE tenant = ?1 AND rule = ?2", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, nz(tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(name), -1, SQLITE_STATIC);
    int src = sql__step_done(st);
    sqlite3_finalize(st);
    return src == SQLITE_OK ? 0 : sql__err(s, err, src, "rule log");
}

static int rule_delete(fm_store *base, const char *tenant, const char *name, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, rule_delete_tx(s, tenant, name, err));
}

static int rule_position(fm_store *base, const char *tenant, const char *name,
                         int64_t position, fm_errbuf *err)
{
    return on_rule((sqlite_store *)base,
                   "UPDATE rules SET position = ?3 WHERE tenant = ?1 AND name = ?2", tenant, name,
                   &position, err);
}

static int rule_rewind(fm_store *base, const char *tenant, const char *name, const char *source,
                       int64_t from_ms, int64_t *position, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    const char *sql = store__rule_rewind_sql(source, 0);
    if (!sql)
        return fm_errf(err, FM_EINVAL, "rules on this event cannot be replayed");
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, sql, err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, nz(tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(name), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, from_ms);
    sqlite3_bind_int64(st, 4, fm_wall_ms());
    int src = sqlite3_step(st);
    if (src == SQLITE_ROW) {
        *position = sqlite3_column_int64(st, 0);
        src = sqlite3_step(st);
        rc = 0;
    } else if (src == SQLITE_DONE) {
        rc = fm_errf(err, FM_ENOTFOUND, "no rule '%s'", nz(name));
    }
    if (src != SQLITE_DONE && !rc)
        rc = sql__err(s, err, src, "rule");
    sqlite3_finalize(st);
    return rc;
}

static int rule_log_add(fm_store *base, fm_rule_log *l, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, SQL_RULE_LOG_ADD("?1", "?2", "?3", "?4", "?5", "?6", "?7", "?8", "?9"),
                       err);
    if (rc)
        return rc;
    if (!l->at_ms)
        l->at_ms = fm_wall_ms();
    sqlite3_bind_text(st, 1, nz(l->tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(l->rule), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, nz(l->event_id), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, nz(l->target), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, nz(l->outcome), -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 6, l->attempt);
    sqlite3_bind_int64(st, 7, l->duration_us);
    sqlite3_bind_text(st, 8, nz(l->error), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 9, l->at_ms);
    int src = sql__step_done(st);
    sqlite3_finalize(st);
    if (src != SQLITE_OK)
        return sql__err(s, err, src, "rule log");
    l->seq = sqlite3_last_insert_rowid(s->db);
    return 0;
}

static int rule_log_page(fm_store *base, const char *tenant, const char *rule, int64_t before_seq,
                         size_t limit, fm_rule_log_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  "SELECT " SQL_RULE_LOG_COLS " FROM rule_log WHERE tenant = ?1 AND rule = ?2"
                  " AND (?3 = 0 OR seq < ?3) ORDER BY seq DESC LIMIT ?4",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, nz(tenant), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, nz(rule), -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, before_seq);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)(limit ? limit : 1));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_rule_log l = {.seq = sqlite3_column_int64(st, 0),
                         .tenant = col(st, 1),
                         .rule = col(st, 2),
                         .event_id = col(st, 3),
                         .target = col(st, 4),
                         .outcome = col(st, 5),
                         .attempt = sqlite3_column_int(st, 6),
                         .duration_us = sqlite3_column_int64(st, 7),
                         .error = col(st, 8),
                         .at_ms = sqlite3_column_int64(st, 9)};
        if (cb(ud, &l)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

const fm_store_rules_vt sql__rules_vt = {
    .rule_put = rule_put,
    .rule_list = rule_list,
    .rule_delete = rule_delete,
    .rule_position = rule_position,
    .rule_rewind = rule_rewind,
    .rule_log_add = rule_log_add,
    .rule_log_page = rule_log_page,
};
