/*
 * PostgreSQL backend: users and sessions (see sqlite_users.c for the
 * contract). Every read-decide-write transaction takes the users lock
 * (pg_int.h) first: two nodes counting failed sign-ins, or rotating the
 * same refresh token, serialise as SQLite's single writer would.
 */
#include "store/pg_int.h"

#include <stdio.h>
#include <string.h>

#define USER_COLS "id, tenant, username, roles, status, epoch, created_ms, password_hash"

static void read_user(const PGresult *r, int i, fm_user *u, int with_hash)
{
    memset(u, 0, sizeof *u);
    u->id = pg__int(r, i, 0);
    pg__copy(u->tenant, sizeof u->tenant, r, i, 1);
    pg__copy(u->username, sizeof u->username, r, i, 2);
    pg__copy(u->roles, sizeof u->roles, r, i, 3);
    u->status = (int)pg__int(r, i, 4);
    u->epoch = pg__int(r, i, 5);
    u->created_ms = pg__int(r, i, 6);
    if (with_hash)
        pg__copy(u->password_hash, sizeof u->password_hash, r, i, 7);
}

static int one_user(PGresult *r, int rc, fm_user *out)
{
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc)
        read_user(r, 0, out, 1);
    PQclear(r);
    return rc;
}

static int u_user_get(fm_store *base, const char *tenant, const char *username, fm_user *out)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    pg__text(&a, username);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " USER_COLS " FROM users WHERE tenant = $1 AND username = $2",
                          &a, "user", &rc, NULL);
    return one_user(r, rc, out);
}

static int u_user_get_by_id(fm_store *base, int64_t id, fm_user *out)
{
    pg_args a = {0};
    pg__i64(&a, id);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT " USER_COLS " FROM users WHERE id = $1", &a,
                          "user", &rc, NULL);
    return one_user(r, rc, out);
}

static int u_user_list(fm_store *base, const char *tenant, fm_user_cb cb, void *ud)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT " USER_COLS " FROM users WHERE $1::text IS NULL OR tenant = $1"
                          " ORDER BY tenant COLLATE \"C\", username COLLATE \"C\"",
                          &a, "users", &rc, NULL);
    if (!r)
        return rc;
    for (int i = 0, n = PQntuples(r); i < n; i++) {
        fm_user u;
        read_user(r, i, &u, 0);
        if (cb(ud, &u))
            break;
    }
    PQclear(r);
    return 0;
}

/* Runs sql with $1 = id and $2 = text (when text) or b (when has_b). */
static int run_id(pg_store *s, const char *sql, int64_t id, const char *text, bool has_b,
                  int64_t b, long *changed, fm_errbuf *err)
{
    pg_args a = {0};
    pg__i64(&a, id);
    if (text)
        pg__text(&a, text);
    else if (has_b)
        pg__i64(&a, b);
    return pg__cmd(s, sql, &a, "users", changed, err);
}

/* Inside a transaction: bumps the user's epoch and revokes its families. */
static int revoke_user(pg_store *s, int64_t id, int64_t now_ms, const char *reason,
                       fm_errbuf *err)
{
    long changed = 0;
    int rc = run_id(s, "UPDATE users SET epoch = epoch + 1 WHERE id = $1", id, NULL, false, 0,
                    &changed, err);
    if (rc)
        return rc;
    if (!changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    pg_args a = {0};
    pg__i64(&a, now_ms > 0 ? now_ms : 1);
    pg__text(&a, reason);
    pg__i64(&a, id);
    return pg__cmd(s,
                   "UPDATE refresh_families SET revoked_ms = $1, revoked_reason = $2"
                   " WHERE user_id = $3 AND revoked_ms = 0",
                   &a, "revoke sessions", NULL, err);
}

static int set_password_tx(pg_store *s, int64_t id, const char *hash, int64_t now_ms,
                           fm_errbuf *err)
{
    long changed = 0;
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (!rc)
        rc = run_id(s, "UPDATE users SET password_hash = $2 WHERE id = $1", id, hash, false, 0,
                    &changed, err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    return rc ? rc : revoke_user(s, id, now_ms, "password", err);
}

static int u_user_set_password(fm_store *base, int64_t id, const char *hash, int64_t now_ms,
                               fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, set_password_tx(s, id, hash, now_ms, err));
}

static int set_status_tx(pg_store *s, int64_t id, int status, int64_t now_ms, fm_errbuf *err)
{
    long changed = 0;
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (!rc)
        rc = run_id(s, "UPDATE users SET status = $2 WHERE id = $1", id, NULL, true, status,
                    &changed, err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    if (rc || status == FM_USER_ACTIVE)
        return rc;
    return revoke_user(s, id, now_ms, "disabled", err);
}

static int u_user_set_status(fm_store *base, int64_t id, int status, int64_t now_ms,
                             fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, set_status_tx(s, id, status, now_ms, err));
}

static int u_user_set_roles(fm_store *base, int64_t id, const char *roles, fm_errbuf *err)
{
    long changed = 0;
    int rc = run_id((pg_store *)base, "UPDATE users SET roles = $2, epoch = epoch + 1 WHERE id = $1",
                    id, roles, false, 0, &changed, err);
    if (!rc && !changed)
        return fm_errf(err, FM_ENOTFOUND, "no user with id %lld", (long long)id);
    return rc;
}

static int revoke_all_tx(pg_store *s, int64_t id, int64_t now_ms, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    return rc ? rc : revoke_user(s, id, now_ms, "logout-all", err);
}

static int u_user_revoke_sessions(fm_store *base, int64_t id, int64_t now_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, revoke_all_tx(s, id, now_ms, err));
}

/* ---- throttling ------------------------------------------------------------ */

typedef struct throttle_row {
    int64_t failures, last_ms, locked_until_ms;
} throttle_row;

static int throttle_read(pg_store *s, const char *key, throttle_row *t, fm_errbuf *err)
{
    memset(t, 0, sizeof *t);
    pg_args a = {0};
    pg__text(&a, key);
    int rc;
    PGresult *r = pg__run(s,
                          "SELECT failures, last_ms, locked_until_ms FROM auth_throttle"
                          " WHERE key = $1",
                          &a, "throttle", &rc, err);
    if (!r)
        return rc;
    if (PQntuples(r)) {
        t->failures = pg__int(r, 0, 0);
        t->last_ms = pg__int(r, 0, 1);
        t->locked_until_ms = pg__int(r, 0, 2);
    }
    PQclear(r);
    return 0;
}

static int throttle_write(pg_store *s, const char *key, const throttle_row *t, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, key);
    pg__i64(&a, t->failures);
    pg__i64(&a, t->last_ms);
    pg__i64(&a, t->locked_until_ms);
    return pg__cmd(s,
                   "INSERT INTO auth_throttle(key, failures, last_ms, locked_until_ms)"
                   " VALUES($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET"
                   " failures = excluded.failures, last_ms = excluded.last_ms,"
                   " locked_until_ms = excluded.locked_until_ms",
                   &a, "throttle", NULL, err);
}

#define THROTTLE_KEYS_MAX 4

static int attempt_tx(pg_store *s, const char *const *keys, size_t n, const fm_throttle_policy *p,
                      int64_t now_ms, int64_t *locks, int64_t *until, fm_errbuf *err)
{
    throttle_row rows[THROTTLE_KEYS_MAX];
    int64_t latest = 0;
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) {
        if ((rc = throttle_read(s, keys[i], &rows[i], err)))
            return rc;
        if (rows[i].failures && now_ms - rows[i].last_ms > p[i].forget_after_ms)
            memset(&rows[i], 0, sizeof rows[i]);
        if (rows[i].locked_until_ms > now_ms && rows[i].locked_until_ms > latest)
            latest = rows[i].locked_until_ms;
    }
    if (latest) {
        /* Attempts made while locked are not counted. */
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
        if ((rc = throttle_write(s, keys[i], &rows[i], err)))
            return rc;
    }
    *until = latest;
    return 0;
}

static int u_throttle_attempt(fm_store *base, const char *const *keys, size_t n,
                              const fm_throttle_policy *p, int64_t now_ms, int64_t *locks,
                              int64_t *locked_until_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    if (n > THROTTLE_KEYS_MAX)
        return fm_errf(err, FM_EINVAL, "too many throttle keys");
    int64_t until = 0;
    int rc = pg__begin(s, err);
    if (rc)
        return rc;
    rc = attempt_tx(s, keys, n, p, now_ms, locks, &until, err);
    if (rc == 0)
        rc = pg__commit(s, err);
    else
        pg__rollback(s);
    if (locked_until_ms)
        *locked_until_ms = until;
    return rc;
}

static int release_tx(pg_store *s, const char *reset_key, const char *undo_key,
                      int64_t undo_lock_ms, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (!rc && reset_key) {
        pg_args a = {0};
        pg__text(&a, reset_key);
        rc = pg__cmd(s, "DELETE FROM auth_throttle WHERE key = $1", &a, "throttle", NULL, err);
    }
    if (!rc && undo_key) {
        pg_args a = {0};
        pg__i64(&a, undo_lock_ms);
        pg__text(&a, undo_key);
        rc = pg__cmd(s,
                     "UPDATE auth_throttle SET failures = GREATEST(failures - 1, 0),"
                     " locked_until_ms = CASE WHEN locked_until_ms = $1 THEN 0"
                     " ELSE locked_until_ms END WHERE key = $2",
                     &a, "throttle", NULL, err);
    }
    return rc;
}

static int u_throttle_release(fm_store *base, const char *reset_key, const char *undo_key,
                              int64_t undo_lock_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, release_tx(s, reset_key, undo_key, undo_lock_ms, err));
}

static int u_throttle_prune(fm_store *base, int64_t before_ms, long *pruned)
{
    long changed = 0;
    int rc = run_id((pg_store *)base,
                    "DELETE FROM auth_throttle WHERE last_ms < $1 AND locked_until_ms < $1",
                    before_ms, NULL, false, 0, &changed, NULL);
    if (pruned)
        *pruned = rc ? 0 : changed;
    return rc;
}

/* ---- refresh tokens ---------------------------------------------------------- */

static int insert_token(pg_store *s, const char *family, const unsigned char *hash,
                        int64_t expires_ms, int64_t now_ms, fm_errbuf *err)
{
    pg_args a = {0};
    pg__bin(&a, hash, FM_TOKEN_HASH_LEN);
    pg__text(&a, family);
    pg__i64(&a, now_ms);
    pg__i64(&a, expires_ms);
    return pg__cmd(s,
                   "INSERT INTO refresh_tokens(hash, family, created_ms, expires_ms)"
                   " VALUES($1, $2, $3, $4)",
                   &a, "refresh token", NULL, err);
}

static int session_create_tx(pg_store *s, const char *family, int64_t user_id, int64_t epoch,
                             const unsigned char *hash, int64_t expires_ms, int64_t now_ms,
                             int mfa, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (rc)
        return rc;
    fm_user u;
    rc = u_user_get_by_id(&s->base, user_id, &u);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "no user with id %lld", (long long)user_id);
    if (rc)
        return fm_errf(err, rc, "user lookup failed");
    if (u.status != FM_USER_ACTIVE || u.epoch != epoch)
        return fm_errf(err, FM_ESTATE, "user disabled or its sessions were revoked meanwhile");
    pg_args a = {0};
    pg__text(&a, family);
    pg__i64(&a, user_id);
    pg__i64(&a, now_ms);
    pg__i64(&a, mfa ? 1 : 0);
    rc = pg__cmd(s, "INSERT INTO refresh_families(id, user_id, created_ms, mfa) VALUES($1, $2, $3, $4)",
                 &a, "refresh family", NULL, err);
    return rc ? rc : insert_token(s, family, hash, expires_ms, now_ms, err);
}

static int u_session_create(fm_store *base, const char *family, int64_t user_id, int64_t epoch,
                            const unsigned char *hash, int64_t expires_ms, int64_t now_ms,
                            int second_factor, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err,
          session_create_tx(s, family, user_id, epoch, hash, expires_ms, now_ms, second_factor,
                            err));
}

static int revoke_family(pg_store *s, const char *family, int64_t now_ms, const char *reason,
                         fm_errbuf *err)
{
    pg_args a = {0};
    pg__i64(&a, now_ms > 0 ? now_ms : 1);
    pg__text(&a, reason);
    pg__text(&a, family);
    return pg__cmd(s,
                   "UPDATE refresh_families SET revoked_ms = $1, revoked_reason = $2"
                   " WHERE id = $3 AND revoked_ms = 0",
                   &a, "revoke family", NULL, err);
}

typedef struct token_row {
    char family[32];
    int64_t user_id, expires_ms, used_ms, revoked_ms;
} token_row;

static int token_read(pg_store *s, const unsigned char *hash, token_row *t, fm_errbuf *err)
{
    pg_args a = {0};
    pg__bin(&a, hash, FM_TOKEN_HASH_LEN);
    int rc;
    PGresult *r = pg__run(s,
                          "SELECT t.family, f.user_id, t.expires_ms, t.used_ms, f.revoked_ms"
                          " FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family"
                          " WHERE t.hash = $1",
                          &a, "refresh token", &rc, err);
    if (!r)
        return rc;
    rc = PQntuples(r) ? 0 : FM_ENOTFOUND;
    if (!rc) {
        pg__copy(t->family, sizeof t->family, r, 0, 0);
        t->user_id = pg__int(r, 0, 1);
        t->expires_ms = pg__int(r, 0, 2);
        t->used_ms = pg__int(r, 0, 3);
        t->revoked_ms = pg__int(r, 0, 4);
    }
    PQclear(r);
    return rc;
}

static int rotate_tx(pg_store *s, const unsigned char *old_hash, const unsigned char *new_hash,
                     int64_t new_expires_ms, int64_t now_ms, fm_refresh_info *out,
                     fm_errbuf *err)
{
    token_row t;
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (!rc)
        rc = token_read(s, old_hash, &t, err);
    if (rc)
        return rc;
    out->user_id = t.user_id;
    snprintf(out->family, sizeof out->family, "%s", t.family);
    if (t.revoked_ms)
        return fm_errf(err, FM_EPERM, "refresh token family revoked");
    if (t.used_ms) {
        /* A rotated-away token came back: end the whole session. */
        rc = revoke_family(s, t.family, now_ms, "reuse", err);
        return rc ? rc : fm_errf(err, FM_ESTATE, "refresh token reused");
    }
    if (t.expires_ms <= now_ms)
        return fm_errf(err, FM_EPERM, "refresh token expired");
    pg_args a = {0};
    pg__i64(&a, now_ms > 0 ? now_ms : 1);
    pg__bin(&a, old_hash, FM_TOKEN_HASH_LEN);
    if ((rc = pg__cmd(s, "UPDATE refresh_tokens SET used_ms = $1 WHERE hash = $2", &a,
                      "refresh token", NULL, err)))
        return rc;
    /* A successor never outlives its predecessor. */
    int64_t expires = new_expires_ms < t.expires_ms ? new_expires_ms : t.expires_ms;
    return insert_token(s, t.family, new_hash, expires, now_ms, err);
}

static int u_refresh_rotate(fm_store *base, const unsigned char *old_hash,
                            const unsigned char *new_hash, int64_t new_expires_ms, int64_t now_ms,
                            fm_refresh_info *out, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    memset(out, 0, sizeof *out);
    int rc = pg__begin(s, err);
    if (rc)
        return rc;
    rc = rotate_tx(s, old_hash, new_hash, new_expires_ms, now_ms, out, err);
    if (rc == 0 || rc == FM_ESTATE) {
        /* The reuse case commits too: the revocation must stick. */
        int crc = pg__commit(s, err);
        return crc ? crc : rc;
    }
    pg__rollback(s);
    return rc;
}

static int revoke_by_token_tx(pg_store *s, const unsigned char *hash, int64_t now_ms,
                              fm_refresh_info *out, fm_errbuf *err)
{
    token_row t;
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (!rc)
        rc = token_read(s, hash, &t, err);
    if (!rc && out) {
        out->user_id = t.user_id;
        snprintf(out->family, sizeof out->family, "%s", t.family);
    }
    return rc ? rc : revoke_family(s, t.family, now_ms, "logout", err);
}

static int u_refresh_revoke(fm_store *base, const unsigned char *hash, int64_t now_ms,
                            fm_refresh_info *out, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    PG_TX(s, err, revoke_by_token_tx(s, hash, now_ms, out, err));
}

static int u_session_active(fm_store *base, const char *family, int64_t user_id, int *mfa)
{
    pg_args a = {0};
    pg__text(&a, family);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT user_id, revoked_ms, mfa FROM refresh_families WHERE id = $1",
                          &a, "session", &rc, NULL);
    if (!r)
        return rc;
    rc = PQntuples(r) && pg__int(r, 0, 0) == user_id && pg__int(r, 0, 1) == 0 ? 0 : FM_EPERM;
    if (mfa)
        *mfa = rc == 0 && pg__int(r, 0, 2);
    PQclear(r);
    return rc;
}

static int prune_tx(pg_store *s, int64_t before_ms, long *pruned)
{
    int rc = run_id(s, "DELETE FROM refresh_tokens WHERE expires_ms < $1", before_ms, NULL, false,
                    0, pruned, NULL);
    if (rc)
        return rc;
    return run_id(s,
                  "DELETE FROM refresh_families WHERE created_ms < $1 AND NOT EXISTS"
                  " (SELECT 1 FROM refresh_tokens t WHERE t.family = refresh_families.id)",
                  before_ms, NULL, false, 0, NULL, NULL);
}

static int u_refresh_prune(fm_store *base, int64_t before_ms, long *pruned)
{
    pg_store *s = (pg_store *)base;
    long n = 0;
    int rc = pg__begin(s, NULL);
    if (rc)
        return rc;
    rc = prune_tx(s, before_ms, &n);
    if (!rc)
        rc = pg__commit(s, NULL);
    else
        pg__rollback(s);
    if (pruned)
        *pruned = rc ? 0 : n;
    return rc;
}

/* ---- second factor (TOTP) ------------------------------------------------------ */

static int u_totp_get(fm_store *base, int64_t user_id, fm_totp *out)
{
    memset(out, 0, sizeof *out);
    pg_args a = {0};
    pg__i64(&a, user_id);
    int rc;
    PGresult *r = pg__run((pg_store *)base,
                          "SELECT secret, confirmed, last_step FROM user_totp WHERE user_id = $1",
                          &a, "totp", &rc, NULL);
    if (!r)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return FM_ENOTFOUND;
    }
    void *secret = NULL;
    size_t len = 0;
    rc = pg__bytea(r, 0, 0, &secret, &len);
    if (!rc && (len == 0 || len > sizeof out->secret))
        rc = FM_EDB;
    if (!rc) {
        memcpy(out->secret, secret, len);
        out->secret_len = len;
        out->confirmed = (int)pg__int(r, 0, 1);
        out->last_step = pg__int(r, 0, 2);
    }
    fm_free(secret);
    PQclear(r);
    return rc;
}

static int totp_set_tx(pg_store *s, int64_t user_id, const unsigned char *secret, size_t len,
                       int64_t now_ms, fm_errbuf *err)
{
    int rc = pg__lock(s, PG_LOCK_USERS, err);
    if (rc)
        return rc;
    pg_args a = {0};
    pg__i64(&a, user_id);
    PGresult *r = pg__run(s, "SELECT confirmed FROM user_totp WHERE user_id = $1", &a, "totp",
                          &rc, err);
    if (!r)
        return rc;
    int confirmed = PQntuples(r) && pg__int(r, 0, 0);
    PQclear(r);
    if (confirmed)
        return fm_errf(err, FM_EEXIST, "a confirmed second factor exists");
    pg__bin(&a, secret, len);
    pg__i64(&a, now_ms);
    long changed = 0;
    rc = pg__cmd(s,
                 "INSERT INTO user_totp(user_id, secret, confirmed, last_step, created_ms)"
                 " SELECT id, $2, 0, 0, $3 FROM users WHERE id = $1"
                 " ON CONFLICT (user_id) DO UPDATE SET secret = excluded.secret, confirmed = 0,"
                 " last_step = 0, created_ms = excluded.created_ms",
                 &a, "totp", &changed, err);
    if (rc)
        return rc;
    return changed == 1 ? 0 : fm_errf(err, FM_ENOTFOUND, "no such user");
}

static int u_totp_set(fm_store *base, int64_t user_id, const unsigned char *secret, size_t len,
                      int64_t now_ms, fm_errbuf *err)
{
    pg_store *s = (pg_store *)base;
    if (!secret || len == 0 || len > sizeof((fm_totp *)0)->secret)
        return fm_errf(err, FM_EINVAL, "totp: bad secret length");
    PG_TX(s, err, totp_set_tx(s, user_id, secret, len, now_ms, err));
}

static int u_totp_use(fm_store *base, int64_t user_id, int64_t step, int confirm,
                      fm_errbuf *err)
{
    long changed = 0;
    /* One statement: the step check and its use cannot be split. */
    int rc = run_id((pg_store *)base,
                    confirm ? "UPDATE user_totp SET last_step = $2, confirmed = 1"
                              " WHERE user_id = $1 AND last_step < $2"
                            : "UPDATE user_totp SET last_step = $2"
                              " WHERE user_id = $1 AND last_step < $2 AND confirmed = 1",
                    user_id, NULL, true, step, &changed, err);
    if (rc)
        return rc;
    return changed == 1 ? 0 : fm_errf(err, FM_ESTATE, "code already used");
}

static int u_totp_delete(fm_store *base, int64_t user_id, fm_errbuf *err)
{
    return run_id((pg_store *)base, "DELETE FROM user_totp WHERE user_id = $1", user_id, NULL,
                  false, 0, NULL, err);
}

static int u_user_create(fm_store *base, const char *tenant, const char *username,
                         const char *hash, const char *roles, fm_errbuf *err)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    pg__text(&a, username);
    pg__text(&a, hash);
    pg__text(&a, roles);
    pg__i64(&a, fm_wall_ms());
    return pg__cmd((pg_store *)base,
                   "INSERT INTO users(tenant, username, password_hash, roles, created_ms)"
                   " VALUES($1, $2, $3, $4, $5)",
                   &a, "user", NULL, err);
}

static int u_user_count(fm_store *base, const char *tenant, long *out)
{
    pg_args a = {0};
    pg__text(&a, tenant);
    int rc;
    PGresult *r = pg__run((pg_store *)base, "SELECT count(*) FROM users WHERE tenant = $1", &a,
                          "users", &rc, NULL);
    if (!r)
        return rc;
    *out = (long)pg__int(r, 0, 0);
    PQclear(r);
    return 0;
}

const fm_store_users_vt pg__users_vt = {
    .user_create = u_user_create,
    .user_count = u_user_count,
    .user_get = u_user_get,
    .user_get_by_id = u_user_get_by_id,
    .user_list = u_user_list,
    .user_set_password = u_user_set_password,
    .user_set_status = u_user_set_status,
    .user_set_roles = u_user_set_roles,
    .user_revoke_sessions = u_user_revoke_sessions,
    .throttle_attempt = u_throttle_attempt,
    .throttle_release = u_throttle_release,
    .throttle_prune = u_throttle_prune,
    .session_create = u_session_create,
    .refresh_rotate = u_refresh_rotate,
    .refresh_revoke = u_refresh_revoke,
    .session_active = u_session_active,
    .refresh_prune = u_refresh_prune,
    .totp_get = u_totp_get,
    .totp_set = u_totp_set,
    .totp_use = u_totp_use,
    .totp_delete = u_totp_delete,
};
