/*
 * Access tokens (JWT, ES256) and sessions (refresh-token families).
 *
 * Only OpenSSL EVP does cryptography here. The one piece of glue that has
 * to be right is the signature format: OpenSSL produces and expects an
 * ASN.1 DER ECDSA-Sig-Value, while JWS (RFC 7518 section 3.4) carries the
 * fixed-size concatenation r || s (32 + 32 bytes for P-256, each left-
 * padded with zeros). A verifier that accepted DER, or any length other
 * than 64, would accept signatures no other implementation produces.
 */
#include "fleetml/auth.h"

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define P256_BYTES 32
#define SIG_BYTES (2 * P256_BYTES)
#define HEADER_MAX 512
/* Access tokens live minutes; a token claiming more than a day was not
 * minted by this code. */
#define MAX_LIFETIME_S 86400

struct fm_jwt_key {
    EVP_PKEY *pkey;
    char kid[32];
};

/* ---- base64url ------------------------------------------------------------------ */

size_t fm_b64url_encode(const unsigned char *in, size_t n, char *out)
{
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    size_t w = 0;
    for (int i = 0; i < len; i++) {
        char c = out[i];
        if (c == '=')
            break;
        out[w++] = c == '+' ? '-' : c == '/' ? '_' : c;
    }
    out[w] = '\0';
    return w;
}

long fm_b64url_decode(const char *in, size_t n, unsigned char *out, size_t out_len)
{
    if (n % 4 == 1 || n > (size_t)FM_JWT_MAX * 2)
        return -1;
    size_t padded = (n + 3) / 4 * 4;
    char *tmp = fm_malloc(padded + 1);
    unsigned char *bin = fm_malloc(padded / 4 * 3 + 1);
    char *again = fm_malloc(padded + 1);
    long ret = -1;
    if (!tmp || !bin || !again)
        goto out;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        if (c == '-')
            c = '+';
        else if (c == '_')
            c = '/';
        else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
            goto out; /* '+', '/', '=', blanks and everything else are refused */
        tmp[i] = c;
    }
    for (size_t i = n; i < padded; i++)
        tmp[i] = '=';
    tmp[padded] = '\0';
    int len = padded ? EVP_DecodeBlock(bin, (const unsigned char *)tmp, (int)padded) : 0;
    if (len < 0)
        goto out;
    size_t dec = (size_t)len - (padded - n); /* EVP_DecodeBlock counts padding as zeros */
    /* Canonical form only: re-encoding must give back the input, which
     * refuses non-zero trailing bits (two spellings of one token). */
    if (fm_b64url_encode(bin, dec, again) != n || memcmp(again, in, n) != 0)
        goto out;
    if (dec > out_len)
        goto out;
    memcpy(out, bin, dec);
    ret = (long)dec;
out:
    if (bin)
        OPENSSL_cleanse(bin, padded / 4 * 3 + 1);
    fm_free(tmp);
    fm_free(bin);
    fm_free(again);
    return ret;
}

/* ---- keys ----------------------------------------------------------------------- */

static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1;
}

int fm_jwt_key_create(const char *path, fm_errbuf *err)
{
    struct stat sb;
    if (stat(path, &sb) == 0)
        return fm_errf(err, FM_EEXIST, "%s already exists, refusing to overwrite", path);
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (!key)
        return fm_errf(err, FM_ECRYPTO, "generating the P-256 token-signing key failed");
    BIO *bio = BIO_new(BIO_s_secmem());
    int rc = FM_ECRYPTO;
    if (bio && PEM_write_bio_PKCS8PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL)) {
        char *data = NULL;
        long len = BIO_get_mem_data(bio, &data);
        rc = fm_write_file_atomic(path, data, (size_t)len, 0600);
        if (rc)
            fm_errf(err, rc, "writing %s: %s", path, fm_strerror(rc));
    } else {
        fm_errf(err, rc, "encoding the token-signing key failed");
    }
    BIO_free(bio);
    EVP_PKEY_free(key);
    return rc;
}

static int compute_kid(EVP_PKEY *pkey, char *kid, size_t len)
{
    unsigned char *der = NULL;
    int n = i2d_PUBKEY(pkey, &der);
    if (n <= 0)
        return FM_ECRYPTO;
    unsigned char md[32];
    int ok = EVP_Digest(der, (size_t)n, md, NULL, EVP_sha256(), NULL);
    OPENSSL_free(der);
    if (!ok || len < 23)
        return FM_ECRYPTO;
    char tmp[48];
    size_t w = fm_b64url_encode(md, 16, tmp);
    memcpy(kid, tmp, w + 1); /* 22 characters; len >= 23 was checked */
    return 0;
}

int fm_jwt_key_load(const char *path, fm_jwt_key **out, fm_errbuf *err)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return fm_errf(err, FM_ENOTFOUND, "%s does not exist (run `fleetml init`)", path);
    if (sb.st_mode & 077)
        return fm_errf(err, FM_EPERM, "%s is accessible by group or others; chmod 600 it", path);
    char *pem = NULL;
    size_t len = 0;
    int rc = fm_read_file(path, &pem, &len);
    if (rc)
        return fm_errf(err, rc, "reading %s: %s", path, fm_strerror(rc));
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    EVP_PKEY *pkey = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL) : NULL;
    BIO_free(bio);
    OPENSSL_cleanse(pem, len);
    fm_free(pem);
    char group[32] = "";
    if (!pkey || !EVP_PKEY_is_a(pkey, "EC") ||
        !EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                        NULL) ||
        strcmp(group, "prime256v1") != 0) {
        EVP_PKEY_free(pkey);
        return fm_errf(err, FM_ECRYPTO, "%s: not a P-256 private key", path);
    }
    fm_jwt_key *k = fm_calloc(1, sizeof *k);
    if (!k) {
        EVP_PKEY_free(pkey);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    k->pkey = pkey;
    if (compute_kid(pkey, k->kid, sizeof k->kid) != 0) {
        fm_jwt_key_free(k);
        return fm_errf(err, FM_ECRYPTO, "%s: cannot derive the key id", path);
    }
    *out = k;
    return 0;
}

void fm_jwt_key_free(fm_jwt_key *k)
{
    if (!k)
        return;
    EVP_PKEY_free(k->pkey);
    fm_free(k);
}

const char *fm_jwt_key_id(const fm_jwt_key *k)
{
    return k->kid;
}

/* ---- signing ------------------------------------------------------------------------ */

static int random_id(char *out, size_t len, size_t bytes)
{
    unsigned char b[32];
    if (bytes > sizeof b || len < (bytes * 4 + 2) / 3 + 1 || RAND_bytes(b, (int)bytes) != 1)
        return FM_ECRYPTO;
    char tmp[48];
    size_t w = fm_b64url_encode(b, bytes, tmp);
    OPENSSL_cleanse(b, sizeof b);
    if (w + 1 > len)
        return FM_ECRYPTO;
    memcpy(out, tmp, w + 1);
    OPENSSL_cleanse(tmp, sizeof tmp);
    return 0;
}

/* Appends the base64url of n bytes to b. */
static void b64_append(fm_strbuf *b, const unsigned char *p, size_t n)
{
    char *tmp = fm_malloc((n + 2) / 3 * 4 + 1);
    if (!tmp) {
        b->failed = 1;
        return;
    }
    fm_b64url_encode(p, n, tmp);
    fm_strbuf_printf(b, "%s", tmp);
    fm_free(tmp);
}

/* DER ECDSA-Sig-Value -> r || s, 32 bytes each. */
static int der_to_jose(const unsigned char *der, size_t der_len, unsigned char out[SIG_BYTES])
{
    const unsigned char *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    if (!sig)
        return FM_ECRYPTO;
    const BIGNUM *r, *s;
    ECDSA_SIG_get0(sig, &r, &s);
    int ok = BN_bn2binpad(r, out, P256_BYTES) == P256_BYTES &&
             BN_bn2binpad(s, out + P256_BYTES, P256_BYTES) == P256_BYTES;
    ECDSA_SIG_free(sig);
    return ok ? 0 : FM_ECRYPTO;
}

/* r || s -> DER ECDSA-Sig-Value (*der freed with OPENSSL_free). */
static int jose_to_der(const unsigned char in[SIG_BYTES], unsigned char **der, int *der_len)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(in, P256_BYTES, NULL);
    BIGNUM *s = BN_bin2bn(in + P256_BYTES, P256_BYTES, NULL);
    if (!sig || !r || !s || !ECDSA_SIG_set0(sig, r, s)) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(sig);
        return FM_ECRYPTO;
    }
    *der = NULL;
    *der_len = i2d_ECDSA_SIG(sig, der);
    ECDSA_SIG_free(sig);
    return *der_len > 0 ? 0 : FM_ECRYPTO;
}

static json_t *roles_array(const char *roles)
{
    unsigned mask;
    return fm_auth_roles_parse(roles, &mask) == 0 ? fm_auth_roles_json(roles) : NULL;
}

int fm_jwt_sign(const fm_jwt_key *k, const fm_token_claims *c, char **out)
{
    *out = NULL;
    if (!k || !c || c->sub <= 0 || !c->tenant[0] || !c->jti[0] || c->exp <= c->iat)
        return FM_EINVAL;
    json_t *roles = roles_array(c->roles);
    if (!roles)
        return FM_EINVAL;
    char sub[24];
    snprintf(sub, sizeof sub, "%lld", (long long)c->sub);
    json_t *hdr = json_pack("{s:s, s:s, s:s}", "alg", "ES256", "typ", "JWT", "kid", k->kid);
    json_t *pl = json_pack("{s:s, s:s, s:o, s:I, s:I, s:s, s:I}", "sub", sub, "tenant", c->tenant,
                           "roles", roles, "iat", (json_int_t)c->iat, "exp", (json_int_t)c->exp,
                           "jti", c->jti, "epoch", (json_int_t)c->epoch);
    if (pl && c->sid[0] && json_object_set_new(pl, "sid", json_string(c->sid)) != 0) {
        json_decref(pl);
        pl = NULL;
    }
    char *hs = hdr ? json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    char *ps = pl ? json_dumps(pl, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(hdr);
    json_decref(pl);
    fm_strbuf b = {0};
    unsigned char *der = NULL;
    EVP_MD_CTX *ctx = NULL;
    int rc = FM_ENOMEM;
    if (!hs || !ps)
        goto out;
    b64_append(&b, (const unsigned char *)hs, strlen(hs));
    fm_strbuf_printf(&b, ".");
    b64_append(&b, (const unsigned char *)ps, strlen(ps));
    if (b.failed)
        goto out;
    rc = FM_ECRYPTO;
    size_t der_len = 0;
    ctx = EVP_MD_CTX_new();
    if (!ctx || EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) != 1 ||
        EVP_DigestSign(ctx, NULL, &der_len, (const unsigned char *)b.p, b.len) != 1)
        goto out;
    der = fm_malloc(der_len);
    if (!der || EVP_DigestSign(ctx, der, &der_len, (const unsigned char *)b.p, b.len) != 1)
        goto out;
    unsigned char sig[SIG_BYTES];
    if (der_to_jose(der, der_len, sig) != 0)
        goto out;
    fm_strbuf_printf(&b, ".");
    b64_append(&b, sig, sizeof sig);
    rc = fm_strbuf_take(&b, out, NULL);
out:
    EVP_MD_CTX_free(ctx);
    fm_free(der);
    fm_free(hs); /* jansson allocates through fm_malloc or malloc alike */
    fm_free(ps);
    fm_free(b.p);
    return rc;
}

/* ---- verification ----------------------------------------------------------------- */

/* Decodes a base64url segment holding JSON into an object. */
static json_t *segment_json(const char *seg, size_t n, size_t max)
{
    unsigned char *buf = fm_malloc(max);
    if (!buf)
        return NULL;
    long len = fm_b64url_decode(seg, n, buf, max);
    json_t *j = NULL;
    if (len > 0)
        j = json_loadb((const char *)buf, (size_t)len, JSON_REJECT_DUPLICATES, NULL);
    fm_free(buf);
    if (j && !json_is_object(j)) {
        json_decref(j);
        j = NULL;
    }
    return j;
}

/* The header must be exactly {"alg":"ES256","kid":<ours>} plus optionally
 * "typ":"JWT": no crit, jku, jwk, x5u or anything else a library might act
 * on. The algorithm is fixed here, not read from the token. */
static int header_ok(const fm_jwt_key *k, json_t *h)
{
    const char *key;
    json_t *v;
    int seen_alg = 0, seen_kid = 0;
    json_object_foreach(h, key, v) {
        if (strcmp(key, "alg") == 0 && json_is_string(v) &&
            strcmp(json_string_value(v), "ES256") == 0)
            seen_alg = 1;
        else if (strcmp(key, "kid") == 0 && json_is_string(v) &&
                 strcmp(json_string_value(v), k->kid) == 0)
            seen_kid = 1;
        else if (!(strcmp(key, "typ") == 0 && json_is_string(v) &&
                   strcmp(json_string_value(v), "JWT") == 0))
            return 0;
    }
    return seen_alg && seen_kid;
}

static int copy_str(json_t *o, const char *name, char *dst, size_t len, int required)
{
    json_t *v = json_object_get(o, name);
    if (!v)
        return required ? -1 : 0;
    if (!json_is_string(v) || json_string_length(v) >= len || json_string_length(v) == 0 ||
        memchr(json_string_value(v), '\0', json_string_length(v)))
        return -1;
    memcpy(dst, json_string_value(v), json_string_length(v) + 1);
    return 0;
}

static int get_int(json_t *o, const char *name, int64_t *out)
{
    json_t *v = json_object_get(o, name);
    if (!json_is_integer(v))
        return -1;
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static int claims_from(json_t *p, fm_token_claims *c)
{
    memset(c, 0, sizeof *c);
    char sub[24];
    if (copy_str(p, "sub", sub, sizeof sub, 1) || copy_str(p, "tenant", c->tenant,
                                                           sizeof c->tenant, 1) ||
        copy_str(p, "jti", c->jti, sizeof c->jti, 1) ||
        copy_str(p, "sid", c->sid, sizeof c->sid, 0) || get_int(p, "iat", &c->iat) ||
        get_int(p, "exp", &c->exp) || get_int(p, "epoch", &c->epoch))
        return -1;
    char *end;
    if (sub[0] < '1' || sub[0] > '9')
        return -1;
    long long id = strtoll(sub, &end, 10);
    if (*end || id <= 0)
        return -1;
    c->sub = id;
    json_t *roles = json_object_get(p, "roles");
    if (!json_is_array(roles) || json_array_size(roles) == 0)
        return -1;
    size_t i, used = 0;
    json_t *r;
    json_array_foreach(roles, i, r) {
        if (!json_is_string(r))
            return -1;
        int w = snprintf(c->roles + used, sizeof c->roles - used, "%s%s", i ? "," : "",
                         json_string_value(r));
        if (w < 0 || (size_t)w >= sizeof c->roles - used)
            return -1;
        used += (size_t)w;
    }
    unsigned mask;
    return fm_auth_roles_parse(c->roles, &mask) == 0 ? 0 : -1;
}

int fm_jwt_verify(const fm_jwt_key *k, const char *token, int64_t now_s, fm_token_claims *out)
{
    memset(out, 0, sizeof *out);
    if (!k || !token)
        return FM_EPERM;
    size_t n = strnlen(token, FM_JWT_MAX + 1);
    if (n > FM_JWT_MAX)
        return FM_EPERM;
    const char *d1 = memchr(token, '.', n);
    const char *d2 = d1 ? memchr(d1 + 1, '.', n - (size_t)(d1 + 1 - token)) : NULL;
    if (!d1 || !d2 || memchr(d2 + 1, '.', n - (size_t)(d2 + 1 - token)) || d1 == token ||
        d2 == d1 + 1 || d2 + 1 == token + n)
        return FM_EPERM;

    json_t *hdr = segment_json(token, (size_t)(d1 - token), HEADER_MAX);
    int ok = hdr && header_ok(k, hdr);
    json_decref(hdr);
    if (!ok)
        return FM_EPERM;

    /* Signature before the payload is even parsed. */
    unsigned char sig[SIG_BYTES + 1];
    if (fm_b64url_decode(d2 + 1, n - (size_t)(d2 + 1 - token), sig, sizeof sig) != SIG_BYTES)
        return FM_EPERM;
    unsigned char *der = NULL;
    int der_len = 0;
    if (jose_to_der(sig, &der, &der_len) != 0)
        return FM_EPERM;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    ok = ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1 &&
         EVP_DigestVerify(ctx, der, (size_t)der_len, (const unsigned char *)token,
                          (size_t)(d2 - token)) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    if (!ok)
        return FM_EPERM;

    json_t *pl = segment_json(d1 + 1, (size_t)(d2 - d1 - 1), FM_JWT_MAX);
    fm_token_claims c;
    ok = pl && claims_from(pl, &c) == 0;
    json_decref(pl);
    if (!ok)
        return FM_EPERM;
    if (c.exp <= c.iat || c.exp - c.iat > MAX_LIFETIME_S || c.iat > now_s + FM_JWT_SKEW_S ||
        c.exp <= now_s - FM_JWT_SKEW_S)
        return FM_EPERM;
    *out = c;
    return 0;
}

/* ---- sessions ---------------------------------------------------------------------- */

#define REFRESH_BYTES 32
#define REFRESH_CHARS 43 /* base64url of 32 bytes */

void fm_token_pair_clear(fm_token_pair *p)
{
    if (!p)
        return;
    if (p->access_token) {
        OPENSSL_cleanse(p->access_token, strlen(p->access_token));
        fm_free(p->access_token);
    }
    OPENSSL_cleanse(p, sizeof *p);
    p->access_token = NULL;
}

static int hash_refresh(const char *token, unsigned char md[FM_TOKEN_HASH_LEN])
{
    return EVP_Digest(token, strlen(token), md, NULL, EVP_sha256(), NULL) ? 0 : FM_ECRYPTO;
}

/* A new refresh token and its hash. */
static int new_refresh(char *token, size_t len, unsigned char md[FM_TOKEN_HASH_LEN])
{
    int rc = random_id(token, len, REFRESH_BYTES);
    return rc ? rc : hash_refresh(token, md);
}

/* Refresh tokens are exactly 43 base64url characters; anything else is not
 * worth a database lookup. */
static int refresh_form_ok(const char *t)
{
    if (!t || strnlen(t, REFRESH_CHARS + 1) != REFRESH_CHARS)
        return 0;
    for (const char *p = t; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_'))
            return 0;
    return 1;
}

static int mint_access(const fm_jwt_key *k, const fm_user *u, const char *sid, int64_t now_ms,
                       int64_t ttl_s, char **out)
{
    fm_token_claims c = {.sub = u->id, .epoch = u->epoch};
    snprintf(c.tenant, sizeof c.tenant, "%s", u->tenant);
    snprintf(c.roles, sizeof c.roles, "%s", u->roles);
    snprintf(c.sid, sizeof c.sid, "%s", sid);
    c.iat = now_ms / 1000;
    c.exp = c.iat + ttl_s;
    int rc = random_id(c.jti, sizeof c.jti, 16);
    return rc ? rc : fm_jwt_sign(k, &c, out);
}

static void ttls(const fm_token_params *p, int64_t *access, int64_t *refresh)
{
    *access = p && p->access_ttl_s > 0 ? p->access_ttl_s : FM_ACCESS_TTL_S;
    *refresh = p && p->refresh_ttl_s > 0 ? p->refresh_ttl_s : FM_REFRESH_TTL_S;
}

int fm_auth_session_start(fm_store *s, const fm_jwt_key *k, const fm_user *u, int64_t now_ms,
                          const fm_token_params *params, fm_token_pair *out)
{
    memset(out, 0, sizeof *out);
    int64_t access_ttl, refresh_ttl;
    ttls(params, &access_ttl, &refresh_ttl);
    char family[32];
    unsigned char md[FM_TOKEN_HASH_LEN];
    int rc = random_id(family, sizeof family, 16);
    if (!rc)
        rc = new_refresh(out->refresh_token, sizeof out->refresh_token, md);
    if (!rc)
        rc = fm_store_session_create(s, family, u->id, u->epoch, md,
                                     now_ms + refresh_ttl * 1000, now_ms, u->second_factor, NULL);
    if (rc == FM_ESTATE || rc == FM_ENOTFOUND)
        rc = FM_EPERM;
    if (!rc)
        rc = mint_access(k, u, family, now_ms, access_ttl, &out->access_token);
    if (rc) {
        fm_token_pair_clear(out);
        return rc;
    }
    out->expires_in = access_ttl;
    return 0;
}

int fm_auth_refresh(fm_store *s, const fm_jwt_key *k, const char *refresh_token, int64_t now_ms,
                    const fm_token_params *params, fm_token_pair *out, fm_user *out_user,
                    int *reuse_detected)
{
    memset(out, 0, sizeof *out);
    if (reuse_detected)
        *reuse_detected = 0;
    if (!refresh_form_ok(refresh_token))
        return FM_EPERM;
    int64_t access_ttl, refresh_ttl;
    ttls(params, &access_ttl, &refresh_ttl);
    unsigned char old_md[FM_TOKEN_HASH_LEN], new_md[FM_TOKEN_HASH_LEN];
    int rc = hash_refresh(refresh_token, old_md);
    if (!rc)
        rc = new_refresh(out->refresh_token, sizeof out->refresh_token, new_md);
    if (rc)
        goto fail;
    fm_refresh_info info;
    rc = fm_store_refresh_rotate(s, old_md, new_md, now_ms + refresh_ttl * 1000, now_ms, &info,
                                 NULL);
    if (rc == FM_ESTATE) {
        if (reuse_detected)
            *reuse_detected = 1;
        fm_logkv(FM_LOG_WARN, "auth", "refresh token reused; session revoked", "family",
                 info.family, NULL);
        /* Say whose session it was, so the caller can audit it. */
        fm_user owner;
        if (out_user && fm_store_user_get_by_id(s, info.user_id, &owner) == 0) {
            OPENSSL_cleanse(owner.password_hash, sizeof owner.password_hash);
            *out_user = owner;
        }
    }
    if (rc == FM_ESTATE || rc == FM_ENOTFOUND)
        rc = FM_EPERM;
    if (rc)
        goto fail;
    fm_user u;
    rc = fm_store_user_get_by_id(s, info.user_id, &u);
    if (rc == FM_ENOTFOUND || (!rc && u.status != FM_USER_ACTIVE))
        rc = FM_EPERM;
    if (rc)
        goto fail;
    OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
    rc = mint_access(k, &u, info.family, now_ms, access_ttl, &out->access_token);
    if (rc)
        goto fail;
    out->expires_in = access_ttl;
    if (out_user)
        *out_user = u;
    return 0;
fail:
    fm_token_pair_clear(out);
    return rc;
}

int fm_auth_logout(fm_store *s, const char *refresh_token, int64_t now_ms, fm_user *out_user)
{
    if (out_user)
        memset(out_user, 0, sizeof *out_user);
    if (!refresh_form_ok(refresh_token))
        return 0;
    unsigned char md[FM_TOKEN_HASH_LEN];
    fm_refresh_info info = {0};
    int rc = hash_refresh(refresh_token, md);
    if (!rc)
        rc = fm_store_refresh_revoke(s, md, now_ms, &info, NULL);
    if (!rc && out_user && fm_store_user_get_by_id(s, info.user_id, out_user) == 0)
        OPENSSL_cleanse(out_user->password_hash, sizeof out_user->password_hash);
    return rc == FM_ENOTFOUND ? 0 : rc;
}

int fm_auth_logout_all(fm_store *s, int64_t user_id, int64_t now_ms, fm_errbuf *err)
{
    return fm_store_user_revoke_sessions(s, user_id, now_ms, err);
}

int fm_auth_verify_access(fm_store *s, const fm_jwt_key *k, const char *token, int64_t now_ms,
                          fm_principal *out)
{
    memset(out, 0, sizeof *out);
    fm_token_claims c;
    int rc = fm_jwt_verify(k, token, now_ms / 1000, &c);
    if (rc)
        return rc;
    /* Every token fleetml mints names its session; one that does not was
     * not minted by a sign-in and cannot be revoked by logout. */
    if (!c.sid[0])
        return FM_EPERM;
    fm_user u;
    rc = fm_store_user_get_by_id(s, c.sub, &u);
    if (rc == FM_ENOTFOUND)
        return FM_EPERM;
    if (rc)
        return rc;
    OPENSSL_cleanse(u.password_hash, sizeof u.password_hash);
    if (u.status != FM_USER_ACTIVE || u.epoch != c.epoch || strcmp(u.tenant, c.tenant) != 0)
        return FM_EPERM;
    int mfa = 0;
    rc = fm_store_session_active(s, c.sid, u.id, &mfa);
    if (rc)
        return rc; /* FM_EPERM (revoked or unknown session) or a store error */
    unsigned mask;
    if (fm_auth_roles_parse(u.roles, &mask) != 0)
        return FM_EPERM;
    out->user_id = u.id;
    snprintf(out->tenant, sizeof out->tenant, "%s", u.tenant);
    snprintf(out->username, sizeof out->username, "%s", u.username);
    snprintf(out->roles, sizeof out->roles, "%s", u.roles);
    out->role_mask = mask;
    snprintf(out->jti, sizeof out->jti, "%s", c.jti);
    snprintf(out->sid, sizeof out->sid, "%s", c.sid);
    out->exp = c.exp;
    out->second_factor = mfa;
    return 0;
}

bool fm_auth_tenant_allowed(const fm_principal *p, const char *tenant)
{
    if (!p || !tenant || !p->user_id)
        return false;
    return (p->role_mask & FM_ROLE_OPERATOR) || strcmp(p->tenant, tenant) == 0;
}
