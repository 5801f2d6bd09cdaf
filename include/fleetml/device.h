/*
 * fleetml device SDK: one simulated (or real) device talking to the fleet
 * over MQTT 5 with mutual TLS, following device contract v1
 * (docs/protocol.md):
 *
 *   - client id = certificate CN = device id;
 *   - subscribe `fleet/<id>/results` (QoS 1) before the first publish;
 *   - publish measurements QoS 1 to `fleet/<id>/measurements` with the
 *     MQTT 5 properties Response Topic = `fleet/<id>/results` and
 *     Correlation Data = bytes identifying the request;
 *   - the cloud answers on the response topic with the same correlation
 *     data; a repeated measurement id gets the original result again, so
 *     re-publishing is always safe.
 *
 * The client is single-threaded and never blocks except in
 * fm_devclient_loop(). It can be driven in two ways:
 *
 *   1. One device: call fm_devclient_loop() repeatedly.
 *   2. Many devices from one event loop (epoll, poll, ...): watch
 *      fm_devclient_fd() for readability, and for writability while
 *      fm_devclient_want_write() is true; call fm_devclient_loop_read() /
 *      fm_devclient_loop_write() when the socket is ready and
 *      fm_devclient_loop_misc() at least every fm_devclient_next_timeout_ms()
 *      (and at least once a second). The socket changes on every reconnect:
 *      re-register it whenever fm_devclient_fd_epoch() differs from the
 *      value seen when it was registered.
 *
 * A measurement handed to fm_devclient_publish_measurement() is "pending"
 * until exactly one of these happens, each reported through on_result:
 *   "ok" / "error"  the cloud's result arrived (json is the result document);
 *   "timeout"       no result after max_attempts sends or after
 *                   result_timeout_ms * max_attempts in total (json NULL).
 * PUBACK only means the broker has the message; the "ok" result is the
 * durable acknowledgement. Pending measurements survive reconnects and are
 * re-published (same id, same correlation data) once the client is
 * connected and subscribed again. A pending measurement is dropped without
 * a callback only by fm_devclient_free().
 *
 * Threads: a client must be used from one thread at a time. Different
 * clients may be used from different threads.
 */
#ifndef FLEETML_DEVICE_H
#define FLEETML_DEVICE_H

#include "fleetml/core.h"
#include "fleetml/measurement.h"
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device ids are `[a-z0-9][a-z0-9-]{2,63}`. */
#define FM_DEVICE_ID_MAXLEN 64
/* Measurement ids are 1..64 characters of [A-Za-z0-9._:-]. */
#define FM_DEVICE_MEAS_ID_MAXLEN 64

/* Defaults applied for zero-valued fields of fm_devclient_opts. */
#define FM_DEVCLIENT_DEFAULT_HOST "127.0.0.1"
#define FM_DEVCLIENT_DEFAULT_PORT 8883
#define FM_DEVCLIENT_DEFAULT_KEEPALIVE 60
#define FM_DEVCLIENT_DEFAULT_RESULT_TIMEOUT_MS 10000
#define FM_DEVCLIENT_DEFAULT_MAX_ATTEMPTS 3
#define FM_DEVCLIENT_DEFAULT_MAX_PENDING 64
#define FM_DEVCLIENT_DEFAULT_BACKOFF_MIN_MS 500
#define FM_DEVCLIENT_DEFAULT_BACKOFF_MAX_MS 30000
/* Upper bound on max_pending; keeps correlation slots in 16 bits. */
#define FM_DEVCLIENT_MAX_PENDING_LIMIT 65535

/* Device ids are checked with fm_device_id_valid() from measurement.h. */
/* Returns true when id is a valid measurement id (contract v1). */
bool fm_device_measurement_id_valid(const char *id);

typedef struct fm_devclient fm_devclient;

/* Called once per pending measurement when it is resolved (see above).
 * measurement_id and json are valid only during the call; json is the raw
 * result payload (len bytes, also NUL-terminated), or NULL with len 0 for
 * "timeout". status is "ok", "error" or "timeout". The callback may call
 * fm_devclient_publish_measurement() on the same client (closed-loop load
 * generators do), but must not free the client or call its loop, connect or
 * disconnect functions. */
typedef void (*fm_devclient_result_fn)(void *ud, const char *measurement_id, const char *status,
                                       const char *json, size_t len);

/* Called when the client becomes ready (connected and subscribed:
 * connected = true) or loses the connection (connected = false). reason is a
 * short human-readable explanation valid during the call. Optional. */
typedef void (*fm_devclient_state_fn)(void *ud, bool connected, const char *reason);

typedef struct fm_devclient_opts {
    const char *id;        /* device id; required */
    const char *host;      /* broker host; NULL = FM_DEVCLIENT_DEFAULT_HOST */
    int port;              /* 0 = FM_DEVCLIENT_DEFAULT_PORT */
    const char *ca_path;   /* PEM CA certificate that signed the broker's; required */
    const char *cert_path; /* PEM device certificate (CN = id); required */
    const char *key_path;  /* PEM device private key; required */
    int keepalive;         /* seconds; 0 = FM_DEVCLIENT_DEFAULT_KEEPALIVE */
    fm_devclient_result_fn on_result; /* required */
    void *ud;                         /* passed to the callbacks */

    /* Optional tuning; 0 selects the FM_DEVCLIENT_DEFAULT_* value. */
    fm_devclient_state_fn on_state;
    int result_timeout_ms; /* wait for a result before re-publishing */
    int max_attempts;      /* publishes per measurement before "timeout" */
    int max_pending;       /* measurements awaiting a result at once */
    int backoff_min_ms;    /* first reconnect delay */
    int backoff_max_ms;    /* reconnect delay cap */
} fm_devclient_opts;

/* Creates a client. Strings in opts are copied; the files are not read
 * until fm_devclient_connect(). Does no I/O. On success *out owns the new
 * client (free with fm_devclient_free). Returns 0, FM_EINVAL (missing or
 * invalid option; err says which), FM_ENOMEM, or FM_EUNAVAIL (libmosquitto
 * could not be initialised). On failure *out is untouched. */
int fm_devclient_new(const fm_devclient_opts *opts, fm_devclient **out, fm_errbuf *err);

/* Disconnects (best effort: waits at most 100 ms to flush DISCONNECT),
 * drops pending measurements without calling on_result, and frees c.
 * NULL is a no-op. */
void fm_devclient_free(fm_devclient *c);

/* Starts connecting: configures TLS (>= 1.2, the broker certificate is
 * verified against ca_path including its host name) and opens a
 * non-blocking connection. The TLS handshake, CONNECT and SUBSCRIBE then
 * proceed as the client is driven; on_state reports readiness.
 * Returns 0; FM_ECRYPTO when the CA, certificate or key cannot be loaded
 * (permanent: the client stays idle); FM_ESTATE when already started; or
 * FM_EIO when the connection cannot even be started — in that case a
 * reconnect is already scheduled with backoff, so the caller may keep
 * driving the client or free it. err explains failures. */
int fm_devclient_connect(fm_devclient *c, fm_errbuf *err);

/* Queues one measurement: payload (len bytes of JSON) and measurement_id
 * are copied, a correlation id is assigned, and the measurement is
 * published now if the client is ready, or as soon as it is.
 * Returns 0 (on_result will be called exactly once for it later, never from
 * inside this call), FM_EINVAL (invalid id, empty payload), FM_EEXIST (this
 * id is already pending), FM_EBUSY (max_pending measurements already
 * pending), or FM_ENOMEM. On failure nothing is queued. */
int fm_devclient_publish_measurement(fm_devclient *c, const char *payload, size_t len,
                                     const char *measurement_id);

/* ---- driving the client from an event loop ------------------------------ */

/* The socket to watch, or -1 while there is none (backing off, idle). */
int fm_devclient_fd(const fm_devclient *c);
/* Changes whenever the socket is opened or closed (fd numbers are reused by
 * the kernel, so comparing fds alone cannot detect a new socket). */
uint64_t fm_devclient_fd_epoch(const fm_devclient *c);
/* True while output is queued (or the TLS handshake wants to write). */
bool fm_devclient_want_write(const fm_devclient *c);
/* Handle readability / writability of fm_devclient_fd(). Connection loss is
 * not an error: it is reported through on_state and a reconnect is
 * scheduled. Returns 0, or a negative FM_E* code only for a fatal problem
 * (FM_ENOMEM). Callbacks run from inside these calls. */
int fm_devclient_loop_read(fm_devclient *c);
int fm_devclient_loop_write(fm_devclient *c);
/* Timers: keepalive pings, result timeouts and re-publishing, and reconnect
 * attempts. Call at least every fm_devclient_next_timeout_ms(). Returns 0 or
 * a fatal FM_E* code. */
int fm_devclient_loop_misc(fm_devclient *c);
/* Milliseconds until loop_misc has timer work to do (0..1000). */
int fm_devclient_next_timeout_ms(const fm_devclient *c);

/* Blocking driver for a single client: waits up to timeout_ms (>= 0) for
 * socket activity or a timer, then runs read/write/misc as needed. Returns
 * 0, or a fatal FM_E* code. An interrupted wait (EINTR) returns 0 early so
 * signal handlers can stop the caller's loop. */
int fm_devclient_loop(fm_devclient *c, int timeout_ms);

/* Sends DISCONNECT if connected and stops reconnecting. Pending
 * measurements stay pending until fm_devclient_free(). Returns 0. */
int fm_devclient_disconnect(fm_devclient *c);

/* ---- state and statistics ----------------------------------------------- */

/* True once connected and subscribed, until the connection is lost. */
bool fm_devclient_ready(const fm_devclient *c);
/* Number of measurements awaiting a result. */
size_t fm_devclient_pending(const fm_devclient *c);

typedef struct fm_devclient_stats {
    uint64_t connects;    /* times the client became ready */
    uint64_t disconnects; /* connections lost (or refused) */
    uint64_t published;   /* first publishes of measurements */
    uint64_t republished; /* re-publishes after reconnect or result timeout */
    uint64_t results;     /* "ok" + "error" results delivered */
    uint64_t timeouts;    /* "timeout" results delivered */
    uint64_t ignored;     /* unmatched or duplicate result messages */
} fm_devclient_stats;
void fm_devclient_get_stats(const fm_devclient *c, fm_devclient_stats *out);

/* Details of the result being delivered; only valid inside on_result (the
 * callback receives ud, so keep the client pointer reachable from it). */
typedef struct fm_devclient_result_info {
    uint64_t latency_ns;    /* from fm_devclient_publish_measurement() to receipt */
    uint64_t queued_ns;     /* fm_mono_ns() when the measurement was queued */
    unsigned attempts;      /* publishes made (1 = no retry) */
} fm_devclient_result_info;
/* Returns 0 and fills *out inside on_result, FM_ESTATE elsewhere. */
int fm_devclient_result_info_get(const fm_devclient *c, fm_devclient_result_info *out);

/* ---- helpers shared with load generators (pure, no I/O) ----------------- */

/* Reconnect delay before attempt number `attempt` (0 = first retry):
 * exponential from min_ms doubling up to max_ms, with "equal jitter" (the
 * result lies in [d/2, d] for the nominal delay d) so that many devices
 * dropped at once do not reconnect in lock-step. rnd is any random value;
 * the same inputs give the same output. */
uint32_t fm_devclient_backoff_ms(unsigned attempt, uint32_t min_ms, uint32_t max_ms, uint64_t rnd);

/* Feeds a result message as if received from the broker: correlation data
 * plus payload. The MQTT message handler uses this; it is public so the
 * correlation logic can be tested without a broker. Unknown, stale or
 * duplicate correlation data is ignored (counted in stats.ignored).
 * Returns 0 or FM_ENOMEM. */
int fm_devclient_handle_result(fm_devclient *c, const void *corr, size_t corr_len,
                               const char *payload, size_t len);
/* Copies the correlation data of the pending measurement `measurement_id`
 * into buf (cap bytes; FM_DEVCLIENT_CORR_LEN suffice) and sets *len.
 * Returns 0, FM_ENOTFOUND, or FM_ERANGE (buf too small). */
#define FM_DEVCLIENT_CORR_LEN 16
int fm_devclient_correlation(const fm_devclient *c, const char *measurement_id, void *buf,
                             size_t cap, size_t *len);

/* Latency histogram with bounded memory and ~1.6% relative precision
 * (log-linear buckets from 1 us to ~1 hour), for percentiles over millions
 * of samples. Caller-owned storage: zero it (or fm_lathist_reset) before
 * use; no cleanup needed. */
#define FM_LATHIST_SUB 64
#define FM_LATHIST_OCTAVES 32
typedef struct fm_lathist {
    uint64_t count;
    uint64_t max_ns;
    uint64_t min_ns;
    uint64_t sum_ns;
    uint64_t buckets[FM_LATHIST_OCTAVES][FM_LATHIST_SUB];
} fm_lathist;
void fm_lathist_reset(fm_lathist *h);
void fm_lathist_record(fm_lathist *h, uint64_t ns);
/* Adds src's samples into dst. */
void fm_lathist_merge(fm_lathist *dst, const fm_lathist *src);
/* Value at quantile q in [0, 1] (nearest rank; the bucket's upper bound,
 * clamped to the observed max). Returns 0 when empty. */
uint64_t fm_lathist_quantile(const fm_lathist *h, double q);

#ifdef __cplusplus
}
#endif
#endif
