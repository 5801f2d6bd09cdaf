/*
 * Device SDK core: one MQTT 5 client over mutual TLS that publishes
 * measurements and maps results back to them by correlation data.
 *
 * Design notes
 *
 * Pending measurements live in a fixed array of slots allocated once at
 * creation, so publishing never allocates more than the payload copy and a
 * result is matched in O(1): the correlation data names the slot directly.
 * Each use of a slot gets a fresh generation number that is part of the
 * correlation data too, so a late duplicate result for a slot that has been
 * reused is recognised as stale instead of resolving the wrong measurement.
 * A per-client random nonce in front keeps results addressed to an earlier
 * process with the same device id from matching anything.
 *
 * The same slots are also linked into a FIFO in queueing order, so that after
 * a reconnect the oldest measurements are re-published first and the timer
 * scan walks only the measurements that exist.
 *
 * libmosquitto is used without its own thread (no mosquitto_loop_start): the
 * caller drives the socket, which is what lets `fleetml sim` run thousands of
 * devices from one epoll loop. Reconnecting is done here rather than with
 * mosquitto_reconnect_delay_set() because that setting only applies inside
 * mosquitto_loop_forever().
 *
 * Every connection attempt uses a fresh libmosquitto instance. libmosquitto
 * 2.0 treats SSL_ERROR_SYSCALL during a non-blocking TLS connect as "try
 * again", so a refused or reset connection would otherwise spin until the
 * keepalive expires; dropping the instance is the only public way out. It
 * also discards libmosquitto's own queue of unacknowledged publishes, which
 * would duplicate the re-publishing done here.
 */
#include "fleetml/device.h"
#include "fleetml/pki.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define COMPONENT "device"
#define CORR_MAGIC_LEN 8
#define NS_PER_MS 1000000ull
/* Ceiling on how long fm_devclient_disconnect() waits to flush DISCONNECT. */
#define DISCONNECT_FLUSH_MS 100
/* How long the TLS handshake, CONNACK and SUBACK may take together. */
#define CONNECT_TIMEOUT_MS 10000
/* While connecting, the handshake is nudged this often (see loop_misc). */
#define CONNECT_NUDGE_MS 50
/* How long a certificate rotation may wait for the cloud's answer. */
#define ROTATE_TIMEOUT_MS 30000
#define CLAIM_DEFAULT_TIMEOUT_MS 10000
#define CLAIM_DEFAULT_MAX_ATTEMPTS 6
#define TOPIC_LEN (FM_DEVICE_ID_MAXLEN + 96)
/* Subscriptions of a device: results, then the shadow and rotation topics. */
#define MAX_SUBS 6

enum state {
    ST_IDLE,        /* never started, or stopped by fm_devclient_disconnect */
    ST_CONNECTING,  /* socket open, TLS handshake / CONNACK outstanding */
    ST_SUBSCRIBING, /* CONNACK ok, SUBACK for the results topic outstanding */
    ST_READY,       /* subscribed: measurements may be published */
    ST_BACKOFF,     /* connection lost; waiting to reconnect */
    ST_FAILED       /* permanent configuration error (TLS material) */
};

struct pending {
    char *id;        /* NULL while the slot is free */
    char *payload;
    size_t len;
    uint32_t gen;    /* generation of the current use; part of the correlation data */
    int mid;         /* MQTT message id of the latest publish on this connection */
    bool in_flight;  /* published on the current connection */
    unsigned attempts;
    uint64_t queued_ns;
    uint64_t sent_ns;
    uint64_t next_try_ns; /* outbox: do not (re)send before this */
    const char *reject_code; /* set when the broker refused the publish */
    char reject_msg[96];
    int32_t prev, next; /* FIFO links (slot indexes, -1 = none) */
};

struct fm_devclient {
    struct mosquitto *m;
    char id[FM_DEVICE_ID_MAXLEN + 1]; /* "" while claiming */
    char client_id[FM_DEVICE_ID_MAXLEN + 8]; /* MQTT client id (also the log name) */
    char *host;
    int port;
    int keepalive;
    char *ca_path, *cert_path, *key_path;
    char topic_meas[FM_DEVICE_ID_MAXLEN + 32];
    char topic_res[FM_DEVICE_ID_MAXLEN + 32];
    char topic_shadow_delta[TOPIC_LEN], topic_shadow_doc[TOPIC_LEN], topic_shadow_rej[TOPIC_LEN];
    char topic_shadow_update[TOPIC_LEN], topic_shadow_get[TOPIC_LEN];
    char topic_cert_rotate[TOPIC_LEN], topic_cert_acc[TOPIC_LEN], topic_cert_rej[TOPIC_LEN];
    char topic_claim_req[TOPIC_LEN], topic_claim_acc[TOPIC_LEN], topic_claim_rej[TOPIC_LEN];
    bool extras; /* subscribe the shadow and rotation topics too */
    int n_subs;  /* topics in the outstanding SUBSCRIBE */

    /* v2: state directory, outbox, claim, rotation */
    char *state_dir;
    fm_outbox *ob;
    char **dropped; /* ids dropped by the outbox, reported from the next loop call */
    size_t n_dropped, cap_dropped;
    bool claiming;
    char *claim_cert, *claim_key, *serial, *model, *firmware;
    char *claim_req; /* request payload, built by fm_devclient_connect */
    uint64_t claim_timeout_ns;
    unsigned claim_max_attempts, claim_attempts;
    uint64_t claim_next_ns;
    bool use_claim_endpoint;
    char new_id[FM_DEVICE_ID_MAXLEN + 1];
    char new_host[256];
    int new_port;
    /* Work that must not run inside a libmosquitto callback (it replaces
     * the instance); done by run_deferred() when the loop call returns. */
    bool switch_pending, reconnect_pending, fail_pending;
    char fail_reason[320];
    char error[320]; /* permanent failure, "" = none */
    bool rotating;
    uint64_t rotate_deadline_ns;
    fm_devclient_shadow_fn on_shadow;
    fm_devclient_rotate_fn on_rotate;
    fm_devclient_result_fn on_result;
    fm_devclient_state_fn on_state;
    void *ud;
    uint64_t timeout_ns;
    unsigned max_attempts;
    uint32_t max_pending;
    uint32_t backoff_min_ms, backoff_max_ms;

    enum state st;
    bool tls_configured;
    bool fresh;          /* m has not been used for a connection attempt yet */
    bool ever_connected; /* a TLS error before the first success is permanent */
    int sub_mid;
    unsigned backoff_attempt;
    uint64_t next_connect_ns;
    uint64_t connect_deadline_ns;
    char last_reason[128];

    uint64_t rng;
    uint8_t nonce[CORR_MAGIC_LEN];
    uint64_t epoch;
    int last_fd;

    struct pending *slots;
    uint32_t *free_stack;
    uint32_t n_free;
    int32_t head, tail;
    size_t n_pending;
    uint32_t next_gen;
    uint64_t next_due_ns; /* earliest pending-timer deadline, UINT64_MAX = none */

    bool in_result;
    fm_devclient_result_info cur;
    fm_devclient_stats stats;
};

/* ---- libmosquitto initialisation ---------------------------------------
 * mosquitto_lib_init()/cleanup() are process-wide and not reference counted
 * in every libmosquitto release we support, so clients share one count here.
 * Cleaning up when the last client goes away keeps ASan's leak check quiet
 * about the library's OpenSSL state. */
static pthread_mutex_t lib_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned lib_refs;

static int lib_acquire(void)
{
    int rc = 0;
    pthread_mutex_lock(&lib_mu);
    if (lib_refs == 0 && mosquitto_lib_init() != MOSQ_ERR_SUCCESS)
        rc = FM_EUNAVAIL;
    if (rc == 0)
        lib_refs++;
    pthread_mutex_unlock(&lib_mu);
    return rc;
}

static void lib_release(void)
{
    pthread_mutex_lock(&lib_mu);
    if (lib_refs > 0 && --lib_refs == 0)
        mosquitto_lib_cleanup();
    pthread_mutex_unlock(&lib_mu);
}

/* ---- small pure helpers -------------------------------------------------- */

bool fm_device_measurement_id_valid(const char *id)
{
    if (!id || !id[0])
        return false;
    size_t n = 0;
    for (; id[n]; n++) {
        char ch = id[n];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                  ch == '.' || ch == '_' || ch == ':' || ch == '-';
        if (!ok || n >= FM_DEVICE_MEAS_ID_MAXLEN)
            return false;
    }
    return true;
}

uint32_t fm_devclient_backoff_ms(unsigned attempt, uint32_t min_ms, uint32_t max_ms, uint64_t rnd)
{
    if (min_ms > max_ms)
        min_ms = max_ms;
    uint64_t d = min_ms;
    /* Doubling stops at the cap; the shift bound also keeps it from
     * overflowing for absurd attempt counts. */
    for (unsigned i = 0; i < attempt && d < max_ms && i < 40; i++)
        d *= 2;
    if (d > max_ms)
        d = max_ms;
    uint64_t half = d / 2;
    return (uint32_t)(half + rnd % (d - half + 1));
}

/* splitmix64: enough randomness for jitter, and cheap. */
static uint64_t next_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void encode_corr(const fm_devclient *c, uint32_t idx, uint8_t out[FM_DEVCLIENT_CORR_LEN])
{
    memcpy(out, c->nonce, CORR_MAGIC_LEN);
    put_be32(out + 8, idx);
    put_be32(out + 12, c->slots[idx].gen);
}

/* ---- pending list ---------------------------------------------------------- */

static void list_unlink(fm_devclient *c, uint32_t idx)
{
    struct pending *p = &c->slots[idx];
    if (p->prev >= 0)
        c->slots[p->prev].next = p->next;
    else
        c->head = p->next;
    if (p->next >= 0)
        c->slots[p->next].prev = p->prev;
    else
        c->tail = p->prev;
    p->prev = p->next = -1;
}

static void list_append(fm_devclient *c, uint32_t idx)
{
    struct pending *p = &c->slots[idx];
    p->prev = c->tail;
    p->next = -1;
    if (c->tail >= 0)
        c->slots[c->tail].next = (int32_t)idx;
    else
        c->head = (int32_t)idx;
    c->tail = (int32_t)idx;
}

static void due_at(fm_devclient *c, uint64_t t)
{
    if (t < c->next_due_ns)
        c->next_due_ns = t;
}

/* Removes the measurement from the table and reports it. The slot is freed
 * before the callback runs so a closed-loop caller can queue the next
 * measurement from inside it. */
static void resolve(fm_devclient *c, uint32_t idx, const char *status, const char *json, size_t len)
{
    struct pending *p = &c->slots[idx];
    uint64_t now = fm_mono_ns();
    fm_devclient_result_info info = {
        .latency_ns = now - p->queued_ns, .queued_ns = p->queued_ns, .attempts = p->attempts};
    char *id = p->id;
    p->id = NULL;
    fm_free(p->payload);
    p->payload = NULL;
    p->gen = 0;
    p->in_flight = false;
    p->reject_code = NULL;
    list_unlink(c, idx);
    c->free_stack[c->n_free++] = idx;
    c->n_pending--;

    if (strcmp(status, "timeout") == 0)
        c->stats.timeouts++;
    else
        c->stats.results++;
    c->in_result = true;
    c->cur = info;
    c->on_result(c->ud, id, status, json, len);
    c->in_result = false;
    /* Deleting after the callback makes the callback at-least-once across
     * crashes (see device.h); the reverse order would lose it instead. */
    if (c->ob) {
        int rc = fm_outbox_remove(c->ob, id);
        if (rc != 0 && rc != FM_ENOTFOUND)
            fm_logf(FM_LOG_ERROR, COMPONENT, "%s: cannot delete outbox entry %s: %s",
                    c->client_id, id, fm_strerror(rc));
    }
    fm_free(id);
}

/* Frees a slot without reporting it (the outbox dropped its entry; the
 * report is queued in c->dropped). */
static void release_slot(fm_devclient *c, uint32_t idx)
{
    struct pending *p = &c->slots[idx];
    fm_free(p->id);
    fm_free(p->payload);
    p->id = NULL;
    p->payload = NULL;
    p->gen = 0;
    p->in_flight = false;
    p->reject_code = NULL;
    list_unlink(c, idx);
    c->free_stack[c->n_free++] = idx;
    c->n_pending--;
}

static int32_t find_pending(const fm_devclient *c, const char *id)
{
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next)
        if (strcmp(c->slots[i].id, id) == 0)
            return i;
    return -1;
}

static bool can_send(const fm_devclient *c) { return c->st == ST_READY && !c->claiming; }

/* Delay before re-publishing a measurement that got no result, in outbox
 * mode: the result timeout, doubling per attempt, capped. */
static uint64_t retry_delay_ns(const fm_devclient *c, unsigned attempts)
{
    uint64_t cap = (uint64_t)c->backoff_max_ms * NS_PER_MS;
    if (cap < c->timeout_ns)
        cap = c->timeout_ns;
    unsigned sh = attempts > 1 ? attempts - 1 : 0;
    if (sh > 6)
        sh = 6;
    uint64_t d = c->timeout_ns << sh;
    return d < cap ? d : cap;
}

/* Outbox mode: try again later instead of resolving. */
static void retry_later(fm_devclient *c, struct pending *p)
{
    uint32_t d = fm_devclient_backoff_ms(p->attempts > 0 ? p->attempts - 1 : 0, 1000,
                                         c->backoff_max_ms > 1000 ? c->backoff_max_ms : 1000,
                                         next_rand(&c->rng));
    p->in_flight = false;
    p->mid = 0;
    p->next_try_ns = fm_mono_ns() + (uint64_t)d * NS_PER_MS;
    due_at(c, p->next_try_ns);
}

/* Resolves a measurement with an error the SDK produced itself, shaped like
 * a cloud error result so callers need only one code path. */
static void resolve_local_error(fm_devclient *c, uint32_t idx, const char *code, const char *msg)
{
    json_t *doc = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", c->slots[idx].id, "status", "error",
                            "error", "code", code, "message", msg);
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    /* Without memory for the document the caller still learns the outcome. */
    resolve(c, idx, "error", text, text ? strlen(text) : 0);
    free(text); /* json_dumps allocates with jansson's allocator (malloc) */
}

/* ---- connection state -------------------------------------------------------- */

static void sync_fd(fm_devclient *c)
{
    int fd = mosquitto_socket(c->m);
    if (fd != c->last_fd) {
        c->last_fd = fd;
        c->epoch++;
    }
}

static uint32_t schedule_reconnect(fm_devclient *c)
{
    uint32_t d = fm_devclient_backoff_ms(c->backoff_attempt, c->backoff_min_ms, c->backoff_max_ms,
                                         next_rand(&c->rng));
    if (c->backoff_attempt < 64)
        c->backoff_attempt++;
    c->st = ST_BACKOFF;
    c->next_connect_ns = fm_mono_ns() + (uint64_t)d * NS_PER_MS;
    return d;
}

/* Called once per lost (or never established) connection: from the
 * disconnect callback, or when a loop call finds the socket gone. */
static void connection_lost(fm_devclient *c, const char *reason)
{
    c->epoch++;
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next) {
        c->slots[i].in_flight = false;
        c->slots[i].mid = 0;
    }
    if (c->st == ST_IDLE || c->st == ST_FAILED || c->st == ST_BACKOFF)
        return;
    bool was_ready = c->st == ST_READY;
    c->stats.disconnects++;
    uint32_t d = schedule_reconnect(c);
    fm_logf(was_ready ? FM_LOG_WARN : FM_LOG_INFO, COMPONENT,
            "%s: %s: %s; reconnecting in %u ms", c->client_id,
            was_ready ? "connection lost" : "connection failed", reason, (unsigned)d);
    if (was_ready && !c->claiming && c->on_state)
        c->on_state(c->ud, false, reason);
}

/* Publishes (or re-publishes) one pending measurement on the current
 * connection. Returns 0 or FM_ENOMEM; other failures leave it unsent for
 * the timer scan to retry, or mark it rejected when retrying cannot help. */
static int send_pending(fm_devclient *c, uint32_t idx)
{
    struct pending *p = &c->slots[idx];
    uint8_t corr[FM_DEVCLIENT_CORR_LEN];
    encode_corr(c, idx, corr);

    mosquitto_property *props = NULL;
    int rc = mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, c->topic_res);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr, sizeof corr);
    int mid = 0;
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_publish_v5(c->m, &mid, c->topic_meas, (int)p->len, p->payload, 1, false, props);
    mosquitto_property_free_all(&props);

    switch (rc) {
    case MOSQ_ERR_SUCCESS:
        p->in_flight = true;
        p->mid = mid;
        p->sent_ns = fm_mono_ns();
        p->attempts++;
        if (p->attempts == 1)
            c->stats.published++;
        else
            c->stats.republished++;
        due_at(c, p->sent_ns + c->timeout_ns);
        return 0;
    case MOSQ_ERR_NOMEM:
        return FM_ENOMEM;
    case MOSQ_ERR_OVERSIZE_PACKET:
    case MOSQ_ERR_PAYLOAD_SIZE:
        p->reject_code = "payload_too_large";
        snprintf(p->reject_msg, sizeof p->reject_msg, "%s", mosquitto_strerror(rc));
        due_at(c, 0);
        return 0;
    default:
        /* Typically MOSQ_ERR_NO_CONN: the connection dropped under us and
         * the disconnect handling will re-publish after reconnecting. */
        fm_logf(FM_LOG_DEBUG, COMPONENT, "%s: publish deferred: %s", c->client_id, mosquitto_strerror(rc));
        return 0;
    }
}

static int flush_unsent(fm_devclient *c)
{
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next) {
        struct pending *p = &c->slots[i];
        if (!p->in_flight && !p->reject_code && fm_mono_ns() >= p->next_try_ns) {
            int rc = send_pending(c, (uint32_t)i);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

static void cb_connect(struct mosquitto *m, void *obj, int rc, int flags,
                       const mosquitto_property *props);
static void cb_subscribe(struct mosquitto *m, void *obj, int mid, int qos_count,
                         const int *granted, const mosquitto_property *props);
static void cb_publish(struct mosquitto *m, void *obj, int mid, int reason,
                       const mosquitto_property *props);
static void cb_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props);
static void cb_disconnect(struct mosquitto *m, void *obj, int rc, const mosquitto_property *props);

/* Replaces c->m with a new, configured, unconnected instance. TLS files are
 * applied only once fm_devclient_connect() has accepted them, so creating a
 * client does no I/O. On failure c->m is left as it was. Must not be called
 * from inside a libmosquitto callback of c->m. */
static int mosq_setup(fm_devclient *c, fm_errbuf *err)
{
    struct mosquitto *m = mosquitto_new(c->client_id, true, c);
    if (!m)
        return fm_errf(err, errno == EINVAL ? FM_EINVAL : FM_ENOMEM, "%s: mosquitto_new failed",
                       c->client_id);
    int rc = FM_EUNAVAIL;
    if (mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5) != MOSQ_ERR_SUCCESS) {
        fm_errf(err, rc, "%s: libmosquitto lacks MQTT 5 support", c->client_id);
        goto fail;
    }
    /* Latency matters more than packet count for request/response. */
    (void)mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_connect_v5_callback_set(m, cb_connect);
    mosquitto_subscribe_v5_callback_set(m, cb_subscribe);
    mosquitto_publish_v5_callback_set(m, cb_publish);
    mosquitto_message_v5_callback_set(m, cb_message);
    mosquitto_disconnect_v5_callback_set(m, cb_disconnect);
    if (c->tls_configured) {
        /* mosquitto_tls_set only checks that the files are readable; a
         * malformed key surfaces as MOSQ_ERR_TLS when connecting. */
        const char *crt = c->claiming ? c->claim_cert : c->cert_path;
        const char *key = c->claiming ? c->claim_key : c->key_path;
        int mrc = mosquitto_tls_set(m, c->ca_path, NULL, crt, key, NULL);
        /* cert_reqs 1 = SSL_VERIFY_PEER; "tlsv1.2" means 1.2 or newer. */
        if (mrc == MOSQ_ERR_SUCCESS)
            mrc = mosquitto_tls_opts_set(m, 1, "tlsv1.2", NULL);
        if (mrc != MOSQ_ERR_SUCCESS) {
            rc = mrc == MOSQ_ERR_NOMEM ? FM_ENOMEM : FM_ECRYPTO;
            fm_errf(err, rc, "%s: cannot use TLS files %s, %s, %s: %s", c->client_id, c->ca_path,
                    crt, key, mosquitto_strerror(mrc));
            goto fail;
        }
    }
    if (c->m)
        mosquitto_destroy(c->m);
    c->m = m;
    c->fresh = true;
    sync_fd(c);
    c->epoch++;
    return 0;
fail:
    mosquitto_destroy(m);
    return rc;
}

static int start_connect(fm_devclient *c, fm_errbuf *err)
{
    if (!c->fresh) {
        int src = mosq_setup(c, err);
        if (src != 0) {
            c->stats.disconnects++;
            schedule_reconnect(c);
            return src;
        }
    }
    c->fresh = false;
    c->connect_deadline_ns = fm_mono_ns() + CONNECT_TIMEOUT_MS * NS_PER_MS;
    /* mosquitto_connect_async (not reconnect_async) every time: it stores
     * host and port again, which also covers a first attempt that failed
     * before libmosquitto recorded them. */
    c->st = ST_CONNECTING;
    c->last_reason[0] = '\0';
    int rc = mosquitto_connect_async(c->m, c->host, c->port, c->keepalive);
    sync_fd(c);
    c->epoch++;
    if (rc == MOSQ_ERR_SUCCESS)
        return 0;
    if (rc == MOSQ_ERR_TLS && !c->ever_connected) {
        c->st = ST_FAILED;
        return fm_errf(err, FM_ECRYPTO,
                       "%s: TLS setup failed (check %s, %s and %s): %s", c->client_id, c->ca_path,
                       c->claiming ? c->claim_cert : c->cert_path,
                       c->claiming ? c->claim_key : c->key_path, mosquitto_strerror(rc));
    }
    const char *why = rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc);
    fm_errf(err, FM_EIO, "%s: cannot connect to %s:%d: %s", c->client_id, c->host, c->port, why);
    c->stats.disconnects++;
    uint32_t d = schedule_reconnect(c);
    fm_logf(FM_LOG_WARN, COMPONENT, "%s: cannot connect to %s:%d: %s; retrying in %u ms", c->client_id,
            c->host, c->port, why, (unsigned)d);
    return FM_EIO;
}

/* ---- claim flow ------------------------------------------------------------ */

static void set_topics(fm_devclient *c)
{
    snprintf(c->topic_meas, sizeof c->topic_meas, "fleet/%s/measurements", c->id);
    snprintf(c->topic_res, sizeof c->topic_res, "fleet/%s/results", c->id);
    snprintf(c->topic_shadow_delta, TOPIC_LEN, "fleet/%s/shadow/delta", c->id);
    snprintf(c->topic_shadow_doc, TOPIC_LEN, "fleet/%s/shadow/document", c->id);
    snprintf(c->topic_shadow_rej, TOPIC_LEN, "fleet/%s/shadow/rejected", c->id);
    snprintf(c->topic_shadow_update, TOPIC_LEN, "fleet/%s/shadow/update", c->id);
    snprintf(c->topic_shadow_get, TOPIC_LEN, "fleet/%s/shadow/get", c->id);
    snprintf(c->topic_cert_rotate, TOPIC_LEN, "fleet/%s/cert/rotate", c->id);
    snprintf(c->topic_cert_acc, TOPIC_LEN, "fleet/%s/cert/accepted", c->id);
    snprintf(c->topic_cert_rej, TOPIC_LEN, "fleet/%s/cert/rejected", c->id);
    snprintf(c->client_id, sizeof c->client_id, "%s", c->id);
}

/* Records a permanent failure to be applied by run_deferred(). */
static void fail_later(fm_devclient *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_later(fm_devclient *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->fail_reason, sizeof c->fail_reason, fmt, ap);
    va_end(ap);
    c->fail_pending = true;
}

static void claim_send(fm_devclient *c)
{
    int rc = mosquitto_publish_v5(c->m, NULL, c->topic_claim_req, (int)strlen(c->claim_req),
                                  c->claim_req, 1, false, NULL);
    c->claim_attempts++;
    unsigned sh = c->claim_attempts > 1 ? c->claim_attempts - 1 : 0;
    c->claim_next_ns = fm_mono_ns() + (c->claim_timeout_ns << (sh > 3 ? 3 : sh));
    fm_logf(FM_LOG_INFO, COMPONENT, "%s: provisioning request sent (attempt %u of %u)%s%s",
            c->client_id, c->claim_attempts, c->claim_max_attempts,
            rc == MOSQ_ERR_SUCCESS ? "" : ": ", rc == MOSQ_ERR_SUCCESS ? "" : mosquitto_strerror(rc));
}

static bool is_retryable_claim_code(const char *code)
{
    return strcmp(code, "unavailable") == 0 || strcmp(code, "internal") == 0 ||
           strcmp(code, "rate_limited") == 0;
}

static int state_path(const fm_devclient *c, const char *name, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%s/%s", c->state_dir, name);
    return n < 0 || (size_t)n >= len ? FM_EINVAL : 0;
}

/* The cloud's acceptance: persist it (device.crt last: its existence is
 * what marks the device as provisioned) and switch identity afterwards. */
static void claim_accepted(fm_devclient *c, const char *payload, size_t len)
{
    json_t *doc = json_loadb(payload, len, 0, NULL);
    const char *id = json_string_value(json_object_get(doc, "device_id"));
    const char *crt = json_string_value(json_object_get(doc, "certificate_pem"));
    const char *ca = json_string_value(json_object_get(doc, "ca_pem"));
    json_t *ep = json_object_get(doc, "endpoint");
    if (!id || !fm_device_id_valid(id) || !crt || !crt[0]) {
        fail_later(c, "provisioning accepted with an unusable answer (device_id or certificate_pem missing)");
        json_decref(doc);
        return;
    }
    fm_device_identity ident;
    memset(&ident, 0, sizeof ident);
    snprintf(ident.device_id, sizeof ident.device_id, "%s", id);
    snprintf(ident.serial, sizeof ident.serial, "%s", c->serial);
    const char *host = json_string_value(json_object_get(ep, "host"));
    json_int_t port = json_integer_value(json_object_get(ep, "port"));
    if (host && host[0] && strlen(host) < sizeof ident.host && port > 0 && port <= 65535) {
        snprintf(ident.host, sizeof ident.host, "%s", host);
        ident.port = (int)port;
    }
    char path[PATH_MAX];
    fm_errbuf err;
    int rc = 0;
    if (ca && ca[0] && (rc = state_path(c, "ca.crt", path, sizeof path)) == 0)
        rc = fm_write_file_atomic(path, ca, strlen(ca), 0644);
    if (rc == 0 && (rc = state_path(c, "identity.json", path, sizeof path)) == 0)
        rc = fm_device_identity_write(path, &ident, &err);
    if (rc == 0)
        rc = fm_write_file_atomic(c->cert_path, crt, strlen(crt), 0644);
    json_decref(doc);
    if (rc != 0) {
        fail_later(c, "provisioned as %s but cannot save the identity in %s: %s", ident.device_id,
                   c->state_dir, fm_strerror(rc));
        return;
    }
    fm_logkv(FM_LOG_INFO, COMPONENT, "provisioned", "serial", c->serial, "device_id",
             ident.device_id, NULL);
    snprintf(c->new_id, sizeof c->new_id, "%s", ident.device_id);
    snprintf(c->new_host, sizeof c->new_host, "%s", ident.host);
    c->new_port = ident.port;
    c->switch_pending = true;
}

static void claim_rejected(fm_devclient *c, const char *payload, size_t len)
{
    json_t *doc = json_loadb(payload, len, 0, NULL);
    const char *code = json_string_value(json_object_get(doc, "code"));
    const char *msg = json_string_value(json_object_get(doc, "message"));
    if (!code)
        code = "unknown";
    if (!msg)
        msg = "";
    if (is_retryable_claim_code(code) && c->claim_attempts < c->claim_max_attempts) {
        uint32_t d = fm_devclient_backoff_ms(c->claim_attempts, 1000, c->backoff_max_ms > 1000 ? c->backoff_max_ms : 1000,
                                             next_rand(&c->rng));
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: provisioning rejected (%s: %s); retrying in %u ms",
                c->client_id, code, msg, (unsigned)d);
        c->claim_next_ns = fm_mono_ns() + (uint64_t)d * NS_PER_MS;
    } else if (strcmp(code, "already_provisioned") == 0 && c->claim_attempts > 1) {
        fail_later(c, "provisioning rejected: already_provisioned: %s (the request was sent %u "
                      "times; an earlier one was probably accepted and its answer lost: allow "
                      "re-provisioning for the template, or remove the device, then retry)",
                   msg, c->claim_attempts);
    } else {
        fail_later(c, "provisioning rejected: %s: %s", code, msg);
    }
    json_decref(doc);
}

/* ---- rotation ---------------------------------------------------------------- */

static int next_path(const char *path, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%s.next", path);
    return n < 0 || (size_t)n >= len ? FM_EINVAL : 0;
}

static int dir_of(const char *path, char *buf, size_t len)
{
    snprintf(buf, len, "%s", path);
    char *slash = strrchr(buf, '/');
    if (!slash)
        snprintf(buf, len, ".");
    else if (slash == buf)
        buf[1] = '\0';
    else
        *slash = '\0';
    return 0;
}

/* Installs <key>.next and <cert>.next: key first, certificate last, so
 * that a crash in between leaves <cert>.next, which rotation_recover()
 * finishes installing. */
static int rotation_install(const char *cert_path, const char *key_path)
{
    char cn[PATH_MAX], kn[PATH_MAX], dir[PATH_MAX];
    if (next_path(cert_path, cn, sizeof cn) != 0 || next_path(key_path, kn, sizeof kn) != 0)
        return FM_EINVAL;
    if (access(cn, F_OK) != 0)
        return FM_ENOTFOUND;
    if (access(kn, F_OK) == 0 && rename(kn, key_path) != 0)
        return FM_EIO;
    if (rename(cn, cert_path) != 0)
        return FM_EIO;
    dir_of(cert_path, dir, sizeof dir);
    (void)fm_fsync_dir(dir);
    dir_of(key_path, dir, sizeof dir);
    return fm_fsync_dir(dir);
}

static void rotate_answer(fm_devclient *c, bool accepted, const char *payload, size_t len)
{
    if (!c->rotating) {
        c->stats.ignored++;
        return;
    }
    c->rotating = false;
    json_t *doc = json_loadb(payload, len, 0, NULL);
    char kn[PATH_MAX], cn[PATH_MAX];
    bool paths = next_path(c->key_path, kn, sizeof kn) == 0 && next_path(c->cert_path, cn, sizeof cn) == 0;
    if (!accepted) {
        const char *code = json_string_value(json_object_get(doc, "code"));
        const char *msg = json_string_value(json_object_get(doc, "message"));
        /* A fresh key next time: this one may be the reason (weak_key...). */
        if (paths)
            (void)unlink(kn);
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: certificate rotation rejected: %s: %s", c->client_id,
                code ? code : "unknown", msg ? msg : "");
        if (c->on_rotate)
            c->on_rotate(c->ud, false, code ? code : "unknown", msg ? msg : "");
        json_decref(doc);
        return;
    }
    const char *crt = json_string_value(json_object_get(doc, "certificate_pem"));
    int rc = !paths ? FM_EINVAL : !crt || !crt[0] ? FM_EPROTO : 0;
    if (rc == 0)
        rc = fm_write_file_atomic(cn, crt, strlen(crt), 0644);
    if (rc == 0)
        rc = rotation_install(c->cert_path, c->key_path);
    json_decref(doc);
    if (rc != 0) {
        fm_logf(FM_LOG_ERROR, COMPONENT, "%s: cannot install the rotated certificate: %s",
                c->client_id, fm_strerror(rc));
        if (c->on_rotate)
            c->on_rotate(c->ud, false, "io", fm_strerror(rc));
        return;
    }
    fm_logf(FM_LOG_INFO, COMPONENT, "%s: new certificate installed; reconnecting with it",
            c->client_id);
    if (c->on_rotate)
        c->on_rotate(c->ud, true, NULL, NULL);
    c->reconnect_pending = true;
}

/* ---- libmosquitto callbacks ------------------------------------------------ */

static void cb_connect(struct mosquitto *m, void *obj, int rc, int flags,
                       const mosquitto_property *props)
{
    (void)flags;
    (void)props;
    fm_devclient *c = obj;
    if (rc != 0) {
        snprintf(c->last_reason, sizeof c->last_reason, "connection refused: %s",
                 mosquitto_reason_string(rc));
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: %s", c->client_id, c->last_reason);
        return; /* libmosquitto closes the socket; the disconnect path retries */
    }
    c->st = ST_SUBSCRIBING;
    char *topics[MAX_SUBS];
    int n = 0;
    if (c->claiming) {
        topics[n++] = c->topic_claim_acc;
        topics[n++] = c->topic_claim_rej;
    } else {
        topics[n++] = c->topic_res;
        if (c->extras) {
            topics[n++] = c->topic_shadow_delta;
            topics[n++] = c->topic_shadow_doc;
            topics[n++] = c->topic_shadow_rej;
            topics[n++] = c->topic_cert_acc;
            topics[n++] = c->topic_cert_rej;
        }
    }
    c->n_subs = n;
    int src = mosquitto_subscribe_multiple(m, &c->sub_mid, n, topics, 1, 0, NULL);
    if (src != MOSQ_ERR_SUCCESS) {
        snprintf(c->last_reason, sizeof c->last_reason, "subscribe failed: %s",
                 mosquitto_strerror(src));
        mosquitto_disconnect(m);
    }
}

static void cb_subscribe(struct mosquitto *m, void *obj, int mid, int qos_count,
                         const int *granted, const mosquitto_property *props)
{
    (void)props;
    fm_devclient *c = obj;
    if (mid != c->sub_mid || c->st != ST_SUBSCRIBING)
        return;
    int bad = qos_count < c->n_subs ? 0x80 : 0;
    for (int i = 0; i < qos_count && !bad; i++)
        if (granted[i] >= 0x80)
            bad = granted[i];
    if (bad) {
        /* The broker's ACL refused a topic. Publishing now would lose every
         * answer, so drop the connection and retry later. */
        snprintf(c->last_reason, sizeof c->last_reason, "subscription to %.70s refused: %.30s",
                 c->claiming ? c->topic_claim_acc : c->topic_res, mosquitto_reason_string(bad));
        fm_logf(FM_LOG_ERROR, COMPONENT, "%s: %s", c->client_id, c->last_reason);
        mosquitto_disconnect(m);
        return;
    }
    c->st = ST_READY;
    c->backoff_attempt = 0;
    c->ever_connected = true;
    if (c->claiming) {
        claim_send(c);
        return;
    }
    c->stats.connects++;
    fm_logf(FM_LOG_DEBUG, COMPONENT, "%s: ready", c->client_id);
    if (c->on_state)
        c->on_state(c->ud, true, "connected");
    /* Allocation failure here is retried by the timer scan. */
    (void)flush_unsent(c);
}

static void cb_publish(struct mosquitto *m, void *obj, int mid, int reason,
                       const mosquitto_property *props)
{
    (void)m;
    (void)props;
    fm_devclient *c = obj;
    if (reason < 0x80)
        return; /* PUBACK ok: the broker has it; the result is still awaited */
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next) {
        struct pending *p = &c->slots[i];
        if (p->in_flight && p->mid == mid) {
            if (c->ob && (reason == MQTT_RC_SERVER_BUSY || reason == MQTT_RC_QUOTA_EXCEEDED)) {
                retry_later(c, p);
                return;
            }
            p->reject_code = "publish_rejected";
            snprintf(p->reject_msg, sizeof p->reject_msg, "broker: %s",
                     mosquitto_reason_string(reason));
            due_at(c, 0);
            return;
        }
    }
}

static void cb_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props)
{
    (void)m;
    fm_devclient *c = obj;
    const char *payload = msg->payload ? msg->payload : "";
    size_t plen = msg->payloadlen > 0 ? (size_t)msg->payloadlen : 0;
    if (!msg->topic) {
        c->stats.ignored++;
        return;
    }
    if (c->claiming) {
        if (strcmp(msg->topic, c->topic_claim_acc) == 0)
            claim_accepted(c, payload, plen);
        else if (strcmp(msg->topic, c->topic_claim_rej) == 0)
            claim_rejected(c, payload, plen);
        else
            c->stats.ignored++;
        return;
    }
    if (strcmp(msg->topic, c->topic_res) != 0) {
        enum fm_shadow_kind kind = 0;
        if (strcmp(msg->topic, c->topic_shadow_delta) == 0)
            kind = FM_SHADOW_DELTA;
        else if (strcmp(msg->topic, c->topic_shadow_doc) == 0)
            kind = FM_SHADOW_DOCUMENT;
        else if (strcmp(msg->topic, c->topic_shadow_rej) == 0)
            kind = FM_SHADOW_REJECTED;
        if (kind && c->on_shadow) {
            /* The callback is promised a NUL-terminated document. */
            char *text = fm_malloc(plen + 1);
            if (text) {
                memcpy(text, payload, plen);
                text[plen] = '\0';
                c->on_shadow(c->ud, kind, text, plen);
                fm_free(text);
            }
        } else if (strcmp(msg->topic, c->topic_cert_acc) == 0) {
            rotate_answer(c, true, payload, plen);
        } else if (strcmp(msg->topic, c->topic_cert_rej) == 0) {
            rotate_answer(c, false, payload, plen);
        } else {
            c->stats.ignored++;
        }
        return;
    }
    void *corr = NULL;
    uint16_t corr_len = 0;
    if (!mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len,
                                        false)) {
        c->stats.ignored++;
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: result without correlation data ignored", c->client_id);
        return;
    }
    (void)fm_devclient_handle_result(c, corr, corr_len, payload, plen);
    free(corr); /* allocated by libmosquitto with malloc */
}

static void cb_disconnect(struct mosquitto *m, void *obj, int rc, const mosquitto_property *props)
{
    (void)m;
    (void)props;
    fm_devclient *c = obj;
    char reason[160];
    if (c->last_reason[0])
        snprintf(reason, sizeof reason, "%s", c->last_reason);
    else if (rc == MOSQ_ERR_ERRNO)
        snprintf(reason, sizeof reason, "%s", strerror(errno));
    else
        snprintf(reason, sizeof reason, "%s", mosquitto_strerror(rc));
    size_t n = strlen(reason);
    if (n > 0 && reason[n - 1] == '.')
        reason[n - 1] = '\0'; /* libmosquitto's messages end in a full stop */
    connection_lost(c, reason);
}

/* ---- lifecycle ----------------------------------------------------------------- */

static int opt_or(int v, int dflt) { return v > 0 ? v : dflt; }

static bool serial_valid(const char *s)
{
    size_t n = 0;
    for (; s && s[n]; n++) {
        char ch = s[n];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                  ch == '_' || ch == '-';
        if (!ok || n >= 64)
            return false;
    }
    return n > 0;
}

/* Finishes a rotation interrupted between writing the new certificate and
 * renaming it into place (see rotation_install). */
static void rotation_recover(const fm_devclient *c)
{
    int rc = rotation_install(c->cert_path, c->key_path);
    if (rc == 0)
        fm_logf(FM_LOG_INFO, COMPONENT, "%s: finished installing a rotated certificate", c->client_id);
    else if (rc != FM_ENOTFOUND)
        fm_logf(FM_LOG_ERROR, COMPONENT, "%s: cannot finish installing a rotated certificate: %s",
                c->client_id, fm_strerror(rc));
}

static int queue_slot(fm_devclient *c, const char *measurement_id, const char *payload, size_t len,
                      uint32_t *out);

static void load_entry(void *ud, const char *id, const char *data, size_t len)
{
    fm_devclient *c = ud;
    uint32_t idx;
    if (queue_slot(c, id, data, len, &idx) == 0)
        c->stats.recovered++;
    else
        fm_logf(FM_LOG_ERROR, COMPONENT, "%s: cannot queue outbox entry %s", c->client_id, id);
}

/* Claim mode: paths inside the state directory, and the identity if the
 * device was provisioned earlier. */
static int setup_state(fm_devclient *c, const fm_devclient_opts *opts, fm_errbuf *err)
{
    char path[PATH_MAX];
    int rc;
    if ((rc = state_path(c, "device.crt", path, sizeof path)) != 0 || !(c->cert_path = fm_strdup(path)))
        return fm_errf(err, rc ? rc : FM_ENOMEM, "state directory path too long or out of memory");
    if ((rc = state_path(c, "device.key", path, sizeof path)) != 0 || !(c->key_path = fm_strdup(path)))
        return fm_errf(err, rc ? rc : FM_ENOMEM, "state directory path too long or out of memory");
    const fm_devclient_claim *cl = opts->claim;
    c->claim_cert = fm_strdup(cl->cert_path);
    c->claim_key = fm_strdup(cl->key_path);
    c->serial = fm_strdup(cl->serial);
    c->model = fm_strdup(cl->model ? cl->model : "");
    c->firmware = fm_strdup(cl->firmware ? cl->firmware : "");
    if (!c->claim_cert || !c->claim_key || !c->serial || !c->model || !c->firmware)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    c->claim_timeout_ns = (uint64_t)opt_or(cl->timeout_ms, CLAIM_DEFAULT_TIMEOUT_MS) * NS_PER_MS;
    c->claim_max_attempts = (unsigned)opt_or(cl->max_attempts, CLAIM_DEFAULT_MAX_ATTEMPTS);
    c->use_claim_endpoint = opts->use_claim_endpoint;
    snprintf(c->topic_claim_req, TOPIC_LEN, "fleet/provisioning/prov-%s/request", c->serial);
    snprintf(c->topic_claim_acc, TOPIC_LEN, "fleet/provisioning/prov-%s/accepted", c->serial);
    snprintf(c->topic_claim_rej, TOPIC_LEN, "fleet/provisioning/prov-%s/rejected", c->serial);

    rotation_recover(c);
    if (access(c->cert_path, F_OK) != 0) {
        c->claiming = true;
        c->id[0] = '\0';
        snprintf(c->client_id, sizeof c->client_id, "prov-%s", c->serial);
        return 0;
    }
    fm_device_identity ident;
    if ((rc = state_path(c, "identity.json", path, sizeof path)) != 0)
        return fm_errf(err, rc, "state directory path too long");
    if ((rc = fm_device_identity_read(path, &ident, err)) != 0)
        return fm_errf(err, FM_EINVAL, "%s exists but its identity is unusable: %s", c->cert_path,
                       err->msg);
    snprintf(c->id, sizeof c->id, "%s", ident.device_id);
    if (c->use_claim_endpoint && ident.host[0]) {
        char *h = fm_strdup(ident.host);
        if (!h)
            return fm_errf(err, FM_ENOMEM, "out of memory");
        fm_free(c->host);
        c->host = h;
        c->port = ident.port;
    }
    set_topics(c);
    return 0;
}

static void free_fields(fm_devclient *c)
{
    if (c->m)
        mosquitto_destroy(c->m);
    if (c->slots)
        for (uint32_t i = 0; i < c->max_pending; i++) {
            fm_free(c->slots[i].id);
            fm_free(c->slots[i].payload);
        }
    for (size_t i = 0; i < c->n_dropped; i++)
        fm_free(c->dropped[i]);
    fm_free(c->dropped);
    fm_outbox_close(c->ob);
    fm_free(c->free_stack);
    fm_free(c->slots);
    fm_free(c->key_path);
    fm_free(c->cert_path);
    fm_free(c->ca_path);
    fm_free(c->host);
    fm_free(c->state_dir);
    fm_free(c->claim_cert);
    fm_free(c->claim_key);
    fm_free(c->serial);
    fm_free(c->model);
    fm_free(c->firmware);
    fm_free(c->claim_req);
    fm_free(c);
}

int fm_devclient_new(const fm_devclient_opts *opts, fm_devclient **out, fm_errbuf *err)
{
    if (!opts || !out)
        return fm_errf(err, FM_EINVAL, "fm_devclient_new: NULL argument");
    if (opts->claim) {
        const fm_devclient_claim *cl = opts->claim;
        if (!opts->state_dir || !opts->state_dir[0])
            return fm_errf(err, FM_EINVAL, "claim mode needs state_dir");
        if (!cl->cert_path || !cl->key_path)
            return fm_errf(err, FM_EINVAL, "claim cert_path and key_path are required");
        if (!serial_valid(cl->serial))
            return fm_errf(err, FM_EINVAL, "invalid serial '%s' (expected [A-Za-z0-9_-]{1,64})",
                           cl->serial ? cl->serial : "(null)");
        if (cl->timeout_ms < 0 || cl->max_attempts < 0)
            return fm_errf(err, FM_EINVAL, "negative claim tuning option");
        if (!opts->ca_path)
            return fm_errf(err, FM_EINVAL, "ca_path is required");
    } else {
        if (!fm_device_id_valid(opts->id))
            return fm_errf(err, FM_EINVAL, "invalid device id '%s' (expected [a-z0-9][a-z0-9-]{2,63})",
                           opts->id ? opts->id : "(null)");
        if (!opts->ca_path || !opts->cert_path || !opts->key_path)
            return fm_errf(err, FM_EINVAL, "ca_path, cert_path and key_path are required");
    }
    if (!opts->on_result)
        return fm_errf(err, FM_EINVAL, "on_result is required");
    if (opts->port < 0 || opts->port > 65535)
        return fm_errf(err, FM_EINVAL, "port %d out of range", opts->port);
    if (opts->keepalive < 0 || opts->keepalive > 65535 || opts->result_timeout_ms < 0 ||
        opts->max_attempts < 0 || opts->max_pending < 0 || opts->backoff_min_ms < 0 ||
        opts->backoff_max_ms < 0 || opts->outbox_max_entries < 0)
        return fm_errf(err, FM_EINVAL, "negative or out-of-range tuning option");
    if (opts->max_pending > FM_DEVCLIENT_MAX_PENDING_LIMIT ||
        opts->outbox_max_entries > FM_DEVCLIENT_MAX_PENDING_LIMIT - 1)
        return fm_errf(err, FM_EINVAL, "max_pending / outbox_max_entries exceeds %d",
                       FM_DEVCLIENT_MAX_PENDING_LIMIT - 1);
    if (opts->outbox_policy != FM_OUTBOX_REFUSE_NEW && opts->outbox_policy != FM_OUTBOX_DROP_OLDEST)
        return fm_errf(err, FM_EINVAL, "unknown outbox policy %d", (int)opts->outbox_policy);
    if (lib_acquire() != 0)
        return fm_errf(err, FM_EUNAVAIL, "libmosquitto initialisation failed");

    int rc = FM_ENOMEM;
    fm_errbuf local;
    if (!err)
        err = &local;
    err->msg[0] = '\0';
    fm_devclient *c = fm_calloc(1, sizeof *c);
    if (!c)
        goto err_lib;
    c->port = opt_or(opts->port, FM_DEVCLIENT_DEFAULT_PORT);
    c->keepalive = opt_or(opts->keepalive, FM_DEVCLIENT_DEFAULT_KEEPALIVE);
    c->on_result = opts->on_result;
    c->on_state = opts->on_state;
    c->on_shadow = opts->on_shadow;
    c->on_rotate = opts->on_rotate;
    c->ud = opts->ud;
    c->extras = opts->state_dir || opts->on_shadow || opts->on_rotate;
    c->timeout_ns =
        (uint64_t)opt_or(opts->result_timeout_ms, FM_DEVCLIENT_DEFAULT_RESULT_TIMEOUT_MS) * NS_PER_MS;
    c->max_attempts = (unsigned)opt_or(opts->max_attempts, FM_DEVCLIENT_DEFAULT_MAX_ATTEMPTS);
    c->max_pending = (uint32_t)opt_or(opts->max_pending, FM_DEVCLIENT_DEFAULT_MAX_PENDING);
    c->backoff_min_ms = (uint32_t)opt_or(opts->backoff_min_ms, FM_DEVCLIENT_DEFAULT_BACKOFF_MIN_MS);
    c->backoff_max_ms = (uint32_t)opt_or(opts->backoff_max_ms, FM_DEVCLIENT_DEFAULT_BACKOFF_MAX_MS);
    c->st = ST_IDLE;
    c->last_fd = -1;
    c->head = c->tail = -1;
    c->next_gen = 1;
    c->next_due_ns = UINT64_MAX;

    if (getrandom(c->nonce, sizeof c->nonce, GRND_NONBLOCK) != (ssize_t)sizeof c->nonce) {
        /* Early boot without entropy: uniqueness across restarts is all the
         * nonce needs, which time and pid provide well enough. */
        uint64_t s = fm_mono_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)fm_wall_ms();
        uint64_t v = next_rand(&s);
        memcpy(c->nonce, &v, sizeof v);
    }
    memcpy(&c->rng, c->nonce, sizeof c->rng);

    c->host = fm_strdup(opts->host && opts->host[0] ? opts->host : FM_DEVCLIENT_DEFAULT_HOST);
    c->ca_path = fm_strdup(opts->ca_path);
    if (!c->host || !c->ca_path)
        goto err_free;
    if (opts->state_dir && !(c->state_dir = fm_strdup(opts->state_dir)))
        goto err_free;
    if (opts->claim) {
        if ((rc = setup_state(c, opts, err)) != 0)
            goto err_free;
    } else {
        snprintf(c->id, sizeof c->id, "%s", opts->id);
        c->cert_path = fm_strdup(opts->cert_path);
        c->key_path = fm_strdup(opts->key_path);
        rc = FM_ENOMEM;
        if (!c->cert_path || !c->key_path)
            goto err_free;
        set_topics(c);
        if (c->state_dir)
            rotation_recover(c);
    }

    if (c->state_dir) {
        char dir[PATH_MAX];
        if ((rc = fm_mkdirs(c->state_dir, 0700)) != 0) {
            fm_errf(err, FM_EIO, "cannot create state directory %s", c->state_dir);
            goto err_free;
        }
        if ((rc = state_path(c, "outbox", dir, sizeof dir)) != 0) {
            fm_errf(err, rc, "state directory path too long");
            goto err_free;
        }
        if ((rc = fm_outbox_open(dir, (size_t)opts->outbox_max_entries, opts->outbox_max_bytes,
                                 opts->outbox_policy, &c->ob, err)) != 0)
            goto err_free;
        size_t cap = opts->outbox_max_entries > 0 ? (size_t)opts->outbox_max_entries
                                                  : FM_OUTBOX_DEFAULT_MAX_ENTRIES;
        if (fm_outbox_count(c->ob) > cap)
            cap = fm_outbox_count(c->ob);
        /* One spare slot: drop-oldest stores the new entry before it frees
         * the oldest one's slot. */
        c->max_pending = (uint32_t)(cap + 1 > FM_DEVCLIENT_MAX_PENDING_LIMIT ? FM_DEVCLIENT_MAX_PENDING_LIMIT : cap + 1);
    }

    rc = FM_ENOMEM;
    c->slots = fm_calloc(c->max_pending, sizeof *c->slots);
    c->free_stack = fm_calloc(c->max_pending, sizeof *c->free_stack);
    if (!c->slots || !c->free_stack)
        goto err_free;
    /* Push in reverse so slot 0 is used first, which keeps tests readable. */
    for (uint32_t i = 0; i < c->max_pending; i++) {
        c->slots[i].prev = c->slots[i].next = -1;
        c->free_stack[i] = c->max_pending - 1 - i;
    }
    c->n_free = c->max_pending;

    if (c->ob && (rc = fm_outbox_load(c->ob, load_entry, c)) != 0) {
        fm_errf(err, rc, "cannot read outbox %s: %s", fm_outbox_dir(c->ob), fm_strerror(rc));
        goto err_free;
    }
    if (c->stats.recovered > 0)
        fm_logf(FM_LOG_INFO, COMPONENT, "%s: %llu unanswered measurement(s) from the outbox will be sent again",
                c->client_id, (unsigned long long)c->stats.recovered);

    /* A clean start is right even though results may be lost across a
     * reconnect: every unanswered measurement is re-published and the
     * cloud answers repeats with the original result. */
    rc = mosq_setup(c, NULL);
    if (rc != 0)
        goto err_free;
    c->epoch = 0;
    *out = c;
    return 0;

err_free:
    if (!err->msg[0])
        fm_errf(err, rc, "cannot create device client: %s", fm_strerror(rc));
    free_fields(c);
    lib_release();
    return rc;
err_lib:
    lib_release();
    return fm_errf(err, rc, "cannot create device client: %s", fm_strerror(rc));
}

void fm_devclient_free(fm_devclient *c)
{
    if (!c)
        return;
    fm_devclient_disconnect(c);
    free_fields(c);
    lib_release();
}

/* Builds the provisioning request: key (created once, kept), CSR. */
static int claim_prepare(fm_devclient *c, fm_errbuf *err)
{
    if (c->claim_req)
        return 0;
    int rc = fm_key_ensure(c->key_path, err);
    if (rc != 0)
        return rc;
    char *csr = NULL;
    if ((rc = fm_csr_create(c->key_path, c->serial, &csr, err)) != 0)
        return rc;
    json_t *doc = json_pack("{s:s, s:s, s:s, s:s}", "serial", c->serial, "csr", csr, "model",
                            c->model, "firmware", c->firmware);
    fm_free(csr);
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    c->claim_req = text ? fm_strdup(text) : NULL;
    free(text);
    if (!c->claim_req)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    return 0;
}

int fm_devclient_connect(fm_devclient *c, fm_errbuf *err)
{
    if (c->st == ST_FAILED && c->error[0]) {
        /* Start over after a permanent failure (e.g. claim rejected). */
        c->error[0] = '\0';
        c->st = ST_IDLE;
        c->claim_attempts = 0;
    }
    if (c->st != ST_IDLE)
        return fm_errf(err, FM_ESTATE, "%s: already connecting or connected", c->client_id);
    if (c->claiming) {
        int rc = claim_prepare(c, err);
        if (rc != 0)
            return rc;
    }
    if (!c->tls_configured) {
        c->tls_configured = true;
        int rc = mosq_setup(c, err);
        if (rc != 0) {
            c->tls_configured = false;
            return rc;
        }
    }
    c->backoff_attempt = 0;
    return start_connect(c, err);
}

int fm_devclient_disconnect(fm_devclient *c)
{
    enum state prev = c->st;
    c->st = ST_IDLE;
    if (mosquitto_socket(c->m) >= 0) {
        if (prev == ST_READY || prev == ST_SUBSCRIBING || prev == ST_CONNECTING)
            (void)mosquitto_disconnect_v5(c->m, MQTT_RC_NORMAL_DISCONNECTION, NULL);
        /* Give the DISCONNECT a moment to leave so the broker logs a clean
         * disconnect instead of a dropped connection; never wait long. */
        uint64_t until = fm_mono_ns() + DISCONNECT_FLUSH_MS * NS_PER_MS;
        while (mosquitto_socket(c->m) >= 0 && mosquitto_want_write(c->m) && fm_mono_ns() < until) {
            struct pollfd p = {.fd = mosquitto_socket(c->m), .events = POLLOUT};
            if (poll(&p, 1, 10) < 0 && errno != EINTR)
                break;
            if (mosquitto_loop_write(c->m, 1) != MOSQ_ERR_SUCCESS)
                break;
        }
    }
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next)
        c->slots[i].in_flight = false;
    sync_fd(c);
    return 0;
}

/* ---- publishing --------------------------------------------------------------- */

/* Puts a measurement into a free slot (no I/O, no send). */
static int queue_slot(fm_devclient *c, const char *measurement_id, const char *payload, size_t len,
                      uint32_t *out)
{
    if (c->n_free == 0)
        return FM_EBUSY;
    char *id = fm_strdup(measurement_id);
    char *copy = fm_malloc(len);
    if (!id || !copy) {
        fm_free(id);
        fm_free(copy);
        return FM_ENOMEM;
    }
    memcpy(copy, payload, len);

    uint32_t idx = c->free_stack[--c->n_free];
    struct pending *p = &c->slots[idx];
    memset(p, 0, sizeof *p);
    p->id = id;
    p->payload = copy;
    p->len = len;
    p->gen = c->next_gen++;
    if (c->next_gen == 0)
        c->next_gen = 1; /* 0 marks a free slot */
    p->queued_ns = fm_mono_ns();
    list_append(c, idx);
    c->n_pending++;
    if (c->ob)
        due_at(c, p->queued_ns);
    else
        due_at(c, p->queued_ns + c->timeout_ns * c->max_attempts);
    *out = idx;
    return 0;
}

/* The outbox deleted an old entry to make room: forget it now, report it
 * from the next loop call (publish never calls back synchronously). */
static void on_outbox_drop(void *ud, const char *id)
{
    fm_devclient *c = ud;
    int32_t i = find_pending(c, id);
    if (i >= 0)
        release_slot(c, (uint32_t)i);
    if (c->n_dropped == c->cap_dropped) {
        size_t cap = c->cap_dropped ? c->cap_dropped * 2 : 8;
        char **v = fm_realloc(c->dropped, cap * sizeof *v);
        if (!v)
            return; /* logged by the outbox; only the report is lost */
        c->dropped = v;
        c->cap_dropped = cap;
    }
    char *copy = fm_strdup(id);
    if (copy)
        c->dropped[c->n_dropped++] = copy;
    c->stats.dropped++;
    due_at(c, 0);
}

int fm_devclient_publish_measurement(fm_devclient *c, const char *payload, size_t len,
                                     const char *measurement_id)
{
    if (!payload || len == 0 || len > MQTT_MAX_PAYLOAD || !fm_device_measurement_id_valid(measurement_id))
        return FM_EINVAL;
    if (find_pending(c, measurement_id) >= 0)
        return FM_EEXIST;
    if (c->n_free == 0)
        return FM_EBUSY;
    if (c->ob) {
        int rc = fm_outbox_put(c->ob, measurement_id, payload, len, on_outbox_drop, c);
        if (rc != 0)
            return rc;
    }
    uint32_t idx;
    int rc = queue_slot(c, measurement_id, payload, len, &idx);
    if (rc == 0 && can_send(c)) {
        rc = send_pending(c, idx);
        if (rc != 0)
            release_slot(c, idx); /* undo so that failure leaves nothing queued */
    }
    if (rc != 0 && c->ob)
        (void)fm_outbox_remove(c->ob, measurement_id);
    return rc;
}

/* ---- results ----------------------------------------------------------------- */

int fm_devclient_handle_result(fm_devclient *c, const void *corr, size_t corr_len,
                               const char *payload, size_t len)
{
    const uint8_t *b = corr;
    if (corr_len != FM_DEVCLIENT_CORR_LEN || memcmp(b, c->nonce, CORR_MAGIC_LEN) != 0) {
        c->stats.ignored++;
        fm_logf(FM_LOG_DEBUG, COMPONENT, "%s: result for another session ignored", c->client_id);
        return 0;
    }
    uint32_t idx = get_be32(b + 8), gen = get_be32(b + 12);
    if (idx >= c->max_pending || gen == 0 || c->slots[idx].gen != gen) {
        /* Normal after a retry: both publishes get an answer. */
        c->stats.ignored++;
        fm_logf(FM_LOG_DEBUG, COMPONENT, "%s: duplicate or stale result ignored", c->client_id);
        return 0;
    }

    json_error_t jerr;
    json_t *doc = json_loadb(payload, len, 0, &jerr);
    const char *rid = doc ? json_string_value(json_object_get(doc, "id")) : NULL;
    const char *status = doc ? json_string_value(json_object_get(doc, "status")) : NULL;
    const char *st = NULL;
    if (status && strcmp(status, "ok") == 0)
        st = "ok";
    else if (status && strcmp(status, "error") == 0)
        st = "error";
    if (!rid || !st || strcmp(rid, c->slots[idx].id) != 0) {
        /* Leave the measurement pending: a retry may still get a usable
         * answer, and otherwise it times out visibly. */
        c->stats.ignored++;
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: malformed result for %s ignored%s%s", c->client_id,
                c->slots[idx].id, doc ? "" : ": ", doc ? "" : jerr.text);
        json_decref(doc);
        return 0;
    }
    if (c->ob && st[0] == 'e') {
        /* The cloud could not process it this time (store down, crash):
         * the outbox keeps it and it is sent again later. */
        const char *code = json_string_value(json_object_get(json_object_get(doc, "error"), "code"));
        if (code && (strcmp(code, "unavailable") == 0 || strcmp(code, "internal") == 0 ||
                     strcmp(code, "rate_limited") == 0)) {
            struct pending *p = &c->slots[idx];
            c->stats.retried_errors++;
            retry_later(c, p);
            fm_logf(FM_LOG_INFO, COMPONENT, "%s: %s answered %s; will retry", c->client_id, p->id,
                    code);
            json_decref(doc);
            return 0;
        }
    }
    json_decref(doc);

    /* The callback is promised a NUL-terminated document. */
    char *text = fm_malloc(len + 1);
    if (!text)
        return FM_ENOMEM;
    memcpy(text, payload, len);
    text[len] = '\0';
    resolve(c, idx, st, text, len);
    fm_free(text);
    return 0;
}

int fm_devclient_correlation(const fm_devclient *c, const char *measurement_id, void *buf,
                             size_t cap, size_t *len)
{
    int32_t i = find_pending(c, measurement_id);
    if (i < 0)
        return FM_ENOTFOUND;
    if (cap < FM_DEVCLIENT_CORR_LEN)
        return FM_ERANGE;
    encode_corr(c, (uint32_t)i, buf);
    *len = FM_DEVCLIENT_CORR_LEN;
    return 0;
}

int fm_devclient_result_info_get(const fm_devclient *c, fm_devclient_result_info *out)
{
    if (!c->in_result)
        return FM_ESTATE;
    *out = c->cur;
    return 0;
}

/* ---- shadow and rotation ------------------------------------------------------ */

static int publish_simple(fm_devclient *c, const char *topic, const char *payload)
{
    if (!can_send(c))
        return FM_ESTATE;
    int rc = mosquitto_publish_v5(c->m, NULL, topic, (int)strlen(payload), payload, 1, false, NULL);
    if (rc == MOSQ_ERR_SUCCESS)
        return 0;
    return rc == MOSQ_ERR_NOMEM ? FM_ENOMEM : rc == MOSQ_ERR_NO_CONN ? FM_ESTATE : FM_EIO;
}

int fm_devclient_shadow_report(fm_devclient *c, const char *reported_json)
{
    json_t *rep = reported_json ? json_loads(reported_json, 0, NULL) : NULL;
    if (!json_is_object(rep)) {
        json_decref(rep);
        return FM_EINVAL;
    }
    json_t *doc = json_pack("{s:o}", "reported", rep);
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!text)
        return FM_ENOMEM;
    int rc = publish_simple(c, c->topic_shadow_update, text);
    free(text);
    return rc;
}

int fm_devclient_shadow_get(fm_devclient *c) { return publish_simple(c, c->topic_shadow_get, "{}"); }

int fm_devclient_rotate(fm_devclient *c, fm_errbuf *err)
{
    if (!can_send(c) || c->rotating || !c->extras)
        return fm_errf(err, FM_ESTATE, "%s: cannot rotate now (%s)", c->client_id,
                       !can_send(c) ? "not connected" : c->rotating ? "a rotation is running"
                                                                    : "rotation topics not subscribed");
    char kn[PATH_MAX];
    if (next_path(c->key_path, kn, sizeof kn) != 0)
        return fm_errf(err, FM_EINVAL, "key path too long");
    int rc = fm_key_ensure(kn, err);
    if (rc != 0)
        return rc;
    char *csr = NULL;
    if ((rc = fm_csr_create(kn, c->id, &csr, err)) != 0)
        return rc;
    json_t *doc = json_pack("{s:s}", "csr", csr);
    fm_free(csr);
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    rc = publish_simple(c, c->topic_cert_rotate, text);
    free(text);
    if (rc != 0)
        return fm_errf(err, rc, "%s: cannot publish the rotation request: %s", c->client_id,
                       fm_strerror(rc));
    c->rotating = true;
    c->rotate_deadline_ns = fm_mono_ns() + ROTATE_TIMEOUT_MS * NS_PER_MS;
    fm_logf(FM_LOG_INFO, COMPONENT, "%s: certificate rotation requested", c->client_id);
    return 0;
}

/* ---- driving ------------------------------------------------------------------ */

/* Gives up on the current connection attempt by replacing the instance
 * (see the design notes at the top) and schedules the next one. */
static void abort_connection(fm_devclient *c, const char *why)
{
    char reason[160];
    snprintf(reason, sizeof reason, "%s", why);
    /* Without memory for a new instance the old one stays until the next
     * attempt replaces it; the scheduled reconnect still happens. */
    (void)mosq_setup(c, NULL);
    connection_lost(c, reason);
}

/* Detects a failed connection attempt that libmosquitto would keep
 * retrying: a pending socket error, or a hang-up before CONNACK. */
static bool connect_failed(fm_devclient *c, char *why, size_t len)
{
    int fd = mosquitto_socket(c->m);
    if (c->st != ST_CONNECTING || fd < 0)
        return false;
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr != 0) {
        snprintf(why, len, "%s", strerror(soerr));
        return true;
    }
    struct pollfd p = {.fd = fd, .events = 0};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR))) {
        snprintf(why, len, "connection refused or closed before the handshake completed");
        return true;
    }
    return false;
}

/* Closes the current connection on purpose (DISCONNECT, best effort) and
 * connects again right away with a fresh instance. */
static void restart_connection(fm_devclient *c, const char *why)
{
    bool was_ready = c->st == ST_READY && !c->claiming;
    /* IDLE first: the disconnect callback this may trigger must not
     * report a lost connection or schedule a reconnect of its own. */
    c->st = ST_IDLE;
    if (mosquitto_socket(c->m) >= 0) {
        (void)mosquitto_disconnect_v5(c->m, MQTT_RC_NORMAL_DISCONNECTION, NULL);
        (void)mosquitto_loop_write(c->m, 1);
    }
    for (int32_t i = c->head; i >= 0; i = c->slots[i].next) {
        c->slots[i].in_flight = false;
        c->slots[i].mid = 0;
    }
    (void)mosq_setup(c, NULL);
    c->st = ST_BACKOFF;
    c->backoff_attempt = 0;
    c->next_connect_ns = fm_mono_ns();
    c->epoch++;
    fm_logf(FM_LOG_INFO, COMPONENT, "%s: reconnecting: %s", c->client_id, why);
    if (was_ready && c->on_state)
        c->on_state(c->ud, false, why);
}

/* Stops for good; fm_devclient_connect() may start over. */
static void go_failed(fm_devclient *c, const char *reason)
{
    bool was_ready = c->st == ST_READY && !c->claiming;
    /* IDLE first: the disconnect callback this may trigger must not
     * report a lost connection or schedule a reconnect of its own. */
    c->st = ST_IDLE;
    if (mosquitto_socket(c->m) >= 0) {
        (void)mosquitto_disconnect_v5(c->m, MQTT_RC_NORMAL_DISCONNECTION, NULL);
        (void)mosquitto_loop_write(c->m, 1);
    }
    (void)mosq_setup(c, NULL);
    c->st = ST_FAILED;
    c->epoch++;
    snprintf(c->error, sizeof c->error, "%s", reason);
    fm_logf(FM_LOG_ERROR, COMPONENT, "%s: %s", c->client_id, reason);
    if (c->on_state && (was_ready || c->claiming))
        c->on_state(c->ud, false, c->error);
}

/* Work queued by libmosquitto callbacks that replaces the instance. */
static void run_deferred(fm_devclient *c)
{
    if (c->fail_pending) {
        c->fail_pending = false;
        c->switch_pending = false;
        go_failed(c, c->fail_reason);
        return;
    }
    if (c->switch_pending) {
        c->switch_pending = false;
        snprintf(c->id, sizeof c->id, "%s", c->new_id);
        if (c->use_claim_endpoint && c->new_host[0]) {
            char *h = fm_strdup(c->new_host);
            if (h) {
                fm_free(c->host);
                c->host = h;
                c->port = c->new_port;
            }
        }
        restart_connection(c, "provisioned; connecting as the device");
        c->claiming = false;
        set_topics(c);
        (void)mosq_setup(c, NULL); /* the new client id and certificate */
        c->epoch++;
    }
    if (c->reconnect_pending) {
        c->reconnect_pending = false;
        restart_connection(c, "new certificate installed");
    }
}

static int map_loop_rc(fm_devclient *c, int rc)
{
    run_deferred(c);
    if (rc == MOSQ_ERR_NOMEM)
        return FM_ENOMEM;
    char why[128];
    if (connect_failed(c, why, sizeof why)) {
        abort_connection(c, why);
        return 0;
    }
    sync_fd(c);
    /* The socket can disappear without a disconnect callback on some error
     * paths (for example a failed TLS handshake), so check directly. */
    if ((c->st == ST_CONNECTING || c->st == ST_SUBSCRIBING || c->st == ST_READY) && c->last_fd < 0)
        connection_lost(c, c->last_reason[0] ? c->last_reason
                           : rc == MOSQ_ERR_SUCCESS ? "connection closed"
                                                    : mosquitto_strerror(rc));
    return 0;
}

int fm_devclient_fd(const fm_devclient *c) { return mosquitto_socket(c->m); }

uint64_t fm_devclient_fd_epoch(const fm_devclient *c) { return c->epoch; }

bool fm_devclient_want_write(const fm_devclient *c)
{
    return mosquitto_socket(c->m) >= 0 && mosquitto_want_write(c->m);
}

int fm_devclient_loop_read(fm_devclient *c)
{
    if (mosquitto_socket(c->m) < 0)
        return map_loop_rc(c, MOSQ_ERR_SUCCESS);
    return map_loop_rc(c, mosquitto_loop_read(c->m, 1));
}

int fm_devclient_loop_write(fm_devclient *c)
{
    if (mosquitto_socket(c->m) < 0)
        return map_loop_rc(c, MOSQ_ERR_SUCCESS);
    return map_loop_rc(c, mosquitto_loop_write(c->m, 1));
}

/* Walks the pending FIFO: reports broker rejections and timeouts, and
 * re-publishes measurements whose result is overdue. */
static int scan_pending(fm_devclient *c, uint64_t now)
{
    c->next_due_ns = UINT64_MAX;
    /* Reports of entries the outbox dropped (callbacks may drop more). */
    while (c->n_dropped > 0) {
        char *id = c->dropped[0];
        memmove(c->dropped, c->dropped + 1, (c->n_dropped - 1) * sizeof *c->dropped);
        c->n_dropped--;
        c->in_result = true;
        memset(&c->cur, 0, sizeof c->cur);
        c->on_result(c->ud, id, "dropped", NULL, 0);
        c->in_result = false;
        fm_free(id);
    }
    for (int32_t i = c->head; i >= 0;) {
        struct pending *p = &c->slots[i];
        int32_t next = p->next; /* resolve() unlinks i; callbacks only append */
        /* With an outbox nothing times out: it is retried until answered. */
        uint64_t giveup = c->ob ? UINT64_MAX : p->queued_ns + c->timeout_ns * c->max_attempts;
        uint64_t retry_at = p->sent_ns + (c->ob ? retry_delay_ns(c, p->attempts) : c->timeout_ns);
        if (p->reject_code) {
            resolve_local_error(c, (uint32_t)i, p->reject_code, p->reject_msg);
        } else if (now >= giveup ||
                   (!c->ob && p->in_flight && p->attempts >= c->max_attempts && now >= retry_at)) {
            resolve(c, (uint32_t)i, "timeout", NULL, 0);
        } else if (!p->in_flight && now < p->next_try_ns) {
            due_at(c, p->next_try_ns);
        } else {
            if (can_send(c) && (!p->in_flight || now >= retry_at)) {
                if (p->in_flight)
                    fm_logf(FM_LOG_INFO, COMPONENT, "%s: no result for %s yet, re-publishing",
                            c->client_id, p->id);
                int rc = send_pending(c, (uint32_t)i);
                if (rc != 0) {
                    due_at(c, now);
                    return rc;
                }
            }
            due_at(c, giveup);
            if (p->in_flight)
                due_at(c, p->sent_ns + (c->ob ? retry_delay_ns(c, p->attempts) : c->timeout_ns));
        }
        i = next;
    }
    return 0;
}

int fm_devclient_loop_misc(fm_devclient *c)
{
    uint64_t now = fm_mono_ns();
    if ((c->st == ST_CONNECTING || c->st == ST_SUBSCRIBING) && now >= c->connect_deadline_ns)
        abort_connection(c, "timed out waiting for the broker");
    if (c->st == ST_CONNECTING && mosquitto_socket(c->m) >= 0) {
        /* libmosquitto only advances a non-blocking TLS handshake when the
         * socket is serviced, and does not always ask for writability when
         * the handshake needs it; a periodic read bounds any such stall. */
        int rc = map_loop_rc(c, mosquitto_loop_read(c->m, 1));
        if (rc == 0 && mosquitto_socket(c->m) >= 0 && mosquitto_want_write(c->m))
            rc = map_loop_rc(c, mosquitto_loop_write(c->m, 1));
        if (rc != 0)
            return rc;
    }
    if (mosquitto_socket(c->m) >= 0) {
        int rc = map_loop_rc(c, mosquitto_loop_misc(c->m));
        if (rc != 0)
            return rc;
    }
    if (c->st == ST_BACKOFF && now >= c->next_connect_ns) {
        /* Failure already scheduled the next attempt and was logged. */
        (void)start_connect(c, NULL);
    }
    if (c->claiming && c->st == ST_READY && now >= c->claim_next_ns) {
        if (c->claim_attempts >= c->claim_max_attempts) {
            char why[160];
            snprintf(why, sizeof why, "no answer to the provisioning request after %u attempts",
                     c->claim_attempts);
            go_failed(c, why);
        } else {
            claim_send(c);
        }
    }
    if (c->rotating && now >= c->rotate_deadline_ns) {
        /* The key stays in <key>.next and is reused by the next attempt. */
        c->rotating = false;
        fm_logf(FM_LOG_WARN, COMPONENT, "%s: no answer to the certificate rotation request",
                c->client_id);
        if (c->on_rotate)
            c->on_rotate(c->ud, false, "timeout", "no answer from the cloud");
    }
    run_deferred(c);
    if (now >= c->next_due_ns)
        return scan_pending(c, now);
    return 0;
}

int fm_devclient_next_timeout_ms(const fm_devclient *c)
{
    uint64_t now = fm_mono_ns();
    uint64_t t = now + 1000 * NS_PER_MS;
    if (c->next_due_ns < t)
        t = c->next_due_ns;
    if (c->st == ST_BACKOFF && c->next_connect_ns < t)
        t = c->next_connect_ns;
    if (c->st == ST_CONNECTING && now + CONNECT_NUDGE_MS * NS_PER_MS < t)
        t = now + CONNECT_NUDGE_MS * NS_PER_MS;
    if ((c->st == ST_CONNECTING || c->st == ST_SUBSCRIBING) && c->connect_deadline_ns < t)
        t = c->connect_deadline_ns;
    if (c->claiming && c->st == ST_READY && c->claim_next_ns < t)
        t = c->claim_next_ns;
    if (c->rotating && c->rotate_deadline_ns < t)
        t = c->rotate_deadline_ns;
    if (t <= now)
        return 0;
    /* Round up so a caller sleeping this long does not wake just early. */
    return (int)((t - now + NS_PER_MS - 1) / NS_PER_MS);
}

int fm_devclient_loop(fm_devclient *c, int timeout_ms)
{
    int t = fm_devclient_next_timeout_ms(c);
    if (timeout_ms >= 0 && timeout_ms < t)
        t = timeout_ms;
    int fd = mosquitto_socket(c->m);
    if (fd < 0) {
        if (poll(NULL, 0, t) < 0 && errno == EINTR)
            return 0;
    } else {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (mosquitto_want_write(c->m))
            p.events |= POLLOUT;
        int n = poll(&p, 1, t);
        if (n < 0)
            return errno == EINTR ? 0 : FM_EIO;
        if (n > 0) {
            int rc = 0;
            if (p.revents & (POLLIN | POLLERR | POLLHUP))
                rc = fm_devclient_loop_read(c);
            if (rc == 0 && (p.revents & POLLOUT) && mosquitto_socket(c->m) == fd)
                rc = fm_devclient_loop_write(c);
            if (rc != 0)
                return rc;
        }
    }
    return fm_devclient_loop_misc(c);
}

/* ---- state and statistics -------------------------------------------------- */

bool fm_devclient_ready(const fm_devclient *c) { return can_send(c); }

const char *fm_devclient_id(const fm_devclient *c) { return c->id; }

const char *fm_devclient_error(const fm_devclient *c)
{
    if (c->st != ST_FAILED)
        return NULL;
    return c->error[0] ? c->error : "TLS material unusable";
}

bool fm_devclient_claiming(const fm_devclient *c) { return c->claiming; }

size_t fm_devclient_pending(const fm_devclient *c) { return c->n_pending; }

void fm_devclient_get_stats(const fm_devclient *c, fm_devclient_stats *out) { *out = c->stats; }

/* ---- latency histogram ----------------------------------------------------- */

/* Bucket layout (values in microseconds, u): octave 0 holds u in [0, 64)
 * exactly; octave k >= 1 holds [64 * 2^(k-1), 64 * 2^k) in 64 buckets of
 * width 2^(k-1), so every bucket is at most 1/64 of its lower bound wide. */
static void lathist_index(uint64_t ns, unsigned *k, unsigned *s)
{
    uint64_t u = ns / 1000;
    if (u < FM_LATHIST_SUB) {
        *k = 0;
        *s = (unsigned)u;
        return;
    }
    unsigned msb = 63u - (unsigned)__builtin_clzll(u); /* >= 6 */
    unsigned oct = msb - 5;                            /* 64..127 -> octave 1 */
    if (oct >= FM_LATHIST_OCTAVES) {
        *k = FM_LATHIST_OCTAVES - 1;
        *s = FM_LATHIST_SUB - 1;
        return;
    }
    *k = oct;
    *s = (unsigned)(u >> (oct - 1)) - FM_LATHIST_SUB;
}

/* Exclusive upper bound of a bucket, in ns. */
static uint64_t lathist_upper(unsigned k, unsigned s)
{
    if (k == 0)
        return ((uint64_t)s + 1) * 1000;
    return (((uint64_t)FM_LATHIST_SUB + s + 1) << (k - 1)) * 1000;
}

void fm_lathist_reset(fm_lathist *h) { memset(h, 0, sizeof *h); }

void fm_lathist_record(fm_lathist *h, uint64_t ns)
{
    unsigned k, s;
    lathist_index(ns, &k, &s);
    h->buckets[k][s]++;
    if (h->count == 0 || ns < h->min_ns)
        h->min_ns = ns;
    if (ns > h->max_ns)
        h->max_ns = ns;
    h->count++;
    h->sum_ns += ns;
}

void fm_lathist_merge(fm_lathist *dst, const fm_lathist *src)
{
    if (src->count == 0)
        return;
    for (unsigned k = 0; k < FM_LATHIST_OCTAVES; k++)
        for (unsigned s = 0; s < FM_LATHIST_SUB; s++)
            dst->buckets[k][s] += src->buckets[k][s];
    if (dst->count == 0 || src->min_ns < dst->min_ns)
        dst->min_ns = src->min_ns;
    if (src->max_ns > dst->max_ns)
        dst->max_ns = src->max_ns;
    dst->count += src->count;
    dst->sum_ns += src->sum_ns;
}

uint64_t fm_lathist_quantile(const fm_lathist *h, double q)
{
    if (h->count == 0)
        return 0;
    if (!(q > 0.0))
        return h->min_ns;
    if (q >= 1.0)
        return h->max_ns;
    /* Nearest rank: the smallest sample with at least q of all samples at or
     * below it. */
    double r = q * (double)h->count;
    uint64_t rank = (uint64_t)r;
    if ((double)rank < r)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned k = 0; k < FM_LATHIST_OCTAVES; k++) {
        for (unsigned s = 0; s < FM_LATHIST_SUB; s++) {
            seen += h->buckets[k][s];
            if (seen >= rank) {
                uint64_t v = lathist_upper(k, s);
                if (v > h->max_ns)
                    v = h->max_ns;
                if (v < h->min_ns)
                    v = h->min_ns;
                return v;
            }
        }
    }
    return h->max_ns;
}
