/*
 * The service's MQTT 5 client (libmosquitto): connects to the broker's
 * service listener with the service certificate, keeps a persistent
 * session, subscribes (QoS 1, shared subscriptions so several nodes split
 * the work) and hands each message to a callback. Reconnects by itself.
 */
#ifndef FLEETML_MQTT_H
#define FLEETML_MQTT_H

#include "fleetml/config.h"
#include "fleetml/core.h"

typedef struct fm_mqtt fm_mqtt;

/* A received message. Everything is borrowed for the duration of the
 * callback. The fleetml-* user properties are set only by the broker plugin
 * (it strips copies sent by clients). */
typedef struct fm_mqtt_msg {
    const char *topic;
    const void *payload;
    size_t len;
    const char *response_topic; /* MQTT 5 Response Topic or NULL */
    const void *corr;           /* MQTT 5 Correlation Data or NULL */
    size_t corr_len;
    const char *claim_template; /* user property fleetml-claim-template */
    const char *cert_serial;    /* user property fleetml-cert-serial */
} fm_mqtt_msg;

typedef struct fm_mqtt_handlers {
    /* Called on the client's network thread for each message. */
    void (*on_message)(void *ud, const fm_mqtt_msg *m);
    /* Called on the network thread after each successful (re)connect. */
    void (*on_connect)(void *ud);
    void *ud;
} fm_mqtt_handlers;

/* Parses broker.url, "mqtts://host:port" (host may be [IPv6]), into host
 * (NUL-terminated, host_len bytes at most) and *port. 0 or FM_EINVAL (other
 * schemes, a missing or out-of-range port, user info or a path); nothing
 * is written on failure. */
int fm_mqtt_parse_url(const char *url, char *host, size_t host_len, int *port);

/* Creates the client and starts its network thread; connection happens in
 * the background (see fm_mqtt_connected). In broker.mode external the
 * client id is "fleetml-service.<node.id>" (one session per node on a
 * shared broker) and broker.url, when set, names the broker. subscriptions
 * is a NULL-terminated list of topic filters subscribed with QoS 1 on every
 * connect. Returns 0
 * and *out, or FM_EINVAL / FM_ECRYPTO / FM_ENOMEM with err set. */
int fm_mqtt_start(const fm_config *cfg, const char *const *subscriptions,
                  const fm_mqtt_handlers *h, fm_mqtt **out, fm_errbuf *err);

/* Publishes with QoS 1 (optionally with Correlation Data). Thread-safe;
 * never waits for a connection attempt. Returns:
 *   0            written, or taken into the client's outgoing list when the
 *                connection broke under the write (sent again after the
 *                reconnect, as MQTT requires of QoS 1);
 *   FM_EUNAVAIL  not connected: nothing was queued;
 *   FM_EINVAL    topic, payload or properties refused (nothing queued);
 *   FM_ENOMEM, FM_EIO. */
int fm_mqtt_publish(fm_mqtt *c, const char *topic, const void *payload, size_t len,
                    const void *corr, size_t corr_len);

/* Reconnect backoff: a failed attempt, or a connection that ended before it
 * had been up FM_MQTT_STABLE_MS, doubles the wait (FM_MQTT_BACKOFF_MIN_MS up
 * to FM_MQTT_BACKOFF_MAX_MS); a connection that lasted resets it. */
#define FM_MQTT_BACKOFF_MIN_MS 100
#define FM_MQTT_BACKOFF_MAX_MS 2000
#define FM_MQTT_STABLE_MS 5000

/* The wait after one that was backoff_ms, when the connection that just
 * ended had been accepted established_ms before (0: never accepted). Pure. */
int fm_mqtt_backoff_next(int backoff_ms, int64_t established_ms);

/* 1 while connected and subscribed. */
int fm_mqtt_connected(const fm_mqtt *c);

/* Stops the network thread and disconnects (keeping the broker session);
 * no handler is called after it returns. c stays valid: from then on
 * fm_mqtt_publish returns FM_EUNAVAIL and fm_mqtt_connected 0, so threads
 * that still publish need no lock of their own against shutdown. Safe to
 * call again after it returned, and while other threads publish; NULL is
 * a no-op. */
void fm_mqtt_halt(fm_mqtt *c);

/* fm_mqtt_halt, then frees c. No other thread may use c any more (stop
 * every publisher first). NULL is a no-op. */
void fm_mqtt_stop(fm_mqtt *c);

#endif
