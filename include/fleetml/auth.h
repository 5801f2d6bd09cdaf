/*
 * User authentication: passwords, sign-in throttling, roles, access and
 * refresh tokens. This is the security core the HTTP API (issue 5) is built
 * on; it never logs a password, a token or a key. Design notes:
 * docs/architecture.md, "Users, sessions and tokens".
 *
 * Passwords are hashed with argon2id at OWASP's recommended cost (m = 19
 * MiB, t = 2, p = 1) and stored in the PHC string format
 * ("$argon2id$v=19$m=19456,t=2,p=1$salt$hash").
 *
 * Time: functions that take `now_ms` use milliseconds since the Unix epoch
 * (fm_wall_ms() in production; tests inject their own clock). JWT claims
 * are in seconds, as RFC 7519 requires.
 */
#ifndef FLEETML_AUTH_H
#define FLEETML_AUTH_H

#include "fleetml/core.h"
#include "fleetml/store.h"

#include <stdbool.h>

#define FM_PASSWORD_MIN 12
#define FM_PASSWORD_MAX 128
#define FM_PASSWORD_HASH_MAX 128

/* Hashes password with a fresh random salt into out (>= FM_PASSWORD_HASH_MAX
 * bytes). Returns 0, FM_EINVAL (length outside 12..128) or FM_ECRYPTO. */
int fm_password_hash(const char *password, char *out, size_t len);

/* Returns 0 when password matches the stored hash, FM_EPERM when it does
 * not, FM_EINVAL for a malformed hash or an over-long password. */
int fm_password_verify(const char *password, const char *hash);

/* Generates a random password of `chars` characters from an unambiguous
 * alphabet (CSPRNG) into out (size > chars). Returns 0 or FM_ECRYPTO. */
int fm_password_generate(char *out, size_t chars);

/* ---- password policy (NIST SP 800-63B / OWASP ASVS 2.1) -----------------
 * A password is accepted when it has at least FM_PASSWORD_MIN characters
 * (Unicode code points of its UTF-8 text), at most FM_PASSWORD_MAX bytes,
 * is valid UTF-8 without control characters, is not on the bundled list of
 * common passwords (src/api/common-passwords.txt, compared case-
 * insensitively), and does not contain the username (when the username has
 * 4 or more characters; case-insensitive). There are no composition rules.
 *
 * The length is checked first and in bounded time (strnlen to
 * FM_PASSWORD_MAX + 1), so a megabyte of input is refused without being
 * scanned or hashed. Returns 0, or FM_EINVAL with *reason (if reason is
 * non-NULL) set to a static English sentence fit to show the user.
 * username may be NULL. */
int fm_password_check_policy(const char *password, const char *username, const char **reason);

/* 1 when password (any case) is on the bundled common-password list. */
int fm_password_is_common(const char *password);

/* ---- usernames -------------------------------------------------------------
 * Usernames are 1..64 characters of [a-z0-9._@-], starting with a letter or
 * digit. They are case-insensitive: callers pass user input through
 * fm_username_normalize, which lower-cases it into out (>= 65 bytes) and
 * returns 0, or FM_EINVAL when the result is not a valid username. */
int fm_username_normalize(const char *in, char *out, size_t out_len);

/* ---- roles and the permission table ---------------------------------------
 * Roles are stored as a comma-separated list ("admin,clinician"). Within a
 * tenant: admin (users, devices, templates, audit), clinician (read devices
 * and measurements, write labels, call models), data_scientist (read all
 * tenant data, export, models), device_manager (devices only). operator is
 * the platform operator and spans tenants (see fm_auth_tenant_allowed).
 *
 * Actions (fm_auth_allowed; anything not in this table is denied):
 *
 *   action               admin clinician data_scientist device_manager operator
 *   users.manage           x                                              x
 *   devices.read           x      x           x               x           x
 *   devices.manage         x                                  x           x
 *   templates.manage       x                                              x
 *   measurements.read             x           x                           x
 *   labels.write                  x
 *   models.predict                x           x                           x
 *   models.manage                             x                           x
 *   models.read            x      x           x                           x
 *   models.approve         x                  x                           x
 *   models.deploy          x                  x                           x
 *   data.export                               x                           x
 *   audit.read             x                                              x
 *   rules.manage           x                  x                           x
 *
 * Actions on oneself (read /me, change one's own password, log out) need no
 * role. An admin does not read clinical data by default: that is what the
 * clinician and data_scientist roles are for (data minimisation). */
enum fm_role {
    FM_ROLE_ADMIN = 1u << 0,
    FM_ROLE_CLINICIAN = 1u << 1,
    FM_ROLE_DATA_SCIENTIST = 1u << 2,
    FM_ROLE_DEVICE_MANAGER = 1u << 3,
    FM_ROLE_OPERATOR = 1u << 4
};

/* Parses a comma-separated role list (no blanks, no duplicates, at least one
 * role) into a bit mask of enum fm_role. Returns 0 or FM_EINVAL. */
int fm_auth_roles_parse(const char *list, unsigned *mask);

struct json_t;
/* A comma-separated role list as a JSON array of strings (as written, no
 * check). New reference; NULL when out of memory. */
struct json_t *fm_auth_roles_json(const char *roles);
/* A user as the API (schema User) and `fleetml user list --json` show it:
 * id, tenant, username, roles, status, mfa (a confirmed second factor, read
 * from st), created_at. New reference; NULL when out of memory. */
struct json_t *fm_user_json(fm_store *st, const fm_user *u);
/* Writes the canonical comma-separated list of mask (in enum order) into out.
 * Returns 0 or FM_ERANGE when it does not fit. */
int fm_auth_roles_format(unsigned mask, char *out, size_t len);
/* true when one of the roles in mask may perform action. Deny by default:
 * an unknown action, a NULL action or an empty mask is false. */
bool fm_auth_allowed(unsigned roles, const char *action);

/* ---- sign-in throttling ------------------------------------------------------
 * Failed sign-ins are counted per account (tenant + username, whether or not
 * it exists) and per client address, in the store, so a restart does not
 * reset them. After `free_failures` failures each further failure locks the
 * key for base_delay_ms doubled per failure (1 s, 2 s, 4 s, ...), at most
 * max_delay_ms. A lock always expires; attempts made while locked are
 * refused without being counted, and a key whose last failure is older than
 * forget_after_ms starts over. A client address is allowed
 * FM_THROTTLE_ADDR_FACTOR times more free failures than an account (many
 * users share one address behind a NAT). A successful sign-in resets the account's
 * counter (not the address's: one valid account must not let an address
 * keep guessing at others).
 * (fm_throttle_policy, FM_THROTTLE_POLICY_DEFAULT and fm_throttle_delay_ms are
 * defined in fleetml/store.h, which keeps the counters.) */

#define FM_THROTTLE_ADDR_FACTOR 4

/* Signs a user in. tenant and username are user input (the username is
 * normalised here); client_addr is the peer address as the HTTP layer sees
 * it (after any trusted-proxy handling), or "" when unknown.
 *
 * Returns:
 *   0          *out_user filled (password_hash cleared);
 *   FM_EPERM   bad credentials. The same code whether the tenant or user
 *              exists or not, the password is wrong, or the account is
 *              disabled; an argon2id verification is spent in every case
 *              (on a dummy hash when there is no user) so timing does not
 *              tell them apart either;
 *   FM_EBUSY   throttled: nothing was checked, *retry_after_s (if non-NULL)
 *              is the wait in whole seconds (>= 1);
 *   FM_EINVAL  password longer than FM_PASSWORD_MAX bytes, or a NULL
 *              argument: refused at once, before any store access or
 *              hashing (no password that long can be right);
 *   FM_EDB / FM_EIO / FM_ENOSPC  the store failed.
 * *retry_after_s is 0 unless FM_EBUSY, or FM_EPERM when this failure just
 * put a lock in place. policy may be NULL (FM_THROTTLE_POLICY_DEFAULT).
 * Safe to call from several threads with their own store handles: each
 * attempt is counted before the password is verified, so concurrent guesses
 * cannot slip past the throttle. */
int fm_auth_login(fm_store *s, const char *tenant, const char *username, const char *password,
                  const char *client_addr, int64_t now_ms, fm_user *out_user,
                  int64_t *retry_after_s);
/* The same with an explicit throttle policy and the second factor: otp is
 * the user's current TOTP code (NULL or "" when none was given). For a user
 * with a confirmed TOTP secret it returns, after a correct password:
 *   FM_ESTATE  no code given ("a code is required"; not counted as a failure);
 *   FM_EPERM   wrong or replayed code (counted like a wrong password);
 *   0          the code is right; its step is used up.
 * For a user without TOTP, otp is ignored. */
int fm_auth_login_ex(fm_store *s, const fm_throttle_policy *policy, const char *tenant,
                     const char *username, const char *password, const char *otp,
                     const char *client_addr, int64_t now_ms, fm_user *out_user,
                     int64_t *retry_after_s);

/* ---- user administration ---------------------------------------------------
 * These check the policy and hash; the store functions underneath do the
 * revocations. `reason` (may be NULL) receives a static message on
 * FM_EINVAL. */

/* Creates a user. Returns 0, FM_EINVAL (username, roles or password policy;
 * *reason set), FM_EEXIST, FM_ENOTFOUND (no such tenant), FM_ECRYPTO,
 * FM_EDB. */
int fm_auth_user_create(fm_store *s, const char *tenant, const char *username,
                        const char *password, const char *roles, const char **reason,
                        fm_errbuf *err);
/* Sets a new password, revokes every refresh-token family of the user and
 * bumps its epoch (outstanding access tokens stop working). Returns 0,
 * FM_EINVAL (policy; *reason set), FM_ENOTFOUND, FM_ECRYPTO, FM_EDB. */
int fm_auth_set_password(fm_store *s, const char *tenant, const char *username,
                         const char *password, const char **reason, fm_errbuf *err);
/* Disables (or re-enables) a user. Disabling revokes all its families and
 * bumps its epoch. Returns 0, FM_ENOTFOUND, FM_EDB. */
int fm_auth_user_set_status(fm_store *s, const char *tenant, const char *username, int status,
                            fm_errbuf *err);
/* Replaces a user's roles (validated) and bumps its epoch so access tokens
 * carrying the old roles stop working; refresh tokens stay valid and mint
 * tokens with the new roles. Returns 0, FM_EINVAL, FM_ENOTFOUND, FM_EDB. */
int fm_auth_user_set_roles(fm_store *s, const char *tenant, const char *username,
                           const char *roles, fm_errbuf *err);

/* ---- access tokens (JWT, RFC 7519, ES256) -----------------------------------
 * Signed with an ECDSA P-256 key kept at <data>/pki/jwt.key (PKCS#8 PEM,
 * mode 0600). The header is {"alg":"ES256","typ":"JWT","kid":K} where K is
 * the base64url SHA-256 of the public key (SubjectPublicKeyInfo DER),
 * truncated to 16 bytes. The algorithm is fixed by the server: a token whose
 * header names any other alg ("none", "HS256", "ES384", ...) is refused
 * before its signature is even looked at. */

#define FM_JWT_MAX 4096              /* longest token accepted, bytes */
#define FM_ACCESS_TTL_S (15 * 60)    /* default access-token lifetime */
#define FM_REFRESH_TTL_S (30 * 86400) /* default refresh-token lifetime */
#define FM_JWT_SKEW_S 60             /* clock skew allowed for iat/exp */

typedef struct fm_jwt_key fm_jwt_key;

/* Generates a new P-256 key and writes it to path (0600). FM_EEXIST when
 * path exists (never overwrites), FM_ECRYPTO, FM_EIO, FM_ENOSPC. */
int fm_jwt_key_create(const char *path, fm_errbuf *err);
/* Loads the key at path. Refuses a key file readable or writable by group
 * or others (FM_EPERM) and anything but a P-256 key (FM_ECRYPTO). Returns
 * 0 and *out (free with fm_jwt_key_free), FM_ENOTFOUND, FM_EIO. */
int fm_jwt_key_load(const char *path, fm_jwt_key **out, fm_errbuf *err);
void fm_jwt_key_free(fm_jwt_key *k);
/* The key id ("kid"), 22 characters; valid while k lives. */
const char *fm_jwt_key_id(const fm_jwt_key *k);

/* The claims fleetml puts in an access token. */
typedef struct fm_token_claims {
    int64_t sub;         /* user id ("sub" is its decimal string) */
    char tenant[65];
    char roles[128];     /* comma-separated; the token holds a JSON array */
    int64_t iat, exp;    /* seconds since the epoch */
    char jti[32];        /* random token id (base64url, 128 bits) */
    int64_t epoch;       /* the user's revocation epoch when issued */
    char sid[32];        /* session = refresh-token family id; "" if none */
} fm_token_claims;

/* Signs c into a compact JWS. *out is NUL-terminated; free with fm_free.
 * Returns 0, FM_EINVAL (missing fields, roles not a valid list), FM_ECRYPTO
 * or FM_ENOMEM. */
int fm_jwt_sign(const fm_jwt_key *k, const fm_token_claims *c, char **out);
/* Verifies a token's form, header, signature and times (iat <= now + skew,
 * exp > now - skew, exp > iat, lifetime <= 24 h) and fills *out. Does not
 * consult the store (see fm_auth_verify_access). Returns 0 or FM_EPERM for
 * every kind of invalid token (the caller answers 401 either way);
 * FM_ENOMEM. now_s is in seconds. */
int fm_jwt_verify(const fm_jwt_key *k, const char *token, int64_t now_s, fm_token_claims *out);

/* base64url without padding (RFC 4648 section 5), thin wrappers over
 * OpenSSL's EVP_EncodeBlock / EVP_DecodeBlock. Encode writes into out
 * (size >= 4 * ceil(n / 3) + 1) and returns the length. Decode is strict:
 * only the URL-safe alphabet, no padding, canonical trailing bits, at most
 * 2 * FM_JWT_MAX characters; it writes at most out_len bytes and returns
 * the decoded length, or -1 (also when the result does not fit). */
size_t fm_b64url_encode(const unsigned char *in, size_t n, char *out);
long fm_b64url_decode(const char *in, size_t n, unsigned char *out, size_t out_len);

/* ---- sessions: token pairs, refresh, logout --------------------------------- */

typedef struct fm_token_params {
    int64_t access_ttl_s;  /* FM_ACCESS_TTL_S when 0 */
    int64_t refresh_ttl_s; /* FM_REFRESH_TTL_S when 0 */
} fm_token_params;

typedef struct fm_token_pair {
    char *access_token;      /* JWT; free with fm_token_pair_clear */
    char refresh_token[48];  /* opaque, 256 random bits, base64url */
    int64_t expires_in;      /* access-token lifetime in seconds */
} fm_token_pair;

/* Frees the access token and wipes the pair. */
void fm_token_pair_clear(fm_token_pair *p);

/* Starts a session for an authenticated user (after fm_auth_login): a new
 * refresh-token family and a token pair. u->second_factor (as fm_auth_login_ex
 * set it) is kept with the session and shows in fm_principal. params may be NULL. Returns 0,
 * FM_ECRYPTO, FM_ENOMEM, FM_EDB. On failure *out is cleared. */
int fm_auth_session_start(fm_store *s, const fm_jwt_key *k, const fm_user *u, int64_t now_ms,
                          const fm_token_params *params, fm_token_pair *out);

/* Rotates a refresh token: the presented token is marked used and a new
 * pair in the same family is returned. Renewal does not extend the session:
 * every refresh token of a family expires refresh_ttl after the sign-in
 * that started it, after which the user signs in again. Returns FM_EPERM when the token is
 * unknown, expired, revoked, belongs to a disabled user, or was already
 * used; in the last case the whole family is revoked (someone holds a copy
 * of a token that was rotated away: either the thief or the user will now
 * have to sign in again) and *reuse_detected (if non-NULL) is set to 1 so
 * the caller can audit it. *out_user (may be NULL) gets the user, also when
 * reuse was detected (the owner of the revoked session). */
int fm_auth_refresh(fm_store *s, const fm_jwt_key *k, const char *refresh_token, int64_t now_ms,
                    const fm_token_params *params, fm_token_pair *out, fm_user *out_user,
                    int *reuse_detected);

/* Ends the session a refresh token belongs to: its family is revoked, so the
 * refresh token stops working and so do the session's access tokens (their
 * "sid"). Other sessions of the user are untouched. Returns 0 (also when
 * the token is unknown or already revoked: logout is idempotent), FM_EDB.
 * *out_user (may be NULL) gets the session's user when the token was known
 * (id 0 otherwise), for the audit log. */
int fm_auth_logout(fm_store *s, const char *refresh_token, int64_t now_ms, fm_user *out_user);
/* Ends every session of a user: revokes all families, bumps the epoch. */
int fm_auth_logout_all(fm_store *s, int64_t user_id, int64_t now_ms, fm_errbuf *err);

/* Who an access token speaks for, as checked against the store. */
typedef struct fm_principal {
    int64_t user_id;
    char tenant[65];
    char username[65];
    char roles[128];
    unsigned role_mask;  /* enum fm_role bits */
    char jti[32];
    char sid[32];
    int64_t exp;         /* seconds */
    int second_factor;   /* the session's sign-in gave a TOTP code */
} fm_principal;

/* Verifies an access token (fm_jwt_verify) and then that its user exists,
 * is active, is in the token's tenant, that the token's epoch equals the
 * user's current epoch and that its session (sid) is not revoked. Roles
 * come from the store (equal to the token's while the epoch matches).
 * Returns 0 or FM_EPERM (any invalid or revoked token), FM_EDB. */
int fm_auth_verify_access(fm_store *s, const fm_jwt_key *k, const char *token, int64_t now_ms,
                          fm_principal *out);

/* true when p may act on objects of `tenant`: its own tenant, or any tenant
 * for an operator. Object lookups must also be scoped by tenant in the
 * query itself; this is the check for tenant-named routes. */
bool fm_auth_tenant_allowed(const fm_principal *p, const char *tenant);

/* Housekeeping: deletes throttle entries that policy->forget_after_ms made
 * irrelevant and refresh tokens expired for more than a day. Run it now and
 * then (the HTTP layer: every few minutes). policy may be NULL. */
int fm_auth_housekeeping(fm_store *s, const fm_throttle_policy *policy, int64_t now_ms);

/* ---- second factor: TOTP (RFC 6238) ---------------------------------------
 * HMAC-SHA-1 (OpenSSL), 30 s steps, 6 digits, a 160-bit secret: what every
 * authenticator app speaks. A user with a confirmed TOTP secret must give
 * a current code at sign-in (fm_auth_login_ex's otp); each step's code is
 * accepted once (the store keeps the last step used), one step of clock
 * drift either way is tolerated. */

#define FM_TOTP_DIGITS 6
#define FM_TOTP_STEP_S 30
#define FM_TOTP_SECRET_LEN 20

/* The HOTP value of key at counter step with 6..8 digits (RFC 4226 section
 * 5.3) into *out. 0, FM_EINVAL, FM_ECRYPTO. */
int fm_totp_code(const unsigned char *key, size_t key_len, uint64_t step, unsigned digits,
                 uint32_t *out);
/* Checks a 6-digit code against the steps around now_ms; only steps after
 * after_step count (replay). 0 and *matched_step (may be NULL), or FM_EPERM
 * for anything else (wrong, malformed, replayed). Constant work per call. */
int fm_totp_verify(const unsigned char *key, size_t key_len, const char *code, int64_t now_ms,
                   int64_t after_step, int64_t *matched_step);
/* FM_TOTP_SECRET_LEN random bytes into out (len >= that). 0 or FM_ECRYPTO. */
int fm_totp_new_secret(unsigned char *out, size_t len);
/* RFC 4648 base32 without padding into out; returns the length, 0 when out
 * is too small. */
size_t fm_base32_encode(const unsigned char *in, size_t n, char *out, size_t out_len);
/* The otpauth:// URI an authenticator app scans (issuer and account must be
 * URI-safe, as tenant names and usernames are). 0 or FM_ERANGE. */
int fm_totp_uri(const char *issuer, const char *account, const unsigned char *secret,
                size_t secret_len, char *out, size_t out_len);

#endif
