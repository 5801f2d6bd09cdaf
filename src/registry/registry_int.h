/* Internals shared by the registry service's files. */
#ifndef FLEETML_REGISTRY_INT_H
#define FLEETML_REGISTRY_INT_H

#include "fleetml/pki.h"
#include "fleetml/ratelimit.h"
#include "fleetml/registry.h"
#include "fleetml/thread.h"

#include <jansson.h>
#include <pthread.h>


#define REGISTRY_PRESENCE_BATCH 256

typedef struct regmsg {
    struct regmsg *next;
    char *topic;
    char *payload; /* NUL-terminated copy */
    size_t len;
    char *response_topic;
    void *corr;
    size_t corr_len;
    char *claim_template;
    char *cert_serial;
} regmsg;

struct fm_registry {
    fm_registry_opts opts;
    fm_config cfg;
    fm_store *store;
    fm_ca *ca;

    fm_thread thread; /* its lock guards head, tail, depth, resync */
    regmsg *head, *tail;
    long depth;
    int resync;

    int64_t event_seq;
    int snapshot_dirty;
    int crl_dirty;
    uint64_t next_grace_ns;
    fm_ratelimit *rates; /* claim requests per template */
    char presence_boot[40]; /* broker start named by the last presence report */
    /* presence reports waiting to be stored in one transaction */
    fm_presence_update presence[REGISTRY_PRESENCE_BATCH];
    char presence_ids[REGISTRY_PRESENCE_BATCH][65];
    size_t npresence;
    int64_t broker_lost_ms; /* last broker death already applied to presence */
};

/* Handles one message (provisioning, rotation, shadow, presence). */
void registry__handle(fm_registry *r, const regmsg *m);
/* Stores the presence reports handled so far (called when the queue runs
 * dry or the batch is full). */
void registry__presence_flush(fm_registry *r);

/* Publishes doc (consumed) to topic with optional correlation data. */
void registry__publish(fm_registry *r, const char *topic, json_t *doc, const void *corr,
                       size_t corr_len);

/* Pushes the current state of a device / template to the broker plugin. */
void registry__push_device(fm_registry *r, const char *device_id);
void registry__push_template(fm_registry *r, const char *name);
/* Publishes the shadow delta of a device if desired differs from reported. */
void registry__push_delta(fm_registry *r, const char *device_id);

/* Takes one token from the template's bucket; 0 when the request may go
 * ahead, FM_EBUSY when the template is over its rate. */
int registry__rate_take(fm_registry *r, const char *name, int per_min);

#endif
