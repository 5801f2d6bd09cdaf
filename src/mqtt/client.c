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
 */
#include "fleetml/mqtt.h"
#include "fleetml/broker.h"
#include "fleetml/thread.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"

#include <errno.h>
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define SERVICE_CLIENT_ID "fleetml-service"
#define MAX_SUBS 16
/* How long the broker keeps the service's session (and queues messages for
 * it) while the service is away: long enough for any restart. */
#define SESSION_EXPIRY_S (7 * 24 * 3600)

struct fm_mqtt {
    struct mosquitto *mosq;
    fm_mqtt_handlers h;
    char *subs[MAX_SUBS];
    int nsubs;
    char host[256];
    int port;
    mosquitto_property *connect_props;
    fm_thread thread; /* the network thread */
    /* Held for every call into libmosquitto; recursive because the
     * library's callbacks (run with it held) may publish. */
    pthread_mutex_t mu;
    int wake_fd; /* eventfd: the network thread's poll returns */
    _Atomic int connected;
    _Atomic int subscribed;
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
    if (atomic_exchange(&c->connected, 0))
        fm_logkv(FM_LOG_WARN, "mqtt", "disconnected from broker", "reason",
                 mosquitto_strerror(rc), NULL);
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

/* One turn of the loop while connected: wait (without the lock) until the
 * socket is readable, writable when there is something to write, the
 * keepalive is due or wake_net is called; then read, write and do the
 * keepalive, with the lock. Returns a MOSQ_ERR_* code. */
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
    pthread_mutex_lock(&c->mu);
    if (pfd[0].revents & (POLLIN | POLLERR | POLLHUP))
        rc = mosquitto_loop_read(c->mosq, 1);
    /* Callbacks run inside the read (a SUBSCRIBE from on_connect, replies
     * published from on_message) only queue their packets. */
    if (rc == MOSQ_ERR_SUCCESS && mosquitto_want_write(c->mosq))
        rc = mosquitto_loop_write(c->mosq, 1);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_loop_misc(c->mosq);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static void *net_thread(void *arg)
{
    fm_mqtt *c = arg;
    int backoff_ms = 100, up = 0;
    while (!stopping(c)) {
        if (!up) {
            /* Connect again with the same CONNECT properties (session
             * expiry), whatever ended the previous connection. */
            pthread_mutex_lock(&c->mu);
            int rc = mosquitto_connect_bind_v5(c->mosq, c->host, c->port, 30, NULL,
                                               c->connect_props);
            pthread_mutex_unlock(&c->mu);
            if (rc != MOSQ_ERR_SUCCESS) {
                if (wait_or_stop(c, backoff_ms))
                    break;
                backoff_ms = backoff_ms * 2 > 2000 ? 2000 : backoff_ms * 2;
                continue;
            }
            up = 1;
            backoff_ms = 100;
        }
        int rc = net_turn(c);
        if (rc != MOSQ_ERR_SUCCESS) {
            if (atomic_load(&c->connected))
                fm_logkv(FM_LOG_WARN, "mqtt", "connection lost", "reason",
                         mosquitto_strerror(rc), NULL);
            mark_down(c);
            up = 0;
            pthread_mutex_lock(&c->mu);
            mosquitto_disconnect(c->mosq);
            pthread_mutex_unlock(&c->mu);
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
    char client_id[128];
    if (external)
        snprintf(client_id, sizeof client_id, "%s.%s", SERVICE_CLIENT_ID, cfg->node_id);
    else
        snprintf(client_id, sizeof client_id, "%s", SERVICE_CLIENT_ID);
    c->mosq = mosquitto_new(client_id, external, c);
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
    mosquitto_property *props = NULL;
    if (corr && corr_len > 0 &&
        mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr,
                                      (uint16_t)corr_len) != MOSQ_ERR_SUCCESS)
        return FM_ENOMEM;
    /* Written to the socket here unless the socket's buffer is full (or
     * this runs inside a callback): then the network thread finishes it. */
    pthread_mutex_lock(&c->mu);
    int rc = mosquitto_publish_v5(c->mosq, NULL, topic, (int)len, payload, 1, false, props);
    bool pending = rc == MOSQ_ERR_SUCCESS && mosquitto_want_write(c->mosq);
    pthread_mutex_unlock(&c->mu);
    mosquitto_property_free_all(&props);
    if (pending)
        wake_net(c);
    if (rc == MOSQ_ERR_SUCCESS)
        return 0;
    return rc == MOSQ_ERR_NO_CONN ? FM_EUNAVAIL : FM_EIO;
}

int fm_mqtt_connected(const fm_mqtt *c)
{
    return atomic_load(&c->connected) && atomic_load(&c->subscribed);
}

void fm_mqtt_stop(fm_mqtt *c)
{
    if (!c)
        return;
    /* The network thread sees the request when its poll returns. */
    fm_thread_request_stop(&c->thread);
    wake_net(c);
    fm_thread_stop(&c->thread);
    /* The network thread is gone: send DISCONNECT (keeping the session)
     * and flush it from this thread. */
    if (atomic_load(&c->connected)) {
        pthread_mutex_lock(&c->mu);
        mosquitto_disconnect_v5(c->mosq, MQTT_RC_NORMAL_DISCONNECTION, NULL);
        for (int i = 0; i < 10 && mosquitto_loop(c->mosq, 50, 1) == MOSQ_ERR_SUCCESS; i++)
            ;
        pthread_mutex_unlock(&c->mu);
    }
    mark_down(c);
    mosquitto_property_free_all(&c->connect_props);
    mosquitto_destroy(c->mosq);
    close(c->wake_fd);
    pthread_mutex_destroy(&c->mu);
    for (int i = 0; i < c->nsubs; i++)
        fm_free(c->subs[i]);
    fm_free(c);
}
