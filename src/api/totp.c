/*
 * Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP, HMAC-SHA-1,
 * 30-second steps, 6 digits): the second sign-in factor any authenticator
 * app provides. The HMAC is OpenSSL's; this file only does the counter,
 * the dynamic truncation and base32 for the enrolment URI.
 */
#include "fleetml/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

int fm_totp_code(const unsigned char *key, size_t key_len, uint64_t step, unsigned digits,
                 uint32_t *out)
{
    if (!key || key_len == 0 || digits < 6 || digits > 8)
        return FM_EINVAL;
    unsigned char msg[8], mac[EVP_MAX_MD_SIZE];
    for (int i = 7; i >= 0; i--, step >>= 8)
        msg[i] = (unsigned char)(step & 0xff);
    size_t mac_len = 0;
    if (!EVP_Q_mac(NULL, "HMAC", NULL, "SHA1", NULL, key, key_len, msg, sizeof msg, mac,
                   sizeof mac, &mac_len) ||
        mac_len != 20)
        return FM_ECRYPTO;
    unsigned off = mac[19] & 0x0f;
    uint32_t bin = ((uint32_t)(mac[off] & 0x7f) << 24) | ((uint32_t)mac[off + 1] << 16) |
                   ((uint32_t)mac[off + 2] << 8) | mac[off + 3];
    uint32_t mod = 1;
    for (unsigned i = 0; i < digits; i++)
        mod *= 10;
    *out = bin % mod;
    OPENSSL_cleanse(mac, sizeof mac);
    return 0;
}

int fm_totp_verify(const unsigned char *key, size_t key_len, const char *code, int64_t now_ms,
                   int64_t after_step, int64_t *matched_step)
{
    if (!code || strlen(code) != FM_TOTP_DIGITS)
        return FM_EPERM;
    uint32_t want = 0;
    for (const char *p = code; *p; p++) {
        if (*p < '0' || *p > '9')
            return FM_EPERM;
        want = want * 10 + (uint32_t)(*p - '0');
    }
    if (now_ms < 0)
        return FM_EPERM;
    int64_t now_step = now_ms / 1000 / FM_TOTP_STEP_S;
    /* One step either side for clock drift; every step is compared so the
     * time taken does not say which matched. */
    int64_t hit = -1;
    for (int64_t s = now_step - 1; s <= now_step + 1; s++) {
        uint32_t got;
        if (s < 0 || fm_totp_code(key, key_len, (uint64_t)s, FM_TOTP_DIGITS, &got) != 0)
            continue;
        if (CRYPTO_memcmp(&got, &want, sizeof got) == 0 && s > after_step && hit < 0)
            hit = s;
    }
    if (hit < 0)
        return FM_EPERM;
    if (matched_step)
        *matched_step = hit;
    return 0;
}

int fm_totp_new_secret(unsigned char *out, size_t len)
{
    return len >= FM_TOTP_SECRET_LEN && RAND_priv_bytes(out, FM_TOTP_SECRET_LEN) == 1
               ? 0
               : FM_ECRYPTO;
}

size_t fm_base32_encode(const unsigned char *in, size_t n, char *out, size_t out_len)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    size_t need = (n * 8 + 4) / 5;
    if (out_len < need + 1)
        return 0;
    size_t o = 0;
    unsigned buf = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        buf = (buf << 8) | in[i];
        bits += 8;
        while (bits >= 5) {
            out[o++] = alphabet[(buf >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0)
        out[o++] = alphabet[(buf << (5 - bits)) & 31];
    out[o] = '\0';
    return o;
}

int fm_totp_uri(const char *issuer, const char *account, const unsigned char *secret,
                size_t secret_len, char *out, size_t out_len)
{
    char b32[64];
    if (!fm_base32_encode(secret, secret_len, b32, sizeof b32))
        return FM_ERANGE;
    /* issuer and account are [a-z0-9._@-] (tenant and usernames), so they
     * need no percent-encoding. */
    int n = snprintf(out, out_len,
                     "otpauth://totp/%s:%s?secret=%s&issuer=%s&algorithm=SHA1&digits=%d&period=%d",
                     issuer, account, b32, issuer, FM_TOTP_DIGITS, FM_TOTP_STEP_S);
    OPENSSL_cleanse(b32, sizeof b32);
    return n < 0 || (size_t)n >= out_len ? FM_ERANGE : 0;
}
