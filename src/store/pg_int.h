/*
 * Internals shared by the PostgreSQL backend's files (libpq). One file per
 * concern, like the SQLite backend: pg.c (lifecycle, schema, tenants,
 * records), pg_lake.c, pg_registry.c, pg_users.c, pg_api.c, pg_models.c.
 *
 * Conventions every file follows:
 *  - statements go through pg__run / pg__cmd with parameters ($1, $2…),
 *    never with values pasted into SQL text; pg__run prepares each distinct
 *    SQL text once per connection (the text is the cache key);
 *  - integers travel as decimal text, byte strings (bytea) in binary;
 *  - a transaction that relied on SQLite's single writer for atomicity
 *    (read, decide, write) takes pg__lock(s, PG_LOCK_<concern>) first: a
 *    transaction-scoped advisory lock, so the same read-decide-write stays
 *    atomic across every node sharing the database;
 *  - inserts into a lake stream take the stream's lock (pg__lock_stream)
 *    so sequence numbers become visible in commit order (the exporter's
 *    cursor must never skip a row committed late with a smaller seq);
 *  - error codes: unique violation → FM_EEXIST, foreign key → FM_ENOTFOUND,
 *    disk full → FM_ENOSPC, a lost connection → FM_EUNAVAIL (the next call
 *    reconnects), anything else → FM_EDB; err gets the server's message.
 */
#ifndef FLEETML_PG_INT_H
#define FLEETML_PG_INT_H

#include "store/store_internal.h"

#include <libpq-fe.h>
#include <stdbool.h>

#define PG_PREPARED_MAX 256

typedef struct pg_store {
    fm_store base;
    PGconn *conn;
    char *conninfo;
    /* SQL texts prepared on this connection; statement i is "s<i>". */
    char *prepared[PG_PREPARED_MAX];
    int nprepared;
    bool in_tx;
} pg_store;

/* Parameters of one statement. Text values are borrowed (NULL is SQL NULL);
 * integers are formatted into the struct; binary values are borrowed. */
#define PG_ARGS_MAX 24
typedef struct pg_args {
    int n;
    const char *v[PG_ARGS_MAX];
    int len[PG_ARGS_MAX];
    int fmt[PG_ARGS_MAX];
    char num[PG_ARGS_MAX][24];
} pg_args;

void pg__text(pg_args *a, const char *s);
void pg__i64(pg_args *a, int64_t v);
void pg__bin(pg_args *a, const void *p, size_t n);

/* Runs sql with a (may be NULL). Returns the result (PQclear it), whose
 * status is PGRES_TUPLES_OK or PGRES_COMMAND_OK, or NULL with *rc set to an
 * FM_E* code and err (may be NULL) to the server's message prefixed with
 * what. */
PGresult *pg__run(pg_store *s, const char *sql, const pg_args *a, const char *what, int *rc,
                  fm_errbuf *err);
/* pg__run for statements whose rows are not needed: 0 or the FM_E* code.
 * *affected (may be NULL) gets the number of rows changed. */
int pg__cmd(pg_store *s, const char *sql, const pg_args *a, const char *what, long *affected,
            fm_errbuf *err);

/* Column values of row r: text ("" for NULL), int64 (0 for NULL), a copy
 * into a fixed buffer (truncated, always terminated), bytea (binary result
 * columns only: pg__run returns text; use pg__bytea to decode). */
const char *pg__str(const PGresult *res, int r, int c);
int64_t pg__int(const PGresult *res, int r, int c);
void pg__copy(char *dst, size_t n, const PGresult *res, int r, int c);
bool pg__null(const PGresult *res, int r, int c);
/* Decodes a bytea column (text form, hex) into a fm_malloc'd buffer. 0,
 * FM_ENOMEM or FM_EDB. */
int pg__bytea(const PGresult *res, int r, int c, void **out, size_t *len);

/* Transactions. begin/commit return 0 or an FM_E* code with err set;
 * rollback never fails (it drops the connection if it must). */
int pg__begin(pg_store *s, fm_errbuf *err);
int pg__commit(pg_store *s, fm_errbuf *err);
void pg__rollback(pg_store *s);

/* Advisory locks held until the end of the current transaction. */
enum {
    PG_LOCK_REGISTRY = 1, /* provisioning, rotation, revocation, shadows */
    PG_LOCK_USERS = 2,    /* users, sessions, throttling, second factors */
    PG_LOCK_API = 3,      /* labels (the current one and its log) */
    PG_LOCK_MODELS = 4,   /* registry of models, aliases, jobs */
    PG_LOCK_SCHEMA = 5,   /* migrations */
    PG_LOCK_PRESENCE = 6, /* presence revs (commit order = rev order) */
};
int pg__lock(pg_store *s, int what, fm_errbuf *err);
int pg__lock_stream(pg_store *s, enum fm_lake_stream st, fm_errbuf *err);

/* Runs body (an expression returning 0 or an FM_E* code) inside BEGIN /
 * COMMIT; rolls back on failure. */
#define PG_TX(s, err, body)                                                                     \
    do {                                                                                        \
        int tx_rc_ = pg__begin((s), (err));                                                     \
        if (tx_rc_)                                                                             \
            return tx_rc_;                                                                      \
        tx_rc_ = (body);                                                                        \
        if (tx_rc_ == 0)                                                                        \
            return pg__commit((s), (err));                                                      \
        pg__rollback(s);                                                                        \
        return tx_rc_;                                                                          \
    } while (0)

/* Appends an audit entry inside the current transaction (pg_api.c):
 * details is the JSON object text; a->at_ms must be set. */
int pg__audit_tx(pg_store *s, fm_audit *a, const char *details, fm_errbuf *err);

/* Shared by several concerns (pg.c). */
int pg__tenant_exists(fm_store *s, const char *name);
/* Inserts a registry event (kind, subject) in the caller's transaction. */
int pg__event(pg_store *s, int kind, const char *subject, fm_errbuf *err);
/* Reads the device columns "id, tenant, status, cert_serial, created_ms,
 * device_group, serial_number, model, firmware" (PG_DEVICE_COLS) of row r. */
#define PG_DEVICE_COLS                                                                          \
    "id, tenant, status, cert_serial, created_ms, device_group, serial_number, model, firmware"
void pg__read_device(const PGresult *res, int r, fm_device *out);

/* The interfaces per concern, one file each. */
extern const fm_store_lake_vt pg__lake_vt;         /* pg_lake.c */
extern const fm_store_registry_vt pg__registry_vt; /* pg_registry.c */
extern const fm_store_users_vt pg__users_vt;       /* pg_users.c */
extern const fm_store_api_vt pg__api_vt;           /* pg_api.c */
extern const fm_store_models_vt pg__models_vt;     /* pg_models.c */
extern const fm_store_rules_vt pg__rules_vt;       /* pg_rules.c */

#endif
