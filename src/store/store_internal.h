/* Internals shared by the store's files. */
#ifndef FLEETML_STORE_INTERNAL_H
#define FLEETML_STORE_INTERNAL_H

#include "fleetml/store.h"

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
    " (SELECT max(not_after_ms) FROM certs WHERE device_id = " id " AND status IN (0, 1))"

/* Presence rows changed after a rev, with the device's tenant. */
#define SQL_PRESENCE_CHANGES(after, limit)                                                         \
    "SELECT p.rev, p.device_id, d.tenant, p.online, p.changed_ms"                                  \
    " FROM device_presence p JOIN devices d ON d.id = p.device_id"                                 \
    " WHERE p.rev > " after " ORDER BY p.rev LIMIT " limit

/* A node's broker restarted at at_ms: its devices still online by an older
 * report go offline, each with a rev of its own after the newest. */
#define SQL_PRESENCE_RESET(at, node)                                                               \
    "UPDATE device_presence SET online = 0, changed_ms = " at ", rev = b.base + x.rn"             \
    " FROM (SELECT device_id AS d, row_number() OVER (ORDER BY device_id) AS rn"                   \
    "       FROM device_presence WHERE online <> 0 AND changed_ms < " at                           \
    "       AND node IN (" node ", '')) AS x,"                                                     \
    " (SELECT coalesce(max(rev), 0) AS base FROM device_presence) AS b"                            \
    " WHERE device_presence.device_id = x.d"

/* Every label written for a measurement, oldest first. */
#define SQL_LABEL_HISTORY(device, measurement)                                                     \
    "SELECT seq, device_id, tenant, measurement_id, outputs, source, labelled_by, at_ms"           \
    " FROM label_log WHERE device_id = " device " AND measurement_id = " measurement              \
    " ORDER BY seq"

struct fm_drift_counts;
/* Drift counts as stored by every backend: a JSON array of features x bins
 * integers. text: fm_malloc'd or NULL (out of memory); read: missing or
 * malformed entries read as 0. */
char *store__drift_text(const struct fm_drift_counts *c);
void store__drift_read(const char *text, struct fm_drift_counts *c);

#endif
