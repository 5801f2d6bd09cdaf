/*
 * Device shadow documents: merge (JSON merge patch semantics, RFC 7386:
 * objects merge recursively and null deletes) and delta (what the device
 * still has to apply).
 */
#include "fleetml/registry.h"

#include <jansson.h>

int fm_shadow_merge(json_t *doc, json_t *patch)
{
    const char *key;
    json_t *val;
    json_object_foreach(patch, key, val) {
        if (json_is_null(val)) {
            json_object_del(doc, key);
            continue;
        }
        json_t *cur = json_object_get(doc, key);
        if (json_is_object(val) && json_is_object(cur)) {
            int rc = fm_shadow_merge(cur, val);
            if (rc)
                return rc;
            continue;
        }
        if (json_is_object(val)) {
            /* A fresh object: merge into an empty one so nulls inside the
             * patch are dropped rather than stored. */
            json_t *obj = json_object();
            if (!obj || fm_shadow_merge(obj, val) != 0 || json_object_set_new(doc, key, obj) != 0)
                return FM_ENOMEM;
            continue;
        }
        if (json_object_set(doc, key, val) != 0)
            return FM_ENOMEM;
    }
    return 0;
}

json_t *fm_shadow_delta(json_t *desired, json_t *reported)
{
    json_t *delta = json_object();
    if (!delta)
        return NULL;
    const char *key;
    json_t *want;
    json_object_foreach(desired, key, want) {
        json_t *have = reported ? json_object_get(reported, key) : NULL;
        if (json_is_object(want) && json_is_object(have)) {
            json_t *sub = fm_shadow_delta(want, have);
            if (!sub) {
                json_decref(delta);
                return NULL;
            }
            if (json_object_size(sub) > 0)
                json_object_set_new(delta, key, sub);
            else
                json_decref(sub);
            continue;
        }
        if (!have || !json_equal(want, have))
            json_object_set(delta, key, want);
    }
    return delta;
}
