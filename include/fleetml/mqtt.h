/*
 * The service's MQTT 5 client (libmosquitto): connects to the broker's
 * service listener with the service certificate, keeps a persistent
 * session, subscribes to `$share/fleetml/fleet/+/measurements` (QoS 1) and
 * hands each measurement to a callback. Reconnects by itself.
 */
#ifndef FLEETML_MQTT_H
#define FLEETML_MQTT_H

#include "fleetml/config.h"
#include "fleetml/core.h"

typedef struct fm_mqtt fm_mqtt;

/* Called on the client's network thread for each measurement message.
 * The buffers are borrowed for the duration of the call. */
typedef void (*fm_mqtt_measurement_fn)(void *ud, const char *device_id, const void *payload,
                                       size_t len, const char *response_topic,
                                       const void *corr, size_t corr_len);

/* Creates the client and starts its network thread; connection happens in
 * the background (see fm_mqtt_connected). Returns 0 and *out, or FM_EINVAL /
 * FM_ECRYPTO / FM_ENOMEM with err set. */
int fm_mqtt_start(const fm_config *cfg, fm_mqtt_measurement_fn on_measurement, void *ud,
                  fm_mqtt **out, fm_errbuf *err);

/* Publishes with QoS 1 (optionally with Correlation Data). Thread-safe.
 * Returns 0, FM_EUNAVAIL when not connected, or FM_EIO. */
int fm_mqtt_publish(fm_mqtt *c, const char *topic, const void *payload, size_t len,
                    const void *corr, size_t corr_len);

/* 1 while connected and subscribed. */
int fm_mqtt_connected(const fm_mqtt *c);

/* Disconnects, stops the network thread and frees c. */
void fm_mqtt_stop(fm_mqtt *c);

#endif
