/*
 * API v1: sign-in, token refresh, logout, the caller's own account, and
 * user administration. Policy (passwords, throttling, tokens) is in
 * auth.c / tokens.c; this file maps it onto HTTP and the audit log.
 */
#include "api/api_int.h"

#include <openssl/crypto.h>
#include <stdio.h>
#include <string.h>

#define MSG 192

static void answer_pair(api_req *r, unsigned status, fm_token_pair *p)
{
    api_json(r, status,
             json_pack("{s:s,s:s,s:s,s:I}", "access_token", p->access_token, "refresh_token",
                       p->refresh_token, "token_type", "Bearer", "expires_in",
                       (json_int_t)p->expires_in));
    fm_token_pair_clear(p);
}

void v1_login(api_req *r)
{
    const char *tenant = NULL, *username = NULL, *password = NULL, *otp = NULL;
    char msg[MSG];
    /* The password's length is checked by fm_auth_login before anything
     * else; here it only has to be a string (up to the body limit). */
    if (fm_api_get_str(r->json, "tenant", true, 64, &tenant, msg, sizeof msg) ||
        fm_api_get_str(r->json, "username", true, 64, &username, msg, sizeof msg) ||
        fm_api_get_str(r->json, "password", true, API_BODY_SMALL, &password, msg, sizeof msg) ||
        fm_api_get_str(r->json, "otp", false, 16, &otp, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    char target[160];
    snprintf(target, sizeof target, "user:%s/%s", tenant, username);
    fm_user u;
    int64_t retry = 0;
    int rc = fm_auth_login_ex(r->store, &r->h->throttle, tenant, username, password, otp,
                              r->client, r->now_ms, &u, &retry);
    /* Audit rows for unknown tenants are kept under "" so a probe cannot
     * create rows that look like they belong to a real tenant. */
    const char *audit_tenant = fm_store_tenant_exists(r->store, tenant) == 1 ? tenant : "";
    if (rc == FM_EINVAL) {
        api_audit(r, audit_tenant, "auth.login", target, "failed",
                  json_pack("{s:s}", "reason", "password too long"));
        api_error(r, 400, "invalid_request", "the password is longer than %d bytes",
                  FM_PASSWORD_MAX);
        return;
    }
    if (rc == FM_EBUSY) {
        r->retry_after = retry > 0 ? retry : 1;
        api_audit(r, audit_tenant, "auth.login", target, "throttled", NULL);
        api_error(r, 429, "too_many_requests",
                  "too many failed sign-ins; try again in %ld seconds", r->retry_after);
        return;
    }
    if (rc == FM_ESTATE) {
        api_audit(r, audit_tenant, "auth.login", target, "denied",
                  json_pack("{s:s}", "reason", "one-time code required"));
        api_error(r, 401, "mfa_required",
                  "this account has a second factor: send the current one-time code as 'otp'");
        return;
    }
    if (rc == FM_EPERM) {
        api_audit(r, audit_tenant, "auth.login", target, "failed", NULL);
        api_error(r, 401, "invalid_credentials",
                  otp ? "wrong tenant, username, password or one-time code"
                      : "wrong tenant, username or password");
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    fm_token_pair pair;
    rc = fm_auth_session_start(r->store, r->h->jwt, &u, r->now_ms, &r->h->tokens, &pair);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    snprintf(r->actor, sizeof r->actor, "user:%s/%s", u.tenant, u.username);
    api_audit(r, u.tenant, "auth.login", target, "ok", NULL);
    answer_pair(r, 200, &pair);
}

static bool refresh_token_arg(api_req *r, const char **tok)
{
    char msg[MSG];
    /* Any string is a token to check (an unknown one answers 401); only a
     * missing or non-string field is a malformed request. */
    if (fm_api_get_str(r->json, "refresh_token", true, API_BODY_SMALL, tok, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return false;
    }
    return true;
}

void v1_refresh(api_req *r)
{
    const char *tok;
    if (!refresh_token_arg(r, &tok))
        return;
    fm_token_pair pair;
    fm_user u;
    memset(&u, 0, sizeof u);
    int reuse = 0;
    int rc = fm_auth_refresh(r->store, r->h->jwt, tok, r->now_ms, &r->h->tokens, &pair, &u,
                             &reuse);
    if ((rc == 0 || reuse) && u.username[0])
        snprintf(r->actor, sizeof r->actor, "user:%s/%s", u.tenant, u.username);
    if (reuse)
        api_audit(r, u.tenant, "auth.refresh_reuse", r->actor, "denied",
                  json_pack("{s:s}", "effect", "session revoked"));
    if (rc == FM_EPERM) {
        api_error(r, 401, "invalid_token", "the refresh token is invalid, expired or revoked");
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, u.tenant, "auth.refresh", r->actor, "ok", NULL);
    answer_pair(r, 200, &pair);
}

void v1_logout(api_req *r)
{
    const char *tok;
    if (!refresh_token_arg(r, &tok))
        return;
    fm_user u;
    int rc = fm_auth_logout(r->store, tok, r->now_ms, &u);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    if (u.id) {
        snprintf(r->actor, sizeof r->actor, "user:%s/%s", u.tenant, u.username);
        api_audit(r, u.tenant, "auth.logout", r->actor, "ok", NULL);
    }
    api_no_content(r);
}

void v1_me(api_req *r)
{
    fm_user u;
    int rc = fm_store_user_get_by_id(r->store, r->who.user_id, &u);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
    api_json(r, 200, fm_user_json(r->store, &u));
}

/* A password refused by policy: 422 with the policy's sentence. */
static void weak_password(api_req *r, const char *reason)
{
    api_error(r, 422, "weak_password", "%s", reason ? reason : "the password is not acceptable");
}

/* Checks current_password (and otp, for a user with a second factor) from
 * the body like a sign-in, throttle included: a stolen access token must
 * not become a password-guessing oracle, nor be enough to change how the
 * account signs in. false: answered. */
static bool reauthenticate(api_req *r, const char *action)
{
    const char *cur = NULL, *otp = NULL;
    char msg[MSG];
    if (fm_api_get_str(r->json, "current_password", true, API_BODY_SMALL, &cur, msg, sizeof msg) ||
        fm_api_get_str(r->json, "otp", false, 16, &otp, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return false;
    }
    fm_user u;
    int64_t retry = 0;
    int rc = fm_auth_login_ex(r->store, &r->h->throttle, r->who.tenant, r->who.username, cur, otp,
                              r->client, r->now_ms, &u, &retry);
    if (rc == 0)
        return true;
    if (rc == FM_EBUSY) {
        r->retry_after = retry > 0 ? retry : 1;
        api_audit(r, NULL, action, r->actor, "throttled", NULL);
        api_error(r, 429, "too_many_requests", "too many failed attempts; try again later");
    } else if (rc == FM_ESTATE) {
        api_error(r, 401, "mfa_required", "send the current one-time code as 'otp' as well");
    } else if (rc == FM_EPERM || rc == FM_EINVAL) {
        api_audit(r, NULL, action, r->actor, "failed", NULL);
        api_error(r, 401, "invalid_credentials", "the current password or code is wrong");
    } else {
        api_store_error(r, rc);
    }
    return false;
}

void v1_me_password(api_req *r)
{
    const char *neu = NULL;
    char msg[MSG];
    if (fm_api_get_str(r->json, "new_password", true, API_BODY_SMALL, &neu, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (!reauthenticate(r, "user.password"))
        return;
    int rc;
    const char *reason = NULL;
    fm_errbuf err;
    rc = fm_auth_set_password(r->store, r->who.tenant, r->who.username, neu, &reason, &err);
    if (rc == FM_EINVAL) {
        weak_password(r, reason);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, NULL, "user.password", r->actor, "ok", NULL);
    api_no_content(r);
}

/* ---- user administration ---- */

typedef struct user_page {
    fm_store *store;
    json_t *items;
    const char *after;
    size_t max; /* one more than the page holds */
} user_page;

static int on_user(void *ud, const fm_user *u)
{
    user_page *p = ud;
    if (p->after[0] && strcmp(u->username, p->after) <= 0)
        return 0;
    json_array_append_new(p->items, fm_user_json(p->store, u));
    return json_array_size(p->items) >= p->max;
}

void v1_users_list(api_req *r)
{
    const char *tenant;
    size_t limit;
    int64_t a, b;
    char after[72];
    if (!api_scope_tenant(r, &tenant) || !api_page_args(r, &limit, &a, &b, after, sizeof after))
        return;
    user_page p = {.store = r->store, .items = json_array(), .after = after, .max = limit + 1};
    int rc = fm_store_user_list(r->store, tenant, on_user, &p);
    char next[128] = "";
    if (!rc)
        api_page_more_by_name(p.items, limit, "username", next, sizeof next);
    api_page_answer(r, rc, p.items, next);
}

/* Loads the user named in the path within the scoped tenant. */
static bool path_user(api_req *r, const char **tenant, fm_user *u)
{
    char name[65];
    if (!api_scope_tenant(r, tenant))
        return false;
    if (fm_username_normalize(r->params[0], name, sizeof name) != 0) {
        api_error(r, 404, "not_found", "no such user");
        return false;
    }
    int rc = fm_store_user_get(r->store, *tenant, name, u);
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no such user");
        return false;
    }
    if (rc) {
        api_store_error(r, rc);
        return false;
    }
    OPENSSL_cleanse(u->password_hash, sizeof u->password_hash);
    return true;
}

static void answer_user(api_req *r, const char *tenant, const char *username, unsigned status)
{
    fm_user u;
    int rc = fm_store_user_get(r->store, tenant, username, &u);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
    api_json(r, status, fm_user_json(r->store, &u));
}

/* A user who holds the operator role is managed by operators only: a
 * tenant admin must not be able to demote or lock out the platform
 * operator. */
static bool manageable(api_req *r, const fm_user *u)
{
    unsigned mask = 0;
    fm_auth_roles_parse(u->roles, &mask);
    if ((mask & FM_ROLE_OPERATOR) && !(r->who.role_mask & FM_ROLE_OPERATOR)) {
        api_error(r, 403, "forbidden", "only an operator may change an operator's account");
        return false;
    }
    return true;
}

/* Only an operator may hand out the operator role. */
static bool roles_grantable(api_req *r, unsigned mask)
{
    if ((mask & FM_ROLE_OPERATOR) && !(r->who.role_mask & FM_ROLE_OPERATOR)) {
        api_error(r, 403, "forbidden", "only an operator may grant the operator role");
        return false;
    }
    return true;
}

void v1_users_create(api_req *r)
{
    const char *tenant, *username = NULL, *password = NULL;
    unsigned mask = 0;
    char msg[MSG], roles[128], name[65];
    if (!api_scope_tenant(r, &tenant))
        return;
    if (fm_api_get_str(r->json, "username", true, 64, &username, msg, sizeof msg) ||
        fm_api_get_str(r->json, "password", true, API_BODY_SMALL, &password, msg, sizeof msg) ||
        fm_api_get_roles(r->json, "roles", &mask, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (fm_username_normalize(username, name, sizeof name) != 0) {
        api_error(r, 400, "invalid_request",
                  "username must be 1-64 characters of a-z, 0-9, '.', '_', '@', '-'");
        return;
    }
    if (!roles_grantable(r, mask))
        return;
    fm_auth_roles_format(mask, roles, sizeof roles);
    const char *reason = NULL;
    fm_errbuf err;
    int rc = fm_auth_user_create(r->store, tenant, name, password, roles, &reason, &err);
    char target[160];
    snprintf(target, sizeof target, "user:%s/%s", tenant, name);
    if (rc == FM_EINVAL) {
        weak_password(r, reason);
        return;
    }
    if (rc == FM_EEXIST) {
        api_error(r, 409, "conflict", "user '%s' already exists", name);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, tenant, "user.create", target, "ok", json_pack("{s:s}", "roles", roles));
    answer_user(r, tenant, name, 201);
}

void v1_user_get(api_req *r)
{
    const char *tenant;
    fm_user u;
    if (path_user(r, &tenant, &u))
        api_json(r, 200, fm_user_json(r->store, &u));
}

void v1_user_roles(api_req *r)
{
    const char *tenant;
    fm_user u;
    unsigned mask = 0;
    char msg[MSG], roles[128];
    if (!path_user(r, &tenant, &u) || !manageable(r, &u))
        return;
    if (fm_api_get_roles(r->json, "roles", &mask, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (!roles_grantable(r, mask))
        return;
    fm_auth_roles_format(mask, roles, sizeof roles);
    fm_errbuf err;
    int rc = fm_auth_user_set_roles(r->store, tenant, u.username, roles, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[160];
    snprintf(target, sizeof target, "user:%s/%s", tenant, u.username);
    api_audit(r, tenant, "user.roles", target, "ok",
              json_pack("{s:s,s:s}", "from", u.roles, "to", roles));
    answer_user(r, tenant, u.username, 200);
}

static void set_status(api_req *r, int status)
{
    const char *tenant;
    fm_user u;
    if (!path_user(r, &tenant, &u) || !manageable(r, &u))
        return;
    if (status == FM_USER_DISABLED && u.id == r->who.user_id) {
        api_error(r, 409, "conflict", "you cannot disable your own account");
        return;
    }
    fm_errbuf err;
    int rc = fm_auth_user_set_status(r->store, tenant, u.username, status, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[160];
    snprintf(target, sizeof target, "user:%s/%s", tenant, u.username);
    api_audit(r, tenant, status == FM_USER_DISABLED ? "user.disable" : "user.enable", target, "ok",
              NULL);
    answer_user(r, tenant, u.username, 200);
}

void v1_user_disable(api_req *r) { set_status(r, FM_USER_DISABLED); }
void v1_user_enable(api_req *r) { set_status(r, FM_USER_ACTIVE); }

/* ---- second factor (TOTP) ---- */

/* Starts enrolment: a new secret, shown once, not required at sign-in
 * until confirmed with a code from the app. */
void v1_mfa_totp_start(api_req *r)
{
    if (!reauthenticate(r, "user.mfa"))
        return;
    unsigned char secret[FM_TOTP_SECRET_LEN];
    char b32[64], uri[512];
    fm_errbuf err;
    int rc = fm_totp_new_secret(secret, sizeof secret);
    if (!rc)
        rc = fm_store_totp_set(r->store, r->who.user_id, secret, sizeof secret, r->now_ms, &err);
    if (rc == FM_EEXIST) {
        api_error(r, 409, "conflict", "a second factor is already active; disable it first");
    } else if (rc) {
        api_store_error(r, rc);
    } else {
        char issuer[80];
        snprintf(issuer, sizeof issuer, "fleetml-%s", r->who.tenant);
        fm_base32_encode(secret, sizeof secret, b32, sizeof b32);
        if (fm_totp_uri(issuer, r->who.username, secret, sizeof secret, uri, sizeof uri) != 0)
            uri[0] = '\0';
        api_audit(r, NULL, "user.mfa", r->actor, "ok", json_pack("{s:s}", "step", "enrol"));
        api_json(r, 201,
                 json_pack("{s:s,s:s,s:b,s:i,s:i}", "secret", b32, "otpauth_uri", uri,
                           "confirmed", 0, "digits", FM_TOTP_DIGITS, "period", FM_TOTP_STEP_S));
    }
    OPENSSL_cleanse(secret, sizeof secret);
    OPENSSL_cleanse(b32, sizeof b32);
    OPENSSL_cleanse(uri, sizeof uri);
}

void v1_mfa_totp_confirm(api_req *r)
{
    const char *code = NULL;
    char msg[MSG];
    if (fm_api_get_str(r->json, "otp", true, 16, &code, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    fm_totp t;
    int rc = fm_store_totp_get(r->store, r->who.user_id, &t);
    if (rc == FM_ENOTFOUND || (rc == 0 && t.confirmed)) {
        OPENSSL_cleanse(&t, sizeof t);
        api_error(r, 409, "conflict", "no second factor is being enrolled");
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    int64_t step = 0;
    fm_errbuf err;
    rc = fm_totp_verify(t.secret, t.secret_len, code, r->now_ms, t.last_step, &step);
    OPENSSL_cleanse(&t, sizeof t);
    if (rc == 0)
        rc = fm_store_totp_use(r->store, r->who.user_id, step, 1, &err);
    if (rc == FM_EPERM || rc == FM_ESTATE) {
        api_audit(r, NULL, "user.mfa", r->actor, "failed", json_pack("{s:s}", "step", "confirm"));
        api_error(r, 422, "validation_failed", "the code does not match; check the app's clock");
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, NULL, "user.mfa", r->actor, "ok", json_pack("{s:s}", "step", "confirm"));
    v1_me(r);
}

void v1_mfa_totp_disable(api_req *r)
{
    if (!reauthenticate(r, "user.mfa"))
        return;
    fm_errbuf err;
    int rc = fm_store_totp_delete(r->store, r->who.user_id, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, NULL, "user.mfa", r->actor, "ok", json_pack("{s:s}", "step", "disable"));
    api_no_content(r);
}

/* An admin's answer to a lost phone: the second factor goes and so do the
 * user's sessions (whoever holds them may hold the phone too). */
void v1_user_mfa_reset(api_req *r)
{
    const char *tenant;
    fm_user u;
    if (!path_user(r, &tenant, &u) || !manageable(r, &u))
        return;
    fm_errbuf err;
    int rc = fm_store_totp_delete(r->store, u.id, &err);
    if (!rc)
        rc = fm_auth_logout_all(r->store, u.id, r->now_ms, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[160];
    snprintf(target, sizeof target, "user:%s/%s", tenant, u.username);
    api_audit(r, tenant, "user.mfa_reset", target, "ok", NULL);
    answer_user(r, tenant, u.username, 200);
}
