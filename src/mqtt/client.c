/*
 * Service MQTT client.
 *
 * The network thread is ours rather than libmosquitto's loop_start: the
 * library's loop_forever gives up for good on a TLS error, which is exactly
 * what a broker killed mid-connection produces, and the service must
 * reconnect whatever happened.
 *
 * Who writes. Every call into libmosquitto holds c->mu, so the library is
 * only ever entered by one thread at a time and runs in its unthreaded
 * mode: a publish writes its packet to the socket there and then, from
 * the thread that publishes (the commit thread's replies, the PUBACK for
 * each incoming measurement on this thread). In its "threaded" mode every
 * packet was queued instead and this thread woken to write it: one more
 * thread wake-up per reply (on two shared cores 0.1 ms or more when the
 * thread was asleep) and two more system calls per packet. The network
 * thread polls the socket without the lock (libmosquitto's external-loop
 * API: mosquitto_socket, _loop_read, _loop_write, _loop_misc); a publish
 * that cannot finish its write (socket buffer full) wakes it through
 * wake_fd so that it polls for writability too.
 *
 * Connecting. libmosquitto 2.0's connect is blocking (its asynchronous
 * variant leaves TLS set-up undone), and a broker address that drops SYNs
 * would hold this thread in connect() for the kernel's SYN retries (two
 * minutes). So over TCP the thread first checks the address itself with a
 * non-blocking connect bounded by CONNECT_PROBE_MS and cut short by a stop
 * request, and hands over to libmosquitto only once the address answered.
 * The connect runs without c->mu: `connected` is 0 then, and every other
 * entry into libmosquitto (fm_mqtt_publish) checks it under c->mu first.
 *
 * Backoff. Failed attempts wait 100 ms, doubling to 2 s. A connection the
 * broker accepted resets the wait only if it lasted STABLE_MS: a broker
 * that refuses the CONNACK, or a second process with the same client id
 * (the broker hands the session back and forth), is retried at the slow
 * pace, not ten times a second.
 */
#include "fleetml/mqtt.h"
#include "fleetml/broker.h"
#include "fleetml/thread.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"

#include <errno.h>
#include <mosquitto.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <mqtt_protocol.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SERVICE_CLIENT_ID "fleetml-service"
#define MAX_SUBS 16
/* How long the broker keeps the service's session (and queues messages for
 * it) while the service is away: long enough for any restart. */
#define SESSION_EXPIRY_S (7 * 24 * 3600)
/* The longest the address check may take before an attempt counts as failed. */
#define CONNECT_PROBE_MS 5000
/* Packets read in one turn of the network thread before it writes and
 * polls again. */
#define READ_BURST 64

struct fm_mqtt {
    struct mosquitto *mosq;
    fm_mqtt_handlers h;
    char *subs[MAX_SUBS];
    int nsubs;
    char host[256];
    int port; /* 0: host is a Unix socket path */
    char client_id[128];
    mosquitto_property *connect_props;
    fm_thread thread; /* the network thread */
    /* Held for every call into libmosquitto; recursive because the
     * library's callbacks (run with it held) may publish. */
    pthread_mutex_t mu;
    int wake_fd; /* eventfd: the network thread's poll returns */
    _Atomic int connected;
    _Atomic int subscribed;
    /* fm_mono_ns() of the last accepted CONNACK on the current connection,
     * 0 while there is none; written on the network thread only. */
    uint64_t established_ns;
};

static int lib_init_once(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, (void (*)(void))mosquitto_lib_init);
    return 0;
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc, int flags,
                       const mosquitto_property *props)
{
    (void)flags;
    (void)props;
    fm_mqtt *c = obj;
    if (rc != 0) {
        fm_logkv(FM_LOG_WARN, "mqtt", "connect refused", "reason", mosquitto_reason_string(rc),
                 NULL);
        return;
    }
    c->established_ns = fm_mono_ns();
    atomic_store(&c->connected, 1);
    atomic_store(&fm_metrics_get()->mqtt_connected, 1);
    /* The persistent session keeps the subscriptions, but subscribing
     * again is harmless and covers a session the broker has expired. */
    int src = mosquitto_subscribe_multiple(mosq, NULL, c->nsubs, c->subs, 1, 0, NULL);
    if (src != MOSQ_ERR_SUCCESS)
        fm_logkv(FM_LOG_ERROR, "mqtt", "subscribe failed", "error", mosquitto_strerror(src),
                 NULL);
    if (c->h.on_connect)
        c->h.on_connect(c->h.ud);
    fm_logf(FM_LOG_INFO, "mqtt", "connected to broker");
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int qos_count,
                         const int *granted, const mosquitto_property *props)
{
    (void)mosq;
    (void)mid;
    (void)props;
    fm_mqtt *c = obj;
    int ok = qos_count == c->nsubs;
    for (int i = 0; i < qos_count; i++)
        if (granted[i] > 2) {
            fm_logkv(FM_LOG_ERROR, "mqtt", "subscription refused", "filter",
                     i < c->nsubs ? c->subs[i] : "?", NULL);
            ok = 0;
        }
    if (ok)
        atomic_store(&c->subscribed, 1);
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc,
                          const mosquitto_property *props)
{
    (void)mosq;
    (void)props;
    fm_mqtt *c = obj;
    if (rc == MQTT_RC_SESSION_TAKEN_OVER)
        fm_logkv(FM_LOG_ERROR, "mqtt",
                 "another connection took over this client id (is node.id unique?)", "client_id",
                 c->client_id, NULL);
    else if (atomic_exchange(&c->connected, 0))
        fm_logkv(FM_LOG_WARN, "mqtt", "disconnected from broker", "reason",
                 rc >= 128 ? mosquitto_reason_string(rc) : mosquitto_strerror(rc), NULL);
    atomic_store(&c->connected, 0);
    atomic_store(&c->subscribed, 0);
    atomic_store(&fm_metrics_get()->mqtt_connected, 0);
}

/* Reads a user property by name (first occurrence); caller frees. */
static char *user_property(const mosquitto_property *props, const char *want)
{
    char *name = NULL, *value = NULL;
    const mosquitto_property *p =
        mosquitto_property_read_string_pair(props, MQTT_PROP_USER_PROPERTY, &name, &value, false);
    while (p) {
        if (name && strcmp(name, want) == 0) {
            free(name);
            return value;
        }
        free(name);
        free(value);
        name = value = NULL;
        p = mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &name, &value, true);
    }
    return NULL;
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props)
{
    (void)mosq;
    fm_mqtt *c = obj;
    char *rt = NULL;
    void *corr = NULL;
    uint16_t corr_len = 0;
    mosquitto_property_read_string(props, MQTT_PROP_RESPONSE_TOPIC, &rt, false);
    mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false);
    char *claim = user_property(props, "fleetml-claim-template");
    char *serial = user_property(props, "fleetml-cert-serial");
    fm_mqtt_msg m = {.topic = msg->topic, .payload = msg->payload, .len = (size_t)msg->payloadlen,
                     .response_topic = rt, .corr = corr, .corr_len = corr_len,
                     .claim_template = claim, .cert_serial = serial};
    c->h.on_message(c->h.ud, &m);
    free(rt);
    free(corr);
    free(claim);
    free(serial);
}

static void on_log(struct mosquitto *mosq, void *obj, int level, const char *str)
{
    (void)mosq;
    (void)obj;
    if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING))
        fm_logkv(FM_LOG_WARN, "mqtt", "libmosquitto", "detail", str, NULL);
}

/* Waits up to ms or until stop is requested. Returns 1 when stopping. */
static int wait_or_stop(fm_mqtt *c, int ms)
{
    uint64_t deadline = fm_mono_ns() + (uint64_t)ms * 1000000ull;
    fm_thread_lock(&c->thread);
    while (!fm_thread_should_stop(&c->thread) &&
           !fm_thread_wait_ns(&c->thread, (int64_t)(deadline - fm_mono_ns())))
        ;
    int stop = fm_thread_should_stop(&c->thread);
    fm_thread_unlock(&c->thread);
    return stop;
}

static int stopping(fm_mqtt *c)
{
    fm_thread_lock(&c->thread);
    int stop = fm_thread_should_stop(&c->thread);
    fm_thread_unlock(&c->thread);
    return stop;
}

static void mark_down(fm_mqtt *c)
{
    atomic_store(&c->connected, 0);
    atomic_store(&c->subscribed, 0);
    atomic_store(&fm_metrics_get()->mqtt_connected, 0);
}

/* Makes the network thread's poll return (a stop, or a publish that left
 * bytes to write). */
static void wake_net(fm_mqtt *c)
{
    uint64_t one = 1;
    if (write(c->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        fm_logkv(FM_LOG_WARN, "mqtt", "cannot wake the network thread", "error",
                 strerror(errno), NULL);
}

/* Whether fd has bytes to read right now (a zero-timeout poll). */
static bool readable_now(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* One turn of the loop while connected: wait (without the lock) until the
 * socket is readable, writable when there is something to write, the
 * keepalive is due or wake_net is called; then read, write and do the
 * keepalive, with the lock. Returns a MOSQ_ERR_* code.
 *
 * Reads come in bursts of up to READ_BURST packets. mosquitto_loop_read
 * stops after one packet whenever errno is EAGAIN on its way out, and it
 * always is once the library's internal wake-up socket pair is full (it
 * writes a byte there for every packet it queues, and only mosquitto_loop
 * reads them): so read again while OpenSSL holds decrypted bytes (which
 * poll cannot see) or the socket is still readable. The lock is let go
 * between packets, as it was between turns, so that replies published by
 * other threads do not wait for a whole burst. */
static int net_turn(fm_mqtt *c)
{
    pthread_mutex_lock(&c->mu);
    int fd = mosquitto_socket(c->mosq);
    bool want_write = mosquitto_want_write(c->mosq);
    pthread_mutex_unlock(&c->mu);
    if (fd < 0)
        return MOSQ_ERR_NO_CONN;
    struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN | (want_write ? POLLOUT : 0)},
                            {.fd = c->wake_fd, .events = POLLIN}};
    /* 100 ms: the keepalive (30 s) and stop requests need no finer grain. */
    int n = poll(pfd, 2, 100);
    if (n < 0)
        return errno == EINTR ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ERRNO;
    if (pfd[1].revents & POLLIN) {
        uint64_t v;
        if (read(c->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
            return MOSQ_ERR_ERRNO;
    }
    int rc = MOSQ_ERR_SUCCESS;
    if (pfd[0].revents & (POLLIN | POLLERR | POLLHUP)) {
        for (int i = 0; i < READ_BURST; i++) {
            pthread_mutex_lock(&c->mu);
            rc = mosquitto_loop_read(c->mosq, 1);
            /* Replies published from the message callback were only
             * queued: written now, not after the burst. */
            if (rc == MOSQ_ERR_SUCCESS && mosquitto_want_write(c->mosq))
                rc = mosquitto_loop_write(c->mosq, 1);
            bool same = mosquitto_socket(c->mosq) == fd;
            SSL *ssl = same ? mosquitto_ssl_get(c->mosq) : NULL;
            bool buffered = ssl && SSL_pending(ssl) > 0;
            pthread_mutex_unlock(&c->mu);
            if (rc != MOSQ_ERR_SUCCESS || !same || !(buffered || readable_now(fd)))
                break;
        }
    }
    pthread_mutex_lock(&c->mu);
    /* What is left to write: a partial write (socket buffer full), or
     * packets queued by callbacks of the last read. */
    if (rc == MOSQ_ERR_SUCCESS && mosquitto_want_write(c->mosq))
        rc = mosquitto_loop_write(c->mosq, 1);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_loop_misc(c->mosq);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Checks that a TCP broker address answers: a non-blocking connect to each
 * of its addresses in turn, within CONNECT_PROBE_MS in all, cut short when
 * wake_fd fires (a stop). 0 when one accepted the connection (closed at
 * once; libmosquitto then makes its own), -1 otherwise. */
static int probe_address(fm_mqtt *c)
{
    char port[8];
    snprintf(port, sizeof port, "%d", c->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int gai = getaddrinfo(c->host, port, &hints, &ai);
    if (gai != 0) {
        fm_logkv(FM_LOG_WARN, "mqtt", "cannot resolve the broker", "host", c->host, "error",
                 gai_strerror(gai), NULL);
        return -1;
    }
    uint64_t deadline = fm_mono_ns() + (uint64_t)CONNECT_PROBE_MS * 1000000ull;
    int ok = -1;
    for (struct addrinfo *a = ai; a && ok != 0 && !stopping(c); a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        a->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            ok = 0;
        } else if (errno == EINPROGRESS) {
            struct pollfd p[2] = {{.fd = fd, .events = POLLOUT},
                                  {.fd = c->wake_fd, .events = POLLIN}};
            for (;;) {
                uint64_t now = fm_mono_ns();
                if (now >= deadline)
                    break;
                int n = poll(p, 2, (int)((deadline - now) / 1000000ull) + 1);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0 || (p[1].revents & POLLIN))
                    break; /* time is up, or a stop (the flag is checked above) */
                int soerr = 0;
                socklen_t len = sizeof soerr;
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0)
                    ok = 0;
                break;
            }
        }
        close(fd);
    }
    freeaddrinfo(ai);
    return ok;
}

/* The wait after a connection ends or an attempt fails. */
int fm_mqtt_backoff_next(int backoff_ms, int64_t established_ms)
{
    if (established_ms >= FM_MQTT_STABLE_MS)
        return FM_MQTT_BACKOFF_MIN_MS;
    if (backoff_ms < FM_MQTT_BACKOFF_MIN_MS)
        return FM_MQTT_BACKOFF_MIN_MS;
    return backoff_ms * 2 > FM_MQTT_BACKOFF_MAX_MS ? FM_MQTT_BACKOFF_MAX_MS : backoff_ms * 2;
}

static void *net_thread(void *arg)
{
    fm_mqtt *c = arg;
    int backoff_ms = FM_MQTT_BACKOFF_MIN_MS, up = 0;
    unsigned short_lived = 0; /* accepted connections in a row that did not last */
    while (!stopping(c)) {
        if (!up) {
            /* Connect again with the same CONNECT properties (session
             * expiry), whatever ended the previous connection. Without
             * c->mu: see the top of the file. */
            int rc = MOSQ_ERR_NO_CONN;
            if (c->port == 0 || probe_address(c) == 0)
                rc = mosquitto_connect_bind_v5(c->mosq, c->host, c->port, 30, NULL,
                                               c->connect_props);
            if (rc != MOSQ_ERR_SUCCESS) {
                if (wait_or_stop(c, backoff_ms))
                    break;
                backoff_ms = fm_mqtt_backoff_next(backoff_ms, 0);
                continue;
            }
            up = 1;
            c->established_ns = 0;
        }
        int rc = net_turn(c);
        if (rc != MOSQ_ERR_SUCCESS) {
            if (atomic_load(&c->connected))
                fm_logkv(FM_LOG_WARN, "mqtt", "connection lost", "reason",
                         mosquitto_strerror(rc), NULL);
            int64_t lasted_ms =
                c->established_ns ? (int64_t)((fm_mono_ns() - c->established_ns) / 1000000ull)
                                  : 0;
            backoff_ms = fm_mqtt_backoff_next(backoff_ms, lasted_ms);
            /* Mosquitto 2.0 closes a connection whose client id another
             * connection takes without saying why (newer brokers send
             * reason 142, logged by on_disconnect). */
            if (c->established_ns)
                short_lived = lasted_ms < FM_MQTT_STABLE_MS ? short_lived + 1 : 0;
            if (short_lived == 3 || (short_lived > 3 && short_lived % 30 == 0)) {
                char n[16];
                snprintf(n, sizeof n, "%u", short_lived);
                fm_logkv(FM_LOG_ERROR, "mqtt",
                         "the broker keeps closing the connection soon after accepting it: "
                         "another process may use the same client id (is node.id unique?)",
                         "client_id", c->client_id, "times", n, NULL);
            }
            pthread_mutex_lock(&c->mu);
            mark_down(c);
            mosquitto_disconnect(c->mosq);
            pthread_mutex_unlock(&c->mu);
            up = 0;
            if (wait_or_stop(c, backoff_ms))
                break;
        }
    }
    return NULL;
}

int fm_mqtt_parse_url(const char *url, char *host, size_t host_len, int *port)
{
    static const char scheme[] = "mqtts://";
    if (!url || strncmp(url, scheme, sizeof scheme - 1) != 0)
        return FM_EINVAL;
    const char *h = url + sizeof scheme - 1, *end = h + strlen(h), *colon;
    if (*h == '[') { /* [IPv6]:port */
        const char *close = strchr(h, ']');
        if (!close || close[1] != ':')
            return FM_EINVAL;
        colon = close + 1;
        h++;
        end = close;
    } else {
        colon = strrchr(h, ':');
        if (!colon)
            return FM_EINVAL;
        end = colon;
    }
    size_t n = (size_t)(end - h);
    if (n == 0 || n >= host_len || memchr(h, '/', n) || memchr(h, '@', n))
        return FM_EINVAL;
    char *stop;
    long p = strtol(colon + 1, &stop, 10);
    if (stop == colon + 1 || *stop != '\0' || p < 1 || p > 65535)
        return FM_EINVAL;
    memcpy(host, h, n);
    host[n] = '\0';
    *port = (int)p;
    return 0;
}

int fm_mqtt_start(const fm_config *cfg, const char *const *subscriptions,
                  const fm_mqtt_handlers *h, fm_mqtt **out, fm_errbuf *err)
{
    char ca[PATH_MAX], cert[PATH_MAX], key[PATH_MAX], host[256];
    int port = cfg->broker_service_port;
    lib_init_once();
    snprintf(host, sizeof host, "%s", cfg->broker_host);
    if (cfg->broker_url[0] && fm_mqtt_parse_url(cfg->broker_url, host, sizeof host, &port) != 0)
        return fm_errf(err, FM_EINVAL,
                       "broker.url must be mqtts://host:port (TLS is required), not '%s'",
                       cfg->broker_url);
    fm_config_path(cfg, "pki/ca.crt", ca, sizeof ca);
    fm_config_path(cfg, "pki/service.crt", cert, sizeof cert);
    fm_config_path(cfg, "pki/service.key", key, sizeof key);

    fm_mqtt *c = fm_calloc(1, sizeof *c);
    if (!c)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->wake_fd < 0) {
        fm_free(c);
        return fm_errf(err, FM_EIO, "eventfd: %s", strerror(errno));
    }
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&c->mu, &ma);
    pthread_mutexattr_destroy(&ma);
    c->h = *h;
    for (; subscriptions[c->nsubs]; c->nsubs++) {
        if (c->nsubs == MAX_SUBS || !(c->subs[c->nsubs] = fm_strdup(subscriptions[c->nsubs]))) {
            for (int i = 0; i < c->nsubs; i++)
                fm_free(c->subs[i]);
            close(c->wake_fd);
            pthread_mutex_destroy(&c->mu);
            fm_free(c);
            return fm_errf(err, FM_EINVAL, "too many subscriptions or out of memory");
        }
    }
    /* Over the supervised broker's Unix socket (port 0 tells libmosquitto
     * the host is a socket path), no TLS: the socket's directory is the
     * guard, and the plugin knows the service by the socket it came in on. */
    char sock[PATH_MAX];
    bool unix_socket = fm_broker_service_socket(cfg, sock, sizeof sock) == 0 &&
                       strlen(sock) < sizeof host;
    if (unix_socket) {
        memcpy(host, sock, strlen(sock) + 1); /* fits: checked above */
        port = 0;
    }
    snprintf(c->host, sizeof c->host, "%s", host);
    c->port = port;
    int rc;
    /* Supervised: clean_session=false + session expiry, so our own broker
     * queues measurements for the service while it restarts.
     * External: nodes sharing the broker each need their own session (the
     * plugin accepts "<service id>.<node id>" for the service certificate),
     * and that session must end with the node: Mosquitto keeps handing a
     * shared subscription's messages to a member whose persistent session
     * outlives its connection, so a dead node would hold on to its share
     * of the fleet's measurements until it came back. Without a session,
     * the survivors get everything at once; what was in flight to the dead
     * node was never answered, so its devices send it again. */
    bool external = strcmp(cfg->broker_mode, "external") == 0;
    if (external)
        snprintf(c->client_id, sizeof c->client_id, "%s.%s", SERVICE_CLIENT_ID, cfg->node_id);
    else
        snprintf(c->client_id, sizeof c->client_id, "%s", SERVICE_CLIENT_ID);
    c->mosq = mosquitto_new(c->client_id, external, c);
    if (!c->mosq) {
        rc = fm_errf(err, FM_ENOMEM, "mosquitto_new failed");
        goto fail;
    }
    /* Unthreaded on purpose: c->mu serialises every call (see the top). */
    mosquitto_int_option(c->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    if (!unix_socket)
        mosquitto_int_option(c->mosq, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_int_option(c->mosq, MOSQ_OPT_RECEIVE_MAXIMUM, 1000);
    mosquitto_int_option(c->mosq, MOSQ_OPT_SEND_MAXIMUM, 1000);
    mosquitto_max_inflight_messages_set(c->mosq, 1000);
    mosquitto_connect_v5_callback_set(c->mosq, on_connect);
    mosquitto_disconnect_v5_callback_set(c->mosq, on_disconnect);
    mosquitto_subscribe_v5_callback_set(c->mosq, on_subscribe);
    mosquitto_message_v5_callback_set(c->mosq, on_message);
    mosquitto_log_callback_set(c->mosq, on_log);
    rc = unix_socket ? MOSQ_ERR_SUCCESS : mosquitto_tls_set(c->mosq, ca, NULL, cert, key, NULL);
    if (rc == MOSQ_ERR_SUCCESS && !unix_socket)
        rc = mosquitto_tls_opts_set(c->mosq, 1, "tlsv1.2", NULL);
    if (rc != MOSQ_ERR_SUCCESS) {
        rc = fm_errf(err, FM_ECRYPTO, "TLS setup: %s", mosquitto_strerror(rc));
        goto fail;
    }
    if (!external &&
        mosquitto_property_add_int32(&c->connect_props, MQTT_PROP_SESSION_EXPIRY_INTERVAL,
                                     SESSION_EXPIRY_S) != MOSQ_ERR_SUCCESS) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto fail;
    }
    if (fm_thread_start(&c->thread, "fm-mqtt", net_thread, c) != 0) {
        rc = fm_errf(err, FM_ENOMEM, "cannot start MQTT thread");
        goto fail;
    }
    *out = c;
    return 0;
fail:
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    pthread_mutex_destroy(&c->mu);
    mosquitto_property_free_all(&c->connect_props);
    if (c->mosq)
        mosquitto_destroy(c->mosq);
    for (int i = 0; i < c->nsubs; i++)
        fm_free(c->subs[i]);
    fm_free(c);
    return rc;
}

int fm_mqtt_publish(fm_mqtt *c, const char *topic, const void *payload, size_t len,
                    const void *corr, size_t corr_len)
{
    /* Not connected: answer at once, without waiting for c->mu and without
     * queueing in libmosquitto (it would keep a QoS 1 message for the next
     * connection, and the queue would grow for as long as the outage). */
    if (!atomic_load(&c->connected))
        return FM_EUNAVAIL;
    mosquitto_property *props = NULL;
    if (corr && corr_len > 0 &&
        mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr,
                                      (uint16_t)corr_len) != MOSQ_ERR_SUCCESS)
        return FM_ENOMEM;
    /* Written to the socket here unless the socket's buffer is full (or
     * this runs inside a callback): then the network thread finishes it. */
    pthread_mutex_lock(&c->mu);
    if (!atomic_load(&c->connected)) { /* went down meanwhile (set under c->mu) */
        pthread_mutex_unlock(&c->mu);
        mosquitto_property_free_all(&props);
        return FM_EUNAVAIL;
    }
    int rc = mosquitto_publish_v5(c->mosq, NULL, topic, (int)len, payload, 1, false, props);
    /* From the network thread (a callback) the thread writes it itself
     * after the read; from any other, wake it to finish a partial write. */
    bool pending = rc == MOSQ_ERR_SUCCESS && mosquitto_want_write(c->mosq) &&
                   !pthread_equal(pthread_self(), c->thread.tid);
    pthread_mutex_unlock(&c->mu);
    mosquitto_property_free_all(&props);
    if (pending)
        wake_net(c);
    switch (rc) {
    case MOSQ_ERR_SUCCESS:
    /* The connection broke under the write: the message is in the client's
     * outgoing list already and goes out again after the reconnect (as
     * MQTT requires of a QoS 1 message without its PUBACK). */
    case MOSQ_ERR_NO_CONN:
    case MOSQ_ERR_CONN_LOST:
    case MOSQ_ERR_ERRNO:
        return 0;
    case MOSQ_ERR_NOMEM:
        return FM_ENOMEM;
    case MOSQ_ERR_INVAL:
    case MOSQ_ERR_MALFORMED_UTF8:
    case MOSQ_ERR_PAYLOAD_SIZE:
    case MOSQ_ERR_OVERSIZE_PACKET:
    case MOSQ_ERR_QOS_NOT_SUPPORTED:
        return FM_EINVAL;
    default:
        return FM_EIO;
    }
}

int fm_mqtt_connected(const fm_mqtt *c)
{
    return atomic_load(&c->connected) && atomic_load(&c->subscribed);
}

void fm_mqtt_halt(fm_mqtt *c)
{
    if (!c)
        return;
    /* The network thread sees the request when its poll returns. */
    fm_thread_request_stop(&c->thread);
    wake_net(c);
    fm_thread_stop(&c->thread);
    /* The network thread is gone: send DISCONNECT (keeping the session)
     * and flush it from this thread. Marked down under c->mu, so a publish
     * that takes the lock after this sees FM_EUNAVAIL. */
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->connected)) {
        /* Written there and then unless the socket's buffer is full; then
         * finish it within 500 ms (mosquitto_loop would return at once: its
         * wake-up socket pair is never empty here). */
        mosquitto_disconnect_v5(c->mosq, MQTT_RC_NORMAL_DISCONNECTION, NULL);
        uint64_t deadline = fm_mono_ns() + 500000000ull;
        int fd;
        while (mosquitto_want_write(c->mosq) && (fd = mosquitto_socket(c->mosq)) >= 0 &&
               fm_mono_ns() < deadline) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 50) < 0 && errno != EINTR)
                break;
            if ((p.revents & POLLOUT) && mosquitto_loop_write(c->mosq, 1) != MOSQ_ERR_SUCCESS)
                break;
        }
    }
    mark_down(c);
    pthread_mutex_unlock(&c->mu);
}

void fm_mqtt_stop(fm_mqtt *c)
{
    if (!c)
        return;
    fm_mqtt_halt(c);
    mosquitto_property_free_all(&c->connect_props);
    mosquitto_destroy(c->mosq);
    close(c->wake_fd);
    pthread_mutex_destroy(&c->mu);
    for (int i = 0; i < c->nsubs; i++)
        fm_free(c->subs[i]);
    fm_free(c);
}
