/*
 * fleetml_auth.so: Mosquitto (2.0, plugin API v5) authentication and ACL
 * plugin that enforces the fleetml identity and topic contract against an
 * in-memory view of fleetml's device/template registry.
 *
 * Required broker settings (mosquitto.conf; the config generator must emit
 * exactly these, for every listener that devices or the service use):
 *
 *     per_listener_settings false
 *     allow_anonymous false
 *     plugin /path/to/fleetml_auth.so
 *     plugin_opt_service_id fleetml-service     (optional, this is the default)
 *     plugin_opt_registry <data>/broker/registry.json
 *     plugin_opt_service_socket <path>           (optional: see below)
 *     listener <port> <address>
 *     cafile <ca.crt>
 *     certfile <server.crt>
 *     keyfile <server.key>
 *     require_certificate true
 *     tls_version tlsv1.2                         (minimum; 1.3 is also accepted)
 *     # NOT use_identity_as_username, NOT use_subject_as_username
 *     # no password_file, no acl_file, no other auth plugin
 *
 * plugin_opt_service_socket names the path of a `listener 0 <path>` Unix
 * socket in a directory only the broker's user and root may enter. A client
 * that comes in on that socket with a service client id is the service,
 * with no certificate: the file permissions are its credential (the broker
 * reports a socket client's address as the socket's path, which no TCP
 * client's address can be). Any other client id on the socket is refused.
 *
 * Without plugin_opt_registry (or with an unreadable snapshot at start-up)
 * the plugin fails closed: only the service can connect until a "reload"
 * control op succeeds.
 *
 * Why not use_identity_as_username: tested against Debian's mosquitto
 * 2.0.11, a listener with use_identity_as_username (or
 * use_subject_as_username) copies the certificate CN into the username and
 * never calls MOSQ_EVT_BASIC_AUTH at all, so neither the client-id == CN
 * rule nor the registry could refuse the CONNECT. Devices and claim clients
 * get their rights from the connection record that BASIC_AUTH creates, so on
 * such a listener they connect but can do nothing; the ACL callback
 * additionally re-checks the certificate CN against the record on every
 * access, so a misconfiguration degrades to "connected but useless" instead
 * of "device A acts as device B".
 *
 * Threading: mosquitto 2.0 calls every plugin callback from its single main
 * thread, so the tables below need no locking. Nothing here touches disk or
 * network per packet: the snapshot file is read only at init and on the
 * "reload" control op.
 *
 * The plugin is a MODULE loaded into the broker and deliberately does not
 * link fleetml_core: it uses plain libc allocation, jansson for the snapshot
 * and control payloads, libcrypto for certificates and the broker's logging.
 */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/x509.h>

#include "fleetml/contract.h"
#include "fleetml/core.h" /* fm_fnv1a only: the plugin links no core code */

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mqtt_protocol.h>
/* CMake builds this module with hidden visibility; the entry points the
 * broker looks up with dlsym() must be exported, so the header that
 * declares them is included with default visibility. */
#pragma GCC visibility push(default)
#include <mosquitto_plugin.h>
#pragma GCC visibility pop

#define AUTH_DEFAULT_SERVICE_ID "fleetml-service"
/* A device id is 3..64 characters; the CN upper bound of RFC 5280 is 64 as
 * well, so anything longer cannot be a valid identity in the first place. */
#define AUTH_ID_MAX 64
#define AUTH_TOPIC_ROOT "fleet/"
#define AUTH_PROV_ROOT "fleet/provisioning/"
#define AUTH_CLAIM_CN_PREFIX "claim:"
#define AUTH_CLAIM_ID_PREFIX "prov-"
/* RFC 5280 caps serials at 20 octets (40 hex digits); non-conforming CAs
 * exist, so allow twice that (plus BN_bn2hex's '-' for negative values)
 * before calling a serial garbage. */
#define AUTH_SERIAL_MAX 80
/* "A small set": two during a rotation grace period for a device; claim
 * certificates accumulate per template but stay few. A bound keeps one
 * entry from turning every lookup into a long scan. */
#define AUTH_SERIALS_MAX 256
#define AUTH_SNAPSHOT_MAX ((size_t)256 << 20)
#define AUTH_CONTROL_MAX ((size_t)256 << 10)
#define AUTH_CONTROL_TOPIC "$CONTROL/fleetml/v1"
#define AUTH_RESPONSE_TOPIC "$CONTROL/fleetml/v1/response"
#define AUTH_PRESENCE_ROOT "$fleetml/v1/presence/"
/* Admission reports to the service (FM_ADMISSION_TOPIC in registry.h). */
#define AUTH_ADMISSION_TOPIC "$fleetml/v1/admission"
#define AUTH_PROP_PREFIX "fleetml-"
#define AUTH_PROP_TEMPLATE "fleetml-claim-template"
#define AUTH_PROP_SERIAL "fleetml-cert-serial"

/* ------------------------------------------------------------------------
 * Small chained hash table: string key -> owned value. Chaining keeps
 * deletion trivial (no tombstones), and the table doubles at load factor 1
 * so chains stay O(1) on average. Keys are registry names (written by
 * fleetml) and ids of authenticated clients, so an attacker cannot choose
 * colliding keys without first holding valid certificates. */

struct map_node {
    struct map_node *next;
    uint64_t hash;
    char *key;
    void *val;
};

struct map {
    struct map_node **b;
    size_t nb, n;
    void (*free_val)(void *);
};

static void map_init(struct map *m, void (*free_val)(void *))
{
    memset(m, 0, sizeof *m);
    m->free_val = free_val;
}

static void map_clear(struct map *m)
{
    for (size_t i = 0; i < m->nb; i++) {
        struct map_node *e = m->b[i];
        while (e) {
            struct map_node *next = e->next;
            if (m->free_val)
                m->free_val(e->val);
            free(e->key);
            free(e);
            e = next;
        }
    }
    free(m->b);
    m->b = NULL;
    m->nb = m->n = 0;
}

static struct map_node **map_slot(const struct map *m, const char *key, uint64_t h)
{
    struct map_node **p = &m->b[h & (m->nb - 1)];
    while (*p && ((*p)->hash != h || strcmp((*p)->key, key) != 0))
        p = &(*p)->next;
    return p;
}

static void *map_get(const struct map *m, const char *key)
{
    if (!m->nb || !key)
        return NULL;
    struct map_node **p = map_slot(m, key, fm_fnv1a(FM_FNV1A_INIT, key));
    return *p ? (*p)->val : NULL;
}

static bool map_grow(struct map *m)
{
    size_t nb = m->nb ? m->nb * 2 : 64;
    if (nb > SIZE_MAX / sizeof(struct map_node *))
        return false;
    struct map_node **b = calloc(nb, sizeof *b);
    if (!b)
        return false;
    for (size_t i = 0; i < m->nb; i++) {
        struct map_node *e = m->b[i];
        while (e) {
            struct map_node *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(m->b);
    m->b = b;
    m->nb = nb;
    return true;
}

/* Inserts or replaces; takes ownership of val on success only, so the
 * caller frees it on failure. */
static bool map_put(struct map *m, const char *key, void *val)
{
    if (m->n >= m->nb && !map_grow(m) && !m->nb)
        return false; /* growing is an optimisation, except for the first table */
    uint64_t h = fm_fnv1a(FM_FNV1A_INIT, key);
    struct map_node **p = map_slot(m, key, h);
    if (*p) {
        if (m->free_val)
            m->free_val((*p)->val);
        (*p)->val = val;
        return true;
    }
    struct map_node *e = calloc(1, sizeof *e);
    char *k = strdup(key);
    if (!e || !k) {
        free(e);
        free(k);
        return false;
    }
    e->hash = h;
    e->key = k;
    e->val = val;
    *p = e;
    m->n++;
    return true;
}

static void map_del(struct map *m, const char *key)
{
    if (!m->nb || !key)
        return;
    struct map_node **p = map_slot(m, key, fm_fnv1a(FM_FNV1A_INIT, key));
    struct map_node *e = *p;
    if (!e)
        return;
    *p = e->next;
    if (m->free_val)
        m->free_val(e->val);
    free(e->key);
    free(e);
    m->n--;
}

/* ------------------------------------------------------------------------
 * Registry view and connection table */

enum status { ST_ACTIVE, ST_DISABLED, ST_REVOKED };

/* A device or a template: its status and its allowed certificate serials,
 * stored back to back as NUL-terminated strings in one allocation. */
struct principal {
    enum status status;
    size_t nserials;
    char *serials;
};

enum kind { K_SERVICE, K_DEVICE, K_CLAIM };

/* One authenticated connection, keyed by client id. `client` tells this
 * connection apart from another one that uses (or tried to use) the same
 * client id: mosquitto reports DISCONNECT for a refused impostor or for the
 * old half of a session takeover after the new connection authenticated. */
struct conn {
    const struct mosquitto *client;
    enum kind kind;
    char name[AUTH_ID_MAX + 1]; /* device id or template name */
    char serial[AUTH_SERIAL_MAX + 1];
    /* Admission (token buckets, devices and claims only): messages and
     * bytes this connection may still publish now; refilled at the
     * configured rates, capped at the bursts. */
    double msg_tokens, byte_tokens;
    long long refill_ns; /* CLOCK_MONOTONIC of the last refill */
    long long told_ns;   /* last time the device was told it is limited */
};

/* Per-device publish limits (plugin_opt_device_*; 0 = unlimited). */
struct admission {
    double msg_rate, msg_burst;   /* messages per second, at once */
    double byte_rate, byte_burst; /* payload bytes per second, at once */
    unsigned long long refused_msgs, refused_bytes; /* not yet reported */
    long long reported_ns;
};

/* A snapshot sent in parts (one MQTT message each, in order, under one
 * "gen"), assembled here and installed at its last part. Two nodes may
 * send theirs at the same time after a broker restart. */
#define AUTH_STAGES 4
struct staging {
    char gen[48];  /* "" = free */
    int next, parts;
    long long seq; /* of part 0 */
    long long touched_ns;
    struct map devices, templates;
};

struct auth_state {
    mosquitto_plugin_id_t *pid;
    char *service_id;
    char *service_socket; /* NULL: the service comes in with its certificate only */
    char *registry_path; /* NULL: no snapshot configured */
    bool view_ok;        /* false: refuse every device and claim client */
    long long view_seq;  /* newest registry event the view reflects (ops' "seq") */
    struct staging stage[AUTH_STAGES]; /* snapshots arriving in parts */
    struct map devices;   /* device id -> struct principal */
    struct map templates; /* template name -> struct principal */
    struct map conns;     /* client id -> struct conn */
    char boot[40];        /* names this broker start in presence reports */
    struct admission adm;
};

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void principal_free(void *p)
{
    struct principal *pr = p;
    if (pr)
        free(pr->serials);
    free(pr);
}

static bool principal_has(const struct principal *pr, const char *serial)
{
    const char *s = pr->serials;
    for (size_t i = 0; i < pr->nserials; i++) {
        if (strcmp(s, serial) == 0)
            return true;
        s += strlen(s) + 1;
    }
    return false;
}

/* Copies an untrusted string (client id, topic) into buf for logging,
 * replacing control and non-ASCII bytes so a client cannot forge log lines. */
static const char *log_safe(const char *s, char *buf, size_t len)
{
    size_t i = 0;
    if (!s)
        s = "(null)";
    for (; s[i] && i + 1 < len; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    buf[i] = '\0';
    return buf;
}

static bool lower_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* `[a-z0-9][a-z0-9-]{min_rest,max_rest}` */
static bool valid_name(const char *s, size_t min_len, size_t max_len)
{
    size_t n = strnlen(s, max_len + 1);
    if (n < min_len || n > max_len)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (!lower_alnum(s[i]) && !(i > 0 && s[i] == '-'))
            return false;
    }
    return true;
}

/* Device ids are `[a-z0-9][a-z0-9-]{2,63}`: lowercase so they map to one
 * topic level, directory and database key without case folding, and free
 * of MQTT special characters (`/`, `+`, `#`, `$`) by construction. The
 * reserved names matter for topics: a device called "provisioning" would own
 * fleet/provisioning/# and read other clients' claim responses. */


static bool valid_template(const char *s)
{
    return valid_name(s, 2, 63);
}

/* Claim client ids are `prov-[A-Za-z0-9_-]{1,64}`: one topic level under
 * fleet/provisioning/ with no MQTT special characters. */
static bool valid_claim_client_id(const char *s)
{
    size_t p = strlen(AUTH_CLAIM_ID_PREFIX);
    if (strncmp(s, AUTH_CLAIM_ID_PREFIX, p) != 0)
        return false;
    s += p;
    size_t n = strnlen(s, 65);
    if (n < 1 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

/* Normalises a serial from the registry into out (lowercase hex, as
 * BN_bn2hex prints it); false if it cannot be a serial at all. */
static bool normalize_serial(const char *in, char *out)
{
    size_t n = strnlen(in, AUTH_SERIAL_MAX + 1);
    if (n == 0 || n > AUTH_SERIAL_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = (char)tolower((unsigned char)in[i]);
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (i == 0 && c == '-' && n > 1)))
            return false;
        out[i] = c;
    }
    out[n] = '\0';
    return true;
}

/* ------------------------------------------------------------------------
 * Certificates */

/* The single subject CN of cert into cn. False if there is no CN, more than
 * one CN (which different consumers would resolve differently), an embedded
 * NUL, or a CN longer than any valid identity. */
static bool cert_cn(X509 *cert, char *cn, size_t cn_len)
{
    unsigned char *utf8 = NULL;
    bool ok = false;
    X509_NAME *name = X509_get_subject_name(cert);
    int idx = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0)
        return false;
    ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
    int n = data ? ASN1_STRING_to_UTF8(&utf8, data) : -1;
    if (n > 0 && (size_t)n < cn_len && !memchr(utf8, '\0', (size_t)n)) {
        memcpy(cn, utf8, (size_t)n);
        cn[n] = '\0';
        ok = true;
    }
    OPENSSL_free(utf8);
    return ok;
}

/* The serial exactly as the spec writes it everywhere: lowercase
 * BN_bn2hex(ASN1_INTEGER_to_BN(serial)). */
static bool cert_serial(X509 *cert, char *out, size_t len)
{
    const ASN1_INTEGER *ai = X509_get0_serialNumber(cert);
    BIGNUM *bn = ai ? ASN1_INTEGER_to_BN(ai, NULL) : NULL;
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    bool ok = false;
    if (hex && strlen(hex) < len) {
        for (size_t i = 0; hex[i]; i++)
            out[i] = (char)tolower((unsigned char)hex[i]);
        out[strlen(hex)] = '\0';
        ok = true;
    }
    OPENSSL_free(hex);
    BN_free(bn);
    return ok;
}

/* CN (and optionally serial) of the client's verified certificate. False
 * for a client without a certificate (or, for mosquitto, one whose network
 * connection is already gone). */
static bool client_cert(struct mosquitto *client, char *cn, size_t cn_len, char *serial,
                        size_t serial_len)
{
    X509 *cert = client ? mosquitto_client_certificate(client) : NULL;
    if (!cert)
        return false;
    bool ok = cert_cn(cert, cn, cn_len) && (!serial || cert_serial(cert, serial, serial_len));
    X509_free(cert);
    return ok;
}

/* The connection record of exactly this connection, or NULL. */
static struct conn *conn_of(const struct auth_state *st, const struct mosquitto *client)
{
    if (!client)
        return NULL;
    struct conn *c = map_get(&st->conns, mosquitto_client_id(client));
    return c && c->client == client ? c : NULL;
}

/* The client ids a service certificate (CN = service id) may use: the CN
 * itself, or "<CN>.<node id>" when several fleetml nodes share one broker
 * (a node id is [a-z0-9-], 1..63 characters). */
static bool service_client_id_ok(const char *id, const char *cn)
{
    size_t n = strlen(cn);
    if (strncmp(id, cn, n) != 0)
        return false;
    if (id[n] == '\0')
        return true;
    if (id[n] != '.' || !id[n + 1] || strlen(id + n + 1) > 63)
        return false;
    for (const char *p = id + n + 1; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-'))
            return false;
    return true;
}

/* True for a client on the service's Unix socket (plugin_opt_service_socket)
 * with a service client id. */
static bool via_service_socket(const struct auth_state *st, struct mosquitto *client)
{
    const char *addr = client && st->service_socket ? mosquitto_client_address(client) : NULL;
    const char *id = client ? mosquitto_client_id(client) : NULL;
    return addr && id && strcmp(addr, st->service_socket) == 0 &&
           service_client_id_ok(id, st->service_id);
}

/* True for the service, judged by its certificate or its socket (not its
 * record) so that the service keeps working on a listener that skips
 * BASIC_AUTH. */
static bool is_service(const struct auth_state *st, struct mosquitto *client)
{
    char cn[AUTH_ID_MAX + 2];
    const char *id = client ? mosquitto_client_id(client) : NULL;
    if (via_service_socket(st, client))
        return true;
    return id && client_cert(client, cn, sizeof cn, NULL, 0) && strcmp(cn, st->service_id) == 0 &&
           service_client_id_ok(id, cn);
}

/* Whether the registry view still allows a connection made with this
 * record; used to decide kicks after every change of the view. */
static bool conn_allowed(const struct auth_state *st, const struct conn *c)
{
    if (c->kind == K_SERVICE)
        return true;
    if (!st->view_ok)
        return false;
    const struct principal *pr = map_get(c->kind == K_DEVICE ? &st->devices : &st->templates, c->name);
    return pr && pr->status == ST_ACTIVE && principal_has(pr, c->serial);
}

/* ------------------------------------------------------------------------
 * CONNECT */

static int remember(struct auth_state *st, struct mosquitto *client, enum kind kind,
                    const char *name, const char *serial)
{
    struct conn *c;
    size_t nlen = strlen(name), slen = strlen(serial);
    if (nlen >= sizeof c->name || slen >= sizeof c->serial) /* validated by the caller */
        return MOSQ_ERR_INVAL;
    c = calloc(1, sizeof *c);
    if (!c)
        return MOSQ_ERR_NOMEM;
    c->client = client;
    c->kind = kind;
    c->msg_tokens = st->adm.msg_burst;
    c->byte_tokens = st->adm.byte_burst;
    c->refill_ns = mono_ns();
    memcpy(c->name, name, nlen + 1);
    memcpy(c->serial, serial, slen + 1);
    if (!map_put(&st->conns, mosquitto_client_id(client), c)) {
        free(c);
        return MOSQ_ERR_NOMEM;
    }
    return MOSQ_ERR_SUCCESS;
}

/* Takes one message of len payload bytes from c's buckets; false when the
 * device is over its rate (nothing is taken then). */
static bool admit(struct admission *adm, struct conn *c, size_t len, long long now)
{
    double dt = (double)(now - c->refill_ns) / 1e9;
    c->refill_ns = now;
    if (adm->msg_rate > 0) {
        c->msg_tokens += dt * adm->msg_rate;
        if (c->msg_tokens > adm->msg_burst)
            c->msg_tokens = adm->msg_burst;
    }
    if (adm->byte_rate > 0) {
        c->byte_tokens += dt * adm->byte_rate;
        if (c->byte_tokens > adm->byte_burst)
            c->byte_tokens = adm->byte_burst;
    }
    bool ok = (adm->msg_rate <= 0 || c->msg_tokens >= 1.0) &&
              (adm->byte_rate <= 0 || c->byte_tokens >= (double)len);
    if (ok) {
        c->msg_tokens -= adm->msg_rate > 0 ? 1.0 : 0.0;
        c->byte_tokens -= adm->byte_rate > 0 ? (double)len : 0.0;
    }
    return ok;
}

/* Tells a limited device why, at most once a second, in the reply format
 * of docs/protocol.md (QoS 0: a device over its rate gets no backlog). */
static void tell_limited(struct conn *c, long long now)
{
    if (c->kind != K_DEVICE || now - c->told_ns < 1000000000LL)
        return;
    c->told_ns = now;
    char doc[512], topic[FM_TOPIC_MAX];
    size_t n = fm_error_doc(doc, sizeof doc, "", FM_VERR_RATE_LIMITED,
                            "this device publishes faster than its limit; messages are "
                            "refused by the broker, retry later");
    if (n && fm_topic_build(topic, sizeof topic, c->name, FM_LEAF_RESULTS))
        mosquitto_broker_publish_copy(NULL, topic, (int)n, doc, 0, false, NULL);
}

/* Reports refusals to the service, at most once a second (QoS 0, the
 * counts are deltas: a lost report only under-counts). */
static void admission_report(struct admission *adm, long long now)
{
    if (adm->refused_msgs == 0 || now - adm->reported_ns < 1000000000LL)
        return;
    adm->reported_ns = now;
    char text[128];
    int n = snprintf(text, sizeof text, "{\"refused_messages\":%llu,\"refused_bytes\":%llu}",
                     adm->refused_msgs, adm->refused_bytes);
    if (mosquitto_broker_publish_copy(NULL, AUTH_ADMISSION_TOPIC, n, text, 0, false, NULL) ==
        MOSQ_ERR_SUCCESS)
        adm->refused_msgs = adm->refused_bytes = 0;
}

/* Tells the service a device connected or disconnected, on
 * $fleetml/v1/presence/<device>, QoS 1 and retained: a service that
 * (re)subscribes, e.g. right after this broker restarted and before its
 * session is back, still learns the state of every device this broker has
 * seen. Retained messages live only as long as this broker process, which
 * is exactly as long as its sessions do. */
static void presence(const struct auth_state *st, const char *device, bool online)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ms = (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    json_t *doc = json_pack("{s:s,s:b,s:I,s:s}", "device", device, "online", online, "at_ms",
                            (json_int_t)ms, "boot", st->boot);
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text)
        return;
    char topic[sizeof AUTH_PRESENCE_ROOT + AUTH_ID_MAX + 1];
    snprintf(topic, sizeof topic, "%s%s", AUTH_PRESENCE_ROOT, device);
    int rc = mosquitto_broker_publish_copy(NULL, topic, (int)strlen(text), text, 1, true, NULL);
    if (rc != MOSQ_ERR_SUCCESS)
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: cannot publish presence: %s",
                             mosquitto_strerror(rc));
    free(text);
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_basic_auth *ed = event_data;
    struct auth_state *st = userdata;
    char cn[AUTH_ID_MAX + 2], serial[AUTH_SERIAL_MAX + 1], idbuf[80], cnbuf[80];
    const char *id = mosquitto_client_id(ed->client);
    const char *why, *what = "device";
    enum kind kind = K_DEVICE;
    const char *name = cn;
    (void)event;

    const char *addr = mosquitto_client_address(ed->client);
    if (!id || !*id) {
        why = "no client id";
    } else if (st->service_socket && addr && strcmp(addr, st->service_socket) == 0) {
        /* The socket's directory was the check; only the service uses it. */
        snprintf(cn, sizeof cn, "%s", st->service_id);
        snprintf(serial, sizeof serial, "-");
        if (!service_client_id_ok(id, st->service_id)) {
            why = "only the service may use the service socket";
        } else {
            kind = K_SERVICE;
            what = "service (unix socket)";
            why = NULL;
        }
    } else if (!client_cert(ed->client, cn, sizeof cn, serial, sizeof serial)) {
        why = "no client certificate with a single usable CN and serial";
    } else if (strcmp(cn, st->service_id) == 0) {
        if (!service_client_id_ok(id, cn)) {
            why = "client id does not match certificate CN";
        } else {
            kind = K_SERVICE;
            what = "service";
            why = NULL;
        }
    } else if (strncmp(cn, AUTH_CLAIM_CN_PREFIX, strlen(AUTH_CLAIM_CN_PREFIX)) == 0) {
        name = cn + strlen(AUTH_CLAIM_CN_PREFIX);
        kind = K_CLAIM;
        what = "claim client";
        const struct principal *t = map_get(&st->templates, name);
        if (!valid_template(name))
            why = "claim certificate names an invalid template";
        else if (!valid_claim_client_id(id))
            why = "claim client id is not prov-<serial>";
        else if (!st->view_ok)
            why = "registry snapshot not loaded";
        else if (!t)
            why = "unknown template";
        else if (t->status != ST_ACTIVE)
            why = "template is not active";
        else if (!principal_has(t, serial))
            why = "claim certificate serial not allowed";
        else
            why = NULL;
    } else {
        const struct principal *d = map_get(&st->devices, cn);
        if (!fm_device_id_valid(cn))
            why = "certificate CN is neither the service, a claim nor a valid device id";
        else if (strcmp(id, cn) != 0)
            why = "client id does not match certificate CN";
        else if (!st->view_ok)
            why = "registry snapshot not loaded";
        else if (!d)
            why = "unknown device";
        else if (d->status != ST_ACTIVE)
            why = d->status == ST_REVOKED ? "device revoked" : "device disabled";
        else if (!principal_has(d, serial))
            why = "certificate serial not allowed for this device";
        else
            why = NULL;
    }

    log_safe(id, idbuf, sizeof idbuf);
    if (why) {
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: denied connect for client '%s': %s",
                             idbuf, why);
        return MOSQ_ERR_AUTH;
    }
    /* Recorded before CONNACK: a record replaces that of an older
     * connection with the same id, whose DISCONNECT (session takeover)
     * then no longer matches and leaves this one alone. */
    int rc = remember(st, ed->client, kind, kind == K_SERVICE ? "" : name, serial);
    if (rc != MOSQ_ERR_SUCCESS) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: out of memory admitting '%s'", idbuf);
        return MOSQ_ERR_AUTH;
    }
    mosquitto_log_printf(MOSQ_LOG_INFO, "fleetml_auth: accepted %s '%s' (cn '%s', serial %s)",
                         what, idbuf, log_safe(cn, cnbuf, sizeof cnbuf), serial);
    if (kind == K_DEVICE)
        presence(st, name, true);
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------
 * ACL */

/* True if topic is `fleet/<id>/<rest>` with a non-empty rest. Because the
 * prefix is compared literally, a wildcard can only appear inside rest,
 * i.e. below the device's own level. */
static bool under_device(const char *topic, const char *id)
{
    size_t root = strlen(AUTH_TOPIC_ROOT), idlen = strlen(id);
    if (strncmp(topic, AUTH_TOPIC_ROOT, root) != 0)
        return false;
    topic += root;
    if (strncmp(topic, id, idlen) != 0 || topic[idlen] != '/')
        return false;
    return topic[idlen + 1] != '\0';
}

static bool device_may(const char *id, const char *topic, int access)
{
    switch (access) {
    case MOSQ_ACL_WRITE:
        /* The broker rejects wildcards in PUBLISH topics itself; checking
         * again keeps this function correct on its own. */
        return under_device(topic, id) && !strpbrk(topic, "+#");
    case MOSQ_ACL_SUBSCRIBE:
    case MOSQ_ACL_UNSUBSCRIBE:
        /* `$share/...`, `$CONTROL/...` and `$SYS/...` start with '$' and so
         * never match the literal "fleet/" prefix. */
    case MOSQ_ACL_READ:
        return under_device(topic, id);
    default:
        return false;
    }
}

/* Exactly `fleet/provisioning/<client id>/<leaf>`. */
static bool is_prov_topic(const char *topic, const char *id, const char *leaf)
{
    size_t root = strlen(AUTH_PROV_ROOT), idlen = strlen(id);
    return strncmp(topic, AUTH_PROV_ROOT, root) == 0 && strncmp(topic + root, id, idlen) == 0 &&
           topic[root + idlen] == '/' && strcmp(topic + root + idlen + 1, leaf) == 0;
}

static bool claim_may(const char *id, const char *topic, int access)
{
    switch (access) {
    case MOSQ_ACL_WRITE:
        return is_prov_topic(topic, id, "request");
    case MOSQ_ACL_SUBSCRIBE:
    case MOSQ_ACL_UNSUBSCRIBE:
        /* The two exact topics are also valid filters. */
        return is_prov_topic(topic, id, "+") || is_prov_topic(topic, id, "accepted") ||
               is_prov_topic(topic, id, "rejected");
    case MOSQ_ACL_READ:
        return is_prov_topic(topic, id, "accepted") || is_prov_topic(topic, id, "rejected");
    default:
        return false;
    }
}

static const char *access_name(int access)
{
    switch (access) {
    case MOSQ_ACL_READ: return "read";
    case MOSQ_ACL_WRITE: return "write";
    case MOSQ_ACL_SUBSCRIBE: return "subscribe";
    case MOSQ_ACL_UNSUBSCRIBE: return "unsubscribe";
    default: return "unknown";
    }
}

static const char *acl_decide(const struct auth_state *st, struct mosquitto *client,
                              const char *topic, int access)
{
    char cn[AUTH_ID_MAX + 2];
    const char *id = mosquitto_client_id(client);
    bool have_cert = client_cert(client, cn, sizeof cn, NULL, 0);

    if (!id || !topic)
        return "no client id or topic";
    if (via_service_socket(st, client))
        return NULL;
    if (have_cert && strcmp(cn, st->service_id) == 0)
        return service_client_id_ok(id, cn) ? NULL : "client id does not match certificate CN";

    const struct conn *c = conn_of(st, client);
    if (!c) {
        /* A persistent session whose device is offline has neither a
         * certificate nor a record; mosquitto still checks READ when it
         * queues messages for it. Queueing a device's own topics is safe:
         * they are delivered only after the device passes CONNECT again. */
        if (!have_cert && access == MOSQ_ACL_READ && fm_device_id_valid(id)) {
            const struct principal *d = map_get(&st->devices, id);
            if (st->view_ok && d && d->status == ST_ACTIVE && device_may(id, topic, access))
                return NULL;
        }
        return "no connection record (connected without BASIC_AUTH?)";
    }
    /* The per-access safety net: the certificate must still name the
     * identity the record was made for. */
    if (!have_cert)
        return "no client certificate";
    if (c->kind == K_DEVICE) {
        if (strcmp(cn, id) != 0)
            return "client id does not match certificate CN";
        return device_may(id, topic, access) ? NULL : "topic outside fleet/<id>/";
    }
    if (c->kind == K_CLAIM) {
        size_t p = strlen(AUTH_CLAIM_CN_PREFIX);
        if (strncmp(cn, AUTH_CLAIM_CN_PREFIX, p) != 0 || strcmp(cn + p, c->name) != 0)
            return "certificate CN does not match the claim record";
        return claim_may(id, topic, access) ? NULL : "topic outside fleet/provisioning/<id>/";
    }
    return "service record without a service certificate";
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_acl_check *ed = event_data;
    const struct auth_state *st = userdata;
    char idbuf[80], topicbuf[160];
    (void)event;

    const char *why = acl_decide(st, ed->client, ed->topic, ed->access);
    if (!why)
        return MOSQ_ERR_SUCCESS;
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: denied %s of '%s' for client '%s': %s",
                         access_name(ed->access), log_safe(ed->topic, topicbuf, sizeof topicbuf),
                         log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf), why);
    return MOSQ_ERR_ACL_DENIED;
}

/* ------------------------------------------------------------------------
 * MESSAGE: sanitize and annotate user properties */

static bool forged_name(const mosquitto_property *p)
{
    char *name = NULL, *value = NULL;
    if (mosquitto_property_identifier(p) != MQTT_PROP_USER_PROPERTY)
        return false;
    if (!mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &name, &value, false))
        return true; /* unreadable: treat as forged so it is dropped */
    bool forged = name && strncasecmp(name, AUTH_PROP_PREFIX, strlen(AUTH_PROP_PREFIX)) == 0;
    mosquitto_free(name);
    mosquitto_free(value);
    return forged;
}

/* Appends a copy of property p to *dst. The public API has no generic copy
 * of one property, so it goes by the value type the MQTT 5 spec gives each
 * identifier. */
static int copy_property(mosquitto_property **dst, const mosquitto_property *p)
{
    int id = mosquitto_property_identifier(p), rc = MOSQ_ERR_INVAL;
    switch (id) {
    case MQTT_PROP_PAYLOAD_FORMAT_INDICATOR:
    case MQTT_PROP_REQUEST_PROBLEM_INFORMATION:
    case MQTT_PROP_REQUEST_RESPONSE_INFORMATION:
    case MQTT_PROP_MAXIMUM_QOS:
    case MQTT_PROP_RETAIN_AVAILABLE:
    case MQTT_PROP_WILDCARD_SUB_AVAILABLE:
    case MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE:
    case MQTT_PROP_SHARED_SUB_AVAILABLE: {
        uint8_t v;
        if (mosquitto_property_read_byte(p, id, &v, false))
            rc = mosquitto_property_add_byte(dst, id, v);
        break;
    }
    case MQTT_PROP_SERVER_KEEP_ALIVE:
    case MQTT_PROP_RECEIVE_MAXIMUM:
    case MQTT_PROP_TOPIC_ALIAS_MAXIMUM:
    case MQTT_PROP_TOPIC_ALIAS: {
        uint16_t v;
        if (mosquitto_property_read_int16(p, id, &v, false))
            rc = mosquitto_property_add_int16(dst, id, v);
        break;
    }
    case MQTT_PROP_MESSAGE_EXPIRY_INTERVAL:
    case MQTT_PROP_SESSION_EXPIRY_INTERVAL:
    case MQTT_PROP_WILL_DELAY_INTERVAL:
    case MQTT_PROP_MAXIMUM_PACKET_SIZE: {
        uint32_t v;
        if (mosquitto_property_read_int32(p, id, &v, false))
            rc = mosquitto_property_add_int32(dst, id, v);
        break;
    }
    case MQTT_PROP_SUBSCRIPTION_IDENTIFIER: {
        uint32_t v;
        if (mosquitto_property_read_varint(p, id, &v, false))
            rc = mosquitto_property_add_varint(dst, id, v);
        break;
    }
    case MQTT_PROP_CORRELATION_DATA:
    case MQTT_PROP_AUTHENTICATION_DATA: {
        void *v = NULL;
        uint16_t len = 0;
        if (mosquitto_property_read_binary(p, id, &v, &len, false))
            rc = mosquitto_property_add_binary(dst, id, v, len);
        mosquitto_free(v);
        break;
    }
    case MQTT_PROP_CONTENT_TYPE:
    case MQTT_PROP_RESPONSE_TOPIC:
    case MQTT_PROP_ASSIGNED_CLIENT_IDENTIFIER:
    case MQTT_PROP_AUTHENTICATION_METHOD:
    case MQTT_PROP_RESPONSE_INFORMATION:
    case MQTT_PROP_SERVER_REFERENCE:
    case MQTT_PROP_REASON_STRING: {
        char *v = NULL;
        if (mosquitto_property_read_string(p, id, &v, false))
            rc = mosquitto_property_add_string(dst, id, v);
        mosquitto_free(v);
        break;
    }
    case MQTT_PROP_USER_PROPERTY: {
        char *n = NULL, *v = NULL;
        if (mosquitto_property_read_string_pair(p, id, &n, &v, false))
            rc = mosquitto_property_add_string_pair(dst, id, n, v);
        mosquitto_free(n);
        mosquitto_free(v);
        break;
    }
    default:
        break;
    }
    return rc;
}

/* Most properties a device or claim client may attach to one message. */
#define AUTH_MAX_PROPERTIES 64

static int on_message(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_message *ed = event_data;
    struct auth_state *st = userdata;
    const struct conn *c = conn_of(st, ed->client);
    char idbuf[80];
    (void)event;

    if (c ? c->kind == K_SERVICE : is_service(st, ed->client))
        return MOSQ_ERR_SUCCESS;

    /* Admission: a device over its rate is refused here, before its
     * message is queued for anyone, so a flood never reaches the service's
     * connection ahead of other devices' measurements (PUBACK 0x87 for
     * QoS 1, and a rate_limited notice once a second). */
    if (c) {
        long long now = mono_ns();
        if (!admit(&st->adm, (struct conn *)c, ed->payloadlen, now)) {
            st->adm.refused_msgs++;
            st->adm.refused_bytes += ed->payloadlen;
            tell_limited((struct conn *)c, now);
            admission_report(&st->adm, now);
            return MOSQ_ERR_ACL_DENIED;
        }
    }

    /* MQTT 5 allows any number of user properties, but rebuilding or
     * appending to a long list costs time in the broker's only thread:
     * devices get a generous fixed budget, and a message over it is
     * refused rather than stalling every other client. */
    bool forged = false;
    size_t nprops = 0;
    for (const mosquitto_property *p = ed->properties; p; p = mosquitto_property_next(p)) {
        if (++nprops > AUTH_MAX_PROPERTIES) {
            mosquitto_log_printf(MOSQ_LOG_WARNING,
                                 "fleetml_auth: refused message from '%s': more than %d properties",
                                 log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf),
                                 AUTH_MAX_PROPERTIES);
            return MOSQ_ERR_ACL_DENIED;
        }
        forged = forged || forged_name(p);
    }
    if (forged) {
        /* There is no way to unlink one property, so build the list anew
         * without them. mosquitto 2.0.11 (plugin__handle_message) simply
         * stores whatever list the callback leaves in event_data and never
         * frees the one it passed in, which the message store owned alone;
         * freeing it here is therefore both allowed and required. */
        mosquitto_property *clean = NULL;
        int rc = MOSQ_ERR_SUCCESS;
        for (const mosquitto_property *p = ed->properties; p && rc == MOSQ_ERR_SUCCESS;
             p = mosquitto_property_next(p)) {
            if (!forged_name(p))
                rc = copy_property(&clean, p);
        }
        if (rc != MOSQ_ERR_SUCCESS) {
            mosquitto_property_free_all(&clean);
            /* Dropping beats forwarding forged attributes; the broker then
             * closes the connection, which is acceptable for a client that
             * tried to forge them. */
            mosquitto_log_printf(MOSQ_LOG_WARNING,
                                 "fleetml_auth: dropped message from '%s': cannot strip properties",
                                 log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf));
            return MOSQ_ERR_ACL_DENIED;
        }
        mosquitto_property_free_all(&ed->properties);
        ed->properties = clean;
        mosquitto_log_printf(MOSQ_LOG_NOTICE,
                             "fleetml_auth: stripped forged fleetml-* properties from '%s'",
                             log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf));
    }
    if (!c || c->kind == K_SERVICE)
        return MOSQ_ERR_SUCCESS;
    /* Appending keeps the list head unchanged when there is one, and a new
     * head for an empty list is stored by the broker like any other. */
    int rc = c->kind == K_CLAIM
                 ? mosquitto_property_add_string_pair(&ed->properties, MQTT_PROP_USER_PROPERTY,
                                                      AUTH_PROP_TEMPLATE, c->name)
                 : mosquitto_property_add_string_pair(&ed->properties, MQTT_PROP_USER_PROPERTY,
                                                      AUTH_PROP_SERIAL, c->serial);
    if (rc != MOSQ_ERR_SUCCESS) {
        /* The service relies on these attributes; a message without them
         * would be misattributed, so it is dropped instead. */
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: dropped message from '%s': %s",
                             log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf),
                             mosquitto_strerror(rc));
        return MOSQ_ERR_ACL_DENIED;
    }
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------
 * DISCONNECT */

static int on_tick(int event, void *event_data, void *userdata)
{
    struct auth_state *st = userdata;
    (void)event;
    (void)event_data;
    admission_report(&st->adm, mono_ns());
    return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_disconnect *ed = event_data;
    struct auth_state *st = userdata;
    (void)event;

    const char *id = ed->client ? mosquitto_client_id(ed->client) : NULL;
    if (id) {
        struct conn *c = conn_of(st, ed->client);
        if (c) {
            /* Only the current connection of a device reports it offline: a
             * session taken over by a newer connection is not a disconnect. */
            if (c->kind == K_DEVICE)
                presence(st, c->name, false);
            map_del(&st->conns, id);
        }
        return MOSQ_ERR_SUCCESS;
    }
    /* No id left to look up by: find the record by connection instead. */
    for (size_t i = 0; ed->client && i < st->conns.nb; i++) {
        for (struct map_node *e = st->conns.b[i]; e; e = e->next) {
            if (((struct conn *)e->val)->client == ed->client) {
                if (((struct conn *)e->val)->kind == K_DEVICE)
                    presence(st, ((struct conn *)e->val)->name, false);
                map_del(&st->conns, e->key);
                return MOSQ_ERR_SUCCESS;
            }
        }
    }
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------
 * Registry parsing (snapshot and control ops share the entry format) */

static bool parse_status(const json_t *v, bool template, enum status *out)
{
    const char *s = json_string_value(v);
    if (!s)
        return false;
    if (strcmp(s, "active") == 0)
        *out = ST_ACTIVE;
    else if (strcmp(s, "disabled") == 0)
        *out = ST_DISABLED;
    else if (!template && strcmp(s, "revoked") == 0)
        *out = ST_REVOKED;
    else
        return false;
    return true;
}

/* Builds a principal from {"status": .., <certs_key>: [..]}. A missing
 * serial list means "none allowed" (e.g. a revoked device). */
static struct principal *parse_principal(const json_t *obj, bool template, const char **err)
{
    const char *certs_key = template ? "claim_certs" : "certs";
    enum status status;
    char norm[AUTH_SERIAL_MAX + 1];

    if (!json_is_object(obj)) {
        *err = "entry is not an object";
        return NULL;
    }
    if (!parse_status(json_object_get(obj, "status"), template, &status)) {
        *err = "invalid status";
        return NULL;
    }
    const json_t *certs = json_object_get(obj, certs_key);
    if (certs && !json_is_array(certs)) {
        *err = "certificate list is not an array";
        return NULL;
    }
    size_t n = certs ? json_array_size(certs) : 0;
    if (n > AUTH_SERIALS_MAX) {
        *err = "too many certificate serials";
        return NULL;
    }
    struct principal *pr = calloc(1, sizeof *pr);
    char *blob = calloc(n ? n : 1, AUTH_SERIAL_MAX + 1);
    if (!pr || !blob) {
        free(pr);
        free(blob);
        *err = "out of memory";
        return NULL;
    }
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        const char *s = json_string_value(json_array_get(certs, i));
        if (!s || !normalize_serial(s, norm)) {
            free(blob);
            free(pr);
            *err = "invalid certificate serial";
            return NULL;
        }
        size_t len = strlen(norm) + 1;
        memcpy(blob + used, norm, len);
        used += len;
    }
    pr->status = status;
    pr->nserials = n;
    pr->serials = blob;
    return pr;
}

/* Parses a registry snapshot document (format 1: {"format":1, "seq":N,
 * "devices":{...}, "templates":{...}}, from the file or a "snapshot" op;
 * `what` names it in messages) into the (initialised) maps, which the
 * caller clears on failure. Entries that are individually invalid are
 * skipped (and so refused) rather than failing the whole fleet. *seq is the
 * snapshot's "seq" (0 when absent). */
static bool parse_snapshot(const json_t *root, const char *what, struct map *devices,
                           struct map *templates, long long *seq, char *err, size_t errlen)
{
    size_t skipped = 0;
    const json_t *fmt = json_object_get(root, "format");
    const json_t *sq = json_object_get(root, "seq");
    if (!json_is_object(root) || !json_is_integer(fmt) || json_integer_value(fmt) != 1) {
        snprintf(err, errlen, "%s: not a format 1 registry snapshot", what);
        return false;
    }
    if (sq && (!json_is_integer(sq) || json_integer_value(sq) < 0)) {
        snprintf(err, errlen, "%s: seq must be a non-negative integer", what);
        return false;
    }
    *seq = sq ? (long long)json_integer_value(sq) : 0;
    const json_t *devs = json_object_get(root, "devices");
    const json_t *tmpls = json_object_get(root, "templates");
    if ((devs && !json_is_object(devs)) || (tmpls && !json_is_object(tmpls))) {
        snprintf(err, errlen, "%s: devices/templates must be objects", what);
        return false;
    }
    for (int pass = 0; pass < 2; pass++) {
        const json_t *obj = pass == 0 ? devs : tmpls;
        struct map *m = pass == 0 ? devices : templates;
        const char *key;
        json_t *val;
        if (!obj)
            continue;
        json_object_foreach((json_t *)obj, key, val) {
            const char *why = NULL;
            struct principal *pr = NULL;
            if (pass == 0 ? !fm_device_id_valid(key) : !valid_template(key))
                why = "invalid name";
            else if (!(pr = parse_principal(val, pass == 1, &why)))
                ;
            else if (!map_put(m, key, pr)) {
                principal_free(pr);
                snprintf(err, errlen, "out of memory loading %s", what);
                return false;
            }
            if (why && skipped++ < 20) {
                char kbuf[80];
                mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: %s: skipped %s '%s': %s",
                                     what, pass == 0 ? "device" : "template",
                                     log_safe(key, kbuf, sizeof kbuf), why);
            }
        }
    }
    if (skipped)
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: %s: %zu invalid entries refused",
                             what, skipped);
    return true;
}

/* Reads at most AUTH_SNAPSHOT_MAX bytes of the snapshot file and parses it
 * into fresh maps, leaving the current view untouched on any error. */
static bool load_snapshot(const char *path, struct map *devices, struct map *templates,
                          long long *seq, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    json_t *root = NULL;
    bool ok = false;
    size_t len = 0, cap = 0;

    map_init(devices, principal_free);
    map_init(templates, principal_free);
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return false;
    }
    for (;;) {
        if (len == cap) {
            if (cap > AUTH_SNAPSHOT_MAX) {
                snprintf(err, errlen, "%s is larger than %zu bytes", path, AUTH_SNAPSHOT_MAX);
                goto out;
            }
            size_t ncap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                snprintf(err, errlen, "out of memory reading %s", path);
                goto out;
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    if (ferror(f)) {
        snprintf(err, errlen, "read error on %s", path);
        goto out;
    }
    json_error_t jerr;
    root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "%s: JSON error at line %d: %s", path, jerr.line, jerr.text);
        goto out;
    }
    ok = parse_snapshot(root, path, devices, templates, seq, err, errlen);
out:
    if (!ok) {
        map_clear(devices);
        map_clear(templates);
    }
    json_decref(root);
    free(buf);
    fclose(f);
    return ok;
}

/* ------------------------------------------------------------------------
 * Control ops ($CONTROL/fleetml/v1) */

/* Collects the ids of connections the view no longer allows (all of them,
 * or only claim clients of one template), forgets their records, and only
 * then kicks them: mosquitto_kick_client_by_clientid() disconnects
 * synchronously and so re-enters on_disconnect, which must not find the
 * table in the middle of an iteration. Returns the number kicked. */
static size_t kick_disallowed(struct auth_state *st, const char *only_template)
{
    size_t n = 0, cap = 0;
    char **ids = NULL;

    for (size_t i = 0; i < st->conns.nb; i++) {
        for (struct map_node *e = st->conns.b[i]; e; e = e->next) {
            const struct conn *c = e->val;
            if (only_template && (c->kind != K_CLAIM || strcmp(c->name, only_template) != 0))
                continue;
            if (conn_allowed(st, c))
                continue;
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 16;
                char **nids = realloc(ids, ncap * sizeof *nids);
                if (!nids)
                    goto kick; /* kick what we have; the rest stays for the next op */
                ids = nids;
                cap = ncap;
            }
            if (!(ids[n] = strdup(e->key)))
                goto kick;
            n++;
        }
    }
kick:
    for (size_t i = 0; i < n; i++) {
        char idbuf[80];
        map_del(&st->conns, ids[i]);
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: kicking '%s': no longer allowed",
                             log_safe(ids[i], idbuf, sizeof idbuf));
        mosquitto_kick_client_by_clientid(ids[i], false);
        free(ids[i]);
    }
    free(ids);
    return n;
}

/* Kicks the device connected under client id `id` if the view no longer
 * allows its connection. */
static void kick_device(struct auth_state *st, const char *id)
{
    const struct conn *c = map_get(&st->conns, id);
    if (!c || c->kind != K_DEVICE || conn_allowed(st, c))
        return;
    char idcopy[AUTH_ID_MAX + 1], idbuf[80];
    snprintf(idcopy, sizeof idcopy, "%s", id);
    map_del(&st->conns, idcopy);
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: kicking device '%s': no longer allowed",
                         log_safe(idcopy, idbuf, sizeof idbuf));
    mosquitto_kick_client_by_clientid(idcopy, false);
}

/* Replaces the view with a freshly parsed one and kicks whoever it no
 * longer allows. */
static void install_view(struct auth_state *st, struct map *devices, struct map *templates,
                         long long seq, const char *how)
{
    map_clear(&st->devices);
    map_clear(&st->templates);
    st->devices = *devices;
    st->templates = *templates;
    st->view_seq = seq;
    st->view_ok = true;
    mosquitto_log_printf(MOSQ_LOG_INFO, "fleetml_auth: registry %s (%zu devices, %zu templates, "
                         "seq %lld)", how, st->devices.n, st->templates.n, seq);
    kick_disallowed(st, NULL);
}

static const char *op_reload(struct auth_state *st)
{
    static char err[512];
    struct map devices, templates;
    long long seq = 0;
    if (!st->registry_path)
        return "no plugin_opt_registry configured";
    if (!load_snapshot(st->registry_path, &devices, &templates, &seq, err, sizeof err)) {
        /* Keep the last good view: it is the snapshot plus every change
         * since, whereas failing closed here would cut the whole fleet over
         * a file problem that fleetml reports and can repair. */
        mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: reload failed, keeping view: %s", err);
        return err;
    }
    install_view(st, &devices, &templates, seq, "reloaded");
    return NULL;
}

/* The whole view in one message, from a fleetml node attached to a broker
 * it does not run (no shared file): the snapshot document plus "op". Several
 * nodes send theirs when they (re)connect; one older than what the view
 * already reflects ("seq" below view_seq) would undo later changes and is
 * refused. */
static void stage_free(struct staging *sg)
{
    map_clear(&sg->devices);
    map_clear(&sg->templates);
    sg->gen[0] = '\0';
}

/* The staging slot of gen; with part 0, a new one (free, or the least
 * recently used). NULL when gen has no slot and this is not part 0. */
static struct staging *stage_for(struct auth_state *st, const char *gen, int part)
{
    struct staging *lru = &st->stage[0];
    for (int i = 0; i < AUTH_STAGES; i++) {
        struct staging *sg = &st->stage[i];
        if (sg->gen[0] && strcmp(sg->gen, gen) == 0) {
            if (part == 0)
                stage_free(sg); /* a sender starting over */
            else
                return sg;
        }
    }
    if (part != 0)
        return NULL;
    for (int i = 0; i < AUTH_STAGES; i++) {
        struct staging *sg = &st->stage[i];
        if (!sg->gen[0]) {
            lru = sg;
            break;
        }
        if (sg->touched_ns < lru->touched_ns)
            lru = sg;
    }
    stage_free(lru);
    map_init(&lru->devices, principal_free);
    map_init(&lru->templates, principal_free);
    snprintf(lru->gen, sizeof lru->gen, "%s", gen);
    lru->next = 0;
    return lru;
}

/* Installs a complete snapshot unless it is older than the view. */
static const char *snapshot_done(struct auth_state *st, struct map *devices,
                                 struct map *templates, long long seq)
{
    static char err[128];
    if (st->view_ok && seq < st->view_seq) {
        map_clear(devices);
        map_clear(templates);
        snprintf(err, sizeof err, "stale snapshot (seq %lld, view at %lld)", seq, st->view_seq);
        return err;
    }
    install_view(st, devices, templates, seq, "replaced by a snapshot");
    return NULL;
}

static const char *op_snapshot(struct auth_state *st, const json_t *req)
{
    static char err[512];
    long long seq = 0;
    const json_t *jp = json_object_get(req, "part"), *jn = json_object_get(req, "parts");
    const char *gen = json_string_value(json_object_get(req, "gen"));
    if (!jp && !jn) { /* the whole view in one message */
        struct map devices, templates;
        map_init(&devices, principal_free);
        map_init(&templates, principal_free);
        if (!parse_snapshot(req, "snapshot op", &devices, &templates, &seq, err, sizeof err)) {
            map_clear(&devices);
            map_clear(&templates);
            return err;
        }
        return snapshot_done(st, &devices, &templates, seq);
    }
    if (!json_is_integer(jp) || !json_is_integer(jn) || json_integer_value(jn) < 1 ||
        json_integer_value(jn) > 1000000 || json_integer_value(jp) < 0 ||
        json_integer_value(jp) >= json_integer_value(jn) || !gen || !*gen ||
        strlen(gen) >= sizeof st->stage[0].gen)
        return "snapshot part: needs gen, part and parts (0 <= part < parts)";
    int part = (int)json_integer_value(jp), parts = (int)json_integer_value(jn);
    struct staging *sg = stage_for(st, gen, part);
    if (!sg)
        return "snapshot part out of order (no part 0 for this gen)";
    if (part != sg->next || (part > 0 && parts != sg->parts)) {
        stage_free(sg);
        return "snapshot part out of order";
    }
    if (!parse_snapshot(req, "snapshot part", &sg->devices, &sg->templates, &seq, err,
                        sizeof err)) {
        stage_free(sg);
        return err;
    }
    if (part == 0) {
        sg->seq = seq;
        sg->parts = parts;
    }
    sg->next = part + 1;
    sg->touched_ns = mono_ns();
    if (sg->next < sg->parts)
        return NULL;
    struct map devices = sg->devices, templates = sg->templates;
    long long sseq = sg->seq;
    map_init(&sg->devices, principal_free);
    map_init(&sg->templates, principal_free);
    sg->gen[0] = '\0';
    return snapshot_done(st, &devices, &templates, sseq);
}

/* Ops after the view's snapshot name the event log position they were
 * read at ("seq"), which a later snapshot must not go behind. */
static void note_seq(struct auth_state *st, const json_t *req)
{
    const json_t *sq = json_object_get(req, "seq");
    if (json_is_integer(sq) && json_integer_value(sq) > st->view_seq)
        st->view_seq = (long long)json_integer_value(sq);
}

static const char *op_upsert(struct auth_state *st, const json_t *req, bool template)
{
    const char *name = json_string_value(json_object_get(req, template ? "name" : "id"));
    const char *why = NULL;
    if (!name || (template ? !valid_template(name) : !fm_device_id_valid(name)))
        return template ? "invalid template name" : "invalid device id";
    struct principal *pr = parse_principal(req, template, &why);
    if (!pr)
        return why;
    if (!map_put(template ? &st->templates : &st->devices, name, pr)) {
        principal_free(pr);
        return "out of memory";
    }
    if (template)
        kick_disallowed(st, name);
    else
        kick_device(st, name);
    return NULL;
}

static const char *op_device_remove(struct auth_state *st, const json_t *req)
{
    const char *id = json_string_value(json_object_get(req, "id"));
    if (!id || !fm_device_id_valid(id))
        return "invalid device id";
    map_del(&st->devices, id);
    kick_device(st, id);
    return NULL;
}

static void respond(const char *op, const char *error)
{
    json_t *r = json_object();
    char *text = NULL;
    if (r && json_object_set_new(r, "op", op ? json_string(op) : json_null()) == 0 &&
        json_object_set_new(r, "ok", json_boolean(!error)) == 0 &&
        (!error || json_object_set_new(r, "error", json_string(error)) == 0))
        text = json_dumps(r, JSON_COMPACT);
    if (text) {
        int rc = mosquitto_broker_publish_copy(NULL, AUTH_RESPONSE_TOPIC, (int)strlen(text), text,
                                               0, false, NULL);
        if (rc != MOSQ_ERR_SUCCESS)
            mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: cannot publish response: %s",
                                 mosquitto_strerror(rc));
    }
    free(text);
    json_decref(r);
}

static int on_control(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_control *ed = event_data;
    struct auth_state *st = userdata;
    const char *op = NULL, *error = NULL;
    json_t *req = NULL;
    char idbuf[80];
    (void)event;

    /* Only the service may change the view. The ACL already keeps devices
     * and claim clients off $CONTROL; this is the second line, and it
     * returns success so that the broker does not treat it as a protocol
     * error of the sender. */
    const struct conn *c = conn_of(st, ed->client);
    if (!(c ? c->kind == K_SERVICE : is_service(st, ed->client))) {
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: ignored control message from '%s'",
                             log_safe(ed->client ? mosquitto_client_id(ed->client) : NULL, idbuf,
                                      sizeof idbuf));
        return MOSQ_ERR_SUCCESS;
    }
    /* A snapshot op carries the whole registry (as large as the file). */
    if (ed->payloadlen > AUTH_SNAPSHOT_MAX || (ed->payloadlen && !ed->payload)) {
        error = "payload too large";
        goto out;
    }
    json_error_t jerr;
    req = json_loadb(ed->payload ? ed->payload : "", ed->payloadlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(req)) {
        error = "payload is not a JSON object";
        goto out;
    }
    op = json_string_value(json_object_get(req, "op"));
    if (!op)
        error = "missing op";
    else if (strcmp(op, "snapshot") == 0)
        error = op_snapshot(st, req);
    else if (ed->payloadlen > AUTH_CONTROL_MAX)
        error = "payload too large";
    else if (strcmp(op, "reload") == 0)
        error = op_reload(st);
    else if (strcmp(op, "device") == 0)
        error = op_upsert(st, req, false);
    else if (strcmp(op, "template") == 0)
        error = op_upsert(st, req, true);
    else if (strcmp(op, "device_remove") == 0)
        error = op_device_remove(st, req);
    else
        error = "unknown op";
    if (!error && op && strcmp(op, "snapshot") != 0)
        note_seq(st, req);
out:
    if (error)
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: control op '%s' failed: %s",
                             log_safe(op ? op : "?", idbuf, sizeof idbuf), error);
    respond(op, error);
    json_decref(req);
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------
 * Plugin entry points */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5)
            return 5;
    }
    return -1;
}

static void state_free(struct auth_state *st)
{
    for (int i = 0; i < AUTH_STAGES; i++) {
        map_clear(&st->stage[i].devices);
        map_clear(&st->stage[i].templates);
    }
    map_clear(&st->conns);
    map_clear(&st->devices);
    map_clear(&st->templates);
    free(st->registry_path);
    free(st->service_id);
    free(st->service_socket);
    free(st);
}

static void unregister_all(mosquitto_plugin_id_t *pid)
{
    mosquitto_callback_unregister(pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    mosquitto_callback_unregister(pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    mosquitto_callback_unregister(pid, MOSQ_EVT_MESSAGE, on_message, NULL);
    mosquitto_callback_unregister(pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
    mosquitto_callback_unregister(pid, MOSQ_EVT_CONTROL, on_control, AUTH_CONTROL_TOPIC);
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
    const char *service_id = AUTH_DEFAULT_SERVICE_ID, *registry = NULL, *service_socket = NULL;
    struct admission adm = {0};
    static const struct {
        const char *key;
        size_t off;
    } limits[] = {
        {"device_rate", offsetof(struct admission, msg_rate)},
        {"device_burst", offsetof(struct admission, msg_burst)},
        {"device_bytes_rate", offsetof(struct admission, byte_rate)},
        {"device_bytes_burst", offsetof(struct admission, byte_burst)},
    };
    for (int i = 0; i < option_count; i++) {
        if (!options[i].key || !options[i].value)
            continue;
        if (strcmp(options[i].key, "service_id") == 0)
            service_id = options[i].value;
        else if (strcmp(options[i].key, "registry") == 0)
            registry = options[i].value;
        else if (strcmp(options[i].key, "service_socket") == 0)
            service_socket = options[i].value;
        for (size_t k = 0; k < sizeof limits / sizeof *limits; k++) {
            if (strcmp(options[i].key, limits[k].key) != 0)
                continue;
            char *end;
            double v = strtod(options[i].value, &end);
            if (end == options[i].value || *end || !(v >= 0 && v <= 1e12)) {
                mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: invalid plugin_opt_%s",
                                     limits[k].key);
                return MOSQ_ERR_INVAL;
            }
            *(double *)((char *)&adm + limits[k].off) = v;
        }
    }
    /* A burst below one message (or below the largest payload the broker
     * accepts) would refuse everything: at least one of each. */
    if (adm.msg_burst < 1)
        adm.msg_burst = adm.msg_rate > 1 ? adm.msg_rate : 1;
    if (adm.byte_burst < adm.byte_rate)
        adm.byte_burst = adm.byte_rate;
    /* The service id becomes a client id compared against CNs; a value with
     * topic special characters or an empty one is a configuration mistake. */
    if (!*service_id || strlen(service_id) > AUTH_ID_MAX || strpbrk(service_id, "/+#$")) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: invalid plugin_opt_service_id");
        return MOSQ_ERR_INVAL;
    }
    /* Absolute, so that no IP address (a TCP client's address) can equal it. */
    if (service_socket && service_socket[0] != '/') {
        mosquitto_log_printf(MOSQ_LOG_ERR,
                             "fleetml_auth: plugin_opt_service_socket must be an absolute path");
        return MOSQ_ERR_INVAL;
    }
    if (registry && !*registry) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: empty plugin_opt_registry");
        return MOSQ_ERR_INVAL;
    }

    struct auth_state *st = calloc(1, sizeof *st);
    if (!st)
        return MOSQ_ERR_NOMEM;
    st->pid = identifier;
    st->adm = adm;
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(st->boot, sizeof st->boot, "%lld.%ld.%d", (long long)ts.tv_sec, ts.tv_nsec,
                 (int)getpid());
    }
    map_init(&st->devices, principal_free);
    map_init(&st->templates, principal_free);
    map_init(&st->conns, free);
    st->service_id = strdup(service_id);
    st->registry_path = registry ? strdup(registry) : NULL;
    st->service_socket = service_socket ? strdup(service_socket) : NULL;
    if (!st->service_id || (registry && !st->registry_path) ||
        (service_socket && !st->service_socket)) {
        state_free(st);
        return MOSQ_ERR_NOMEM;
    }

    if (!registry) {
        mosquitto_log_printf(MOSQ_LOG_WARNING, "fleetml_auth: no plugin_opt_registry: "
                             "refusing all device and claim connections until a fleetml node "
                             "sends its snapshot");
    } else {
        char err[512];
        struct map devices, templates;
        long long seq = 0;
        if (load_snapshot(registry, &devices, &templates, &seq, err, sizeof err)) {
            st->devices = devices;
            st->templates = templates;
            st->view_seq = seq;
            st->view_ok = true;
        } else {
            /* Fail closed but keep running: the service must still connect
             * to repair the situation (rewrite the file, send "reload"). */
            mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: %s: refusing all device and claim "
                                 "connections until a successful reload", err);
        }
    }

    struct {
        int event;
        MOSQ_FUNC_generic_callback cb;
        const void *data;
    } regs[] = {
        {MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL},
        {MOSQ_EVT_ACL_CHECK, on_acl_check, NULL},
        {MOSQ_EVT_MESSAGE, on_message, NULL},
        {MOSQ_EVT_DISCONNECT, on_disconnect, NULL},
        {MOSQ_EVT_TICK, on_tick, NULL},
        {MOSQ_EVT_CONTROL, on_control, AUTH_CONTROL_TOPIC},
    };
    for (size_t i = 0; i < sizeof regs / sizeof regs[0]; i++) {
        int rc = mosquitto_callback_register(identifier, regs[i].event, regs[i].cb, regs[i].data, st);
        if (rc != MOSQ_ERR_SUCCESS) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: cannot register callback %d: %s",
                                 regs[i].event, mosquitto_strerror(rc));
            unregister_all(identifier);
            state_free(st);
            return rc;
        }
    }
    *userdata = st;
    mosquitto_log_printf(MOSQ_LOG_INFO,
                         "fleetml_auth: loaded (service id '%s', registry %s: %zu devices, "
                         "%zu templates%s)",
                         st->service_id, registry ? registry : "(none)", st->devices.n,
                         st->templates.n, st->view_ok ? "" : ", FAIL CLOSED");
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    struct auth_state *st = userdata;
    (void)options;
    (void)option_count;
    if (!st)
        return MOSQ_ERR_SUCCESS;
    unregister_all(st->pid);
    state_free(st);
    return MOSQ_ERR_SUCCESS;
}
