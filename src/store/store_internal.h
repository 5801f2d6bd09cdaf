/* Internals shared by the store's files. */
#ifndef FLEETML_STORE_INTERNAL_H
#define FLEETML_STORE_INTERNAL_H

#include "fleetml/store.h"

/* Opens (creating and migrating) the SQLite database <data>/db/fleetml.db. */
int store__sqlite_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);
/* Connects to store.url (postgres://…) and migrates the schema. */
int store__pg_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);


#endif
