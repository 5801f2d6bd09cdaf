/*
 * libFuzzer target: the device shadow update path (fleet/<id>/shadow/update),
 * the untrusted-JSON consumer besides measurements and provisioning until
 * the HTTP API brings request bodies (see README.md).
 *
 * Input: the update payload, optionally followed by a NUL byte and a
 * desired-state document (the platform side; {} when absent or not an
 * object). Mirrors handle_shadow() in src/registry/handlers.c: size limit,
 * json_loadb with JSON_REJECT_DUPLICATES, {"reported": {...}} check,
 * fm_shadow_merge into the stored reported state, the stored-size check on
 * the dumps, then fm_shadow_delta as the registry thread computes it.
 *
 * Invariants on top of ASan/UBSan (RFC 7386 merge patch semantics):
 *  - merging the same patch twice changes nothing the second time;
 *  - the merged document holds no null values from the patch;
 *  - when desired holds no nulls, a device that applies the delta as a
 *    merge patch is left with an empty delta.
 */
#include "fleetml/registry.h"
#include "fuzz_common.h"

#include <jansson.h>

/* What a device has reported before: the patch merges into this. */
static const char STORED_REPORTED[] =
    "{\"fw\":\"1.2.0\",\"net\":{\"rssi\":-61,\"ip\":\"10.0.0.7\"},\"led\":\"green\","
    "\"interval_s\":60}";

static int has_null(json_t *v)
{
    if (json_is_null(v))
        return 1;
    if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x)
            if (has_null(x))
                return 1;
    }
    return 0;
}

/* Only null values directly under objects are meaningful to the merge
 * (arrays are replaced whole and may hold nulls). */
static int has_object_null(json_t *v)
{
    if (!json_is_object(v))
        return 0;
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x)
        if (json_is_null(x) || has_object_null(x))
            return 1;
    return 0;
}

static void dump_fail(const char *what, json_t *a, json_t *b)
{
    char *sa = json_dumps(a, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
    char *sb = json_dumps(b, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
    fprintf(stderr, "%s\n  a: %s\n  b: %s\n", what, sa ? sa : "?", sb ? sb : "?");
    free(sa);
    free(sb);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t plen = nul ? (size_t)(nul - data) : size;
    if (plen > FM_SHADOW_MAX_BYTES)
        return 0; /* handle_shadow refuses it before parsing ("too_large") */
    char *payload = fuzz_bytes(data, plen);
    json_t *des = NULL;
    if (nul) {
        size_t dlen = size - plen - 1;
        char *d = fuzz_bytes(nul + 1, dlen);
        des = json_loadb(d, dlen, JSON_REJECT_DUPLICATES, NULL);
        free(d);
    }
    if (!json_is_object(des)) {
        json_decref(des);
        des = json_object();
    }
    json_t *rep = json_loads(STORED_REPORTED, 0, NULL);
    FUZZ_CHECK(des && rep);

    json_t *doc = json_loadb(payload, plen, JSON_REJECT_DUPLICATES, NULL);
    json_t *patch = json_object_get(doc, "reported");
    if (!json_is_object(doc) || !json_is_object(patch))
        goto out; /* "invalid_request" */
    FUZZ_CHECK(fm_shadow_merge(rep, patch) == 0);
    FUZZ_CHECK(!has_object_null(rep));

    json_t *again = json_deep_copy(rep);
    FUZZ_CHECK(again);
    FUZZ_CHECK(fm_shadow_merge(again, patch) == 0);
    if (!json_equal(again, rep))
        dump_fail("merge patch is not idempotent", rep, again);
    json_decref(again);

    /* The stored size check of handle_shadow. */
    char *d_text = json_dumps(des, JSON_COMPACT | JSON_SORT_KEYS);
    char *r_text = json_dumps(rep, JSON_COMPACT | JSON_SORT_KEYS);
    FUZZ_CHECK(d_text && r_text);
    size_t stored = strlen(d_text) + strlen(r_text);
    /* What is stored is read back with json_loads: it must parse to the same. */
    json_t *back = json_loads(r_text, 0, NULL);
    if (!json_equal(back, rep))
        dump_fail("reported state does not survive dump/load", rep, back);
    json_decref(back);
    free(d_text);
    free(r_text);
    if (stored > FM_SHADOW_MAX_BYTES)
        goto out; /* "too_large" */

    json_t *delta = fm_shadow_delta(des, rep);
    FUZZ_CHECK(delta && json_is_object(delta));
    if (!has_null(des)) {
        json_t *applied = json_deep_copy(rep);
        FUZZ_CHECK(applied && fm_shadow_merge(applied, delta) == 0);
        json_t *left = fm_shadow_delta(des, applied);
        FUZZ_CHECK(left);
        if (json_object_size(left) != 0)
            dump_fail("delta not empty after applying it", delta, left);
        json_decref(left);
        json_decref(applied);
    }
    /* Delta against an empty reported state (a fresh device). */
    json_t *full = fm_shadow_delta(des, NULL);
    FUZZ_CHECK(full);
    json_decref(full);
    json_decref(delta);
out:
    json_decref(doc);
    json_decref(des);
    json_decref(rep);
    free(payload);
    return 0;
}
