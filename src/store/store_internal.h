/* Internals shared by the store's files. */
#ifndef FLEETML_STORE_INTERNAL_H
#define FLEETML_STORE_INTERNAL_H

#include "fleetml/store.h"

/* Opens (creating and migrating) the SQLite database <data>/db/fleetml.db. */
int store__sqlite_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);
/* Connects to store.url (postgres://…) and migrates the schema. */
int store__pg_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);


struct fm_drift_counts;
/* Drift counts as stored by every backend: a JSON array of features x bins
 * integers. text: fm_malloc'd or NULL (out of memory); read: missing or
 * malformed entries read as 0. */
char *store__drift_text(const struct fm_drift_counts *c);
void store__drift_read(const char *text, struct fm_drift_counts *c);

#endif
