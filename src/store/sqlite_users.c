/*
 * SQLite backend: users and sessions (epochs, sign-in throttling, refresh
 * tokens). Policy lives in src/api/auth.c; this file only keeps state, but
 * it keeps it atomically: every change that ends a user's sessions bumps
 * the epoch and revokes the families in one transaction, a refresh-token
 * rotation marks the old token used and inserts the new one in one
 * transaction, and a sign-in attempt is checked against the locks and
 * counted in one transaction (BEGIN IMMEDIATE), so two concurrent guesses
 * cannot both see the same count.
 */
#include "store/sqlite_int.h"

#include <stdio.h>
#include <string.h>

#define USER_COLS "id, tenant, username, roles, status, epoch, created_ms, password_hash"

static void read_user(sqlite3_stmt *st, fm_user *u, int with_hash)
{
    memset(u, 0, sizeof *u);
    u->id = sqlite3_column_int64(st, 0);
    sql__copy_col(u->tenant, sizeof u->tenant, st, 1);
    sql__copy_col(u->username, sizeof u->username, st, 2);
    sql__copy_col(u->roles, sizeof u->roles, st, 3);
    u->status = sqlite3_column_int(st, 4);
    u->epoch = sqlite3_column_int64(st, 5);
    u->created_ms = sqlite3_column_int64(st, 6);
    if (with_hash)
        sql__copy_col(u->password_hash, sizeof u->password_hash, st, 7);
}

/* Steps a SELECT expected to return at most one user row. */
static int one_user(sqlite3_stmt *st, fm_user *out)
{
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        read_user(st, out, 1);
        ret = 0;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_finalize(st);
    return ret;
}

int sql__user_get(fm_store *base, const char *tenant, const char *username, fm_user *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " USER_COLS " FROM users WHERE tenant = ? AND username = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, username, -1, SQLITE_STATIC);
    return one_user(st, out);
}

int sql__user_get_by_id(fm_store *base, int64_t id, fm_user *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT " USER_COLS " FROM users WHERE id = ?", NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, id);
    return one_user(st, out);
}

int sql__user_list(fm_store *base, const char *tenant, fm_user_cb cb, void *ud)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st,
                  tenant ? "SELECT " USER_COLS " FROM users WHERE tenant = ? ORDER BY username"
                         : "SELECT " USER_COLS " FROM users ORDER BY tenant, username",
                  NULL))
        return FM_EDB;
    if (tenant)
        sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_user u;
        read_user(st, &u, 0);
        if (cb(ud, &u)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

/* Runs one statement with an int64 first bind and optional text second
 * bind; *changes gets the number of rows it changed. */
static int run_id(sqlite_store *s, const char *sql, int64_t a, const char *text, int64_t b,
                  int *changes, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, sql, err);
    if (rc)
        return rc;
    int n = sqlite3_bind_parameter_count(st);
    sqlite3_bind_int64(st, 1, a);
    if (n >= 2) {
        if (text)
            sqlite3_bind_text(st, 2, text, -1, SQLITE_STATIC);
        else
            sqlite3_bind_int64(st, 2, b);
    }
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (changes)
        *changes = sqlite3_changes(s->db);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "users");
}

/* Inside a transaction: bumps the user's epoch and revokes its families. */
static int revoke_user(sqlite_store *s, int64_t id, int64_t now_ms, const char *reason,
                       fm_errbuf *err)
{
    int changed = 0;
    int rc = run_id(s, "UPDATE users SET epoch = epoch + 1 WHERE id = ?", id, NULL, 0, &changed,
                    err);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    sqlite3_stmt *st;
    rc = sql__prep(s, &st,
                   "UPDATE refresh_families SET revoked_ms = ?, revoked_reason = ?"
                   " WHERE user_id = ? AND revoked_ms = 0",
                   err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, now_ms > 0 ? now_ms : 1);
    sqlite3_bind_text(st, 2, reason, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, id);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "revoke sessions");
}

static int set_password_tx(sqlite_store *s, int64_t id, const char *hash, int64_t now_ms,
                           fm_errbuf *err)
{
    int changed = 0;
    int rc = run_id(s, "UPDATE users SET password_hash = ?2 WHERE id = ?1", id, hash, 0,
                    &changed, err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    return rc ? rc : revoke_user(s, id, now_ms, "password", err);
}

int sql__user_set_password(fm_store *base, int64_t id, const char *hash, int64_t now_ms,
                           fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, set_password_tx(s, id, hash, now_ms, err));
}

static int set_status_tx(sqlite_store *s, int64_t id, int status, int64_t now_ms,
                         fm_errbuf *err)
{
    int changed = 0;
    int rc = run_id(s, "UPDATE users SET status = ?2 WHERE id = ?1", id, NULL, status, &changed,
                    err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    if (rc || status == FM_USER_ACTIVE)
        return rc;
    return revoke_user(s, id, now_ms, "disabled", err);
}

int sql__user_set_status(fm_store *base, int64_t id, int status, int64_t now_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, set_status_tx(s, id, status, now_ms, err));
}

int sql__user_set_roles(fm_store *base, int64_t id, const char *roles, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    int changed = 0;
    /* One statement, so no explicit transaction is needed. */
    int rc = run_id(s, "UPDATE users SET roles = ?2, epoch = epoch + 1 WHERE id = ?1", id, roles,
                    0, &changed, err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    return rc;
}

int sql__user_revoke_sessions(fm_store *base, int64_t id, int64_t now_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, revoke_user(s, id, now_ms, "logout-all", err));
}

/* ---- throttling ------------------------------------------------------------ */

typedef struct throttle_row {
    int64_t failures, last_ms, locked_until_ms;
} throttle_row;

static int throttle_read(sqlite_store *s, const char *key, throttle_row *r, fm_errbuf *err)
{
    sqlite3_stmt *st;
    memset(r, 0, sizeof *r);
    int rc = sql__prep(s, &st,
                       "SELECT failures, last_ms, locked_until_ms FROM auth_throttle WHERE key = ?",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        r->failures = sqlite3_column_int64(st, 0);
        r->last_ms = sqlite3_column_int64(st, 1);
        r->locked_until_ms = sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sql__err(s, err, rc, "throttle");
}

static int throttle_write(sqlite_store *s, const char *key, const throttle_row *r,
                          fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO auth_throttle(key, failures, last_ms, locked_until_ms)"
                       " VALUES(?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
                       " failures = excluded.failures, last_ms = excluded.last_ms,"
                       " locked_until_ms = excluded.locked_until_ms",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, r->failures);
    sqlite3_bind_int64(st, 3, r->last_ms);
    sqlite3_bind_int64(st, 4, r->locked_until_ms);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "throttle");
}

#define THROTTLE_KEYS_MAX 4

static int attempt_tx(sqlite_store *s, const char *const *keys, size_t n,
                      const fm_throttle_policy *p, int64_t now_ms, int64_t *locks,
                      int64_t *until, fm_errbuf *err)
{
    throttle_row rows[THROTTLE_KEYS_MAX];
    int64_t latest = 0;
    for (size_t i = 0; i < n; i++) {
        int rc = throttle_read(s, keys[i], &rows[i], err);
        if (rc)
            return rc;
        /* A key quiet for long enough starts over. */
        if (rows[i].failures && now_ms - rows[i].last_ms > p[i].forget_after_ms)
            memset(&rows[i], 0, sizeof rows[i]);
        if (rows[i].locked_until_ms > now_ms && rows[i].locked_until_ms > latest)
            latest = rows[i].locked_until_ms;
    }
    if (latest) {
        /* Attempts made while locked are not counted: otherwise an attacker
         * who keeps knocking would keep the lock growing forever. */
        *until = latest;
        return FM_EBUSY;
    }
    for (size_t i = 0; i < n; i++) {
        rows[i].failures++;
        rows[i].last_ms = now_ms;
        int64_t d = fm_throttle_delay_ms(&p[i], rows[i].failures);
        rows[i].locked_until_ms = d ? now_ms + d : 0;
        if (locks)
            locks[i] = rows[i].locked_until_ms;
        if (rows[i].locked_until_ms > latest)
            latest = rows[i].locked_until_ms;
        int rc = throttle_write(s, keys[i], &rows[i], err);
        if (rc)
            return rc;
    }
    *until = latest;
    return 0;
}

int sql__throttle_attempt(fm_store *base, const char *const *keys, size_t n,
                          const fm_throttle_policy *p, int64_t now_ms, int64_t *locks,
                          int64_t *locked_until_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    if (n > THROTTLE_KEYS_MAX)
        return fm_errf(err, FM_EINVAL, "too many throttle keys");
    int64_t until = 0;
    int rc = sql__begin(s, err);
    if (rc)
        return rc;
    rc = attempt_tx(s, keys, n, p, now_ms, locks, &until, err);
    /* FM_EBUSY wrote nothing; end the transaction either way. */
    if (rc == 0)
        rc = sql__commit(s, err);
    else
        sql__rollback(s);
    if (locked_until_ms)
        *locked_until_ms = until;
    return rc;
}

static int release_tx(sqlite_store *s, const char *reset_key, const char *undo_key,
                      int64_t undo_lock_ms, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc;
    if (reset_key) {
        if ((rc = sql__prep(s, &st, "DELETE FROM auth_throttle WHERE key = ?", err)) != 0)
            return rc;
        sqlite3_bind_text(st, 1, reset_key, -1, SQLITE_STATIC);
        rc = sql__step_done(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
            return sql__err(s, err, rc, "throttle");
    }
    if (undo_key) {
        if ((rc = sql__prep(s, &st,
                            "UPDATE auth_throttle SET failures = max(failures - 1, 0),"
                            " locked_until_ms = CASE WHEN locked_until_ms = ? THEN 0"
                            " ELSE locked_until_ms END WHERE key = ?",
                            err)) != 0)
            return rc;
        sqlite3_bind_int64(st, 1, undo_lock_ms);
        sqlite3_bind_text(st, 2, undo_key, -1, SQLITE_STATIC);
        rc = sql__step_done(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
            return sql__err(s, err, rc, "throttle");
    }
    return 0;
}

int sql__throttle_release(fm_store *base, const char *reset_key, const char *undo_key,
                          int64_t undo_lock_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, release_tx(s, reset_key, undo_key, undo_lock_ms, err));
}

int sql__throttle_prune(fm_store *base, int64_t before_ms, long *pruned)
{
    sqlite_store *s = (sqlite_store *)base;
    int changed = 0;
    /* A key still locked is kept whatever its age (it cannot be, with sane
     * policies, but the lock must never be shortened by housekeeping). */
    int rc = run_id(s, "DELETE FROM auth_throttle WHERE last_ms < ?1 AND locked_until_ms < ?1",
                    before_ms, NULL, 0, &changed, NULL);
    if (pruned)
        *pruned = rc ? 0 : changed;
    return rc;
}

/* ---- refresh tokens ---------------------------------------------------------- */

static int insert_token(sqlite_store *s, const char *family, const unsigned char *hash,
                        int64_t expires_ms, int64_t now_ms, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "INSERT INTO refresh_tokens(hash, family, created_ms, expires_ms)"
                       " VALUES(?, ?, ?, ?)",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_blob(st, 1, hash, FM_TOKEN_HASH_LEN, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, family, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now_ms);
    sqlite3_bind_int64(st, 4, expires_ms);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "refresh token");
}

static int session_create_tx(sqlite_store *s, const char *family, int64_t user_id,
                             int64_t epoch, const unsigned char *hash, int64_t expires_ms,
                             int64_t now_ms, int mfa, fm_errbuf *err)
{
    fm_user u;
    int rc = sql__user_get_by_id(&s->base, user_id, &u);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "no user with id %lld", (long long)user_id);
    if (rc)
        return fm_errf(err, rc, "user lookup failed");
    if (u.status != FM_USER_ACTIVE || u.epoch != epoch)
        return fm_errf(err, FM_ESTATE, "user disabled or its sessions were revoked meanwhile");
    sqlite3_stmt *st;
    if ((rc = sql__prep(s, &st,
                        "INSERT INTO refresh_families(id, user_id, created_ms, mfa)"
                        " VALUES(?, ?, ?, ?)",
                        err)) != 0)
        return rc;
    sqlite3_bind_text(st, 1, family, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, user_id);
    sqlite3_bind_int64(st, 3, now_ms);
    sqlite3_bind_int(st, 4, mfa ? 1 : 0);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "refresh family");
    return insert_token(s, family, hash, expires_ms, now_ms, err);
}

int sql__session_create(fm_store *base, const char *family, int64_t user_id, int64_t epoch,
                        const unsigned char *hash, int64_t expires_ms, int64_t now_ms,
                        int second_factor, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err,
          session_create_tx(s, family, user_id, epoch, hash, expires_ms, now_ms, second_factor,
                            err));
}

static int revoke_family(sqlite_store *s, const char *family, int64_t now_ms, const char *reason,
                         fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "UPDATE refresh_families SET revoked_ms = ?, revoked_reason = ?"
                       " WHERE id = ? AND revoked_ms = 0",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, now_ms > 0 ? now_ms : 1);
    sqlite3_bind_text(st, 2, reason, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, family, -1, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "revoke family");
}

typedef struct token_row {
    char family[32];
    int64_t user_id, expires_ms, used_ms, revoked_ms;
} token_row;

static int token_read(sqlite_store *s, const unsigned char *hash, token_row *r, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                       "SELECT t.family, f.user_id, t.expires_ms, t.used_ms, f.revoked_ms"
                       " FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family"
                       " WHERE t.hash = ?",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_blob(st, 1, hash, FM_TOKEN_HASH_LEN, SQLITE_STATIC);
    rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        sql__copy_col(r->family, sizeof r->family, st, 0);
        r->user_id = sqlite3_column_int64(st, 1);
        r->expires_ms = sqlite3_column_int64(st, 2);
        r->used_ms = sqlite3_column_int64(st, 3);
        r->revoked_ms = sqlite3_column_int64(st, 4);
        ret = 0;
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__err(s, err, rc, "refresh token");
    }
    sqlite3_finalize(st);
    return ret;
}

/* Returns 0 (rotated), FM_ENOTFOUND, FM_EPERM, or FM_ESTATE (reuse: the
 * family revocation was written and must be committed). */
static int rotate_tx(sqlite_store *s, const unsigned char *old_hash, const unsigned char *new_hash,
                     int64_t new_expires_ms, int64_t now_ms, fm_refresh_info *out,
                     fm_errbuf *err)
{
    token_row r;
    int rc = token_read(s, old_hash, &r, err);
    if (rc)
        return rc;
    out->user_id = r.user_id;
    snprintf(out->family, sizeof out->family, "%s", r.family);
    if (r.revoked_ms)
        return fm_errf(err, FM_EPERM, "refresh token family revoked");
    if (r.used_ms) {
        /* A rotated-away token came back: whoever sent it may be a thief,
         * and so may whoever holds the newest one. End the whole session. */
        rc = revoke_family(s, r.family, now_ms, "reuse", err);
        return rc ? rc : fm_errf(err, FM_ESTATE, "refresh token reused");
    }
    if (r.expires_ms <= now_ms)
        return fm_errf(err, FM_EPERM, "refresh token expired");
    sqlite3_stmt *st;
    if ((rc = sql__prep(s, &st, "UPDATE refresh_tokens SET used_ms = ? WHERE hash = ?", err)) !=
        0)
        return rc;
    sqlite3_bind_int64(st, 1, now_ms > 0 ? now_ms : 1);
    sqlite3_bind_blob(st, 2, old_hash, FM_TOKEN_HASH_LEN, SQLITE_STATIC);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "refresh token");
    /* A successor never outlives its predecessor: a session ends at most
     * one refresh lifetime after its sign-in, however often it is renewed
     * (periodic re-authentication, OWASP ASVS 3.3.2). */
    int64_t expires = new_expires_ms < r.expires_ms ? new_expires_ms : r.expires_ms;
    return insert_token(s, r.family, new_hash, expires, now_ms, err);
}

int sql__refresh_rotate(fm_store *base, const unsigned char *old_hash, const unsigned char *new_hash,
                        int64_t new_expires_ms, int64_t now_ms, fm_refresh_info *out,
                        fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    memset(out, 0, sizeof *out);
    int rc = sql__begin(s, err);
    if (rc)
        return rc;
    rc = rotate_tx(s, old_hash, new_hash, new_expires_ms, now_ms, out, err);
    if (rc == 0 || rc == FM_ESTATE) {
        /* The reuse case commits too: the revocation must stick. */
        int crc = sql__commit(s, err);
        return crc ? crc : rc;
    }
    sql__rollback(s);
    return rc;
}

static int revoke_by_token_tx(sqlite_store *s, const unsigned char *hash, int64_t now_ms,
                              fm_refresh_info *out, fm_errbuf *err)
{
    token_row r;
    int rc = token_read(s, hash, &r, err);
    if (!rc && out) {
        out->user_id = r.user_id;
        snprintf(out->family, sizeof out->family, "%s", r.family);
    }
    return rc ? rc : revoke_family(s, r.family, now_ms, "logout", err);
}

int sql__refresh_revoke(fm_store *base, const unsigned char *hash, int64_t now_ms,
                        fm_refresh_info *out, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    IN_TX(s, err, revoke_by_token_tx(s, hash, now_ms, out, err));
}

int sql__session_active(fm_store *base, const char *family, int64_t user_id, int *mfa)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT user_id, revoked_ms, mfa FROM refresh_families WHERE id = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, family, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int ret;
    if (rc == SQLITE_ROW) {
        ret = sqlite3_column_int64(st, 0) == user_id && sqlite3_column_int64(st, 1) == 0
                  ? 0
                  : FM_EPERM;
        if (mfa)
            *mfa = ret == 0 && sqlite3_column_int(st, 2);
    } else
        ret = rc == SQLITE_DONE ? FM_EPERM : sql__map_rc(rc);
    sqlite3_finalize(st);
    return ret;
}

static int prune_tx(sqlite_store *s, int64_t before_ms, long *pruned)
{
    int changed = 0;
    int rc = run_id(s, "DELETE FROM refresh_tokens WHERE expires_ms < ?", before_ms, NULL, 0,
                    &changed, NULL);
    if (rc)
        return rc;
    *pruned = changed;
    /* A family with no token left can never be used again; access tokens
     * naming it are refused because the family is gone (session_active). */
    return run_id(s,
                  "DELETE FROM refresh_families WHERE created_ms < ? AND NOT EXISTS"
                  " (SELECT 1 FROM refresh_tokens t WHERE t.family = refresh_families.id)",
                  before_ms, NULL, 0, NULL, NULL);
}

int sql__refresh_prune(fm_store *base, int64_t before_ms, long *pruned)
{
    sqlite_store *s = (sqlite_store *)base;
    long n = 0;
    int rc = sql__begin(s, NULL);
    if (rc)
        return rc;
    rc = prune_tx(s, before_ms, &n);
    if (!rc)
        rc = sql__commit(s, NULL);
    else
        sql__rollback(s);
    if (pruned)
        *pruned = rc ? 0 : n;
    return rc;
}

int sql__tenant_exists(fm_store *base, const char *name)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT 1 FROM tenants WHERE name = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : sql__map_rc(rc);
}

/* ---- second factor (TOTP) ------------------------------------------------------ */

int sql__totp_get(fm_store *base, int64_t user_id, fm_totp *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (sql__prep(s, &st, "SELECT secret, confirmed, last_step FROM user_totp WHERE user_id = ?",
                  NULL))
        return FM_EDB;
    sqlite3_bind_int64(st, 1, user_id);
    int rc = sqlite3_step(st), ret;
    if (rc == SQLITE_ROW) {
        int n = sqlite3_column_bytes(st, 0);
        const void *p = sqlite3_column_blob(st, 0);
        if (n <= 0 || (size_t)n > sizeof out->secret || !p) {
            ret = FM_EDB;
        } else {
            memcpy(out->secret, p, (size_t)n);
            out->secret_len = (size_t)n;
            out->confirmed = sqlite3_column_int(st, 1);
            out->last_step = sqlite3_column_int64(st, 2);
            ret = 0;
        }
    } else {
        ret = rc == SQLITE_DONE ? FM_ENOTFOUND : sql__map_rc(rc);
    }
    sqlite3_finalize(st);
    return ret;
}

static int totp_set_tx(sqlite_store *s, int64_t user_id, const unsigned char *secret, size_t len,
                       int64_t now_ms, fm_errbuf *err)
{
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "SELECT confirmed FROM user_totp WHERE user_id = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, user_id);
    rc = sqlite3_step(st);
    int confirmed = rc == SQLITE_ROW && sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return sql__err(s, err, rc, "totp");
    if (confirmed)
        return fm_errf(err, FM_EEXIST, "a confirmed second factor exists");
    if ((rc = sql__prep(s, &st,
                        "INSERT OR REPLACE INTO user_totp(user_id, secret, confirmed, last_step,"
                        " created_ms) SELECT id, ?2, 0, 0, ?3 FROM users WHERE id = ?1",
                        err)) != 0)
        return rc;
    sqlite3_bind_int64(st, 1, user_id);
    sqlite3_bind_blob(st, 2, secret, (int)len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now_ms);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "totp");
    return sqlite3_changes(s->db) == 1 ? 0 : fm_errf(err, FM_ENOTFOUND, "no such user");
}

int sql__totp_set(fm_store *base, int64_t user_id, const unsigned char *secret, size_t len,
                  int64_t now_ms, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    if (!secret || len == 0 || len > sizeof ((fm_totp *)0)->secret)
        return fm_errf(err, FM_EINVAL, "totp: bad secret length");
    IN_TX(s, err, totp_set_tx(s, user_id, secret, len, now_ms, err));
}

int sql__totp_use(fm_store *base, int64_t user_id, int64_t step, int confirm, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    /* One statement: the step check and its use cannot be split by a
     * concurrent sign-in with the same code. */
    int rc = sql__prep(s, &st,
                       confirm ? "UPDATE user_totp SET last_step = ?2, confirmed = 1"
                                 " WHERE user_id = ?1 AND last_step < ?2"
                               : "UPDATE user_totp SET last_step = ?2"
                                 " WHERE user_id = ?1 AND last_step < ?2 AND confirmed = 1",
                       err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, user_id);
    sqlite3_bind_int64(st, 2, step);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        return sql__err(s, err, rc, "totp");
    return sqlite3_changes(s->db) == 1 ? 0 : fm_errf(err, FM_ESTATE, "code already used");
}

int sql__totp_delete(fm_store *base, int64_t user_id, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st, "DELETE FROM user_totp WHERE user_id = ?", err);
    if (rc)
        return rc;
    sqlite3_bind_int64(st, 1, user_id);
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : sql__err(s, err, rc, "totp");
}

static int s_user_create(fm_store *base, const char *tenant, const char *username,
                         const char *hash, const char *roles, fm_errbuf *err)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    int rc = sql__prep(s, &st,
                  "INSERT INTO users(tenant, username, password_hash, roles, created_ms) "
                  "VALUES(?, ?, ?, ?, ?)",
                  err);
    if (rc)
        return rc;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, username, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hash, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, roles, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, fm_wall_ms());
    rc = sql__step_done(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_OK)
        return 0;
    return sql__err(s, err, rc, "user");
}

static int s_user_count(fm_store *base, const char *tenant, long *out)
{
    sqlite_store *s = (sqlite_store *)base;
    sqlite3_stmt *st;
    if (sql__prep(s, &st, "SELECT count(*) FROM users WHERE tenant = ?", NULL))
        return FM_EDB;
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *out = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : FM_EDB;
}

const fm_store_users_vt sql__users_vt = {
    .user_create = s_user_create,
    .user_count = s_user_count,
    .user_get = sql__user_get,
    .user_get_by_id = sql__user_get_by_id,
    .user_list = sql__user_list,
    .user_set_password = sql__user_set_password,
    .user_set_status = sql__user_set_status,
    .user_set_roles = sql__user_set_roles,
    .user_revoke_sessions = sql__user_revoke_sessions,
    .throttle_attempt = sql__throttle_attempt,
    .throttle_release = sql__throttle_release,
    .throttle_prune = sql__throttle_prune,
    .session_create = sql__session_create,
    .refresh_rotate = sql__refresh_rotate,
    .refresh_revoke = sql__refresh_revoke,
    .session_active = sql__session_active,
    .refresh_prune = sql__refresh_prune,
    .totp_get = sql__totp_get,
    .totp_set = sql__totp_set,
    .totp_use = sql__totp_use,
    .totp_delete = sql__totp_delete,
};
