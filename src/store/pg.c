/*
 * PostgreSQL backend (store.backend = postgres, store.url = postgres://…):
 * the connection, versioned schema migrations, tenants, and the records
 * concern (the pipeline's group commit). See pg_int.h for the conventions
 * the other files follow.
 *
 * Group commit: one transaction per batch, the measurements inserted by
 * one statement over arrays (INSERT … SELECT FROM unnest($1::text[], …)
 * ON CONFLICT DO NOTHING RETURNING), so a batch of hundreds is one round
 * trip; the stream's advisory lock is taken first so that, across nodes,
 * sequence numbers are committed in order. The server's COMMIT returns
 * after its WAL flush (synchronous_commit must stay on: the backend
 * refuses to run otherwise), so an `ok` to a device still means durable.
 *
 * A lost connection fails the call in hand with FM_EUNAVAIL (the pipeline
 * answers `unavailable`, devices retry, nothing is acknowledged) and the
 * next call reconnects.
 */
#include "store/pg_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- schema --------------------------------------------------------------------- */

/* The schema as of SQLite's eighth step, in one PostgreSQL step: the
 * PostgreSQL backend started there. Later steps are added to both. */
static const char *const pg_schema_1 =
    "CREATE TABLE tenants (name TEXT PRIMARY KEY, created_ms BIGINT NOT NULL);"
    "CREATE TABLE users ("
    "  id BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  username TEXT NOT NULL, password_hash TEXT NOT NULL, roles TEXT NOT NULL,"
    "  status INTEGER NOT NULL DEFAULT 0, created_ms BIGINT NOT NULL,"
    "  epoch BIGINT NOT NULL DEFAULT 0, UNIQUE (tenant, username));"
    "CREATE TABLE devices ("
    "  id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  status INTEGER NOT NULL DEFAULT 0, cert_serial TEXT NOT NULL DEFAULT '',"
    "  created_ms BIGINT NOT NULL, device_group TEXT NOT NULL DEFAULT '',"
    "  serial_number TEXT NOT NULL DEFAULT '', model TEXT NOT NULL DEFAULT '',"
    "  firmware TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX devices_by_tenant ON devices(tenant, id);"
    "CREATE TABLE measurements ("
    "  seq BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, received_ms BIGINT NOT NULL, taken_ms BIGINT NOT NULL,"
    "  payload TEXT NOT NULL, result TEXT NOT NULL, model TEXT NOT NULL, shadow TEXT,"
    "  UNIQUE (device_id, measurement_id));"
    "CREATE INDEX measurements_by_device ON measurements(device_id, received_ms);"
    "CREATE TABLE quarantine ("
    "  seq BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  received_ms BIGINT NOT NULL, payload BYTEA NOT NULL, error_code TEXT NOT NULL,"
    "  error_message TEXT NOT NULL);"
    "CREATE TABLE lake_cursors ("
    "  node TEXT NOT NULL, stream INTEGER NOT NULL, last_seq BIGINT NOT NULL,"
    "  pending_key TEXT NOT NULL DEFAULT '', pending_spool TEXT NOT NULL DEFAULT '',"
    "  PRIMARY KEY (node, stream));"
    "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), probed_ms BIGINT NOT NULL);"
    "CREATE TABLE templates ("
    "  name TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  device_group TEXT NOT NULL, device_prefix TEXT NOT NULL, cert_days INTEGER NOT NULL,"
    "  allow_reprovision INTEGER NOT NULL, rate_per_min INTEGER NOT NULL,"
    "  status INTEGER NOT NULL, has_allowlist INTEGER NOT NULL, hook TEXT NOT NULL,"
    "  created_ms BIGINT NOT NULL);"
    "CREATE TABLE template_serials ("
    "  template TEXT NOT NULL REFERENCES templates(name), serial TEXT NOT NULL,"
    "  PRIMARY KEY (template, serial));"
    "CREATE TABLE claim_certs ("
    "  serial TEXT PRIMARY KEY, template TEXT NOT NULL REFERENCES templates(name),"
    "  status INTEGER NOT NULL, created_ms BIGINT NOT NULL);"
    "CREATE TABLE certs ("
    "  serial TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id),"
    "  status INTEGER NOT NULL, pem TEXT NOT NULL, not_after_ms BIGINT NOT NULL,"
    "  grace_until_ms BIGINT NOT NULL DEFAULT 0, revoked_ms BIGINT NOT NULL DEFAULT 0,"
    "  created_ms BIGINT NOT NULL, key_id TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX certs_by_device ON certs(device_id, status);"
    "CREATE INDEX certs_by_key ON certs(key_id) WHERE key_id <> '';"
    "CREATE TABLE provisioned ("
    "  serial_number TEXT PRIMARY KEY, template TEXT NOT NULL, device_id TEXT NOT NULL,"
    "  at_ms BIGINT NOT NULL);"
    "CREATE TABLE shadows ("
    "  device_id TEXT PRIMARY KEY REFERENCES devices(id), desired TEXT NOT NULL,"
    "  reported TEXT NOT NULL, version BIGINT NOT NULL, updated_ms BIGINT NOT NULL);"
    "CREATE TABLE registry_events ("
    "  seq BIGSERIAL PRIMARY KEY, kind INTEGER NOT NULL, subject TEXT NOT NULL,"
    "  at_ms BIGINT NOT NULL);"
    "CREATE TABLE auth_throttle ("
    "  key TEXT PRIMARY KEY, failures BIGINT NOT NULL, last_ms BIGINT NOT NULL,"
    "  locked_until_ms BIGINT NOT NULL);"
    "CREATE TABLE refresh_families ("
    "  id TEXT PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users(id),"
    "  created_ms BIGINT NOT NULL, revoked_ms BIGINT NOT NULL DEFAULT 0,"
    "  revoked_reason TEXT NOT NULL DEFAULT '', mfa INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX refresh_families_by_user ON refresh_families(user_id);"
    "CREATE TABLE refresh_tokens ("
    "  hash BYTEA PRIMARY KEY, family TEXT NOT NULL REFERENCES refresh_families(id),"
    "  created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL,"
    "  used_ms BIGINT NOT NULL DEFAULT 0);"
    "CREATE INDEX refresh_tokens_by_family ON refresh_tokens(family);"
    "CREATE TABLE device_presence ("
    "  device_id TEXT PRIMARY KEY REFERENCES devices(id), online INTEGER NOT NULL,"
    "  changed_ms BIGINT NOT NULL);"
    "CREATE TABLE label_log ("
    "  seq BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, outputs TEXT NOT NULL, source TEXT NOT NULL,"
    "  labelled_by TEXT NOT NULL, at_ms BIGINT NOT NULL);"
    "CREATE TABLE labels ("
    "  seq BIGINT PRIMARY KEY, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, outputs TEXT NOT NULL, source TEXT NOT NULL,"
    "  labelled_by TEXT NOT NULL, at_ms BIGINT NOT NULL,"
    "  UNIQUE (device_id, measurement_id));"
    "CREATE TABLE audit ("
    "  seq BIGSERIAL PRIMARY KEY, at_ms BIGINT NOT NULL, tenant TEXT NOT NULL,"
    "  actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
    "  outcome TEXT NOT NULL, client TEXT NOT NULL, details TEXT NOT NULL);"
    "CREATE INDEX audit_by_tenant ON audit(tenant, seq);"
    "CREATE TABLE user_totp ("
    "  user_id BIGINT PRIMARY KEY REFERENCES users(id), secret BYTEA NOT NULL,"
    "  confirmed INTEGER NOT NULL, last_step BIGINT NOT NULL, created_ms BIGINT NOT NULL);"
    "CREATE TABLE model_versions ("
    "  name TEXT NOT NULL, version TEXT NOT NULL, owner_tenant TEXT NOT NULL,"
    "  status INTEGER NOT NULL, format TEXT NOT NULL, sha256 TEXT NOT NULL,"
    "  size BIGINT NOT NULL, created_by TEXT NOT NULL, created_ms BIGINT NOT NULL,"
    "  decided_by TEXT NOT NULL DEFAULT '', decided_ms BIGINT NOT NULL DEFAULT 0,"
    "  note TEXT NOT NULL DEFAULT '', manifest TEXT NOT NULL, file BYTEA NOT NULL,"
    "  seq BIGSERIAL, PRIMARY KEY (name, version));"
    "CREATE TABLE model_aliases ("
    "  tenant TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, version TEXT NOT NULL,"
    "  share_pct INTEGER NOT NULL, updated_by TEXT NOT NULL, updated_ms BIGINT NOT NULL,"
    "  PRIMARY KEY (tenant, name, alias));"
    "CREATE TABLE model_alias_log ("
    "  seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,"
    "  alias TEXT NOT NULL, version TEXT NOT NULL, share_pct INTEGER NOT NULL,"
    "  updated_by TEXT NOT NULL, updated_ms BIGINT NOT NULL);"
    "CREATE TABLE drift_counts ("
    "  tenant TEXT NOT NULL, day BIGINT NOT NULL, model TEXT NOT NULL, n BIGINT NOT NULL,"
    "  counts TEXT NOT NULL, PRIMARY KEY (tenant, day, model));"
    "CREATE TABLE training_jobs ("
    "  id BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, node TEXT NOT NULL,"
    "  status TEXT NOT NULL, phase TEXT NOT NULL, percent INTEGER NOT NULL,"
    "  version TEXT NOT NULL, from_ms BIGINT NOT NULL, to_ms BIGINT NOT NULL,"
    "  requested_by TEXT NOT NULL, error TEXT NOT NULL, rows BIGINT NOT NULL,"
    "  created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL);";

/* SQLite's ninth step: which node's broker reported a device's presence,
 * and the leases of cluster-wide jobs. */
static const char *const pg_schema_2 =
    "ALTER TABLE device_presence ADD COLUMN node TEXT NOT NULL DEFAULT '';"
    "CREATE TABLE leases ("
    "  name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms BIGINT NOT NULL,"
    "  since_ms BIGINT NOT NULL);";

/* SQLite's tenth step: every presence change in commit order (rev), for
 * the live fleet view and rules. Written under PG_LOCK_PRESENCE, so revs
 * become visible in the order they were given. */
static const char *const pg_schema_3 =
    "CREATE TABLE presence_log ("
    "  rev BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL,"
    "  online INTEGER NOT NULL, changed_ms BIGINT NOT NULL);"
    "CREATE INDEX label_log_by_measurement ON label_log(device_id, measurement_id, seq);";

/* SQLite's eleventh step: rules and their invocation log. */
static const char *const pg_schema_4 =
    "CREATE TABLE rules ("
    "  tenant TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,"
    "  position BIGINT NOT NULL, updated_by TEXT NOT NULL, updated_ms BIGINT NOT NULL,"
    "  PRIMARY KEY (tenant, name));"
    "CREATE TABLE rule_log ("
    "  seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, rule TEXT NOT NULL,"
    "  event_id TEXT NOT NULL, target TEXT NOT NULL, outcome TEXT NOT NULL,"
    "  attempt INTEGER NOT NULL, duration_us BIGINT NOT NULL, error TEXT NOT NULL,"
    "  at_ms BIGINT NOT NULL);"
    "CREATE INDEX rule_log_by_rule ON rule_log(tenant, rule, seq);";

/* SQLite's twelfth step: the lake object log. Only the holder of the lake
 * export lease writes it, one settle at a time, so seq order is commit
 * order. */
static const char *const pg_schema_5 =
    "CREATE TABLE lake_object_log ("
    "  seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, area TEXT NOT NULL,"
    "  key TEXT NOT NULL, rows BIGINT NOT NULL, at_ms BIGINT NOT NULL);";

/* Migrations in order; pg_steps[i] brings a database to version i + 1. */
static const char *const *const pg_steps[] = {&pg_schema_1, &pg_schema_2, &pg_schema_3,
                                              &pg_schema_4, &pg_schema_5};
#define PG_SCHEMA_VERSION ((int)(sizeof pg_steps / sizeof pg_steps[0]))

/* ---- connection and statements -------------------------------------------------- */

static void forget_prepared(pg_store *s)
{
    for (int i = 0; i < s->nprepared; i++)
        fm_free(s->prepared[i]);
    s->nprepared = 0;
}

/* The server's notices (e.g. "relation already exists, skipping") are
 * routine: they go to the debug log, never to stderr. */
static void on_notice(void *ud, const char *message)
{
    (void)ud;
    size_t n = strlen(message);
    if (n && message[n - 1] == '\n')
        n--;
    fm_logf(FM_LOG_DEBUG, "store", "postgres: %.*s", (int)n, message);
}

/* Reconnects a broken connection. 0 or FM_EUNAVAIL. */
static int ensure_conn(pg_store *s, fm_errbuf *err)
{
    if (s->conn && PQstatus(s->conn) == CONNECTION_OK)
        return 0;
    forget_prepared(s);
    s->in_tx = false;
    if (s->conn) {
        PQreset(s->conn);
    } else {
        /* A connect timeout unless the URL sets its own (later keywords
         * win, and the URL is expanded in place of dbname). */
        const char *const kw[] = {"connect_timeout", "application_name", "dbname", NULL};
        const char *const val[] = {"5", "fleetml", s->conninfo, NULL};
        s->conn = PQconnectdbParams(kw, val, 1);
    }
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK)
        return fm_errf(err, FM_EUNAVAIL, "postgres: cannot connect: %s",
                       s->conn ? PQerrorMessage(s->conn) : "out of memory");
    PQsetErrorVerbosity(s->conn, PQERRORS_TERSE);
    PQsetNoticeProcessor(s->conn, on_notice, NULL);
    return 0;
}

void pg__text(pg_args *a, const char *v)
{
    a->v[a->n] = v;
    a->len[a->n] = 0;
    a->fmt[a->n++] = 0;
}

void pg__i64(pg_args *a, int64_t v)
{
    snprintf(a->num[a->n], sizeof a->num[0], "%lld", (long long)v);
    pg__text(a, a->num[a->n]);
}

void pg__bin(pg_args *a, const void *p, size_t n)
{
    static const char empty[1];
    a->v[a->n] = p ? p : empty;
    a->len[a->n] = (int)n;
    a->fmt[a->n++] = 1;
}

/* Maps a failed result to an FM_E* code by SQLSTATE. */
static int map_error(pg_store *s, const PGresult *r)
{
    if (PQstatus(s->conn) != CONNECTION_OK)
        return FM_EUNAVAIL;
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    if (!state)
        return FM_EDB;
    if (strcmp(state, "23505") == 0)
        return FM_EEXIST;
    if (strcmp(state, "23503") == 0)
        return FM_ENOTFOUND;
    if (strcmp(state, "53100") == 0)
        return FM_ENOSPC;
    if (strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0)
        return FM_EUNAVAIL;
    return FM_EDB;
}

PGresult *pg__run(pg_store *s, const char *sql, const pg_args *a, const char *what, int *rc,
                  fm_errbuf *err)
{
    *rc = 0;
    if (!s->in_tx && (*rc = ensure_conn(s, err)) != 0)
        return NULL;
    int idx = -1;
    for (int i = 0; i < s->nprepared; i++)
        if (strcmp(s->prepared[i], sql) == 0) {
            idx = i;
            break;
        }
    char name[16];
    PGresult *r;
    if (idx < 0 && s->nprepared < PG_PREPARED_MAX) {
        snprintf(name, sizeof name, "s%d", s->nprepared);
        r = PQprepare(s->conn, name, sql, 0, NULL);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            *rc = map_error(s, r);
            fm_errf(err, *rc, "%s: %s", what, PQresultErrorMessage(r));
            PQclear(r);
            return NULL;
        }
        PQclear(r);
        s->prepared[s->nprepared] = fm_strdup(sql);
        if (s->prepared[s->nprepared])
            idx = s->nprepared++;
    }
    int n = a ? a->n : 0;
    const char *const *v = a ? a->v : NULL;
    const int *len = a ? a->len : NULL, *fmt = a ? a->fmt : NULL;
    if (idx >= 0) {
        snprintf(name, sizeof name, "s%d", idx);
        r = PQexecPrepared(s->conn, name, n, v, len, fmt, 0);
    } else {
        r = PQexecParams(s->conn, sql, n, NULL, v, len, fmt, 0);
    }
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return r;
    *rc = map_error(s, r);
    fm_errf(err, *rc, "%s: %s", what, r ? PQresultErrorMessage(r) : PQerrorMessage(s->conn));
    PQclear(r);
    return NULL;
}

int pg__cmd(pg_store *s, const char *sql, const pg_args *a, const char *what, long *affected,
            fm_errbuf *err)
{
    int rc;
    PGresult *r = pg__run(s, sql, a, what, &rc, err);
    if (!r)
        return rc;
    if (affected)
        *affected = strtol(PQcmdTuples(r), NULL, 10);
    PQclear(r);
    return 0;
}

const char *pg__str(const PGresult *res, int r, int c)
{
    return PQgetisnull(res, r, c) ? "" : PQgetvalue(res, r, c);
}

int64_t pg__int(const PGresult *res, int r, int c)
{
    return PQgetisnull(res, r, c) ? 0 : strtoll(PQgetvalue(res, r, c), NULL, 10);
}

void pg__copy(char *dst, size_t n, const PGresult *res, int r, int c)
{
    snprintf(dst, n, "%s", pg__str(res, r, c));
}

bool pg__null(const PGresult *res, int r, int c) { return PQgetisnull(res, r, c) != 0; }

int pg__bytea(const PGresult *res, int r, int c, void **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    size_t n = 0;
    unsigned char *u = PQunescapeBytea((const unsigned char *)pg__str(res, r, c), &n);
    if (!u)
        return FM_ENOMEM;
    *out = fm_malloc(n + 1);
    if (!*out) {
        PQfreemem(u);
        return FM_ENOMEM;
    }
    memcpy(*out, u, n);
    ((char *)*out)[n] = '\0';
    *len = n;
    PQfreemem(u);
    return 0;
}

int pg__begin(pg_store *s, fm_errbuf *err)
{
    int rc = ensure_conn(s, err);
    if (rc)
        return rc;
    /* Pinned, whatever default_transaction_isolation says: every
     * read-decide-write takes an advisory lock first (PG_LOCK_*), which is
     * what makes it serial; a stricter level would only add retries. */
    if ((rc = pg__cmd(s, "BEGIN ISOLATION LEVEL READ COMMITTED", NULL, "begin", NULL, err)) == 0)
        s->in_tx = true;
    return rc;
}

int pg__commit(pg_store *s, fm_errbuf *err)
{
    int rc = pg__cmd(s, "COMMIT", NULL, "commit", NULL, err);
    s->in_tx = false;
    if (rc)
        pg__rollback(s);
    return rc;
}

void pg__rollback(pg_store *s)
{
    s->in_tx = false;
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK)
        return;
    PGresult *r = PQexec(s->conn, "ROLLBACK");
    PQclear(r);
}

int pg__lock(pg_store *s, int what, fm_errbuf *err)
{
    pg_args a = {0};
    pg__i64(&a, what);
    return pg__cmd(s, "SELECT pg_advisory_xact_lock(7301, $1::int)", &a, "lock", NULL, err);
}

int pg__lock_stream(pg_store *s, enum fm_lake_stream st, fm_errbuf *err)
{
    return pg__lock(s, 100 + (int)st, err);
}

/* ---- lifecycle and schema ---------------------------------------------------------- */

static int migrate_tx(pg_store *s, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_SCHEMA, err);
    if (!rc)
        rc = pg__cmd(s,
                     "CREATE TABLE IF NOT EXISTS schema_migrations ("
                     " version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                     NULL, "schema", NULL, err);
    PGresult *r = rc ? NULL
                     : pg__run(s, "SELECT COALESCE(max(version), 0) FROM schema_migrations",
                               NULL, "schema", &rc, err);
    if (!r)
        return rc;
    int have = (int)pg__int(r, 0, 0);
    PQclear(r);
    if (have > PG_SCHEMA_VERSION)
        return fm_errf(err, FM_EDB,
                       "postgres: the database is at schema version %d, newer than this "
                       "build (%d): upgrade fleetml",
                       have, PG_SCHEMA_VERSION);
    for (int v = have; v < PG_SCHEMA_VERSION && !rc; v++) {
        /* A multi-statement text goes through the simple protocol. */
        PGresult *x = PQexec(s->conn, *pg_steps[v]);
        if (PQresultStatus(x) != PGRES_COMMAND_OK) {
            rc = map_error(s, x);
            fm_errf(err, rc, "postgres: schema step %d: %s", v + 1, PQresultErrorMessage(x));
        }
        PQclear(x);
        pg_args a = {0};
        pg__i64(&a, v + 1);
        pg__i64(&a, fm_wall_ms());
        if (!rc)
            rc = pg__cmd(s, "INSERT INTO schema_migrations(version, applied_ms) VALUES($1, $2)",
                         &a, "schema", NULL, err);
    }
    return rc;
}

static int p_migrate(fm_store *base, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, migrate_tx(s, err));
}

/* The database's clock decides expiry, so nodes' clocks may disagree. */
#define PG_NOW_MS "(extract(epoch from clock_timestamp()) * 1000)::bigint"

static int p_lease(fm_store *base, const char *name, const char *holder, int64_t ttl_ms,
                   char *owner, size_t owner_len)
{
    pg_store *s = (pg_store *)base;
    if (!name || !*name || !holder || !*holder)
        return FM_EINVAL;
    pg_args a = {0};
    pg__text(&a, name);
    pg__text(&a, holder);
    int rc;
    if (ttl_ms <= 0) {
        rc = pg__cmd(s, "DELETE FROM leases WHERE name = $1 AND holder = $2", &a, "lease", NULL,
                     NULL);
        return rc == FM_EBUSY ? FM_EUNAVAIL : rc;
    }
    pg__i64(&a, ttl_ms);
    /* One statement: the upsert takes the row lock, so two nodes racing
     * for a free lease cannot both win; RETURNING is empty when another
     * holder's lease is still running. */
    PGresult *r = pg__run(s,
                          "INSERT INTO leases(name, holder, expires_ms, since_ms)"
                          " VALUES($1, $2, " PG_NOW_MS " + $3, " PG_NOW_MS ")"
                          " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                          " expires_ms = excluded.expires_ms, since_ms = CASE WHEN"
                          " leases.holder = excluded.holder THEN leases.since_ms"
                          " ELSE excluded.since_ms END"
                          " WHERE leases.holder = excluded.holder OR leases.expires_ms <= "
                          PG_NOW_MS " RETURNING holder",
                          &a, "lease", &rc, NULL);
    /* FM_EBUSY means "another node holds it": a busy server is not that. */
    if (!r)
        return rc == FM_EBUSY ? FM_EUNAVAIL : rc;
    int won = PQntuples(r) == 1;
    PQclear(r);
    if (won)
        return 0;
    if (owner && owner_len) {
        owner[0] = '\0';
        pg_args q = {0};
        pg__text(&q, name);
        r = pg__run(s, "SELECT holder FROM leases WHERE name = $1", &q, "lease", &rc, NULL);
        if (r) {
            if (PQntuples(r))
                pg__copy(owner, owner_len, r, 0, 0);
            PQclear(r);
        }
    }
    return FM_EBUSY;
}

static int claim_audit_tx(pg_store *s, const char *name, const char *holder, int64_t ttl_ms,
                          fm_audit *a, bool *other, fm_errbuf *err)
{
    pg_args q = {0};
    pg__text(&q, name);
    pg__text(&q, holder);
    pg__i64(&q, ttl_ms);
    int rc;
    PGresult *r = pg__run(s,
                          "INSERT INTO leases(name, holder, expires_ms, since_ms)"
                          " VALUES($1, $2, " PG_NOW_MS " + $3, " PG_NOW_MS ")"
                          " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                          " expires_ms = excluded.expires_ms, since_ms = excluded.since_ms"
                          " WHERE leases.expires_ms <= " PG_NOW_MS " RETURNING holder",
                          &q, "claim", &rc, err);
    if (!r)
        return rc;
    int won = PQntuples(r) == 1;
    PQclear(r);
    if (!won) {
        *other = true;
        return FM_EBUSY;
    }
    return pg__audit_tx(s, a, a->details_json ? a->details_json : "{}", err);
}

static int claim_audit_in_tx(pg_store *s, const char *name, const char *holder, int64_t ttl_ms,
                             fm_audit *a, bool *other, fm_errbuf *err)
{
    PG_TX(s, err, claim_audit_tx(s, name, holder, ttl_ms, a, other, err));
}

static int p_claim_audit(fm_store *base, const char *name, const char *holder, int64_t ttl_ms,
                         fm_audit *a, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    if (!name || !*name || !holder || !*holder || ttl_ms <= 0)
        return fm_errf(err, FM_EINVAL, "a claim needs a name, a holder and a duration");
    bool other = false;
    int rc = claim_audit_in_tx(s, name, holder, ttl_ms, a, &other, err);
    /* FM_EBUSY means "claimed already": a busy server is not that. */
    return rc == FM_EBUSY && !other ? FM_EUNAVAIL : rc;
}

static void p_close(fm_store *base)
{
    pg_store *s = (pg_store *)base;
    forget_prepared(s);
    if (s->conn)
        PQfinish(s->conn);
    fm_free(s->conninfo);
    fm_free(s);
}

static int p_tenant_ensure(fm_store *base, const char *name, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, name);
    pg__i64(&a, fm_wall_ms());
    return pg__cmd((pg_store *)base,
                   "INSERT INTO tenants(name, created_ms) VALUES($1, $2) ON CONFLICT DO NOTHING",
                   &a, "tenant", NULL, err);
}

int pg__tenant_exists(fm_store *base, const char *name)
{
    pg_args a = {0};
    pg__text(&a, name);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT 1 FROM tenants WHERE name = $1", &a,
                          "tenant", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) > 0 ? 1 : 0;
    PQclear(r);
    return rc;
}

int pg__event(pg_store *s, int kind, const char *subject, fm_errbuf *err)
{
    pg_args a = {0};
    pg__i64(&a, kind);
    pg__text(&a, subject);
    pg__i64(&a, fm_wall_ms());
    return pg__cmd(s, "INSERT INTO registry_events(kind, subject, at_ms) VALUES($1, $2, $3)", &a,
                   "event", NULL, err);
}

void pg__read_device(const PGresult *res, int r, fm_device *out)
{
    memset(out, 0, sizeof *out);
    pg__copy(out->id, sizeof out->id, res, r, 0);
    pg__copy(out->tenant, sizeof out->tenant, res, r, 1);
    out->status = (int)pg__int(res, r, 2);
    pg__copy(out->cert_serial, sizeof out->cert_serial, res, r, 3);
    out->created_ms = pg__int(res, r, 4);
    pg__copy(out->device_group, sizeof out->device_group, res, r, 5);
    pg__copy(out->serial_number, sizeof out->serial_number, res, r, 6);
    pg__copy(out->model, sizeof out->model, res, r, 7);
    pg__copy(out->firmware, sizeof out->firmware, res, r, 8);
}

/* ---- records ----------------------------------------------------------------------- */

static int p_result_lookup(fm_store *base, const char *dev, const char *mid, char **result)
{
    pg_args a = {0};
    pg__text(&a, dev);
    pg__text(&a, mid);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT result FROM measurements WHERE device_id = $1 AND "
                          "measurement_id = $2",
                          &a, "lookup", &rc, NULL);
    if (!r)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return FM_ENOTFOUND;
    }
    *result = fm_strdup(pg__str(r, 0, 0));
    PQclear(r);
    return *result ? 0 : FM_ENOMEM;
}

/* PostgreSQL array literals of strings (NULL elements for NULL), built in
 * a string buffer: {"a","b\"c",NULL}. */
static void arr_elem(fm_strbuf *b, const char *s, size_t len, bool first)
{
    fm_strbuf_add(b, first ? "{" : ",", 1);
    if (!s) {
        fm_strbuf_add(b, "NULL", 4);
        return;
    }
    fm_strbuf_add(b, "\"", 1);
    for (size_t i = 0; i < len;) {
        /* Runs without " or \ go in one copy. */
        size_t j = i;
        while (j < len && s[j] != '"' && s[j] != '\\')
            j++;
        fm_strbuf_add(b, s + i, j - i);
        if (j < len)
            fm_strbuf_add(b, s[j] == '"' ? "\\\"" : "\\\\", 2);
        i = j < len ? j + 1 : j;
    }
    fm_strbuf_add(b, "\"", 1);
}

static int insert_measurements(pg_store *s, fm_record *recs, size_t n, fm_errbuf *err)
{
    enum { COLS = 9 };
    fm_strbuf col[COLS] = {{0}};
    char num[2][24];
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        fm_record *x = &recs[i];
        snprintf(num[0], sizeof num[0], "%lld", (long long)x->received_ms);
        snprintf(num[1], sizeof num[1], "%lld", (long long)x->taken_ms);
        const char *v[COLS] = {x->device_id, x->tenant, x->measurement_id, num[0], num[1],
                               x->payload, x->result_json, x->model, x->shadow_json};
        size_t l[COLS];
        for (int c = 0; c < COLS; c++)
            l[c] = v[c] ? (c == 5 ? x->payload_len : strlen(v[c])) : 0;
        for (int c = 0; c < COLS; c++)
            arr_elem(&col[c], v[c], l[c], i == 0);
    }
    for (int c = 0; c < COLS; c++) {
        fm_strbuf_add(&col[c], "}", 1);
        rc |= col[c].failed;
    }
    if (rc) {
        for (int c = 0; c < COLS; c++)
            fm_free(col[c].p);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    pg_args a = {0};
    for (int c = 0; c < COLS; c++)
        pg__text(&a, col[c].p);
    PGresult *r = pg__run(
        s,
        "INSERT INTO measurements(device_id, tenant, measurement_id, received_ms, taken_ms,"
        " payload, result, model, shadow)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],"
        " $6::text[], $7::text[], $8::text[], $9::text[])"
        " ON CONFLICT (device_id, measurement_id) DO NOTHING"
        " RETURNING device_id, measurement_id, seq",
        &a, "commit", &rc, err);
    for (int c = 0; c < COLS; c++)
        fm_free(col[c].p);
    if (!r)
        return rc;
    /* Rows not returned were there already (or twice in this batch: the
     * first one is stored, the second is the duplicate). */
    for (size_t i = 0; i < n; i++) {
        recs[i].existed = 1;
        recs[i].seq = 0;
    }
    int rows = PQntuples(r);
    for (int k = 0; k < rows; k++) {
        const char *dev = pg__str(r, k, 0), *mid = pg__str(r, k, 1);
        for (size_t i = 0; i < n; i++)
            if (recs[i].existed && recs[i].seq == 0 && strcmp(recs[i].device_id, dev) == 0 &&
                strcmp(recs[i].measurement_id, mid) == 0) {
                recs[i].existed = 0;
                recs[i].seq = pg__int(r, k, 2);
                break;
            }
    }
    PQclear(r);
    return 0;
}

static int insert_quarantine(pg_store *s, fm_quarantine *q, size_t nq, fm_errbuf *err)
{
    int rc = 0;
    for (size_t i = 0; i < nq && !rc; i++) {
        pg_args a = {0};
        pg__text(&a, q[i].device_id);
        pg__text(&a, q[i].tenant);
        pg__i64(&a, q[i].received_ms);
        pg__bin(&a, q[i].payload, q[i].payload_len);
        pg__text(&a, q[i].error_code);
        pg__text(&a, q[i].error_message);
        PGresult *r = pg__run(s,
                              "INSERT INTO quarantine(device_id, tenant, received_ms, payload,"
                              " error_code, error_message) VALUES($1, $2, $3, $4, $5, $6)"
                              " RETURNING seq",
                              &a, "quarantine", &rc, err);
        if (r) {
            q[i].seq = pg__int(r, 0, 0);
            PQclear(r);
        }
    }
    return rc;
}

static int commit_tx(pg_store *s, fm_record *recs, size_t n, fm_quarantine *q, size_t nq,
                     fm_errbuf *err)
{
    int rc = 0;
    if (n && !(rc = pg__lock_stream(s, FM_STREAM_RAW, err)))
        rc = insert_measurements(s, recs, n, err);
    if (!rc && nq && !(rc = pg__lock_stream(s, FM_STREAM_QUARANTINE, err)))
        rc = insert_quarantine(s, q, nq, err);
    return rc;
}

static int p_commit(fm_store *base, fm_record *recs, size_t n, fm_quarantine *q, size_t nq,
                    fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    int rc = pg__begin(s, err);
    if (!rc) {
        rc = commit_tx(s, recs, n, q, nq, err);
        if (!rc)
            rc = pg__commit(s, err);
        else
            pg__rollback(s);
    }
    if (rc) /* nothing is stored: say so to the caller's records too */
        for (size_t i = 0; i < n; i++) {
            recs[i].seq = 0;
            recs[i].existed = 0;
        }
    return rc;
}

static int p_count_measurements(fm_store *base, const char *device_id, long *out)
{
    pg_args a = {0};
    pg__text(&a, device_id);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT count(*) FROM measurements WHERE device_id = $1", &a, "count",
                          &rc, NULL);
    if (!r)
        return rc;
    *out = (long)pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

static int p_probe_write(fm_store *base, fm_errbuf *err)
{
    pg_args a = {0};
    pg__i64(&a, fm_wall_ms());
    return pg__cmd((pg_store *)base,
                   "INSERT INTO health(id, probed_ms) VALUES(1, $1)"
                   " ON CONFLICT (id) DO UPDATE SET probed_ms = excluded.probed_ms",
                   &a, "probe", NULL, err);
}

/* The server checkpoints by itself; nothing to keep off the hot path. */
static int p_hot_path(fm_store *base)
{
    (void)base;
    return 0;
}

static int p_idle(fm_store *base)
{
    (void)base;
    return 0;
}

static const fm_store_vtable pg_vt = {
    .name = "postgres",
    .migrate = p_migrate,
    .close = p_close,
    .tenant_ensure = p_tenant_ensure,
    .tenant_exists = pg__tenant_exists,
    .lease = p_lease,
    .claim_audit = p_claim_audit,
};

static const fm_store_records_vt pg_records_vt = {
    .commit = p_commit,
    .result_lookup = p_result_lookup,
    .count_measurements = p_count_measurements,
    .probe_write = p_probe_write,
    .hot_path = p_hot_path,
    .idle = p_idle,
};

int store__pg_open(const fm_config *cfg, fm_store **out, fm_errbuf *err)
{
    *out = NULL;
    if (strncmp(cfg->store_url, "postgres://", 11) != 0 &&
        strncmp(cfg->store_url, "postgresql://", 13) != 0)
        return fm_errf(err, FM_EINVAL,
                       "store.url: expected postgres://user@host:port/database (got '%.64s')",
                       cfg->store_url);
    pg_store *s = fm_calloc(1, sizeof *s);
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    s->base.vt = &pg_vt;
    s->base.records = &pg_records_vt;
    s->base.lake = &pg__lake_vt;
    s->base.registry = &pg__registry_vt;
    s->base.users = &pg__users_vt;
    s->base.api = &pg__api_vt;
    s->base.models = &pg__models_vt;
    s->base.rules = &pg__rules_vt;
    s->conninfo = fm_strdup(cfg->store_url);
    int rc = s->conninfo ? ensure_conn(s, err) : fm_errf(err, FM_ENOMEM, "out of memory");
    /* Durability is the server's: an acknowledgement must mean the WAL
     * reached disk there. */
    if (!rc) {
        const char *sc = PQparameterStatus(s->conn, "synchronous_commit");
        PGresult *r = sc ? NULL : PQexec(s->conn, "SHOW synchronous_commit");
        const char *v = sc ? sc : (PQresultStatus(r) == PGRES_TUPLES_OK ? PQgetvalue(r, 0, 0)
                                                                        : "off");
        if (strcmp(v, "off") == 0)
            rc = fm_errf(err, FM_EINVAL,
                         "postgres: synchronous_commit is off: an acknowledged measurement "
                         "could be lost; turn it on for fleetml's role or database");
        PQclear(r);
    }
    if (!rc)
        rc = p_migrate(&s->base, err);
    if (rc) {
        p_close(&s->base);
        return rc;
    }
    *out = &s->base;
    return 0;
}
