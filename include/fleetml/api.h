/*
 * HTTP listener (libmicrohttpd): health, readiness, metrics and the user
 * API v1 (sign-in, users, devices, templates, measurements, labels, model
 * predict, audit). The contract is docs/openapi.yaml, served at
 * /api/v1/openapi.yaml; design notes in docs/architecture.md ("HTTP API").
 *
 *   GET /healthz  200 {"status":"ok","version":..,"node":..,"broker_pid":..}
 *                 as long as the process is alive and serving
 *   GET /readyz   200 when the platform can accept measurements, else 503;
 *                 {"ready":bool,"checks":{"broker":..,"mqtt":..,"store":..,
 *                  "model":..},"model":"name@version"}
 *   GET /metrics  Prometheus text format (version 0.0.4)
 *   /api/v1/...   JSON API; errors are {"error":{"code":..,"message":..}}
 */
#ifndef FLEETML_API_H
#define FLEETML_API_H

#include "fleetml/config.h"
#include "fleetml/core.h"

#include <stdbool.h>

struct fm_pipeline;
struct json_t;

typedef struct fm_health {
    int broker_pid;     /* 0 when the broker is down or external */
    int broker_up;
    int mqtt_connected;
    int store_ok;
    int model_loaded;
    char model[128];
} fm_health;

/* Fills *out with the current state; called on an HTTP thread. */
typedef void (*fm_health_fn)(void *ud, fm_health *out);

typedef struct fm_http fm_http;

typedef struct fm_http_opts {
    const fm_config *cfg;
    fm_health_fn health;
    void *ud;
    /* Where POST /models/{name}/predict?store=true submits measurements
     * (the same pipeline devices use). NULL: such requests answer 503. */
    struct fm_pipeline *pipeline;
    /* This node's functions, listed by GET /functions; NULL: none. */
    struct fm_fn_registry *functions;
} fm_http_opts;

/* Starts the listener on cfg->http_bind:http_port (HTTPS when http.tls is
 * on) with cfg->http_threads threads, each with its own store handle. It
 * loads the token key <data>/pki/jwt.key and the model in cfg->model_dir
 * (for predict). Returns 0 and *out, or FM_EINVAL (bad address, bad
 * trusted_proxies, TLS files unusable) / FM_EIO (cannot listen) /
 * FM_ENOTFOUND (no token key: run `fleetml init`) / a store or model
 * error, with err set. Nothing is left running on failure. */
int fm_http_start(const fm_http_opts *opts, fm_http **out, fm_errbuf *err);
/* Stops accepting, finishes requests in flight, frees everything. NULL is
 * ignored. */
void fm_http_stop(fm_http *h);

/* ---- route table (for `fleetml api routes` and the OpenAPI check) ---- */

typedef struct fm_api_route_info {
    const char *method;  /* "GET", "POST", "PUT", "PATCH" */
    const char *path;    /* "/api/v1/devices/{id}" */
    const char *action;  /* permission (fleetml/auth.h), NULL: signed-in only,
                            "public": no token needed */
} fm_api_route_info;

/* Number of API routes, and route i (0 <= i < count); static storage. */
size_t fm_api_route_count(void);
const fm_api_route_info *fm_api_route_at(size_t i);

/* ---- the request edge ------------------------------------------------------
 * Checks fleetml makes on every request before routing (docs/operations.md,
 * "The HTTP edge"), exposed for the fuzzer. */

/* What the framing check needs from a request head. Zero-initialise, set
 * http10, then feed every header line through fm_http_head_add. */
typedef struct fm_http_head {
    bool http10;                 /* the request line said HTTP/1.0 */
    unsigned n_length, n_coding, n_host;
    bool bad_name, bad_value;    /* a name is not a token / a value holds a CTL */
    bool length_ok;              /* the first Content-Length is 1..18 digits */
    bool length_conflict;        /* a later Content-Length differs from the first */
    bool coding_chunked;         /* the (last) Transfer-Encoding is exactly chunked */
    unsigned long long length;   /* the first Content-Length when length_ok */
    char length_text[24];
    size_t length_text_len;
} fm_http_head;

/* Records one header field (name and value as received; not NUL-terminated,
 * may hold any byte). */
void fm_http_head_add(fm_http_head *h, const char *name, size_t nlen, const char *value,
                      size_t vlen);
/* NULL when the head frames a request unambiguously (RFC 9112 6.1-6.3:
 * Content-Length xor chunked, one Host on HTTP/1.1, clean field bytes);
 * otherwise why not, in a static string. Such a request is answered 400
 * and its connection closed. */
const char *fm_http_head_check(const fm_http_head *h);

/* Copies the path of an origin-form request target (as sent, before any
 * percent-decoding; the query is left out) into path. Returns 0, FM_EINVAL
 * when the target does not start with '/', holds a byte outside visible
 * ASCII, a '#' or a malformed %-escape, or FM_ERANGE when the path does not
 * fit in len bytes. */
int fm_http_target_path(const char *target, char *path, size_t len);

/* Percent-decodes one path segment seg[0..n) (a route parameter) into out
 * (NUL-terminated). Returns 0, FM_EINVAL for an empty result, ".", "..", a
 * malformed escape or a decoded '/', '\\', NUL or other control byte, or
 * FM_ERANGE when it does not fit in len bytes. */
int fm_http_param_decode(const char *seg, size_t n, char *out, size_t len);

/* ---- request bodies ----------------------------------------------------
 * Bodies are untrusted: fm_api_parse_body accepts exactly one JSON object
 * (UTF-8, no duplicate keys, nothing after it) of at most len bytes and
 * returns 0 and *out (json_decref), or FM_EINVAL with a message in
 * msg (>= 128 bytes advised) naming what is wrong. Exposed for the fuzzer. */
int fm_api_parse_body(const char *body, size_t len, struct json_t **out, char *msg,
                      size_t msg_len);

/* Field readers used by every handler, exposed for the fuzzer. Each returns
 * 0, or FM_EINVAL with msg set ("field 'x' ..."). A missing optional field
 * leaves *out unchanged.
 *   fm_api_get_str: a string of 1..max_len bytes without NUL or control
 *     characters; *out borrows from obj.
 *   fm_api_get_int: an integer in [min, max].
 *   fm_api_get_bool: true/false.
 *   fm_api_get_roles: an array of role names (fleetml/auth.h) -> bit mask.
 *   fm_api_check_label_outputs: an object of 1..max_outputs finite numbers
 *     whose keys are among names[0..n-1]. */
int fm_api_get_str(const struct json_t *obj, const char *key, bool required, size_t max_len,
                   const char **out, char *msg, size_t msg_len);
int fm_api_get_int(const struct json_t *obj, const char *key, bool required, long long min,
                   long long max, long long *out, char *msg, size_t msg_len);
int fm_api_get_bool(const struct json_t *obj, const char *key, bool required, bool *out,
                    char *msg, size_t msg_len);
int fm_api_get_roles(const struct json_t *obj, const char *key, unsigned *out, char *msg,
                     size_t msg_len);
int fm_api_check_label_outputs(const struct json_t *outputs, const char *const *names, size_t n,
                               char *msg, size_t msg_len);

/* Opaque pagination cursors: up to two integers and a string, encoded as
 * base64url text. decode is strict and returns 0 or FM_EINVAL (anything a
 * client could have altered or made up). */
int fm_api_cursor_encode(int64_t a, int64_t b, const char *s, char *out, size_t len);
int fm_api_cursor_decode(const char *cursor, int64_t *a, int64_t *b, char *s, size_t s_len);

#endif
