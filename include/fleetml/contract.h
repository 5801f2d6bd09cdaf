/*
 * The device contract's grammar, in one leaf module every side uses: the
 * pipeline, the registry, the API, the CLI, the device SDK and the broker
 * plugin (which compiles src/core/contract.c into itself and links nothing
 * else of fleetml). Topics, the device-id and measurement-id grammars, the
 * error codes devices receive, and the reply documents (ok and error). docs/protocol.md
 * is the prose of the same contract.
 *
 * Depends on libc and jansson only (no fm_* allocation, no logging), so it
 * can live inside mosquitto.
 */
#ifndef FLEETML_CONTRACT_H
#define FLEETML_CONTRACT_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- identifiers ------------------------------------------------------------ */

#define FM_DEVICE_ID_MIN 3
#define FM_DEVICE_ID_MAX 64
#define FM_MEAS_ID_MAX 64

/* True when s is a valid device id: [a-z0-9][a-z0-9-]{2,63}, neither
 * "provisioning" (it would own fleet/provisioning/#) nor starting with
 * "fleetml-" (the platform's own client ids). NULL is not valid. */
bool fm_device_id_valid(const char *s);

/* A byte a measurement id may hold: [A-Za-z0-9._:-]. */
bool fm_measurement_id_char(unsigned char c);
/* True when s[0..len) is a measurement id: 1..FM_MEAS_ID_MAX such bytes. */
bool fm_measurement_id_valid(const char *s, size_t len);

/* ---- topics ----------------------------------------------------------------- */

#define FM_TOPIC_ROOT "fleet/"
#define FM_TOPIC_PROVISIONING "fleet/provisioning/"
#define FM_LEAF_MEASUREMENTS "measurements"
#define FM_LEAF_RESULTS "results"
/* Longest topic fleetml builds for a device (fleet/<id>/<leaf>). */
#define FM_TOPIC_MAX 256

/* When topic is exactly fleet/<device>/<leaf> with a valid device id,
 * copies the id into out (len >= FM_DEVICE_ID_MAX + 1) and returns true. */
bool fm_topic_device(const char *topic, const char *leaf, char *out, size_t len);
/* Writes fleet/<device>/<leaf> into buf; false when it does not fit. */
bool fm_topic_build(char *buf, size_t len, const char *device, const char *leaf);
/* Chooses a reply topic: the MQTT 5 Response Topic when it lies inside
 * the device's own namespace (fleet/<device>/...), has no wildcards and
 * fits, otherwise fleet/<device>/<default_leaf>. Writes into buf (len >=
 * FM_TOPIC_MAX recommended); returns buf. */
char *fm_reply_topic(const char *device_id, const char *response_topic, const char *default_leaf,
                     char *buf, size_t len);

/* ---- error replies ------------------------------------------------------------ */

/* Codes sent to devices in `error.code` (stable, documented). */
#define FM_VERR_MALFORMED_JSON "malformed_json"
#define FM_VERR_TOO_LARGE "payload_too_large"
#define FM_VERR_MISSING_FIELD "missing_field"
#define FM_VERR_INVALID_TYPE "invalid_type"
#define FM_VERR_INVALID_VALUE "invalid_value"
#define FM_VERR_UNKNOWN_FIELD "unknown_field"
#define FM_VERR_UNKNOWN_KIND "unknown_kind"
#define FM_VERR_OUT_OF_RANGE "out_of_range"
#define FM_VERR_UNKNOWN_DEVICE "unknown_device"
#define FM_VERR_DEVICE_INACTIVE "device_inactive"
#define FM_VERR_UNAVAILABLE "unavailable"
#define FM_VERR_RATE_LIMITED "rate_limited"
#define FM_VERR_INTERNAL "internal"

/* Writes the error reply {"id":mid,"status":"error","error":{"code","message"}}
 * (compact, NUL-terminated) into buf. Returns its length, or 0 when it does
 * not fit in len bytes or memory ran out (buf then holds nothing useful).
 * mid may be NULL or "" (no usable id). */
size_t fm_error_doc(char *buf, size_t len, const char *mid, const char *code,
                    const char *message);

/* ---- free-form JSON ------------------------------------------------------------ */

/* Deepest nesting accepted in free-form JSON from devices and users
 * (measurement meta, shadow states): {} and [] are one level. Deeper
 * documents are refused, so every stored document can be read back by
 * common JSON readers (many stop at 32-512 levels, some recurse). */
#define FM_JSON_DEPTH_MAX 16

struct json_t;
/* True when v nests objects and arrays more than max levels deep. The
 * walk stops as soon as it knows, so it recurses at most max + 1 deep. */
bool fm_json_too_deep(const struct json_t *v, int max);

/* ---- ok replies ---------------------------------------------------------------- */

/* Builds the "ok" reply a device gets for measurement mid:
 * {"id":mid,"status":"ok","model":model_ref,"outputs":{names[i]: values[i]
 * rounded to 3 decimals, in this order},"received_at":received_at}.
 * received_at is an RFC 3339 time the caller formats. Returns a
 * NUL-terminated string the caller frees with free() (fm_free is the same
 * allocator), or NULL when memory ran out or an argument is NULL. */
char *fm_ok_doc(const char *mid, const char *model_ref, const char *const *names,
                const float *values, size_t n, const char *received_at);

#ifdef __cplusplus
}
#endif

#endif
