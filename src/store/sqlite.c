/*
 * SQLite backend of the store.
 *
 * Durability: WAL journal with synchronous=FULL, so a COMMIT returns only
 * after the WAL has been fsynced; the pipeline publishes replies only after
 * that. Many measurements share one transaction (group commit), which is
 * what makes FULL affordable.
 *
 * Sequence numbers use AUTOINCREMENT so that a seq is never reused, even
 * after quarantine rows are pruned: the lake exporter relies on seqs only
 * growing.
 */
#include "store/sqlite_int.h"
#include "fleetml/fault.h"
#include <stdio.h>
#include <string.h>
#include <time.h>

static const char *schema_v1 =
    "CREATE TABLE IF NOT EXISTS tenants ("
    "  name TEXT PRIMARY KEY, created_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS users ("
    "  id INTEGER PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  username TEXT NOT NULL, password_hash TEXT NOT NULL, roles TEXT NOT NULL,"
    "  status INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL,"
    "  UNIQUE (tenant, username));"
    "CREATE TABLE IF NOT EXISTS devices ("
    "  id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  status INTEGER NOT NULL DEFAULT 0, cert_serial TEXT NOT NULL DEFAULT '',"
    "  created_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS measurements ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, received_ms INTEGER NOT NULL, taken_ms INTEGER NOT NULL,"
    "  payload TEXT NOT NULL, result TEXT NOT NULL, model TEXT NOT NULL,"
    "  UNIQUE (device_id, measurement_id));"
    "CREATE INDEX IF NOT EXISTS measurements_by_device ON measurements(device_id, received_ms);"
    "CREATE TABLE IF NOT EXISTS quarantine ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  received_ms INTEGER NOT NULL, payload BLOB NOT NULL, error_code TEXT NOT NULL,"
    "  error_message TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS lake_cursors ("
    "  node TEXT NOT NULL, stream INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    "  pending_key TEXT NOT NULL DEFAULT '', pending_spool TEXT NOT NULL DEFAULT '',"
    "  PRIMARY KEY (node, stream));";

static const char *schema_v2 =
    "CREATE TABLE IF NOT EXISTS health ("
    "  id INTEGER PRIMARY KEY CHECK (id = 1), probed_ms INTEGER NOT NULL);";

/* The registry: provisioning templates, certificates, shadows, and the
 * event log every node follows to keep the broker's view current. */
static const char *schema_v3 =
    "ALTER TABLE devices ADD COLUMN device_group TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE devices ADD COLUMN serial_number TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE devices ADD COLUMN model TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE devices ADD COLUMN firmware TEXT NOT NULL DEFAULT '';"
    "CREATE TABLE templates ("
    "  name TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),"
    "  device_group TEXT NOT NULL, device_prefix TEXT NOT NULL, cert_days INTEGER NOT NULL,"
    "  allow_reprovision INTEGER NOT NULL, rate_per_min INTEGER NOT NULL,"
    "  status INTEGER NOT NULL, has_allowlist INTEGER NOT NULL, hook TEXT NOT NULL,"
    "  created_ms INTEGER NOT NULL);"
    "CREATE TABLE template_serials ("
    "  template TEXT NOT NULL REFERENCES templates(name), serial TEXT NOT NULL,"
    "  PRIMARY KEY (template, serial));"
    "CREATE TABLE claim_certs ("
    "  serial TEXT PRIMARY KEY, template TEXT NOT NULL REFERENCES templates(name),"
    "  status INTEGER NOT NULL, created_ms INTEGER NOT NULL);"
    "CREATE TABLE certs ("
    "  serial TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id),"
    "  status INTEGER NOT NULL, pem TEXT NOT NULL, not_after_ms INTEGER NOT NULL,"
    "  grace_until_ms INTEGER NOT NULL DEFAULT 0, revoked_ms INTEGER NOT NULL DEFAULT 0,"
    "  created_ms INTEGER NOT NULL);"
    "CREATE INDEX certs_by_device ON certs(device_id, status);"
    "CREATE TABLE provisioned ("
    "  serial_number TEXT PRIMARY KEY, template TEXT NOT NULL, device_id TEXT NOT NULL,"
    "  at_ms INTEGER NOT NULL);"
    "CREATE TABLE shadows ("
    "  device_id TEXT PRIMARY KEY REFERENCES devices(id), desired TEXT NOT NULL,"
    "  reported TEXT NOT NULL, version INTEGER NOT NULL, updated_ms INTEGER NOT NULL);"
    "CREATE TABLE registry_events ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, subject TEXT NOT NULL,"
    "  at_ms INTEGER NOT NULL);"
    /* Devices registered before certificates were tracked keep working:
     * their recorded serial becomes an active certificate. */
    "INSERT OR IGNORE INTO certs(serial, device_id, status, pem, not_after_ms, created_ms)"
    "  SELECT cert_serial, id, 0, '', 0, created_ms FROM devices WHERE cert_serial != '';";

/* Users and sessions (sqlite_users.c): the revocation epoch every access
 * token must carry, persistent sign-in throttling, and refresh tokens kept
 * only as SHA-256 hashes, grouped in families (one per sign-in). */
static const char *schema_users =
    "ALTER TABLE users ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;"
    "CREATE TABLE auth_throttle ("
    "  key TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_ms INTEGER NOT NULL,"
    "  locked_until_ms INTEGER NOT NULL);"
    "CREATE TABLE refresh_families ("
    "  id TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),"
    "  created_ms INTEGER NOT NULL, revoked_ms INTEGER NOT NULL DEFAULT 0,"
    "  revoked_reason TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX refresh_families_by_user ON refresh_families(user_id);"
    "CREATE TABLE refresh_tokens ("
    "  hash BLOB PRIMARY KEY, family TEXT NOT NULL REFERENCES refresh_families(id),"
    "  created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,"
    "  used_ms INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX refresh_tokens_by_family ON refresh_tokens(family);";

/* Data behind the HTTP API (sqlite_api.c): device presence as the broker
 * reports it, every label (ground truth) written for a measurement
 * (label_log) and the current one (labels, keyed by its log seq), and the
 * audit log. label_log and audit are lake streams, hence AUTOINCREMENT:
 * their seqs only grow (see s_max_seq). */
static const char *schema_api =
    "CREATE TABLE device_presence ("
    "  device_id TEXT PRIMARY KEY REFERENCES devices(id), online INTEGER NOT NULL,"
    "  changed_ms INTEGER NOT NULL);"
    "CREATE TABLE label_log ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, outputs TEXT NOT NULL, source TEXT NOT NULL,"
    "  labelled_by TEXT NOT NULL, at_ms INTEGER NOT NULL);"
    "CREATE TABLE labels ("
    "  seq INTEGER PRIMARY KEY, device_id TEXT NOT NULL, tenant TEXT NOT NULL,"
    "  measurement_id TEXT NOT NULL, outputs TEXT NOT NULL, source TEXT NOT NULL,"
    "  labelled_by TEXT NOT NULL, at_ms INTEGER NOT NULL,"
    "  UNIQUE (device_id, measurement_id));"
    "CREATE TABLE audit ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, tenant TEXT NOT NULL,"
    "  actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
    "  outcome TEXT NOT NULL, client TEXT NOT NULL, details TEXT NOT NULL);"
    "CREATE INDEX audit_by_tenant ON audit(tenant, seq);"
    /* Device pages of one tenant walk this instead of the whole table. */
    "CREATE INDEX devices_by_tenant ON devices(tenant, id);"
    /* Second factor: one TOTP secret per user, with the replay guard. */
    "ALTER TABLE refresh_families ADD COLUMN mfa INTEGER NOT NULL DEFAULT 0;"
    "CREATE TABLE user_totp ("
    "  user_id INTEGER PRIMARY KEY REFERENCES users(id), secret BLOB NOT NULL,"
    "  confirmed INTEGER NOT NULL, last_step INTEGER NOT NULL, created_ms INTEGER NOT NULL);";

/* Key identities (SHA-256 of the SubjectPublicKeyInfo) of certificates,
 * so one key cannot be bound to two devices. Certificates issued before
 * this step have none recorded and are not compared. */
static const char *schema_keys =
    "ALTER TABLE certs ADD COLUMN key_id TEXT NOT NULL DEFAULT '';"
    "CREATE INDEX certs_by_key ON certs(key_id) WHERE key_id != '';";

/* The model registry (sqlite_models.c): versions with their manifest and
 * model file, approval, and deployment aliases with their history. */
static const char *schema_models =
    "CREATE TABLE model_versions ("
    "  name TEXT NOT NULL, version TEXT NOT NULL, owner_tenant TEXT NOT NULL,"
    "  status INTEGER NOT NULL, format TEXT NOT NULL, sha256 TEXT NOT NULL,"
    "  size INTEGER NOT NULL, created_by TEXT NOT NULL, created_ms INTEGER NOT NULL,"
    "  decided_by TEXT NOT NULL DEFAULT '', decided_ms INTEGER NOT NULL DEFAULT 0,"
    "  note TEXT NOT NULL DEFAULT '', manifest TEXT NOT NULL, file BLOB NOT NULL,"
    "  PRIMARY KEY (name, version));"
    "CREATE TABLE model_aliases ("
    "  tenant TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, version TEXT NOT NULL,"
    "  share_pct INTEGER NOT NULL, updated_by TEXT NOT NULL, updated_ms INTEGER NOT NULL,"
    "  PRIMARY KEY (tenant, name, alias));"
    "CREATE TABLE model_alias_log ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, name TEXT NOT NULL,"
    "  alias TEXT NOT NULL, version TEXT NOT NULL, share_pct INTEGER NOT NULL,"
    "  updated_by TEXT NOT NULL, updated_ms INTEGER NOT NULL);";

/* What a shadow version answered for a measurement (never sent), and live
 * feature counts for drift. */
static const char *schema_shadow =
    "ALTER TABLE measurements ADD COLUMN shadow TEXT;"
    "CREATE TABLE drift_counts ("
    "  tenant TEXT NOT NULL, day INTEGER NOT NULL, model TEXT NOT NULL, n INTEGER NOT NULL,"
    "  counts TEXT NOT NULL, PRIMARY KEY (tenant, day, model));"
    "CREATE TABLE training_jobs ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, node TEXT NOT NULL,"
    "  status TEXT NOT NULL, phase TEXT NOT NULL, percent INTEGER NOT NULL,"
    "  version TEXT NOT NULL, from_ms INTEGER NOT NULL, to_ms INTEGER NOT NULL,"
    "  requested_by TEXT NOT NULL, error TEXT NOT NULL, rows INTEGER NOT NULL,"
    "  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);";

/* Several nodes on one database: which node's broker reported a device's
 * presence (a restart of that broker resets only its devices), and the
 * leases of cluster-wide jobs. */
static const char *schema_cluster =
    "ALTER TABLE device_presence ADD COLUMN node TEXT NOT NULL DEFAULT '';"
    "CREATE TABLE leases ("
    "  name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL,"
    "  since_ms INTEGER NOT NULL);";

/* Every presence change in the order it was committed (rev), so the live
 * fleet view and rules on device.online / device.offline read only what
 * changed since their last look, and miss no connect however short. */
static const char *schema_presence_rev =
    "CREATE TABLE presence_log ("
    "  rev INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,"
    "  online INTEGER NOT NULL, changed_ms INTEGER NOT NULL);"
    /* A measurement's label history (the page shows every correction). */
    "CREATE INDEX label_log_by_measurement ON label_log(device_id, measurement_id, seq);";

/* Rules (sqlite_rules.c): each tenant's rules with the position each has
 * reached in its event source, and the log of delivery attempts. */
static const char *schema_rules =
    "CREATE TABLE rules ("
    "  tenant TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,"
    "  position INTEGER NOT NULL, updated_by TEXT NOT NULL, updated_ms INTEGER NOT NULL,"
    "  PRIMARY KEY (tenant, name));"
    "CREATE TABLE rule_log ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, rule TEXT NOT NULL,"
    "  event_id TEXT NOT NULL, target TEXT NOT NULL, outcome TEXT NOT NULL,"
    "  attempt INTEGER NOT NULL, duration_us INTEGER NOT NULL, error TEXT NOT NULL,"
    "  at_ms INTEGER NOT NULL);"
    "CREATE INDEX rule_log_by_rule ON rule_log(tenant, rule, seq);";

/* Every object the lake export published, logged in the transaction that
 * settles its cursor (the lake.object.created event reads it). */
static const char *schema_lake_objects =
    "CREATE TABLE lake_object_log ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, area TEXT NOT NULL,"
    "  key TEXT NOT NULL, rows INTEGER NOT NULL, at_ms INTEGER NOT NULL);";

/* Migrations in order; schema_steps[i] brings a database to version i + 1. */
static const char *const *schema_steps[] = {&schema_v1, &schema_v2, &schema_v3,
                                               &schema_users, &schema_api, &schema_keys,
                                               &schema_models, &schema_shadow,
                                               &schema_cluster, &schema_presence_rev,
                                               &schema_rules, &schema_lake_objects};
#define SCHEMA_VERSION ((int)(sizeof schema_steps / sizeof schema_steps[0]))

int sql__map_rc(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW: return 0;
    case SQLITE_FULL: return FM_ENOSPC;
    case SQLITE_IOERR: return FM_EIO;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return FM_EBUSY;
    case SQLITE_CONSTRAINT: return FM_EEXIST;
    case SQLITE_NOMEM: return FM_ENOMEM;
    default: return FM_EDB;
    }
}

int sql__err(sqlite_store *s, fm_errbuf *err, int rc, const char *what)
{
    return fm_errf(err, sql__map_rc(rc), "%s: %s", what, sqlite3_errmsg(s->db));
}

int sql__exec(sqlite_store *s, const char *sql, fm_errbuf *err)
{
    char *msg = NULL;
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        int code = fm_errf(err, sql__map_rc(rc), "%s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return code;
    }
    return 0;
}

int sql__prep(sqlite_store *s, sqlite3_stmt **st, const char *sql, fm_errbuf *err)
{
    int rc = sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "prepare");
}

/* Runs a prepared statement to completion and resets it. */
int sql__step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int user_version(sqlite_store *s)
{
    sqlite3_stmt *st;
    int v = -1;
    if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* Waits for another connection's write lock in short steps. SQLite's own
 * busy timeout sleeps 1, 2, 5, 10... ms between tries, which puts whole
 * milliseconds on the reply latency each time the lake writer or the
 * registry holds the lock for a few microseconds. Gives up after ~5 s. */
static int on_busy(void *ud, int count)
{
    (void)ud;
    if (count >= 50000)
        return 0;
    struct timespec ts = {0, count < 100 ? 20000 : 100000};
    nanosleep(&ts, NULL);
    return 1;
}

static int s_hot_path(fm_store *base)
{
    /* Checkpoints copy the WAL into the database and fsync it: on the
     * commit path, a latency spike of milliseconds. A thread of the
     * handle's own runs them (sqlite_ckpt.c); the commit path checkpoints
     * only as a bound on the log's size. */
    sqlite_store *s = (sqlite_store *)base;
    if (s->ckpt)
        return 0;
    return sql__ckpt_start(s);
}

static int s_idle(fm_store *base)
{
    return sql__ckpt_idle((sqlite_store *)base);
}

static int s_migrate(fm_store *base, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    /* A database already at this version is left untouched: opening it
     * must not write (so `fleetml init` run twice changes nothing). */
    int v = user_version(s);
    if (v == SCHEMA_VERSION)
        return 0;
    if (v > SCHEMA_VERSION)
        return fm_errf(err, FM_EDB, "database schema version %d is newer than this fleetml (%d)",
                       v, SCHEMA_VERSION);
    int rc = sql__exec(s, "BEGIN IMMEDIATE", err);
    if (rc)
        return rc;
    /* A fresh database reports version 0 and runs every step. */
    for (int i = v < 0 ? 0 : v; i < SCHEMA_VERSION && !rc; i++)
        rc = sql__exec(s, *schema_steps[i], err);
    if (!rc) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", SCHEMA_VERSION);
        rc = sql__exec(s, sql, err);
    }
    if (!rc)
        return sql__exec(s, "COMMIT", err);
    sql__exec(s, "ROLLBACK", NULL);
    return rc;
}

int sql__require_tenant(sqlite_store *s, const char *tenant, fm_errbuf *err)
{
    int rc = sql__tenant_exists(&s->base, tenant);
    if (rc == 1)
        return 0;
    if (rc == 0)
        return fm_errf(err, FM_ENOTFOUND, "tenant '%s' does not exist", tenant);
    return fm_errf(err, rc, "tenant lookup failed");
}

int sql__begin(sqlite_store *s, fm_errbuf *err)
{
    int rc = sql__step_done(s->begin);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "begin");
}

int sql__commit(sqlite_store *s, fm_errbuf *err)
{
    int rc = sql__step_done(s->commit);
    if (rc == SQLITE_OK)
        return 0;
    int code = sql__err(s, err, rc, "commit");
    sql__rollback(s);
    return code;
}

void sql__rollback(sqlite_store *s)
{
    if (!sqlite3_get_autocommit(s->db))
        sql__step_done(s->rollback);
}

int sql__event(sqlite_store *s, int kind, const char *subject, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "INSERT INTO registry_events(kind, subject, at_ms) VALUES(?,?,?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int(st, 1, kind);
    sqlite3_bind_text(st, 2, subject, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "event");
}

static void s_close(fm_store *base)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *sts[] = {s->ins_meas, s->ins_quar, s->lookup, s->dev_get,
                           s->begin,    s->commit,   s->rollback};
    sql__ckpt_stop(s);
    for (size_t i = 0; i < sizeof sts / sizeof sts[0]; i++)
        sqlite3_finalize(sts[i]);
    sqlite3_close(s->db);
    fm_free(s);
}

static int s_tenant_ensure(fm_store *base, const char *name, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    /* Look first so an existing tenant costs no write transaction. */
    int rc = sql__prep(s, &st, "SELECT 1 FROM tenants WHERE name = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_ROW)
        return 0;
    rc = sql__prep(s, &st, "INSERT OR IGNORE INTO tenants(name, created_ms) VALUES(?, ?)", err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "tenant");
}

/* Inserts the device row (and its first certificate when d->cert_serial is
 * set) inside the caller's transaction. */
int sql__insert_device(sqlite_store *s, const fm_device *d, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__require_tenant(s, d->tenant, err);
    if (rc)
        return rc;
    int64_t now = d->created_ms ? d->created_ms : fm_wall_ms();
    rc = sql__prep(s, &st,
                   "INSERT INTO devices(id, tenant, status, cert_serial, created_ms, device_group,"
                   " serial_number, model, firmware) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, d->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, d->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, d->status);
    sqlite3_bind_text(st, 4, d->cert_serial, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, now);
    sqlite3_bind_text(st, 6, d->device_group, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, d->serial_number, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, d->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 9, d->firmware, -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return fm_errf(err, FM_EEXIST, "device '%s' already exists", d->id);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "device");
    if (d->cert_serial[0])
        return sql__insert_cert(s, d->id, d->cert_serial, "", "", d->cert_not_after_ms, err);
    return 0;
}

int sql__insert_cert(sqlite_store *s, const char *device_id, const char *serial,
                     const char *pem, const char *key_id, int64_t not_after_ms, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO certs(serial, device_id, status, pem, not_after_ms, created_ms,"
                       " key_id) VALUES(?, ?, 0, ?, ?, ?, ?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, serial, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, device_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, pem, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, not_after_ms);
    sqlite3_bind_int64(st, 5, fm_wall_ms());
    sqlite3_bind_text(st, 6, key_id ? key_id : "", -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "certificate");
    return sql__event(s, FM_EVENT_DEVICE, device_id, err);
}

void sql__copy_col(char *dst, size_t n, sqlite3_stmt *st, int col)
{
    const unsigned char *v = sqlite3_column_text(st, col);
    snprintf(dst, n, "%s", v ? (const char *)v : "");
}

void sql__read_device(sqlite3_stmt *st, fm_device *out)
{
    memset(out, 0, sizeof *out);
    sql__copy_col(out->id, sizeof out->id, st, 0);
    sql__copy_col(out->tenant, sizeof out->tenant, st, 1);
    out->status = sqlite3_column_int(st, 2);
    sql__copy_col(out->cert_serial, sizeof out->cert_serial, st, 3);
    out->created_ms = sqlite3_column_int64(st, 4);
    sql__copy_col(out->device_group, sizeof out->device_group, st, 5);
    sql__copy_col(out->serial_number, sizeof out->serial_number, st, 6);
}

static int s_result_lookup(fm_store *base, const char *dev, const char *mid, char **result)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st = s->lookup;
    sqlite3_bind_text(st, 1, dev, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, mid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        const char *v = (const char *)sqlite3_column_text(st, 0);
        *result = fm_strdup(v ? v : "");
        ret = *result ? 0 : FM_ENOMEM;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

static int s_commit(fm_store *base, fm_record *recs, size_t n, fm_quarantine *q, size_t nq,
                    fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    int rc = sql__step_done(s->begin);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "begin");
    for (size_t i = 0; i < n && rc == SQLITE_OK; i++) {
        sqlite3_stmt *st = s->ins_meas;
        fm_record *r = &recs[i];
        sqlite3_bind_text(st, 1, r->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, r->tenant, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, r->measurement_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, r->received_ms);
        sqlite3_bind_int64(st, 5, r->taken_ms);
        sqlite3_bind_text(st, 6, r->payload, (int)r->payload_len, SQLITE_STATIC);
        sqlite3_bind_text(st, 7, r->result_json, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 8, r->model, -1, SQLITE_STATIC);
        if (r->shadow_json)
            sqlite3_bind_text(st, 9, r->shadow_json, -1, SQLITE_STATIC);
        else
            sqlite3_bind_null(st, 9);
        rc = sql__step_done(st);
        /* ON CONFLICT DO NOTHING: no change means the key was stored. */
        r->existed = rc == SQLITE_OK && sqlite3_changes(s->db) == 0;
        r->seq = rc == SQLITE_OK && !r->existed ? sqlite3_last_insert_rowid(s->db) : 0;
    }
    for (size_t i = 0; i < nq && rc == SQLITE_OK; i++) {
        sqlite3_stmt *st = s->ins_quar;
        fm_quarantine *x = &q[i];
        sqlite3_bind_text(st, 1, x->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, x->tenant, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, x->received_ms);
        sqlite3_bind_blob(st, 4, x->payload, (int)x->payload_len, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, x->error_code, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 6, x->error_message, -1, SQLITE_STATIC);
        rc = sql__step_done(st);
        if (rc == SQLITE_OK)
            x->seq = sqlite3_last_insert_rowid(s->db);
    }
    if (rc == SQLITE_OK)
        rc = sql__step_done(s->commit);
    if (rc == SQLITE_OK)
        return 0;
    /* Keep the message before ROLLBACK overwrites it. A failed COMMIT may
     * leave the transaction open; roll it back so nothing is half-stored. */
    int code = sql__err(s, err, rc, "commit");
    if (!sqlite3_get_autocommit(s->db))
        sql__step_done(s->rollback);
    for (size_t i = 0; i < n; i++) {
        recs[i].seq = 0;
        recs[i].existed = 0;
    }
    return code;
}

static int s_count_measurements(fm_store *base, const char *device_id, long *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT count(*) FROM measurements WHERE device_id = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *out = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : FM_EDB;
}

static int s_probe_write(fm_store *base, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "INSERT OR REPLACE INTO health(id, probed_ms) VALUES(1, ?)", err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "probe");
}

static int lease_tx(sqlite_store *s, const char *name, const char *holder, int64_t ttl_ms,
                    char *owner, size_t owner_len, bool *other)
{
    sqlite3_stmt *st;
    int64_t now = fm_wall_ms();
    if (ttl_ms <= 0) {
        if (sql__prep(s, &st, "DELETE FROM leases WHERE name = ?1 AND holder = ?2", NULL))
            return FM_EDB;
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, holder, -1, SQLITE_STATIC);
        int rc = sql__step_done(st);
        sqlite3_finalize(st);
        return sql__map_rc(rc);
    }
    /* Taken when free, expired or already ours; since_ms keeps when the
     * current holder first took it. */
    if (sql__prep(s, &st,
                  "INSERT INTO leases(name, holder, expires_ms, since_ms) VALUES(?1, ?2, ?3, ?4)"
                  " ON CONFLICT(name) DO UPDATE SET holder = excluded.holder,"
                  " expires_ms = excluded.expires_ms, since_ms = CASE WHEN leases.holder ="
                  " excluded.holder THEN leases.since_ms ELSE excluded.since_ms END"
                  " WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?4",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, holder, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now + ttl_ms);
    sqlite3_bind_int64(st, 4, now);
    int rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__map_rc(rc);
    if (sql__prep(s, &st, "SELECT holder FROM leases WHERE name = ?1", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    const char *who = rc == SQLITE_ROW ? (const char *)sqlite3_column_text(st, 0) : NULL;
    int out = !who ? FM_EDB : strcmp(who, holder) == 0 ? 0 : FM_EBUSY;
    *other = out == FM_EBUSY;
    if (out == FM_EBUSY && owner && owner_len)
        snprintf(owner, owner_len, "%s", who);
    sqlite3_finalize(st);
    return out;
}

static int lease_in_tx(sqlite_store *s, const char *name, const char *holder, int64_t ttl_ms,
                       char *owner, size_t owner_len, bool *other)
{
    IN_TX(s, NULL, lease_tx(s, name, holder, ttl_ms, owner, owner_len, other));
}

static int s_lease(fm_store *base, const char *name, const char *holder, int64_t ttl_ms,
                   char *owner, size_t owner_len)
{
    sqlite_store *s = (sqlite_store *)base;
    if (!name || !*name || !holder || !*holder)
        return FM_EINVAL;
    bool other = false;
    int rc = lease_in_tx(s, name, holder, ttl_ms, owner, owner_len, &other);
    /* FM_EBUSY means "another node holds it": a busy database is not that. */
    return rc == FM_EBUSY && !other ? FM_EUNAVAIL : rc;
}

static int claim_audit_tx(sqlite_store *s, const char *name, const char *holder,
                          int64_t ttl_ms, fm_audit *a, bool *other, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int64_t now = fm_wall_ms();
    int rc = sql__prep(s, &st,
                       "INSERT INTO leases(name, holder, expires_ms, since_ms) VALUES(?1, ?2, ?3, ?4)"
                       " ON CONFLICT(name) DO UPDATE SET holder = excluded.holder,"
                       " expires_ms = excluded.expires_ms, since_ms = excluded.since_ms"
                       " WHERE leases.expires_ms <= ?4",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, holder, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now + ttl_ms);
    sqlite3_bind_int64(st, 4, now);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "claim");
    if (sqlite3_changes(s->db) != 1) {
        *other = true;
        return FM_EBUSY;
    }
    return sql__audit_append(&s->base, a, err);
}

static int claim_audit_in_tx(sqlite_store *s, const char *name, const char *holder,
                             int64_t ttl_ms, fm_audit *a, bool *other, fm_errbuf *err)
{
    IN_TX(s, err, claim_audit_tx(s, name, holder, ttl_ms, a, other, err));
}

static int s_claim_audit(fm_store *base, const char *name, const char *holder, int64_t ttl_ms,
                         fm_audit *a, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    if (!name || !*name || !holder || !*holder || ttl_ms <= 0)
        return fm_errf(err, FM_EINVAL, "a claim needs a name, a holder and a duration");
    bool other = false;
    int rc = claim_audit_in_tx(s, name, holder, ttl_ms, a, &other, err);
    /* FM_EBUSY means "claimed already": a busy database is not that. */
    return rc == FM_EBUSY && !other ? FM_EUNAVAIL : rc;
}

static const fm_store_vtable sqlite_vt = {
    .name = "sqlite",
    .migrate = s_migrate,
    .close = s_close,
    .tenant_ensure = s_tenant_ensure,
    .tenant_exists = sql__tenant_exists,
    .lease = s_lease,
    .claim_audit = s_claim_audit,
};

static const fm_store_records_vt sqlite_records_vt = {
    .commit = s_commit,
    .result_lookup = s_result_lookup,
    .count_measurements = s_count_measurements,
    .probe_write = s_probe_write,
    .hot_path = s_hot_path,
    .idle = s_idle,
};

int store__sqlite_open(const fm_config *cfg, fm_store **out, fm_errbuf *err)
{
    char dir[PATH_MAX], path[PATH_MAX];
    if (!fm_config_path(cfg, "db", dir, sizeof dir) ||
        !fm_config_path(cfg, "db/fleetml.db", path, sizeof path))
        return fm_errf(err, FM_EINVAL, "data directory path too long");
    if (fm_mkdirs(dir, 0700) != 0)
        return fm_errf(err, FM_EIO, "cannot create %s", dir);
    sqlite_store *s = fm_calloc(1, sizeof *s);
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    s->base.vt = &sqlite_vt;
    s->base.records = &sqlite_records_vt;
    s->base.lake = &sql__lake_vt;
    s->base.registry = &sql__registry_vt;
    s->base.users = &sql__users_vt;
    s->base.api = &sql__api_vt;
    s->base.models = &sql__models_vt;
    s->base.rules = &sql__rules_vt;
    int rc = sqlite3_open_v2(path, &s->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             fm_sqlite_vfs_name()); /* pass-through VFS, fault injection */
    if (rc != SQLITE_OK) {
        rc = fm_errf(err, FM_EDB, "open %s: %s", path,
                     s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_busy_handler(s->db, on_busy, NULL);
    sqlite3_extended_result_codes(s->db, 1);
    /* journal_size_limit: once a checkpoint has caught up, the WAL file
     * shrinks back to 16 MiB, so a burst (a device fleet replaying its
     * outboxes after an outage) does not keep its peak size on disk. */
    if ((rc = sql__exec(s, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                      " PRAGMA foreign_keys=ON; PRAGMA journal_size_limit=16777216;",
                   err)) != 0)
        goto fail;
    if ((rc = s_migrate(&s->base, err)) != 0)
        goto fail;
    if ((rc = sql__prep(s, &s->ins_meas,
                   "INSERT INTO measurements(device_id, tenant, measurement_id, received_ms,"
                   " taken_ms, payload, result, model, shadow) VALUES(?,?,?,?,?,?,?,?,?)"
                   " ON CONFLICT(device_id, measurement_id) DO NOTHING",
                   err)) ||
        (rc = sql__prep(s, &s->ins_quar,
                   "INSERT INTO quarantine(device_id, tenant, received_ms, payload, error_code,"
                   " error_message) VALUES(?,?,?,?,?,?)",
                   err)) ||
        (rc = sql__prep(s, &s->lookup,
                   "SELECT result FROM measurements WHERE device_id = ? AND measurement_id = ?",
                   err)) ||
        (rc = sql__prep(s, &s->dev_get,
                   "SELECT id, tenant, status, cert_serial, created_ms, device_group,"
                   " serial_number FROM devices WHERE id = ?",
                   err)) ||
        (rc = sql__prep(s, &s->begin, "BEGIN IMMEDIATE", err)) ||
        (rc = sql__prep(s, &s->commit, "COMMIT", err)) ||
        (rc = sql__prep(s, &s->rollback, "ROLLBACK", err)))
        goto fail;
    *out = &s->base;
    return 0;
fail:
    s_close(&s->base);
    return rc;
}
