#include "fleetml/ratelimit.h"

#include <string.h>

#define KEY_MAX 64
#define INITIAL_SLOTS 256
/* A table holding more keys than this is reset rather than grown: only
 * registered devices have keys, so reaching it means something odd. */
#define MAX_KEYS (4u * 1024 * 1024)

typedef struct bucket {
    char key[KEY_MAX + 1]; /* "" = empty slot */
    double tokens;
    uint64_t last_ns;
} bucket;

struct fm_ratelimit {
    bucket *slots;
    size_t cap, used;
};

int fm_ratelimit_new(fm_ratelimit **out)
{
    fm_ratelimit *rl = fm_calloc(1, sizeof *rl);
    if (!rl)
        return FM_ENOMEM;
    rl->slots = fm_calloc(INITIAL_SLOTS, sizeof *rl->slots);
    if (!rl->slots) {
        fm_free(rl);
        return FM_ENOMEM;
    }
    rl->cap = INITIAL_SLOTS;
    *out = rl;
    return 0;
}

void fm_ratelimit_free(fm_ratelimit *rl)
{
    if (!rl)
        return;
    fm_free(rl->slots);
    fm_free(rl);
}

static bucket *find(bucket *slots, size_t cap, const char *key)
{
    size_t i = fm_fnv1a(FM_FNV1A_INIT, key) & (cap - 1);
    while (slots[i].key[0] && strcmp(slots[i].key, key) != 0)
        i = (i + 1) & (cap - 1);
    return &slots[i];
}

static int grow(fm_ratelimit *rl)
{
    size_t cap = rl->cap * 2;
    bucket *ns = fm_calloc(cap, sizeof *ns);
    if (!ns)
        return FM_ENOMEM;
    for (size_t i = 0; i < rl->cap; i++)
        if (rl->slots[i].key[0])
            *find(ns, cap, rl->slots[i].key) = rl->slots[i];
    fm_free(rl->slots);
    rl->slots = ns;
    rl->cap = cap;
    return 0;
}

int fm_ratelimit_take(fm_ratelimit *rl, const char *key_in, double rate, double burst,
                      uint64_t now_ns)
{
    char key[KEY_MAX + 1];
    size_t n = strnlen(key_in, KEY_MAX);
    memcpy(key, key_in, n);
    key[n] = '\0';
    if (n == 0)
        return 1;
    if (rl->used >= MAX_KEYS) {
        memset(rl->slots, 0, rl->cap * sizeof *rl->slots);
        rl->used = 0;
    }
    /* Keep the load factor under 1/2 so probe chains stay short. */
    if ((rl->used + 1) * 2 > rl->cap && grow(rl) != 0)
        return 1;
    bucket *b = find(rl->slots, rl->cap, key);
    if (!b->key[0]) {
        memcpy(b->key, key, n + 1);
        b->tokens = burst;
        b->last_ns = now_ns;
        rl->used++;
    }
    double refill = (double)(now_ns - b->last_ns) / 1e9 * rate;
    b->tokens = b->tokens + refill > burst ? burst : b->tokens + refill;
    b->last_ns = now_ns;
    if (b->tokens < 1.0)
        return 0;
    b->tokens -= 1.0;
    return 1;
}
