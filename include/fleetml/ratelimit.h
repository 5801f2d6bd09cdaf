/*
 * Token buckets keyed by a string (a device id, a template name): each key
 * may do `rate` things per second on average and `burst` at once. Used to
 * keep one device (or one claim template) from crowding out the others.
 * Not thread-safe: one thread owns a table.
 */
#ifndef FLEETML_RATELIMIT_H
#define FLEETML_RATELIMIT_H

#include "fleetml/core.h"

typedef struct fm_ratelimit fm_ratelimit;

/* Returns 0 and *out (free with fm_ratelimit_free) or FM_ENOMEM. */
int fm_ratelimit_new(fm_ratelimit **out);
void fm_ratelimit_free(fm_ratelimit *rl);

/* Takes one token from key's bucket (rate per second, capacity burst; a key
 * seen for the first time starts full). Returns 1 when allowed, 0 when the
 * bucket is empty. Keys longer than 64 bytes are truncated. On allocation
 * failure the request is allowed: rate limiting must never be what stops a
 * healthy platform. */
int fm_ratelimit_take(fm_ratelimit *rl, const char *key, double rate, double burst,
                      uint64_t now_ns);

#endif
