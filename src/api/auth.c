/*
 * Password policy, usernames, roles and sign-in (with throttling). Tokens
 * are in tokens.c, hashing in password.c.
 */
#include "fleetml/auth.h"
#include "fleetml/json.h"

#include <jansson.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- password policy ---------------------------------------------------------- */

/* The bundled list: lower case, sorted bytewise, generated from
 * common-passwords.txt (only entries of FM_PASSWORD_MIN bytes or more:
 * shorter ones are refused by the length rule anyway). */
static const char *const common_passwords[] = {
#include "common-passwords.inc"
};
#define N_COMMON (sizeof common_passwords / sizeof common_passwords[0])

static int cmp_str(const void *key, const void *elem)
{
    return strcmp((const char *)key, *(const char *const *)elem);
}

static void ascii_lower(const char *in, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        out[i] = (in[i] >= 'A' && in[i] <= 'Z') ? (char)(in[i] - 'A' + 'a') : in[i];
    out[n] = '\0';
}

int fm_password_is_common(const char *password)
{
    size_t n = strnlen(password, FM_PASSWORD_MAX + 1);
    if (n > FM_PASSWORD_MAX)
        return 0;
    char low[FM_PASSWORD_MAX + 1];
    ascii_lower(password, n, low);
    int hit = bsearch(low, common_passwords, N_COMMON, sizeof common_passwords[0], cmp_str) != NULL;
    OPENSSL_cleanse(low, sizeof low);
    return hit;
}

/* Counts the code points of valid UTF-8 text of n bytes; -1 when it is not
 * valid UTF-8 (overlongs, surrogates and > U+10FFFF included) or holds a
 * control character. */
static long utf8_chars(const unsigned char *p, size_t n)
{
    long count = 0;
    for (size_t i = 0; i < n; count++) {
        unsigned c = p[i];
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                return -1;
            i++;
            continue;
        }
        size_t len;
        unsigned cp;
        if (c >= 0xc2 && c <= 0xdf)
            len = 2, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef)
            len = 3, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4)
            len = 4, cp = c & 0x07;
        else
            return -1;
        if (i + len > n)
            return -1;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return -1;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0x80 && cp < 0xa0))
            return -1;
        i += len;
    }
    return count;
}

int fm_password_check_policy(const char *password, const char *username, const char **reason)
{
    const char *why = NULL;
    if (!password) {
        why = "a password is required";
        goto refuse;
    }
    /* Bounded: a megabyte of input costs 129 byte reads, nothing more. */
    size_t n = strnlen(password, FM_PASSWORD_MAX + 1);
    if (n > FM_PASSWORD_MAX) {
        why = "the password is too long (at most 128 bytes)";
        goto refuse;
    }
    long chars = utf8_chars((const unsigned char *)password, n);
    if (chars < 0) {
        why = "the password must be valid UTF-8 text without control characters";
        goto refuse;
    }
    if (chars < FM_PASSWORD_MIN) {
        why = "the password is too short (at least 12 characters)";
        goto refuse;
    }
    if (fm_password_is_common(password)) {
        why = "this password is too common; choose another one";
        goto refuse;
    }
    if (username) {
        char user[65], low[FM_PASSWORD_MAX + 1];
        size_t un = strnlen(username, sizeof user - 1);
        ascii_lower(username, un, user);
        ascii_lower(password, n, low);
        int contains = un >= 4 && strstr(low, user) != NULL;
        OPENSSL_cleanse(low, sizeof low);
        if (contains) {
            why = "the password must not contain the username";
            goto refuse;
        }
    }
    return 0;
refuse:
    if (reason)
        *reason = why;
    return FM_EINVAL;
}

/* ---- usernames ------------------------------------------------------------------ */

int fm_username_normalize(const char *in, char *out, size_t out_len)
{
    if (!in || out_len < 2)
        return FM_EINVAL;
    size_t n = strnlen(in, 65);
    if (n == 0 || n > 64 || n >= out_len)
        return FM_EINVAL;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '@' && c != '-')))
            return FM_EINVAL;
        out[i] = c;
    }
    out[n] = '\0';
    return 0;
}

/* ---- roles -------------------------------------------------------------------- */

static const struct {
    const char *name;
    unsigned bit;
} role_names[] = {
    {"admin", FM_ROLE_ADMIN},
    {"clinician", FM_ROLE_CLINICIAN},
    {"data_scientist", FM_ROLE_DATA_SCIENTIST},
    {"device_manager", FM_ROLE_DEVICE_MANAGER},
    {"operator", FM_ROLE_OPERATOR},
};

/* The permission table, documented in fleetml/auth.h. Keep the two in
 * step; tests/unit/test_auth.c checks every cell. */
static const struct {
    const char *action;
    unsigned roles;
} permissions[] = {
    {"users.manage", FM_ROLE_ADMIN | FM_ROLE_OPERATOR},
    {"devices.read", FM_ROLE_ADMIN | FM_ROLE_CLINICIAN | FM_ROLE_DATA_SCIENTIST |
                         FM_ROLE_DEVICE_MANAGER | FM_ROLE_OPERATOR},
    {"devices.manage", FM_ROLE_ADMIN | FM_ROLE_DEVICE_MANAGER | FM_ROLE_OPERATOR},
    {"templates.manage", FM_ROLE_ADMIN | FM_ROLE_OPERATOR},
    {"measurements.read", FM_ROLE_CLINICIAN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"labels.write", FM_ROLE_CLINICIAN},
    {"models.predict", FM_ROLE_CLINICIAN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"models.manage", FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"models.read", FM_ROLE_ADMIN | FM_ROLE_CLINICIAN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"models.approve", FM_ROLE_ADMIN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"models.deploy", FM_ROLE_ADMIN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"data.export", FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
    {"audit.read", FM_ROLE_ADMIN | FM_ROLE_OPERATOR},
    {"rules.manage", FM_ROLE_ADMIN | FM_ROLE_DATA_SCIENTIST | FM_ROLE_OPERATOR},
};

int fm_auth_roles_parse(const char *list, unsigned *mask)
{
    if (!list || !*list)
        return FM_EINVAL;
    unsigned m = 0;
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        unsigned bit = 0;
        for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
            if (strlen(role_names[i].name) == len && memcmp(role_names[i].name, p, len) == 0)
                bit = role_names[i].bit;
        if (!bit || (m & bit))
            return FM_EINVAL;
        m |= bit;
        if (!end)
            break;
        p = end + 1;
    }
    *mask = m;
    return 0;
}

int fm_auth_roles_format(unsigned mask, char *out, size_t len)
{
    size_t used = 0;
    if (!len)
        return FM_ERANGE;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++) {
        if (!(mask & role_names[i].bit))
            continue;
        int w = snprintf(out + used, len - used, "%s%s", used ? "," : "", role_names[i].name);
        if (w < 0 || (size_t)w >= len - used)
            return FM_ERANGE;
        used += (size_t)w;
    }
    return 0;
}

bool fm_auth_allowed(unsigned roles, const char *action)
{
    if (!action || !roles)
        return false;
    for (size_t i = 0; i < sizeof permissions / sizeof permissions[0]; i++)
        if (strcmp(permissions[i].action, action) == 0)
            return (permissions[i].roles & roles) != 0;
    return false;
}

/* ---- sign-in ------------------------------------------------------------------ */

/* A hash of a random password with the same parameters as real ones, so a
 * sign-in for a user that does not exist costs what a real one costs. */
static char dummy_hash[FM_PASSWORD_HASH_MAX];
static int dummy_rc;
static pthread_once_t dummy_once = PTHREAD_ONCE_INIT;

static void make_dummy(void)
{
    char pw[33];
    dummy_rc = fm_password_generate(pw, 32);
    if (!dummy_rc)
        dummy_rc = fm_password_hash(pw, dummy_hash, sizeof dummy_hash);
    OPENSSL_cleanse(pw, sizeof pw);
}

/* Throttle keys are hashes: bounded in size whatever the client sends, and
 * the table holds no usernames or addresses in clear. */
static int throttle_key(const char *prefix, const char *a, const char *b, char *out, size_t len)
{
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) &&
             EVP_DigestUpdate(ctx, prefix, strlen(prefix) + 1) &&
             EVP_DigestUpdate(ctx, a, strlen(a) + 1) && (!b || EVP_DigestUpdate(ctx, b, strlen(b))) &&
             EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    if (!ok || len < strlen(prefix) + 2 + 2 * sizeof md)
        return FM_ECRYPTO;
    size_t w = (size_t)snprintf(out, len, "%s:", prefix);
    for (size_t i = 0; i < sizeof md; i++)
        w += (size_t)snprintf(out + w, len - w, "%02x", md[i]);
    return 0;
}

static int64_t ceil_seconds(int64_t ms)
{
    return ms <= 0 ? 0 : (ms + 999) / 1000;
}

/* After a correct password: 0 when the user has no confirmed TOTP, 1 when
 * the code is right (its step is then used up), FM_ESTATE when a code is
 * needed and none was given, FM_EPERM for a wrong or replayed code. */
static int second_factor(fm_store *s, int64_t user_id, const char *otp, int64_t now_ms)
{
    fm_totp t;
    int rc = fm_store_totp_get(s, user_id, &t);
    if (rc == FM_ENOTFOUND || (rc == 0 && !t.confirmed)) {
        OPENSSL_cleanse(&t, sizeof t);
        return 0; /* no second factor to check */
    }
    if (rc)
        return rc;
    int64_t step = 0;
    if (!otp || !*otp)
        rc = FM_ESTATE;
    else if (fm_totp_verify(t.secret, t.secret_len, otp, now_ms, t.last_step, &step) != 0)
        rc = FM_EPERM;
    else
        rc = fm_store_totp_use(s, user_id, step, 0, NULL) == 0 ? 1 : FM_EPERM;
    OPENSSL_cleanse(&t, sizeof t);
    return rc;
}

int fm_auth_login_ex(fm_store *s, const fm_throttle_policy *policy, const char *tenant,
                     const char *username, const char *password, const char *otp,
                     const char *client_addr, int64_t now_ms, fm_user *out_user,
                     int64_t *retry_after_s)
{
    if (retry_after_s)
        *retry_after_s = 0;
    if (!s || !tenant || !username || !password || !out_user)
        return FM_EINVAL;
    /* No password that long can be right: refuse before touching anything. */
    if (strnlen(password, FM_PASSWORD_MAX + 1) > FM_PASSWORD_MAX)
        return FM_EINVAL;
    fm_throttle_policy def = FM_THROTTLE_POLICY_DEFAULT;
    if (!policy)
        policy = &def;
    pthread_once(&dummy_once, make_dummy);
    if (dummy_rc)
        return FM_ECRYPTO;

    /* An invalid username cannot exist, but it is treated exactly like a
     * missing one (counted, verified against the dummy hash) so nothing
     * tells the two apart. */
    char uname[65];
    int valid = fm_username_normalize(username, uname, sizeof uname) == 0;
    if (!valid) {
        size_t n = strnlen(username, 64);
        ascii_lower(username, n, uname);
    }
    char acct_key[80], addr_key[80];
    int rc = throttle_key("acct", tenant, uname, acct_key, sizeof acct_key);
    int has_addr = client_addr && *client_addr;
    if (!rc && has_addr)
        rc = throttle_key("addr", client_addr, NULL, addr_key, sizeof addr_key);
    if (rc)
        return rc;
    const char *keys[2] = {acct_key, addr_key};
    int64_t locks[2] = {0, 0}, until = 0;
    /* Count the attempt first and take it back on success: concurrent
     * guesses then see each other's counts, so a burst of parallel
     * requests cannot all get through before the first failure lands. */
    /* An address gets a larger allowance than an account: many staff sign
     * in from behind one hospital NAT, and one of them mistyping must not
     * lock out the others. */
    fm_throttle_policy pols[2] = {*policy, *policy};
    pols[1].free_failures = policy->free_failures * FM_THROTTLE_ADDR_FACTOR;
    rc = fm_store_throttle_attempt(s, keys, has_addr ? 2 : 1, pols, now_ms, locks, &until, NULL);
    if (rc == FM_EBUSY) {
        if (retry_after_s)
            *retry_after_s = ceil_seconds(until - now_ms) > 0 ? ceil_seconds(until - now_ms) : 1;
        return FM_EBUSY;
    }
    if (rc)
        return rc;

    fm_user u;
    int found = 0;
    if (valid) {
        rc = fm_store_user_get(s, tenant, uname, &u);
        if (rc && rc != FM_ENOTFOUND)
            return rc;
        found = rc == 0;
    }
    int vrc = fm_password_verify(password, found ? u.password_hash : dummy_hash);
    int second = found && vrc == 0 && u.status == FM_USER_ACTIVE
                     ? second_factor(s, u.id, otp, now_ms)
                     : FM_EPERM;
    if (second < 0 && second != FM_EPERM && second != FM_ESTATE) {
        OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
        return second;
    }
    if (second == FM_ESTATE) {
        /* Right password, no code: not a failed guess, so the attempt is
         * taken back, but nothing is handed out either. */
        OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
        rc = fm_store_throttle_release(s, NULL, acct_key, locks[0], NULL);
        if (!rc && has_addr)
            rc = fm_store_throttle_release(s, NULL, addr_key, locks[1], NULL);
        return rc ? rc : FM_ESTATE;
    }
    if (second >= 0) {
        rc = fm_store_throttle_release(s, acct_key, has_addr ? addr_key : NULL, locks[1], NULL);
        OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
        if (rc)
            return rc;
        u.second_factor = second;
        *out_user = u;
        return 0;
    }
    if (found)
        OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
    if (retry_after_s && until > now_ms)
        *retry_after_s = ceil_seconds(until - now_ms);
    return FM_EPERM;
}

int fm_auth_login(fm_store *s, const char *tenant, const char *username, const char *password,
                  const char *client_addr, int64_t now_ms, fm_user *out_user,
                  int64_t *retry_after_s)
{
    return fm_auth_login_ex(s, NULL, tenant, username, password, NULL, client_addr, now_ms,
                            out_user, retry_after_s);
}

/* ---- user administration ----------------------------------------------------- */

static int find_user(fm_store *s, const char *tenant, const char *username, fm_user *u,
                     fm_errbuf *err)
{
    char uname[65];
    if (!tenant || fm_username_normalize(username, uname, sizeof uname) != 0)
        return fm_errf(err, FM_EINVAL, "invalid username");
    int rc = fm_store_user_get(s, tenant, uname, u);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "no user '%s' in tenant '%s'", uname, tenant);
    if (rc)
        return fm_errf(err, rc, "user lookup: %s", fm_strerror(rc));
    return 0;
}

int fm_auth_user_create(fm_store *s, const char *tenant, const char *username,
                        const char *password, const char *roles, const char **reason,
                        fm_errbuf *err)
{
    char uname[65], canon[128];
    unsigned mask;
    if (!tenant || !*tenant || fm_username_normalize(username, uname, sizeof uname) != 0) {
        if (reason)
            *reason = "usernames are 1 to 64 characters of a-z, 0-9, '.', '_', '@', '-'";
        return fm_errf(err, FM_EINVAL, "invalid username");
    }
    if (fm_auth_roles_parse(roles, &mask) != 0 ||
        fm_auth_roles_format(mask, canon, sizeof canon) != 0) {
        if (reason)
            *reason = "roles are a comma-separated list of admin, clinician, data_scientist,"
                      " device_manager, operator";
        return fm_errf(err, FM_EINVAL, "invalid roles");
    }
    const char *why = NULL;
    if (fm_password_check_policy(password, uname, &why) != 0) {
        if (reason)
            *reason = why;
        return fm_errf(err, FM_EINVAL, "%s", why);
    }
    int rc = fm_store_tenant_exists(s, tenant);
    if (rc < 0)
        return fm_errf(err, rc, "tenant lookup: %s", fm_strerror(rc));
    if (rc == 0)
        return fm_errf(err, FM_ENOTFOUND, "tenant '%s' does not exist", tenant);
    char hash[FM_PASSWORD_HASH_MAX];
    rc = fm_password_hash(password, hash, sizeof hash);
    if (rc)
        return fm_errf(err, rc, "hashing the password failed");
    rc = fm_store_user_create(s, tenant, uname, hash, canon, err);
    if (rc == FM_EEXIST)
        fm_errf(err, rc, "user '%s' already exists in tenant '%s'", uname, tenant);
    OPENSSL_cleanse(hash, sizeof hash);
    return rc;
}

int fm_auth_set_password(fm_store *s, const char *tenant, const char *username,
                         const char *password, const char **reason, fm_errbuf *err)
{
    fm_user u;
    int rc = find_user(s, tenant, username, &u, err);
    if (rc)
        return rc;
    const char *why = NULL;
    if (fm_password_check_policy(password, u.username, &why) != 0) {
        if (reason)
            *reason = why;
        return fm_errf(err, FM_EINVAL, "%s", why);
    }
    char hash[FM_PASSWORD_HASH_MAX];
    rc = fm_password_hash(password, hash, sizeof hash);
    if (rc)
        return fm_errf(err, rc, "hashing the password failed");
    rc = fm_store_user_set_password(s, u.id, hash, fm_wall_ms(), err);
    OPENSSL_cleanse(hash, sizeof hash);
    return rc;
}

int fm_auth_user_set_status(fm_store *s, const char *tenant, const char *username, int status,
                            fm_errbuf *err)
{
    if (status != FM_USER_ACTIVE && status != FM_USER_DISABLED)
        return fm_errf(err, FM_EINVAL, "invalid user status");
    fm_user u;
    int rc = find_user(s, tenant, username, &u, err);
    return rc ? rc : fm_store_user_set_status(s, u.id, status, fm_wall_ms(), err);
}

int fm_auth_user_set_roles(fm_store *s, const char *tenant, const char *username,
                           const char *roles, fm_errbuf *err)
{
    unsigned mask;
    char canon[128];
    if (fm_auth_roles_parse(roles, &mask) != 0 ||
        fm_auth_roles_format(mask, canon, sizeof canon) != 0)
        return fm_errf(err, FM_EINVAL, "invalid roles");
    fm_user u;
    int rc = find_user(s, tenant, username, &u, err);
    return rc ? rc : fm_store_user_set_roles(s, u.id, canon, err);
}

int fm_auth_housekeeping(fm_store *s, const fm_throttle_policy *policy, int64_t now_ms)
{
    fm_throttle_policy def = FM_THROTTLE_POLICY_DEFAULT;
    if (!policy)
        policy = &def;
    int rc = fm_store_throttle_prune(s, now_ms - policy->forget_after_ms, NULL);
    /* Expired refresh tokens are kept a day, so a late retry of one still
     * reads as "expired" rather than "unknown" in the meantime. */
    int rc2 = fm_store_refresh_prune(s, now_ms - 86400000, NULL);
    return rc ? rc : rc2;
}

json_t *fm_auth_roles_json(const char *roles)
{
    json_t *a = json_array();
    const char *p = roles;
    while (a && p && *p) {
        const char *c = strchr(p, ',');
        size_t n = c ? (size_t)(c - p) : strlen(p);
        json_array_append_new(a, json_stringn(p, n));
        p = c ? c + 1 : NULL;
    }
    return a;
}

json_t *fm_user_json(fm_store *st, const fm_user *u)
{
    fm_totp t;
    bool mfa = fm_store_totp_get(st, u->id, &t) == 0 && t.confirmed;
    OPENSSL_cleanse(&t, sizeof t);
    return json_pack("{s:I,s:s,s:s,s:o,s:s,s:b,s:o}", "id", (json_int_t)u->id, "tenant",
                     u->tenant, "username", u->username, "roles", fm_auth_roles_json(u->roles),
                     "status", u->status == FM_USER_ACTIVE ? "active" : "disabled", "mfa", mfa,
                     "created_at", fm_json_time(u->created_ms));
}
