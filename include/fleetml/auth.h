/*
 * User authentication primitives. Passwords are hashed with argon2id at
 * OWASP's recommended cost (m = 19 MiB, t = 2, p = 1) and stored in the
 * PHC string format ("$argon2id$v=19$m=19456,t=2,p=1$salt$hash").
 */
#ifndef FLEETML_AUTH_H
#define FLEETML_AUTH_H

#include "fleetml/core.h"

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

#endif
