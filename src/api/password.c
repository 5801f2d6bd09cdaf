#include "fleetml/auth.h"

#include <argon2.h>
#include <openssl/rand.h>
#include <string.h>

#define T_COST 2
#define M_COST_KIB 19456
#define PARALLELISM 1
#define SALT_LEN 16
#define HASH_LEN 32

int fm_password_hash(const char *password, char *out, size_t len)
{
    /* The length check comes before any hashing so an attacker cannot make
     * us hash megabytes. */
    size_t n = strnlen(password, FM_PASSWORD_MAX + 1);
    if (n < FM_PASSWORD_MIN || n > FM_PASSWORD_MAX)
        return FM_EINVAL;
    unsigned char salt[SALT_LEN];
    if (RAND_bytes(salt, sizeof salt) != 1)
        return FM_ECRYPTO;
    int rc = argon2id_hash_encoded(T_COST, M_COST_KIB, PARALLELISM, password, n, salt,
                                   sizeof salt, HASH_LEN, out, len);
    return rc == ARGON2_OK ? 0 : FM_ECRYPTO;
}

int fm_password_verify(const char *password, const char *hash)
{
    size_t n = strnlen(password, FM_PASSWORD_MAX + 1);
    if (n > FM_PASSWORD_MAX)
        return FM_EINVAL;
    int rc = argon2id_verify(hash, password, n);
    if (rc == ARGON2_OK)
        return 0;
    return rc == ARGON2_VERIFY_MISMATCH ? FM_EPERM : FM_EINVAL;
}

int fm_password_generate(char *out, size_t chars)
{
    /* 56 symbols without look-alikes (0/O, 1/l/I); rejection sampling keeps
     * the choice uniform. */
    static const char alphabet[] = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    const unsigned n = sizeof alphabet - 1;
    size_t i = 0;
    while (i < chars) {
        unsigned char b[32];
        if (RAND_bytes(b, sizeof b) != 1)
            return FM_ECRYPTO;
        for (size_t k = 0; k < sizeof b && i < chars; k++)
            if (b[k] < 256 - (256 % n))
                out[i++] = alphabet[b[k] % n];
    }
    out[chars] = '\0';
    return 0;
}
