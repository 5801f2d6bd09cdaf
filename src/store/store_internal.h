/* Internals shared by the store's files. */
#ifndef FLEETML_STORE_INTERNAL_H
#define FLEETML_STORE_INTERNAL_H

#include "fleetml/store.h"

#include <stdbool.h>
#include <stdio.h>

/* Opens (creating and migrating) the SQLite database <data>/db/fleetml.db. */
int store__sqlite_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);
/* Connects to store.url (postgres://…) and migrates the schema. */
int store__pg_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);

/* Statements both backends run as they are, placeholders given by the
 * caller ("?1" for SQLite, "$1" for PostgreSQL). */

/* Online, last change, newest measurement, latest not-after of the
 * device's active (or grace) certificates; a missing row reads as NULL. */
#define SQL_PRESENCE_GET(id)                                                                       \
    "SELECT (SELECT online FROM device_presence WHERE device_id = " id "),"                       \
    " (SELECT changed_ms FROM device_presence WHERE device_id = " id "),"                         \
    " (SELECT max(received_ms) FROM measurements WHERE device_id = " id "),"                      \
    " (SELECT max(not_after_ms) FROM certs WHERE device_id = " id " AND status IN (0, 1)),"      \
    " (SELECT node FROM device_presence WHERE device_id = " id ")"

/* Devices per tenant by presence; the parameter is the node. */
#define SQL_PRESENCE_COUNTS(node)                                                                  \
    "SELECT d.tenant,"                                                                             \
    " coalesce(sum(CASE WHEN d.status = 0 AND p.online = 1 THEN 1 ELSE 0 END), 0),"              \
    " coalesce(sum(CASE WHEN d.status = 0 AND coalesce(p.online, 0) = 0 THEN 1 ELSE 0 END), 0)," \
    " coalesce(sum(CASE WHEN d.status <> 0 THEN 1 ELSE 0 END), 0),"                              \
    " coalesce(sum(CASE WHEN d.status = 0 AND p.online = 1 AND p.node = " node                    \
    " THEN 1 ELSE 0 END), 0)"                                                                      \
    " FROM devices d LEFT JOIN device_presence p ON p.device_id = d.id"                            \
    " GROUP BY d.tenant ORDER BY d.tenant"

/* Presence changes after a rev, with the device's tenant. */
#define SQL_PRESENCE_CHANGES(after, limit)                                                         \
    "SELECT l.rev, l.device_id, d.tenant, l.online, l.changed_ms"                                  \
    " FROM presence_log l JOIN devices d ON d.id = l.device_id"                                    \
    " WHERE l.rev > " after " ORDER BY l.rev LIMIT " limit

/* A stored change, appended to the log. */
#define SQL_PRESENCE_LOG(dev, online, at)                                                          \
    "INSERT INTO presence_log(device_id, online, changed_ms) VALUES(" dev ", " online ", " at ")"

/* A node's broker restarted at at_ms: its devices still online by an older
 * report go offline (logged first, then changed). */
#define SQL_PRESENCE_RESET_WHERE(at, node)                                                         \
    " FROM device_presence WHERE online <> 0 AND changed_ms < " at " AND node IN (" node ", '')"
#define SQL_PRESENCE_RESET_LOG(at, node)                                                           \
    "INSERT INTO presence_log(device_id, online, changed_ms) SELECT device_id, 0, " at            \
    SQL_PRESENCE_RESET_WHERE(at, node) " ORDER BY device_id"
#define SQL_PRESENCE_RESET(at, node)                                                               \
    "UPDATE device_presence SET online = 0, changed_ms = " at                                     \
    " WHERE online <> 0 AND changed_ms < " at " AND node IN (" node ", '')"

/* Every label written for a measurement, oldest first. */
#define SQL_LABEL_HISTORY(device, measurement)                                                     \
    "SELECT seq, device_id, tenant, measurement_id, outputs, source, labelled_by, at_ms"           \
    " FROM label_log WHERE device_id = " device " AND measurement_id = " measurement              \
    " ORDER BY seq"

/* Rules: create, or replace the document keeping the position. */
#define SQL_RULE_PUT(t, n, spec, pos, by, ms)                                                      \
    "INSERT INTO rules(tenant, name, spec, position, updated_by, updated_ms)"                      \
    " VALUES(" t ", " n ", " spec ", " pos ", " by ", " ms ")"                                     \
    " ON CONFLICT (tenant, name) DO UPDATE SET spec = excluded.spec,"                               \
    " updated_by = excluded.updated_by, updated_ms = excluded.updated_ms"
#define SQL_RULE_COLS "tenant, name, spec, position, updated_by, updated_ms"
/* A rule's position just before a time in its source; NULL for an unknown
 * source. Placeholders: 1 tenant, 2 name, 3 from_ms, 4 now_ms. */
static inline const char *store__rule_rewind_sql(const char *source, int pg)
{
#define REWIND(tbl, seq, at, p1, p2, p3, p4)                                                       \
    "UPDATE rules SET position = (SELECT coalesce(max(" seq "), 0) FROM " tbl " WHERE " at       \
    " < " p3 "), updated_ms = " p4 " WHERE tenant = " p1 " AND name = " p2 " RETURNING position"
    static const struct {
        const char *source, *sqlite, *pg;
    } t[] = {
        {"records", REWIND("measurements", "seq", "received_ms", "?1", "?2", "?3", "?4"),
         REWIND("measurements", "seq", "received_ms", "$1", "$2", "$3", "$4")},
        {"labels", REWIND("label_log", "seq", "at_ms", "?1", "?2", "?3", "?4"),
         REWIND("label_log", "seq", "at_ms", "$1", "$2", "$3", "$4")},
        {"presence", REWIND("presence_log", "rev", "changed_ms", "?1", "?2", "?3", "?4"),
         REWIND("presence_log", "rev", "changed_ms", "$1", "$2", "$3", "$4")},
        {"aliases", REWIND("model_alias_log", "seq", "updated_ms", "?1", "?2", "?3", "?4"),
         REWIND("model_alias_log", "seq", "updated_ms", "$1", "$2", "$3", "$4")},
        {"lake", REWIND("lake_object_log", "seq", "at_ms", "?1", "?2", "?3", "?4"),
         REWIND("lake_object_log", "seq", "at_ms", "$1", "$2", "$3", "$4")},
        {"audit", REWIND("audit", "seq", "at_ms", "?1", "?2", "?3", "?4"),
         REWIND("audit", "seq", "at_ms", "$1", "$2", "$3", "$4")},
    };
#undef REWIND
    for (size_t i = 0; source && i < sizeof t / sizeof t[0]; i++)
        if (__builtin_strcmp(t[i].source, source) == 0)
            return pg ? t[i].pg : t[i].sqlite;
    return NULL;
}
#define SQL_RULE_LOG_COLS                                                                          \
    "seq, tenant, rule, event_id, target, outcome, attempt, duration_us, error, at_ms"
#define SQL_RULE_LOG_ADD(a, b, c, d, e, f, g, h, i)                                                \
    "INSERT INTO rule_log(tenant, rule, event_id, target, outcome, attempt, duration_us, error,"   \
    " at_ms) VALUES(" a ", " b ", " c ", " d ", " e ", " f ", " g ", " h ", " i ")"

/* The audit entry a training job's final state writes in the same
 * transaction (the training.finished event comes from it). details is
 * a buffer of len bytes for the entry's JSON details. */
static inline bool store__job_final(const fm_train_job *j, fm_audit *a, char *details,
                                    size_t len)
{
    if (__builtin_strcmp(j->status, "done") != 0 && __builtin_strcmp(j->status, "failed") != 0)
        return false;
    /* The error is free text: only characters that need no escaping pass. */
    char safe[256];
    size_t k = 0;
    for (size_t i = 0; j->error[i] && k + 1 < sizeof safe; i++) {
        char c = j->error[i];
        safe[k++] = (c == '"' || c == '\\' || (unsigned char)c < 0x20) ? ' ' : c;
    }
    safe[k] = '\0';
    snprintf(details, len, "{\"job\":%lld,\"status\":\"%s\",\"rows\":%lld,\"error\":\"%s\"}",
             (long long)j->id, j->status, (long long)j->rows, safe);
    *a = (fm_audit){.at_ms = j->updated_ms ? j->updated_ms : fm_wall_ms(),
                    .tenant = j->tenant,
                    .actor = "fleetml",
                    .action = "training.finished",
                    .target = j->version,
                    .outcome = __builtin_strcmp(j->status, "done") == 0 ? "ok" : "failed",
                    .client = "",
                    .details_json = details};
    return true;
}

/* A running job found at its node's start is failed with this error (and
 * its training.finished entry, as any final state). */
#define STORE_JOB_INTERRUPTED                                                                      \
    "interrupted: the node restarted (nothing was registered); submit it again"
static inline void store__job_interrupted(fm_train_job *j, int64_t now_ms)
{
    __builtin_snprintf(j->status, sizeof j->status, "failed");
    __builtin_snprintf(j->error, sizeof j->error, "%s", STORE_JOB_INTERRUPTED);
    j->updated_ms = now_ms;
}

struct fm_drift_counts;
/* Drift counts as stored by every backend: a JSON array of features x bins
 * integers. text: fm_malloc'd or NULL (out of memory); read: missing or
 * malformed entries read as 0. */
char *store__drift_text(const struct fm_drift_counts *c);
void store__drift_read(const char *text, struct fm_drift_counts *c);

#endif
