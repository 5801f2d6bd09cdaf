/*
 * The ingest router: what happens to each message the service receives
 * from the broker, before any subsystem owns it. It knows the topics the
 * service subscribes to and routes each message: measurements to the
 * pipeline (after the service-side admission check; a message that cannot
 * be queued is answered at once), device requests and presence reports to
 * the registry, admission reports to the metrics. Runs on the MQTT client's
 * network thread and does nothing slow: route, copy, queue.
 */
#ifndef FLEETML_INGEST_H
#define FLEETML_INGEST_H

#include "fleetml/config.h"
#include "fleetml/mqtt.h"
#include "fleetml/pipeline.h"

struct fm_registry;

typedef struct fm_ingest fm_ingest;

typedef struct fm_ingest_opts {
    const fm_config *cfg;          /* device_rate, device_burst (copied) */
    fm_pipeline *pipeline;         /* required; not owned */
    struct fm_registry *registry;  /* NULL: device requests are ignored; not owned */
    fm_publish_fn publish;         /* immediate answers (overload, over rate) */
    void *ud;
} fm_ingest_opts;

/* The topic filters the service subscribes to (NULL-terminated, static). */
const char *const *fm_ingest_subscriptions(void);

/* Creates a router. Returns 0 and *out, or FM_ENOMEM. Free with
 * fm_ingest_free once no message can arrive any more. */
int fm_ingest_new(const fm_ingest_opts *opts, fm_ingest **out);
void fm_ingest_free(fm_ingest *in);

/* Routes one message (the MQTT client's on_message; in is the ud).
 * Called from one thread at a time. */
void fm_ingest_on_message(void *in, const fm_mqtt_msg *m);

#endif
