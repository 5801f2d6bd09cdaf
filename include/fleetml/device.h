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
 *
 * ---- SDK v2: state directory, claim, outbox, shadow, rotation -------------
 *
 * Giving opts.state_dir turns the client into a Linux-class firmware
 * client that keeps everything it must not lose in that directory:
 *
 *   <state>/device.key        private key (0600, generated here, never sent)
 *   <state>/device.crt        certificate issued by the cloud (claim mode)
 *   <state>/ca.crt            the platform CA returned with it
 *   <state>/identity.json     device id, serial and endpoint (claim mode)
 *   <state>/outbox/<id>.json  measurements not yet answered
 *
 * Claim flow (opts.claim != NULL): if <state>/device.crt exists the device
 * is provisioned and the claim is skipped. Otherwise fm_devclient_connect()
 * creates <state>/device.key (fm_key_ensure) and a CSR, connects with the
 * claim certificate as client id `prov-<serial>`, subscribes
 * fleet/provisioning/<client id>/accepted and .../rejected, and publishes
 * the request (QoS 1). Without an answer within claim->timeout_ms the same
 * request is published again, with growing waits, up to
 * claim->max_attempts times; rejections `unavailable`, `internal` and
 * `rate_limited` are retried the same way, every other code is final (the
 * client fails: fm_devclient_error()). On acceptance ca.crt, identity.json
 * and finally device.crt are written atomically (fsynced) and the client
 * reconnects as the device.
 *   Repeating the request is safe only while no answer has arrived: the
 * cloud answers a serial it has already provisioned with
 * `already_provisioned` (unless the template allows re-provisioning). So if
 * an acceptance is lost (connection cut after the cloud committed), the
 * retry is rejected with `already_provisioned` and the device cannot
 * recover on its own: the operator must allow re-provisioning for the
 * template (the device then keeps its id and gets a new certificate) or
 * remove the device. fm_devclient_error() says so in that case.
 *
 * Outbox (state_dir set): fm_devclient_publish_measurement() first writes
 * the payload to <state>/outbox/<id>.json (temp file + fsync + rename +
 * directory fsync) and only then publishes it. The entry is deleted when
 * its result arrives: "ok", or an "error" that retrying cannot change.
 * Errors `unavailable` and `internal`, broker refusals "server busy" and
 * "quota exceeded", and missing results are retried with backoff (while
 * connected, and after every reconnect) for as long as it takes: in outbox
 * mode there is no "timeout" status. fm_devclient_new() loads the entries
 * left by an earlier run (oldest first) and sends them again with their
 * original ids. Bounds: opts.outbox_max_entries / outbox_max_bytes; when
 * full, FM_OUTBOX_REFUSE_NEW (default) makes publishing fail with FM_EBUSY,
 * FM_OUTBOX_DROP_OLDEST deletes the oldest entry and reports it through
 * on_result with status "dropped" (from the next loop call, never from
 * inside the publish call).
 *
 * Guarantees with an outbox:
 *   - delivery to the cloud is at-least-once (across crashes, kill -9,
 *     broker outages), and storage is exactly-once because the cloud
 *     dedupes by measurement id and answers a repeat with the original
 *     result;
 *   - on_result runs exactly once per measurement id in normal operation
 *     (duplicate results of retries are ignored);
 *   - across a crash it is at-least-once: on_result runs *before* the
 *     entry is deleted, so a crash after on_result returned and before the
 *     deletion reached the disk (unlink + directory fsync) leaves the entry;
 *     the restarted client sends it again and on_result runs a second time
 *     for that id, with the cloud's original result. A crash before
 *     on_result ran loses nothing either. Make on_result idempotent per
 *     measurement id if a second call matters;
 *   - a measurement for which publish returned an error was not stored.
 *
 * Shadow: with on_shadow set (or a state directory) the client also
 * subscribes fleet/<id>/shadow/{delta,document,rejected}; see
 * fm_devclient_shadow_report() / _get(). Rotation: fm_devclient_rotate().
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

/* ---- the outbox (also usable on its own) ---------------------------------- */

enum fm_outbox_policy {
    FM_OUTBOX_REFUSE_NEW = 0, /* full: new measurements are refused (FM_EBUSY) */
    FM_OUTBOX_DROP_OLDEST = 1 /* full: the oldest entries are deleted to make room */
};
#define FM_OUTBOX_DEFAULT_MAX_ENTRIES 1000
#define FM_OUTBOX_DEFAULT_MAX_BYTES (16u * 1024u * 1024u)

typedef struct fm_outbox fm_outbox;
/* An entry read back by fm_outbox_load (data is NUL-terminated too; both
 * valid during the call only). */
typedef void (*fm_outbox_entry_fn)(void *ud, const char *id, const char *data, size_t len);
/* An entry deleted by the drop-oldest policy (id valid during the call). */
typedef void (*fm_outbox_drop_fn)(void *ud, const char *id);

/* Opens (creating it, 0700) the outbox directory and indexes its entries.
 * Crash leftovers are deleted: temp files of interrupted writes, empty
 * entries and any file not named `<valid measurement id>.json`. Entries
 * over the bounds are kept (the bounds apply to adding). 0 for a bound
 * selects the default. Returns 0 and *out (free with fm_outbox_close),
 * FM_EINVAL, FM_EIO or FM_ENOMEM with err. */
int fm_outbox_open(const char *dir, size_t max_entries, size_t max_bytes,
                   enum fm_outbox_policy policy, fm_outbox **out, fm_errbuf *err);
void fm_outbox_close(fm_outbox *ob);
/* Reads every entry, oldest first, and passes it to fn. Entries that
 * vanished meanwhile are forgotten. Returns 0, FM_EIO or FM_ENOMEM. */
int fm_outbox_load(fm_outbox *ob, fm_outbox_entry_fn fn, void *ud);
/* Stores one entry durably (atomic write, fsynced). With the drop-oldest
 * policy, after the new entry is stored, the oldest ones are deleted until
 * the bounds hold again, each reported to on_drop (may be NULL). Returns 0,
 * FM_EINVAL (invalid id, empty data), FM_ERANGE (larger than max_bytes),
 * FM_EEXIST (id already stored), FM_EBUSY (full, refuse-new policy),
 * FM_EIO, FM_ENOSPC or FM_ENOMEM; on failure nothing was stored. */
int fm_outbox_put(fm_outbox *ob, const char *id, const void *data, size_t len,
                  fm_outbox_drop_fn on_drop, void *ud);
/* Deletes an entry (unlink + directory fsync). Returns 0, FM_ENOTFOUND or
 * FM_EIO (the entry is forgotten anyway when the unlink itself worked). */
int fm_outbox_remove(fm_outbox *ob, const char *id);
size_t fm_outbox_count(const fm_outbox *ob);
size_t fm_outbox_bytes(const fm_outbox *ob);
bool fm_outbox_contains(const fm_outbox *ob, const char *id);
const char *fm_outbox_dir(const fm_outbox *ob);

/* ---- the identity file (<state>/identity.json) ----------------------------- */

typedef struct fm_device_identity {
    char device_id[FM_DEVICE_ID_MAXLEN + 1];
    char serial[65];  /* "" when unknown */
    char host[256];   /* endpoint host, "" when none was given */
    int port;         /* endpoint port, 0 when none was given */
} fm_device_identity;
/* Parse / read / write (atomically, 0644). Errors: FM_EINVAL (malformed,
 * invalid device id, bad endpoint), FM_ENOTFOUND, FM_EIO, FM_ENOMEM. */
int fm_device_identity_parse(const char *text, size_t len, fm_device_identity *out,
                             fm_errbuf *err);
int fm_device_identity_read(const char *path, fm_device_identity *out, fm_errbuf *err);
int fm_device_identity_write(const char *path, const fm_device_identity *id, fm_errbuf *err);

/* ---- claim, shadow and rotation callbacks ---------------------------------- */

/* Claim identity used when the device has no certificate yet. */
typedef struct fm_devclient_claim {
    const char *cert_path; /* claim certificate (CN = claim:<template>); required */
    const char *key_path;  /* its private key; required */
    const char *serial;    /* [A-Za-z0-9_-]{1,64}; client id becomes prov-<serial> */
    const char *model;     /* free text sent with the request; NULL = "" */
    const char *firmware;  /* free text sent with the request; NULL = "" */
    int timeout_ms;        /* wait for an answer; 0 = 10000 */
    int max_attempts;      /* requests before giving up; 0 = 6 */
} fm_devclient_claim;

enum fm_shadow_kind {
    FM_SHADOW_DELTA = 1,    /* fleet/<id>/shadow/delta: {"state": {...}, "version": N} */
    FM_SHADOW_DOCUMENT = 2, /* fleet/<id>/shadow/document: the whole document */
    FM_SHADOW_REJECTED = 3  /* fleet/<id>/shadow/rejected: {"code", "message"} */
};
/* json (len bytes, NUL-terminated) is valid during the call only. The
 * callback may call fm_devclient_shadow_report()/_get(). */
typedef void (*fm_devclient_shadow_fn)(void *ud, enum fm_shadow_kind kind, const char *json,
                                       size_t len);
/* Outcome of fm_devclient_rotate(): accepted (the new certificate and key
 * are installed and the client reconnects with them) or not, with the
 * cloud's code ("timeout" when no answer came within 30 s, "io" when the
 * new files could not be installed) and message. */
typedef void (*fm_devclient_rotate_fn)(void *ud, bool accepted, const char *code,
                                       const char *message);

/* Called once per pending measurement when it is resolved (see above).
 * measurement_id and json are valid only during the call; json is the raw
 * result payload (len bytes, also NUL-terminated), or NULL with len 0 for
 * "timeout" and "dropped". status is "ok", "error", "timeout" (no outbox)
 * or "dropped" (outbox, drop-oldest policy). The callback may call
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
    const char *id;        /* device id; required unless claim is set (then NULL) */
    const char *host;      /* broker host; NULL = FM_DEVCLIENT_DEFAULT_HOST */
    int port;              /* 0 = FM_DEVCLIENT_DEFAULT_PORT */
    const char *ca_path;   /* PEM CA certificate that signed the broker's; required */
    const char *cert_path; /* PEM device certificate (CN = id); required unless claim */
    const char *key_path;  /* PEM device private key; required unless claim */
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

    /* SDK v2 (see the top of this file); all optional. */
    const char *state_dir; /* enables the outbox; required with claim */
    const fm_devclient_claim *claim; /* onboard by claim (cert/key in state_dir) */
    bool use_claim_endpoint; /* after the claim, connect to the endpoint the
                                cloud returned instead of host/port */
    int outbox_max_entries;  /* 0 = FM_OUTBOX_DEFAULT_MAX_ENTRIES (<= 65535) */
    size_t outbox_max_bytes; /* 0 = FM_OUTBOX_DEFAULT_MAX_BYTES */
    enum fm_outbox_policy outbox_policy;
    fm_devclient_shadow_fn on_shadow;
    fm_devclient_rotate_fn on_rotate;
} fm_devclient_opts;

/* Creates a client. Strings in opts are copied; the TLS files are not read
 * until fm_devclient_connect(). Without state_dir it does no I/O. With
 * state_dir it finishes an interrupted certificate rotation, reads
 * identity.json when the device is already provisioned (claim mode), opens
 * the outbox and queues the measurements left in it (they are sent once
 * connected; max_pending is then the outbox entry bound). On success *out
 * owns the new client (free with fm_devclient_free). Returns 0, FM_EINVAL
 * (missing or invalid option, or a provisioned state directory without a
 * valid identity.json; err says which), FM_EIO (state directory), FM_ENOMEM,
 * or FM_EUNAVAIL (libmosquitto could not be initialised). On failure *out
 * is untouched. */
int fm_devclient_new(const fm_devclient_opts *opts, fm_devclient **out, fm_errbuf *err);

/* Disconnects (best effort: waits at most 100 ms to flush DISCONNECT),
 * drops pending measurements without calling on_result, and frees c.
 * NULL is a no-op. */
void fm_devclient_free(fm_devclient *c);

/* Starts connecting: configures TLS (>= 1.2, the broker certificate is
 * verified against ca_path including its host name) and opens a
 * non-blocking connection. In claim mode, for a device not provisioned yet,
 * it first makes sure <state>/device.key exists and creates the CSR (errors:
 * FM_ECRYPTO, FM_EIO), then connects with the claim identity.
 * Also allowed after the client failed (fm_devclient_error() != NULL) to
 * start over. The TLS handshake, CONNECT and SUBSCRIBE then
 * proceed as the client is driven; on_state reports readiness.
 * Returns 0; FM_ECRYPTO when the CA, certificate or key cannot be loaded
 * (permanent: the client stays idle); FM_ESTATE when already started; or
 * FM_EIO when the connection cannot even be started — in that case a
 * reconnect is already scheduled with backoff, so the caller may keep
 * driving the client or free it. err explains failures. */
int fm_devclient_connect(fm_devclient *c, fm_errbuf *err);

/* Queues one measurement: payload (len bytes of JSON) and measurement_id
 * are copied (and with a state directory written to the outbox first), a
 * correlation id is assigned, and the measurement is published now if the
 * client is ready, or as soon as it is. With an outbox it may also return
 * FM_EBUSY (outbox full, refuse-new policy), FM_ERANGE (larger than the
 * byte bound), FM_EIO or FM_ENOSPC (not stored).
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

/* ---- shadow and rotation ------------------------------------------------- */

/* Publishes `{"reported": <reported_json>}` (QoS 1) to
 * fleet/<id>/shadow/update; reported_json must be a JSON object (keys set,
 * null deletes). Returns 0, FM_EINVAL (not a JSON object), FM_ESTATE (not
 * ready: the shadow is state, not an event log, so nothing is queued;
 * report again after on_state says connected), FM_ENOMEM or FM_EIO. */
int fm_devclient_shadow_report(fm_devclient *c, const char *reported_json);
/* Asks for the document (answered on FM_SHADOW_DOCUMENT). Same errors. */
int fm_devclient_shadow_get(fm_devclient *c);

/* Starts a certificate rotation: ensures a new key at <key_path>.next
 * (kept from an earlier unfinished rotation if present), makes a CSR and
 * publishes it to fleet/<id>/cert/rotate. When the cloud accepts, the new
 * certificate is written to <cert_path>.next and installed by renaming the
 * key and then the certificate over the old files (fm_devclient_new rolls
 * an interrupted installation forward), then the client reconnects with
 * them; on_rotate reports the outcome either way. Returns 0, FM_ESTATE (not
 * ready, a rotation already running, or no shadow/rotation subscriptions:
 * set state_dir, on_shadow or on_rotate), FM_ECRYPTO, FM_EIO or FM_ENOMEM
 * with err. */
int fm_devclient_rotate(fm_devclient *c, fm_errbuf *err);

/* ---- state and statistics ----------------------------------------------- */

/* The device id; "" while a claim is still in progress. */
const char *fm_devclient_id(const fm_devclient *c);
/* NULL, or why the client stopped for good (claim rejected, TLS material
 * unusable, ...). Valid until the next call on c. */
const char *fm_devclient_error(const fm_devclient *c);
/* True while the claim flow runs (not provisioned yet). */
bool fm_devclient_claiming(const fm_devclient *c);

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
    uint64_t dropped;     /* outbox entries dropped by the drop-oldest policy */
    uint64_t retried_errors; /* retryable error results (outbox mode) */
    uint64_t recovered;   /* outbox entries loaded at start */
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
