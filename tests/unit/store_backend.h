/*
 * The backend the store tests run on: SQLite in <dir> by default; the
 * PostgreSQL database at FM_TEST_STORE_URL when that is set (the
 * integration test test_53_store_postgres.py starts a server and runs the
 * same unit tests against it), emptied first so every test starts clean.
 */
#ifndef FLEETML_TEST_STORE_BACKEND_H
#define FLEETML_TEST_STORE_BACKEND_H

#include "fleetml/config.h"

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static inline const char *test_store_url(void)
{
    const char *u = getenv("FM_TEST_STORE_URL");
    return u && *u ? u : NULL;
}

static inline bool test_store_is_pg(void) { return test_store_url() != NULL; }

/* Points cfg at the test backend; for PostgreSQL drops every table first.
 * Returns 0, or -1 when the database cannot be reset. */
static inline int test_store_backend(fm_config *cfg)
{
    const char *url = test_store_url();
    if (!url)
        return 0;
    snprintf(cfg->store_backend, sizeof cfg->store_backend, "postgres");
    snprintf(cfg->store_url, sizeof cfg->store_url, "%s", url);
    PGconn *c = PQconnectdb(url);
    int rc = -1;
    if (PQstatus(c) == CONNECTION_OK) {
        PGresult *r = PQexec(c, "SET client_min_messages = warning;"
                                "DROP SCHEMA public CASCADE; CREATE SCHEMA public;");
        rc = PQresultStatus(r) == PGRES_COMMAND_OK ? 0 : -1;
        if (rc)
            fprintf(stderr, "test store reset: %s", PQresultErrorMessage(r));
        PQclear(r);
    } else {
        fprintf(stderr, "test store: %s", PQerrorMessage(c));
    }
    PQfinish(c);
    return rc;
}

#endif
